"""load_audio on real files written with soundfile, and every bad-input case."""
import math

import numpy as np
import pytest
import scipy.signal
import soundfile
import torch
import torchaudio

from finelap.audio.io import AudioLoadError, load_audio, load_audio_bytes


def pcm16_exact(frames: int, channels: int, sample_rate: int, seed: int) -> np.ndarray:
    """[frames, channels] float64 tones plus noise, on the 16-bit grid so PCM_16 files store it exactly."""
    rng = np.random.default_rng(seed)
    time = np.arange(frames)[:, None] / sample_rate
    frequencies = np.array([220.0, 440.0, 1000.0, 3000.0, 150.0])[:channels]
    signal = 0.3 * np.sin(2 * np.pi * frequencies * time) + 0.05 * rng.standard_normal((frames, channels))
    return np.round(signal * 32768) / 32768


def expected_waveform(data: np.ndarray, sample_rate: int, max_seconds: float | None) -> torch.Tensor:
    """Independent order of operations: resample each channel of the whole file in float64, then average, then crop."""
    channels = torch.from_numpy(data.T.copy())
    resampled = torchaudio.functional.resample(channels, sample_rate, 16000) if sample_rate != 16000 else channels
    mono = resampled.mean(dim=0)
    return mono if max_seconds is None else mono[: round(max_seconds * 16000)]


@pytest.mark.parametrize(
    "file_format, sample_rate, channels, seconds",
    [
        ("WAV", 44100, 2, 1.5),
        ("FLAC", 44100, 2, 1.5),
        ("WAV", 8000, 1, 2.0),
        ("FLAC", 8000, 1, 0.25),
        ("WAV", 22050, 3, 1.0),
        ("FLAC", 16000, 3, 1.0),
    ],
)
def test_load_audio_resamples_and_downmixes(tmp_path, file_format, sample_rate, channels, seconds):
    data = pcm16_exact(int(seconds * sample_rate), channels, sample_rate, seed=sample_rate + channels)
    path = tmp_path / f"clip.{file_format.lower()}"
    soundfile.write(path, data, sample_rate, format=file_format, subtype="PCM_16")

    waveform, length = load_audio(path)

    expected = expected_waveform(data, sample_rate, None)
    assert waveform.dtype == torch.float32 and waveform.dim() == 1
    assert length == waveform.shape[0] == math.ceil(len(data) * 16000 / sample_rate) == expected.shape[0]
    assert torch.allclose(waveform.double(), expected, atol=1e-5)


def test_resampling_is_a_real_rate_conversion(tmp_path):
    """A 1 kHz tone at 44.1 kHz read at 16 kHz is a 1 kHz tone (scipy's polyphase resampler agrees)."""
    data = pcm16_exact(44100, 1, 44100, seed=0)
    soundfile.write(tmp_path / "tone.wav", data, 44100, subtype="PCM_16")
    waveform, _ = load_audio(tmp_path / "tone.wav")
    other = scipy.signal.resample_poly(data[:, 0], 160, 441)
    inner = slice(800, 15200)  # away from the edges, where the two filters' transients differ
    error = waveform[inner].double().numpy() - other[inner]
    snr_db = 10 * np.log10(np.sum(other[inner] ** 2) / np.sum(error**2))
    assert snr_db > 35


def test_crop_to_max_seconds_equals_cropping_the_whole_resampled_file(tmp_path):
    data = pcm16_exact(int(12.3 * 44100), 2, 44100, seed=1)
    soundfile.write(tmp_path / "long.flac", data, 44100, subtype="PCM_16")

    waveform, length = load_audio(tmp_path / "long.flac", max_seconds=10.0)
    assert length == waveform.shape[0] == 160000
    assert torch.allclose(waveform.double(), expected_waveform(data, 44100, 10.0), atol=1e-5)

    short, short_length = load_audio(tmp_path / "long.flac", max_seconds=0.5)
    assert short_length == 8000 and torch.equal(short, waveform[:8000])

    whole, whole_length = load_audio(tmp_path / "long.flac", max_seconds=None)
    assert whole_length == math.ceil(len(data) * 16000 / 44100)
    assert torch.equal(whole[:160000], waveform)


def test_other_target_sample_rate(tmp_path):
    data = pcm16_exact(16000, 1, 16000, seed=2)
    soundfile.write(tmp_path / "clip.wav", data, 16000, subtype="PCM_16")
    waveform, length = load_audio(tmp_path / "clip.wav", sample_rate=8000)
    expected = torchaudio.functional.resample(torch.from_numpy(data[:, 0]), 16000, 8000)
    assert length == 8000 and torch.allclose(waveform.double(), expected, atol=1e-5)


def test_load_audio_bytes_equals_load_audio(tmp_path):
    data = pcm16_exact(20000, 2, 44100, seed=3)
    soundfile.write(tmp_path / "clip.flac", data, 44100, subtype="PCM_16")
    from_file, file_length = load_audio(tmp_path / "clip.flac")
    from_bytes, bytes_length = load_audio_bytes((tmp_path / "clip.flac").read_bytes(), "000000007.flac")
    assert file_length == bytes_length and torch.equal(from_file, from_bytes)


# ---------------------------------------------------------------- bad input


def write_float_wav(path, data, sample_rate=16000):
    soundfile.write(path, data, sample_rate, subtype="FLOAT")
    return path


def test_missing_file(tmp_path):
    with pytest.raises(AudioLoadError, match=r"nowhere\.wav: audio file not found"):
        load_audio(tmp_path / "nowhere.wav")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioLoadError, match=r"empty\.wav: audio file is empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioLoadError, match=r"member\.flac: audio file is empty"):
        load_audio_bytes(b"", "member.flac")


def test_zero_samples(tmp_path):
    soundfile.write(tmp_path / "zero.wav", np.zeros((0, 1)), 16000)
    with pytest.raises(AudioLoadError, match=r"zero\.wav: audio has no samples"):
        load_audio(tmp_path / "zero.wav")


def test_clip_shorter_than_100_ms(tmp_path):
    soundfile.write(tmp_path / "short.wav", pcm16_exact(2205, 2, 44100, seed=4), 44100)  # 50 ms
    with pytest.raises(AudioLoadError, match=r"short\.wav: audio is too short: 50\.0 ms < 100 ms"):
        load_audio(tmp_path / "short.wav")


def test_100_ms_clip_is_accepted(tmp_path):
    soundfile.write(tmp_path / "edge.wav", pcm16_exact(1600, 1, 16000, seed=5), 16000)
    assert load_audio(tmp_path / "edge.wav")[1] == 1600


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_truncated_wav(tmp_path, subtype):
    soundfile.write(tmp_path / "whole.wav", pcm16_exact(16000, 1, 16000, seed=6), 16000, subtype=subtype)
    encoded = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(encoded[: len(encoded) // 2])
    with pytest.raises(AudioLoadError, match=r"cut\.wav: truncated audio: data chunk declares \d+ bytes"):
        load_audio(tmp_path / "cut.wav")
    with pytest.raises(AudioLoadError, match=r"000000003\.wav: truncated audio"):
        load_audio_bytes(encoded[: len(encoded) // 2], "000000003.wav")


def test_truncated_flac(tmp_path):
    soundfile.write(tmp_path / "whole.flac", pcm16_exact(32000, 2, 16000, seed=7), 16000)
    encoded = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(encoded[: len(encoded) * 2 // 3])
    with pytest.raises(AudioLoadError, match=r"cut\.flac: (cannot decode audio|truncated audio)"):
        load_audio(tmp_path / "cut.flac")


def test_corrupt_bytes(tmp_path):
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(8).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioLoadError, match=r"noise\.wav: cannot decode audio"):
        load_audio(tmp_path / "noise.wav")


def test_header_only_garbage_body_flac(tmp_path):
    soundfile.write(tmp_path / "whole.flac", pcm16_exact(16000, 1, 16000, seed=9), 16000)
    encoded = bytearray((tmp_path / "whole.flac").read_bytes())
    encoded[200:] = np.random.default_rng(9).integers(0, 256, len(encoded) - 200, dtype=np.uint8).tobytes()
    (tmp_path / "garbled.flac").write_bytes(bytes(encoded))
    with pytest.raises(AudioLoadError, match=r"garbled\.flac: (cannot decode audio|truncated audio)"):
        load_audio(tmp_path / "garbled.flac")


@pytest.mark.parametrize("bad_value, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_samples(tmp_path, bad_value, kind):
    data = pcm16_exact(8000, 2, 16000, seed=10).astype(np.float32)
    data[1234, 1] = bad_value
    path = write_float_wav(tmp_path / "bad.wav", data)
    with pytest.raises(AudioLoadError, match=rf"bad\.wav: audio contains {kind} samples \(first at frame 1234\)"):
        load_audio(path)
