"""C++ (CPU, OpenMP) backend of the dual-stream sigmoid losses.

The fused kernel lives in csrc/sigmoid_loss.cpp and is built on first use
with torch.utils.cpp_extension (cached in the torch extensions folder). It
walks (row block x column block) tiles, never allocating [M, N], and forms
every gradient in the forward pass when anything requires grad; backward only
multiplies them by the incoming gradient.
"""
from __future__ import annotations

import functools
import subprocess
import warnings
from pathlib import Path

import torch
from torch.utils import cpp_extension

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "sigmoid_loss.cpp"

# Tile of the fused pass: 256 rows x 512 columns of fp32 cosines is 512 KiB,
# resident in a 1 MiB L2 while it is reused by the three products. The time is
# bound by those products; tiles from 128 x 512 to 512 x 512 measure alike.
ROW_BLOCK = 256
COLUMN_BLOCK = 512

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@functools.cache
def _build():
    """The compiled extension module; raises if it cannot be built."""
    return cpp_extension.load(
        name="finelap_sigmoid_loss_cpp",
        sources=[str(SOURCE)],
        # -fno-trapping-math lets the branch-free selects of the elementwise pass
        # vectorise (no code here reads floating-point exception flags).
        extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.cache
def is_available() -> bool:
    """Whether the extension builds (tried once); warns once when it cannot."""
    try:
        _build()
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"cpp sigmoid-loss backend unavailable: {SOURCE.name} did not build ({reason})")
        return False
    return True


def _extension():
    if not is_available():
        raise RuntimeError(f"cpp sigmoid-loss backend unavailable: {SOURCE.name} did not build")
    return _build()


class _FusedSigmoidLoss(torch.autograd.Function):
    """Loss and all gradients from one fused pass; backward rescales the saved gradients."""

    @staticmethod
    def forward(ctx, rows, cols, scale, bias, positive_ids, col_ids, ignored_ids, frame_stream):
        need_rows, need_cols, need_scale, need_bias = ctx.needs_input_grad[:4]
        sums, grad_rows, grad_cols = _extension().fused_sigmoid_loss(
            rows, cols, positive_ids, col_ids, ignored_ids, float(scale), float(bias),
            frame_stream, frame_stream, need_rows, need_cols, need_scale or need_bias,
            ROW_BLOCK, COLUMN_BLOCK,
        )
        grad_scale = sums[1].to(scale.dtype).reshape(scale.shape) if need_scale else None
        grad_bias = sums[2].to(bias.dtype).reshape(bias.shape) if need_bias else None
        ctx.save_for_backward(
            grad_rows if need_rows else None,
            grad_cols if need_cols else None,
            grad_scale,
            grad_bias,
        )
        return sums[0].to(rows.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = ctx.saved_tensors
        if bool(grad_output == 1):
            scaled = grads
        else:
            scaled = tuple(None if g is None else g * grad_output.to(g.dtype) for g in grads)
        return (*scaled, None, None, None, None)


def _check(name, tensor, shape_names):
    if tensor.device.type != "cpu":
        raise ValueError(f"cpp backend: {name} must be a CPU tensor, got device {tensor.device}")
    if tensor.dim() != len(shape_names):
        raise ValueError(f"cpp backend: {name} must be [{', '.join(shape_names)}], got {tuple(tensor.shape)}")


def _check_ids(name, ids, shape_names, rows):
    _check(name, ids, shape_names)
    if ids.dtype != torch.int64:
        raise ValueError(f"cpp backend: {name} must be int64, got {ids.dtype}")
    if ids.shape[0] != rows:
        raise ValueError(f"cpp backend: {name} has {ids.shape[0]} rows, expected {rows}")


def _fused(rows, cols, scale, bias, positive_ids, col_ids, ignored_ids, frame_stream):
    """Validate, then run the kernel with autograd when anything needs a gradient.

    The frame stream pads ids with -1 and normalises by the counted entries;
    the clip stream matches every id value and normalises by M.
    """
    _check("audio-side embeddings", rows, ("M", "D"))
    _check("text-side embeddings", cols, ("N", "D"))
    if rows.dtype not in SUPPORTED_DTYPES or cols.dtype != rows.dtype:
        raise ValueError(
            f"cpp backend: embeddings must share one of {SUPPORTED_DTYPES}, got {rows.dtype} and {cols.dtype}"
        )
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(f"cpp backend: embedding widths differ, {rows.shape[1]} vs {cols.shape[1]}")
    for name, value in (("scale", scale), ("bias", bias)):
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"cpp backend: {name} must be a one-element tensor")
    positive_ids, col_ids, ignored_ids = (t.contiguous() for t in (positive_ids, col_ids, ignored_ids))
    rows, cols = rows.contiguous(), cols.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, cols, scale, bias))
    if needs_grad:
        return _FusedSigmoidLoss.apply(rows, cols, scale, bias, positive_ids, col_ids, ignored_ids, frame_stream)
    sums, _, _ = _extension().fused_sigmoid_loss(
        rows, cols, positive_ids, col_ids, ignored_ids, float(scale), float(bias),
        frame_stream, frame_stream, False, False, False, ROW_BLOCK, COLUMN_BLOCK,
    )
    return sums[0].to(rows.dtype)


def clip_sigmoid_loss(audio, text, audio_group, text_group, scale, bias):
    """sum_ij softplus(-y_ij * (scale * <audio_i, text_j> + bias)) / M, fused on CPU.

    audio [M, D], text [N, D] float32/bfloat16/float16/float64; audio_group [M],
    text_group [N] int64 (any values); y_ij = +1 iff the groups are equal, else -1.
    scale, bias: 0-d tensors. Returns a 0-d tensor in the embeddings' dtype.
    """
    _check_ids("audio_group", audio_group, ("M",), audio.shape[0])
    _check_ids("text_group", text_group, ("N",), text.shape[0])
    no_ignored = audio_group.new_empty((audio.shape[0], 0))
    return _fused(audio, text, scale, bias, audio_group[:, None], text_group, no_ignored, False)


def frame_sigmoid_loss(frames, phrases, phrase_cluster, frame_active, scale, bias, frame_ignore=None):
    """Mean of softplus(-y * z) over counted (frame, phrase) entries, fused on CPU; 0 if none.

    frames [M, D], phrases [P, D]; phrase_cluster [P] int64; frame_active [M, K]
    and frame_ignore [M, J] (or None) int64 cluster ids, -1 padded. y = +1 iff
    phrase_cluster[p] is in frame_active[m]; clusters in frame_ignore[m] are not
    counted. Returns a 0-d tensor in the embeddings' dtype.
    """
    _check_ids("phrase_cluster", phrase_cluster, ("P",), phrases.shape[0])
    _check_ids("frame_active", frame_active, ("M", "K"), frames.shape[0])
    if frame_ignore is None:
        frame_ignore = frame_active.new_empty((frames.shape[0], 0))
    _check_ids("frame_ignore", frame_ignore, ("M", "J"), frames.shape[0])
    return _fused(frames, phrases, scale, bias, frame_active, phrase_cluster, frame_ignore, True)
