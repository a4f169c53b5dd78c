"""Materialised plain-torch pairwise sigmoid loss: the oracle.

Builds the full [M, N] logit tensor, so it is simple and exact (float64
works) but needs O(M * N) memory. Every other backend is tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import SigmoidLossProblem


def targets(row_labels, column_labels, row_ignore=None, labels_padded=True):
    """Targets and counting mask, [M, N] bool each (counted is None when row_ignore is None).

    positive[m, n] = column_labels[n] among row_labels[m] (-1 entries are padding when labels_padded);
    counted[m, n] = column_labels[n] not among row_ignore[m] (-1 padded).
    """
    column = column_labels[None, :, None]
    labels = row_labels[:, None, :]
    match = column == labels
    if labels_padded:
        match &= labels >= 0
    positive = match.any(-1)
    if row_ignore is None:
        return positive, None
    ignore = row_ignore[:, None, :]
    return positive, ~((column == ignore) & (ignore >= 0)).any(-1)


def sigmoid_loss(problem: SigmoidLossProblem) -> torch.Tensor:
    """The problem's loss, 0-d, differentiable by autograd (in the dtype of scale * rows)."""
    logits = problem.scale * (problem.rows @ problem.columns.t()) + problem.bias
    positive, counted = targets(problem.row_labels, problem.column_labels, problem.row_ignore, problem.labels_padded)
    signs = torch.where(positive, 1.0, -1.0).to(logits.dtype)
    losses = F.softplus(-signs * logits)
    if counted is not None:
        losses = losses * counted.to(logits.dtype)
    return losses.sum() / problem.normaliser.clamp(min=1).to(logits.dtype)
