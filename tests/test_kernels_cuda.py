"""CUDA checks of the fused loss backends at realistic sizes (skipped without CUDA).

The triton launches here use each width's first (untuned) config: the tests
check correctness, benchmarks/bench_loss.py checks the autotuned configs
against the chunked backend at full size.
"""
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("FINELAP_TRITON_AUTOTUNE", "0")  # compile one config per kernel, not the tuning list

from finelap.kernels import clip_sigmoid_loss, frame_sigmoid_loss, registry  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Max-abs error allowed, relative to the largest reference value of each output.
TOLERANCE = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _frame_case(M, N, D, K, J, num_clusters, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    ids = lambda *shape: torch.randint(-1, num_clusters, shape, device="cuda", generator=generator)  # noqa: E731
    return dict(
        frames=F.normalize(torch.randn(M, D, device="cuda", generator=generator, dtype=torch.float64), dim=1),
        phrases=F.normalize(torch.randn(N, D, device="cuda", generator=generator, dtype=torch.float64), dim=1),
        phrase_cluster=torch.randint(0, num_clusters, (N,), device="cuda", generator=generator),
        frame_active=ids(M, K), frame_ignore=ids(M, J) if J else None,
        scale=torch.tensor(10.0, device="cuda", dtype=torch.float64),
        bias=torch.tensor(-10.0, device="cuda", dtype=torch.float64))


def _clip_case(M, captions_per_clip, D, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    N = M * captions_per_clip
    audio_group = torch.randint(-2**40, 2**40, (M,), device="cuda", generator=generator)
    return dict(
        audio=F.normalize(torch.randn(M, D, device="cuda", generator=generator, dtype=torch.float64), dim=1),
        text=F.normalize(torch.randn(N, D, device="cuda", generator=generator, dtype=torch.float64), dim=1),
        audio_group=audio_group, text_group=audio_group.repeat(captions_per_clip)[torch.randperm(N, device="cuda")],
        scale=torch.tensor(10.0, device="cuda", dtype=torch.float64),
        bias=torch.tensor(-10.0, device="cuda", dtype=torch.float64))


EMBEDDINGS = {"frame": ("frames", "phrases"), "clip": ("audio", "text")}
LOSSES = {"frame": frame_sigmoid_loss, "clip": clip_sigmoid_loss}


def _run(stream, case, backend, dtype, **options):
    """[loss, d_rows, d_columns, d_scale, d_bias] as float64; the reference runs on dtype-rounded inputs."""
    inputs = dict(case)
    leaves = []
    for name in (*EMBEDDINGS[stream], "scale", "bias"):
        value = inputs[name]
        if name in EMBEDDINGS[stream]:
            value = value.to(dtype) if backend != "reference" else value.to(dtype).double()
        else:
            value = value.float() if backend != "reference" else value
        inputs[name] = value.detach().requires_grad_()
        leaves.append(inputs[name])
    loss = LOSSES[stream](**inputs, backend=backend, **options)
    loss.backward()
    return [loss.detach().double()] + [leaf.grad.double() for leaf in leaves]


def _assert_matches_reference(stream, case, backend, dtype, **options):
    """Within TOLERANCE of the largest reference value, plus one subnormal step of dtype for the
    embedding gradients: at real sizes float16 gradients are about scale / normaliser (4.8e-6 at
    3000 x 700), where float16 has only subnormals, spaced 6e-8 apart."""
    expected = _run(stream, case, "reference", dtype)
    got = _run(stream, case, backend, dtype, **options)
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for name, value, want in zip(["loss", "d_rows", "d_columns", "d_scale", "d_bias"], got, expected):
        assert torch.isfinite(value).all(), f"{stream} {backend} {dtype} {name} not finite"
        error = (value - want).abs().max().item()
        bound = TOLERANCE[dtype] * max(want.abs().max().item(), 1e-6)
        if name in ("d_rows", "d_columns"):
            bound += subnormal_step
        assert error <= bound, f"{stream} {backend} {dtype} {name}: max error {error:.3g} > {bound:.3g}"


# The registered backends for CUDA embeddings (but the reference and chunked, checked below): the triton ones.
TRITON_BACKENDS = [name for name in registry.supporting("cuda", torch.bfloat16) if name not in ("reference", "chunked")
                   ] if torch.cuda.is_available() else []
CHUNKED_GEMM_BACKENDS = list(registry.CHUNKED_GEMM_BACKENDS)
# One test per (backend, shape): gpu_check.sh runs them in parallel processes (pytest-xdist),
# so the kernels' compilations, most of this file's time, overlap.
FRAME_CASES = [  # (M, N, D, K, J), dtypes
    ((1000, 300, 200, 3, 2), (torch.float32, torch.bfloat16, torch.float16)),
    ((2049, 1023, 512, 2, 0), (torch.bfloat16,)),
    ((517, 129, 77, 16, 16), (torch.bfloat16,)),
    ((64, 64, 1024, 1, 1), (torch.bfloat16,)),
]


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("shape,dtypes", FRAME_CASES, ids=[str(shape) for shape, _ in FRAME_CASES])
def test_triton_frame_stream_matches_reference(backend, shape, dtypes):
    M, N, D, K, J = shape
    case = _frame_case(M, N, D, K, J, num_clusters=max(4, N // 3), seed=M)
    for dtype in dtypes:
        _assert_matches_reference("frame", case, backend, dtype)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_clip_stream_matches_reference(backend):
    case = _clip_case(777, 3, 512, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        _assert_matches_reference("clip", case, backend, dtype)


@pytest.mark.parametrize("backend", CHUNKED_GEMM_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_several_chunks_match_reference(backend, dtype):
    """A small workspace forces several row chunks: dT accumulates in fp32 across them (bf16, fp16)."""
    case = _frame_case(3000, 700, 1024, 2, 1, num_clusters=200, seed=6)
    _assert_matches_reference("frame", case, backend, dtype, workspace_bytes=6 * 2**20)


def test_chunked_matches_reference_on_cuda():
    _assert_matches_reference("frame", _frame_case(1500, 400, 256, 2, 1, 100, seed=2), "chunked", torch.bfloat16)
    _assert_matches_reference("clip", _clip_case(300, 2, 128, seed=3), "chunked", torch.float32)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_extreme_logits_and_zero_counted_entries(backend):
    case = _frame_case(300, 200, 128, 2, 1, 16, seed=4)
    case["phrases"][:100] = case["frames"][:100]  # cos = +1
    case["scale"] = torch.tensor(1e4, device="cuda", dtype=torch.float64)
    _assert_matches_reference("frame", case, backend, torch.float32)
    case["frame_ignore"] = torch.arange(16, device="cuda").repeat(300, 1)  # every cluster ignored
    for value in _run("frame", case, backend, torch.bfloat16):
        assert torch.equal(value, torch.zeros_like(value))


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_a_nan_logit_gives_nan_on_cuda(backend):
    """The compiled kernels propagate NaN (fast-math min/max or selects could drop it)."""
    case = _frame_case(200, 150, 64, 2, 1, 16, seed=7)
    case["bias"] = torch.tensor(float("nan"), device="cuda", dtype=torch.float64)
    loss, d_rows, d_columns, d_scale, d_bias = _run("frame", case, backend, torch.bfloat16)
    assert torch.isnan(loss) and torch.isnan(d_scale) and torch.isnan(d_bias)
    assert torch.isnan(d_rows).any() and torch.isnan(d_columns).any()


def _peak_extra_bytes(backend, M, N, D, **options):
    case = _frame_case(M, N, D, 2, 0, N // 2, seed=5)
    frames = case.pop("frames").bfloat16().requires_grad_()
    phrases = case.pop("phrases").bfloat16().requires_grad_()
    scale, bias = case.pop("scale").float().requires_grad_(), case.pop("bias").float().requires_grad_()
    frame_sigmoid_loss(frames, phrases, scale=scale, bias=bias, backend=backend, **case, **options).backward()
    frames.grad = phrases.grad = scale.grad = bias.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    frame_sigmoid_loss(frames, phrases, scale=scale, bias=bias, backend=backend, **case, **options).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def test_triton_peak_memory_is_far_below_the_logits():
    """M * N * 4 bytes would be one fp32 logit tensor; the fused loss needs about its gradients."""
    M, N, D = 32768, 8192, 256
    extra = _peak_extra_bytes("triton", M, N, D)
    gradients = (M + N) * D * 2
    assert extra <= gradients + 8 * M * 4 + 2**20, f"extra {extra} bytes, gradients {gradients}"
    assert extra < M * N * 4 / 20


@pytest.mark.parametrize("backend", CHUNKED_GEMM_BACKENDS)
def test_peak_memory_stays_within_the_workspace(backend):
    """Extra memory = gradients + at most workspace_bytes (+ per-tile sums), whatever M is."""
    M, N, D = 65536, 8192, 512
    for workspace in (64 * 2**20, 256 * 2**20):
        extra = _peak_extra_bytes(backend, M, N, D, workspace_bytes=workspace)
        gradients = (M + N) * D * 2
        assert extra <= gradients + workspace + 2**20, f"{backend}: extra {extra} bytes, workspace {workspace}"
