"""The demo at toy size (`python -m finelap.demo --reduced`): every stage runs for real and the
report holds every metric for both models. The full demo (make demo) is not run here."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from finelap import demo
from tests.train_fixtures import REPO, environment


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "finelap.demo", "--reduced", "--out", str(out)], cwd=REPO,
                            env=environment(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"demo failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return out, result.stdout


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """(task, metric label) -> the cells after them, from the metrics table of report.md."""
    rows = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in {"retrieval", "zero_shot", "sed", "grounding"}:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.mark.distributed
def test_every_stage_reports_progress_and_time(demo_run):
    out, stdout = demo_run
    for number, stage in enumerate(("data", "train", "export", "eval", "report"), start=1):
        assert f"[{number}/5] {stage} done in" in stdout
    report = (out / "report.md").read_text()
    for stage in ("data", "train", "export", "eval", "total"):
        assert f"| {stage} |" in report
    # the report names what its numbers are exact for: the CPU type and the thread counts
    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))
    assert f"Machine: {cpu}, {os.cpu_count()} logical cores; training ran 2 ranks x 1 thread, evaluation " in report


@pytest.mark.distributed
def test_report_holds_every_metric_for_both_models(demo_run):
    out, _ = demo_run
    rows = report_rows((out / "report.md").read_text())
    trained = json.loads((out / "eval_trained" / "metrics.json").read_text())
    untrained = json.loads((out / "eval_untrained" / "metrics.json").read_text())
    assert len(rows) == len(demo.HEADLINE)
    for task, metric, label, _ in demo.HEADLINE:
        _, baseline_cell, trained_cell = rows[(task, label)]
        for cell, metrics in ((baseline_cell, untrained), (trained_cell, trained)):
            value = metrics[task][metric]
            assert value is not None and math.isfinite(value), (task, metric)
            assert float(cell) == pytest.approx(value, abs=5e-4), (task, metric)
    assert trained["retrieval"]["num_audio"] == demo.REDUCED.eval_mixtures
    assert trained["zero_shot"]["num_classes"] == len((out / "data" / "classes.txt").read_text().split("\n")) - 1
    # the two models differ: the trained one is not the baseline saved twice
    assert any(trained[t][m] != untrained[t][m] for t, m, _, _ in demo.HEADLINE)


@pytest.mark.distributed
def test_pictures_are_written(demo_run):
    out, _ = demo_run
    report = (out / "report.md").read_text()
    for name in ("training_loss.png", "frame_scores_heatmap.png"):
        assert f"]({name})" in report
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert np.ptp(image[..., :3]) > 0  # not a blank canvas


@pytest.mark.distributed
def test_training_ran_both_streams_on_two_ranks(demo_run):
    out, _ = demo_run
    log = read_jsonl(out / "train" / "train_log.jsonl")
    assert [record["step"] for record in log] == [1, 2, 3]
    assert all(record["clip_loss"] > 0 and record["frame_loss"] > 0 for record in log)
    assert all(record["frame_rows"] > 0 and record["phrase_columns"] > 0 for record in log)
    assert (out / "train" / "samples_rank00001.jsonl").is_file()  # a second rank took part
    assert (out / "model" / "model.safetensors").is_file() and (out / "model_untrained" / "model.safetensors").is_file()


@pytest.mark.distributed
def test_training_data_and_held_out_sets(demo_run):
    out, _ = demo_run
    data = out / "data"
    annotated = read_jsonl(data / "train_annotated" / "metadata.jsonl")
    caption_only = read_jsonl(data / "train_caption_only" / "caption_only.jsonl")
    assert len(annotated) == demo.REDUCED.annotated and all(row["phrases"] for row in annotated)
    assert len(caption_only) == demo.REDUCED.caption_only
    assert all(set(row) == {"audio_id", "audio_path", "caption"} for row in caption_only)
    assert len({row["caption"] for row in caption_only}) > len(caption_only) // 2
    assert all((data / "train_caption_only" / row["audio_path"]).is_file() for row in caption_only)

    # held-out mixtures use only the bank's eval split; training mixtures only its train split
    eval_sources = {row["path"] for kind in ("events", "backgrounds") for row in read_jsonl(data / "bank" / f"{kind}_eval.jsonl")}
    for folder, held_out in (("train_annotated", False), ("train_caption_only", False),
                             ("eval_mixtures", True), ("eval_single_events", True)):
        for mixture in read_jsonl(data / folder / "mixtures.jsonl"):
            sources = [mixture["background"]["source"]] + [event["source"] for event in mixture["events"]]
            relative = {source.split("/bank/", 1)[1] for source in sources}
            assert (relative <= eval_sources) if held_out else not (relative & eval_sources), (folder, relative)

    retrieval = read_jsonl(data / "eval_mixtures" / "retrieval.jsonl")
    assert len(retrieval) == demo.REDUCED.eval_mixtures
    for row in retrieval:
        assert len(row["caption"]) == demo.REDUCED.captions_per_clip == len(set(row["caption"]))
    labels = read_jsonl(data / "eval_single_events" / "labels.jsonl")
    single = read_jsonl(data / "eval_single_events" / "mixtures.jsonl")
    assert [row["label"] for row in labels] == [mixture["events"][0]["label"] for mixture in single]
    assert all(len(mixture["events"]) == 1 for mixture in single)


def test_caption_variants_name_the_same_events_differently():
    details = {
        "audio_id": "x", "caption": "A bell is heard, over pink noise.", "duration": 5.0,
        "events": [{"label": "bell", "name": "bell", "placements": [[0.5, 1.5]], "snr_db": 15.0},
                   {"label": "siren", "name": "siren", "placements": [[2.0, 4.0]], "snr_db": 14.0}],
        "background": {"label": "pink noise", "name": "pink noise"},
    }
    names = {"bell": ["bell", "chime"], "siren": ["siren", "wailing siren"], "pink noise": ["pink noise", "static"]}
    captions = demo.caption_variants(details, names, 3, seed=0)
    assert captions[0] == details["caption"] and len(set(captions)) == 3
    for caption in captions[1:]:
        text = caption.lower()
        assert ("bell" in text or "chime" in text) and "siren" in text and ("pink noise" in text or "static" in text)
        assert text.index("siren") > max(text.find("bell"), text.find("chime"))  # temporal order kept


def test_learning_bar_criteria():
    untrained = {"sed": {"psds1": 0.05}, "retrieval": {"t2a_R@1": 0.2, "num_audio": 500},
                 "zero_shot": {"accuracy": 5.0, "num_classes": 18}}
    passing = {"sed": {"psds1": 0.30}, "retrieval": {"t2a_R@1": 2.0, "num_audio": 500},
               "zero_shot": {"accuracy": 100 * 5 / 18, "num_classes": 18}}
    assert all(met for _, met, _ in demo.learning_bar(passing, untrained))
    failing = {"sed": {"psds1": 0.14}, "retrieval": {"t2a_R@1": 1.8, "num_audio": 500},
               "zero_shot": {"accuracy": 27.0, "num_classes": 18}}
    assert [met for _, met, _ in demo.learning_bar(failing, untrained)] == [False, False, False, False]


def test_reports_say_when_runs_are_not_comparable(tmp_path):
    def run(name, step, total, stopped_by=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "finished.json").write_text(json.dumps({"step": step, "total_steps": total, "stopped_by": stopped_by}))
        return folder

    full, cut = run("full", 900, 900), run("cut", 405, 900, "max_minutes")
    assert demo._stop_note(full) == ""
    assert "405" not in demo._stop_note(cut) and "of 900 planned" in demo._stop_note(cut)
    assert "not comparable" in demo._stop_note(cut)
    same = {"clip_only": full, "dual": run("dual", 900, 900)}
    assert demo._steps_note(same) == "Every run trained the same 900 steps."
    note = demo._steps_note({"clip_only": full, "dual": cut})
    assert note.startswith("**Not comparable**") and "clip_only 900 of 900, dual 405 of 900" in note
