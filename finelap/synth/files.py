"""Atomic writes: a killed run leaves either the previous file or the complete new one, never half of one."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_wav_atomic(path: str | Path, samples: np.ndarray, sample_rate: int, subtype: str) -> None:
    """Write [S] samples as a mono WAV of `subtype` (PCM_16, PCM_24, PCM_32).

    Encoded in memory and written with one call (half the time of letting
    libsndfile write to the file). Float WAVs are not offered: libsndfile
    stamps them with the time of writing (PEAK chunk), so outputs would
    differ from run to run.
    """
    encoded = io.BytesIO()
    soundfile.write(encoded, np.asarray(samples, dtype=np.float32), sample_rate, subtype=subtype, format="WAV")
    write_bytes_atomic(path, encoded.getvalue())
