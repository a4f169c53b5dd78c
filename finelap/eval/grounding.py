"""The grounding task: frame scores of each (audio, phrase) pair against the phrase's segments (PSDS,
threshold-AUC). `score_grounding` scores them, for `run_grounding` and for saved score files alike."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import soundfile
from sed_scores_eval.base_modules.io import write_sed_scores

from finelap.eval.config import EvalTaskConfig
from finelap.eval.embedding import TaskContext, embed_and_collect
from finelap.eval.readers import BadInputPolicy, GroundingPair, clip_id, read_durations, read_grounding
from finelap.eval.report import TaskReport, heatmap_path, plot_threshold_f1, psd_report, skip_notes
from finelap.metrics.grounding import PHRASE_CLASS, THRESHOLDS, Segment, grounding_metrics, merge_segments
from finelap.metrics.sed import score_dataframe
from finelap.plots import plot_frame_scores


def pair_durations(
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


def pair_segments(
    pairs: list[GroundingPair], durations: dict[str, float], policy: BadInputPolicy
) -> dict[str, list[Segment]]:
    """Ground truth per pair with a duration: segments cut at the clip's end, overlaps merged."""
    truth: dict[str, list[Segment]] = {}
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


def score_grounding(
    name: str, scores: dict[str, pd.DataFrame], truth: dict[str, list[Segment]], durations: dict[str, float],
    policy: BadInputPolicy, inputs: dict[str, str], out_dir: Path, median_filter: int, num_jobs: int = 1,
) -> TaskReport:
    """Grounding metrics of the pairs in `scores` (one-column sed_scores_eval score frames, by pair id)
    against their segments and durations, and their report: PSD-ROC and F1-by-threshold plots in
    `out_dir`, the note on skipped samples and the metrics that failed."""
    truth = {pair_id: truth[pair_id] for pair_id in scores}
    durations = {pair_id: durations[pair_id] for pair_id in scores}
    out_dir.mkdir(parents=True, exist_ok=True)
    result = grounding_metrics(scores, truth, durations, median_filter=median_filter, num_jobs=num_jobs)
    result.metrics.update(num_pairs=len(scores))
    report = psd_report(name, "grounding", result, inputs, out_dir, skip_notes(policy))
    report.plots.append(plot_threshold_f1(
        THRESHOLDS, result.f1_by_threshold, out_dir / f"{name}_f1_by_threshold.png", f"{name}: F1 vs threshold"
    ))
    return report


def run_grounding(task: EvalTaskConfig, context: TaskContext) -> TaskReport:
    policy = BadInputPolicy(task.on_bad_sample)
    pairs = read_grounding(task.metadata, task.audio_root, policy)
    durations = pair_durations(pairs, task.durations, policy)
    truth = pair_segments(pairs, durations, policy)
    pairs = [pair for pair in pairs if pair.pair_id in truth]
    audio_paths = list(dict.fromkeys(pair.audio_path for pair in pairs))
    pairs_of_audio: dict[Path, list[GroundingPair]] = {path: [] for path in audio_paths}
    for pair in pairs:
        pairs_of_audio[pair.audio_path].append(pair)
    phrases = list(dict.fromkeys(pair.phrase for pair in pairs))
    phrase_index = {phrase: k for k, phrase in enumerate(phrases)}
    text = context.inference.embed_text(phrases)

    def score_pairs(embeddings, indices: list[int]) -> list[tuple]:
        """Per audio: ([P_a, T] frame scores of its pairs' phrases, frame hop in seconds)."""
        wanted = sorted({phrase_index[pair.phrase] for i in indices for pair in pairs_of_audio[audio_paths[i]]})
        column = {k: c for c, k in enumerate(wanted)}
        frame_scores = context.inference.frame_scores(embeddings, text[wanted]).double().numpy()  # [b, P', T]
        return [
            (frame_scores[row, [column[phrase_index[pair.phrase]] for pair in pairs_of_audio[audio_paths[index]]]],
             embeddings.frame_hop_seconds)
            for row, index in enumerate(indices)
        ]

    audio_scores = embed_and_collect(
        task, context, audio_paths, [pairs_of_audio[p][0].where for p in audio_paths], policy, score_pairs
    )
    scores: dict[str, pd.DataFrame] = {}
    for index, (pair_rows, hop) in audio_scores.items():
        for pair, pair_scores in zip(pairs_of_audio[audio_paths[index]], pair_rows):
            scores[pair.pair_id] = score_dataframe(pair_scores[:, None], hop, durations[pair.pair_id], [PHRASE_CLASS])
    report = score_grounding(
        task.name, scores, truth, durations, policy, {"metadata": task.metadata}, context.out_dir,
        task.median_filter, task.num_jobs,
    )
    report.metrics["num_audio"] = len({pair.audio_id for pair in pairs if pair.pair_id in scores})
    for index in list(audio_scores)[:context.heatmaps]:
        path, (pair_rows, hop) = audio_paths[index], audio_scores[index]
        audio_pairs = pairs_of_audio[path]
        report.plots.append(plot_frame_scores(
            pair_rows, [pair.phrase for pair in audio_pairs], hop,
            heatmap_path(context.out_dir, task.name, clip_id(path.name)),
            segments=[truth[pair.pair_id] for pair in audio_pairs], title=f"{task.name}: {path.name}",
        ))
    if context.scores_dir is not None:
        write_sed_scores(scores, context.scores_dir / task.name)
    return report
