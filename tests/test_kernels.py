"""Every registered loss backend against the float64 reference: loss and every gradient.
Then the registry itself; the last section holds what only the C++ backend has (its tile
sizes, threads, build).

Triton runs under TRITON_INTERPRET=1 here (set by conftest.py), so its shapes
stay tiny; the interpreter's 16 x 16 tiles still give several tiles and ragged
edges at these sizes.
"""
import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import typing

import pytest
import torch
import torch.nn.functional as F

from finelap.config import LossConfig, load_config
from finelap.kernels import (BACKENDS, clip_sigmoid_loss, counted_entries, frame_problem, frame_sigmoid_loss,
                             reference, registry)

# Max-abs error allowed, relative to the largest reference value of each output.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _backends_under_test(dtype):
    """The registered backends, but the oracle, that take CPU embeddings of `dtype` here (the
    triton ones under TRITON_INTERPRET=1, cpp when it builds)."""
    return [name for name in registry.supporting("cpu", dtype) if name != "reference"]


def _require_cpp():
    if "cpp" not in registry.supporting("cpu", torch.float32):
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


BACKEND_DTYPES = [(backend, dtype) for dtype in (torch.float64, torch.float32)
                  for backend in _backends_under_test(dtype)]
LOW_PRECISION_BACKEND_DTYPES = [(backend, dtype) for dtype in (torch.bfloat16, torch.float16)
                                for backend in _backends_under_test(dtype)]
FLOAT32_BACKENDS = _backends_under_test(torch.float32)
FRAME_SHAPES = [  # M, N, D, K, J
    (1, 1, 1, 1, 0), (1, 7, 3, 2, 1), (5, 1, 16, 3, 0), (17, 33, 40, 2, 2), (40, 21, 48, 1, 3), (33, 40, 17, 4, 0),
]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("M,N,D,K,J", FRAME_SHAPES)
def test_frame_stream_matches_reference(backend, dtype, M, N, D, K, J):
    case = _frame_case(M, N, D, K, J, seed=M * 7 + N)
    _assert_close(_run("frame", case, backend, dtype), _oracle("frame", case, dtype), dtype)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("M,N,D", [(1, 1, 1), (1, 9, 5), (19, 38, 33), (40, 17, 48)])
def test_clip_stream_matches_reference(backend, dtype, M, N, D):
    case = _clip_case(M, N, D, seed=M + N)
    assert (case["audio_group"][:, None] == case["text_group"][None, :]).sum(1).max() >= 1 or N == 1
    _assert_close(_run("clip", case, backend, dtype), _oracle("clip", case, dtype), dtype)


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION_BACKEND_DTYPES)
def test_low_precision_inputs(backend, dtype):
    """Gradients come back in the input dtype; fp32 accumulation keeps errors at the dtype's rounding."""
    frame_case = _frame_case(23, 35, 36, 2, 1, seed=3)
    _assert_close(_run("frame", frame_case, backend, dtype), _oracle("frame", frame_case, dtype), dtype, "frame")
    clip_case = _clip_case(18, 26, 20, seed=4)
    _assert_close(_run("clip", clip_case, backend, dtype), _oracle("clip", clip_case, dtype), dtype, "clip")


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_sixteen_labels_and_ignores_per_frame(backend):
    case = _frame_case(20, 24, 8, 16, 16, num_clusters=30, seed=5)
    _assert_close(_run("frame", case, backend, torch.float32), _oracle("frame", case, torch.float32), torch.float32)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_all_negative_rows_and_grad_output(backend):
    """No frame has an active cluster (every target is -1); the upstream gradient scales everything."""
    case = _frame_case(21, 18, 12, 2, 1, seed=6)
    case["frame_active"] = torch.full_like(case["frame_active"], -1)
    got = _run("frame", case, backend, torch.float32, grad_output=2.5)
    _assert_close(got, _oracle("frame", case, torch.float32, grad_output=2.5), torch.float32)


@pytest.mark.parametrize("backend", registry.supporting("cpu", torch.float32))
def test_zero_counted_entries_give_zero_loss_and_gradients(backend):
    case = _frame_case(9, 14, 10, 2, 7, num_clusters=6, seed=7)
    case["frame_ignore"] = torch.arange(6).repeat(9, 1)  # every cluster ignored at every frame
    result = _run("frame", case, backend, torch.float32)
    for value in result:
        assert torch.equal(value, torch.zeros_like(value))


@pytest.mark.parametrize("backend", registry.supporting("cpu", torch.float32))
def test_a_nan_logit_gives_a_nan_loss_and_gradients(backend):
    """A diverged run must be seen: a NaN bias (every logit NaN) makes the loss and the gradients
    NaN in every backend, never a finite number (the trainer's non-finite check relies on it)."""
    for stream, case in (("frame", _frame_case(13, 11, 8, 2, 1, seed=10)), ("clip", _clip_case(7, 9, 8, seed=11))):
        case["bias"] = torch.tensor(float("nan"), dtype=torch.float64)
        loss, d_rows, d_columns, d_scale, d_bias = _run(stream, case, backend, torch.float32)
        assert torch.isnan(loss), (stream, loss)
        assert torch.isnan(d_bias) and torch.isnan(d_scale) and torch.isnan(d_rows).any() and torch.isnan(d_columns).any()


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_extreme_logits_stay_finite_and_exact(backend):
    """|z| up to 1e4: softplus and sigmoid are evaluated without overflow."""
    case = _frame_case(13, 11, 8, 2, 1, seed=8)
    case["phrases"][:3] = case["frames"][:3]  # cos = +1 for some pairs
    case["phrases"][3:6] = -case["frames"][3:6]  # cos = -1
    case["scale"] = torch.tensor(1e4, dtype=torch.float64)
    case["bias"] = torch.tensor(-10.0, dtype=torch.float64)
    _assert_close(_run("frame", case, backend, torch.float32), _oracle("frame", case, torch.float32), torch.float32)
    clip = _clip_case(7, 9, 8, seed=9)
    clip["scale"] = torch.tensor(-1e4, dtype=torch.float64)
    _assert_close(_run("clip", clip, backend, torch.float32), _oracle("clip", clip, torch.float32), torch.float32)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_inputs_are_not_modified_and_partial_requires_grad(backend):
    """Only the frames need a gradient: it still matches, and no input changes."""
    case = _frame_case(17, 19, 9, 2, 2, seed=10)
    inputs = {name: value.float() if value.is_floating_point() else value for name, value in case.items()}
    before = {name: value.clone() for name, value in inputs.items()}
    frames = inputs["frames"].requires_grad_()
    frame_sigmoid_loss(**inputs, backend=backend).backward()
    expected = _oracle("frame", case, torch.float32)[1]
    assert (frames.grad.double() - expected).abs().max() <= TOLERANCE[torch.float32] * expected.abs().max()
    for name, value in inputs.items():
        assert torch.equal(value.detach(), before[name]), f"{name} was modified"


@pytest.mark.parametrize("backend", _backends_under_test(torch.float16))
def test_float16_gradient_factor_is_applied_in_fp32(backend):
    """scale / normaliser = 20.5 float16 subnormal steps: rounded to float16 it would be off by
    2.4%. The phrase gradient (a sum over 2000 frames, well inside float16's range) shows it."""
    M, N = 2000, 4
    case = _frame_case(M, N, 16, 2, 0, num_clusters=3, seed=13)
    factor = 20.5 * 2.0**-24
    case["scale"] = torch.tensor(factor * M * N, dtype=torch.float64)
    loss, _, d_phrases, _, _ = _run("frame", case, backend, torch.float16)
    want_loss, _, want_d_phrases, _, _ = _oracle("frame", case, torch.float16)
    assert abs(loss - want_loss) <= TOLERANCE[torch.float16] * abs(want_loss)
    error = (d_phrases - want_d_phrases).abs().max()
    assert error <= TOLERANCE[torch.float16] * want_d_phrases.abs().max(), f"d_phrases error {error:.3g}"


@pytest.mark.parametrize("backend", [name for name in registry.CHUNKED_GEMM_BACKENDS if name in FLOAT32_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [1, 7, 16])
def test_row_chunks_match_reference(backend, dtype, chunk_rows, monkeypatch):
    """Several row chunks through the reused [R, N] buffers: the column gradient accumulates
    across chunks, every chunk's loss and parameter sums count once (for triton_pass fp32
    inputs, g overwrites the logits in place)."""
    from finelap.kernels import triton_gemm_sigmoid_loss

    monkeypatch.setattr(triton_gemm_sigmoid_loss, "fused_sigmoid_loss", functools.partial(
        triton_gemm_sigmoid_loss.fused_sigmoid_loss, chunk_rows=chunk_rows))
    case = _frame_case(37, 29, 24, 2, 1, seed=20 + chunk_rows)
    got = _run("frame", case, backend, dtype, grad_output=0.5)
    _assert_close(got, _oracle("frame", case, dtype, grad_output=0.5), dtype)


def test_gpu_launch_configs_of_the_pass_cover_ragged_blocks():
    """Every GPU block shape of triton_pass (run here by the interpreter, on a shape that none
    of them divides) gives the reference's loss and gradients."""
    from finelap.kernels import triton_gemm_sigmoid_loss as module

    case = _frame_case(45, 530, 8, 2, 1, seed=31)
    expected = _oracle("frame", case, torch.float32)
    for config in module.GPU_PASS_CONFIGS:
        inputs = {name: value.float() if value.is_floating_point() else value for name, value in case.items()}
        frames, phrases = inputs["frames"], inputs["phrases"]
        count = counted_entries(inputs["phrase_cluster"], 45, inputs["frame_ignore"])
        result = module.fused_sigmoid_loss(
            frames, phrases, inputs["scale"], inputs["bias"], inputs["frame_active"], inputs["phrase_cluster"],
            inputs["frame_ignore"], True, 1.0 / count.float(), True, True, True, chunk_rows=40,
            logits_by="library", pass_config=config)
        _assert_close([value.double() for value in result], expected, torch.float32, str(config))


@pytest.mark.parametrize("logits_by", ["triton", "library"])
def test_chunk_rows_respect_the_workspace(logits_by):
    from finelap.kernels.triton_gemm_sigmoid_loss import chunk_rows_for, workspace_bytes_needed

    budget = 256 * 2**20
    for M, N, D, dtype in [(65536, 8192, 512, torch.bfloat16), (65536, 8192, 1024, torch.bfloat16),
                           (16384, 16384, 512, torch.bfloat16), (65536, 8192, 512, torch.float16),
                           (65536, 8192, 512, torch.float32), (100, 8192, 512, torch.bfloat16)]:
        rows = chunk_rows_for(M, N, D, dtype, budget, logits_by)
        assert rows == M or rows % 128 == 0
        assert workspace_bytes_needed(rows, N, D, dtype, logits_by) <= budget
        assert rows == M or workspace_bytes_needed(rows + 128, N, D, dtype, logits_by) > budget  # the largest
    assert chunk_rows_for(65536, 8192, 512, torch.bfloat16, 2**20, logits_by) == 128  # never below MIN_CHUNK_ROWS
    # bf16 at N = 8192: 2 bytes per entry (g), or 2 + 4 (g and the fp32 logits)
    assert chunk_rows_for(65536, 8192, 512, torch.bfloat16, budget, logits_by) == (
        14848 if logits_by == "triton" else 4864)


def test_gpu_choice_follows_the_workspace_allowed(monkeypatch):
    """auto on a GPU: triton_gemm when 128 rows of N columns fit in workspace_bytes, else triton;
    asking for triton_gemm with too small a workspace is an error."""
    # CPU tensors stand in (the interpreter accepts them), with auto's order for CUDA.
    monkeypatch.setitem(registry.AUTO_PREFERENCE, "cpu", registry.AUTO_PREFERENCE["cuda"])

    def auto_choice(rows, workspace_bytes):
        problem = frame_problem(rows, rows.new_zeros(1000, rows.shape[1]), torch.zeros(1000, dtype=torch.int64),
                                torch.zeros(rows.shape[0], 2, dtype=torch.int64), torch.tensor(1.0),
                                torch.tensor(0.0), workspace_bytes=workspace_bytes)
        return registry.choose("auto", problem).name

    rows = torch.zeros(300, 8)
    assert auto_choice(rows, 128 * 1000 * 4) == "triton_gemm"  # fp32: no accumulator
    assert auto_choice(rows, 128 * 1000 * 4 - 1) == "triton"
    half = rows.bfloat16()  # 128 x 1000 bf16 buffer + fp32 [1000, 8] accumulator and its bf16 cast
    assert auto_choice(half, 128 * 1000 * 2 + 1000 * 8 * 6) == "triton_gemm"
    assert auto_choice(half, 128 * 1000 * 2 + 1000 * 8 * 6 - 1) == "triton"
    assert auto_choice(torch.zeros(300, 2048), 1000) == registry.AUTO_FALLBACK  # D > triton's limit
    case = _valid_frame_inputs()
    with pytest.raises(ValueError, match="triton_gemm' needs a workspace of 80 bytes"):
        frame_sigmoid_loss(**case, backend="triton_gemm", workspace_bytes=79)


def test_counted_entries_matches_materialised_mask():
    generator = torch.Generator().manual_seed(11)
    phrase_cluster = torch.randint(0, 5, (23,), generator=generator)
    frame_ignore = torch.randint(-1, 7, (31, 6), generator=generator)  # repeats, padding, absent ids
    _, counted = reference.targets(torch.full((31, 1), -1), phrase_cluster, frame_ignore)
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


# ---------------------------------------------------------------- the registry


def test_config_and_errors_list_exactly_the_registered_backends(tmp_path):
    names = registry.backend_names()
    assert names[0] == "auto" and BACKENDS == names
    problem = frame_problem(**_valid_frame_inputs())
    for name in names[1:]:  # each one registered: the dispatch runs it or says why not, by name
        try:
            assert registry.choose(name, problem).name == name
        except ValueError as error:
            assert str(error).startswith(f"backend '{name}' "), error
    assert typing.get_args(typing.get_type_hints(LossConfig)["backend"]) == names
    config = tmp_path / "bad_backend.yaml"
    config.write_text("loss:\n  backend: cuda\n")
    with pytest.raises(ValueError, match=re.escape(f"must be one of {list(names)}")):
        load_config(config)
    with pytest.raises(ValueError, match=re.escape(f"backend must be one of {names}, got 'cuda'")):
        frame_sigmoid_loss(**_valid_frame_inputs(), backend="cuda")


def test_a_backend_registered_here_is_dispatched_and_its_refusals_raise():
    """A pure-torch backend (the reference, counting its calls) that refuses float32: the dispatch runs
    it by name through both streams and reports its reason; nothing else is edited."""
    calls = []

    def run(problem):
        calls.append(problem)
        return reference.sigmoid_loss(problem)

    def supports(problem):
        return "refuses float32" if problem.rows.dtype == torch.float32 else None

    registry.register(registry.Backend("test_reference", supports, run))
    try:
        with pytest.raises(ValueError, match="already exists"):
            registry.register(registry.Backend("test_reference", supports, run))
        assert registry.backend_names()[-1] == "test_reference"
        frame, clip = _frame_case(11, 9, 6, 2, 1, seed=40), _clip_case(5, 8, 6, seed=41)
        _assert_close(_run("frame", frame, "test_reference", torch.float64), _oracle("frame", frame, torch.float64),
                      torch.float64)
        _assert_close(_run("clip", clip, "test_reference", torch.float64), _oracle("clip", clip, torch.float64),
                      torch.float64)
        assert len(calls) == 2
        assert calls[0].normaliser == counted_entries(frame["phrase_cluster"], 11, frame["frame_ignore"])
        assert calls[1].normaliser == 5 and not calls[1].labels_padded
        with pytest.raises(ValueError, match="backend 'test_reference' refuses float32"):
            frame_sigmoid_loss(**_valid_frame_inputs(), backend="test_reference")
        with pytest.raises(ValueError, match="'test_reference'"):  # named among the choices
            frame_sigmoid_loss(**_valid_frame_inputs(), backend="cuda")
    finally:
        registry.unregister("test_reference")
    assert "test_reference" not in registry.backend_names()


# ---------------------------------------------------------------- the C++ backend only


@pytest.mark.parametrize("stream,case", [
    ("frame", _frame_case(37, 70, 17, 2, 4, seed=20)), ("frame", _frame_case(261, 515, 33, 16, 20, seed=21)),
    ("clip", _clip_case(33, 66, 13, seed=22)), ("clip", _clip_case(300, 600, 10, seed=23)),
])
def test_cpp_small_tiles_cross_many_tile_borders(stream, case, monkeypatch):
    """8 x 16 tiles instead of the shipped size: rows and columns cross many tile edges."""
    _require_cpp()
    from finelap.kernels import cpp

    monkeypatch.setattr(cpp, "ROW_BLOCK", 8)
    monkeypatch.setattr(cpp, "COLUMN_BLOCK", 16)
    for dtype in (torch.float64, torch.float32):
        _assert_close(_run(stream, case, "cpp", dtype), _oracle(stream, case, dtype), dtype, f"{stream} {dtype}")


def _cpp_runs_at(threads, stream, case, dtype, calls=1):
    """`calls` results of the cpp backend with torch's thread count set to `threads` meanwhile."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return [_run(stream, case, "cpp", dtype) for _ in range(calls)]
    finally:
        torch.set_num_threads(previous)


def _assert_bitwise_equal(result, expected, what):
    for name, got, want in zip(["loss", "d_rows", "d_columns", "d_scale", "d_bias"], result, expected):
        assert torch.equal(got, want), f"{what}: {name} differs (max {(got - want).abs().max().item():.3g})"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpp_repeated_calls_are_bitwise_equal(threads, monkeypatch):
    """Row blocks go to whichever thread is free, so which thread forms which block changes from
    call to call (more so with more threads than cores); the loss and every gradient must not.
    128 row blocks of 16 rows give the timing many chances to vary."""
    _require_cpp()
    from finelap.kernels import cpp

    monkeypatch.setattr(cpp, "ROW_BLOCK", 16)
    monkeypatch.setattr(cpp, "COLUMN_BLOCK", 64)
    case = _frame_case(2048, 256, 64, 2, 1, num_clusters=40, seed=14)
    first, *repeats = _cpp_runs_at(threads, "frame", case, torch.float32, calls=20)
    for call, result in enumerate(repeats, start=1):
        _assert_bitwise_equal(result, first, f"{threads} threads, call {call} vs call 0")
    _assert_close(first, _oracle("frame", case, torch.float32), torch.float32)


@pytest.mark.parametrize("stream,dtype", [("frame", torch.float32), ("frame", torch.float64), ("clip", torch.bfloat16)])
def test_cpp_thread_count_does_not_change_the_result(stream, dtype, monkeypatch):
    """Each row block's sums and column gradient are formed in a fixed order and added in block
    order: the results depend on the tile sizes, not on the number of threads."""
    _require_cpp()
    from finelap.kernels import cpp

    monkeypatch.setattr(cpp, "ROW_BLOCK", 16)
    monkeypatch.setattr(cpp, "COLUMN_BLOCK", 64)
    case = _frame_case(500, 300, 32, 2, 1, num_clusters=40, seed=5) if stream == "frame" else _clip_case(
        500, 300, 32, seed=6)
    (single,) = _cpp_runs_at(1, stream, case, dtype)
    for threads in (2, 3, 4):
        (multi,) = _cpp_runs_at(threads, stream, case, dtype)
        _assert_bitwise_equal(multi, single, f"{threads} threads vs 1")
    _assert_close(single, _oracle(stream, case, dtype), dtype)


def test_cpp_missing_compiler_makes_the_backend_unavailable_with_one_warning(tmp_path):
    """A fresh build with no working compiler: is_available() is False, warns once, calls raise."""
    probe = textwrap.dedent("""
        import json, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from finelap.kernels import clip_sigmoid_loss, cpp
            answers = [cpp.is_available(), cpp.is_available()]
            try:
                clip_sigmoid_loss(torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, dtype=torch.long),
                                  torch.zeros(1, dtype=torch.long), torch.tensor(1.0), torch.tensor(0.0),
                                  backend="cpp")
                error = ""
            except ValueError as raised:
                error = str(raised)
        ours = [str(w.message) for w in caught if "cpp sigmoid-loss backend unavailable" in str(w.message)]
        print(json.dumps({"answers": answers, "warnings": ours, "error": error}))
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), CXX=str(tmp_path / "no-compiler"))
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["answers"] == [False, False]
    assert len(report["warnings"]) == 1 and "sigmoid_loss.cpp did not build" in report["warnings"][0]
    assert "backend 'cpp' is unavailable: the C++ extension could not be built" in report["error"]


@pytest.mark.slow
def test_cpp_installed_wheel_ships_and_builds_the_source(tmp_path):
    """A non-editable install (a wheel) carries csrc/ as package data and the backend builds from
    that copy: the result of a call matches the reference."""
    _require_cpp()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), repo],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("finelap-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = textwrap.dedent("""
        import json, torch
        from finelap.kernels import cpp, frame_sigmoid_loss
        frames, phrases = torch.randn(9, 5).double(), torch.randn(7, 5).double()
        labels = (torch.arange(7) % 3, torch.randint(-1, 3, (9, 2)), torch.tensor(2.0), torch.tensor(-1.0))
        got = frame_sigmoid_loss(frames.float(), phrases.float(), *labels, backend="cpp")
        want = frame_sigmoid_loss(frames.float().double(), phrases.float().double(), *labels, backend="reference")
        print(json.dumps({"source": str(cpp.SOURCE), "error": abs(got.item() - want.item())}))
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["source"] == str(tmp_path / "site" / "finelap" / "kernels" / "csrc" / "sigmoid_loss.cpp")
    assert report["error"] < 1e-5
    assert any((tmp_path / "extensions").rglob("*.so")), "the extension was not built from the installed copy"
