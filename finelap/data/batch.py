"""The batch that flows from the data pipeline to the model and the loss.

One rank's share of a global batch. Ids that must agree across ranks
(clip groups, phrase ids, cluster ids) are global: a clip's group is its
index in the whole training set, a phrase id is a stable hash of its text,
a cluster id is the phrase bank's index of the cluster.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """Shapes: B clips, S samples, Nc captions, P unique phrases, T frames,
    K active / J ignored cluster slots per frame, N phrases per clip (per_clip mode)."""

    audio_ids: list[str]  # [B] the metadata's audio_id of each clip
    waveforms: torch.Tensor  # [B, S] float32, 16 kHz mono, zero-padded after `lengths`
    lengths: torch.Tensor  # [B] int64, true length of each waveform in samples
    captions: list[str]  # [Nc] caption texts (one per clip when training)
    caption_clip: torch.Tensor  # [Nc] int64, row in this batch of the clip each caption describes
    clip_group: torch.Tensor  # [B] int64, global group id of each clip (its dataset index)
    annotated: torch.Tensor  # [B] bool, clip has timestamped phrases (frame stream rows)
    phrases: list[str]  # [P] unique phrase texts of this rank's batch
    phrase_id: torch.Tensor  # [P] int64, stable global id of each phrase text (dedup across ranks)
    phrase_cluster: torch.Tensor  # [P] int64, cluster id of each phrase
    frame_active: torch.Tensor  # [B, T, K] int64, cluster ids sounding at each frame, -1 padded
    frame_ignore: torch.Tensor | None  # [B, T, J] int64, cluster ids not counted at a frame, -1 padded
    clip_phrase_index: torch.Tensor  # [B, N] int64, per_clip mode: index into `phrases`, -1 padded
    clip_phrase_labels: torch.Tensor  # [B, N, T] float32, per_clip mode: 1 where phrase sounds at frame
    sample_index: torch.Tensor  # [B] int64, global dataset index of each clip (resume bookkeeping)

    @property
    def caption_group(self) -> torch.Tensor:
        """[Nc] int64 group id of each caption: the group of the clip it describes."""
        return self.clip_group[self.caption_clip]

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor moved to `device` (lists are shared)."""
        moved = {}
        for field in fields(self):
            value = getattr(self, field.name)
            moved[field.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)
