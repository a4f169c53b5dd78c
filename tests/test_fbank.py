"""Batched Kaldi fbank against torchaudio.compliance.kaldi.fbank run clip by clip."""
import math

import pytest
import torch
import torchaudio

from finelap.audio.fbank import (
    FBANK_MEAN,
    FBANK_STD,
    compute_features,
    kaldi_fbank,
    normalize_fbank,
    num_frames,
    pad_or_crop_frames,
)
from finelap.config import AudioEncoderConfig

TOLERANCE = 1e-3  # max abs difference in the log domain


def reference_fbank(clip: torch.Tensor, sample_rate: int, num_mel_bins: int = 128) -> torch.Tensor:
    """The reference model's feature extraction for one clip: [S] -> [F, num_mel_bins]."""
    clip = clip - clip.mean()
    return torchaudio.compliance.kaldi.fbank(
        clip[None],
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=10,
        frame_length=25,
    )


def reference_encoder_input(clip: torch.Tensor, target_frames: int) -> torch.Tensor:
    """Reference chain for one clip: fbank, ZeroPad2d / crop to target_frames, then normalise."""
    fbank = reference_fbank(clip, 16000)
    missing = target_frames - fbank.shape[0]
    if missing > 0:
        fbank = torch.nn.ZeroPad2d((0, 0, 0, missing))(fbank)
    else:
        fbank = fbank[:target_frames]
    return (fbank - (-4.268)) / (4.569 * 2)


def audio_like(batch: int, num_samples: int, sample_rate: int, seed: int) -> torch.Tensor:
    """[batch, num_samples] noise plus a few tones and a DC offset, amplitude like real recordings."""
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(num_samples) / sample_rate
    noise = 0.05 * torch.randn(batch, num_samples, generator=generator)
    frequencies = torch.rand(batch, 3, 1, generator=generator) * (sample_rate / 2 - 100) + 50
    tones = 0.2 * torch.sin(2 * math.pi * frequencies * time).sum(dim=1)
    return noise + tones + 0.01


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050])
def test_batched_fbank_matches_torchaudio_per_clip(sample_rate):
    window = int(sample_rate * 0.025)
    shift = int(sample_rate * 0.010)
    # one window exactly, lengths that are not multiples of the hop, and a 10 s clip
    lengths = [window, window + shift - 1, 3 * shift + window + 7, int(1.37 * sample_rate), 10 * sample_rate]
    waveforms = audio_like(len(lengths), max(lengths), sample_rate, seed=sample_rate)
    features, frame_counts = kaldi_fbank(waveforms, torch.tensor(lengths), sample_rate=sample_rate)

    assert features.dtype == torch.float32
    assert features.shape == (len(lengths), 1 + (max(lengths) - window) // shift, 128)
    for row, length in enumerate(lengths):
        expected = reference_fbank(waveforms[row, :length], sample_rate)
        assert frame_counts[row] == expected.shape[0] == 1 + (length - window) // shift
        got = features[row, : frame_counts[row]]
        assert (got - expected).abs().max() <= TOLERANCE
        assert torch.all(features[row, frame_counts[row] :] == 0)


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050])
def test_float64_path_matches_torchaudio_in_float64(sample_rate):
    """The arithmetic CUDA uses (float64) is the exact Kaldi fbank: torchaudio run on float64 clips."""
    lengths = [int(0.7 * sample_rate), 3 * sample_rate]
    waveforms = audio_like(len(lengths), max(lengths), sample_rate, seed=7)
    features, frame_counts = kaldi_fbank(waveforms, torch.tensor(lengths), sample_rate=sample_rate,
                                         precision=torch.float64)
    assert features.dtype == torch.float32
    for row, length in enumerate(lengths):
        exact = reference_fbank(waveforms[row, :length].double(), sample_rate)
        assert exact.dtype == torch.float64
        assert (features[row, : frame_counts[row]].double() - exact).abs().max() <= 1e-5


def test_samples_past_length_do_not_change_features():
    clean = audio_like(2, 8000, 16000, seed=1)
    lengths = torch.tensor([5000, 8000])
    noisy = clean.clone()
    noisy[0, 5000:] = 100.0  # garbage in the padding region of clip 0
    features_clean, _ = kaldi_fbank(clean, lengths)
    features_noisy, _ = kaldi_fbank(noisy, lengths)
    assert torch.equal(features_clean, features_noisy)


def test_full_length_default_and_num_mel_bins():
    waveforms = audio_like(3, 4321, 16000, seed=2)
    features, frame_counts = kaldi_fbank(waveforms, num_mel_bins=64)
    assert frame_counts.tolist() == [1 + (4321 - 400) // 160] * 3
    for row in range(3):
        expected = reference_fbank(waveforms[row], 16000, num_mel_bins=64)
        assert (features[row] - expected).abs().max() <= TOLERANCE


def test_mixed_lengths_in_a_large_batch_match_per_clip():
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(400, 40000, (24,), generator=generator)
    waveforms = audio_like(24, int(lengths.max()), 16000, seed=3)
    features, frame_counts = kaldi_fbank(waveforms, lengths)
    assert torch.equal(frame_counts, num_frames(lengths))
    worst = max(
        float((features[row, : frame_counts[row]] - reference_fbank(waveforms[row, :length], 16000)).abs().max())
        for row, length in enumerate(lengths.tolist())
    )
    assert worst <= TOLERANCE


def test_too_short_or_too_long_lengths_are_rejected():
    waveforms = torch.zeros(2, 1000)
    with pytest.raises(ValueError, match=r"\[400, 1000\].*399"):
        kaldi_fbank(waveforms, torch.tensor([399, 1000]))
    with pytest.raises(ValueError, match="1001"):
        kaldi_fbank(waveforms, torch.tensor([1001, 1000]))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        kaldi_fbank(torch.zeros(1000))


def test_pad_or_crop_frames():
    features = torch.randn(2, 5, 3)
    padded, counts = pad_or_crop_frames(features, torch.tensor([5, 2]), target_frames=8)
    assert padded.shape == (2, 8, 3)
    assert torch.equal(padded[:, :5], features) and torch.all(padded[:, 5:] == 0)
    assert counts.tolist() == [5, 2]
    cropped, counts = pad_or_crop_frames(features, torch.tensor([5, 2]), target_frames=4)
    assert torch.equal(cropped, features[:, :4])
    assert counts.tolist() == [4, 2]


def test_normalize_fbank_constants():
    features = torch.tensor([[-4.268, 0.0, 4.869]])
    expected = torch.tensor([[0.0, 4.268 / 9.138, 9.137 / 9.138]])
    assert torch.allclose(normalize_fbank(features), expected)
    assert (FBANK_MEAN, FBANK_STD) == (-4.268, 4.569)


def test_compute_features_matches_reference_chain_with_padding_and_cropping():
    config = AudioEncoderConfig(target_frames=64)
    lengths = torch.tensor([16000, 3000, 10250])  # 98 frames (cropped), 17 and 62 frames (padded)
    waveforms = audio_like(3, 16000, 16000, seed=4)
    features, frame_counts = compute_features(waveforms, lengths, config)
    assert features.shape == (3, 64, 128)
    assert frame_counts.tolist() == [64, 17, 62]
    for row, length in enumerate(lengths.tolist()):
        expected = reference_encoder_input(waveforms[row, :length], target_frames=64)
        assert (features[row] - expected).abs().max() <= TOLERANCE / (2 * 4.569)
    # padded frames hold the normalised value of a raw 0, as in the reference
    assert torch.allclose(features[1, 17:], torch.full((47, 128), 4.268 / 9.138))


def test_reduced_precision_settings_do_not_apply_inside():
    """A training script's TF32 / autocast settings must not leak into the features."""
    waveforms = audio_like(2, 6000, 16000, seed=5)
    expected, _ = kaldi_fbank(waveforms)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features, _ = kaldi_fbank(waveforms)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert features.dtype == torch.float32 and torch.equal(features, expected)
