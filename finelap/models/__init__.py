"""FineLAP model parts: audio encoder, text encoder, projectors, the full model, and how a new one is
built (`build_model`) or EAT's audio encoder loaded (`load_eat_audio_encoder`).

Names are re-exported lazily (PEP 562) so that importing `finelap.models.outputs`
alone, as the loss does, does not pull in transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AudioEncoder": "finelap.models.audio_encoder",
    "TextEncoder": "finelap.models.text_encoder",
    "GlobalProjector": "finelap.models.projectors",
    "LocalProjector": "finelap.models.projectors",
    "FineLAP": "finelap.models.finelap",
    "ModelFolderError": "finelap.models.finelap",
    "load_model_config": "finelap.models.finelap",
    "build_model": "finelap.models.factory",
    "load_eat_audio_encoder": "finelap.models.eat_weights",
    "FineLAPOutput": "finelap.models.outputs",
    "CheckpointError": "finelap.models.checkpoint_files",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finelap.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
