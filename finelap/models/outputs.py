"""What the FineLAP model's forward pass returns; the loss and inference read it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FineLAPOutput:
    """All embeddings are L2-normalised in the joint space of width E."""

    clip_embeddings: torch.Tensor  # [B, E] global audio embedding per clip
    frame_embeddings: torch.Tensor  # [B, T, E] local audio embedding per frame
    frame_mask: torch.Tensor  # [B, T] bool, True where the frame lies inside the real audio
    caption_embeddings: torch.Tensor  # [Nc, E] global text embedding per caption
    phrase_embeddings: torch.Tensor  # [P, E] global text embedding per phrase
    clip_scale: torch.Tensor  # 0-d, 1 / temperature of the clip stream
    clip_bias: torch.Tensor  # 0-d, logit bias of the clip stream
    frame_scale: torch.Tensor  # 0-d, 1 / temperature of the frame stream
    frame_bias: torch.Tensor  # 0-d, logit bias of the frame stream
    frame_hop_seconds: float  # seconds between consecutive frames
    padded_text_tokens: int  # token positions the text tower ran through, padding included (throughput)
