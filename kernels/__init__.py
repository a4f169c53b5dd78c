"""Fused dual-stream sigmoid losses (imported as finelap.kernels).

    clip_sigmoid_loss(audio, text, audio_group, text_group, scale, bias, backend="auto",
                      workspace_bytes=DEFAULT_WORKSPACE_BYTES)
    frame_sigmoid_loss(frames, phrases, phrase_cluster, frame_active, scale, bias,
                       frame_ignore=None, backend="auto", workspace_bytes=DEFAULT_WORKSPACE_BYTES)

Both streams are one pairwise sigmoid loss over rows (audio side) and columns
(text side), a SigmoidLossProblem (kernels/problem.py). clip_problem and
frame_problem validate the inputs and build it (frame_problem takes the
counted entries when the caller has them already); sigmoid_loss(problem,
backend) runs it on a backend of kernels/registry.py, the one table of
backends and of auto's choice. BACKENDS: "auto" and the backend names.
"""
from __future__ import annotations

import torch

from .problem import DEFAULT_WORKSPACE_BYTES, SigmoidLossProblem
from .registry import backend_names, choose

BACKENDS = backend_names()  # "auto" and the built-in backends: what loss.backend and the CLI accept
EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

__all__ = ["BACKENDS", "DEFAULT_WORKSPACE_BYTES", "SigmoidLossProblem", "clip_problem", "clip_sigmoid_loss",
           "counted_entries", "frame_problem", "frame_sigmoid_loss", "sigmoid_loss"]


def clip_sigmoid_loss(audio, text, audio_group, text_group, scale, bias, backend="auto",
                      workspace_bytes=DEFAULT_WORKSPACE_BYTES):
    """Clip-stream loss: sum_ij softplus(-y_ij * (scale * <audio_i, text_j> + bias)) / M.

    audio [M, D], text [N, D] float32/bfloat16/float16/float64 (each backend's supports()
    says which it takes); audio_group [M], text_group [N] int64, any values: y_ij = +1 iff
    the groups are equal, else -1 (several captions may share a clip's group). scale, bias:
    0-d float tensors. workspace_bytes: the most scratch memory triton_gemm may take.
    Returns a 0-d tensor.
    """
    return sigmoid_loss(clip_problem(audio, text, audio_group, text_group, scale, bias, workspace_bytes), backend)


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
    problem = frame_problem(frames, phrases, phrase_cluster, frame_active, scale, bias, frame_ignore,
                            workspace_bytes=workspace_bytes)
    return sigmoid_loss(problem, backend)


def sigmoid_loss(problem: SigmoidLossProblem, backend: str = "auto") -> torch.Tensor:
    """The problem's 0-d loss on `backend` (one of backend_names()); ValueError when it cannot run it."""
    return choose(backend, problem).run(problem)


def clip_problem(audio, text, audio_group, text_group, scale, bias,
                 workspace_bytes=DEFAULT_WORKSPACE_BYTES) -> SigmoidLossProblem:
    """The clip stream's problem (inputs as clip_sigmoid_loss): one label per row, normaliser M."""
    _check_embeddings(audio, text, "audio", "text")
    if audio.shape[0] == 0:
        raise ValueError("clip_sigmoid_loss: audio has no rows (the loss is divided by M = 0)")
    _check_labels(audio_group, (audio.shape[0],), "audio_group", audio.device)
    _check_labels(text_group, (text.shape[0],), "text_group", audio.device)
    _check_logit_parameters(scale, bias, audio.device)
    return SigmoidLossProblem(
        audio.contiguous(), text.contiguous(), audio_group[:, None].contiguous(), text_group.contiguous(), None,
        labels_padded=False, scale=scale, bias=bias,
        normaliser=torch.tensor(audio.shape[0], dtype=torch.int64, device=audio.device),
        workspace_bytes=workspace_bytes)


def frame_problem(frames, phrases, phrase_cluster, frame_active, scale, bias, frame_ignore=None, normaliser=None,
                  workspace_bytes=DEFAULT_WORKSPACE_BYTES) -> SigmoidLossProblem:
    """The frame stream's problem (inputs as frame_sigmoid_loss). normaliser: the 0-d int64
    counted_entries(phrase_cluster, M, frame_ignore) when the caller has it; None: counted here."""
    _check_embeddings(frames, phrases, "frames", "phrases")
    num_frames, num_phrases = frames.shape[0], phrases.shape[0]
    _check_labels(phrase_cluster, (num_phrases,), "phrase_cluster", frames.device)
    _check_labels(frame_active, (num_frames, None), "frame_active", frames.device)
    if frame_ignore is not None:
        _check_labels(frame_ignore, (num_frames, None), "frame_ignore", frames.device)
    _check_logit_parameters(scale, bias, frames.device)
    if normaliser is None:
        normaliser = counted_entries(phrase_cluster, num_frames, frame_ignore)
    if frame_active.shape[1] == 0:  # no label at any frame: one padding column keeps kernels simple
        frame_active = torch.full((num_frames, 1), -1, dtype=torch.int64, device=frames.device)
    if frame_ignore is not None and frame_ignore.shape[1] == 0:
        frame_ignore = None
    return SigmoidLossProblem(
        frames.contiguous(), phrases.contiguous(), frame_active.contiguous(), phrase_cluster.contiguous(),
        None if frame_ignore is None else frame_ignore.contiguous(), labels_padded=True, scale=scale, bias=bias,
        normaliser=normaliser, workspace_bytes=workspace_bytes)


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
