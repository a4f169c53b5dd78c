"""`finelap eval sed|grounding --scores DIR`: metrics of saved score files (sed_scores_eval's format, as
`finelap eval --save-scores` writes them, or as another system wrote them), scored as the SED and
grounding tasks score a model's."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from sed_scores_eval.base_modules.io import read_sed_scores

from finelap.eval.grounding import pair_durations, pair_segments, score_grounding
from finelap.eval.readers import BadInputPolicy, EvalDataError, read_durations, read_grounding, read_sed_ground_truth
from finelap.eval.report import TaskReport
from finelap.eval.sed import prepare_sed_ground_truth, score_sed


def read_score_folder(directory: Path) -> dict[str, pd.DataFrame]:
    """{file name without .tsv: score frame} of a folder of sed_scores_eval score files."""
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
    scores = read_score_folder(scores_dir)
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
    inputs = {"scores": str(scores_dir), "ground truth": str(ground_truth), "durations": str(durations_path)}
    return score_sed(name, scores, events, durations, merged_away, policy, inputs, out_dir, alpha_st)


def evaluate_grounding_scores(
    scores_dir: Path, ground_truth: Path, out_dir: Path, durations_path: Path | None = None,
    name: str = "grounding", median_filter: int = 3, on_bad_sample: str = "error",
) -> TaskReport:
    """Grounding metrics of saved per-pair score files (named `<pair id>.tsv` as `--save-scores` writes them).

    Pair durations come from the durations TSV, else from the end of each pair's score file.
    """
    policy = BadInputPolicy(on_bad_sample)
    scores = read_score_folder(scores_dir)
    pairs = read_grounding(ground_truth, None, policy, check_audio=False)
    without_scores = [pair.pair_id for pair in pairs if pair.pair_id not in scores]
    if without_scores:
        raise EvalDataError(f"{scores_dir}: no score file for {len(without_scores)} pair(s) of {ground_truth}, e.g. "
                            f"{[i + '.tsv' for i in without_scores[:3]]}")
    if durations_path is not None:
        durations = pair_durations(pairs, durations_path, policy)
    else:
        durations = {pair.pair_id: float(scores[pair.pair_id]["offset"].iloc[-1]) for pair in pairs}
    truth = pair_segments(pairs, durations, policy)
    scores = {pair_id: scores[pair_id] for pair_id in truth}
    inputs = {"scores": str(scores_dir), "ground truth": str(ground_truth)}
    return score_grounding(name, scores, truth, durations, policy, inputs, out_dir, median_filter)
