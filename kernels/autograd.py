"""The autograd wrapper of the fused backends that form every gradient in the forward pass.

A fused backend computes the loss and the gradients at grad_output = 1 in one
go (the gradient of a scalar loss needs nothing from backward); backward then
only multiplies them by grad_output.
"""
from __future__ import annotations

import torch

from .problem import SigmoidLossProblem


class GradientsInForward(torch.autograd.Function):
    """loss = fused(rows, columns, ...): gradients from the forward pass, scaled in backward.

    fused(rows, columns, scale, bias, row_labels, column_labels, row_ignore, labels_padded,
    inverse_normaliser, compute_row_grad=, compute_column_grad=, compute_parameter_grad=)
    returns (loss, d_rows, d_columns, d_scale, d_bias), None for what was not asked.
    """

    @staticmethod
    def forward(ctx, rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                labels_padded, inverse_normaliser, fused):
        needs = ctx.needs_input_grad
        loss, grad_rows, grad_columns, grad_scale, grad_bias = fused(
            rows, columns, scale, bias, row_labels, column_labels, row_ignore, labels_padded,
            inverse_normaliser, compute_row_grad=needs[0], compute_column_grad=needs[1],
            compute_parameter_grad=needs[2] or needs[3])
        ctx.scale_dtype = scale.dtype
        ctx.bias_dtype = bias.dtype
        ctx.save_for_backward(grad_rows, grad_columns, grad_scale, grad_bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        # The embedding gradients are scaled in place: a second copy would double the
        # loss's peak memory. So this backward can run only once per forward.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the fused sigmoid loss supports one backward per forward "
                               "(retain_graph=True with a second backward is not supported)")
        ctx.consumed = True
        grad_rows, grad_columns, grad_scale, grad_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        factor = grad_output
        if needs[0]:
            grad_rows.mul_(factor.to(grad_rows.dtype))
        if needs[1]:
            grad_columns.mul_(factor.to(grad_columns.dtype))
        d_scale = (grad_scale * factor).to(ctx.scale_dtype) if needs[2] else None
        d_bias = (grad_bias * factor).to(ctx.bias_dtype) if needs[3] else None
        return (grad_rows if needs[0] else None, grad_columns if needs[1] else None,
                d_scale, d_bias, None, None, None, None, None, None)


def fused_loss(problem: SigmoidLossProblem, fused) -> torch.Tensor:
    """The problem's loss, 0-d, from `fused` (the signature GradientsInForward documents); 0 without pairs."""
    if not problem.has_pairs:
        return problem.zero_loss()
    return GradientsInForward.apply(problem.rows, problem.columns, problem.scale, problem.bias, problem.row_labels,
                                    problem.column_labels, problem.row_ignore, problem.labels_padded,
                                    problem.inverse_normaliser, fused)
