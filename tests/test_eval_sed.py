"""SED metrics: `finelap eval sed` on saved score files against sed_scores_eval called directly."""
import json

import numpy as np
import pandas as pd
import pytest
from sed_scores_eval import collar_based, intersection_based, segment_based
from sed_scores_eval.base_modules.io import write_sed_scores

from finelap.eval.cli import main
from finelap.metrics import sed as sed_module
from finelap.metrics.sed import frames_within_clip, merge_overlapping_events, score_dataframe

CLASSES = ["Alarm_bell_ringing", "Dog", "Speech"]
HOP = 0.16


@pytest.fixture
def sed_set(tmp_path):
    """Eight clips (8-10 s), 1-2 non-overlapping events per class and clip; GT and durations TSVs."""
    rng = np.random.default_rng(0)
    rows, durations = [], {}
    for clip in range(8):
        duration = round(8.0 + 0.25 * clip, 2)
        durations[f"clip{clip}.wav"] = duration
        for label in CLASSES:
            onset = rng.uniform(0, 3)
            for _ in range(rng.integers(1, 3)):
                offset = min(onset + rng.uniform(0.4, 2.0), duration)
                rows.append((f"clip{clip}.wav", round(onset, 3), round(offset, 3), label))
                onset = offset + rng.uniform(0.5, 2.0)
                if onset >= duration - 0.5:
                    break
    ground_truth = tmp_path / "events.tsv"
    pd.DataFrame(rows, columns=["filename", "onset", "offset", "event_label"]).to_csv(ground_truth, sep="\t", index=False)
    durations_path = tmp_path / "durations.tsv"
    pd.DataFrame(list(durations.items()), columns=["filename", "duration"]).to_csv(durations_path, sep="\t", index=False)
    return ground_truth, durations_path, rows, durations


def _write_scores(folder, rows, durations, make_scores, classes=CLASSES):
    """One score file per clip on a 0.16 s grid, columns `classes`; make_scores([T, K] in-event mask) -> [T, K]."""
    scores = {}
    for filename, duration in durations.items():
        num_frames = int(np.ceil(duration / HOP))
        centres = (np.arange(num_frames) + 0.5) * HOP
        inside = np.zeros((num_frames, len(classes)))
        for name, onset, offset, label in rows:
            if name == filename and label in classes:
                inside[(centres >= onset) & (centres < offset), classes.index(label)] = 1.0
        scores[filename[:-4]] = score_dataframe(make_scores(inside), HOP, duration, classes)
    write_sed_scores(scores, folder)
    return folder


def _run_sed_cli(scores, ground_truth, durations_path, out):
    assert main(["sed", "--scores", str(scores), "--ground-truth", str(ground_truth),
                 "--durations", str(durations_path), "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())["sed"]


def test_cli_psds_equals_sed_scores_eval_on_the_same_files(sed_set, tmp_path, capsys):
    ground_truth, durations_path, rows, durations = sed_set
    rng = np.random.default_rng(1)
    scores = _write_scores(tmp_path / "scores", rows, durations,
                           lambda inside: np.clip(0.45 * inside + 0.6 * rng.random(inside.shape), 0, 1))
    metrics = _run_sed_cli(scores, ground_truth, durations_path, tmp_path / "out")
    printed = capsys.readouterr().out  # the headline numbers on the terminal too, as metrics.json has them
    assert f"sed: psds1 {metrics['psds1']:.4g}, psds2 {metrics['psds2']:.4g}" in printed

    psds1 = intersection_based.psds(scores=scores, ground_truth=ground_truth, audio_durations=durations_path,
                                    dtc_threshold=0.7, gtc_threshold=0.7, alpha_ct=0, alpha_st=1, max_efpr=100)[0]
    psds2 = intersection_based.psds(scores=scores, ground_truth=ground_truth, audio_durations=durations_path,
                                    dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5,
                                    alpha_st=1, max_efpr=100)[0]
    event_f1 = collar_based.fscore(scores=scores, ground_truth=ground_truth, threshold=0.5, onset_collar=0.2,
                                   offset_collar=0.2, offset_collar_rate=0.2)[0]
    segment_f1 = segment_based.fscore(scores=scores, ground_truth=ground_truth, audio_durations=durations_path,
                                      threshold=0.5, segment_length=1.0)[0]
    assert 0.05 < psds1 < 0.95  # a case where the numbers can disagree
    assert metrics["psds1"] == pytest.approx(psds1, abs=1e-12)
    assert metrics["psds2"] == pytest.approx(psds2, abs=1e-12)
    assert metrics["event_f1_macro"] == pytest.approx(event_f1["macro_average"], abs=1e-12)
    assert metrics["segment_f1_micro"] == pytest.approx(segment_f1["micro_average"], abs=1e-12)
    assert (tmp_path / "out" / "sed_psd_roc.png").stat().st_size > 0


def test_oracle_scores_reach_psds1_near_one_and_random_scores_far_lower(sed_set, tmp_path):
    ground_truth, durations_path, rows, durations = sed_set
    oracle = _run_sed_cli(_write_scores(tmp_path / "oracle", rows, durations, lambda inside: inside),
                          ground_truth, durations_path, tmp_path / "oracle_out")
    rng = np.random.default_rng(2)
    random = _run_sed_cli(_write_scores(tmp_path / "random", rows, durations, lambda inside: rng.random(inside.shape)),
                          ground_truth, durations_path, tmp_path / "random_out")
    assert oracle["psds1"] > 0.95 and oracle["event_f1_macro"] > 0.95
    assert random["psds1"] < 0.3 and random["psds1"] < oracle["psds1"] - 0.6


def test_frames_past_the_end_of_the_clip_are_dropped():
    scores = np.arange(10, dtype=float)[:, None] * np.ones((1, 2))  # 10 frames of 0.16 s = 1.6 s
    kept, timestamps = frames_within_clip(scores, 0.16, duration=1.0)
    assert kept.shape == (7, 2)  # frames starting at 0, 0.16, ..., 0.96 (< 1.0)
    np.testing.assert_allclose(timestamps, [0, 0.16, 0.32, 0.48, 0.64, 0.8, 0.96, 1.0])
    filtered, _ = frames_within_clip(np.array([[0.0], [1.0], [0.0], [0.0], [1.0], [1.0]]), 0.16, 5.0, median_filter=3)
    np.testing.assert_array_equal(filtered[:, 0], [0, 0, 0, 0, 1, 1])


def test_overlapping_same_class_events_are_merged():
    events = [(0.0, 1.0, "a"), (0.5, 2.0, "a"), (2.0, 3.0, "a"), (0.2, 0.4, "b"), (4.0, 5.0, "a")]
    merged, removed = merge_overlapping_events(events)
    assert merged == [(0.0, 3.0, "a"), (0.2, 0.4, "b"), (4.0, 5.0, "a")] and removed == 2


def test_cli_names_clips_without_score_file_or_duration(sed_set, tmp_path, capsys):
    ground_truth, durations_path, rows, durations = sed_set
    scores = _write_scores(tmp_path / "scores", rows, durations, lambda inside: inside)
    (scores / "clip3.tsv").unlink()
    assert main(["sed", "--scores", str(scores), "--ground-truth", str(ground_truth),
                 "--durations", str(durations_path)]) == 1
    assert "no score file for 1 clip(s)" in capsys.readouterr().err

    lines = durations_path.read_text().splitlines()
    short = tmp_path / "short_durations.tsv"
    short.write_text("\n".join(line for line in lines if not line.startswith("clip5")) + "\n")
    assert main(["sed", "--scores", str(tmp_path / "scores"), "--ground-truth", str(ground_truth),
                 "--durations", str(short)]) == 1
    first_clip5_line = 1 + next(i for i, row in enumerate(rows, start=1) if row[0] == "clip5.wav")
    assert f"{ground_truth}:{first_clip5_line}: clip 'clip5' has no duration in {short}" in capsys.readouterr().err


def _noisy(seed):
    rng = np.random.default_rng(seed)
    return lambda inside: np.clip(0.45 * inside + 0.6 * rng.random(inside.shape), 0, 1)


def _expected_sed_metrics(scores, ground_truth, durations_path, cross_trigger):
    """sed_scores_eval called directly; psds2 with the DCASE cross-trigger term or without it."""
    files = dict(scores=scores, ground_truth=ground_truth)
    psds2_cross_trigger = dict(cttc_threshold=0.3, alpha_ct=0.5) if cross_trigger else dict(alpha_ct=0)
    event_f1 = collar_based.fscore(**files, threshold=0.5, onset_collar=0.2, offset_collar=0.2,
                                   offset_collar_rate=0.2)[0]
    segment_f1 = segment_based.fscore(**files, audio_durations=durations_path, threshold=0.5, segment_length=1.0)[0]
    return {
        "psds1": intersection_based.psds(**files, audio_durations=durations_path, dtc_threshold=0.7, gtc_threshold=0.7,
                                         alpha_ct=0, alpha_st=1, max_efpr=100)[0],
        "psds2": intersection_based.psds(**files, audio_durations=durations_path, dtc_threshold=0.1, gtc_threshold=0.1,
                                         alpha_st=1, max_efpr=100, **psds2_cross_trigger)[0],
        "event_f1_macro": event_f1["macro_average"], "event_f1_micro": event_f1["micro_average"],
        "segment_f1_macro": segment_f1["macro_average"], "segment_f1_micro": segment_f1["micro_average"],
    }


ONE_CLASS_NOTE = ("computed without the cross-trigger term (cttc_threshold None, alpha_ct 0): "
                  "there is one event class, so no other class to cross-trigger")


@pytest.fixture
def separated_set(tmp_path):
    """Eight 30 s clips, one Dog and one Speech event (1.5 s each) far apart; every column of clip0's
    scores also rises on the other class's event (a cross-trigger when that class is evaluated)."""
    rows, durations = [], {}
    for clip in range(8):
        durations[f"clip{clip}.wav"] = 30.0
        rows += [(f"clip{clip}.wav", 1.0 + 0.2 * clip, 2.5 + 0.2 * clip, "Dog"),
                 (f"clip{clip}.wav", 15.0 + 0.1 * clip, 16.5 + 0.1 * clip, "Speech")]
    durations_path = tmp_path / "durations.tsv"
    pd.DataFrame(list(durations.items()), columns=["filename", "duration"]).to_csv(
        durations_path, sep="\t", index=False)
    rng = np.random.default_rng(3)

    def write(folder, classes):
        scores = {}
        for filename, duration in durations.items():
            centres = (np.arange(int(duration / HOP)) + 0.5) * HOP
            columns = []
            for label in classes:
                own = other = np.zeros_like(centres)
                for name, onset, offset, event_label in rows:
                    inside = ((centres >= onset) & (centres < offset)).astype(float)
                    if name == filename and event_label == label:
                        own = own + inside
                    elif name == filename == "clip0.wav":
                        other = other + inside
                columns.append(0.5 * own + 0.6 * other + 0.4 * rng.random(centres.shape))
            scores[filename[:-4]] = score_dataframe(np.clip(np.stack(columns, axis=1), 0, 1), HOP, duration, classes)
        write_sed_scores(scores, folder)
        return folder

    return rows, durations_path, write


@pytest.mark.parametrize("classes", [["Dog"], ["Dog", "Speech"]])
def test_cli_on_one_or_two_classes_equals_sed_scores_eval(separated_set, tmp_path, capsys, classes):
    rows, durations_path, write_scores = separated_set
    ground_truth = tmp_path / "events.tsv"
    pd.DataFrame([row for row in rows if row[3] in classes], columns=["filename", "onset", "offset", "event_label"]
                 ).to_csv(ground_truth, sep="\t", index=False)
    scores = write_scores(tmp_path / "scores", classes)
    metrics = _run_sed_cli(scores, ground_truth, durations_path, tmp_path / "out")
    printed = capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text()

    expected = _expected_sed_metrics(scores, ground_truth, durations_path, cross_trigger=len(classes) > 1)
    without_cross_trigger = _expected_sed_metrics(scores, ground_truth, durations_path, cross_trigger=False)["psds2"]
    assert 0.5 < expected["psds1"] < 0.95 and 0.5 < expected["event_f1_macro"] < 0.99
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert "metric_errors" not in metrics
    if len(classes) == 1:
        assert metrics["psds2"] == pytest.approx(without_cross_trigger, abs=1e-12) and 0.5 < metrics["psds2"] < 0.95
        assert metrics["metric_notes"] == {"psds2": ONE_CLASS_NOTE}
        assert f"sed: note: psds2 {ONE_CLASS_NOTE}\n" in printed
        assert f"> psds2: {ONE_CLASS_NOTE}\n" in report
    else:  # clip0's cross-triggers are penalised, as the DCASE psds2 does
        assert metrics["psds2"] < without_cross_trigger - 0.1
        assert "metric_notes" not in metrics and "note" not in printed and "cross-trigger" not in report


def test_one_annotated_class_among_several_score_columns_is_scored_as_one_class(sed_set, tmp_path):
    _, durations_path, rows, durations = sed_set
    ground_truth = tmp_path / "events.tsv"
    pd.DataFrame([row for row in rows if row[3] == "Dog"], columns=["filename", "onset", "offset", "event_label"]
                 ).to_csv(ground_truth, sep="\t", index=False)
    all_columns = _write_scores(tmp_path / "all", rows, durations, _noisy(4))
    dog_only = tmp_path / "dog"
    dog_only.mkdir()
    for path in all_columns.iterdir():  # the same Dog scores, the other columns left out
        pd.read_csv(path, sep="\t")[["onset", "offset", "Dog"]].to_csv(dog_only / path.name, sep="\t", index=False)
    metrics = _run_sed_cli(all_columns, ground_truth, durations_path, tmp_path / "out_all")
    assert metrics == _run_sed_cli(dog_only, ground_truth, durations_path, tmp_path / "out_dog")
    assert metrics["metric_notes"] == {"psds2": ONE_CLASS_NOTE}


def test_a_failing_metric_is_reported_and_the_others_are_still_written(sed_set, tmp_path, capsys, monkeypatch):
    ground_truth, durations_path, rows, durations = sed_set
    scores = _write_scores(tmp_path / "scores", rows, durations, _noisy(5))
    expected = _expected_sed_metrics(scores, ground_truth, durations_path, cross_trigger=True)

    def broken_fscore(**_):
        raise RuntimeError("segment scoring broke")

    monkeypatch.setattr(sed_module.segment_based, "fscore", broken_fscore)
    out = tmp_path / "out"
    assert main(["sed", "--scores", str(scores), "--ground-truth", str(ground_truth),
                 "--durations", str(durations_path), "--out", str(out)]) == 1
    metrics = json.loads((out / "metrics.json").read_text())["sed"]
    for key in ("psds1", "psds2", "event_f1_macro", "event_f1_micro"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    assert metrics["segment_f1_macro"] is None and metrics["segment_f1_micro"] is None
    assert metrics["num_clips"] == 8
    error = "RuntimeError: segment scoring broke"
    assert metrics["metric_errors"] == {"segment_f1_macro": error, "segment_f1_micro": error}
    printed = capsys.readouterr()
    assert (f"finelap eval: error: task 'sed': segment_f1_macro could not be computed: {error} "
            f"(null in {out / 'metrics.json'}, which holds the metrics that were computed)") in printed.err
    assert "segment_f1_macro n/a" in printed.out
    report = (out / "report.md").read_text()
    assert "| segment_f1_micro | n/a |" in report
    assert f"> segment_f1_micro could not be computed: {error}\n" in report
