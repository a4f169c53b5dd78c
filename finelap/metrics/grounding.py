"""Text-to-audio grounding metrics (AudioGrounding protocol of the reference).

Every (audio, phrase) pair is scored on its own: its frame scores are a
one-class sed_scores_eval score DataFrame (class column "phrase") and its
ground truth is the phrase's segments (overlapping segments merged).

- PSDS: sed_scores_eval intersection-based PSDS over all pairs, each pair
  a "file" whose duration is its audio's duration, with the reference's
  parameters: alpha_ct = alpha_st = 0, max eFPR 800 per hour, and
  dtc = gtc = 0.7 (psds1), 0.1 (psds2) and 0.5 (psds_0.5), on raw scores.
- threshold_auc: at each of 50 thresholds th = 0.01, 0.03, ..., 0.99 (the
  centres of 50 equal bins of [0, 1], as the reference's
  `np.arange(1 / 100, 1, 1 / 50)`), each pair's scores are binarised
  (score > th), median-filtered over `median_filter` frames, gaps of at most
  ceil(0.5 s / hop) frames between active regions are closed, and each
  active region becomes one detection. Detections are matched to ground
  truth with the PSDS intersection criteria at dtc = gtc = 0.5:
  a ground-truth segment is found when the detections that each lie >= 50 %
  inside ground truth cover >= 50 % of it (recall), and a detection is
  correct when it lies >= 50 % inside segments that are themselves >= 50 %
  covered by detections (precision). F1 = 2PR / (P + R) per threshold;
  threshold_auc is the trapezoidal area under F1 versus threshold over
  [0.01, 0.99], divided by the length of [0, 1]. All values are in [0, 1].

Each pair is its own one-class problem, so PSDS never has a cross-trigger
term here. A metric whose computation raises does not stop the others: it
is NaN and its error is in `GroundingResult.failures`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.ndimage
from sed_scores_eval import intersection_based

from finelap.metrics.sed import metric_failures_recorded

PHRASE_CLASS = "phrase"
Segment = tuple[float, float]  # (onset s, offset s)

NUM_THRESHOLDS = 50
THRESHOLDS = np.arange(1 / (2 * NUM_THRESHOLDS), 1, 1 / NUM_THRESHOLDS)  # 0.01, 0.03, ..., 0.99
CONNECT_SECONDS = 0.5  # active regions closer than this are one detection
MATCH_THRESHOLD = 0.5  # dtc = gtc of the threshold-AUC matching
PSDS_SETTINGS = {"psds1": 0.7, "psds2": 0.1, "psds_0.5": 0.5}  # name -> dtc = gtc
PSDS_MAX_EFPR = 800.0


@dataclass
class GroundingResult:
    metrics: dict[str, float]  # NaN where the metric failed
    psd_rocs: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (eTPR, eFPR per hour)
    f1_by_threshold: np.ndarray  # [50] F1 at each of THRESHOLDS (NaN when threshold_auc failed)
    failures: dict[str, str] = field(default_factory=dict)  # metric -> "ErrorType: message"


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Union of overlapping or touching segments, sorted."""
    merged: list[list[float]] = []
    for onset, offset in sorted(segments):
        if merged and onset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset)
        else:
            merged.append([onset, offset])
    return [(onset, offset) for onset, offset in merged]


def _active_regions(active: np.ndarray) -> list[tuple[int, int]]:
    """[n] bool -> (start, end) frame index ranges, end exclusive."""
    padded = np.concatenate(([False], active, [False])).astype(np.int8)
    changes = np.flatnonzero(np.diff(padded))
    return list(zip(changes[0::2].tolist(), changes[1::2].tolist()))


def detections_at(scores: pd.DataFrame, threshold: float, median_filter: int = 3) -> list[Segment]:
    """One pair's detections (seconds) at a decision threshold, as described in the module docstring."""
    onsets = scores["onset"].to_numpy()
    offsets = scores["offset"].to_numpy()
    active = (scores[PHRASE_CLASS].to_numpy() > threshold).astype(np.int8)
    if median_filter > 1:
        active = scipy.ndimage.median_filter(active, size=median_filter)
    regions = _active_regions(active.astype(bool))
    hop = offsets[0] - onsets[0] if len(onsets) == 1 else onsets[1] - onsets[0]
    max_gap = math.ceil(round(CONNECT_SECONDS / hop, 6))
    connected: list[list[int]] = []
    for start, end in regions:
        if connected and start - connected[-1][1] <= max_gap:
            connected[-1][1] = end
        else:
            connected.append([start, end])
    return [(float(onsets[start]), float(offsets[end - 1])) for start, end in connected]


def intersection_precision_recall(
    detections: dict[str, list[Segment]], ground_truth: dict[str, list[Segment]],
    dtc: float = MATCH_THRESHOLD, gtc: float = MATCH_THRESHOLD,
) -> tuple[float, float]:
    """Precision and recall of detections under the PSDS intersection criteria (see module docstring)."""
    true_detections = true_references = num_detections = num_references = 0
    for key in ground_truth.keys() | detections.keys():
        found = np.asarray(detections.get(key, []), dtype=np.float64).reshape(-1, 2)
        truth = np.asarray(ground_truth.get(key, []), dtype=np.float64).reshape(-1, 2)
        num_detections += len(found)
        num_references += len(truth)
        if len(found) == 0 or len(truth) == 0:
            continue
        overlap = np.clip(
            np.minimum(found[:, None, 1], truth[None, :, 1]) - np.maximum(found[:, None, 0], truth[None, :, 0]),
            0.0, None,
        )  # [detections, references] seconds
        inside_truth = overlap / (found[:, 1] - found[:, 0])[:, None]
        coverage = overlap / (truth[:, 1] - truth[:, 0])[None, :]
        precise = inside_truth.sum(axis=1) >= dtc
        true_references += int(np.sum(coverage[precise].sum(axis=0) >= gtc))
        covered = coverage.sum(axis=0) >= gtc
        true_detections += int(np.sum(inside_truth[:, covered].sum(axis=1) >= dtc))
    precision = true_detections / num_detections if num_detections else 0.0
    recall = true_references / num_references if num_references else 0.0
    return precision, recall


def threshold_auc(
    scores: dict[str, pd.DataFrame], ground_truth: dict[str, list[Segment]], median_filter: int = 3
) -> tuple[float, np.ndarray]:
    """(area under F1 versus threshold, [50] F1 per threshold) over all pairs."""
    f1 = np.zeros(len(THRESHOLDS))
    for index, threshold in enumerate(THRESHOLDS):
        detections = {key: detections_at(frame, threshold, median_filter) for key, frame in scores.items()}
        precision, recall = intersection_precision_recall(detections, ground_truth)
        f1[index] = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(np.trapezoid(f1, THRESHOLDS)), f1


def grounding_metrics(
    scores: dict[str, pd.DataFrame],
    ground_truth: dict[str, list[Segment]],
    durations: dict[str, float],
    median_filter: int = 3,
    num_jobs: int = 1,
) -> GroundingResult:
    """PSDS (three settings) and threshold-AUC; all mappings keyed by the same pair ids.

    Inconsistent inputs raise ValueError; a metric that fails to compute is
    NaN, with its error in `failures`.
    """
    if set(scores) != set(ground_truth) or set(scores) != set(durations):
        raise ValueError(
            "scores, ground truth and durations must cover the same (audio, phrase) pairs; "
            f"scores only: {sorted(set(scores) - set(ground_truth))[:5]}, "
            f"ground truth only: {sorted(set(ground_truth) - set(scores))[:5]}"
        )
    ground_truth = {key: merge_segments(segments) for key, segments in ground_truth.items()}
    if not any(ground_truth.values()):
        raise ValueError("no pair has a ground-truth segment: grounding metrics are undefined")
    events = {
        key: [(onset, offset, PHRASE_CLASS) for onset, offset in segments] for key, segments in ground_truth.items()
    }
    result = GroundingResult(metrics={}, psd_rocs={}, f1_by_threshold=np.full(len(THRESHOLDS), np.nan))
    for name, criterion in PSDS_SETTINGS.items():
        with metric_failures_recorded((name,), result.metrics, result.failures):
            value, _, roc, _ = intersection_based.psds(
                scores=scores, ground_truth=events, audio_durations=durations,
                dtc_threshold=criterion, gtc_threshold=criterion, cttc_threshold=None,
                alpha_ct=0.0, alpha_st=0.0, max_efpr=PSDS_MAX_EFPR, num_jobs=num_jobs,
            )
            result.metrics[name] = float(value)
            result.psd_rocs[name] = (np.asarray(roc[0]), np.asarray(roc[1]))
    with metric_failures_recorded(("threshold_auc",), result.metrics, result.failures):
        result.metrics["threshold_auc"], result.f1_by_threshold = threshold_auc(scores, ground_truth, median_filter)
    return result
