"""Decoupled projectors into the joint space; every output is L2-normalised.

GlobalProjector maps one vector per item (audio CLS token, pooled text) with
Linear-ReLU-Linear. LocalProjector maps the audio frame tokens, one embedding per
frame, with a Linear followed by a small Transformer ("transformer"), a
bidirectional GRU ("gru") or nothing more ("linear"). As in the reference, the
local Transformer attends over all frames of the clip, padding included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finelap.config import ProjectorConfig

LOCAL_TYPES = ("transformer", "gru", "linear")


class GlobalProjector(nn.Module):
    """[..., in_dim] -> [..., embed_dim] float, L2-normalised."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class LocalProjector(nn.Module):
    """Frame tokens [B, T, in_dim] -> frame embeddings [B, T, embed_dim] float, L2-normalised."""

    def __init__(self, in_dim: int, config: ProjectorConfig):
        super().__init__()
        if config.local_type not in LOCAL_TYPES:
            raise ValueError(f"projector.local_type must be one of {LOCAL_TYPES}, got {config.local_type!r}")
        embed_dim = config.embed_dim
        self.local_type = config.local_type
        self.linear = nn.Linear(in_dim, embed_dim)
        self.context: nn.Module | None = None
        if config.local_type == "transformer":
            layer = nn.TransformerEncoderLayer(
                embed_dim,
                config.local_heads,
                config.local_ffn_dim,
                config.local_dropout,
                activation="relu",
                batch_first=True,
            )
            self.context = nn.TransformerEncoder(layer, config.local_layers, enable_nested_tensor=False)
        elif config.local_type == "gru":
            if embed_dim % 2:
                raise ValueError(f"projector.embed_dim {embed_dim} must be even for the bidirectional GRU")
            self.context = nn.GRU(embed_dim, embed_dim // 2, batch_first=True, bidirectional=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.linear(frames)
        if self.local_type == "transformer":
            x = self.context(x)
        elif self.local_type == "gru":
            x, _ = self.context(x)  # forward and backward halves concatenated: [B, T, embed_dim]
        return F.normalize(x, dim=-1)
