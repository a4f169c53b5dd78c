"""Kaldi-compatible log-mel filterbank, batched, on any device.

`kaldi_fbank` equals `torchaudio.compliance.kaldi.fbank` applied to each clip
with the options of the reference model (htk_compat, 'hanning' window,
25 ms / 10 ms, dither 0, no energy, snip_edges) after removing the clip's
mean, but frames a whole batch at once: one strided view, one batched FFT,
one mel matmul (on CPU per group of ~16k frames, to stay in cache). `pad_or_crop_frames` and `normalize_fbank` are the reference's
later steps, kept separate; `compute_features` chains the three.
"""
from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import torch
from torchaudio.compliance import kaldi

if TYPE_CHECKING:
    from finelap.config import AudioEncoderConfig

FBANK_MEAN = -4.268  # normalisation constants of the reference (AudioSet statistics)
FBANK_STD = 4.569
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0  # Kaldi default lower edge of the first mel bin
_CPU_FRAMES_PER_GROUP = 16384


def frame_geometry(sample_rate: int) -> tuple[int, int, int]:
    """(window size, window shift, padded FFT size) in samples, computed exactly as Kaldi/torchaudio does."""
    window_shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
    window_size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
    fft_size = 1 << (window_size - 1).bit_length()  # next power of two
    return window_size, window_shift, fft_size


def num_frames(lengths: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """[B] int64 number of fbank frames of clips of `lengths` samples (snip_edges: whole windows only)."""
    window_size, window_shift, _ = frame_geometry(sample_rate)
    return torch.where(lengths >= window_size, 1 + (lengths - window_size).div(window_shift, rounding_mode="floor"), 0)


@functools.lru_cache(maxsize=16)
def _mel_matrix(num_mel_bins: int, fft_size: int, sample_rate: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """[2 * (fft_size // 2 + 1), num_mel_bins] triangular mel weights (torchaudio's definition)."""
    # high_freq 0 (= Nyquist); VTLN arguments at fbank's defaults with warp factor 1 (no warping)
    banks, _ = kaldi.get_mel_banks(num_mel_bins, fft_size, float(sample_rate), LOW_FREQ_HZ, 0.0, 100.0, -500.0, 1.0)
    banks = torch.nn.functional.pad(banks, (0, 1))  # the Nyquist bin gets no weight, as in Kaldi
    # Each FFT bin's row is repeated for its real and imaginary parts: power @ matrix sums both squares.
    return banks.T.repeat_interleave(2, dim=0).contiguous().to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _window(window_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[window_size] symmetric Hann window (Kaldi's 'hanning')."""
    return torch.hann_window(window_size, periodic=False, dtype=dtype, device=device)


def kaldi_fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    precision: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel fbank of a batch of clips.

    waveforms: [B, S] float, samples past `lengths[b]` are ignored.
    lengths: [B] int64 true lengths in samples (None: all S); each at least one 25 ms window.
    Returns (features [B, F, num_mel_bins] float32 natural-log mel energies with F the frame
    count of the longest clip, frames past a clip's own count set to 0; frame_counts [B] int64).

    precision: the arithmetic dtype (None: float32 on CPU, float64 on CUDA). In float32 the CPU
    path repeats torchaudio's operations in its order and matches it to ~1e-6. The low mel bins,
    damped by pre-emphasis, hold tiny energies whose log amplifies FFT rounding: torchaudio's own
    float32 result is up to ~6e-3 from the exact (float64) value there, and cuFFT rounds
    differently from the CPU FFT (measured on an H100 in float32: up to 2e-2 from torchaudio).
    On CUDA we therefore compute in float64, which lands on the exact value; the output is float32.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be [B, S], got shape {tuple(waveforms.shape)}")
    batch_size, num_samples = waveforms.shape
    if batch_size == 0:
        raise ValueError("kaldi_fbank needs at least one clip, got an empty batch")
    device = waveforms.device
    if lengths is None:
        lengths = torch.full((batch_size,), num_samples, dtype=torch.int64, device=device)
    lengths = lengths.to(device=device, dtype=torch.int64)
    window_size, window_shift, fft_size = frame_geometry(sample_rate)
    frame_counts = num_frames(lengths, sample_rate)
    if bool(((lengths < window_size) | (lengths > num_samples)).any()):
        raise ValueError(
            f"every length must be in [{window_size}, {num_samples}] samples (one {FRAME_LENGTH_MS:g} ms window "
            f"at {sample_rate} Hz, the padded width); got lengths {lengths.tolist()}"
        )
    max_frames = int(frame_counts.max())

    dtype = precision or (torch.float64 if device.type == "cuda" else torch.float32)
    waveforms = waveforms.to(dtype)
    # The reference centres each clip on its own mean; taking it clip by clip, like the
    # reference, keeps its rounding (the low mel bins are sensitive to it, see _log_mel).
    clip_mean = torch.stack([clip[:length].mean() for clip, length in zip(waveforms, lengths.tolist())])[:, None]
    used_samples = (max_frames - 1) * window_shift + window_size
    # On CPU, groups of ~16k frames keep the FFT's working set in cache (measured ~1.5x
    # faster than one group of 64 x 10 s); on CUDA the whole batch is one group.
    clips_per_group = batch_size if device.type == "cuda" else max(1, _CPU_FRAMES_PER_GROUP // max(max_frames, 1))
    features = torch.empty(batch_size, max_frames, num_mel_bins, dtype=torch.float32, device=device)
    with torch.autocast(device.type, enabled=False), _full_float32_matmul():
        for start in range(0, batch_size, clips_per_group):
            group = slice(start, start + clips_per_group)
            centred = waveforms[group, :used_samples] - clip_mean[group]
            features[group] = _log_mel(centred, sample_rate, num_mel_bins).to(torch.float32)
    frame_valid = torch.arange(max_frames, device=device)[None, :] < frame_counts[:, None]
    features.masked_fill_(~frame_valid[..., None], 0.0)
    return features, frame_counts


@contextlib.contextmanager
def _full_float32_matmul():
    """IEEE float32 matmuls inside: a training script may have set
    torch.set_float32_matmul_precision('high'), which lets the mel matmul run in TF32 / bf16."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _log_mel(waveforms: torch.Tensor, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    """[B, S] centred clips (float32 or float64) -> [B, F, num_mel_bins] log-mel of every whole window.

    The arithmetic follows torchaudio's order step by step (frame DC removal, then
    0.97 * previous sample subtracted, then the window) so that rounding matches it:
    low mel bins, damped by pre-emphasis, are sensitive to the order of float32 operations.
    """
    window_size, window_shift, fft_size = frame_geometry(sample_rate)
    frames = waveforms.unfold(1, window_size, window_shift)  # [B, F, W] strided view
    frames = frames - frames.mean(dim=2, keepdim=True)  # per-frame DC removal
    padded = torch.empty(*frames.shape[:2], fft_size, dtype=waveforms.dtype, device=waveforms.device)
    # Column 0 (x0 - 0.97 x0, first sample replicated) meets the window's 0 at its first
    # tap, and columns past the window are the FFT's zero padding.
    padded[..., 0] = 0.0
    padded[..., window_size:] = 0.0
    emphasised = padded[..., 1:window_size]
    torch.mul(frames[..., :-1], PREEMPHASIS, out=emphasised)
    torch.sub(frames[..., 1:], emphasised, out=emphasised)
    emphasised.mul_(_window(window_size, waveforms.device, waveforms.dtype)[1:])
    spectrum = torch.view_as_real(torch.fft.rfft(padded))  # [B, F, fft_size // 2 + 1, 2]
    power = spectrum.square().flatten(-2)  # re^2, im^2 interleaved; the mel matrix sums the pairs
    mel_energies = power @ _mel_matrix(num_mel_bins, fft_size, sample_rate, waveforms.device, waveforms.dtype)
    # Kaldi's floor is float32 epsilon whatever the arithmetic dtype
    return mel_energies.clamp_min_(torch.finfo(torch.float32).eps).log_()


def normalize_fbank(features: torch.Tensor) -> torch.Tensor:
    """The reference normalisation (x - mean) / (2 std) with its AudioSet constants; any shape."""
    return (features - FBANK_MEAN) / (FBANK_STD * 2)


def pad_or_crop_frames(
    features: torch.Tensor, frame_counts: torch.Tensor, target_frames: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad or crop the frame axis of [B, F, M] features to [B, target_frames, M].

    Returns the features and frame_counts clipped to target_frames. The reference pads the
    raw (unnormalised) fbank with zeros and normalises afterwards, so call this before
    `normalize_fbank` to get its padding value.
    """
    num_frames_now = features.shape[1]
    if num_frames_now >= target_frames:
        features = features[:, :target_frames]
    else:
        features = torch.nn.functional.pad(features, (0, 0, 0, target_frames - num_frames_now))
    return features.contiguous(), frame_counts.clamp_max(target_frames)


def compute_features(
    waveforms: torch.Tensor, lengths: torch.Tensor | None, audio_config: AudioEncoderConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms [B, S] -> (encoder input [B, target_frames, num_mel_bins] float32, frame_counts [B] int64).

    fbank, then zero padding/cropping of the raw log-mel frames, then normalisation: the
    reference's order, so padded frames hold normalize_fbank(0) exactly as in the reference.
    """
    features, frame_counts = kaldi_fbank(waveforms, lengths, audio_config.sample_rate, audio_config.num_mel_bins)
    features, frame_counts = pad_or_crop_frames(features, frame_counts, audio_config.target_frames)
    return normalize_fbank(features), frame_counts
