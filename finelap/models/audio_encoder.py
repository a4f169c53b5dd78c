"""EAT-style audio encoder: a ViT over square patches of the normalised log-mel image.

The input image is [target_frames (time, 10 ms per row), num_mel_bins]; patches of
patch_size x patch_size tile it into a grid of T time columns x Fq frequency rows
(64 x 8 for the reference 1024 x 128 image with 16 x 16 patches). A fixed 2-D sin-cos
position embedding is added to the patches, a learned CLS token is prepended, and
Transformer blocks follow. Frame tokens are the mean over the Fq frequency patches of each
time column, so frame t covers fbank frames [t * patch_size, (t + 1) * patch_size).

The config picks the variant: FineLAP's own (the defaults: pre-norm blocks, a final LayerNorm,
time index in the first half of the position channels) or EAT's (post-norm blocks, a LayerNorm
over the embedded tokens, no final one, eps 1e-6, frequency index first, the position table
kept in the weights), so that EAT's pretrained weights load unchanged (finelap.models.eat_weights).
A stored table may be longer than the image needs (EAT's covers 768 time columns, about 2 minutes):
it is kept whole and a forward adds its first T * Fq rows, so target_frames can be raised up to it.

Like the reference, attention is not masked: the padding after a short clip is part of
the image and every token attends to it. Only the frame validity mask records where the
real audio ends, for the loss and for inference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from finelap.audio.fbank import FRAME_SHIFT_MS
from finelap.config import AudioEncoderConfig

ATTENTION_IMPLS = ("sdpa", "explicit")
BLOCK_NORMS = ("pre", "post")
POSITION_LAYOUTS = ("time_first", "freq_first")


def sincos_position_embedding_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] float32: sin of dim/2 geometric frequencies, then cos of the same."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(torch.float32)


def sincos_position_embedding_2d(
    dim: int, time_steps: int, freq_steps: int, layout: str = "time_first"
) -> torch.Tensor:
    """[time_steps * freq_steps, dim] float32 fixed embedding, patches in time-major order.

    layout "time_first": the first half of the channels encodes the time index, the second half
    the frequency index; "freq_first" (EAT's): the other way round.
    """
    if layout not in POSITION_LAYOUTS:
        raise ValueError(f"position_layout must be one of {POSITION_LAYOUTS}, got {layout!r}")
    time_index = torch.arange(time_steps).repeat_interleave(freq_steps)
    freq_index = torch.arange(freq_steps).repeat(time_steps)
    halves = [sincos_position_embedding_1d(dim // 2, time_index), sincos_position_embedding_1d(dim // 2, freq_index)]
    if layout == "freq_first":
        halves.reverse()
    return torch.cat(halves, dim=1)


class Attention(nn.Module):
    """Multi-head self-attention; `attention_impl` picks the fused SDPA path or the explicit one."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, attention_impl: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"audio width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.attention_impl = attention_impl
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(dropout)

    @property
    def attention_impl(self) -> str:
        return self._attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        if value not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {value!r}")
        self._attention_impl = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, W] -> [B, N, W]."""
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each [B, heads, N, head_dim]
        dropout = self.dropout if self.training else 0.0
        if self.attention_impl == "sdpa":
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        else:
            weights = (query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])).softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ value
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj_dropout(self.proj(out))


class Block(nn.Module):
    """Transformer block with a GELU MLP. norm "pre": x + attn(LN1(x)), then x + MLP(LN2(x));
    "post" (EAT's): LN1(x + attn(x)), then LN2(x + MLP(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, norm: str = "pre",
                 eps: float = 1e-5):
        super().__init__()
        if norm not in BLOCK_NORMS:
            raise ValueError(f"block_norm must be one of {BLOCK_NORMS}, got {norm!r}")
        hidden = int(width * mlp_ratio)
        self.pre_norm = norm == "pre"
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class AudioEncoder(nn.Module):
    """ViT over [B, target_frames, num_mel_bins] features -> CLS vector, frame tokens, frame mask."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        patch = config.patch_size
        if config.target_frames % patch or config.num_mel_bins % patch:
            raise ValueError(
                f"target_frames {config.target_frames} and num_mel_bins {config.num_mel_bins} "
                f"must be multiples of patch_size {patch}"
            )
        if config.width % 4:
            raise ValueError(f"audio width {config.width} must be a multiple of 4 (2-D sin-cos position embedding)")
        self.config = config
        self.time_patches = config.target_frames // patch
        self.freq_patches = config.num_mel_bins // patch
        self.patch_embed = nn.Conv2d(1, config.width, kernel_size=patch, stride=patch)
        self.register_buffer(
            "pos_embed",  # [T * Fq, W]; a stored one may hold more rows (hold_position_table)
            sincos_position_embedding_2d(config.width, self.time_patches, self.freq_patches, config.position_layout),
            # fixed: rebuilt from the config, unless the weights carry the table (stored_positions)
            persistent=config.stored_positions,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        nn.init.normal_(self.cls_token, std=0.02)
        eps = config.norm_eps
        self.embedding_norm = nn.LayerNorm(config.width, eps=eps) if config.embedding_norm else None
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio, config.dropout, config.block_norm, eps)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width, eps=eps) if config.final_norm else None

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def num_frames(self) -> int:
        """T: frame tokens per clip (time columns of patches)."""
        return self.time_patches

    @property
    def frame_hop_seconds(self) -> float:
        """Seconds between consecutive frame tokens: patch_size fbank frames of 10 ms."""
        return self.config.patch_size * FRAME_SHIFT_MS / 1000.0

    def hold_position_table(self, rows: int) -> None:
        """Make room for a stored position table of `rows` time-major rows (at least T * Fq), so that it
        loads whole; a forward adds its first T * Fq rows. ValueError when `rows` is too few."""
        needed = self.time_patches * self.freq_patches
        if rows < needed:
            raise ValueError(
                f"the stored position table has {rows} rows ({rows // self.freq_patches} time columns of "
                f"{self.config.patch_size} fbank frames), fewer than the {needed} that target_frames "
                f"{self.config.target_frames} needs"
            )
        self.pos_embed = self.pos_embed.new_empty(rows, self.width)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """As nn.Module's, but a stored position table longer than T * Fq rows is taken whole."""
        table = state_dict.get(prefix + "pos_embed")
        if self.config.stored_positions and table is not None and table.dim() == 2:
            try:
                self.hold_position_table(table.shape[0])
            except ValueError as error:
                error_msgs.append(f"{prefix}pos_embed: {error}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def set_attention_impl(self, attention_impl: str) -> None:
        """Switch every block between "sdpa" and the explicit softmax(QK^T / sqrt(d)) V path."""
        for block in self.blocks:
            block.attn.attention_impl = attention_impl

    def frame_mask(self, frame_counts: torch.Tensor) -> torch.Tensor:
        """[B] real fbank frames -> [B, T] bool: frame t is valid iff its column starts inside the real audio."""
        starts = torch.arange(self.time_patches, device=frame_counts.device) * self.config.patch_size
        return starts[None, :] < frame_counts[:, None]

    def forward(
        self, features: torch.Tensor, frame_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features: [B, target_frames, num_mel_bins] normalised log-mel; frame_counts: [B] int64 real fbank frames.

        Returns (cls [B, W], frame_tokens [B, T, W], frame_mask [B, T] bool).
        """
        expected = (self.config.target_frames, self.config.num_mel_bins)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(f"features must be [B, {expected[0]}, {expected[1]}], got {tuple(features.shape)}")
        patches = self.patch_embed(features.unsqueeze(1))  # [B, W, T, Fq]
        positions = self.pos_embed[: self.time_patches * self.freq_patches].to(patches.dtype)
        patches = patches.flatten(2).transpose(1, 2) + positions  # [B, T * Fq, W], time-major
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype), patches], dim=1)
        if self.embedding_norm is not None:
            tokens = self.embedding_norm(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        if self.norm is not None:
            tokens = self.norm(tokens)
        batch, _, width = tokens.shape
        frame_tokens = tokens[:, 1:].reshape(batch, self.time_patches, self.freq_patches, width).mean(dim=2)
        return tokens[:, 0], frame_tokens, self.frame_mask(frame_counts.to(features.device))
