"""Synthetic SED pipeline on the built-in bank: labels against the audio itself, determinism, resuming."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from sed_scores_eval.base_modules.io import parse_audio_durations, parse_ground_truth

from finelap.synth.bank import EVENT_CLASSES, BankSettings, bank_paths, event_clip, write_builtin_bank
from finelap.synth.captions import noun_phrase, rule_based_caption, spoken
from finelap.synth.cli import main as synth_main
from finelap.synth.errors import SynthError
from finelap.synth.mixer import MixSettings
from finelap.synth.pipeline import SynthConfig, run_synthesis
from finelap.synth.sources import EnergyFilter

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
HOP = SAMPLE_RATE // 100  # one 10 ms hop, in samples
BANK_SETTINGS = BankSettings(variations=4, background_variations=2, background_seconds=8.0)
TRIM_DB = EnergyFilter().threshold_db


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return write_builtin_bank(tmp_path_factory.mktemp("bank"), BANK_SETTINGS)


def _config(bank, out_dir, split="train", **overrides) -> SynthConfig:
    events, backgrounds, phrase_bank = bank_paths(bank, split)
    values = dict(
        events_index=str(events),
        backgrounds_index=str(backgrounds),
        phrase_bank=str(phrase_bank),
        out_dir=str(out_dir),
        num_mixtures=8,
        seed=3,
        workers=1,
        mix=MixSettings(duration_s=6.0),
        progress=False,
    )
    values.update(overrides)
    return SynthConfig(**values)


@pytest.fixture(scope="module")
def stem_run(bank, tmp_path_factory):
    """Ten mixtures with stems, 24-bit, loud enough backgrounds that some mixtures hit the peak limit,
    and long events cropped to 2.5 s."""
    mix = MixSettings(duration_s=6.0, background_dbfs=(-36.0, -16.0), max_event_s=2.5)
    config = _config(bank, tmp_path_factory.mktemp("stems"), num_mixtures=10, mix=mix, save_stems=True, subtype="PCM_24")
    run_synthesis(config)
    details = [json.loads(line) for line in (Path(config.out_dir) / "mixtures.jsonl").read_text().splitlines()]
    return config, Path(config.out_dir), details


@pytest.fixture(scope="module")
def reference_run(bank, tmp_path_factory):
    """Eight mixtures with stems, one worker, uninterrupted: what other runs must reproduce byte for byte."""
    config = _config(bank, tmp_path_factory.mktemp("reference"), save_stems=True)
    run_synthesis(config)
    return config


def _read(path) -> np.ndarray:
    samples, rate = soundfile.read(path, dtype="float64")
    assert rate == SAMPLE_RATE
    return samples


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the bank


def _band_profile(clip: np.ndarray) -> np.ndarray:
    """Log energy in 24 log-spaced bands, for each half of the audible part: a crude spectro-temporal fingerprint."""
    peak = np.max(np.abs(clip))
    audible = np.flatnonzero(np.abs(clip) >= peak * 10 ** (-TRIM_DB / 20))
    clip = clip[audible[0] : audible[-1] + 1]
    edges = np.geomspace(50, 8000, 25)
    profile = []
    for half in (clip[: len(clip) // 2], clip[len(clip) // 2 :]):
        frames = np.lib.stride_tricks.sliding_window_view(half, 512)[::256] * np.hanning(512)
        power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)
        frequency = np.fft.rfftfreq(512, 1 / SAMPLE_RATE)
        bands = np.log([power[(frequency >= low) & (frequency < high)].sum() + 1e-10 for low, high in zip(edges[:-1], edges[1:])])
        profile.append(bands - bands.max())
    return np.concatenate(profile)


def test_bank_has_distinct_classes_synonyms_and_disjoint_splits(bank):
    assert len(EVENT_CLASSES) >= 16
    bank_lines = [json.loads(line) for line in (bank / "phrase_bank.jsonl").read_text().splitlines()]
    by_name = {line["phrase"]: line["alternatives"] for line in bank_lines}
    for sound in EVENT_CLASSES:
        assert 1 <= len(by_name[sound.name]) <= 3
    rows = {split: [json.loads(line) for line in (bank / f"events_{split}.jsonl").read_text().splitlines()] for split in ("train", "eval")}
    train_paths, eval_paths = ({row["path"] for row in rows[split]} for split in ("train", "eval"))
    assert train_paths and eval_paths and not train_paths & eval_paths
    assert {row["label"] for row in rows["train"]} == {row["label"] for row in rows["eval"]} == set(by_name) & {s.name for s in EVENT_CLASSES}
    backgrounds = {split: {json.loads(line)["path"] for line in (bank / f"backgrounds_{split}.jsonl").read_text().splitlines()} for split in ("train", "eval")}
    assert backgrounds["train"] and backgrounds["eval"] and not backgrounds["train"] & backgrounds["eval"]

    # deterministic: the same clip again, sample for sample (as written, 16-bit)
    first = rows["train"][0]
    sound = next(s for s in EVENT_CLASSES if s.name == first["label"])
    written = _read(bank / first["path"])
    again = np.round(event_clip(sound, 0, BANK_SETTINGS) * 32768) / 32768
    np.testing.assert_allclose(written, again, atol=1.0 / 32768)

    # distinct: every held-out (eval) clip is nearest to the centroid of its own class's training clips
    profiles = {}
    for split in ("train", "eval"):
        for row in rows[split]:
            profiles.setdefault((split, row["label"]), []).append(_band_profile(_read(bank / row["path"])))
    centroids = {label: np.mean(vectors, axis=0) for (split, label), vectors in profiles.items() if split == "train"}
    for (split, label), vectors in profiles.items():
        if split == "eval":
            for vector in vectors:
                nearest = min(centroids, key=lambda other: np.linalg.norm(vector - centroids[other]))
                assert nearest == label, f"an eval clip of {label!r} sounds most like {nearest!r}"


# ---------------------------------------------------------------- labels against the audio


def test_mixture_is_background_plus_stems_and_never_clips(stem_run):
    config, out_dir, details = stem_run
    for mixture in details:
        audio = _read(out_dir / mixture["audio_path"])
        total = _read(out_dir / mixture["background"]["stem"])
        for event in mixture["events"]:
            total += _read(out_dir / event["stem"])
        assert np.max(np.abs(audio - total)) < 1e-5
        assert np.max(np.abs(audio)) <= config.mix.peak_limit + 1e-6
    gains = [mixture["mixture_gain"] for mixture in details]
    assert min(gains) < 1.0 and max(gains) == 1.0  # both cases occur at these levels
    report = json.loads((out_dir / "report.json").read_text())
    assert report["mixtures_scaled_to_peak_limit"] == sum(gain < 1.0 for gain in gains)


def test_each_segment_is_the_audible_extent_of_its_stems(stem_run):
    """Per label, the sum of its events' stems is exactly silent outside the labelled segments, and audible
    (within TRIM_DB of the event's peak) within one 10 ms hop of every segment boundary."""
    _, out_dir, details = stem_run
    ground_truth = parse_ground_truth(out_dir / "ground_truth.tsv")
    checked = 0
    for mixture in details:
        stems = {}
        thresholds = {}
        for event in mixture["events"]:
            stem = _read(out_dir / event["stem"])
            stems[event["label"]] = stems.get(event["label"], 0) + stem
            threshold = np.max(np.abs(stem)) * 10 ** (-TRIM_DB / 20)
            thresholds[event["label"]] = min(thresholds.get(event["label"], np.inf), threshold)
        clip_id = Path(mixture["audio_path"]).stem
        for label, stem in stems.items():
            segments = [(round(on * SAMPLE_RATE), round(off * SAMPLE_RATE)) for on, off, name in ground_truth[clip_id] if name == label]
            inside = np.zeros(len(stem), dtype=bool)
            for start, end in segments:
                inside[start:end] = True
                audible = np.flatnonzero(np.abs(stem[start:end]) >= thresholds[label])
                assert audible[0] < HOP and audible[-1] >= end - start - HOP, (clip_id, label, start, end)
                checked += 1
            assert np.all(stem[~inside] == 0.0), (clip_id, label)
    assert checked >= len(details)


def test_realised_snr_matches_the_drawn_snr(stem_run):
    _, out_dir, details = stem_run
    for mixture in details:
        background_rms = np.sqrt(np.mean(_read(out_dir / mixture["background"]["stem"]) ** 2))
        for event in mixture["events"]:
            stem = _read(out_dir / event["stem"])
            placed = np.concatenate([stem[round(on * SAMPLE_RATE) : round(off * SAMPLE_RATE)] for on, off in event["placements"]])
            realised = 20 * np.log10(np.sqrt(np.mean(placed**2)) / background_rms)
            assert abs(realised - event["snr_db"]) < 0.5
            assert 12.0 <= event["snr_db"] <= 20.0


def test_repeats_of_an_event_never_overlap(stem_run):
    config, _, details = stem_run
    counts = []
    for mixture in details:
        for event in mixture["events"]:
            placements = event["placements"]
            counts.append(len(placements))
            assert 1 <= len(placements) <= 3
            if event["length_s"] >= config.mix.repeat_below_s:
                assert len(placements) == 1
            assert event["length_s"] <= config.mix.max_event_s
            for (_, previous_end), (next_start, _) in zip(placements, placements[1:]):
                assert next_start >= previous_end + config.mix.min_repeat_gap_s - 1e-9
    assert max(counts) > 1


def test_metadata_ground_truth_and_durations_agree(stem_run):
    config, out_dir, details = stem_run
    metadata = [json.loads(line) for line in (out_dir / "metadata.jsonl").read_text().splitlines()]
    ground_truth = parse_ground_truth(out_dir / "ground_truth.tsv")  # also rejects connected same-class events
    durations = parse_audio_durations(out_dir / "durations.tsv")
    assert [m["audio_id"] for m in metadata] == [d["audio_id"] for d in details] == sorted(ground_truth) == sorted(durations)
    bank_phrases = {json.loads(line)["phrase"] for line in (out_dir / "phrase_bank.jsonl").read_text().splitlines()}
    for record, mixture in zip(metadata, details):
        info = soundfile.info(out_dir / record["audio_path"])
        assert durations[record["audio_id"]] == info.frames / info.samplerate == config.mix.duration_s
        from_metadata = sorted((on, off, p["phrase"]) for p in record["phrases"] for on, off in p["segments"])
        assert from_metadata == sorted(tuple(event) for event in ground_truth[record["audio_id"]])
        # the union of every event's placements, label by label, merged here independently
        expected = []
        for label in {event["label"] for event in mixture["events"]}:
            spans = sorted(
                (round(on * SAMPLE_RATE), round(off * SAMPLE_RATE))
                for event in mixture["events"] if event["label"] == label for on, off in event["placements"]
            )
            covered = np.zeros(int(config.mix.duration_s * SAMPLE_RATE) + 1, dtype=np.int8)
            for start, end in spans:
                covered[start:end] = 1
            edges = np.flatnonzero(np.diff(np.concatenate([[0], covered])))
            expected += [(start / SAMPLE_RATE, end / SAMPLE_RATE, label) for start, end in zip(edges[::2], edges[1::2])]
        assert from_metadata == sorted(expected)
        assert {p["phrase"] for p in record["phrases"]} <= bank_phrases


# ---------------------------------------------------------------- captions


def test_captions_mention_every_event_in_temporal_order(stem_run):
    _, _, details = stem_run
    for mixture in details:
        caption = mixture["caption"].lower()
        onsets = [event["placements"][0][0] for event in mixture["events"]]
        assert onsets == sorted(onsets)
        position = 0
        for name in [event["name"] for event in mixture["events"]] + [mixture["background"]["name"]]:
            found = caption.find(spoken(name), position)
            assert found >= 0, (name, mixture["caption"])
            position = found + len(spoken(name))


def test_rule_based_caption_wording():
    def event(name, segments, role="event"):
        return {"label": name, "name": name, "role": role, "segments": segments, "snr_db": None}

    sequential = rule_based_caption([event("bell", [[0.0, 1.0], [2.0, 3.0]]), event("siren", [[4.0, 6.0]]), event("pink noise", [[0, 10]], "background")])
    assert sequential.startswith("A bell") and sequential.endswith(".")
    assert any(word in sequential for word in ("twice", "two times"))
    assert any(word in sequential for word in ("then a siren", "followed by a siren", "after that a siren"))
    assert "pink noise" in sequential
    overlapping = rule_based_caption([event("engine hum", [[0.0, 5.0]]), event("knocking", [[1.0, 2.0]]), event("crackling", [[0, 10]], "background")])
    assert any(word in overlapping for word in ("while knocking", "as knocking", "at the same time knocking"))
    assert "an engine hum" in overlapping.lower()
    assert noun_phrase("Alarm_bell_ringing") == "alarm bell ringing" and noun_phrase("dog") == "a dog"


def test_plugged_in_captioner(bank, tmp_path, monkeypatch):
    (tmp_path / "label_list_captioner.py").write_text(
        "def caption(events):\n    return ' / '.join(e['role'] + ':' + e['label'] for e in events)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(bank, tmp_path / "out", num_mixtures=3, captioner="label_list_captioner:caption")
    run_synthesis(config)
    details = [json.loads(line) for line in (tmp_path / "out" / "mixtures.jsonl").read_text().splitlines()]
    metadata = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    for record, mixture in zip(metadata, details):
        expected = [f"event:{e['label']}" for e in mixture["events"]] + [f"background:{mixture['background']['label']}"]
        assert record["caption"] == " / ".join(expected)
    with pytest.raises(SynthError, match="no_such_module_here"):
        run_synthesis(_config(bank, tmp_path / "bad", captioner="no_such_module_here:caption"))


# ---------------------------------------------------------------- determinism and resuming


def test_same_seed_gives_byte_identical_outputs_with_one_and_two_workers(bank, reference_run, tmp_path):
    config = _config(bank, tmp_path / "two", save_stems=True, workers=2)
    run_synthesis(config)
    assert _tree(Path(config.out_dir)) == _tree(Path(reference_run.out_dir))
    other_seed = _config(bank, tmp_path / "other", num_mixtures=2, seed=4)
    run_synthesis(other_seed)
    assert (tmp_path / "other/audio/synth_000000.wav").read_bytes() != (Path(reference_run.out_dir) / "audio/synth_000000.wav").read_bytes()


def test_a_run_cut_short_and_resumed_equals_an_uninterrupted_one(bank, reference_run, tmp_path):
    out_dir = tmp_path / "resumed"
    run_synthesis(_config(bank, out_dir, save_stems=True, num_mixtures=4))
    # what a kill leaves behind: a mixture whose audio exists but whose fragment was never written,
    # and a half-written temporary file
    (out_dir / "fragments/synth_000003.json").unlink()
    (out_dir / "audio/.synth_000004.wav.tmp").write_bytes(b"RIFF\x00\x00")
    summary = run_synthesis(_config(bank, out_dir, save_stems=True))
    assert summary.made_now == 5
    (out_dir / "audio/.synth_000004.wav.tmp").unlink(missing_ok=True)
    assert _tree(out_dir) == _tree(Path(reference_run.out_dir))
    with pytest.raises(SynthError, match=r"other settings \(differing: seed\)"):
        run_synthesis(_config(bank, out_dir, save_stems=True, seed=5))


def test_a_killed_process_resumes_to_the_same_result(bank, tmp_path):
    events, backgrounds, phrase_bank = bank_paths(bank, "eval")
    arguments = [
        "--events", str(events), "--backgrounds", str(backgrounds), "--phrase-bank", str(phrase_bank),
        "-n", "4", "--duration", "4", "--workers", "1", "--plots", "--quiet",
    ]  # fmt: skip
    killed = tmp_path / "killed"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "finelap.cli", "synth", *arguments, "--out", str(killed)], env=environment)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((killed / "fragments").glob("*.json"))) >= 1:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    if process.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert not (killed / "metadata.jsonl").exists()
    assert synth_main([*arguments, "--out", str(killed)]) == 0
    assert synth_main([*arguments, "--out", str(tmp_path / "whole")]) == 0
    resumed = {k: v for k, v in _tree(killed).items() if not k.endswith(".tmp")}
    assert resumed == _tree(tmp_path / "whole")
    assert (tmp_path / "whole/plots/synth_000003.png").read_bytes().startswith(b"\x89PNG")


def test_cli_writes_the_bank_and_reports_errors(bank, tmp_path, capsys):
    arguments = ["--builtin-bank", str(bank), "--bank-variations", "4", "--bank-background-variations", "2", "--bank-background-seconds", "8"]
    assert synth_main([*arguments, "--bank-split", "eval", "--out", str(tmp_path / "out"), "-n", "2", "--duration", "4", "--workers", "1", "--quiet"]) == 0
    metadata = (tmp_path / "out/metadata.jsonl").read_text().splitlines()
    eval_paths = {json.loads(line)["path"] for line in (bank / "events_eval.jsonl").read_text().splitlines()}
    sources = [event["source"] for line in (tmp_path / "out/mixtures.jsonl").read_text().splitlines() for event in json.loads(line)["events"]]
    assert len(metadata) == 2 and all(str(Path(source).relative_to(bank.resolve())) in eval_paths for source in sources)
    capsys.readouterr()
    assert synth_main([*arguments, "--out", str(tmp_path / "bad"), "--events-per-mixture", "3", "1", "--quiet"]) == 2
    assert "events_per_mixture: low 3 > high 1" in capsys.readouterr().err
