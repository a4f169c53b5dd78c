"""How cross-cutting work attaches to the training loop (finelap.train).

A `Hook` overrides any of three points; the trainer calls them on every rank, for each hook in
its list, in list order:

    on_step_end(step: StepEnd) -> bool   after each optimizer step, before the time-budget check,
                                         the log record and the checkpoint; True ends the run
                                         after this step (which is then logged and saved)
    on_save(step: int)                   after checkpoint `step` is complete on every rank
    on_finish(last: LastBatch | None)    once, after the loop; `last` holds the last step's
                                         inputs, None when no step ran (a finished run resumed)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from finelap.data.batch import Batch


@dataclass(frozen=True)
class StepEnd:
    """An optimizer step just taken."""

    step: int
    epoch: int
    sample_indices: list[int]  # dataset indices of every clip this rank's micro-batches of the step held


@dataclass(frozen=True)
class LastBatch:
    """The inputs of the last step: what --profile counts flops on and --probe-embeddings embeds."""

    batch: Batch  # on the model's device
    features: torch.Tensor  # [B, target_frames, num_mel_bins] float32 fbank
    frame_counts: torch.Tensor  # [B] int64, frames before padding


class Hook:
    """A hook that does nothing at every point; subclasses override the points they use."""

    def on_step_end(self, step: StepEnd) -> bool:
        return False

    def on_save(self, step: int) -> None:
        pass

    def on_finish(self, last: LastBatch | None) -> None:
        pass
