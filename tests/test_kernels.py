"""Every loss backend against the float64 reference: loss and every gradient.

Triton runs under TRITON_INTERPRET=1 here (set by conftest.py), so its shapes
stay tiny; the interpreter's 16 x 16 tiles still give several tiles and ragged
edges at these sizes.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from finelap.kernels import clip_sigmoid_loss, counted_entries, frame_sigmoid_loss, reference

# Max-abs error allowed, relative to the largest reference value of each output.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@functools.cache
def _cpp_available():
    try:
        from finelap.kernels import cpp
    except ImportError:
        return False
    return cpp.is_available()


def _require(backend):
    if backend == "cpp" and not _cpp_available():
        pytest.skip("finelap.kernels.cpp is absent or could not build")


def _unit_rows(count, dim, generator):
    return F.normalize(torch.randn(count, dim, generator=generator, dtype=torch.float64), dim=1)


def _frame_case(M, N, D, K, J, num_clusters=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = lambda *shape: torch.randint(-1, num_clusters, shape, generator=generator)  # noqa: E731
    return dict(
        frames=_unit_rows(M, D, generator), phrases=_unit_rows(N, D, generator),
        phrase_cluster=torch.randint(0, num_clusters, (N,), generator=generator),
        frame_active=ids(M, K), frame_ignore=ids(M, J) if J else None,
        scale=torch.tensor(7.0, dtype=torch.float64), bias=torch.tensor(-2.5, dtype=torch.float64))


def _clip_case(M, N, D, seed=0):
    """Groups are arbitrary int64 (negative and huge too); captions repeat clip groups."""
    generator = torch.Generator().manual_seed(seed)
    group_values = torch.tensor([-1, 0, 3, -7, 2**40, 11], dtype=torch.int64)
    audio_group = group_values[torch.randint(0, len(group_values), (M,), generator=generator)]
    text_group = torch.cat([audio_group, group_values])[torch.randint(0, M + len(group_values), (N,),
                                                                      generator=generator)]
    return dict(audio=_unit_rows(M, D, generator), text=_unit_rows(N, D, generator),
                audio_group=audio_group, text_group=text_group,
                scale=torch.tensor(10.0, dtype=torch.float64), bias=torch.tensor(-4.0, dtype=torch.float64))


EMBEDDINGS = {"frame": ("frames", "phrases"), "clip": ("audio", "text")}
LOSSES = {"frame": frame_sigmoid_loss, "clip": clip_sigmoid_loss}


def _run(stream, case, backend, dtype, grad_output=1.0):
    """Loss and gradients [loss, d_rows, d_columns, d_scale, d_bias], as float64 tensors."""
    inputs = dict(case)
    rows, columns = EMBEDDINGS[stream]
    leaves = []
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in (rows, columns, "scale", "bias"):
        value = inputs[name].to(dtype if name in (rows, columns) else parameter_dtype)
        inputs[name] = value.detach().requires_grad_()
        leaves.append(inputs[name])
    loss = LOSSES[stream](**inputs, backend=backend)
    (loss * grad_output).backward()
    for leaf in leaves:
        assert leaf.grad.dtype == leaf.dtype
    return [loss.detach().double()] + [leaf.grad.double() for leaf in leaves]


def _oracle(stream, case, dtype, grad_output=1.0):
    """The reference in float64 on the inputs rounded to `dtype` (only the kernel's error remains)."""
    rounded = dict(case)
    for name in EMBEDDINGS[stream]:
        rounded[name] = case[name].to(dtype).double()
    return _run(stream, rounded, "reference", torch.float64, grad_output)


def _assert_close(result, expected, dtype, what=""):
    names = ["loss", "d_rows", "d_columns", "d_scale", "d_bias"]
    for name, got, want in zip(names, result, expected):
        assert torch.isfinite(got).all(), f"{what} {name} not finite"
        error = (got - want).abs().max().item()
        bound = TOLERANCE[dtype] * max(want.abs().max().item(), 1e-6)
        assert error <= bound, f"{what} {name}: max error {error:.3g} > {bound:.3g}"


BACKEND_DTYPES = [
    ("chunked", torch.float64), ("chunked", torch.float32), ("triton", torch.float32), ("cpp", torch.float32),
]
FRAME_SHAPES = [  # M, N, D, K, J
    (1, 1, 1, 1, 0), (1, 7, 3, 2, 1), (5, 1, 16, 3, 0), (17, 33, 40, 2, 2), (40, 21, 48, 1, 3), (33, 40, 17, 4, 0),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("M,N,D,K,J", FRAME_SHAPES)
def test_frame_stream_matches_reference(backend, dtype, M, N, D, K, J):
    _require(backend)
    case = _frame_case(M, N, D, K, J, seed=M * 7 + N)
    _assert_close(_run("frame", case, backend, dtype), _oracle("frame", case, dtype), dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("M,N,D", [(1, 1, 1), (1, 9, 5), (19, 38, 33), (40, 17, 48)])
def test_clip_stream_matches_reference(backend, dtype, M, N, D):
    _require(backend)
    case = _clip_case(M, N, D, seed=M + N)
    assert (case["audio_group"][:, None] == case["text_group"][None, :]).sum(1).max() >= 1 or N == 1
    _assert_close(_run("clip", case, backend, dtype), _oracle("clip", case, dtype), dtype)


@pytest.mark.parametrize("backend", ["chunked", "triton", "cpp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    """Gradients come back in the input dtype; fp32 accumulation keeps errors at the dtype's rounding."""
    _require(backend)
    frame_case = _frame_case(23, 35, 36, 2, 1, seed=3)
    _assert_close(_run("frame", frame_case, backend, dtype), _oracle("frame", frame_case, dtype), dtype, "frame")
    clip_case = _clip_case(18, 26, 20, seed=4)
    _assert_close(_run("clip", clip_case, backend, dtype), _oracle("clip", clip_case, dtype), dtype, "clip")


@pytest.mark.parametrize("backend", ["chunked", "triton", "cpp"])
def test_sixteen_labels_and_ignores_per_frame(backend):
    _require(backend)
    case = _frame_case(20, 24, 8, 16, 16, num_clusters=30, seed=5)
    _assert_close(_run("frame", case, backend, torch.float32), _oracle("frame", case, torch.float32), torch.float32)


@pytest.mark.parametrize("backend", ["chunked", "triton", "cpp"])
def test_all_negative_rows_and_grad_output(backend):
    """No frame has an active cluster (every target is -1); the upstream gradient scales everything."""
    _require(backend)
    case = _frame_case(21, 18, 12, 2, 1, seed=6)
    case["frame_active"] = torch.full_like(case["frame_active"], -1)
    got = _run("frame", case, backend, torch.float32, grad_output=2.5)
    _assert_close(got, _oracle("frame", case, torch.float32, grad_output=2.5), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "cpp"])
def test_zero_counted_entries_give_zero_loss_and_gradients(backend):
    _require(backend)
    case = _frame_case(9, 14, 10, 2, 7, num_clusters=6, seed=7)
    case["frame_ignore"] = torch.arange(6).repeat(9, 1)  # every cluster ignored at every frame
    result = _run("frame", case, backend, torch.float32)
    for value in result:
        assert torch.equal(value, torch.zeros_like(value))


@pytest.mark.parametrize("backend", ["chunked", "triton", "cpp"])
def test_extreme_logits_stay_finite_and_exact(backend):
    """|z| up to 1e4: softplus and sigmoid are evaluated without overflow."""
    _require(backend)
    case = _frame_case(13, 11, 8, 2, 1, seed=8)
    case["phrases"][:3] = case["frames"][:3]  # cos = +1 for some pairs
    case["phrases"][3:6] = -case["frames"][3:6]  # cos = -1
    case["scale"] = torch.tensor(1e4, dtype=torch.float64)
    case["bias"] = torch.tensor(-10.0, dtype=torch.float64)
    _assert_close(_run("frame", case, backend, torch.float32), _oracle("frame", case, torch.float32), torch.float32)
    clip = _clip_case(7, 9, 8, seed=9)
    clip["scale"] = torch.tensor(-1e4, dtype=torch.float64)
    _assert_close(_run("clip", clip, backend, torch.float32), _oracle("clip", clip, torch.float32), torch.float32)


@pytest.mark.parametrize("backend", ["chunked", "triton", "cpp"])
def test_inputs_are_not_modified_and_partial_requires_grad(backend):
    """Only the frames need a gradient: it still matches, and no input changes."""
    _require(backend)
    case = _frame_case(17, 19, 9, 2, 2, seed=10)
    inputs = {name: value.float() if value.is_floating_point() else value for name, value in case.items()}
    before = {name: value.clone() for name, value in inputs.items()}
    frames = inputs["frames"].requires_grad_()
    frame_sigmoid_loss(**inputs, backend=backend).backward()
    expected = _oracle("frame", case, torch.float32)[1]
    assert (frames.grad.double() - expected).abs().max() <= TOLERANCE[torch.float32] * expected.abs().max()
    for name, value in inputs.items():
        assert torch.equal(value.detach(), before[name]), f"{name} was modified"


def test_counted_entries_matches_materialised_mask():
    generator = torch.Generator().manual_seed(11)
    phrase_cluster = torch.randint(0, 5, (23,), generator=generator)
    frame_ignore = torch.randint(-1, 7, (31, 6), generator=generator)  # repeats, padding, absent ids
    _, counted = reference.frame_targets(phrase_cluster, torch.full((31, 1), -1), frame_ignore)
    assert counted_entries(phrase_cluster, 31, frame_ignore).item() == counted.sum().item()
    assert counted_entries(phrase_cluster, 31, None).item() == 31 * 23


def test_auto_backend_matches_reference():
    case = _frame_case(12, 10, 8, 2, 1, seed=12)
    _assert_close(_run("frame", case, "auto", torch.float32), _oracle("frame", case, torch.float32), torch.float32)


def _valid_frame_inputs():
    case = _frame_case(4, 5, 6, 2, 1)
    return {name: value.float() if value is not None and value.is_floating_point() else value
            for name, value in case.items()}


@pytest.mark.parametrize("change,message", [
    (dict(phrases=torch.zeros(5, 7)), "frames and phrases must have the same width D"),
    (dict(frames=torch.zeros(4)), r"frames must be 2-D \[rows, D\], got shape \(4,\)"),
    (dict(phrases=torch.zeros(5, 6, dtype=torch.float16)), "must share a dtype"),
    (dict(frames=torch.zeros(4, 6, dtype=torch.int32)), "frames must be float32/bfloat16/float16/float64"),
    (dict(phrase_cluster=torch.zeros(4, dtype=torch.int64)), r"phrase_cluster must have shape \[5\], got \(4,\)"),
    (dict(phrase_cluster=torch.zeros(5, dtype=torch.int32)), "phrase_cluster must be an int64 tensor"),
    (dict(frame_active=torch.zeros(3, 2, dtype=torch.int64)), r"frame_active must have shape \[4, any\]"),
    (dict(frame_ignore=torch.zeros(4, dtype=torch.int64)), r"frame_ignore must have shape \[4, any\]"),
    (dict(scale=torch.ones(1)), r"scale must be a 0-d floating-point tensor, got shape \(1,\)"),
    (dict(bias=1.0), "bias must be a 0-d floating-point tensor, got float"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(backend="triton", frame_active=torch.zeros(4, 17, dtype=torch.int64)), "at most 16 active/ignored ids"),
    (dict(backend="triton", frames=torch.zeros(4, 6, dtype=torch.float64),
          phrases=torch.zeros(5, 6, dtype=torch.float64)), "not float64"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    inputs = _valid_frame_inputs()
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        frame_sigmoid_loss(**inputs)


def test_clip_without_audio_rows_is_an_error():
    case = _clip_case(3, 4, 5)
    case["audio"], case["audio_group"] = case["audio"][:0], case["audio_group"][:0]
    with pytest.raises(ValueError, match="audio has no rows"):
        clip_sigmoid_loss(**case, backend="chunked")
