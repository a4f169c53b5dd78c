"""Synthetic SED pipeline inputs: index formats, the energy filter, and bad files and lines."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from finelap.bad_input import MetadataError
from finelap.synth.cli import main as synth_main
from finelap.synth.errors import SynthError
from finelap.synth.mixer import MixSettings
from finelap.synth.pipeline import SynthConfig, run_synthesis
from finelap.synth.sources import EnergyFilter, IndexEntry, Rejection, SourceClip, examine

RATE = 16000


def _square(seconds: float, amplitude: float = 0.5, frequency: float = 440.0, rate: int = RATE) -> np.ndarray:
    """A square wave: every sample has magnitude `amplitude`, so its audible extent is exactly its length."""
    t = np.arange(int(round(seconds * rate))) / rate
    return amplitude * np.where(np.sin(2 * np.pi * frequency * t + 0.1) >= 0, 1.0, -1.0)


def _write(path: Path, samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_24") -> Path:
    soundfile.write(path, samples, rate, subtype=subtype)
    return path


def _padded(lead: int, core: np.ndarray, tail: int, floor: float = 0.0, seed: int = 0) -> np.ndarray:
    clip = np.concatenate([np.zeros(lead), core, np.zeros(tail)])
    return clip + floor * np.random.default_rng(seed).uniform(-1, 1, len(clip))


@pytest.fixture
def clips(tmp_path):
    """A padded tone (lead 6000, core 8000, tail 4000 samples over a -80 dB floor), a silent, a sparse and a
    too-short clip, and a background."""
    tone = _write(tmp_path / "tone.wav", _padded(6000, _square(0.5), 4000, floor=0.5e-4))
    silent = _write(tmp_path / "silent.wav", np.zeros(RATE))
    bursts = np.zeros(3 * RATE)
    bursts[: int(0.03 * RATE)] = _square(0.03)
    bursts[-int(0.03 * RATE) :] = _square(0.03)
    sparse = _write(tmp_path / "sparse.wav", bursts)
    short = _write(tmp_path / "short.wav", _padded(RATE // 2, _square(0.05), RATE // 2))
    background = _write(tmp_path / "background.wav", 0.05 * np.random.default_rng(1).standard_normal(3 * RATE))
    return {"tone": tone, "silent": silent, "sparse": sparse, "short": short, "background": background}


def _examine(path: Path, energy: EnergyFilter, role: str = "event", min_background_seconds: float = 1.0):
    return examine(IndexEntry(str(path), ("x",), "index.jsonl:1"), role, RATE, energy, min_background_seconds)


def test_energy_filter_trims_to_the_audible_extent_and_rejects(clips):
    energy = EnergyFilter(threshold_db=40.0, min_seconds=0.1, min_active_fraction=0.1)
    tone = _examine(clips["tone"], energy)
    assert isinstance(tone, SourceClip) and (tone.start, tone.end) == (6000, 14000)
    # a threshold below the noise floor (-80 dB) makes the floor audible: nothing is trimmed
    untrimmed = _examine(clips["tone"], EnergyFilter(threshold_db=100.0, min_seconds=0.1, min_active_fraction=0.1))
    assert (untrimmed.start, untrimmed.end) == (0, 18000)
    for name, reason in (("silent", "silent"), ("sparse", "sparse"), ("short", "too_short")):
        outcome = _examine(clips[name], energy)
        assert isinstance(outcome, Rejection) and outcome.reason == reason, (name, outcome)
    assert isinstance(_examine(clips["sparse"], EnergyFilter(min_active_fraction=0.01)), SourceClip)
    short = _examine(clips["short"], EnergyFilter(min_seconds=0.02))
    assert isinstance(short, SourceClip) and short.length == int(0.05 * RATE)
    # backgrounds are used whole: not trimmed, rejected only when silent or too short
    background = _examine(clips["tone"], energy, role="background")
    assert (background.start, background.end) == (0, 18000)
    assert _examine(clips["tone"], energy, role="background", min_background_seconds=2.0).reason == "too_short"
    assert _examine(clips["silent"], energy, role="background").reason == "silent"


def test_resampled_stereo_clip_is_trimmed_at_the_same_time(tmp_path):
    """44.1 kHz stereo in, 16 kHz mono extent out: 0.25 s of lead-in stays 0.25 s, to within the
    resampling filter's ringing (1 ms)."""
    core = _square(0.4, frequency=300.0, rate=44100)
    mono = _padded(int(0.25 * 44100), core, int(0.2 * 44100))
    path = _write(tmp_path / "stereo.wav", np.stack([mono, mono], axis=1), rate=44100)
    clip = _examine(path, EnergyFilter())
    tolerance = 0.001 * RATE
    assert abs(clip.start - 0.25 * RATE) <= tolerance and abs(clip.length - 0.4 * RATE) <= 2 * tolerance


def test_rejections_are_reported_and_labels_cover_the_trimmed_event(clips, tmp_path):
    events = tmp_path / "events.csv"
    events.write_text(
        "path,label\n" + "".join(f"{clips[name].name},{name}\n" for name in ("tone", "silent", "sparse", "short"))
    )
    backgrounds = tmp_path / "backgrounds.jsonl"
    backgrounds.write_text(json.dumps({"path": "background.wav", "label": "pink noise"}) + "\n")
    mix = MixSettings(duration_s=3.0, events_per_mixture=(1, 1), repeats=(1, 1))
    config = SynthConfig(
        str(events), str(backgrounds), str(tmp_path / "out"), num_mixtures=2, mix=mix, progress=False,
        on_empty_class="warn",  # the silent, sparse and short classes lose their only source
    )
    run_synthesis(config)
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["rejected"] == {"silent": 1, "sparse": 1, "too_short": 1}
    assert report["accepted"] == {"events": 1, "backgrounds": 1}
    assert {(Path(r["path"]).name, r["location"].rsplit(":", 1)[1]) for r in report["rejections"]} == {
        ("silent.wav", "3"), ("sparse.wav", "4"), ("short.wav", "5")
    }
    rows = (tmp_path / "out/ground_truth.tsv").read_text().splitlines()[1:]
    for row in rows:
        _, onset, offset, label = row.split("\t")
        assert label == "tone" and round((float(offset) - float(onset)) * RATE) == 8000


# ---------------------------------------------------------------- bad inputs


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio" * 3)
    return path


def _nan(path: Path) -> Path:
    samples = _square(0.5)
    samples[100] = np.nan
    soundfile.write(path, samples, RATE, subtype="FLOAT")
    return path


BAD_LINES = {
    "malformed_json": (lambda folder: '{"path": "tone.wav", "label": ', r"events\.jsonl:2: .*malformed JSON"),
    "missing_field": (lambda folder: json.dumps({"path": "tone.wav"}), r"events\.jsonl:2: .*missing field 'label'"),
    "audio_unreadable": (
        lambda folder: json.dumps({"path": _corrupt(folder / "corrupt.wav").name, "label": "x"}),
        r"events\.jsonl:2: .*corrupt\.wav: cannot decode",
    ),
    "audio_too_short": (
        lambda folder: json.dumps({"path": _write(folder / "tiny.wav", _square(0.05)).name, "label": "x"}),
        r"events\.jsonl:2: .*tiny\.wav: audio is too short",
    ),
    "audio_missing": (lambda folder: json.dumps({"path": "nowhere.wav", "label": "x"}), r"events\.jsonl:2: .*nowhere\.wav: audio file not found"),
    "audio_nonfinite": (
        lambda folder: json.dumps({"path": _nan(folder / "nan.wav").name, "label": "x"}),
        r"events\.jsonl:2: .*nan\.wav: audio contains NaN",
    ),
}


def _config(folder: Path, events: Path, **overrides) -> SynthConfig:
    backgrounds = folder / "backgrounds.jsonl"
    backgrounds.write_text(json.dumps({"path": "background.wav", "label": "noise"}) + "\n")
    mix = MixSettings(duration_s=3.0)
    return SynthConfig(str(events), str(backgrounds), str(folder / "out"), num_mixtures=2, mix=mix, progress=False, **overrides)


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_a_bad_event_line_is_an_error_naming_the_index_file_and_line(clips, tmp_path, reason):
    make_line, message = BAD_LINES[reason]
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"path": "tone.wav", "label": "tone"}) + "\n" + make_line(tmp_path) + "\n")
    with pytest.raises((MetadataError, SynthError), match=message):
        run_synthesis(_config(tmp_path, events))


def test_bad_lines_are_skipped_and_counted_when_asked(clips, tmp_path, capsys):
    events = tmp_path / "events.jsonl"
    lines = [json.dumps({"path": "tone.wav", "label": "tone"})] + [make_line(tmp_path) for make_line, _ in BAD_LINES.values()]
    events.write_text("\n".join(lines) + "\n")
    run_synthesis(_config(tmp_path, events, on_bad_sample="skip", on_empty_class="warn"))  # class "x" loses all
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["skipped"] == {reason: 1 for reason in BAD_LINES}
    assert len((tmp_path / "out/metadata.jsonl").read_text().splitlines()) == 2
    # the command line: the same index is an error by default, with the file and line in the message
    arguments = ["--events", str(events), "--backgrounds", str(tmp_path / "backgrounds.jsonl"), "--out", str(tmp_path / "cli"), "--workers", "1", "--quiet"]
    assert synth_main(arguments) == 2
    assert "events.jsonl:2: error: malformed_json: malformed JSON" in capsys.readouterr().err


def test_bad_csv_index_and_phrase_bank_lines(clips, tmp_path):
    events = tmp_path / "events.csv"
    events.write_text("path,label\ntone.wav,tone\nsilent.wav,\n")
    with pytest.raises(SynthError, match=r"events\.csv:3: .*field 'label' is empty"):
        run_synthesis(_config(tmp_path, events))
    events.write_text("file,label\ntone.wav,tone\n")
    with pytest.raises(MetadataError, match=r"events\.csv:1: CSV header must name 'path' and 'label'"):
        run_synthesis(_config(tmp_path, events))
    events.write_text('path,label\ntone.wav,"tone, square wave"\n')
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps({"phrase": "tone", "alternatives": ["beep"]}) + "\n" + json.dumps({"alternatives": []}) + "\n")
    with pytest.raises(SynthError, match=r"bank\.jsonl:2: .*missing field 'phrase'"):
        run_synthesis(_config(tmp_path, events, phrase_bank=str(bank)))
    bank.write_text(json.dumps({"phrase": "tone", "alternatives": ["beep"]}) + "\n")
    run_synthesis(_config(tmp_path, events, phrase_bank=str(bank)))
    labels = {p["phrase"] for line in (tmp_path / "out/metadata.jsonl").read_text().splitlines() for p in json.loads(line)["phrases"]}
    assert labels <= {"tone", "square wave"}  # one of the comma-separated labels is drawn per use
    output_bank = [json.loads(line) for line in (tmp_path / "out/phrase_bank.jsonl").read_text().splitlines()]
    expected = {"tone": {"phrase": "tone", "alternatives": ["beep"]}, "square wave": {"phrase": "square wave", "alternatives": ["square wave"]}}
    assert output_bank == [expected[label] for label in ("tone", "square wave") if label in labels]
