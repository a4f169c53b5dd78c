"""Fused pairwise sigmoid loss in Triton: loss and every gradient, no [M, N] tensor.

Both streams are one computation over rows A [M, D] and columns T [N, D]:
z = scale * <a_m, t_n> + bias, y = +1 iff the column's label is among the
row's labels, entries whose column label is among the row's ignored labels
do not count, loss = sum softplus(-y * z) over counted entries * inverse_normaliser.

Two kernels, each keeping one block of embeddings and its gradient
accumulator resident while streaming the other side in tiles:
- the row pass computes the loss, dA, and the partial sums for d(scale) and
  d(bias);
- the column pass recomputes z tile by tile and accumulates dT.
The gradient of a scalar loss is formed in the forward pass (as fused
linear-cross-entropy kernels do; kernels/autograd.py wraps it); backward
only multiplies by grad_output.
The normaliser is known before launch (it comes with the problem), so the
kernels write gradients already scaled, in the input dtype.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

MAX_LABELS = 16  # K and J (labels / ignored labels per row) the kernels accept
AUTOTUNE_ENV = "FINELAP_TRITON_AUTOTUNE"  # "0" launches the first config of each list, untuned


@triton.jit
def _log1p_small(x):
    """log(1 + x) for x in [0, 1], accurate where 1 + x rounds (Goldberg's trick)."""
    u = 1.0 + x
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, x, tl.log(u) * (x / safe_d))


@triton.jit
def _dot(x, y, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """x @ y (+ acc) in fp32; UPCAST feeds fp32 operands (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def _tile_coefficients(
    cos, scale, bias,
    own_offsets, own_mask, stream_offsets, stream_mask,
    row_labels_ptr, row_ignore_ptr, column_labels_ptr,
    K: tl.constexpr, J: tl.constexpr, LABELS_PADDED: tl.constexpr,
    ROWS_ARE_OWN: tl.constexpr, COMPUTE_LOSS: tl.constexpr,
):
    """Per-entry loss and dloss/dz of one tile (0 where not counted or out of bounds).

    cos [B_own, B_stream] fp32 = <own, stream>. When ROWS_ARE_OWN the tile's
    first axis indexes rows, else columns (the column pass works transposed).
    """
    if ROWS_ARE_OWN:
        rows = own_offsets[:, None]
        row_mask = own_mask[:, None]
        columns = stream_offsets[None, :]
        column_mask = stream_mask[None, :]
    else:
        rows = stream_offsets[None, :]
        row_mask = stream_mask[None, :]
        columns = own_offsets[:, None]
        column_mask = own_mask[:, None]
    rows = rows.to(tl.int64)
    column_label = tl.load(column_labels_ptr + columns, mask=column_mask, other=0)
    hits = tl.zeros(cos.shape, dtype=tl.int32)
    for k in tl.static_range(K):
        label = tl.load(row_labels_ptr + rows * K + k, mask=row_mask, other=-1)
        match = label == column_label
        if LABELS_PADDED:
            match = match & (label >= 0)
        hits = tl.where(match, 1, hits)
    counted = row_mask & column_mask
    for j in tl.static_range(J):
        ignored = tl.load(row_ignore_ptr + rows * J + j, mask=row_mask, other=-1)
        counted = counted & ~((ignored == column_label) & (ignored >= 0))
    positive = hits != 0

    z = scale * cos + bias
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    sigmoid = tl.where(z >= 0, r, e * r)
    grad = tl.where(counted, sigmoid - positive.to(tl.float32), 0.0)
    if COMPUTE_LOSS:
        signed = tl.where(positive, -z, z)  # softplus(-y * z), y = +1 / -1
        loss = tl.where(counted, tl.maximum(signed, 0.0) + _log1p_small(e), 0.0)
    else:
        loss = grad
    return loss, grad


@triton.jit
def _next_tile(own_block, stream_ptr, start, limit, D, dims, dim_mask, ENABLED: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_STREAM: tl.constexpr):
    """The streamed tile at `start` (zeros past `limit`) and <own, tile> [BLOCK_OWN, BLOCK_STREAM].

    When not ENABLED, returns placeholders of the right types (the loop loads its own tiles).
    """
    stream = start + tl.arange(0, BLOCK_STREAM)
    mask = (stream < limit) & ENABLED
    tile = tl.load(stream_ptr + stream.to(tl.int64)[:, None] * D + dims[None, :],
                   mask=mask[:, None] & dim_mask[None, :], other=0.0)
    return tile, _dot(own_block, tl.trans(tile), None, PRECISION, UPCAST)


@triton.jit
def _row_pass_kernel(
    rows_ptr, columns_ptr, row_labels_ptr, row_ignore_ptr, column_labels_ptr,
    scale_ptr, bias_ptr, inverse_normaliser_ptr,
    grad_rows_ptr, row_loss_ptr, row_grad_cos_ptr, row_grad_sum_ptr,
    M, N, D, work_bucket,
    K: tl.constexpr, J: tl.constexpr, LABELS_PADDED: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_OWN: tl.constexpr, BLOCK_STREAM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of BLOCK_OWN rows against every column: loss, dA, sums for ds and db.

    Per-row sums (loss, sum g * cos, sum g) are stored per row, not per block,
    so every launch config writes every entry (autotuning leaves nothing stale).
    """
    pid = tl.program_id(0)
    own = pid * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    own_mask = own < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    a = tl.load(rows_ptr + own.to(tl.int64)[:, None] * D + dims[None, :],
                mask=own_mask[:, None] & dim_mask[None, :], other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)

    grad_rows = tl.zeros((BLOCK_OWN, BLOCK_D), dtype=tl.float32)
    loss_sum = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    grad_cos_sum = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    grad_sum = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
    # Software pipelining (PREFETCH): the logits matmul of the next tile is issued before
    # the elementwise work of the current one, so tensor cores and ALUs overlap.
    t, cos = _next_tile(a, columns_ptr, 0, N, D, dims, dim_mask, PREFETCH, PRECISION, UPCAST, BLOCK_STREAM)
    for start in range(0, N, BLOCK_STREAM):
        stream = start + tl.arange(0, BLOCK_STREAM)
        stream_mask = stream < N
        if PREFETCH:
            t_next, cos_next = _next_tile(a, columns_ptr, start + BLOCK_STREAM, N, D, dims, dim_mask, True,
                                          PRECISION, UPCAST, BLOCK_STREAM)
        else:
            t, cos = _next_tile(a, columns_ptr, start, N, D, dims, dim_mask, True, PRECISION, UPCAST, BLOCK_STREAM)
        loss, grad = _tile_coefficients(
            cos, scale, bias, own, own_mask, stream, stream_mask,
            row_labels_ptr, row_ignore_ptr, column_labels_ptr,
            K, J, LABELS_PADDED, True, True)
        loss_sum += tl.sum(loss, axis=1)
        if COMPUTE_GRAD:
            grad_rows = _dot(grad.to(t.dtype), t, grad_rows, PRECISION, UPCAST)
            grad_cos_sum += tl.sum(grad * cos, axis=1)
            grad_sum += tl.sum(grad, axis=1)
        if PREFETCH:
            t = t_next
            cos = cos_next

    tl.store(row_loss_ptr + own, loss_sum, mask=own_mask)
    if COMPUTE_GRAD:
        coefficient = scale * tl.load(inverse_normaliser_ptr).to(tl.float32)
        tl.store(grad_rows_ptr + own.to(tl.int64)[:, None] * D + dims[None, :],
                 (grad_rows * coefficient).to(grad_rows_ptr.dtype.element_ty),
                 mask=own_mask[:, None] & dim_mask[None, :])
        tl.store(row_grad_cos_ptr + own, grad_cos_sum, mask=own_mask)
        tl.store(row_grad_sum_ptr + own, grad_sum, mask=own_mask)


@triton.jit
def _column_pass_kernel(
    rows_ptr, columns_ptr, row_labels_ptr, row_ignore_ptr, column_labels_ptr,
    scale_ptr, bias_ptr, inverse_normaliser_ptr, grad_columns_ptr,
    M, N, D, work_bucket,
    K: tl.constexpr, J: tl.constexpr, LABELS_PADDED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_OWN: tl.constexpr, BLOCK_STREAM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of BLOCK_OWN columns against every row: dT (z recomputed, transposed)."""
    pid = tl.program_id(0)
    own = pid * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    own_mask = own < N
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    t = tl.load(columns_ptr + own.to(tl.int64)[:, None] * D + dims[None, :],
                mask=own_mask[:, None] & dim_mask[None, :], other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)

    grad_columns = tl.zeros((BLOCK_OWN, BLOCK_D), dtype=tl.float32)
    a, cos = _next_tile(t, rows_ptr, 0, M, D, dims, dim_mask, PREFETCH, PRECISION, UPCAST, BLOCK_STREAM)
    for start in range(0, M, BLOCK_STREAM):
        stream = start + tl.arange(0, BLOCK_STREAM)
        stream_mask = stream < M
        if PREFETCH:
            a_next, cos_next = _next_tile(t, rows_ptr, start + BLOCK_STREAM, M, D, dims, dim_mask, True,
                                          PRECISION, UPCAST, BLOCK_STREAM)
        else:
            a, cos = _next_tile(t, rows_ptr, start, M, D, dims, dim_mask, True, PRECISION, UPCAST, BLOCK_STREAM)
        _, grad = _tile_coefficients(
            cos, scale, bias, own, own_mask, stream, stream_mask,
            row_labels_ptr, row_ignore_ptr, column_labels_ptr,
            K, J, LABELS_PADDED, False, False)
        grad_columns = _dot(grad.to(a.dtype), a, grad_columns, PRECISION, UPCAST)
        if PREFETCH:
            a = a_next
            cos = cos_next

    coefficient = scale * tl.load(inverse_normaliser_ptr).to(tl.float32)
    tl.store(grad_columns_ptr + own.to(tl.int64)[:, None] * D + dims[None, :],
             (grad_columns * coefficient).to(grad_columns_ptr.dtype.element_ty),
             mask=own_mask[:, None] & dim_mask[None, :])


# (BLOCK_OWN, BLOCK_STREAM, num_warps, num_stages) per padded width, for 2-byte inputs:
# the resident block's fp32 gradient accumulator [BLOCK_OWN, BLOCK_D] must fit in
# registers, the resident block and the streamed tiles in shared memory. First entry =
# the untuned default. 512 was measured on an H100 (benchmarks/NOTES_kernels.md); the
# others follow the same register and shared-memory arithmetic.
_CONFIGS_BY_WIDTH = {
    64: [(128, 64, 4, 3), (64, 64, 4, 3)],
    128: [(128, 32, 8, 3), (64, 64, 4, 3)],
    256: [(128, 32, 8, 3), (64, 32, 4, 3)],
    512: [(64, 32, 8, 3), (64, 32, 8, 4)],
    1024: [(32, 32, 8, 2)],
}
_INTERPRETER_CONFIG = (16, 16, 1, 1)  # small tiles: tests exercise several tiles and ragged edges
MAX_WIDTH = max(_CONFIGS_BY_WIDTH)


def _block_width(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fit_shared_memory(config, block_d, element_size, budget):
    """Shrinks stages, then tile sizes, until resident block + streamed stages fit `budget` bytes."""
    own, stream, warps, stages = config
    while (own + stages * stream) * block_d * element_size > budget:
        if stages > 1:
            stages -= 1
        elif stream > 16:
            stream //= 2
        elif own > 16:
            own //= 2
        else:
            break
    return own, stream, warps, stages


def _config_list(block_d: int, element_size: int, device) -> list[tuple[int, int, int, int]]:
    if _interpreting():
        return [_INTERPRETER_CONFIG]
    properties = torch.cuda.get_device_properties(device)
    budget = getattr(properties, "shared_memory_per_block_optin", 160 * 1024) - 8 * 1024
    configs = [_fit_shared_memory(config, block_d, element_size, budget)
               for config in _CONFIGS_BY_WIDTH[max(64, block_d)]]
    configs = list(dict.fromkeys(configs))
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return configs[:1]
    return configs


@functools.cache
def _kernel(kernel_name: str, configs: tuple[tuple[int, int, int, int], ...]):
    """The jitted kernel, wrapped in an autotuner when there is more than one config."""
    kernel = {"row": _row_pass_kernel, "column": _column_pass_kernel}[kernel_name]
    if len(configs) == 1:
        return kernel
    return triton.autotune(
        configs=[triton.Config({"BLOCK_OWN": own, "BLOCK_STREAM": stream}, num_warps=warps, num_stages=stages)
                 for own, stream, warps, stages in configs],
        key=["D", "work_bucket", "K", "J"],
    )(kernel)


def _launch(kernel_name, grid_size, configs, *args, **constexprs):
    kernel = _kernel(kernel_name, tuple(configs))
    if len(configs) > 1:
        kernel[lambda meta: (triton.cdiv(grid_size, meta["BLOCK_OWN"]),)](*args, **constexprs)
        return
    own, stream, warps, stages = configs[0]
    kernel[(triton.cdiv(grid_size, own),)](*args, **constexprs, BLOCK_OWN=own, BLOCK_STREAM=stream,
                                            num_warps=warps, num_stages=stages)


def fused_sigmoid_loss(rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                       labels_padded, inverse_normaliser, compute_row_grad, compute_column_grad,
                       compute_parameter_grad, configs=None, prefetch=True):
    """Loss (0-d fp32) and the gradients the flags ask for (None otherwise).

    rows [M, D], columns [N, D] (same float dtype, contiguous); row_labels [M, K],
    row_ignore [M, J] or None, column_labels [N] int64; scale, bias 0-d;
    inverse_normaliser 0-d fp32. Returns (loss, d_rows, d_columns, d_scale, d_bias)
    of the loss at grad_output = 1; d_rows/d_columns in the input dtype.
    configs: (BLOCK_OWN, BLOCK_STREAM, num_warps, num_stages) list to tune over
    (default: the list for this width). prefetch: software-pipeline the logits matmul.
    """
    M, D = rows.shape
    N = columns.shape[0]
    K = row_labels.shape[1]
    J = 0 if row_ignore is None else row_ignore.shape[1]
    block_d = _block_width(D)
    configs = configs or _config_list(block_d, rows.element_size(), rows.device)
    precision = "ieee" if rows.dtype == torch.float32 else "tf32"
    upcast = _interpreting() and rows.dtype == torch.bfloat16
    work_bucket = max(M * N, 1).bit_length() // 4  # retune only when the work changes scale
    device = rows.device
    need_row_pass_grad = compute_row_grad or compute_parameter_grad
    row_loss = torch.empty(M, device=device, dtype=torch.float32)
    row_grad_cos = torch.empty_like(row_loss) if need_row_pass_grad else row_loss
    row_grad_sum = torch.empty_like(row_loss) if need_row_pass_grad else row_loss
    grad_rows = torch.empty_like(rows) if need_row_pass_grad else row_loss
    ignore = row_ignore if row_ignore is not None else row_labels
    scale32 = scale.detach().to(torch.float32)
    bias32 = bias.detach().to(torch.float32)
    inverse = inverse_normaliser.to(device=device, dtype=torch.float32)

    _launch("row", M, configs,
            rows, columns, row_labels, ignore, column_labels, scale32, bias32, inverse,
            grad_rows, row_loss, row_grad_cos, row_grad_sum,
            M, N, D, work_bucket,
            K=K, J=J, LABELS_PADDED=labels_padded, COMPUTE_GRAD=need_row_pass_grad,
            PRECISION=precision, UPCAST=upcast, PREFETCH=prefetch, BLOCK_D=block_d)
    loss = row_loss.sum() * inverse

    grad_columns = None
    if compute_column_grad:
        grad_columns = torch.empty_like(columns)
        _launch("column", N, configs,
                rows, columns, row_labels, ignore, column_labels, scale32, bias32, inverse,
                grad_columns, M, N, D, work_bucket,
                K=K, J=J, LABELS_PADDED=labels_padded, PRECISION=precision, UPCAST=upcast, PREFETCH=prefetch,
                BLOCK_D=block_d)
    grad_scale = grad_bias = None
    if compute_parameter_grad:
        grad_scale = row_grad_cos.sum() * inverse
        grad_bias = row_grad_sum.sum() * inverse
    return loss, (grad_rows if compute_row_grad else None), grad_columns, grad_scale, grad_bias
