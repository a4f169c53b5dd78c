"""The loss backends: one table, read by the dispatch, the config, the CLI, the benchmarks and the tests.

A backend is registered under its name with `supports(problem)` (why it
cannot run that problem, or None) and `run(problem)` (the 0-d loss, which
autograd differentiates). "auto" is not a backend: it takes the first of
AUTO_PREFERENCE[the device type] that supports the problem, else AUTO_FALLBACK.

- reference:   kernels/reference.py, materialised, float64-capable (the oracle);
- chunked:     kernels/chunked.py, torch over row blocks, any device;
- triton:      kernels/triton_sigmoid_loss.py, CUDA (CPU under TRITON_INTERPRET=1);
               two passes with register-resident gradient blocks, no workspace;
- triton_gemm: kernels/triton_gemm_sigmoid_loss.py, CUDA (CPU under the interpreter);
               rows in chunks, a Triton logits GEMM with a loss epilogue, then two
               cuBLAS GEMMs; needs an [R, N] workspace of at most workspace_bytes;
- triton_pass: the same module and chunks, but the logits come from a cuBLAS GEMM
               (fp32, a second [R, N] buffer) and a Triton pointwise pass forms the
               loss and g: the elementwise work at full occupancy, for 8 more bytes
               moved per entry;
- cpp:         kernels/cpp.py, C++/OpenMP on CPU.

The fused backends return a float32 loss (float64 for float64 inputs) and
gradients in the dtype of each input; they never allocate an [M, N] tensor.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import chunked, reference
from .autograd import fused_loss
from .problem import SigmoidLossProblem

AUTO = "auto"
# auto's order per device type: on CUDA triton_gemm (GEMM speed) when its workspace fits, else
# triton (no workspace); cpp on CPU. AUTO_FALLBACK when none of them supports the problem.
AUTO_PREFERENCE = {"cuda": ("triton_gemm", "triton"), "cpu": ("cpp",)}
AUTO_FALLBACK = "chunked"
CHUNKED_GEMM_BACKENDS = {"triton_gemm": "triton", "triton_pass": "library"}  # backend -> its logits_by


@dataclass(frozen=True)
class Backend:
    """A loss backend: which problems it runs, and how."""

    name: str
    # Why it cannot run the problem, worded to follow "backend 'NAME' " ("needs CUDA tensors ..."), or None.
    supports: Callable[[SigmoidLossProblem], str | None]
    run: Callable[[SigmoidLossProblem], torch.Tensor]  # the problem's 0-d loss
    warn_when_auto_falls_back: bool = False  # auto warns (once) when it is preferred but cannot take a problem


_REGISTERED: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    if backend.name == AUTO or backend.name in _REGISTERED:
        raise ValueError(f"a loss backend named {backend.name!r} already exists")
    _REGISTERED[backend.name] = backend


def unregister(name: str) -> None:
    del _REGISTERED[name]


def backend_names() -> tuple[str, ...]:
    """"auto" and every registered backend, in registration order: what `backend=` accepts."""
    return (AUTO, *_REGISTERED)


def choose(name: str, problem: SigmoidLossProblem) -> Backend:
    """The backend `name` stands for on this problem; ValueError when there is none or it cannot run it."""
    if name == AUTO:
        return _auto(problem)
    if name not in _REGISTERED:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    reason = _REGISTERED[name].supports(problem)
    if reason:
        raise ValueError(f"backend '{name}' {reason}")
    return _REGISTERED[name]


def supporting(device: str | torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The registered backends that run a one-pair problem with embeddings of this device and dtype."""
    rows = torch.zeros(1, 1, dtype=dtype, device=device)
    labels = torch.zeros(1, 1, dtype=torch.int64, device=device)
    probe = SigmoidLossProblem(rows, rows, labels, labels[0], None, labels_padded=False, scale=rows[0, 0].float(),
                               bias=rows[0, 0].float(), normaliser=labels[0, 0])
    return tuple(name for name, backend in _REGISTERED.items() if backend.supports(probe) is None)


def _auto(problem: SigmoidLossProblem) -> Backend:
    device_type = problem.rows.device.type
    for name in AUTO_PREFERENCE.get(device_type, ()):
        reason = _REGISTERED[name].supports(problem)
        if reason is None:
            return _REGISTERED[name]
        if _REGISTERED[name].warn_when_auto_falls_back:
            _warn_once(f"finelap.kernels: backend '{name}' {reason}; backend='auto' falls back to "
                       f"'{AUTO_FALLBACK}' on {device_type.upper()}")
    return _REGISTERED[AUTO_FALLBACK]


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning)


# ---------------------------------------------------------------- the built-in backends


def _supports_anything(problem: SigmoidLossProblem) -> None:
    return None


def _triton_unsupported(problem: SigmoidLossProblem) -> str | None:
    """What every triton backend needs: CUDA (or the interpreter), 16/32-bit floats, few ids per row."""
    rows = problem.rows
    if rows.device.type != "cuda" and not (rows.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {rows.device}"
    if rows.dtype == torch.float64:
        return "supports float32/bfloat16/float16, not float64"
    from .triton_sigmoid_loss import MAX_LABELS  # triton is imported only where a triton backend can run

    num_labels = problem.row_labels.shape[1]
    num_ignored = 0 if problem.row_ignore is None else problem.row_ignore.shape[1]
    if num_labels > MAX_LABELS or num_ignored > MAX_LABELS:
        return f"takes at most {MAX_LABELS} active/ignored ids per row, got K={num_labels}, J={num_ignored}"
    return None


def _two_pass_unsupported(problem: SigmoidLossProblem) -> str | None:
    reason = _triton_unsupported(problem)
    if reason:
        return reason
    from .triton_sigmoid_loss import MAX_WIDTH  # past the device check of _triton_unsupported

    width = problem.rows.shape[1]
    return f"takes embeddings of width D <= {MAX_WIDTH}, got {width}" if width > MAX_WIDTH else None


def _run_two_pass(problem: SigmoidLossProblem) -> torch.Tensor:
    from .triton_sigmoid_loss import fused_sigmoid_loss  # triton is imported only when a triton backend runs

    return fused_loss(problem, fused_sigmoid_loss)


def _chunked_gemm_backend(name: str, logits_by: str) -> Backend:
    """A backend of triton_gemm_sigmoid_loss.py: row chunks of at least MIN_CHUNK_ROWS in workspace_bytes."""

    def supports(problem: SigmoidLossProblem) -> str | None:
        reason = _triton_unsupported(problem)
        if reason:
            return reason
        from .triton_gemm_sigmoid_loss import MIN_CHUNK_ROWS, workspace_bytes_needed  # past the device check

        rows, num_columns = problem.rows, problem.columns.shape[0]
        chunk = min(MIN_CHUNK_ROWS, rows.shape[0])
        needed = workspace_bytes_needed(chunk, num_columns, rows.shape[1], rows.dtype, logits_by)
        if needed > problem.workspace_bytes:
            return (f"needs a workspace of {needed} bytes (a chunk of {chunk} rows x {num_columns} columns), "
                    f"more than workspace_bytes = {problem.workspace_bytes}")
        return None

    def run(problem: SigmoidLossProblem) -> torch.Tensor:
        from .triton_gemm_sigmoid_loss import fused_sigmoid_loss  # triton is imported only when it runs

        return fused_loss(problem, functools.partial(fused_sigmoid_loss, workspace_bytes=problem.workspace_bytes,
                                                     logits_by=logits_by))

    return Backend(name, supports, run)


@functools.cache
def _cpp_unavailable_reason() -> str | None:
    """None when the C++ backend can run, else why not."""
    try:
        from . import cpp  # here: torch.utils.cpp_extension needs setuptools, which no other backend does
    except ImportError as error:
        return f"kernels.cpp cannot be imported ({error})"
    return None if cpp.is_available() else "the C++ extension could not be built"


def _cpp_unsupported(problem: SigmoidLossProblem) -> str | None:
    if problem.rows.device.type != "cpu":
        return f"runs on CPU tensors, got {problem.rows.device}"
    unavailable = _cpp_unavailable_reason()
    return None if unavailable is None else f"is unavailable: {unavailable}"


def _run_cpp(problem: SigmoidLossProblem) -> torch.Tensor:
    from .cpp import fused_sigmoid_loss  # imported on first use: see _cpp_unavailable_reason

    return fused_loss(problem, fused_sigmoid_loss)


def _register_built_in_backends() -> None:
    register(Backend("reference", _supports_anything, reference.sigmoid_loss))
    register(Backend("chunked", _supports_anything, chunked.sigmoid_loss))
    register(Backend("triton", _two_pass_unsupported, _run_two_pass))
    for name, logits_by in CHUNKED_GEMM_BACKENDS.items():
        register(_chunked_gemm_backend(name, logits_by))
    register(Backend("cpp", _cpp_unsupported, _run_cpp, warn_when_auto_falls_back=True))


_register_built_in_backends()
