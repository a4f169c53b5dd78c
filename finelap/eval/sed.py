"""The SED task: frame scores of every class prompt, scored with sed_scores_eval (PSDS1/PSDS2, collar
and segment F1). `score_sed` scores them, for `run_sed` and for saved score files alike."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from sed_scores_eval.base_modules.io import write_sed_scores

from finelap.eval.config import DEFAULT_PROMPTS, EvalTaskConfig, prompt_for
from finelap.eval.embedding import TaskContext, embed_and_collect
from finelap.eval.readers import BadInputPolicy, read_classes, read_durations, read_sed_ground_truth
from finelap.eval.report import TaskReport, heatmap_path, psd_report, skip_notes
from finelap.metrics.sed import Event, merge_overlapping_events, score_dataframe, sed_metrics
from finelap.plots import plot_frame_scores


def prepare_sed_ground_truth(
    events: dict[str, list[Event]],
    durations: dict[str, float],
    wheres: dict[str, str],
    durations_path: str | Path,
    policy: BadInputPolicy,
) -> tuple[dict[str, list[Event]], dict[str, float], int]:
    """Check every clip has a duration, clip events to it, merge same-class overlaps.

    Returns (events, durations) for the usable clips and the number of events merged away.
    """
    kept_events: dict[str, list[Event]] = {}
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


def score_sed(
    name: str, scores: dict[str, pd.DataFrame], events: dict[str, list[Event]], durations: dict[str, float],
    merged_away: int, policy: BadInputPolicy, inputs: dict[str, str], out_dir: Path, alpha_st: float,
    num_jobs: int = 1,
) -> TaskReport:
    """SED metrics of the clips in `scores` (sed_scores_eval score frames, by clip id) against their
    events and durations, and their report: PSD-ROC plot in `out_dir`, notes on skipped samples and
    merged events, metric notes and the metrics that failed."""
    events = {identifier: events[identifier] for identifier in scores}
    durations = {identifier: durations[identifier] for identifier in scores}
    out_dir.mkdir(parents=True, exist_ok=True)
    result = sed_metrics(scores, events, durations, alpha_st=alpha_st, num_jobs=num_jobs)
    result.metrics.update(num_clips=len(scores))
    notes = skip_notes(policy)
    if merged_away:
        notes.append(f"{merged_away} overlapping same-class ground-truth event(s) merged into their neighbours")
    return psd_report(name, "sed", result, inputs, out_dir, notes, result.notes)


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

    def score_frames(embeddings, indices: list[int]) -> list[pd.DataFrame]:
        frame_scores = context.inference.frame_scores(embeddings, text).double().numpy()  # [b, K, T]
        return [
            score_dataframe(frame_scores[row].T, embeddings.frame_hop_seconds, durations[identifiers[index]],
                            classes, task.median_filter)
            for row, index in enumerate(indices)
        ]

    frames = embed_and_collect(
        task, context, [root / truth.filenames[i] for i in identifiers], [truth.where[i] for i in identifiers],
        policy, score_frames,
    )
    scores = {identifiers[index]: frame for index, frame in frames.items()}
    report = score_sed(
        task.name, scores, events, durations, merged_away, policy,
        {"ground truth": task.metadata, "durations": task.durations}, context.out_dir, task.psds_alpha_st,
        task.num_jobs,
    )
    report.metrics["num_classes"] = len({label for identifier in scores for _, _, label in events[identifier]})
    for identifier in sorted(scores)[:context.heatmaps]:
        frame = scores[identifier]
        present = [label for label in classes if any(e[2] == label for e in events[identifier])] or classes[:5]
        hop = float(frame["offset"].iloc[0] - frame["onset"].iloc[0])
        report.plots.append(plot_frame_scores(
            frame[present].to_numpy().T, present, hop, heatmap_path(context.out_dir, task.name, identifier),
            segments=[[(on, off) for on, off, label in events[identifier] if label == p] for p in present],
            title=f"{task.name}: {identifier}",
        ))
    if context.scores_dir is not None:
        write_sed_scores(scores, context.scores_dir / task.name)
    return report
