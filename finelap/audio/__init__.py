"""Audio front end: decoding (soundfile or DALI), resampling, batched Kaldi fbank.

The names below load their module on first use, so that importing the feature code
(`finelap.audio.fbank`, needed by the model) does not require soundfile or DALI: a
machine with only torch can build features and run the model.
"""
import importlib

_MODULE_OF = {
    "AudioLoadError": "finelap.audio.io",
    "load_audio": "finelap.audio.io",
    "load_audio_bytes": "finelap.audio.io",
    "compute_features": "finelap.audio.fbank",
    "kaldi_fbank": "finelap.audio.fbank",
    "normalize_fbank": "finelap.audio.fbank",
    "num_frames": "finelap.audio.fbank",
    "pad_or_crop_frames": "finelap.audio.fbank",
    "DaliAudioLoader": "finelap.audio.dali",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'finelap.audio' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
