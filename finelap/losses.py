"""The dual-stream sigmoid loss over one data-parallel step: gathers, normalises, calls the kernels.

Clip stream: rows are this rank's clip embeddings, columns the caption
embeddings of ALL ranks (y = +1 iff same clip group). Frame stream (batch
negatives): rows are the valid frames of this rank's annotated clips, columns
the unique phrases of the GLOBAL batch, de-duplicated by phrase id (the first
copy in rank order is kept, so every rank sees the same columns). Frame stream
(per_clip, the reference's recipe): each annotated clip scores only its own
phrases with binary cross-entropy against 0/1 frame labels.

Across ranks, rows stay local and columns are all-gathered with autograd: the
gather's backward sums every rank's gradient of a column and returns it to the
rank that owns it. Normalisers are global (all-reduced), so each pair of the
global batch counts exactly once. Scaling rule, with W ranks, S_r the sum of
rank r's per-pair losses and G the global normaliser:

    single-process loss over the concatenated batch   L   = sum_r S_r / G
    what rank r backpropagates                        L_r = W * S_r / G
    after the data-parallel gradient average          (1/W) sum_r dL_r = sum_r dS_r / G = dL

DeepSpeed (and DDP) average gradients over ranks and divide by the
gradient-accumulation steps themselves; nothing here divides by either.
Every rank runs the same collectives in the same order whatever its batch
holds (no annotated clip, no phrase): a rank with no rows still backpropagates
a zero that is connected to the gathered columns, so the gather's backward
collective runs everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from finelap.config import LossConfig
from finelap.data.batch import Batch
from finelap.kernels import DEFAULT_WORKSPACE_BYTES, clip_problem, counted_entries, frame_problem, sigmoid_loss
from finelap.models.outputs import FineLAPOutput

MODES = ("dual", "clip_only", "frame_only")
FRAME_NEGATIVES = ("batch", "per_clip")


@dataclass
class LossOutput:
    """One step's loss. Counts are over the global batch (all ranks)."""

    loss: torch.Tensor  # 0-d float32 (float64 for float64 embeddings): what this rank backpropagates, W * S_r / G
    clip_loss: torch.Tensor  # 0-d, detached: clip stream over the global batch, equal on every rank
    frame_loss: torch.Tensor  # 0-d, detached: frame stream over the global batch, equal on every rank
    clip_rows: int  # clip embeddings (the clip stream's normaliser)
    caption_columns: int  # caption embeddings
    frame_rows: int  # valid frames of annotated clips
    phrase_columns: int  # batch: unique phrases of the global batch; per_clip: (clip, phrase) pairs
    frame_entries: int  # counted (frame, phrase) entries (the frame stream's normaliser)


class DualStreamSigmoidLoss(nn.Module):
    """alpha * clip stream + beta * frame stream, correct across data-parallel ranks.

    mode: "dual" | "clip_only" | "frame_only" (the other stream is neither
    computed nor gathered, identically on every rank). frame_negatives:
    "batch" | "per_clip". backend: one of finelap.kernels.BACKENDS;
    workspace_bytes: the most scratch memory a kernel may take (the chunk
    buffers of triton_gemm and triton_pass).
    process_group: the data-parallel group (None: the default group when
    torch.distributed is initialised).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, mode: str = "dual",
                 frame_negatives: str = "batch", backend: str = "auto",
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, process_group=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"loss mode must be one of {MODES}, got {mode!r}")
        if frame_negatives not in FRAME_NEGATIVES:
            raise ValueError(f"loss frame_negatives must be one of {FRAME_NEGATIVES}, got {frame_negatives!r}")
        self.alpha = alpha
        self.beta = beta
        self.mode = mode
        self.frame_negatives = frame_negatives
        self.backend = backend
        self.workspace_bytes = workspace_bytes
        self.process_group = process_group

    @classmethod
    def from_config(cls, config: LossConfig, process_group=None) -> "DualStreamSigmoidLoss":
        return cls(alpha=config.alpha, beta=config.beta, mode=config.mode,
                   frame_negatives=config.frame_negatives, backend=config.backend,
                   workspace_bytes=int(config.workspace_mib * 2**20), process_group=process_group)

    def forward(self, output: FineLAPOutput, batch: Batch) -> LossOutput:
        _check_shapes(output, batch)
        ranks = _Ranks(self.process_group)
        use_clip = self.mode != "frame_only"
        use_frame = self.mode != "clip_only"
        gather_phrases = use_frame and self.frame_negatives == "batch"

        # Columns of the global batch: one autograd gather for the embeddings, one for their ids.
        embeddings, ids = [], []
        if use_clip:
            embeddings.append(output.caption_embeddings)
            ids.append(batch.caption_group)
        if gather_phrases:
            embeddings.append(output.phrase_embeddings)
            ids += [batch.phrase_id, batch.phrase_cluster]
        embeddings = ranks.gather(embeddings, differentiable=True)
        ids = ranks.gather(ids, differentiable=False)

        # Sums accumulate in float32 (float64 when the embeddings are float64).
        loss_dtype = torch.float64 if output.clip_embeddings.dtype == torch.float64 else torch.float32
        clip = frame = _StreamSum(output.clip_scale.new_zeros((), dtype=loss_dtype))
        if use_clip:
            clip = self._clip_stream(output, batch, embeddings.pop(0), ids.pop(0), loss_dtype)
        if gather_phrases:
            frame = self._frame_stream(output, batch, embeddings.pop(0), ids.pop(0), ids.pop(0), loss_dtype)
        elif use_frame:
            frame = _per_clip_stream(output, batch, loss_dtype)

        totals = _GlobalTotals.all_reduced(ranks, clip, frame)
        clip_normaliser = totals.clip_entries.clamp(min=1)
        frame_normaliser = totals.frame_entries.clamp(min=1)
        # Rank r's share, W * S_r / G: the data-parallel average then yields sum_r S_r / G.
        loss = clip.loss_sum.new_zeros(())
        if use_clip:
            loss = loss + self.alpha * clip.loss_sum * (ranks.size / clip_normaliser).to(loss_dtype)
        if use_frame:
            loss = loss + self.beta * frame.loss_sum * (ranks.size / frame_normaliser).to(loss_dtype)
        counts = totals.counts()
        return LossOutput(
            loss=loss,
            clip_loss=(totals.clip_loss_sum / clip_normaliser).to(loss_dtype),
            frame_loss=(totals.frame_loss_sum / frame_normaliser).to(loss_dtype),
            clip_rows=counts.clip_rows,
            caption_columns=clip.columns,
            frame_rows=counts.frame_rows,
            phrase_columns=frame.columns if gather_phrases else counts.frame_pairs,
            frame_entries=counts.frame_entries,
        )

    def _clip_stream(self, output, batch, captions, caption_group, loss_dtype) -> _StreamSum:
        """This rank's clips against every rank's captions."""
        clips = output.clip_embeddings
        rows, columns = clips.shape[0], captions.shape[0]
        if rows == 0 or columns == 0:
            loss_sum = _connected_zero(loss_dtype, clips, captions, output.clip_scale, output.clip_bias)
        else:
            problem = clip_problem(clips, captions, batch.clip_group, caption_group, output.clip_scale,
                                   output.clip_bias, workspace_bytes=self.workspace_bytes)
            loss_sum = sigmoid_loss(problem, self.backend).to(loss_dtype) * rows
        return _StreamSum(loss_sum, rows=rows, columns=columns, entries=torch.tensor(float(rows)))

    def _frame_stream(self, output, batch, phrases, phrase_id, phrase_cluster, loss_dtype) -> _StreamSum:
        """This rank's valid annotated frames against the unique phrases of the global batch."""
        keep = _first_occurrences(phrase_id)
        phrases, phrase_cluster = phrases[keep], phrase_cluster[keep]
        frame_rows_mask = batch.annotated[:, None] & output.frame_mask  # [B, T]
        frames = output.frame_embeddings[frame_rows_mask]  # [M_f, E]
        frame_active = batch.frame_active[frame_rows_mask]
        frame_ignore = None if batch.frame_ignore is None else batch.frame_ignore[frame_rows_mask]
        rows, columns = frames.shape[0], phrases.shape[0]
        entries = counted_entries(phrase_cluster, rows, frame_ignore)
        if rows == 0 or columns == 0:
            loss_sum = _connected_zero(loss_dtype, frames, phrases, output.frame_scale, output.frame_bias)
        else:
            problem = frame_problem(frames, phrases, phrase_cluster, frame_active, output.frame_scale,
                                    output.frame_bias, frame_ignore, normaliser=entries,
                                    workspace_bytes=self.workspace_bytes)
            loss_sum = sigmoid_loss(problem, self.backend).to(loss_dtype) * entries.to(loss_dtype)
        return _StreamSum(loss_sum, rows=rows, columns=columns, entries=entries)


@dataclass
class _StreamSum:
    """One stream on this rank: the un-normalised loss and what it counted.

    From the kernels, loss_sum is their mean over this rank's entries times the count: they
    apply 1 / normaliser where they form the gradients, which keeps 16-bit gradients in range.
    """

    loss_sum: torch.Tensor  # 0-d, sum of this rank's per-pair losses (graph attached)
    rows: int = 0
    columns: int = 0  # columns seen by this rank (the same on every rank)
    entries: torch.Tensor | int = 0  # counted entries (the frame stream's normaliser)
    pairs: int = 0  # per_clip: (clip, phrase) pairs on this rank

    def __post_init__(self):
        self.entries = torch.as_tensor(self.entries, dtype=torch.float64, device=self.loss_sum.device)


class _Counts(NamedTuple):
    """What LossOutput reports of the global batch."""

    frame_entries: int  # counted (frame, phrase) entries
    clip_rows: int
    frame_rows: int
    frame_pairs: int  # per_clip: (clip, phrase) pairs


class _GlobalTotals(NamedTuple):
    """Both streams summed over every rank, each a 0-d float64 tensor (one all_reduce)."""

    clip_loss_sum: torch.Tensor  # may be NaN (a diverged step)
    frame_loss_sum: torch.Tensor
    clip_entries: torch.Tensor  # the clip stream's normaliser: clip rows
    frame_entries: torch.Tensor  # the frame stream's normaliser: counted (frame, phrase) entries
    clip_rows: torch.Tensor
    frame_rows: torch.Tensor
    frame_pairs: torch.Tensor

    @classmethod
    def all_reduced(cls, ranks: _Ranks, clip: _StreamSum, frame: _StreamSum) -> _GlobalTotals:
        def count(value: int) -> torch.Tensor:
            return torch.tensor(float(value), dtype=torch.float64, device=clip.entries.device)

        local = cls(clip_loss_sum=clip.loss_sum.detach().double(), frame_loss_sum=frame.loss_sum.detach().double(),
                    clip_entries=clip.entries, frame_entries=frame.entries, clip_rows=count(clip.rows),
                    frame_rows=count(frame.rows), frame_pairs=count(frame.pairs))
        return cls(*ranks.all_reduce_sum(torch.stack(local)).unbind())

    def counts(self) -> _Counts:
        """The reported counts as ints (one copy to the host; the loss sums may be NaN and stay out)."""
        values = torch.stack([getattr(self, name) for name in _Counts._fields]).tolist()
        return _Counts(*(round(value) for value in values))


def _per_clip_stream(output: FineLAPOutput, batch: Batch, loss_dtype: torch.dtype) -> _StreamSum:
    """The reference's frame loss on this rank: summed BCE of each annotated clip's own phrases.

    Each annotated clip scores its phrases (batch.clip_phrase_index, -1
    padded) against 0/1 labels at its valid frames: logits [B_g, N, T].
    """
    scored = batch.annotated & (batch.clip_phrase_index >= 0).any(dim=1)  # annotated clips with a phrase
    phrase_index = batch.clip_phrase_index[scored]  # [B_g, N]
    present = phrase_index >= 0
    phrases = output.phrase_embeddings[phrase_index.clamp(min=0)]  # [B_g, N, E]
    frames = output.frame_embeddings[scored]  # [B_g, T, E]
    similarity = torch.einsum("gne,gte->gnt", phrases, frames).to(loss_dtype)
    logits = output.frame_scale * similarity + output.frame_bias
    counted = present[:, :, None] & output.frame_mask[scored][:, None, :]  # [B_g, N, T]
    labels = batch.clip_phrase_labels[scored].to(loss_dtype)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return _StreamSum(losses.masked_fill(~counted, 0).sum(), rows=int(output.frame_mask[batch.annotated].sum()),
                      entries=counted.sum(), pairs=int(present.sum()))


def _connected_zero(dtype: torch.dtype, *tensors: torch.Tensor) -> torch.Tensor:
    """A zero whose graph reaches every input, so backward (and its collectives) still runs."""
    return sum(tensor.sum().to(dtype) for tensor in tensors) * 0


def _first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """[U] int64 positions of the first occurrence of each distinct id, in increasing order."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first.sort().values


def _check_shapes(output: FineLAPOutput, batch: Batch) -> None:
    checks = [
        ("output.clip_embeddings rows", output.clip_embeddings.shape[0],
         "batch.clip_group", batch.clip_group.shape[0]),
        ("output.frame_embeddings [B, T]", tuple(output.frame_embeddings.shape[:2]),
         "output.frame_mask", tuple(output.frame_mask.shape)),
        ("output.frame_embeddings [B, T]", tuple(output.frame_embeddings.shape[:2]),
         "batch.frame_active [B, T]", tuple(batch.frame_active.shape[:2])),
        ("output.caption_embeddings rows", output.caption_embeddings.shape[0],
         "batch.caption_clip", batch.caption_clip.shape[0]),
        ("output.phrase_embeddings rows", output.phrase_embeddings.shape[0],
         "batch.phrase_id", batch.phrase_id.shape[0]),
    ]
    if batch.frame_ignore is not None:
        checks.append(("output.frame_embeddings [B, T]", tuple(output.frame_embeddings.shape[:2]),
                       "batch.frame_ignore [B, T]", tuple(batch.frame_ignore.shape[:2])))
    for name, size, other_name, other_size in checks:
        if size != other_size:
            raise ValueError(f"DualStreamSigmoidLoss: {name} is {size} but {other_name} is {other_size}")


class _GatherWithGradient(torch.autograd.Function):
    """all_gather along dim 0; backward sums each slot's gradient over ranks and returns it to its owner."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(gathered, tensor, group=group)
        return gathered

    @staticmethod
    def backward(ctx, gathered_gradient):
        gathered_gradient = gathered_gradient.contiguous()
        world = dist.get_world_size(ctx.group)
        gradient = gathered_gradient.new_empty((gathered_gradient.shape[0] // world, *gathered_gradient.shape[1:]))
        dist.reduce_scatter_single(gradient, gathered_gradient, op=dist.ReduceOp.SUM, group=ctx.group)
        return gradient, None


class _Ranks:
    """The data-parallel group as the loss sees it; a single process is a group of one."""

    def __init__(self, group):
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.size = dist.get_world_size(group) if distributed else 1

    def gather(self, tensors: list[torch.Tensor], differentiable: bool) -> list[torch.Tensor]:
        """Per input, the rank-ordered concatenation of every rank's tensor, [sum of rows, ...].

        The inputs (same dtype and trailing shape, any number of rows) travel
        in one collective: padded to the largest row counts, then trimmed.
        """
        if self.size == 1 or not tensors:
            return list(tensors)
        device = tensors[0].device
        local_rows = torch.tensor([tensor.shape[0] for tensor in tensors], dtype=torch.int64, device=device)
        rows = torch.empty((self.size, len(tensors)), dtype=torch.int64, device=device)
        dist.all_gather_single(rows, local_rows[None], group=self.group)
        rows = rows.tolist()
        width = [max(rank_rows[i] for rank_rows in rows) for i in range(len(tensors))]
        padded = torch.cat([torch.cat([tensor, tensor.new_zeros((width[i] - tensor.shape[0], *tensor.shape[1:]))])
                            for i, tensor in enumerate(tensors)])
        if differentiable:
            gathered = _GatherWithGradient.apply(padded, self.group)
        else:
            gathered = padded.new_empty((self.size * padded.shape[0], *padded.shape[1:]))
            dist.all_gather_single(gathered, padded.contiguous(), group=self.group)
        results = []
        for i in range(len(tensors)):
            start = sum(width[:i])
            index = [rank * padded.shape[0] + start + j for rank in range(self.size) for j in range(rows[rank][i])]
            results.append(gathered[torch.tensor(index, dtype=torch.int64, device=device)])
        return results

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor
