"""Build a new FineLAP from its config and a seed: the weights a training run starts from, which
`finelap export --untrained` also writes (the demo's untrained baseline)."""
from __future__ import annotations

import torch

from finelap.config import ModelConfig
from finelap.models.eat_weights import init_audio_encoder
from finelap.models.finelap import FineLAP


def build_model(config: ModelConfig, seed: int, load_init_from: bool = True) -> FineLAP:
    """The model a training run with this `model:` config and `train.seed` starts from.

    Built right after torch.manual_seed(seed), so every rank and every call with the same config and
    seed gets the same weights: random audio tower and projectors, the pretrained text tower of
    config.text.path, and the audio tower loaded from config.audio.init_from when it is set and
    `load_init_from` is true (a resumed run takes every weight from its checkpoint instead).
    """
    torch.manual_seed(seed)
    model = FineLAP(config)
    if load_init_from and config.audio.init_from:
        init_audio_encoder(model.audio_encoder, config.audio.init_from)
    return model
