"""Sound event detection metrics on frame-level scores, computed by sed_scores_eval.

Scores of one clip are a sed_scores_eval score DataFrame: columns `onset`,
`offset` (seconds, one row per frame) and one column per class (a score in
[0, 1]). A clip's frames come from the encoder's grid (frame i spans
[i * hop, (i + 1) * hop) seconds); frames that start at or after the clip's
duration are dropped and the last kept frame ends at the duration.

Metrics (the DCASE / reference parameters):
- psds1: intersection-based PSDS, dtc = gtc = 0.7, no cross-trigger
  penalty (alpha_ct 0), alpha_st 1, max eFPR 100 per hour.
- psds2: dtc = gtc = 0.1, cttc 0.3, alpha_ct 0.5, alpha_st 1, max eFPR 100.
  (alpha_st is configurable: the reference scores AudioSet-strong with 0.)
- event_f1_macro / event_f1_micro: collar-based F1 at threshold 0.5, onset
  collar 0.2 s, offset collar max(0.2 s, 20 % of the event's length).
- segment_f1_macro / segment_f1_micro: segment-based F1 at threshold 0.5 on 1 s segments.
PSDS and F1 are fractions in [0, 1]; classes without any ground-truth event
are left out (their PSD-ROC is undefined).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.ndimage
from sed_scores_eval import collar_based, intersection_based, segment_based
from sed_scores_eval.base_modules.scores import create_score_dataframe

Event = tuple[float, float, str]  # (onset s, offset s, class)

PSDS1 = dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0, max_efpr=100.0)
PSDS2 = dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5, max_efpr=100.0)
DECISION_THRESHOLD = 0.5
COLLAR_SECONDS = 0.2
OFFSET_COLLAR_RATE = 0.2
SEGMENT_SECONDS = 1.0


@dataclass
class SedResult:
    metrics: dict[str, float]
    psd_rocs: dict[str, tuple[np.ndarray, np.ndarray]]  # "psds1" -> (eTPR, eFPR per hour), staircase curve


def frames_within_clip(
    scores: np.ndarray, hop_seconds: float, duration: float, median_filter: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """[T, K] frame scores on the encoder grid -> ([n, K] scores, [n + 1] timestamps in seconds).

    Keeps the n frames that start before `duration` (the last one ends at
    `duration`), then median-filters each class over `median_filter` frames
    (1: no filtering).
    """
    if duration <= 0:
        raise ValueError(f"clip duration must be positive, got {duration}")
    start = np.arange(scores.shape[0]) * hop_seconds
    kept = int(np.sum(start < duration))
    scores = np.asarray(scores[:kept], dtype=np.float64)
    if median_filter > 1:
        scores = scipy.ndimage.median_filter(scores, size=(median_filter, 1))
    timestamps = np.arange(kept + 1) * hop_seconds
    timestamps[-1] = min(timestamps[-1], duration)
    return scores, timestamps


def score_dataframe(
    scores: np.ndarray, hop_seconds: float, duration: float, classes: list[str], median_filter: int = 1
) -> pd.DataFrame:
    """[T, K] frame scores of one clip -> its sed_scores_eval score DataFrame (see `frames_within_clip`)."""
    kept, timestamps = frames_within_clip(scores, hop_seconds, duration, median_filter)
    return create_score_dataframe(kept, timestamps, list(classes))


def merge_overlapping_events(events: list[Event]) -> tuple[list[Event], int]:
    """Union of overlapping or touching events of the same class; returns (events, number merged away).

    sed_scores_eval rejects such ground truth; a class is either sounding or not at any time.
    """
    merged: list[Event] = []
    removed = 0
    for label in sorted({event[2] for event in events}):
        spans = sorted((onset, offset) for onset, offset, event_label in events if event_label == label)
        current_onset, current_offset = spans[0]
        for onset, offset in spans[1:]:
            if onset <= current_offset:
                current_offset = max(current_offset, offset)
                removed += 1
            else:
                merged.append((current_onset, current_offset, label))
                current_onset, current_offset = onset, offset
        merged.append((current_onset, current_offset, label))
    return sorted(merged), removed


def sed_metrics(
    scores: dict[str, pd.DataFrame],
    ground_truth: dict[str, list[Event]],
    durations: dict[str, float],
    alpha_st: float = 1.0,
    num_jobs: int = 1,
) -> SedResult:
    """PSDS1, PSDS2, collar and segment F1 of score DataFrames against ground truth.

    All three mappings are keyed by the same audio ids; classes absent from
    the ground truth are dropped from the scores first.
    """
    if set(scores) != set(ground_truth) or set(scores) != set(durations):
        raise ValueError(
            "scores, ground truth and durations must cover the same clips; "
            f"scores only: {sorted(set(scores) - set(ground_truth))[:5]}, "
            f"ground truth only: {sorted(set(ground_truth) - set(scores))[:5]}, "
            f"without duration: {sorted(set(scores) - set(durations))[:5]}"
        )
    annotated = {label for events in ground_truth.values() for _, _, label in events}
    if not annotated:
        raise ValueError("the ground truth has no events: SED metrics are undefined")
    first = next(iter(scores.values()))
    kept_columns = ["onset", "offset"] + [c for c in first.columns[2:] if c in annotated]
    scores = {audio_id: frame[kept_columns] for audio_id, frame in scores.items()}

    metrics: dict[str, float] = {}
    rocs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, parameters in (("psds1", PSDS1), ("psds2", PSDS2)):
        value, _, roc, _ = intersection_based.psds(
            scores=scores, ground_truth=ground_truth, audio_durations=durations,
            alpha_st=alpha_st, num_jobs=num_jobs, **parameters,
        )
        metrics[name] = float(value)
        rocs[name] = (np.asarray(roc[0]), np.asarray(roc[1]))
    f_event, _, _, _ = collar_based.fscore(
        scores=scores, ground_truth=ground_truth, threshold=DECISION_THRESHOLD,
        onset_collar=COLLAR_SECONDS, offset_collar=COLLAR_SECONDS,
        offset_collar_rate=OFFSET_COLLAR_RATE, num_jobs=num_jobs,
    )
    f_segment, _, _, _ = segment_based.fscore(
        scores=scores, ground_truth=ground_truth, audio_durations=durations,
        threshold=DECISION_THRESHOLD, segment_length=SEGMENT_SECONDS, num_jobs=num_jobs,
    )
    metrics["event_f1_macro"] = float(f_event["macro_average"])
    metrics["event_f1_micro"] = float(f_event["micro_average"])
    metrics["segment_f1_macro"] = float(f_segment["macro_average"])
    metrics["segment_f1_micro"] = float(f_segment["micro_average"])
    return SedResult(metrics=metrics, psd_rocs=rocs)
