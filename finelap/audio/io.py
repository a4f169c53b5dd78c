"""Reading audio: soundfile decode, downmix to mono, resample, crop.

Every failure raises `AudioLoadError` naming the file and what is wrong;
a file that cannot be read is never replaced by silence.
"""
from __future__ import annotations

import functools
import io
import math
import re
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.transforms

MIN_SECONDS = 0.1  # shorter files are rejected: too short for even a few 25 ms fbank frames
# Extra input read past the crop point so that the resampler's filter (a few
# periods of the lower rate wide) sees the same samples as when resampling
# the whole file: the kept output samples are then identical.
_RESAMPLE_MARGIN_SECONDS = 0.1
# libsndfile logs "data : <declared bytes> (should be <bytes present>)" for a
# WAV whose data chunk runs past the end of the file, then reads what is there.
_SHORT_CHUNK = re.compile(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)")
_UNKNOWN_CHUNK_SIZES = {0, 0xFFFFFFFF}  # written by streaming encoders that did not know the length
# For MP3, libsndfile's frame count is an estimate, not a length stored in the file: without a
# Xing/Info header it is computed from the file size (a tag or other bytes after the last audio
# frame count as audio), and encoder delay and padding are guessed. Files that play in full
# decode one to two MPEG frames short of it (seen at 44.1 kHz: 1152 and 2320 samples). A
# shortfall of up to three MPEG frames is accepted and the samples decoded are used; a cut file
# falls further short (a 2 s file cut to half its bytes: 45000 samples at 44.1 kHz).
_MPEG_ESTIMATE_FRAMES = 3


class AudioLoadError(ValueError):
    """An audio file is missing, unreadable or unusable; the message names the file.

    `reason` says what is wrong as data (the skip counters' key, e.g. "audio_truncated"),
    so nobody has to read it out of the message, which starts with a file path.
    """

    REASONS = ("audio_missing", "audio_empty", "audio_unreadable", "audio_truncated", "audio_too_short",
               "audio_nonfinite")

    def __init__(self, message: str, reason: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown audio failure reason {reason!r}; one of {self.REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # DataLoader workers send it to the main process pickled
        return type(self), (str(self), self.reason)


def load_audio(
    path: str | Path, sample_rate: int = 16000, max_seconds: float | None = 10.0
) -> tuple[torch.Tensor, int]:
    """Read an audio file of any format soundfile knows, any rate and channel count.

    Returns (waveform [S] float32 mono at `sample_rate`, true length S in samples),
    cropped to the first `max_seconds` (None: whole file).
    """
    path = _existing_file(path)
    return _load(path, str(path), sample_rate, max_seconds)


def load_audio_bytes(
    data: bytes, name: str, sample_rate: int = 16000, max_seconds: float | None = 10.0
) -> tuple[torch.Tensor, int]:
    """`load_audio` for encoded bytes held in memory (e.g. a tar member); `name` is used in errors."""
    if len(data) == 0:
        raise AudioLoadError(f"{name}: audio file is empty (0 bytes)", "audio_empty")
    return _load(io.BytesIO(data), name, sample_rate, max_seconds)


def audio_seconds(path: str | Path) -> float:
    """Seconds of audio the whole file decodes to, after every check `load_audio` makes.

    For checking a file: it decodes at the file's own rate (no resampling) and fails,
    naming the file, exactly where `load_audio` would.
    """
    path = _existing_file(path)
    samples, original_rate = _decode(path, str(path), None)
    return samples.shape[0] / original_rate


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"{path}: audio file not found", "audio_missing")
    if path.stat().st_size == 0:
        raise AudioLoadError(f"{path}: audio file is empty (0 bytes)", "audio_empty")
    return path


def _load(source, name: str, sample_rate: int, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    samples, original_rate = _decode(source, name, max_seconds)
    # Downmix: average of the channels, summed column by column (a strided reduction over
    # the interleaved channel axis is several times slower).
    waveform = torch.from_numpy(samples[:, 0].copy())
    for channel in range(1, samples.shape[1]):
        waveform += torch.from_numpy(samples[:, channel])
    if samples.shape[1] > 1:
        waveform /= samples.shape[1]
    if original_rate != sample_rate:
        waveform = _resampler(original_rate, sample_rate)(waveform)
    if max_seconds is not None:
        waveform = waveform[: int(round(max_seconds * sample_rate))]
    waveform = waveform.contiguous()
    return waveform, int(waveform.shape[0])


def _decode(source, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(samples [frames, channels] float32 at the file's rate, that rate): the first `max_seconds`
    plus the resampling margin (None: the whole file), checked for truncation, length and NaN/Inf."""
    try:
        with soundfile.SoundFile(source) as audio_file:
            declared_frames = audio_file.frames
            original_rate = audio_file.samplerate
            _check_wav_chunk(audio_file.extra_info, name)
            tolerance = 0
            if audio_file.format == "MP3":
                tolerance = _MPEG_ESTIMATE_FRAMES * _mpeg_frame_samples(audio_file.subtype, original_rate)
            wanted = declared_frames
            if max_seconds is not None:
                wanted = min(wanted, math.ceil((max_seconds + _RESAMPLE_MARGIN_SECONDS) * original_rate))
            samples = audio_file.read(wanted, dtype="float32", always_2d=True)  # [frames, channels]
    except soundfile.LibsndfileError as error:
        # error_string: libsndfile's words without its "Error opening <source>:" (a BytesIO's repr for bytes)
        raise AudioLoadError(f"{name}: cannot decode audio (corrupt or truncated file?): {error.error_string}",
                             "audio_unreadable") from None
    frames = samples.shape[0]
    if frames < wanted:  # the decoder stopped early: `frames` is all the file holds
        if declared_frames - frames > tolerance:
            estimate = f" (more than the {tolerance} tolerated for an MP3's estimated length)" if tolerance else ""
            raise AudioLoadError(
                f"{name}: truncated audio: header declares {declared_frames} frames, only {frames} could be read"
                + estimate,
                "audio_truncated",
            )
    else:
        frames = declared_frames
    if samples.shape[0] == 0:
        raise AudioLoadError(f"{name}: audio has no samples", "audio_empty")
    if frames < MIN_SECONDS * original_rate:
        raise AudioLoadError(
            f"{name}: audio is too short: {frames / original_rate * 1000:.1f} ms < {MIN_SECONDS * 1000:.0f} ms",
            "audio_too_short",
        )
    if not np.isfinite(samples).all():
        bad = ~np.isfinite(samples)
        kind = "NaN" if np.isnan(samples).any() else "Inf"
        raise AudioLoadError(f"{name}: audio contains {kind} samples (first at frame {int(bad.any(axis=1).argmax())})",
                             "audio_nonfinite")
    return samples, original_rate


def _mpeg_frame_samples(subtype: str, sample_rate: int) -> int:
    """Samples per MPEG audio frame: 384 for Layer I; 1152 for Layer II and for Layer III at the
    MPEG-1 rates (32-48 kHz); 576 for Layer III at the MPEG-2 and 2.5 rates (8-24 kHz)."""
    if subtype == "MPEG_LAYER_I":
        return 384
    if subtype == "MPEG_LAYER_III" and sample_rate < 32000:
        return 576
    return 1152


@functools.lru_cache(maxsize=32)
def _resampler(original_rate: int, sample_rate: int) -> torchaudio.transforms.Resample:
    """torchaudio's default sinc resampler with its filter kernel built once per rate pair."""
    return torchaudio.transforms.Resample(original_rate, sample_rate)


def _check_wav_chunk(extra_info: str, name: str) -> None:
    """Raise if libsndfile reports a WAV data chunk longer than the bytes present (a cut file)."""
    match = _SHORT_CHUNK.search(extra_info)
    if match is None:
        return
    declared, present = int(match.group(1)), int(match.group(2))
    if present < declared and declared not in _UNKNOWN_CHUNK_SIZES:
        raise AudioLoadError(
            f"{name}: truncated audio: data chunk declares {declared} bytes, the file holds {present}",
            "audio_truncated",
        )
