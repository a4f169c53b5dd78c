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
  With one event class the cross-trigger term is empty (no other class to
  cross-trigger) and sed_scores_eval 0.0.4 raises on it, so psds2 is then
  computed without it (cttc None, alpha_ct 0) and `SedResult.notes` says so.
- event_f1_macro / event_f1_micro: collar-based F1 at threshold 0.5, onset
  collar 0.2 s, offset collar max(0.2 s, 20 % of the event's length).
- segment_f1_macro / segment_f1_micro: segment-based F1 at threshold 0.5 on 1 s segments.
PSDS and F1 are fractions in [0, 1]; classes without any ground-truth event
are left out (their PSD-ROC is undefined). A metric whose computation raises
does not stop the others: it is NaN and its error is in `SedResult.failures`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.ndimage
from sed_scores_eval import collar_based, intersection_based, segment_based
from sed_scores_eval.base_modules.scores import create_score_dataframe

Event = tuple[float, float, str]  # (onset s, offset s, class)

PSDS1 = dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0, max_efpr=100.0)
PSDS2 = dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5, max_efpr=100.0)
PSDS2_ONE_CLASS = dict(PSDS2, cttc_threshold=None, alpha_ct=0.0)
ONE_CLASS_PSDS2_NOTE = (
    "computed without the cross-trigger term (cttc_threshold None, alpha_ct 0): "
    "there is one event class, so no other class to cross-trigger"
)
DECISION_THRESHOLD = 0.5
COLLAR_SECONDS = 0.2
OFFSET_COLLAR_RATE = 0.2
SEGMENT_SECONDS = 1.0

logger = logging.getLogger(__name__)


@dataclass
class SedResult:
    metrics: dict[str, float]  # NaN where the metric failed
    psd_rocs: dict[str, tuple[np.ndarray, np.ndarray]]  # "psds1" -> (eTPR, eFPR per hour), staircase curve
    notes: dict[str, str] = field(default_factory=dict)  # metric -> how it departs from its usual definition
    failures: dict[str, str] = field(default_factory=dict)  # metric -> "ErrorType: message"


@contextmanager
def metric_failures_recorded(
    names: tuple[str, ...], metrics: dict[str, float], failures: dict[str, str]
) -> Iterator[None]:
    """Run the computation of `names`; if it raises, they become NaN and the error is recorded, not raised.

    The traceback is logged, so one metric's failure neither stops the others nor goes unnoticed.
    """
    try:
        yield
    except Exception as error:  # any failure of the metric library: the other metrics are still wanted
        logger.exception("computing %s failed", ", ".join(names))
        for name in names:
            metrics[name] = float("nan")
            failures[name] = f"{type(error).__name__}: {error}"


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
    the ground truth are dropped from the scores first. Inconsistent inputs
    raise ValueError; a metric that fails to compute is NaN, with its error
    in `failures` (see `metric_failures_recorded`).
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
    classes = [c for c in first.columns[2:] if c in annotated]
    scores = {audio_id: frame[["onset", "offset", *classes]] for audio_id, frame in scores.items()}

    result = SedResult(metrics={}, psd_rocs={})
    psds2 = PSDS2
    if len(classes) == 1:
        psds2 = PSDS2_ONE_CLASS
        result.notes["psds2"] = ONE_CLASS_PSDS2_NOTE
    for name, parameters in (("psds1", PSDS1), ("psds2", psds2)):
        with metric_failures_recorded((name,), result.metrics, result.failures):
            value, _, roc, _ = intersection_based.psds(
                scores=scores, ground_truth=ground_truth, audio_durations=durations,
                alpha_st=alpha_st, num_jobs=num_jobs, **parameters,
            )
            result.metrics[name] = float(value)
            result.psd_rocs[name] = (np.asarray(roc[0]), np.asarray(roc[1]))
    with metric_failures_recorded(("event_f1_macro", "event_f1_micro"), result.metrics, result.failures):
        f_event, _, _, _ = collar_based.fscore(
            scores=scores, ground_truth=ground_truth, threshold=DECISION_THRESHOLD,
            onset_collar=COLLAR_SECONDS, offset_collar=COLLAR_SECONDS,
            offset_collar_rate=OFFSET_COLLAR_RATE, num_jobs=num_jobs,
        )
        result.metrics["event_f1_macro"] = float(f_event["macro_average"])
        result.metrics["event_f1_micro"] = float(f_event["micro_average"])
    with metric_failures_recorded(("segment_f1_macro", "segment_f1_micro"), result.metrics, result.failures):
        f_segment, _, _, _ = segment_based.fscore(
            scores=scores, ground_truth=ground_truth, audio_durations=durations,
            threshold=DECISION_THRESHOLD, segment_length=SEGMENT_SECONDS, num_jobs=num_jobs,
        )
        result.metrics["segment_f1_macro"] = float(f_segment["macro_average"])
        result.metrics["segment_f1_micro"] = float(f_segment["micro_average"])
    return result
