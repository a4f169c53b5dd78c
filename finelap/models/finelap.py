"""The FineLAP model: audio and text towers, decoupled projectors, logit parameters.

A model folder (written by `save_pretrained`, read by `from_pretrained`) holds:
  config.yaml          the `model:` config section
  model.safetensors    every weight, the text encoder's included
  text_encoder/        the Hugging Face config.json and tokenizer files of the text tower
The text tower is rebuilt from text_encoder/ (config.text.path is kept for the record only),
so a model folder is self-contained.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from finelap.config import ModelConfig, load_config
from finelap.models.audio_encoder import AudioEncoder
from finelap.models.outputs import FineLAPOutput
from finelap.models.projectors import GlobalProjector, LocalProjector
from finelap.models.text_encoder import TextEncoder

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
TEXT_ENCODER_FILES = ("config.json", "tokenizer_config.json")


class ModelFolderError(ValueError):
    """A model folder is missing a file or holds an unusable one; the message names the file."""


@dataclass
class _ModelFile:
    """A YAML file whose only top-level section is `model:`."""

    model: ModelConfig


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """Read the `model:` section of a YAML file (e.g. configs/model/tiny.yaml); overrides as `model.a.b=value`.

    Unknown keys, wrong types and other top-level sections raise ConfigError naming the key and the file.
    """
    return load_config(path, overrides, section=_ModelFile).model


class FineLAP(nn.Module):
    """Two towers with a global (clip/text) and a local (frame) projection into one E-wide space."""

    def __init__(self, config: ModelConfig, text_folder: str | Path | None = None, load_text_weights: bool = True):
        """text_folder overrides config.text.path; load_text_weights=False leaves the text tower
        randomly initialised (for loading a full state dict afterwards)."""
        super().__init__()
        self.config = config
        embed_dim = config.projector.embed_dim
        self.audio_encoder = AudioEncoder(config.audio)
        self.text_encoder = TextEncoder(config.text, folder=text_folder, load_weights=load_text_weights)
        self.clip_projector = GlobalProjector(self.audio_encoder.width, embed_dim)
        self.frame_projector = LocalProjector(self.audio_encoder.width, config.projector)
        self.text_projector = GlobalProjector(self.text_encoder.hidden_size, embed_dim)
        initial_log_scale = math.log(1.0 / config.init_temperature)
        # Shape [1], not 0-d: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes.
        self.clip_log_scale = nn.Parameter(torch.tensor([initial_log_scale]))
        self.clip_bias = nn.Parameter(torch.tensor([config.init_bias]))
        self.frame_log_scale = nn.Parameter(torch.tensor([initial_log_scale]))
        self.frame_bias = nn.Parameter(torch.tensor([config.init_bias]))

    @property
    def frame_hop_seconds(self) -> float:
        return self.audio_encoder.frame_hop_seconds

    @property
    def embed_dim(self) -> int:
        return self.config.projector.embed_dim

    def logit_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clip_scale, clip_bias, frame_scale, frame_bias), 0-d tensors; logits = scale * cos + bias.

        Computed from copies of the parameters, so that no backward reads a parameter: ZeRO-3
        releases a parameter's storage after the forward pass (in a process's first step even a
        small persistent one's) and does not gather this module's own parameters again for the
        backward, and clamp's backward reads its input (the scales would get no gradient).
        """
        max_log_scale = math.log(self.config.max_logit_scale)
        return (
            self.clip_log_scale[0].clone().clamp(max=max_log_scale).exp(),
            self.clip_bias[0].clone(),
            self.frame_log_scale[0].clone().clamp(max=max_log_scale).exp(),
            self.frame_bias[0].clone(),
        )

    def encode_audio(
        self, features: torch.Tensor, frame_counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features [B, target_frames, mel], frame_counts [B] ->
        (clip [B, E], frames [B, T, E], both L2-normalised; frame_mask [B, T] bool)."""
        cls_token, frame_tokens, frame_mask = self.audio_encoder(features, frame_counts)
        return self.clip_projector(cls_token), self.frame_projector(frame_tokens), frame_mask

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """texts -> [N, E] L2-normalised; one text-encoder call, each distinct string encoded once."""
        hidden, _ = self.text_encoder.encode_unique(texts)
        return self.text_projector(hidden)

    def forward(
        self, features: torch.Tensor, frame_counts: torch.Tensor, captions: list[str], phrases: list[str]
    ) -> FineLAPOutput:
        """features [B, target_frames, mel] normalised log-mel, frame_counts [B] real fbank frames,
        captions (Nc strings), phrases (P strings) -> FineLAPOutput.

        Captions and phrases go through the text encoder together in exactly one call (also when
        either list is empty), so every rank runs it equally often under ZeRO-3.
        """
        clip, frames, frame_mask = self.encode_audio(features, frame_counts)
        hidden, padded_text_tokens = self.text_encoder.encode_unique(list(captions) + list(phrases))
        text = self.text_projector(hidden)
        clip_scale, clip_bias, frame_scale, frame_bias = self.logit_parameters()
        return FineLAPOutput(
            clip_embeddings=clip,
            frame_embeddings=frames,
            frame_mask=frame_mask,
            caption_embeddings=text[: len(captions)],
            phrase_embeddings=text[len(captions):],
            clip_scale=clip_scale,
            clip_bias=clip_bias,
            frame_scale=frame_scale,
            frame_bias=frame_bias,
            frame_hop_seconds=self.frame_hop_seconds,
            padded_text_tokens=padded_text_tokens,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.yaml, model.safetensors and text_encoder/ into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(
            yaml.safe_dump({"model": dataclasses.asdict(self.config)}, sort_keys=False)
        )
        # save_model drops aliases of shared tensors (e.g. tied embeddings) that save_file rejects.
        safetensors.torch.save_model(self, str(directory / WEIGHTS_FILE))
        self.text_encoder.save_pretrained(directory / TEXT_ENCODER_DIR)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> FineLAP:
        """Load a model folder written by `save_pretrained`; the model is returned in eval mode."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelFolderError(f"{directory}: model folder not found")
        text_dir = directory / TEXT_ENCODER_DIR
        required = [directory / CONFIG_FILE, directory / WEIGHTS_FILE] + [text_dir / name for name in TEXT_ENCODER_FILES]
        missing = [str(path) for path in required if not path.is_file()]
        if missing:
            raise ModelFolderError(
                f"{', '.join(missing)}: missing from the model folder (a FineLAP model folder holds "
                f"{CONFIG_FILE}, {WEIGHTS_FILE} and {TEXT_ENCODER_DIR}/ with the Hugging Face config.json "
                "and tokenizer files, as written by FineLAP.save_pretrained)"
            )
        config = load_model_config(directory / CONFIG_FILE)
        try:
            model = cls(config, text_folder=text_dir, load_text_weights=False)
        except (OSError, ValueError) as error:
            raise ModelFolderError(f"cannot build the text encoder from {text_dir}: {error}") from None
        weights_path = directory / WEIGHTS_FILE
        try:
            safetensors.torch.load_model(model, str(weights_path), strict=True)
        except SafetensorError as error:
            raise ModelFolderError(f"{weights_path}: not a readable safetensors file: {error}") from None
        except RuntimeError as error:
            raise ModelFolderError(
                f"{weights_path}: weights do not match the architecture of {directory / CONFIG_FILE}: {error}"
            ) from None
        return model.to(map_location).eval()
