"""`finelap eval`: retrieval, zero-shot, SED and grounding metrics of a FineLAP model folder.

    finelap eval --model MODEL_DIR --config configs/eval/X.yaml [--out DIR] [--save-scores]
    finelap eval sed --scores DIR --ground-truth GT.tsv --durations D.tsv [--out DIR]
    finelap eval grounding --scores DIR --ground-truth G.jsonl [--durations D.tsv] [--out DIR]

The first form runs every task of the config, each on its own files, and
writes metrics.json, report.md and PNG plots into --out. The other two
score saved frame scores (sed_scores_eval score files, one TSV per clip or
per (audio, phrase) pair, as written by `--save-scores`), so other systems
are measured the same way. Metric definitions: finelap/metrics/*.py.

A metric that cannot be computed does not stop the others: they are all
written, the failed one is null in metrics.json with its error under the
task's "metric_errors", the error is printed to stderr, and the exit status
is 1 (as for bad input, which writes nothing). A metric computed differently
from its definition (PSDS2 of a single event class, without cross-trigger)
is named under "metric_notes", in report.md and on the terminal.

Config (YAML, keys checked by finelap.config; relative paths are relative
to the working directory, or to `root`):

    root: null              # null: the working directory; else a folder, relative to the config file's
    batch_size: 16          # clips / texts per forward pass
    device: null            # null: cuda when available
    heatmaps: 3             # frame-score heatmaps drawn per SED / grounding task
    tasks:
      - name: audiocaps
        type: retrieval     # retrieval | zero_shot | sed | grounding
        metadata: data/audiocaps/test.jsonl
        audio_root: null    # relative audio paths: default the metadata file's folder
Every task key is listed, with its default, in `EvalTaskConfig`; examples: configs/eval/*.yaml.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import soundfile
from sed_scores_eval.base_modules.io import read_sed_scores, write_sed_scores
from tqdm import tqdm

from finelap.audio.io import AudioLoadError
from finelap.config import ConfigError, add_set_argument, load_config
from finelap.eval_data import (
    BadInputPolicy, EvalDataError, GroundingPair, clip_id, read_classes, read_durations, read_grounding,
    read_labels, read_retrieval, read_sed_ground_truth,
)
from finelap.metrics.classification import accuracy, mean_average_precision
from finelap.metrics.grounding import PHRASE_CLASS, THRESHOLDS, grounding_metrics, merge_segments
from finelap.metrics.retrieval import retrieval_metrics
from finelap.metrics.sed import merge_overlapping_events, score_dataframe, sed_metrics
from finelap.plots import plot_frame_scores
from finelap.report import TaskReport, plot_psd_rocs, plot_rank_histogram, plot_threshold_f1, write_report

logger = logging.getLogger("finelap.evaluate")

DEFAULT_PROMPTS = {"zero_shot": "The sound of {label}", "sed": "{label}"}


# ---------------------------------------------------------------- config


@dataclass
class EvalTaskConfig:
    """One evaluation task on one dataset."""

    name: str  # names the task in metrics.json, the report and plot files
    type: Literal["retrieval", "zero_shot", "sed", "grounding"]
    metadata: str  # retrieval JSONL | zero-shot CSV/JSONL labels | SED ground-truth TSV | grounding JSON(L)
    audio_root: str | None = None  # relative audio paths resolve here (default: the metadata file's folder)
    classes: str | None = None  # zero_shot / sed: class list file, one label per line (default: labels present)
    filename_column: str = "filename"  # zero_shot CSV: column of audio paths (relative to audio_root)
    label_column: str = "label"  # zero_shot CSV: column of labels ("category" in ESC-50's esc50.csv)
    durations: str | None = None  # sed (required) / grounding (default: read from the audio files)
    # text embedded per class, "{label}" replaced; default "The sound of {label}" (zero_shot), "{label}" (sed)
    prompt_template: str | None = None
    median_filter: int = 3  # frames; sed: on scores before metrics, grounding: on decisions in threshold_auc; 1 = off
    psds_alpha_st: float = 1.0  # sed: PSDS penalty on class instability (the reference uses 0 for AudioSet-strong)
    batch_size: int | None = None  # default: the run's batch_size
    num_jobs: int = 1  # processes sed_scores_eval may use
    on_bad_sample: Literal["error", "skip"] = "error"


@dataclass
class EvalConfig:
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    # relative task paths resolve against this folder, itself relative to the config file's folder
    # ("." for a config kept beside its data, as `finelap synth` writes); null: the working directory
    root: str | None = None
    batch_size: int = 16
    device: str | None = None
    heatmaps: int = 3


def load_eval_config(path: str | Path, overrides: list[str] = ()) -> EvalConfig:
    """Read and check an eval config (unknown keys and bad values are ConfigErrors naming key and file)."""
    config = load_config(path, overrides, section=EvalConfig)
    if not config.tasks:
        raise ConfigError(f"{path}: key 'tasks' lists no task")
    if config.root is not None:
        root = Path(path).resolve().parent / config.root  # an absolute root stays as it is
        for task in config.tasks:
            for key in ("metadata", "audio_root", "classes", "durations"):
                if getattr(task, key) is not None:
                    setattr(task, key, str(root / getattr(task, key)))
    names = [task.name for task in config.tasks]
    for index, task in enumerate(config.tasks):
        if names.count(task.name) > 1:
            raise ConfigError(f"{path}: key 'tasks[{index}].name' = {task.name!r} is used by more than one task")
        if task.type == "sed" and task.durations is None:
            raise ConfigError(f"{path}: key 'tasks[{index}].durations' is required for a sed task")
        if task.median_filter < 1:
            raise ConfigError(f"{path}: key 'tasks[{index}].median_filter' must be at least 1")
        template = task.prompt_template
        if template is not None:
            try:
                usable = "{label}" in template and template.format(label="x") is not None
            except (KeyError, IndexError, ValueError):
                usable = False
            if not usable:
                raise ConfigError(
                    f"{path}: key 'tasks[{index}].prompt_template' = {template!r} must use '{{label}}' "
                    "as its only placeholder"
                )
    if config.batch_size < 1:
        raise ConfigError(f"{path}: key 'batch_size' must be at least 1")
    return config


def prompt_for(label: str, template: str) -> str:
    """The text embedded for a class label: underscores read as spaces ("dog_bark" -> "dog bark")."""
    return template.format(label=label.replace("_", " "))


# ---------------------------------------------------------------- shared steps


def embedded_batches(
    inference, paths: list[Path], wheres: list[str], batch_size: int, policy: BadInputPolicy, desc: str
):
    """Yield (indices into `paths`, AudioEmbeddings) batch by batch, with a progress bar.

    A batch holding an unreadable file is embedded again file by file, so the
    bad file is reported at its metadata line (an error, or a counted skip).
    """
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        indices = list(range(start, min(start + batch_size, len(paths))))
        try:
            embeddings = inference.embed_audio([paths[i] for i in indices])
        except AudioLoadError:
            for index in indices:
                try:
                    yield [index], inference.embed_audio([paths[index]])
                except AudioLoadError as error:
                    policy.bad(wheres[index], error.reason, str(error))
            continue
        yield indices, embeddings


def prepare_sed_ground_truth(
    events: dict[str, list[tuple[float, float, str]]],
    durations: dict[str, float],
    wheres: dict[str, str],
    durations_path: str | Path,
    policy: BadInputPolicy,
) -> tuple[dict[str, list[tuple[float, float, str]]], dict[str, float], int]:
    """Check every clip has a duration, clip events to it, merge same-class overlaps.

    Returns (events, durations) for the usable clips and the number of events merged away.
    """
    kept_events: dict[str, list[tuple[float, float, str]]] = {}
    kept_durations: dict[str, float] = {}
    merged_away = 0
    for identifier, clip_events in events.items():
        where = wheres.get(identifier, identifier)
        if identifier not in durations:
            policy.bad(where, "missing_duration", f"clip '{identifier}' has no duration in {durations_path}")
            continue
        duration = durations[identifier]
        late = [event for event in clip_events if event[0] >= duration]
        if late:
            policy.bad(
                where, "bad_segment", f"clip '{identifier}': event {late[0]} starts after the clip ends ({duration} s)"
            )
            continue
        clipped = [(onset, min(offset, duration), label) for onset, offset, label in clip_events]
        kept_events[identifier], removed = merge_overlapping_events(clipped)
        kept_durations[identifier] = duration
        merged_away += removed
    return kept_events, kept_durations, merged_away


def _require_some(kept, task: EvalTaskConfig) -> None:
    if not kept:
        raise EvalDataError(f"{task.metadata}: task '{task.name}': no audio file could be embedded")


def _skip_notes(policy: BadInputPolicy) -> list[str]:
    if not policy.skips.total:
        return []
    counts = ", ".join(f"{reason}: {count}" for reason, count in policy.skips.counts.items())
    return [f"skipped {policy.skips.total} bad sample(s) ({counts})"]


def _heatmap_path(out_dir: Path, task: str, clip: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in clip)
    return out_dir / f"{task}_heatmap_{safe}.png"


def _sed_report(
    name: str, task_type: str, result, inputs: dict[str, str], out_dir: Path, notes: list[str],
    metric_notes: dict[str, str] | None = None,
) -> TaskReport:
    """The report of a SED or grounding result: PSD-ROC plot, notes, and the metrics that failed."""
    plot = plot_psd_rocs(result.psd_rocs, result.metrics, out_dir / f"{name}_psd_roc.png", f"{name}: PSD-ROC")
    return TaskReport(name, task_type, result.metrics, inputs=inputs, plots=[plot], notes=notes,
                      metric_notes=metric_notes or {}, metric_errors=result.failures)


# ---------------------------------------------------------------- tasks


@dataclass
class TaskContext:
    inference: object  # FineLAPInference
    batch_size: int
    out_dir: Path
    heatmaps: int
    scores_dir: Path | None  # where to save score files (None: not saved)


def run_retrieval(task: EvalTaskConfig, context: TaskContext) -> TaskReport:
    policy = BadInputPolicy(task.on_bad_sample)
    items = read_retrieval(task.metadata, task.audio_root, policy)
    captions = [caption for item in items for caption in item.captions]
    caption_item = np.array([index for index, item in enumerate(items) for _ in item.captions])
    text = context.inference.embed_text(captions)
    rows: dict[int, np.ndarray] = {}
    for indices, embeddings in embedded_batches(
        context.inference, [item.audio_path for item in items], [item.where for item in items],
        context.batch_size, policy, f"{task.name} audio",
    ):
        similarity = context.inference.clip_similarity(embeddings, text).double().numpy()
        rows.update(zip(indices, similarity))
    kept = sorted(rows)  # items whose audio could be embedded
    _require_some(kept, task)
    row_of = {item_index: row for row, item_index in enumerate(kept)}
    caption_kept = np.isin(caption_item, kept)
    similarity = np.stack([rows[index] for index in kept])[:, caption_kept]
    result = retrieval_metrics(similarity, np.array([row_of[i] for i in caption_item[caption_kept]]))
    metrics = {**result.metrics, "num_audio": len(kept), "num_captions": int(caption_kept.sum())}
    plot = plot_rank_histogram(
        result.text_to_audio_ranks, context.out_dir / f"{task.name}_t2a_ranks.png", f"{task.name}: text-to-audio ranks"
    )
    return TaskReport(task.name, task.type, metrics, inputs={"metadata": task.metadata}, plots=[plot],
                      notes=_skip_notes(policy))


def run_zero_shot(task: EvalTaskConfig, context: TaskContext) -> TaskReport:
    policy = BadInputPolicy(task.on_bad_sample)
    classes = read_classes(task.classes) if task.classes else None
    clips = read_labels(task.metadata, task.audio_root, policy, classes, task.filename_column, task.label_column)
    if classes is None:
        classes = sorted({label for clip in clips for label in clip.labels})
    template = task.prompt_template or DEFAULT_PROMPTS["zero_shot"]
    text = context.inference.embed_text([prompt_for(label, template) for label in classes])
    rows: dict[int, np.ndarray] = {}
    for indices, embeddings in embedded_batches(
        context.inference, [clip.audio_path for clip in clips], [clip.where for clip in clips],
        context.batch_size, policy, f"{task.name} audio",
    ):
        rows.update(zip(indices, context.inference.clip_scores(embeddings, text).double().numpy()))
    kept = sorted(rows)
    _require_some(kept, task)
    scores = np.stack([rows[index] for index in kept])  # [N, K]
    class_index = {label: k for k, label in enumerate(classes)}
    multi_label = any(len(clips[index].labels) != 1 for index in kept)
    metrics: dict[str, float] = {}
    if multi_label:
        targets = np.zeros_like(scores, dtype=np.int64)
        for row, index in enumerate(kept):
            targets[row, [class_index[label] for label in clips[index].labels]] = 1
        metrics["mAP"] = mean_average_precision(scores, targets)
    else:
        metrics["accuracy"] = accuracy(scores, np.array([class_index[clips[index].labels[0]] for index in kept]))
    metrics.update(num_clips=len(kept), num_classes=len(classes))
    inputs = {"metadata": task.metadata, "prompt": template}
    return TaskReport(task.name, task.type, metrics, inputs=inputs, notes=_skip_notes(policy))


def run_sed(task: EvalTaskConfig, context: TaskContext) -> TaskReport:
    policy = BadInputPolicy(task.on_bad_sample)
    truth = read_sed_ground_truth(task.metadata, policy)
    durations, _ = read_durations(task.durations)
    events, durations, merged_away = prepare_sed_ground_truth(
        truth.events, durations, truth.where, task.durations, policy
    )
    classes = read_classes(task.classes) if task.classes else truth.labels
    known = set(classes)
    for identifier in list(events):
        unknown = sorted({label for _, _, label in events[identifier]} - known)
        if unknown:
            policy.bad(
                truth.where[identifier], "unknown_label",
                f"clip '{identifier}': label(s) {unknown} are not in {task.classes}",
            )
            del events[identifier], durations[identifier]
    root = Path(task.audio_root) if task.audio_root else Path(task.metadata).parent
    identifiers = []
    for identifier in events:
        path = root / truth.filenames[identifier]
        if not path.is_file():
            policy.bad(truth.where[identifier], "audio_missing", f"audio file not found: {path}")
            continue
        identifiers.append(identifier)
    template = task.prompt_template or DEFAULT_PROMPTS["sed"]
    text = context.inference.embed_text([prompt_for(label, template) for label in classes])

    scores: dict[str, pd.DataFrame] = {}
    for indices, embeddings in embedded_batches(
        context.inference, [root / truth.filenames[i] for i in identifiers],
        [truth.where[i] for i in identifiers], context.batch_size, policy, f"{task.name} audio",
    ):
        frame_scores = context.inference.frame_scores(embeddings, text).double().numpy()  # [b, K, T]
        for row, index in enumerate(indices):
            identifier = identifiers[index]
            scores[identifier] = score_dataframe(
                frame_scores[row].T, embeddings.frame_hop_seconds, durations[identifier], classes, task.median_filter
            )
    _require_some(scores, task)
    events = {identifier: events[identifier] for identifier in scores}
    durations = {identifier: durations[identifier] for identifier in scores}
    result = sed_metrics(scores, events, durations, alpha_st=task.psds_alpha_st, num_jobs=task.num_jobs)
    result.metrics.update(num_clips=len(scores), num_classes=len({label for e in events.values() for _, _, label in e}))
    notes = _skip_notes(policy)
    if merged_away:
        notes.append(f"{merged_away} overlapping same-class ground-truth event(s) merged into their neighbours")
    report = _sed_report(task.name, task.type, result, {"ground truth": task.metadata, "durations": task.durations},
                         context.out_dir, notes, result.notes)
    for identifier in sorted(scores)[:context.heatmaps]:
        frame = scores[identifier]
        present = [label for label in classes if any(e[2] == label for e in events[identifier])] or classes[:5]
        hop = float(frame["offset"].iloc[0] - frame["onset"].iloc[0])
        report.plots.append(plot_frame_scores(
            frame[present].to_numpy().T, present, hop, _heatmap_path(context.out_dir, task.name, identifier),
            segments=[[(on, off) for on, off, label in events[identifier] if label == p] for p in present],
            title=f"{task.name}: {identifier}",
        ))
    if context.scores_dir is not None:
        write_sed_scores(scores, context.scores_dir / task.name)
    return report


def _grounding_durations(
    pairs: list[GroundingPair], durations_path: str | Path | None, policy: BadInputPolicy
) -> dict[str, float]:
    """Duration of each pair's audio: from the durations TSV when given, else read from the audio file."""
    by_clip = read_durations(durations_path)[0] if durations_path else {}
    durations: dict[str, float] = {}
    for pair in pairs:
        if pair.audio_id not in by_clip:
            if durations_path:
                message = f"clip '{pair.audio_id}' has no duration in {durations_path}"
                policy.bad(pair.where, "missing_duration", message)
                continue
            try:
                by_clip[pair.audio_id] = soundfile.info(str(pair.audio_path)).duration
            except soundfile.LibsndfileError as error:
                policy.bad(pair.where, "audio_unreadable", f"cannot read {pair.audio_path}: {error}")
                continue
        durations[pair.pair_id] = by_clip[pair.audio_id]
    return durations


def _clip_segments(pairs: list[GroundingPair], durations: dict[str, float], policy: BadInputPolicy) -> dict[str, list]:
    """Ground truth per pair with a duration: segments cut at the clip's end, overlaps merged."""
    truth: dict[str, list[tuple[float, float]]] = {}
    for pair in pairs:
        if pair.pair_id not in durations:
            continue
        duration = durations[pair.pair_id]
        late = [segment for segment in pair.segments if segment[0] >= duration]
        if late:
            message = f"phrase '{pair.phrase}': segment {late[0]} starts after the clip ends ({duration} s)"
            policy.bad(pair.where, "bad_segment", message)
            continue
        truth[pair.pair_id] = merge_segments([(onset, min(offset, duration)) for onset, offset in pair.segments])
    return truth


def run_grounding(task: EvalTaskConfig, context: TaskContext) -> TaskReport:
    policy = BadInputPolicy(task.on_bad_sample)
    pairs = read_grounding(task.metadata, task.audio_root, policy)
    durations = _grounding_durations(pairs, task.durations, policy)
    truth = _clip_segments(pairs, durations, policy)
    pairs = [pair for pair in pairs if pair.pair_id in truth]
    audio_paths = list(dict.fromkeys(pair.audio_path for pair in pairs))
    pairs_of_audio: dict[Path, list[GroundingPair]] = {path: [] for path in audio_paths}
    for pair in pairs:
        pairs_of_audio[pair.audio_path].append(pair)
    phrases = list(dict.fromkeys(pair.phrase for pair in pairs))
    phrase_index = {phrase: k for k, phrase in enumerate(phrases)}
    text = context.inference.embed_text(phrases)

    scores: dict[str, pd.DataFrame] = {}
    raw: dict[Path, tuple[np.ndarray, float]] = {}  # per audio: [P_a, T] scores, hop (heatmaps)
    for indices, embeddings in embedded_batches(
        context.inference, audio_paths, [pairs_of_audio[p][0].where for p in audio_paths],
        context.batch_size, policy, f"{task.name} audio",
    ):
        wanted = sorted({phrase_index[pair.phrase] for i in indices for pair in pairs_of_audio[audio_paths[i]]})
        column = {k: c for c, k in enumerate(wanted)}
        frame_scores = context.inference.frame_scores(embeddings, text[wanted]).double().numpy()  # [b, P', T]
        for row, index in enumerate(indices):
            audio_pairs = pairs_of_audio[audio_paths[index]]
            pair_rows = frame_scores[row, [column[phrase_index[pair.phrase]] for pair in audio_pairs]]  # [P_a, T]
            if len(raw) < context.heatmaps:
                raw[audio_paths[index]] = (pair_rows, embeddings.frame_hop_seconds)
            for pair, pair_scores in zip(audio_pairs, pair_rows):
                scores[pair.pair_id] = score_dataframe(
                    pair_scores[:, None], embeddings.frame_hop_seconds, durations[pair.pair_id], [PHRASE_CLASS]
                )
    _require_some(scores, task)
    truth = {pair_id: truth[pair_id] for pair_id in scores}
    durations = {pair_id: durations[pair_id] for pair_id in scores}
    result = grounding_metrics(scores, truth, durations, median_filter=task.median_filter, num_jobs=task.num_jobs)
    result.metrics.update(num_pairs=len(scores), num_audio=len({p.audio_id for p in pairs if p.pair_id in scores}))
    report = _sed_report(
        task.name, task.type, result, {"metadata": task.metadata}, context.out_dir, _skip_notes(policy)
    )
    report.plots.append(plot_threshold_f1(
        THRESHOLDS, result.f1_by_threshold, context.out_dir / f"{task.name}_f1_by_threshold.png",
        f"{task.name}: F1 vs threshold",
    ))
    for path, (pair_rows, hop) in raw.items():
        audio_pairs = pairs_of_audio[path]
        report.plots.append(plot_frame_scores(
            pair_rows, [pair.phrase for pair in audio_pairs], hop,
            _heatmap_path(context.out_dir, task.name, clip_id(path.name)),
            segments=[truth[pair.pair_id] for pair in audio_pairs], title=f"{task.name}: {path.name}",
        ))
    if context.scores_dir is not None:
        write_sed_scores(scores, context.scores_dir / task.name)
    return report


RUNNERS = {"retrieval": run_retrieval, "zero_shot": run_zero_shot, "sed": run_sed, "grounding": run_grounding}


def evaluate(
    model_dir: str | Path, config: EvalConfig, out_dir: str | Path, save_scores: bool = False
) -> list[TaskReport]:
    """Run every task of `config` with the model folder; write metrics.json, report.md and plots to `out_dir`."""
    from finelap.infer import FineLAPInference  # loads torch models: only when a model is evaluated

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inference = FineLAPInference.from_pretrained(model_dir, device=config.device, batch_size=config.batch_size)
    reports = []
    for task in config.tasks:
        logger.info("evaluating %s (%s)", task.name, task.type)
        context = TaskContext(
            inference=inference, batch_size=task.batch_size or config.batch_size, out_dir=out_dir,
            heatmaps=config.heatmaps, scores_dir=out_dir / "scores" if save_scores else None,
        )
        reports.append(RUNNERS[task.type](task, context))
    write_report(reports, out_dir, title=f"FineLAP evaluation of {Path(model_dir).name}")
    return reports


# ---------------------------------------------------------------- saved scores


def _read_scores(directory: Path) -> dict[str, pd.DataFrame]:
    if not directory.is_dir():
        raise EvalDataError(f"scores folder not found: {directory}")
    try:
        scores = read_sed_scores(directory)
    except (ValueError, pd.errors.ParserError) as error:
        raise EvalDataError(f"{directory}: not a folder of sed_scores_eval score files: {error}") from None
    if not scores:
        raise EvalDataError(f"{directory}: holds no .tsv score files")
    return scores


def evaluate_sed_scores(
    scores_dir: Path, ground_truth: Path, durations_path: Path, out_dir: Path, name: str = "sed",
    alpha_st: float = 1.0, on_bad_sample: str = "error",
) -> TaskReport:
    """SED metrics of saved score files against a DCASE ground-truth TSV and durations TSV."""
    policy = BadInputPolicy(on_bad_sample)
    scores = _read_scores(scores_dir)
    truth = read_sed_ground_truth(ground_truth, policy)
    durations, _ = read_durations(durations_path)
    events, durations, merged_away = prepare_sed_ground_truth(
        truth.events, durations, truth.where, durations_path, policy
    )
    without_scores = sorted(set(events) - set(scores))
    if without_scores:
        raise EvalDataError(f"{scores_dir}: no score file for {len(without_scores)} clip(s) of {ground_truth}, e.g. "
                            f"{[i + '.tsv' for i in without_scores[:3]]}")
    classes = list(next(iter(scores.values())).columns[2:])
    for identifier, clip_events in events.items():
        unknown = sorted({label for _, _, label in clip_events} - set(classes))
        if unknown:
            raise EvalDataError(
                f"{truth.where[identifier]}: label(s) {unknown} have no column in the score files {classes}"
            )
    scores = {identifier: scores[identifier] for identifier in events}
    out_dir.mkdir(parents=True, exist_ok=True)
    result = sed_metrics(scores, events, durations, alpha_st=alpha_st)
    result.metrics.update(num_clips=len(scores))
    notes = _skip_notes(policy)
    if merged_away:
        notes.append(f"{merged_away} overlapping same-class ground-truth event(s) merged into their neighbours")
    inputs = {"scores": str(scores_dir), "ground truth": str(ground_truth), "durations": str(durations_path)}
    return _sed_report(name, "sed", result, inputs, out_dir, notes, result.notes)


def evaluate_grounding_scores(
    scores_dir: Path, ground_truth: Path, out_dir: Path, durations_path: Path | None = None,
    name: str = "grounding", median_filter: int = 3, on_bad_sample: str = "error",
) -> TaskReport:
    """Grounding metrics of saved per-pair score files (named `<pair id>.tsv` as `--save-scores` writes them).

    Pair durations come from the durations TSV, else from the end of each pair's score file.
    """
    policy = BadInputPolicy(on_bad_sample)
    scores = _read_scores(scores_dir)
    pairs = read_grounding(ground_truth, None, policy, check_audio=False)
    without_scores = [pair.pair_id for pair in pairs if pair.pair_id not in scores]
    if without_scores:
        raise EvalDataError(f"{scores_dir}: no score file for {len(without_scores)} pair(s) of {ground_truth}, e.g. "
                            f"{[i + '.tsv' for i in without_scores[:3]]}")
    if durations_path is not None:
        task = EvalTaskConfig(name=name, type="grounding", metadata=str(ground_truth), durations=str(durations_path))
        durations = _grounding_durations(pairs, task.durations, policy)
    else:
        durations = {pair.pair_id: float(scores[pair.pair_id]["offset"].iloc[-1]) for pair in pairs}
    truth = _clip_segments(pairs, durations, policy)
    scores = {pair_id: scores[pair_id] for pair_id in truth}
    out_dir.mkdir(parents=True, exist_ok=True)
    result = grounding_metrics(scores, truth, {k: durations[k] for k in truth}, median_filter=median_filter)
    result.metrics.update(num_pairs=len(scores))
    report = _sed_report(name, "grounding", result, {"scores": str(scores_dir), "ground truth": str(ground_truth)},
                         out_dir, _skip_notes(policy))
    report.plots.append(plot_threshold_f1(
        THRESHOLDS, result.f1_by_threshold, out_dir / f"{name}_f1_by_threshold.png", f"{name}: F1 vs threshold"
    ))
    return report


# ---------------------------------------------------------------- command line


def _model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finelap eval",
        description="Evaluate a FineLAP model folder on the tasks of an eval config "
                    "('finelap eval sed|grounding --help': score saved score files instead).",
    )
    parser.add_argument("--model", required=True, type=Path, help="model folder written by FineLAP.save_pretrained")
    parser.add_argument("--config", required=True, type=Path,
                        help="eval config, e.g. configs/eval/audiocaps_clotho_retrieval.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    add_set_argument(parser, dest="overrides", help="override config keys, e.g. --set batch_size=32")
    parser.add_argument("--save-scores", action="store_true",
                        help="also write SED / grounding frame scores as sed_scores_eval files under OUT/scores/TASK")
    return parser


def _sed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finelap eval sed", description="SED metrics of saved sed_scores_eval score files."
    )
    parser.add_argument("--scores", required=True, type=Path, help="folder of score TSVs, one per clip (<clip id>.tsv)")
    parser.add_argument("--ground-truth", required=True, type=Path, help="DCASE TSV: filename onset offset event_label")
    parser.add_argument("--durations", required=True, type=Path, help="TSV: filename duration")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_sed"))
    parser.add_argument("--name", default="sed", help="task name in metrics.json and the report")
    parser.add_argument("--alpha-st", type=float, default=1.0, help="PSDS instability penalty (default 1)")
    parser.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    return parser


def _grounding_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finelap eval grounding",
                                     description="Grounding metrics of saved per-(audio, phrase) score files.")
    parser.add_argument("--scores", required=True, type=Path, help="folder of score TSVs named <pair id>.tsv")
    parser.add_argument("--ground-truth", required=True, type=Path, help="grounding JSON lines or AudioGrounding JSON")
    parser.add_argument("--durations", type=Path, default=None,
                        help="TSV: filename duration (default: where each score file ends)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_grounding"))
    parser.add_argument("--name", default="grounding")
    parser.add_argument("--median-filter", type=int, default=3, help="frames, on threshold decisions (1 = off)")
    parser.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    return parser


def main(argv: list[str]) -> int:
    """Run `finelap eval` (module docstring); returns the exit status.

    0: every metric computed. 1: bad input or config (nothing written), or a
    metric that could not be computed: then the other metrics are still
    written, the failed one is null in metrics.json with its error under
    "metric_errors", and each failure is printed to stderr.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] == "sed":
            args = _sed_parser().parse_args(argv[1:])
            reports = [evaluate_sed_scores(args.scores, args.ground_truth, args.durations, args.out, args.name,
                                           args.alpha_st, args.on_bad_sample)]
            metrics_path, report_path = write_report(reports, args.out, title="SED evaluation of saved scores")
        elif argv and argv[0] == "grounding":
            args = _grounding_parser().parse_args(argv[1:])
            reports = [evaluate_grounding_scores(args.scores, args.ground_truth, args.out, args.durations,
                                                 args.name, args.median_filter, args.on_bad_sample)]
            metrics_path, report_path = write_report(reports, args.out, title="Grounding evaluation of saved scores")
        else:
            from finelap.models.finelap import ModelFolderError

            args = _model_parser().parse_args(argv)
            config = load_eval_config(args.config, args.overrides)
            if args.device is not None:
                config.device = args.device
            try:
                reports = evaluate(args.model, config, args.out, save_scores=args.save_scores)
            except ModelFolderError as error:
                raise EvalDataError(str(error)) from None
            metrics_path, report_path = args.out / "metrics.json", args.out / "report.md"
    except (EvalDataError, ConfigError, AudioLoadError) as error:
        print(f"finelap eval: error: {error}", file=sys.stderr)
        return 1
    print_metrics(metrics_path)
    print(f"wrote {metrics_path} and {report_path}")
    failures = [(report.name, metric, error) for report in reports for metric, error in report.metric_errors.items()]
    for task, metric, error in failures:
        print(f"finelap eval: error: task '{task}': {metric} could not be computed: {error} "
              f"(null in {metrics_path}, which holds the metrics that were computed)", file=sys.stderr)
    return 1 if failures else 0


def print_metrics(metrics_path: Path) -> None:
    """Each task's metrics on the terminal, as metrics.json holds them (no value: n/a), then its metric notes."""
    for task, values in json.loads(Path(metrics_path).read_text()).items():
        notes = values.pop("metric_notes", {})
        values.pop("metric_errors", None)  # main prints these to stderr
        cells = [f"{name} {'n/a' if value is None else f'{value:.4g}' if isinstance(value, float) else value}"
                 for name, value in values.items()]
        print(f"{task}: " + ", ".join(cells))
        for metric, note in notes.items():
            print(f"{task}: note: {metric} {note}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
