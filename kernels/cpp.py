"""C++ (CPU, OpenMP) backend of the dual-stream sigmoid losses.

The fused kernel lives in csrc/sigmoid_loss.cpp and is built on first use
with torch.utils.cpp_extension (cached in the torch extensions folder). It
walks (row block x column block) tiles, never allocating [M, N], and forms
every gradient in the forward pass when anything requires grad
(kernels/autograd.py wraps it; backward only multiplies by the incoming
gradient). Inputs arrive validated, with their normaliser, in a
SigmoidLossProblem (kernels/problem.py), as for every backend.

Every result is bitwise reproducible and the same at any thread count: it
depends only on the tile sizes below (and on the BLAS library and the CPU).
"""
from __future__ import annotations

import functools
import importlib.resources
import subprocess
import warnings
from pathlib import Path

import torch
from torch.utils import cpp_extension

SOURCE_NAME = "sigmoid_loss.cpp"


def _source() -> Path:
    """The C++ source: package data of an installed copy (finelap/kernels/csrc/), else the
    source tree's csrc/ beside kernels/ (an editable install or a checkout)."""
    installed = importlib.resources.files(__package__) / "csrc" / SOURCE_NAME
    if installed.is_file():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "csrc" / SOURCE_NAME


SOURCE = _source()

# Tile of the fused pass: 256 rows x 512 columns of fp32 cosines is 512 KiB,
# resident in a 1 MiB L2 while it is reused by the three products. The time is
# bound by those products; tiles from 128 x 512 to 512 x 512 measure alike.
ROW_BLOCK = 256
COLUMN_BLOCK = 512


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


def fused_sigmoid_loss(rows, columns, scale, bias, row_labels, column_labels, row_ignore,
                       labels_padded, inverse_normaliser, compute_row_grad, compute_column_grad,
                       compute_parameter_grad):
    """Loss and the gradients the flags ask for (None otherwise), as the other fused backends.

    rows [M, D], columns [N, D] (same float dtype, contiguous, CPU); row_labels [M, K],
    row_ignore [M, J] or None, column_labels [N] int64; scale, bias 0-d; inverse_normaliser
    0-d. Returns (loss, d_rows, d_columns, d_scale, d_bias) at grad_output = 1: the loss and
    the parameter gradients in float32 (float64 for float64 inputs), the embedding gradients
    in the input dtype.
    """
    result_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    if row_ignore is None:
        row_ignore = row_labels.new_empty((rows.shape[0], 0))
    sums, grad_rows, grad_columns = _extension().fused_sigmoid_loss(
        rows, columns, row_labels, column_labels, row_ignore, float(scale), float(bias), labels_padded,
        float(inverse_normaliser), compute_row_grad, compute_column_grad, compute_parameter_grad,
        ROW_BLOCK, COLUMN_BLOCK,
    )
    sums = sums.to(result_dtype)
    grad_scale, grad_bias = (sums[1], sums[2]) if compute_parameter_grad else (None, None)
    return (sums[0], grad_rows if compute_row_grad else None, grad_columns if compute_column_grad else None,
            grad_scale, grad_bias)
