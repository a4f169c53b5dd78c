"""Bounded-memory pairwise sigmoid loss in plain torch, for any device.

The rows are processed in blocks of `block_rows`; backward recomputes each
block's logits instead of storing them, so memory is O(block_rows x N)
whatever M is (storing the blocks' logits would bring back the [M, N] tensor).
Computes in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import SigmoidLossProblem

BLOCK_ELEMENTS = 1 << 22  # logits per block: 16 MB in float32


def default_block_rows(num_rows: int, num_columns: int) -> int:
    return max(1, min(num_rows, BLOCK_ELEMENTS // max(num_columns, 1)))


def _any_match(labels, column_labels, padded):
    """[B, N] bool: column_labels[n] among labels[b, :] (-1 entries are padding when padded)."""
    hits = torch.zeros(labels.shape[0], column_labels.shape[0], dtype=torch.bool, device=labels.device)
    for k in range(labels.shape[1]):
        label = labels[:, k, None]
        match = label == column_labels[None, :]
        if padded:
            match &= label >= 0
        hits |= match
    return hits


def _block_logits(rows, columns, scale, bias, row_labels, column_labels, row_ignore, labels_padded):
    """cos, z, positive and counted (None = all counted) of one row block, each [B, N]."""
    cos = rows @ columns.t()
    logits = scale * cos + bias
    positive = _any_match(row_labels, column_labels, labels_padded)
    counted = None if row_ignore is None else ~_any_match(row_ignore, column_labels, True)
    return cos, logits, positive, counted


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class ChunkedSigmoidLoss(torch.autograd.Function):
    """loss = sum over counted entries of softplus(-y * z) * inverse_normaliser.

    rows [M, D], columns [N, D]; row_labels [M, K], row_ignore [M, J] or None,
    column_labels [N] int64; scale, bias 0-d; inverse_normaliser 0-d.
    """

    @staticmethod
    def forward(ctx, rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                labels_padded, inverse_normaliser, block_rows):
        compute = _compute_dtype(rows.dtype)
        columns_c = columns.to(compute)
        scale_c, bias_c = scale.detach().to(compute), bias.detach().to(compute)
        total = torch.zeros((), dtype=compute, device=rows.device)
        for start in range(0, rows.shape[0], block_rows):
            block = slice(start, start + block_rows)
            _, logits, positive, counted = _block_logits(
                rows[block].to(compute), columns_c, scale_c, bias_c, row_labels[block], column_labels,
                None if row_ignore is None else row_ignore[block], labels_padded)
            losses = F.softplus(torch.where(positive, -logits, logits))
            if counted is not None:
                losses = losses * counted
            total += losses.sum()
        ctx.labels_padded = labels_padded
        ctx.block_rows = block_rows
        ctx.save_for_backward(rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                              inverse_normaliser)
        return total * inverse_normaliser.to(compute)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        rows, columns, scale, bias, row_labels, column_labels, row_ignore, inverse = ctx.saved_tensors
        compute = _compute_dtype(rows.dtype)
        columns_c = columns.to(compute)
        scale_c, bias_c = scale.detach().to(compute), bias.detach().to(compute)
        factor = grad_output.to(compute) * inverse.to(compute)  # d(total loss) / d(unnormalised sum)
        needs = ctx.needs_input_grad
        grad_rows = torch.empty_like(rows) if needs[0] else None
        grad_columns = torch.zeros_like(columns_c) if needs[1] else None
        grad_cos_sum = torch.zeros((), dtype=compute, device=rows.device)
        grad_sum = torch.zeros((), dtype=compute, device=rows.device)
        for start in range(0, rows.shape[0], ctx.block_rows):
            block = slice(start, start + ctx.block_rows)
            rows_c = rows[block].to(compute)
            cos, logits, positive, counted = _block_logits(
                rows_c, columns_c, scale_c, bias_c, row_labels[block], column_labels,
                None if row_ignore is None else row_ignore[block], ctx.labels_padded)
            grad = torch.sigmoid(logits) - positive.to(compute)  # d softplus(-y z) / dz
            if counted is not None:
                grad = grad * counted
            if needs[0]:
                grad_rows[block] = (grad @ columns_c) * (scale_c * factor)
            if needs[1]:
                grad_columns += grad.t() @ rows_c
            grad_cos_sum += (grad * cos).sum()
            grad_sum += grad.sum()
        if needs[1]:
            grad_columns = (grad_columns * (scale_c * factor)).to(columns.dtype)
        d_scale = (grad_cos_sum * factor).to(scale.dtype) if needs[2] else None
        d_bias = (grad_sum * factor).to(bias.dtype) if needs[3] else None
        return grad_rows, grad_columns, d_scale, d_bias, None, None, None, None, None, None


def sigmoid_loss(problem: SigmoidLossProblem) -> torch.Tensor:
    """The problem's loss, 0-d, in row blocks of default_block_rows; 0 without pairs."""
    if not problem.has_pairs:
        return problem.zero_loss()
    block_rows = default_block_rows(problem.rows.shape[0], problem.columns.shape[0])
    return ChunkedSigmoidLoss.apply(problem.rows, problem.columns, problem.scale, problem.bias, problem.row_labels,
                                    problem.column_labels, problem.row_ignore, problem.labels_padded,
                                    problem.inverse_normaliser, block_rows)
