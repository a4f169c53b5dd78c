"""`finelap eval` end to end: a tiny untrained FineLAP on a small generated set of real WAV files."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
from sed_scores_eval import collar_based, intersection_based

from finelap.eval.cli import main
from finelap.metrics import sed as sed_module
from finelap.models import build_model, load_model_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
CLASSES = ["dog_bark", "siren", "speech"]


def _write_wav(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    time = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * seed) * time) + 0.05 * rng.standard_normal(time.shape)
    soundfile.write(path, tone.astype(np.float32), SAMPLE_RATE)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    build_model(load_model_config(REPO / "configs/model/tiny.yaml"), seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four clips of 2-3.5 s; files for every task type."""
    root = tmp_path_factory.mktemp("data")
    (root / "audio").mkdir()
    durations = {f"clip{i}.wav": 2.0 + 0.5 * i for i in range(4)}
    for i, (name, seconds) in enumerate(durations.items()):
        _write_wav(root / "audio" / name, seconds, seed=i)
    with open(root / "retrieval.jsonl", "w") as handle:
        for i, name in enumerate(durations):
            captions = [f"a {CLASSES[i % 3].replace('_', ' ')} sound number {i}", f"clip {i} with a tone"][: 1 + i % 2]
            handle.write(json.dumps({"audio_id": name, "audio_path": f"audio/{name}", "caption": captions}) + "\n")
    (root / "labels.csv").write_text(
        "filename,fold,label\n" + "".join(f"audio/{name},1,{CLASSES[i % 3]}\n" for i, name in enumerate(durations))
    )
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    events = [("clip0.wav", 0.2, 1.1, "dog_bark"), ("clip0.wav", 1.3, 1.9, "siren"),
              ("clip1.wav", 0.5, 2.0, "speech"), ("clip2.wav", 0.1, 0.9, "dog_bark"),
              ("clip2.wav", 1.0, 2.9, "siren"), ("clip3.wav", 2.0, 3.5, "speech")]
    pd.DataFrame(events, columns=["filename", "onset", "offset", "event_label"]).to_csv(
        root / "audio" / "events.tsv", sep="\t", index=False)
    pd.DataFrame(list(durations.items()), columns=["filename", "duration"]).to_csv(
        root / "audio" / "durations.tsv", sep="\t", index=False)
    with open(root / "grounding.jsonl", "w") as handle:
        for i, name in enumerate(durations):
            phrases = [{"phrase": label.replace("_", " "), "segments": [[on, off]]}
                       for file, on, off, label in events if file == name]
            phrases.append({"phrase": "a cat meowing", "segments": []})  # a pair without any segment
            handle.write(json.dumps({"audio_id": name, "audio_path": f"audio/{name}", "caption": "x",
                                     "phrases": phrases}) + "\n")
    (root / "eval.yaml").write_text(f"""
batch_size: 3
heatmaps: 2
tasks:
  - {{name: toycaps, type: retrieval, metadata: {root}/retrieval.jsonl}}
  - {{name: toy50, type: zero_shot, metadata: {root}/labels.csv, audio_root: {root}, classes: {root}/classes.txt}}
  - {{name: toysed, type: sed, metadata: {root}/audio/events.tsv, durations: {root}/audio/durations.tsv}}
  - {{name: toyground, type: grounding, metadata: {root}/grounding.jsonl}}
""")
    return root


def test_finelap_eval_writes_metrics_report_plots_and_rescorable_scores(tiny_model, dataset, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model), "--config", str(dataset / "eval.yaml"), "--out", str(out),
                 "--device", "cpu", "--save-scores"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"toycaps", "toy50", "toyground", "toysed"}
    retrieval = metrics["toycaps"]
    assert retrieval["num_audio"] == 4 and retrieval["num_captions"] == 6
    assert 0 <= retrieval["t2a_R@1"] <= retrieval["t2a_R@5"] == retrieval["t2a_R@10"] == 100.0  # 4 clips: top 5 has all
    assert retrieval["a2t_R@10"] == 100.0
    assert metrics["toy50"]["num_clips"] == 4 and 0 <= metrics["toy50"]["accuracy"] <= 100
    assert metrics["toy50"]["accuracy"] % 25 == 0  # a whole number of the 4 clips
    sed = metrics["toysed"]
    assert sed["num_clips"] == 4 and sed["num_classes"] == 3
    assert all(0 <= sed[key] <= 1 for key in ("psds1", "psds2", "event_f1_macro", "segment_f1_macro"))
    grounding = metrics["toyground"]
    assert grounding["num_pairs"] == 10 and 0 <= grounding["threshold_auc"] <= 1

    report = (out / "report.md").read_text()
    for name in ("toycaps", "toy50", "toysed", "toyground"):
        assert f"## {name}" in report
    assert "| t2a_R@1 |" in report and "| psds1 |" in report
    for png in ["toycaps_t2a_ranks.png", "toysed_psd_roc.png", "toyground_psd_roc.png",
                "toysed_heatmap_clip0.png", "toysed_heatmap_clip1.png", "toyground_heatmap_clip0.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report

    # Saved scores: one file per clip, frames past each clip's end dropped, and rescoring them
    # with `finelap eval sed` reproduces the numbers of the model run.
    scores_dir = out / "scores" / "toysed"
    assert sorted(p.name for p in scores_dir.iterdir()) == [f"clip{i}.tsv" for i in range(4)]
    clip3 = pd.read_csv(scores_dir / "clip3.tsv", sep="\t")
    assert list(clip3.columns) == ["onset", "offset", *CLASSES]
    assert clip3["offset"].iloc[-1] == pytest.approx(3.5) and clip3["onset"].iloc[-1] < 3.5
    rescored = tmp_path / "rescored"
    assert main(["sed", "--scores", str(scores_dir), "--ground-truth", str(dataset / "audio/events.tsv"),
                 "--durations", str(dataset / "audio/durations.tsv"), "--out", str(rescored), "--name", "toysed"]) == 0
    again = json.loads((rescored / "metrics.json").read_text())["toysed"]
    for key in ("psds1", "psds2", "event_f1_macro", "segment_f1_micro"):
        assert again[key] == pytest.approx(sed[key])

    regrounded = tmp_path / "regrounded"
    assert main(["grounding", "--scores", str(out / "scores" / "toyground"),
                 "--ground-truth", str(dataset / "grounding.jsonl"), "--out", str(regrounded),
                 "--name", "toyground"]) == 0
    again = json.loads((regrounded / "metrics.json").read_text())["toyground"]
    for key in ("psds1", "psds_0.5", "threshold_auc"):
        assert again[key] == pytest.approx(grounding[key])


def test_bad_audio_is_an_error_naming_the_line_or_a_counted_skip(tiny_model, dataset, tmp_path, capsys):
    (tmp_path / "audio").symlink_to(dataset / "audio")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio")
    good = (dataset / "retrieval.jsonl").read_text().splitlines()
    broken = json.dumps({"audio_id": "broken", "audio_path": "broken.wav", "caption": ["noise"]})
    missing = json.dumps({"audio_id": "gone", "audio_path": "audio/gone.wav", "caption": ["nothing"]})
    metadata = tmp_path / "retrieval.jsonl"
    config = tmp_path / "eval.yaml"
    config.write_text(f"tasks:\n  - {{name: r, type: retrieval, metadata: {metadata}}}\n")
    run = ["--model", str(tiny_model), "--config", str(config)]

    metadata.write_text("\n".join(good[:2] + [missing] + good[2:]) + "\n")
    assert main(run + ["--out", str(tmp_path / "a")]) == 1
    assert f"{metadata}:3: audio file not found: {tmp_path / 'audio/gone.wav'}" in capsys.readouterr().err

    metadata.write_text("\n".join(good[:3] + [broken] + good[3:]) + "\n")
    assert main(run + ["--out", str(tmp_path / "b")]) == 1
    assert f"{metadata}:4: {tmp_path / 'broken.wav'}" in capsys.readouterr().err

    metadata.write_text("\n".join(good[:2] + [missing] + good[2:3] + [broken] + good[3:]) + "\n")
    assert main(run + ["--out", str(tmp_path / "c"), "--set",
                       f"tasks=[{{name: r, type: retrieval, metadata: {metadata}, on_bad_sample: skip}}]"]) == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["r"]["num_audio"] == 4
    assert "skipped 2 bad sample(s) (audio_missing: 1, audio_unreadable: 1)" in (tmp_path / "c" / "report.md").read_text()


@pytest.mark.parametrize("classes", [["dog_bark"], ["dog_bark", "siren"]])
def test_sed_task_with_one_or_two_classes_equals_sed_scores_eval(tiny_model, dataset, tmp_path, capsys, classes):
    """The SED task of `finelap eval --model` on one class (psds2 without cross-trigger, and a note) or two."""
    # dog_bark sounds through every clip, so even the untrained model finds it without a false alarm
    # (PSDS 1); siren sounds in parts of clips. Its frame scores are all far below 0.5: F1 is 0.
    events = pd.DataFrame([(f"clip{i}.wav", 0.0, 2.0 + 0.5 * i, "dog_bark") for i in range(4)]
                          + [("clip0.wav", 1.3, 1.9, "siren"), ("clip2.wav", 1.0, 3.0, "siren"),
                             ("clip3.wav", 2.0, 3.5, "siren")],
                          columns=["filename", "onset", "offset", "event_label"])
    events = events[events["event_label"].isin(classes)]
    durations = pd.read_csv(dataset / "audio" / "durations.tsv", sep="\t")
    ground_truth = tmp_path / "events.tsv"
    # clips without an event of these classes are listed by a row without onset, offset and label
    pd.concat([events, durations[~durations["filename"].isin(events["filename"])][["filename"]]]).to_csv(
        ground_truth, sep="\t", index=False)
    config = tmp_path / "eval.yaml"
    config.write_text(f"tasks:\n  - {{name: sed, type: sed, metadata: {ground_truth}, audio_root: {dataset / 'audio'}, "
                      f"durations: {dataset / 'audio/durations.tsv'}}}\n")
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model), "--config", str(config), "--out", str(out), "--device", "cpu",
                 "--save-scores"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["sed"]
    printed = capsys.readouterr().out
    assert metrics["num_classes"] == len(classes)

    truth = {name[:-4]: [(row.onset, row.offset, row.event_label)
                         for row in events.itertuples() if row.filename == name]
             for name in durations["filename"]}
    files = dict(scores=out / "scores" / "sed", ground_truth=truth,
                 audio_durations={row.filename[:-4]: row.duration for row in durations.itertuples()})
    psds2_cross_trigger = dict(cttc_threshold=0.3, alpha_ct=0.5) if len(classes) > 1 else dict(alpha_ct=0)
    expected = {
        "psds1": intersection_based.psds(**files, dtc_threshold=0.7, gtc_threshold=0.7, alpha_ct=0, alpha_st=1,
                                         max_efpr=100)[0],
        "psds2": intersection_based.psds(**files, dtc_threshold=0.1, gtc_threshold=0.1, alpha_st=1, max_efpr=100,
                                         **psds2_cross_trigger)[0],
        "event_f1_macro": collar_based.fscore(
            scores=files["scores"], ground_truth=truth, threshold=0.5, onset_collar=0.2, offset_collar=0.2,
            offset_collar_rate=0.2)[0]["macro_average"],
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert (metrics["psds2"] == 1.0) if len(classes) == 1 else (0 < metrics["psds2"] < 1)
    assert "metric_errors" not in metrics
    note = ("computed without the cross-trigger term (cttc_threshold None, alpha_ct 0): "
            "there is one event class, so no other class to cross-trigger")
    if len(classes) == 1:
        assert metrics["metric_notes"] == {"psds2": note}
        assert f"sed: note: psds2 {note}" in printed
        assert f"> psds2: {note}" in (out / "report.md").read_text()
    else:
        assert "metric_notes" not in metrics and "cross-trigger" not in (out / "report.md").read_text()


def test_a_failing_sed_metric_leaves_the_other_metrics_and_tasks_written(
    tiny_model, dataset, tmp_path, capsys, monkeypatch
):
    def broken_fscore(**_):
        raise RuntimeError("collar scoring broke")

    monkeypatch.setattr(sed_module.collar_based, "fscore", broken_fscore)
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model), "--config", str(dataset / "eval.yaml"), "--out", str(out),
                 "--device", "cpu"]) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"toycaps", "toy50", "toyground", "toysed"}
    sed = metrics["toysed"]
    assert sed["event_f1_macro"] is None and sed["event_f1_micro"] is None
    assert all(0 <= sed[key] <= 1 for key in ("psds1", "psds2", "segment_f1_macro", "segment_f1_micro"))
    error = "RuntimeError: collar scoring broke"
    assert sed["metric_errors"] == {"event_f1_macro": error, "event_f1_micro": error}
    assert "metric_errors" not in metrics["toyground"] and metrics["toycaps"]["num_audio"] == 4
    assert (f"finelap eval: error: task 'toysed': event_f1_micro could not be computed: {error} "
            f"(null in {out / 'metrics.json'}, which holds the metrics that were computed)") in capsys.readouterr().err
    assert f"> event_f1_macro could not be computed: {error}" in (out / "report.md").read_text()
