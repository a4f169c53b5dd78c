"""Frame labels on the audio encoder's real frame grid.

The encoder's frame t is one column of patches: patch_size fbank frames of
10 ms, so hop = patch_size * 10 ms (0.16 s for EAT's 16x16 patches) and
T = target_frames // patch_size (64). Frame t spans [t * hop, (t + 1) * hop)
seconds. Segments are clipped to the audio first ([0, duration], duration <= max_seconds).

Which frames a segment [onset, offset) makes active (data.frame_label_rule):
- "half" (default): frames the segment covers for at least half their length;
  a segment that covers no frame by half (shorter than half a frame, or
  straddling an edge) makes the one frame it covers most active (the earlier
  on a tie), so no event is ever dropped. A detector that reproduces these
  labels exactly stays within a quarter of a frame of the event at each end.
- "any": every frame the segment overlaps with positive length. Simpler, but
  it stretches each event by up to a frame at both ends: a 0.3 s event often
  becomes 0.48 s of active frames, and a perfect classifier of such labels
  fails the 70 % detection-tolerance criterion of PSDS1 on short events
  (docs/demo.md measures it).
A segment ending exactly at 0.32 s does not reach frame 2 under either rule,
one starting at 0.32 s begins at frame 2. Frame edges are compared with a
tolerance of 1e-6 frames (0.16 us) so that float rounding of t * hop cannot flip an edge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from finelap.audio.fbank import FRAME_SHIFT_MS
from finelap.config import AudioEncoderConfig

_EDGE_TOLERANCE_FRAMES = 1e-6


FRAME_LABEL_RULES = ("half", "any")


@dataclass(frozen=True)
class FrameGrid:
    hop_seconds: float  # length of one encoder frame
    num_frames: int  # T, frames per clip
    rule: str = "half"  # which frames a segment makes active (see the module docstring)

    def __post_init__(self) -> None:
        if self.rule not in FRAME_LABEL_RULES:
            raise ValueError(f"data.frame_label_rule must be one of {FRAME_LABEL_RULES}, got {self.rule!r}")

    @classmethod
    def from_audio_config(cls, audio: AudioEncoderConfig, rule: str = "half") -> "FrameGrid":
        return cls(audio.patch_size * FRAME_SHIFT_MS / 1000.0, audio.target_frames // audio.patch_size, rule)

    def frame_range(self, onset: float, offset: float, duration: float) -> range:
        """Frames active for the segment [onset, offset) seconds of a clip `duration` seconds long."""
        onset, offset = max(onset, 0.0), min(offset, duration)
        if offset <= onset:
            return range(0)
        start, stop = onset / self.hop_seconds, offset / self.hop_seconds  # in frames
        first = max(math.floor(start + _EDGE_TOLERANCE_FRAMES), 0)
        end = min(math.ceil(stop - _EDGE_TOLERANCE_FRAMES), self.num_frames)
        if self.rule == "any" or first >= end:
            return range(first, end)

        def covered(frame: int) -> float:  # share of the frame inside the segment
            return min(stop, frame + 1) - max(start, frame)

        low, high = first, end  # frames strictly inside are covered whole: only the ends can fall short
        if covered(low) < 0.5 - _EDGE_TOLERANCE_FRAMES:
            low += 1
        if high - 1 >= low and covered(high - 1) < 0.5 - _EDGE_TOLERANCE_FRAMES:
            high -= 1
        if low < high:
            return range(low, high)
        most = max(range(first, end), key=lambda frame: (covered(frame), -frame))
        return range(most, most + 1)

    def mask(self, segments: Iterable[tuple[float, float]], duration: float) -> torch.Tensor:
        """[T] bool, True at frames any segment is active in."""
        active = torch.zeros(self.num_frames, dtype=torch.bool)
        for onset, offset in segments:
            frames = self.frame_range(onset, offset, duration)
            active[frames.start : frames.stop] = True
        return active
