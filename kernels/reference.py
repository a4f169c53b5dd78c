"""Materialised plain-torch dual-stream sigmoid losses: the oracle.

Builds the full [M, N] logit tensor, so it is simple and exact (float64
works) but needs O(M * N) memory. Every other backend is tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_sigmoid_loss(audio, text, audio_group, text_group, scale, bias):
    """sum_ij softplus(-y_ij * (scale * <audio_i, text_j> + bias)) / M.

    audio [M, D], text [N, D]; audio_group [M], text_group [N] int64;
    y_ij = +1 iff audio_group[i] == text_group[j] else -1. Returns a 0-d tensor.
    """
    logits = scale * (audio @ text.t()) + bias
    signs = torch.where(audio_group[:, None] == text_group[None, :], 1.0, -1.0).to(logits.dtype)
    return F.softplus(-signs * logits).sum() / audio.shape[0]


def frame_targets(phrase_cluster, frame_active, frame_ignore=None):
    """Targets and counting mask of the frame stream, both [M, P].

    positive[m, p] = phrase_cluster[p] in frame_active[m] (-1 entries are padding);
    counted[m, p] = phrase_cluster[p] not in frame_ignore[m].
    """
    cluster = phrase_cluster[None, :, None]
    active = frame_active[:, None, :]
    positive = ((cluster == active) & (active >= 0)).any(-1)
    if frame_ignore is None:
        counted = torch.ones_like(positive)
    else:
        ignore = frame_ignore[:, None, :]
        counted = ~((cluster == ignore) & (ignore >= 0)).any(-1)
    return positive, counted


def frame_sigmoid_loss(frames, phrases, phrase_cluster, frame_active, scale, bias, frame_ignore=None):
    """Mean of softplus(-y * z) over counted (frame, phrase) entries; 0 if none are counted.

    frames [M, D], phrases [P, D]; phrase_cluster [P] int64; frame_active [M, K]
    and frame_ignore [M, J] (or None) int64 cluster ids, -1 padded.
    """
    logits = scale * (frames @ phrases.t()) + bias
    positive, counted = frame_targets(phrase_cluster, frame_active, frame_ignore)
    signs = torch.where(positive, 1.0, -1.0).to(logits.dtype)
    losses = F.softplus(-signs * logits) * counted.to(logits.dtype)
    return losses.sum() / counted.sum().clamp(min=1).to(logits.dtype)
