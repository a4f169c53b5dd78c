"""Retrieval, classification and grounding metrics against brute-force references and constructed cases."""
import numpy as np
import pytest
from sed_scores_eval import intersection_based

from finelap.metrics import grounding as grounding_module
from finelap.metrics.classification import accuracy, mean_average_precision
from finelap.metrics.grounding import (
    PHRASE_CLASS, THRESHOLDS, detections_at, grounding_metrics, intersection_precision_recall, merge_segments,
)
from finelap.metrics.retrieval import retrieval_metrics
from finelap.metrics.sed import score_dataframe


def _brute_force_retrieval(similarity, caption_audio):
    """Loop-and-argsort reference of every retrieval metric (no ties in its inputs)."""
    num_audio, num_captions = similarity.shape
    t2a_ranks = []
    for caption in range(num_captions):
        order = list(np.argsort(-similarity[:, caption]))
        t2a_ranks.append(order.index(caption_audio[caption]) + 1)
    t2a_ranks = np.array(t2a_ranks)
    a2t_hits = {k: [] for k in (1, 5, 10)}
    a2t_ap = []
    for audio in range(num_audio):
        order = list(np.argsort(-similarity[audio]))
        relevant = {c for c in range(num_captions) if caption_audio[c] == audio}
        first = min(order.index(c) for c in relevant) + 1
        for k in a2t_hits:
            a2t_hits[k].append(first <= k)
        found, precision_sum = 0, 0.0
        for position, caption in enumerate(order[:10], start=1):
            if caption in relevant:
                found += 1
                precision_sum += found / position
        a2t_ap.append(precision_sum / min(len(relevant), 10))
    expected = {f"t2a_R@{k}": 100 * np.mean(t2a_ranks <= k) for k in (1, 5, 10)}
    expected["t2a_mAP@10"] = 100 * np.mean([1 / r if r <= 10 else 0 for r in t2a_ranks])
    expected.update({f"a2t_R@{k}": 100 * np.mean(hits) for k, hits in a2t_hits.items()})
    expected["a2t_mAP@10"] = 100 * np.mean(a2t_ap)
    return expected, t2a_ranks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_equal_brute_force_with_several_captions_per_audio(seed):
    rng = np.random.default_rng(seed)
    num_audio = 37
    captions_per_audio = rng.integers(1, 13, size=num_audio)  # 1..12: some audio with more than 10 captions
    caption_audio = np.repeat(np.arange(num_audio), captions_per_audio)
    rng.shuffle(caption_audio)
    similarity = rng.standard_normal((num_audio, len(caption_audio)))
    similarity[caption_audio, np.arange(len(caption_audio))] += 1.5  # better than chance, not perfect

    result = retrieval_metrics(similarity, caption_audio)
    expected, t2a_ranks = _brute_force_retrieval(similarity, caption_audio)
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key
    np.testing.assert_array_equal(result.text_to_audio_ranks, t2a_ranks)
    assert 0 < result.metrics["a2t_R@1"] < 100 and 0 < result.metrics["t2a_R@1"] < 100


def test_retrieval_ties_are_broken_against_the_query():
    similarity = np.zeros((4, 8))
    result = retrieval_metrics(similarity, np.repeat(np.arange(4), 2))
    assert result.metrics["t2a_R@1"] == 0.0 and result.metrics["a2t_R@1"] == 0.0
    assert result.metrics["t2a_median_rank"] == 4.0


def test_retrieval_rejects_audio_without_captions():
    with pytest.raises(ValueError, match=r"audio rows \[2\] have no caption"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))


def test_accuracy_on_a_constructed_case():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.4, 0.35, 0.25]])
    targets = np.array([0, 2, 0, 1])  # right, right, wrong, wrong
    assert accuracy(scores, targets) == 50.0


def test_multilabel_map_equals_numpy_average_precision():
    rng = np.random.default_rng(3)
    targets = (rng.random((40, 5)) < 0.3).astype(int)
    targets[:, 4] = 0  # a class without positives is left out
    scores = rng.random((40, 5)) + 0.5 * targets
    expected = []
    for k in range(4):
        order = np.argsort(-scores[:, k])
        hits = targets[order, k]
        precision_at_hits = np.cumsum(hits)[hits == 1] / (np.flatnonzero(hits) + 1)
        expected.append(precision_at_hits.mean())
    assert mean_average_precision(scores, targets) == pytest.approx(100 * np.mean(expected), abs=1e-4)


def _pair_frame(values, hop=0.5, duration=None):
    values = np.asarray(values, dtype=float)
    duration = duration if duration is not None else len(values) * hop
    return score_dataframe(values[:, None], hop, duration, [PHRASE_CLASS])


def test_grounding_detections_close_short_gaps_and_median_filter_single_frames():
    # hop 0.25 s: gaps of up to ceil(0.5 / 0.25) = 2 frames are closed.
    values = [0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0]
    frame = _pair_frame(values, hop=0.25)
    assert detections_at(frame, 0.5, median_filter=1) == [(0.25, 1.75), (2.5, 3.0), (3.75, 4.0)]
    # a 3-frame median filter removes the isolated frame 15 and keeps the 2-frame regions
    assert detections_at(frame, 0.5, median_filter=3) == [(0.25, 1.75), (2.5, 3.0)]
    # thresholds compare strictly: a score equal to the threshold is not active
    assert detections_at(frame, 1.0, median_filter=1) == []


def test_intersection_precision_recall_on_a_constructed_case():
    truth = {"a": [(1.0, 3.0), (6.0, 7.0)], "b": [(0.0, 1.0)]}
    detections = {
        "a": [(1.2, 3.2), (5.0, 5.5)],  # finds the first segment; a false alarm
        "b": [(0.0, 4.0)],  # only 25 % inside ground truth: wrong, and b's segment is missed
        "c": [(0.0, 1.0)],  # a pair without ground truth: a false alarm
    }
    precision, recall = intersection_precision_recall(detections, truth)
    assert precision == pytest.approx(1 / 4) and recall == pytest.approx(1 / 3)


def test_grounding_metrics_on_a_constructed_case():
    # Pair "a": 0.8 inside its segment [1, 3) s, 0.2 elsewhere (hop 0.5 s, 10 s clip). For thresholds
    # below 0.2 the whole clip is one detection (20 % inside truth: wrong), between 0.2 and 0.8 the
    # detection is the segment exactly, above 0.8 nothing: F1 = 0 (0.01..0.19), 1 (0.21..0.79),
    # 0 (0.81..0.99), so the trapezoidal area is 0.01 + 0.58 + 0.01 = 0.60.
    values = np.full(20, 0.2)
    values[2:6] = 0.8
    scores = {"a": _pair_frame(values), "quiet": _pair_frame(np.full(20, 0.1))}
    truth = {"a": [(1.0, 3.0)], "quiet": []}
    result = grounding_metrics(scores, truth, {"a": 10.0, "quiet": 10.0})
    assert result.metrics["threshold_auc"] == pytest.approx(0.60)
    expected_f1 = np.where((THRESHOLDS > 0.2) & (THRESHOLDS < 0.8), 1.0, 0.0)
    np.testing.assert_allclose(result.f1_by_threshold, expected_f1)
    # The segment outranks every other frame of every pair: a perfect PSD-ROC.
    assert result.metrics["psds1"] == pytest.approx(1.0)

    reversed_scores = {"a": _pair_frame(1 - values), "quiet": _pair_frame(np.full(20, 0.1))}
    worse = grounding_metrics(reversed_scores, truth, {"a": 10.0, "quiet": 10.0})
    assert worse.metrics["psds1"] < 0.5 and worse.metrics["threshold_auc"] == 0.0


def test_merge_segments_unions_overlaps():
    assert merge_segments([(3.0, 4.0), (0.0, 1.0), (0.5, 2.0), (2.0, 2.5)]) == [(0.0, 2.5), (3.0, 4.0)]


def _noisy_pairs(seed):
    """Six 10 s pairs (hop 0.5 s), one segment each, scores higher inside it plus noise."""
    rng = np.random.default_rng(seed)
    scores, truth = {}, {}
    for pair in range(6):
        values = 0.5 * rng.random(20)
        values[2 * pair:2 * pair + 4] += 0.4
        scores[f"p{pair}"] = _pair_frame(values)
        truth[f"p{pair}"] = [(float(pair), pair + 2.0)]
    return scores, truth


def test_grounding_psds_is_one_class_psds_without_cross_trigger():
    # Every pair is its own one-class problem: sed_scores_eval's PSDS with no cross-trigger term, as called here.
    scores, truth = _noisy_pairs(0)
    durations = {key: 10.0 for key in scores}
    result = grounding_metrics(scores, truth, durations)
    events = {key: [(onset, offset, PHRASE_CLASS) for onset, offset in segments] for key, segments in truth.items()}
    for name, criterion in (("psds1", 0.7), ("psds2", 0.1), ("psds_0.5", 0.5)):
        expected = intersection_based.psds(
            scores=scores, ground_truth=events, audio_durations=durations, dtc_threshold=criterion,
            gtc_threshold=criterion, cttc_threshold=None, alpha_ct=0, alpha_st=0, max_efpr=800)[0]
        assert result.metrics[name] == pytest.approx(expected, abs=1e-12), name
    assert 0 < result.metrics["psds1"] < 1


def test_a_failing_grounding_metric_is_recorded_and_the_others_computed(monkeypatch):
    scores, truth = _noisy_pairs(1)
    expected = grounding_metrics(scores, truth, {key: 10.0 for key in scores}).metrics

    def broken_threshold_auc(*_):
        raise RuntimeError("threshold sweep broke")

    monkeypatch.setattr(grounding_module, "threshold_auc", broken_threshold_auc)
    result = grounding_metrics(scores, truth, {key: 10.0 for key in scores})
    assert np.isnan(result.metrics["threshold_auc"]) and np.isnan(result.f1_by_threshold).all()
    assert result.failures == {"threshold_auc": "RuntimeError: threshold sweep broke"}
    for name in ("psds1", "psds2", "psds_0.5"):
        assert result.metrics[name] == expected[name]
