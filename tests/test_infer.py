"""Inference API, `finelap infer` command and the frame-score heatmap."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import soundfile
import torch

from finelap import infer
from finelap.audio.fbank import compute_features
from finelap.audio.io import load_audio
from finelap.infer import AudioEmbeddings, FineLAPInference
from finelap.models import build_model, load_model_config
from finelap.plots import plot_frame_scores

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOP = 0.16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model with 5.12 s of input (512 fbank frames, 32 frame tokens), saved once."""
    config = load_model_config(REPO / "configs" / "model" / "tiny.yaml", ["model.audio.target_frames=512"])
    model = build_model(config, seed=0)
    with torch.no_grad():  # move the logits off their initial -10 bias so probabilities are not all ~0
        model.clip_bias.fill_(0.5)
        model.frame_bias.fill_(-0.5)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def inference(model_dir) -> FineLAPInference:
    return FineLAPInference.from_pretrained(model_dir, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    """A 3 s 16 kHz mono tone in noise, a 1.5 s 22.05 kHz stereo chirp, a 7 s clip (longer than the model input)."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    paths = []
    for name, seconds, rate, channels in [("tone", 3.0, 16000, 1), ("chirp", 1.5, 22050, 2), ("long", 7.0, 16000, 1)]:
        t = np.arange(int(seconds * rate)) / rate
        signal = 0.3 * np.sin(2 * np.pi * (440 + 200 * t) * t) + 0.05 * rng.standard_normal(t.shape)
        data = np.stack([signal] * channels, axis=1) if channels > 1 else signal
        path = folder / f"{name}.wav"
        soundfile.write(path, data.astype(np.float32), rate)
        paths.append(path)
    return paths


def expected_valid_frames(num_samples: int, target_frames: int = 512) -> int:
    fbank_frames = min(1 + (num_samples - 400) // 160, target_frames)
    return math.ceil(fbank_frames / 16)


def test_embed_audio_from_files_equals_waveforms_and_does_not_depend_on_batching(inference, wavs):
    embeddings = inference.embed_audio(wavs)
    assert isinstance(embeddings, AudioEmbeddings)
    assert embeddings.clip.shape == (3, 128) and embeddings.frames.shape == (3, 32, 128)
    assert embeddings.frame_hop_seconds == pytest.approx(HOP)
    torch.testing.assert_close(embeddings.frame_times(), torch.arange(32, dtype=torch.float64) * HOP)

    loaded = [load_audio(path) for path in wavs]
    lengths = torch.tensor([length for _, length in loaded])
    assert lengths.tolist() == [48000, 24000, 112000]
    assert embeddings.frame_mask.sum(dim=1).tolist() == [expected_valid_frames(int(n)) for n in lengths] == [19, 10, 32]

    waveforms = torch.nn.utils.rnn.pad_sequence([waveform for waveform, _ in loaded], batch_first=True)
    one_at_a_time = FineLAPInference(inference.model, device="cpu", batch_size=1)
    from_waveforms = one_at_a_time.embed_audio((waveforms, lengths))
    for name in ("clip", "frames"):
        torch.testing.assert_close(getattr(from_waveforms, name), getattr(embeddings, name), rtol=1e-4, atol=1e-5)
    assert torch.equal(from_waveforms.frame_mask, embeddings.frame_mask)


def test_scores_equal_the_model_forward_in_float64(inference, wavs):
    captions = ["a rising tone", "a dog barks", "a rising tone"]
    phrases = ["tone", "noise"]
    embeddings = inference.embed_audio(wavs)
    caption_embeddings = inference.embed_text(captions)
    phrase_embeddings = inference.embed_text(phrases)
    assert caption_embeddings.shape == (3, 128)
    assert torch.equal(caption_embeddings[0], caption_embeddings[2])

    model = inference.model
    loaded = [load_audio(path) for path in wavs]
    waveforms = torch.nn.utils.rnn.pad_sequence([waveform for waveform, _ in loaded], batch_first=True)
    features, frame_counts = compute_features(waveforms, torch.tensor([n for _, n in loaded]), model.config.audio)
    with torch.no_grad():
        out = model(features, frame_counts, captions, phrases)
    torch.testing.assert_close(caption_embeddings, out.caption_embeddings, rtol=1e-5, atol=1e-5)

    cosine = out.clip_embeddings.double() @ out.caption_embeddings.double().T
    expected_clip = torch.sigmoid(out.clip_scale.double() * cosine + out.clip_bias.double())
    frame_cosine = torch.einsum("ate,pe->apt", out.frame_embeddings.double(), out.phrase_embeddings.double())
    expected_frames = torch.sigmoid(out.frame_scale.double() * frame_cosine + out.frame_bias.double())

    torch.testing.assert_close(inference.clip_similarity(embeddings, caption_embeddings).double(), cosine,
                               rtol=1e-4, atol=1e-5)
    clip_scores = inference.clip_scores(embeddings, caption_embeddings)
    frame_scores = inference.frame_scores(embeddings, phrase_embeddings)
    assert clip_scores.shape == (3, 3) and frame_scores.shape == (3, 2, 32)
    torch.testing.assert_close(clip_scores.double(), expected_clip, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(frame_scores.double(), expected_frames, rtol=1e-4, atol=1e-5)
    assert 0.05 < float(clip_scores.mean()) < 0.95  # informative probabilities, not saturated
    assert inference.embed_text([]).shape == (0, 128)


def check_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    return image


def check_scores_json(out_dir: Path, wavs: list[Path], captions: list[str], phrases: list[str]) -> dict:
    report = json.loads((out_dir / "scores.json").read_text())
    assert report["audio"] == [str(path) for path in wavs]
    assert report["captions"] == captions and report["phrases"] == phrases
    assert report["frame_hop_seconds"] == pytest.approx(HOP)
    clip_scores = np.array(report["clip_scores"])
    assert clip_scores.shape == (len(wavs), len(captions))
    assert ((clip_scores >= 0) & (clip_scores <= 1)).all()
    for path, entry in zip(wavs, report["frame_scores"]):
        valid = expected_valid_frames(soundfile.info(str(path)).duration * 16000)
        times = np.array(entry["frame_times"])
        scores = np.array(entry["scores"])
        assert entry["audio"] == str(path)
        assert times.shape == (valid,) and scores.shape == (len(phrases), valid)
        np.testing.assert_allclose(times / HOP, np.arange(valid), atol=1e-6)  # multiples of 0.16 s
        assert ((scores >= 0) & (scores <= 1)).all()
        check_png(out_dir / entry["heatmap"])
        assert entry["heatmap"] == f"frame_scores_{path.stem}.png"
    return report


def test_infer_command_writes_scores_and_heatmaps(inference, model_dir, wavs, tmp_path, capsys):
    captions = ["a rising tone", "a dog barks"]
    phrases = ["tone", "noise", "speech"]
    out_dir = tmp_path / "out"
    argv = ["--model", str(model_dir), "--audio", *map(str, wavs), "--captions", *captions,
            "--phrases", *phrases, "--out", str(out_dir), "--device", "cpu", "--batch-size", "2"]
    assert infer.main(argv) == 0
    assert "scores.json" in capsys.readouterr().out
    report = check_scores_json(out_dir, wavs, captions, phrases)

    embeddings = inference.embed_audio(wavs)
    expected_clip = inference.clip_scores(embeddings, inference.embed_text(captions))
    expected_frames = inference.frame_scores(embeddings, inference.embed_text(phrases))
    np.testing.assert_allclose(report["clip_scores"], expected_clip.numpy(), rtol=1e-4, atol=1e-6)
    for index, entry in enumerate(report["frame_scores"]):
        valid = len(entry["frame_times"])
        np.testing.assert_allclose(entry["scores"], expected_frames[index, :, :valid].numpy(), rtol=1e-4, atol=1e-6)


def test_infer_command_through_the_finelap_entry_point(model_dir, wavs, tmp_path):
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "finelap.cli", "infer", "--model", str(model_dir), "--audio", str(wavs[0]),
               "--captions", "a rising tone", "--phrases", "tone", "--out", str(out_dir), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    check_scores_json(out_dir, wavs[:1], ["a rising tone"], ["tone"])


def test_infer_command_bad_input_names_the_file(model_dir, wavs, tmp_path, capsys):
    missing = tmp_path / "not_there.wav"
    argv = ["--model", str(model_dir), "--audio", str(wavs[0]), str(missing), "--phrases", "tone",
            "--out", str(tmp_path / "out")]
    assert infer.main(argv) == 1
    error = capsys.readouterr().err
    assert str(missing) in error and "audio file not found" in error
    assert not (tmp_path / "out").exists()

    broken_model = tmp_path / "broken_model"
    broken_model.mkdir()
    (broken_model / "config.yaml").write_text((model_dir / "config.yaml").read_text())
    argv = ["--model", str(broken_model), "--audio", str(wavs[0]), "--phrases", "tone", "--out", str(tmp_path / "o")]
    assert infer.main(argv) == 1
    error = capsys.readouterr().err
    assert str(broken_model / "model.safetensors") in error and "missing from the model folder" in error

    with pytest.raises(SystemExit):
        infer.main(["--model", str(model_dir), "--audio", str(wavs[0]), "--out", str(tmp_path / "o")])
    assert "--captions or --phrases" in capsys.readouterr().err


def test_heatmap_draws_ground_truth_segments(tmp_path):
    scores = np.linspace(0, 1, 2 * 20).reshape(2, 20)
    plain = check_png(plot_frame_scores(scores, ["dog", "rain"], HOP, tmp_path / "plain.png", title="clip"))
    overlaid = check_png(
        plot_frame_scores(scores, ["dog", "rain"], HOP, tmp_path / "overlaid.png", title="clip",
                          segments=[[(0.5, 1.2)], []])
    )
    def red_pixels(image):
        return int(((image[..., 0] > 0.8) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)).sum())

    assert red_pixels(plain) == 0  # viridis holds no red: red pixels are the ground-truth outline
    assert red_pixels(overlaid) > 50
    with pytest.raises(ValueError, match=r"scores must be \[len\(phrases\)=3, T\]"):
        plot_frame_scores(scores, ["dog", "rain", "car"], HOP, tmp_path / "bad.png")
