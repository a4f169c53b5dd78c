"""Frame labels on the audio encoder's real frame grid.

The encoder's frame t is one column of patches: patch_size fbank frames of
10 ms, so hop = patch_size * 10 ms (0.16 s for EAT's 16x16 patches) and
T = target_frames // patch_size (64). Frame t spans [t * hop, (t + 1) * hop)
seconds. A segment [onset, offset) makes frame t active iff it overlaps the
frame with positive length: onset < (t + 1) * hop and offset > t * hop.
So a segment ending exactly at 0.32 s does not reach frame 2, one starting
at 0.32 s begins at frame 2. Frame edges are compared with a tolerance of
1e-6 frames (0.16 us) so that float rounding of t * hop cannot flip an edge.
Segments are clipped to the audio first ([0, duration], duration <= max_seconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from finelap.audio.fbank import FRAME_SHIFT_MS
from finelap.config import AudioEncoderConfig

_EDGE_TOLERANCE_FRAMES = 1e-6


@dataclass(frozen=True)
class FrameGrid:
    hop_seconds: float  # length of one encoder frame
    num_frames: int  # T, frames per clip

    @classmethod
    def from_audio_config(cls, audio: AudioEncoderConfig) -> "FrameGrid":
        return cls(audio.patch_size * FRAME_SHIFT_MS / 1000.0, audio.target_frames // audio.patch_size)

    def frame_range(self, onset: float, offset: float, duration: float) -> range:
        """Frames active for the segment [onset, offset) seconds of a clip `duration` seconds long."""
        onset, offset = max(onset, 0.0), min(offset, duration)
        if offset <= onset:
            return range(0)
        first = math.floor(onset / self.hop_seconds + _EDGE_TOLERANCE_FRAMES)
        end = math.ceil(offset / self.hop_seconds - _EDGE_TOLERANCE_FRAMES)
        return range(max(first, 0), min(end, self.num_frames))

    def mask(self, segments: Iterable[tuple[float, float]], duration: float) -> torch.Tensor:
        """[T] bool, True at frames any segment is active in."""
        active = torch.zeros(self.num_frames, dtype=torch.bool)
        for onset, offset in segments:
            frames = self.frame_range(onset, offset, duration)
            active[frames.start : frames.stop] = True
        return active
