"""One pairwise sigmoid loss, as every backend receives it.

Both streams are this computation over rows (audio side) and columns (text
side): the clip stream has one label per row (its group), nothing ignored
and M as normaliser; the frame stream has the clusters sounding at each
frame as labels, the ignored clusters, and the counted entries as normaliser.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_WORKSPACE_BYTES = 256 * 2**20  # the [R, N] buffers of triton_gemm / triton_pass, unless the caller says


@dataclass(frozen=True)
class SigmoidLossProblem:
    """loss = sum over counted (m, n) of softplus(-y_mn * z_mn) / normaliser, 0 when nothing counts.

    z_mn = scale * <rows[m], columns[n]> + bias; y_mn = +1 iff column_labels[n] is among
    row_labels[m], else -1; (m, n) counts unless column_labels[n] is among row_ignore[m].
    Tensors are contiguous and on one device.
    """

    rows: torch.Tensor  # [M, D] float32/bfloat16/float16/float64
    columns: torch.Tensor  # [N, D], the dtype of rows
    row_labels: torch.Tensor  # [M, K] int64, K >= 1
    column_labels: torch.Tensor  # [N] int64
    row_ignore: torch.Tensor | None  # [M, J] int64 ids, -1 padded, J >= 1; None: every entry counts
    labels_padded: bool  # -1 in row_labels is padding (frame stream); False: every id is a label (clip groups)
    scale: torch.Tensor  # 0-d float
    bias: torch.Tensor  # 0-d float
    normaliser: torch.Tensor  # 0-d int64: the counted entries (clip stream: M)
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES  # the most scratch memory a backend may take

    @property
    def loss_dtype(self) -> torch.dtype:
        """The dtype of the loss: float64 for float64 embeddings, else float32."""
        return torch.float64 if self.rows.dtype == torch.float64 else torch.float32

    @property
    def inverse_normaliser(self) -> torch.Tensor:
        """0-d, loss_dtype: 1 / normaliser, 0 when nothing counts (what the fused backends multiply by)."""
        count = self.normaliser.to(self.loss_dtype)
        return torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count))

    @property
    def has_pairs(self) -> bool:
        return self.rows.shape[0] > 0 and self.columns.shape[0] > 0

    def zero_loss(self) -> torch.Tensor:
        """0 in loss_dtype, connected to every input: the loss (and zero gradients) of a problem without pairs."""
        return (self.rows.sum() + self.columns.sum()).to(self.loss_dtype) * 0 + self.scale * 0 + self.bias * 0
