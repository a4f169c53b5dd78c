"""What synthesis reports and writes beyond the mixtures: event sources kept per class (a class left with
none is refused or warned about), every skipped line and clip listed in report.json, and the evaluation
files `finelap eval` runs on directly; and the untrained baseline from `finelap export --untrained`."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from finelap.audio.io import AudioLoadError, load_audio
from finelap.config import load_config
from finelap.eval.cli import main as eval_main
from finelap.eval.config import load_eval_config
from finelap.export import export_untrained, main as export_main
from finelap.models import FineLAP
from finelap.synth.cli import main as synth_main
from finelap.synth.errors import SynthError
from finelap.synth.mixer import MixSettings
from finelap.synth.pipeline import SynthConfig, run_synthesis
from tests.train_fixtures import CONFIG as TINY_TRAIN_CONFIG, write_tiny_text_tower

RATE = 16000
TONES = {"beep": 1000.0, "hum": 150.0, "whistle": 3000.0}  # event class -> tone frequency (Hz)


def _tone(path: Path, frequency: float, seconds: float = 0.6) -> Path:
    t = np.arange(int(seconds * RATE)) / RATE
    soundfile.write(path, (0.4 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), RATE)
    return path


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _sources(folder: Path, extra_events: list = ()) -> tuple[Path, Path]:
    """An events index with one good clip per class (plus `extra_events` lines) and a backgrounds index."""
    rows = [{"path": _tone(folder / f"{label}.wav", frequency).name, "label": label} for label, frequency in TONES.items()]
    events = _write_jsonl(folder / "events.jsonl", rows + list(extra_events))
    noise = 0.02 * np.random.default_rng(0).standard_normal(3 * RATE)
    soundfile.write(folder / "noise.wav", noise.astype(np.float32), RATE)
    backgrounds = _write_jsonl(folder / "backgrounds.jsonl", [{"path": "noise.wav", "label": "room noise"}])
    return events, backgrounds


@pytest.fixture
def duck_only_on_bad_files(tmp_path):
    """The 'duck quacking' class's two sources are both bad: a 0-byte file and a text file renamed .wav,
    under names with spaces and non-ASCII characters (events.jsonl lines 4 and 5)."""
    empty = tmp_path / "duck quack é.wav"
    empty.write_bytes(b"")
    text = tmp_path / "canard 鴨.wav"
    text.write_text("a text file, not audio\n")
    reasons = {}
    for path in (empty, text):
        with pytest.raises(AudioLoadError) as caught:
            load_audio(path, RATE)
        reasons[path] = caught.value.reason
    events, backgrounds = _sources(tmp_path, [{"path": empty.name, "label": "duck quacking"},
                                              {"path": text.name, "label": "duck quacking"}])
    return events, backgrounds, reasons


def _config(events: Path, backgrounds: Path, out: Path, **overrides) -> SynthConfig:
    values = {"num_mixtures": 4, "mix": MixSettings(duration_s=3.0, events_per_mixture=(1, 2)), **overrides}
    return SynthConfig(str(events), str(backgrounds), str(out), progress=False, **values)


def _cli_arguments(events: Path, backgrounds: Path, out: Path, *extra: str) -> list[str]:
    return ["--events", str(events), "--backgrounds", str(backgrounds), "--out", str(out), "-n", "4",
            "--duration", "3", "--workers", "1", "--quiet", *extra]


# ---------------------------------------------------------------- classes left without sources


def test_a_class_whose_every_source_is_bad_is_refused_naming_its_files(duck_only_on_bad_files, tmp_path, capsys):
    events, backgrounds, reasons = duck_only_on_bad_files
    with pytest.raises(SynthError) as caught:
        run_synthesis(_config(events, backgrounds, tmp_path / "out", on_bad_sample="skip"))
    message = str(caught.value)
    assert message.startswith("1 label(s) have no event sources left (--on-empty-class is 'error'")
    assert "'duck quacking': 0 of 2 event sources left: " in message
    for line, path in zip((4, 5), reasons):
        assert f"{events}:{line}" in message and path.name in message
    for label in TONES:
        assert f"'{label}'" not in message
    assert not (tmp_path / "out" / "metadata.jsonl").exists()  # nothing was made

    assert synth_main(_cli_arguments(events, backgrounds, tmp_path / "cli", "--on-bad-sample", "skip")) == 2
    error = capsys.readouterr().err
    assert "finelap synth: error: 1 label(s) have no event sources left" in error and "'duck quacking'" in error


def test_a_class_emptied_by_the_energy_filter_is_refused_too(tmp_path):
    soundfile.write(tmp_path / "hush.wav", np.zeros(RATE, dtype=np.float32), RATE)
    events, backgrounds = _sources(tmp_path, [{"path": "hush.wav", "label": "hush"}])
    with pytest.raises(SynthError, match=rf"'hush': 0 of 1 event sources left: {events}:4: .*hush\.wav: "
                                         r"rejected \(silent: all samples are zero\)"):
        run_synthesis(_config(events, backgrounds, tmp_path / "out"))


def test_warn_goes_on_and_the_report_counts_sources_per_class_and_lists_every_skip(
    duck_only_on_bad_files, tmp_path, capsys, caplog
):
    events, backgrounds, reasons = duck_only_on_bad_files
    with events.open("a") as handle:
        handle.write('{"path": "beep.wav", "label": \n' + json.dumps({"path": "hum.wav"}) + "\n")  # lines 6, 7
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = synth_main(_cli_arguments(events, backgrounds, out, "--on-bad-sample", "skip", "--on-empty-class", "warn"))
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index("event sources per class (kept / listed):") + 1:][:4]
    assert [line.split() for line in table] == [
        ["beep", "1", "/", "1"], ["duck", "quacking", "0", "/", "2", "<-", "none", "left"],
        ["hum", "1", "/", "1"], ["whistle", "1", "/", "1"]]
    warnings = [record.getMessage() for record in caplog.records if "LABEL WITH NO" in record.getMessage()]
    assert len(warnings) == 1 and "'duck quacking': 0 of 2 event sources left" in warnings[0]

    report = json.loads((out / "report.json").read_text())
    assert report["event_sources_per_class"] == {
        "beep": {"listed": 1, "kept": 1}, "duck quacking": {"listed": 2, "kept": 0},
        "hum": {"listed": 1, "kept": 1}, "whistle": {"listed": 1, "kept": 1}}
    listed = {entry["key"]: entry for entry in report["skips"]}
    assert set(listed) == {f"{events}:{line}" for line in (4, 5, 6, 7)} and len(report["skips"]) == 4
    for line, (path, reason) in zip((4, 5), reasons.items()):
        entry = listed[f"{events}:{line}"]
        assert entry["reason"] == reason and path.name in entry["message"]
    assert listed[f"{events}:6"]["reason"] == "malformed_json"
    assert listed[f"{events}:7"]["reason"] == "missing_field" and "'label'" in listed[f"{events}:7"]["message"]
    assert sum(report["skipped"].values()) == len(report["skips"])
    used = {row.split("\t")[3] for row in (out / "ground_truth.tsv").read_text().splitlines()[1:]}
    assert used <= set(TONES)  # the empty class is in no mixture


# ---------------------------------------------------------------- evaluation files and the untrained baseline


@pytest.fixture(scope="module")
def text_tower(tmp_path_factory) -> Path:
    return write_tiny_text_tower(tmp_path_factory.mktemp("text_tower"))


def test_untrained_export_equals_the_trainers_initial_weights(text_tower, tmp_path):
    settings = [f"model.text.path={text_tower}", "train.seed=7"]
    out = export_untrained(TINY_TRAIN_CONFIG, tmp_path / "untrained", settings)
    exported = FineLAP.from_pretrained(out).state_dict()
    config = load_config(TINY_TRAIN_CONFIG, settings)
    torch.manual_seed(config.train.seed)  # the trainer's rule: seed, then build the model
    expected = FineLAP(config.model).state_dict()
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name
    torch.manual_seed(0)
    other_seed = FineLAP(config.model).state_dict()
    assert any(not torch.equal(exported[name], other_seed[name]) for name in expected)  # the seed matters

    with pytest.raises(SystemExit):
        export_main(["--untrained", "--out", str(tmp_path / "x")])  # no --config
    with pytest.raises(SystemExit):
        export_main(["--out", str(tmp_path / "x")])  # neither a checkpoint nor --untrained


def test_finelap_eval_runs_on_the_files_synthesis_writes(text_tower, tmp_path, monkeypatch, capsys):
    events, backgrounds = _sources(tmp_path)
    out = tmp_path / "synth"
    run_synthesis(_config(events, backgrounds, out, num_mixtures=6, seed=1))
    metadata = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    single = [row for row in metadata if len(row["phrases"]) == 1]
    assert 0 < len(single) < len(metadata)  # this seed makes both kinds

    assert (out / "classes.txt").read_text() == "beep\nhum\nwhistle\n"
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert labels == [{"audio_path": row["audio_path"], "label": row["phrases"][0]["phrase"]} for row in single]
    config = load_eval_config(out / "eval.yaml")
    assert [(task.name, task.type) for task in config.tasks] == [
        ("retrieval", "retrieval"), ("zero_shot", "zero_shot"), ("sed", "sed"), ("grounding", "grounding")]
    sed = config.tasks[2]
    assert (sed.metadata, sed.durations, sed.audio_root, sed.classes) == (
        str(out / "ground_truth.tsv"), str(out / "durations.tsv"), str(out / "audio"), str(out / "classes.txt"))

    model = tmp_path / "untrained"
    assert export_main(["--untrained", "--config", str(TINY_TRAIN_CONFIG), "--set", f"model.text.path={text_tower}",
                        "--out", str(model)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config's paths do not depend on the working directory
    code = eval_main(["--model", str(model), "--config", str(out / "eval.yaml"), "--out", str(tmp_path / "eval"),
                      "--device", "cpu", "--set", "heatmaps=0"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["retrieval"]["num_audio"] == len(metadata)
    assert (metrics["zero_shot"]["num_clips"], metrics["zero_shot"]["num_classes"]) == (len(single), 3)
    assert metrics["sed"]["num_clips"] == len(metadata)
    assert metrics["grounding"]["num_pairs"] == sum(len(row["phrases"]) for row in metadata)


def test_eval_config_root_resolves_task_paths_against_the_config_folder(tmp_path):
    config_file = tmp_path / "configs" / "eval.yaml"
    config_file.parent.mkdir()
    absolute = str(tmp_path / "elsewhere" / "labels.jsonl")
    config_file.write_text(yaml.safe_dump({"root": "../data", "tasks": [
        {"name": "a", "type": "retrieval", "metadata": "retrieval.jsonl", "audio_root": "audio"},
        {"name": "b", "type": "zero_shot", "metadata": absolute, "classes": "classes.txt"}]}))
    first, second = load_eval_config(config_file).tasks
    root = config_file.parent / "../data"
    assert (first.metadata, first.audio_root) == (str(root / "retrieval.jsonl"), str(root / "audio"))
    assert (second.metadata, second.classes) == (absolute, str(root / "classes.txt"))
    config_file.write_text(yaml.safe_dump({"tasks": [{"name": "a", "type": "retrieval", "metadata": "r.jsonl"}]}))
    assert load_eval_config(config_file).tasks[0].metadata == "r.jsonl"  # no root: the working directory, as before
