"""Pairwise sigmoid loss as GEMMs: a Triton logits GEMM with a loss epilogue, then cuBLAS.

The same computation as triton_sigmoid_loss.py (rows A [M, D], columns T [N, D],
z = scale * A T^T + bias, labels from ids, loss = sum of softplus(-y z) over
counted entries * inverse_normaliser), arranged as in fused linear cross-entropy
kernels: the rows go in chunks of R, and per chunk

1. one Triton GEMM computes the logits tile by tile; its epilogue turns each
   tile into the loss and the gradient coefficients g = counted * (sigmoid(z) - y),
   writes g into a reused [R, N] buffer (input dtype) and the tile's sums of
   loss, g * cos and g into a small [3, tiles] buffer;
2. two library GEMMs (cuBLAS on CUDA) form the embedding gradients from g:
   dA[chunk] = g T and dT += g^T A[chunk].

So the work is the three M x N x D matmuls (6 M N D flops) at GEMM speed plus
one write and two reads of g; the extra memory is the [R, N] buffer, sized by
the caller's workspace budget, never [M, N]. Gradients are formed in the
forward pass; backward only multiplies them by grad_output.

Step 1 has two forms (`logits_by`), each a registered backend (kernels/registry.py):

- "triton" (backend triton_gemm): the Triton GEMM above, whose epilogue runs at
  the GEMM's occupancy (one 8-warp program per SM at 128 x 128 tiles);
- "library" (backend triton_pass): the library GEMM writes the chunk's logits
  in fp32 into a second [R, N] buffer, then a Triton pointwise pass (many small
  programs per SM) reads them and does the same epilogue work. It moves 4 + 4
  more bytes per entry (the fp32 logits written and read back) to run the
  elementwise work at full occupancy, as fused linear cross-entropy kernels do.
  For fp32 inputs g overwrites the logits in place (one buffer).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .problem import DEFAULT_WORKSPACE_BYTES
from .triton_sigmoid_loss import _dot, _tile_coefficients

MIN_CHUNK_ROWS = 128  # the thinnest row chunk: below it the GEMMs are inefficient


class TileConfig(NamedTuple):
    """Launch parameters of the logits GEMM: a BLOCK_M x BLOCK_N output tile per program,
    BLOCK_K-deep steps over D, GROUP_M row tiles visited together (L2 reuse of columns)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# First entry: the default, the fastest of the sweep on an H200 (benchmarks/gpu_tune_loss.py,
# benchmarks/results/gpu_tune_loss_2026-11-28_nvidia-h200.json): with 4 warps, or 256-wide tiles
# at 8 warps, the epilogue's live [BLOCK_M, BLOCK_N] temporaries exceed the register file and the
# kernel ran 4-5x slower. The others are the next candidates to sweep (more warps per tile,
# narrower tiles, deeper pipelines).
GPU_TILE_CONFIGS = [
    TileConfig(128, 128, 64, 8, 8, 3),
    TileConfig(128, 64, 64, 8, 8, 3),
    TileConfig(64, 128, 64, 8, 8, 3),
    TileConfig(128, 128, 64, 8, 16, 3),
    TileConfig(256, 128, 64, 8, 16, 3),
    TileConfig(128, 128, 32, 8, 8, 4),
]
INTERPRETER_TILE_CONFIG = TileConfig(16, 16, 16, 2, 1, 1)  # several tiles and ragged edges at test sizes


class PassConfig(NamedTuple):
    """Launch parameters of the pointwise pass (logits_by="library"): a BLOCK_M x BLOCK_N block
    of the chunk's logits per program."""

    block_m: int
    block_n: int
    num_warps: int


# First entry: the default. 32 entries per thread at 8 warps, fp32 loads 4 wide along a row;
# the others are the sweep's alternatives (fewer rows per block: more programs; wider rows).
GPU_PASS_CONFIGS = [
    PassConfig(32, 256, 8),
    PassConfig(16, 256, 4),
    PassConfig(64, 128, 8),
    PassConfig(8, 512, 4),
]
INTERPRETER_PASS_CONFIG = PassConfig(16, 16, 1)
LOGITS_BY = ("triton", "library")


@triton.jit
def _finish_tile(
    cos, rows, local, local_mask, columns, column_mask, tile, tile_count,
    row_labels_ptr, row_ignore_ptr, column_labels_ptr, scale_ptr, bias_ptr, coefficient_ptr,
    grad_ptr, tile_sums_ptr, N,
    K: tl.constexpr, J: tl.constexpr, LABELS_PADDED: tl.constexpr, SUM_GRAD: tl.constexpr,
    STORE_GRAD: tl.constexpr,
):
    """The epilogue of one tile of cos = <a, t> (fp32; rows = the chunk's first row + local):
    the tile's sums (loss, and with SUM_GRAD g * cos and g) into tile_sums_ptr [3, tile_count]
    at `tile`, and with STORE_GRAD g * coefficient into grad_ptr [chunk_rows, N]."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    loss, grad = _tile_coefficients(
        cos, scale, bias, rows, local_mask, columns, column_mask,
        row_labels_ptr, row_ignore_ptr, column_labels_ptr,
        K, J, LABELS_PADDED, True, True)
    tl.store(tile_sums_ptr + tile, tl.sum(tl.sum(loss, axis=1), axis=0))
    if SUM_GRAD:
        tl.store(tile_sums_ptr + tile_count + tile, tl.sum(tl.sum(grad * cos, axis=1), axis=0))
        tl.store(tile_sums_ptr + 2 * tile_count + tile, tl.sum(tl.sum(grad, axis=1), axis=0))
    if STORE_GRAD:
        coefficient = tl.load(coefficient_ptr).to(tl.float32)
        tl.store(grad_ptr + local.to(tl.int64)[:, None] * N + columns[None, :],
                 (grad * coefficient).to(grad_ptr.dtype.element_ty),
                 mask=local_mask[:, None] & column_mask[None, :])


@triton.jit
def _logits_epilogue_kernel(
    rows_ptr, columns_ptr, row_labels_ptr, row_ignore_ptr, column_labels_ptr,
    scale_ptr, bias_ptr, coefficient_ptr, grad_ptr, tile_sums_ptr,
    row_start, chunk_rows, N, D,
    K: tl.constexpr, J: tl.constexpr, LABELS_PADDED: tl.constexpr, SUM_GRAD: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """logits_by="triton": one [BLOCK_M, BLOCK_N] tile of the chunk, its logits by a K-loop
    over D, then _finish_tile."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(chunk_rows, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the columns together, so column tiles are reused from L2.
    group_size = GROUP_M * tiles_n
    group_first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(tiles_m - group_first_m, GROUP_M)
    pid_m = group_first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_mask = local < chunk_rows
    rows = row_start + local
    columns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    column_mask = columns < N
    dims = tl.arange(0, BLOCK_K)
    row_base = rows_ptr + rows.to(tl.int64)[:, None] * D
    column_base = columns_ptr + columns.to(tl.int64)[:, None] * D

    cos = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        dim_mask = (k + dims) < D
        a = tl.load(row_base + (k + dims)[None, :], mask=local_mask[:, None] & dim_mask[None, :], other=0.0)
        t = tl.load(column_base + (k + dims)[None, :], mask=column_mask[:, None] & dim_mask[None, :], other=0.0)
        cos = _dot(a, tl.trans(t), cos, PRECISION, UPCAST)

    _finish_tile(cos, rows, local, local_mask, columns, column_mask, pid_m * tiles_n + pid_n, tiles_m * tiles_n,
                 row_labels_ptr, row_ignore_ptr, column_labels_ptr, scale_ptr, bias_ptr, coefficient_ptr,
                 grad_ptr, tile_sums_ptr, N, K, J, LABELS_PADDED, SUM_GRAD, STORE_GRAD)


@triton.jit
def _loss_pass_kernel(
    logits_ptr, row_labels_ptr, row_ignore_ptr, column_labels_ptr,
    scale_ptr, bias_ptr, coefficient_ptr, grad_ptr, tile_sums_ptr,
    row_start, chunk_rows, N,
    K: tl.constexpr, J: tl.constexpr, LABELS_PADDED: tl.constexpr, SUM_GRAD: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """logits_by="library": one [BLOCK_M, BLOCK_N] block of the chunk's fp32 logits
    (logits_ptr [chunk_rows, N], from the library GEMM; grad_ptr may be the same buffer: each
    entry is read before the same thread overwrites it), then _finish_tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_mask = local < chunk_rows
    columns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    column_mask = columns < N
    cos = tl.load(logits_ptr + local.to(tl.int64)[:, None] * N + columns[None, :],
                  mask=local_mask[:, None] & column_mask[None, :], other=0.0)
    tiles_n = tl.num_programs(1)
    _finish_tile(cos, row_start + local, local, local_mask, columns, column_mask, pid_m * tiles_n + pid_n,
                 tl.num_programs(0) * tiles_n,
                 row_labels_ptr, row_ignore_ptr, column_labels_ptr, scale_ptr, bias_ptr, coefficient_ptr,
                 grad_ptr, tile_sums_ptr, N, K, J, LABELS_PADDED, SUM_GRAD, STORE_GRAD)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


TILES_ENV = "FINELAP_TRITON_GEMM_TILES"  # "BLOCK_M,BLOCK_N,BLOCK_K,GROUP_M,WARPS,STAGES" overrides the default
PASS_ENV = "FINELAP_TRITON_PASS_BLOCKS"  # "BLOCK_M,BLOCK_N,WARPS" overrides the pointwise pass's default
# cap R below what the workspace allows, for logits_by "triton" and "library" (the sweep's best R)
MAX_CHUNK_ROWS_ENV = {"triton": "FINELAP_TRITON_GEMM_MAX_CHUNK_ROWS", "library": "FINELAP_TRITON_PASS_MAX_CHUNK_ROWS"}


def _default_config(kind, environment_variable, interpreter_config, gpu_configs):
    """The interpreter's config; on a GPU the one in the environment variable (comma-separated
    fields of `kind`), else the first of gpu_configs."""
    if _interpreting():
        return interpreter_config
    if os.environ.get(environment_variable):
        return kind(*(int(value) for value in os.environ[environment_variable].split(",")))
    return gpu_configs[0]


def default_tile_config() -> TileConfig:
    return _default_config(TileConfig, TILES_ENV, INTERPRETER_TILE_CONFIG, GPU_TILE_CONFIGS)


def default_pass_config() -> PassConfig:
    return _default_config(PassConfig, PASS_ENV, INTERPRETER_PASS_CONFIG, GPU_PASS_CONFIGS)


def workspace_bytes_needed(chunk_rows: int, num_columns: int, width: int, dtype: torch.dtype,
                           logits_by: str = "triton") -> int:
    """Scratch memory of one call: the [R, N] coefficient buffer; with logits_by="library" also
    the [R, N] fp32 logits (the same buffer for fp32 inputs); for 16-bit inputs the fp32
    column-gradient accumulator [N, D] and its final cast to the input dtype; for float16 also
    an fp32 [R, D] chunk of the row gradient (scaled in fp32, see fused_sigmoid_loss)."""
    if logits_by not in LOGITS_BY:
        raise ValueError(f"logits_by must be one of {LOGITS_BY}, got {logits_by!r}")
    size = dtype.itemsize
    per_entry = size if logits_by == "triton" else 4 + (size if size < 4 else 0)
    accumulator = 0 if size >= 4 else num_columns * width * (4 + size)
    row_chunk = chunk_rows * width * 4 if dtype == torch.float16 else 0
    return chunk_rows * num_columns * per_entry + accumulator + row_chunk


def chunk_rows_for(num_rows: int, num_columns: int, width: int, dtype: torch.dtype,
                   workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, logits_by: str = "triton") -> int:
    """Rows per chunk R: as many as fit in workspace_bytes (workspace_bytes_needed), a multiple
    of MIN_CHUNK_ROWS (at least that many), and no more than the rows there are."""
    fixed = workspace_bytes_needed(0, num_columns, width, dtype, logits_by)
    per_row = max(workspace_bytes_needed(1, num_columns, width, dtype, logits_by) - fixed, 1)
    fitting = (workspace_bytes - fixed) // per_row
    rows = max(MIN_CHUNK_ROWS, fitting // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)
    if os.environ.get(MAX_CHUNK_ROWS_ENV[logits_by]):
        rows = max(MIN_CHUNK_ROWS, min(rows, int(os.environ[MAX_CHUNK_ROWS_ENV[logits_by]])))
    return max(1, min(rows, num_rows))


@functools.cache
def _addmm_takes_out_dtype(device_index: int, dtype: torch.dtype) -> bool:
    """Whether this torch has cuBLAS addmm with `dtype` operands and an fp32 result (torch >= 2.8)."""
    try:
        operand = torch.ones(8, 8, device=torch.device("cuda", device_index), dtype=dtype)
        accumulator = operand.float()
        torch.addmm(accumulator, operand, operand, out_dtype=torch.float32, out=accumulator)
    except (TypeError, RuntimeError):
        return False
    return bool((accumulator == 9).all())  # 1 + 8 ones summed: the accumulation really happened in place


def _matmul_into_fp32(out, left, right, accumulate):
    """out (fp32) = [out +] left @ right for 16-bit left/right: on CUDA 16-bit tensor-core
    operands with fp32 accumulation and result, elsewhere in fp32."""
    if out.is_cuda and _addmm_takes_out_dtype(out.device.index, left.dtype):
        torch.addmm(out, left, right, beta=1 if accumulate else 0, out_dtype=torch.float32, out=out)
    elif accumulate:
        out.addmm_(left.float(), right.float())
    else:
        torch.mm(left.float(), right.float(), out=out)


def fused_sigmoid_loss(rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                       labels_padded, inverse_normaliser, compute_row_grad, compute_column_grad,
                       compute_parameter_grad, workspace_bytes=DEFAULT_WORKSPACE_BYTES,
                       chunk_rows=None, tile_config=None, logits_by="triton", pass_config=None):
    """Loss (0-d fp32) and the gradients the flags ask for (None otherwise).

    rows [M, D], columns [N, D] (same float dtype, contiguous); row_labels [M, K],
    row_ignore [M, J] or None, column_labels [N] int64; scale, bias 0-d;
    inverse_normaliser 0-d fp32. Returns (loss, d_rows, d_columns, d_scale, d_bias)
    at grad_output = 1; d_rows/d_columns in the input dtype. logits_by: "triton" (the
    Triton GEMM with the epilogue) or "library" (library GEMM, then the Triton pass).
    chunk_rows (R), tile_config (logits_by="triton") and pass_config ("library")
    override the defaults (workspace_bytes sizes R).
    """
    M, D = rows.shape
    N = columns.shape[0]
    K = row_labels.shape[1]
    J = 0 if row_ignore is None else row_ignore.shape[1]
    device, dtype = rows.device, rows.dtype
    R = chunk_rows or chunk_rows_for(M, N, D, dtype, workspace_bytes, logits_by)
    by_library = logits_by == "library"  # (workspace_bytes_needed has checked the value)
    config = (pass_config or default_pass_config()) if by_library else (tile_config or default_tile_config())
    precision = "ieee" if dtype == torch.float32 else "tf32"
    upcast = _interpreting() and dtype == torch.bfloat16
    need_embedding_grad = compute_row_grad or compute_column_grad

    scale32 = scale.detach().to(torch.float32)
    bias32 = bias.detach().to(torch.float32)
    inverse = inverse_normaliser.to(device=device, dtype=torch.float32)
    factor = scale32 * inverse  # d(loss)/d(embeddings) = factor * g @ other side
    # g is written already multiplied by factor, so the GEMMs give finished gradients; but float16
    # cannot hold factor (1 / normaliser reaches 1e-9): it keeps g unscaled, and the GEMMs' fp32
    # results are scaled before rounding to float16.
    scale_after = dtype == torch.float16
    coefficient = torch.ones((), device=device) if scale_after else factor
    ignore = row_ignore if row_ignore is not None else row_labels
    labels = dict(K=K, J=J, LABELS_PADDED=labels_padded, SUM_GRAD=compute_parameter_grad,
                  STORE_GRAD=need_embedding_grad)

    chunk = min(R, M)
    logits_buffer = torch.empty((chunk, N), device=device, dtype=torch.float32) if by_library else None
    if need_embedding_grad:
        in_place = by_library and dtype == torch.float32  # g overwrites the fp32 logits
        grad_buffer = logits_buffer if in_place else torch.empty((chunk, N), device=device, dtype=dtype)
    else:
        grad_buffer = torch.empty((1, 1), device=device, dtype=dtype)
    grad_rows = torch.empty_like(rows) if compute_row_grad else None
    row_chunk = torch.empty((chunk, D), device=device) if compute_row_grad and scale_after else None
    column_accumulator = None
    if compute_column_grad:  # fp32 across chunks (and always for float16, scaled before rounding)
        fp32 = dtype == torch.float32 or scale_after or R < M
        column_accumulator = torch.zeros((N, D), device=device, dtype=torch.float32 if fp32 else dtype)
    sums = []  # per chunk: [3, tiles] fp32 tile sums
    for start in range(0, M, R):
        count = min(R, M - start)
        grad = grad_buffer[:count] if need_embedding_grad else grad_buffer
        if by_library:
            logits = logits_buffer[:count]
            _matmul_into_fp32(logits, rows[start:start + count], columns.t(), accumulate=False)
            grid = (triton.cdiv(count, config.block_m), triton.cdiv(N, config.block_n))
            tile_sums = torch.zeros((3, grid[0] * grid[1]), device=device, dtype=torch.float32)
            _loss_pass_kernel[grid](
                logits, row_labels, ignore, column_labels, scale32, bias32, coefficient, grad, tile_sums,
                start, count, N, **labels, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                num_warps=config.num_warps)
        else:
            tiles = triton.cdiv(count, config.block_m) * triton.cdiv(N, config.block_n)
            tile_sums = torch.zeros((3, tiles), device=device, dtype=torch.float32)
            _logits_epilogue_kernel[(tiles,)](
                rows, columns, row_labels, ignore, column_labels, scale32, bias32, coefficient, grad, tile_sums,
                start, count, N, D, **labels, PRECISION=precision, UPCAST=upcast,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                num_warps=config.num_warps, num_stages=config.num_stages)
        sums.append(tile_sums.sum(dim=1))
        if compute_row_grad and scale_after:
            row_part = row_chunk[:count]
            _matmul_into_fp32(row_part, grad, columns, accumulate=False)
            grad_rows[start:start + count].copy_(row_part.mul_(factor))
        elif compute_row_grad:
            torch.mm(grad, columns, out=grad_rows[start:start + count])
        if compute_column_grad:
            if column_accumulator.dtype == dtype:
                column_accumulator.addmm_(grad.t(), rows[start:start + count])
            else:
                _matmul_into_fp32(column_accumulator, grad.t(), rows[start:start + count], accumulate=True)
    totals = torch.stack(sums).sum(dim=0)
    loss = totals[0] * inverse

    grad_columns = None
    if compute_column_grad:
        if scale_after:
            column_accumulator.mul_(factor)
        grad_columns = column_accumulator.to(dtype)  # no copy when already in dtype
    grad_scale = grad_bias = None
    if compute_parameter_grad:
        grad_scale = totals[1] * inverse
        grad_bias = totals[2] * inverse
    return loss, grad_rows, grad_columns, grad_scale, grad_bias
