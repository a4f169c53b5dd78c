"""Fused dual-stream sigmoid losses (imported as finelap.kernels).

    clip_sigmoid_loss(audio, text, audio_group, text_group, scale, bias, backend="auto",
                      workspace_bytes=DEFAULT_WORKSPACE_BYTES)
    frame_sigmoid_loss(frames, phrases, phrase_cluster, frame_active, scale, bias,
                       frame_ignore=None, backend="auto", workspace_bytes=DEFAULT_WORKSPACE_BYTES)

Both streams are one pairwise sigmoid loss over rows (audio side) and columns
(text side): the clip stream is the frame stream with one label per row (its
group), nothing ignored and M as normaliser. This module validates inputs,
computes the normaliser and dispatches to a backend:

- "reference": kernels/reference.py, materialised, float64-capable (the oracle);
- "chunked":   kernels/chunked.py, torch over row blocks, any device;
- "triton":    kernels/triton_sigmoid_loss.py, CUDA (CPU under TRITON_INTERPRET=1);
               two passes with register-resident gradient blocks, no workspace;
- "triton_gemm": kernels/triton_gemm_sigmoid_loss.py, CUDA (CPU under the interpreter);
               rows in chunks, a Triton logits GEMM with a loss epilogue, then two
               cuBLAS GEMMs; needs an [R, N] workspace of at most workspace_bytes;
- "triton_pass": the same module and chunks, but the logits come from a cuBLAS GEMM
               (fp32, a second [R, N] buffer) and a Triton pointwise pass forms the
               loss and g: the elementwise work at full occupancy, for 8 more bytes
               moved per entry;
- "cpp":       kernels/cpp.py, C++/OpenMP on CPU;
- "auto":      on CUDA triton_gemm when its workspace (at least MIN_CHUNK_ROWS rows of
               N) fits in workspace_bytes, else triton; cpp on CPU when it builds,
               else chunked.

The fused backends return a float32 loss (float64 for float64 inputs) and
gradients in the dtype of each input; they never allocate an [M, N] tensor.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from . import reference

BACKENDS = ("auto", "reference", "chunked", "triton", "triton_gemm", "triton_pass", "cpp")
DEFAULT_WORKSPACE_BYTES = 256 * 2**20  # the [R, N] buffers of triton_gemm / triton_pass, unless the caller allows otherwise
MIN_CHUNK_ROWS = 128  # the thinnest row chunk of triton_gemm / triton_pass: below it the GEMMs are inefficient
CHUNKED_GEMM_BACKENDS = {"triton_gemm": "triton", "triton_pass": "library"}  # backend -> its logits_by
EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

__all__ = ["BACKENDS", "DEFAULT_WORKSPACE_BYTES", "clip_sigmoid_loss", "counted_entries", "frame_sigmoid_loss"]


def clip_sigmoid_loss(audio, text, audio_group, text_group, scale, bias, backend="auto",
                      workspace_bytes=DEFAULT_WORKSPACE_BYTES):
    """Clip-stream loss: sum_ij softplus(-y_ij * (scale * <audio_i, text_j> + bias)) / M.

    audio [M, D], text [N, D] float32/bfloat16/float16 (float64: reference, chunked);
    audio_group [M], text_group [N] int64, any values: y_ij = +1 iff the groups are
    equal, else -1 (several captions may share a clip's group). scale, bias: 0-d
    float tensors. workspace_bytes: the most scratch memory triton_gemm may take.
    Returns a 0-d tensor.
    """
    _check_embeddings(audio, text, "audio", "text")
    if audio.shape[0] == 0:
        raise ValueError("clip_sigmoid_loss: audio has no rows (the loss is divided by M = 0)")
    _check_labels(audio_group, (audio.shape[0],), "audio_group", audio.device)
    _check_labels(text_group, (text.shape[0],), "text_group", audio.device)
    _check_logit_parameters(scale, bias, audio.device)
    chosen = _resolve_backend(backend, audio, text.shape[0], 1, 0, workspace_bytes)
    if chosen == "reference":
        return reference.clip_sigmoid_loss(audio, text, audio_group, text_group, scale, bias)
    inverse = torch.full((), 1.0 / audio.shape[0], dtype=_loss_dtype(audio), device=audio.device)
    return _fused(chosen, audio, text, scale, bias, audio_group[:, None], text_group, None,
                  labels_padded=False, inverse_normaliser=inverse, workspace_bytes=workspace_bytes)


def frame_sigmoid_loss(frames, phrases, phrase_cluster, frame_active, scale, bias,
                       frame_ignore=None, backend="auto", workspace_bytes=DEFAULT_WORKSPACE_BYTES):
    """Frame-stream loss: mean of softplus(-y * z) over counted (frame, phrase) entries.

    frames [M, D], phrases [P, D] float; phrase_cluster [P] int64; frame_active
    [M, K] int64 cluster ids sounding at each frame, -1 padded; frame_ignore
    [M, J] int64 cluster ids not counted at each frame, -1 padded, or None.
    y = +1 iff phrase_cluster[p] is in frame_active[m], else -1. Returns 0 (with
    zero gradients) when no entry is counted. workspace_bytes: the most scratch
    memory triton_gemm may take.
    """
    _check_embeddings(frames, phrases, "frames", "phrases")
    num_frames, num_phrases = frames.shape[0], phrases.shape[0]
    _check_labels(phrase_cluster, (num_phrases,), "phrase_cluster", frames.device)
    _check_labels(frame_active, (num_frames, None), "frame_active", frames.device)
    if frame_ignore is not None:
        _check_labels(frame_ignore, (num_frames, None), "frame_ignore", frames.device)
    _check_logit_parameters(scale, bias, frames.device)
    num_ignored = 0 if frame_ignore is None else frame_ignore.shape[1]
    chosen = _resolve_backend(backend, frames, num_phrases, frame_active.shape[1], num_ignored, workspace_bytes)
    if chosen == "reference":
        return reference.frame_sigmoid_loss(frames, phrases, phrase_cluster, frame_active, scale, bias,
                                            frame_ignore)
    count = counted_entries(phrase_cluster, num_frames, frame_ignore).to(_loss_dtype(frames))
    inverse = torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count))
    if frame_active.shape[1] == 0:  # no label at any frame: one padding column keeps kernels simple
        frame_active = torch.full((num_frames, 1), -1, dtype=torch.int64, device=frames.device)
    if num_ignored == 0:
        frame_ignore = None
    return _fused(chosen, frames, phrases, scale, bias, frame_active, phrase_cluster, frame_ignore,
                  labels_padded=True, inverse_normaliser=inverse, workspace_bytes=workspace_bytes)


def counted_entries(phrase_cluster, num_frames, frame_ignore=None):
    """Number of counted (frame, phrase) entries, a 0-d int64 tensor, without an [M, P] tensor.

    Each frame counts every phrase except those whose cluster is in its
    frame_ignore row; repeated ignore ids in a row count once.
    """
    total = torch.tensor(num_frames * phrase_cluster.shape[0], dtype=torch.int64, device=phrase_cluster.device)
    if frame_ignore is None or frame_ignore.numel() == 0 or phrase_cluster.numel() == 0:
        return total
    clusters, phrases_per_cluster = torch.unique(phrase_cluster, return_counts=True)
    ignore, _ = frame_ignore.sort(dim=1)
    first = torch.ones_like(ignore, dtype=torch.bool)
    first[:, 1:] = ignore[:, 1:] != ignore[:, :-1]
    index = torch.searchsorted(clusters, ignore).clamp(max=clusters.numel() - 1)
    present = (clusters[index] == ignore) & first & (ignore >= 0)
    return total - (phrases_per_cluster[index] * present).sum()


def _loss_dtype(embeddings):
    return torch.float64 if embeddings.dtype == torch.float64 else torch.float32


def _fused(backend, rows, columns, scale, bias, row_labels, column_labels, row_ignore, labels_padded,
           inverse_normaliser, workspace_bytes):
    if rows.shape[0] == 0 or columns.shape[0] == 0:  # no pairs: zero loss, zero gradients
        return (rows.sum() + columns.sum()).to(_loss_dtype(rows)) * 0 + scale * 0 + bias * 0
    rows, columns = rows.contiguous(), columns.contiguous()
    row_labels, column_labels = row_labels.contiguous(), column_labels.contiguous()
    if row_ignore is not None:
        row_ignore = row_ignore.contiguous()
    if backend == "chunked":
        from .chunked import ChunkedSigmoidLoss, default_block_rows
        block_rows = default_block_rows(rows.shape[0], columns.shape[0])
        return ChunkedSigmoidLoss.apply(rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                                        labels_padded, inverse_normaliser, block_rows)
    from .autograd import GradientsInForward
    if backend == "cpp":
        fused_sigmoid_loss = _cpp().fused_sigmoid_loss
    elif backend == "triton":
        from .triton_sigmoid_loss import fused_sigmoid_loss
    else:
        from .triton_gemm_sigmoid_loss import fused_sigmoid_loss
        fused_sigmoid_loss = functools.partial(fused_sigmoid_loss, workspace_bytes=workspace_bytes,
                                               logits_by=CHUNKED_GEMM_BACKENDS[backend])
    return GradientsInForward.apply(rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                                    labels_padded, inverse_normaliser, fused_sigmoid_loss)


def _check_embeddings(rows, columns, rows_name, columns_name):
    for name, tensor in ((rows_name, rows), (columns_name, columns)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(tensor.shape)}")
        if tensor.dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"{name} must be float32/bfloat16/float16/float64, got {tensor.dtype}")
    if rows.shape[1] != columns.shape[1]:
        raise ValueError(f"{rows_name} and {columns_name} must have the same width D, "
                         f"got {tuple(rows.shape)} and {tuple(columns.shape)}")
    if rows.shape[1] == 0:
        raise ValueError(f"{rows_name} and {columns_name} have width D = 0")
    if rows.dtype != columns.dtype:
        raise ValueError(f"{rows_name} and {columns_name} must share a dtype, got {rows.dtype} and {columns.dtype}")
    if rows.device != columns.device:
        raise ValueError(f"{rows_name} and {columns_name} must be on one device, "
                         f"got {rows.device} and {columns.device}")


def _check_labels(labels, shape, name, device):
    """shape: expected sizes, None = any."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be an int64 tensor, got {got}")
    if labels.dim() != len(shape) or any(want is not None and got != want
                                         for got, want in zip(labels.shape, shape)):
        expected = "[" + ", ".join("any" if want is None else str(want) for want in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device}, the embeddings on {device}")


def _check_logit_parameters(scale, bias, device):
    for name, tensor in (("scale", scale), ("bias", bias)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 0 or not tensor.is_floating_point():
            if isinstance(tensor, torch.Tensor):
                got = f"shape {tuple(tensor.shape)} {tensor.dtype}"
            else:
                got = type(tensor).__name__
            raise ValueError(f"{name} must be a 0-d floating-point tensor, got {got}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, the embeddings on {device}")


def _triton_unsupported(backend, rows, num_columns, num_labels, num_ignored, workspace_bytes):
    """Why a triton backend ("triton", "triton_gemm" or "triton_pass") cannot take these inputs, or None."""
    from .triton_sigmoid_loss import MAX_LABELS, MAX_WIDTH
    if rows.device.type != "cuda" and not (rows.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {rows.device}"
    if rows.dtype == torch.float64:
        return "supports float32/bfloat16/float16, not float64"
    if num_labels > MAX_LABELS or num_ignored > MAX_LABELS:
        return f"takes at most {MAX_LABELS} active/ignored ids per row, got K={num_labels}, J={num_ignored}"
    if backend == "triton" and rows.shape[1] > MAX_WIDTH:
        return f"takes embeddings of width D <= {MAX_WIDTH}, got {rows.shape[1]}"
    if backend in CHUNKED_GEMM_BACKENDS:
        from .triton_gemm_sigmoid_loss import workspace_bytes_needed
        chunk = min(MIN_CHUNK_ROWS, rows.shape[0])
        needed = workspace_bytes_needed(chunk, num_columns, rows.shape[1], rows.dtype, CHUNKED_GEMM_BACKENDS[backend])
        if needed > workspace_bytes:
            return (f"needs a workspace of {needed} bytes (a chunk of {chunk} rows x {num_columns} columns), "
                    f"more than workspace_bytes = {workspace_bytes}")
    return None


def _resolve_backend(backend, rows, num_columns, num_labels, num_ignored, workspace_bytes):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    shape = (rows, num_columns, num_labels, num_ignored, workspace_bytes)
    if backend in ("triton", *CHUNKED_GEMM_BACKENDS):
        reason = _triton_unsupported(backend, *shape)
        if reason:
            raise ValueError(f"backend '{backend}' {reason}")
    if backend == "cpp":
        if rows.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, got {rows.device}")
        if not _cpp_available():
            raise ValueError(f"backend 'cpp' is unavailable: {_cpp_unavailable_reason()}")
    if backend != "auto":
        return backend
    if rows.device.type == "cuda":
        return _gpu_backend(*shape)
    if rows.device.type == "cpu":
        if _cpp_available():
            return "cpp"
        _warn_cpp_fallback()
    return "chunked"


def _gpu_backend(rows, num_columns, num_labels, num_ignored, workspace_bytes):
    """auto's choice on a GPU: triton_gemm (GEMM speed) when its workspace fits, else triton
    (no workspace), else chunked."""
    for candidate in ("triton_gemm", "triton"):
        if not _triton_unsupported(candidate, rows, num_columns, num_labels, num_ignored, workspace_bytes):
            return candidate
    return "chunked"


def _cpp():
    from . import cpp
    return cpp


@functools.cache
def _cpp_unavailable_reason():
    """None when the C++ backend can run, else why not."""
    try:
        module = _cpp()
    except ImportError as error:
        return f"kernels.cpp cannot be imported ({error})"
    return None if module.is_available() else "the C++ extension could not be built"


def _cpp_available():
    return _cpp_unavailable_reason() is None


@functools.cache
def _warn_cpp_fallback():
    warnings.warn(f"finelap.kernels: the cpp backend is unavailable ({_cpp_unavailable_reason()}); "
                  "backend='auto' falls back to 'chunked' on CPU", RuntimeWarning, stacklevel=3)
