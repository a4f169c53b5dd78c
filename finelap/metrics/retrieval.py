"""Audio-text retrieval metrics: R@k and mAP@10 in both directions.

Every audio may have any number of captions. Ranks are 1-based and ties are
broken against the query: an item that scores exactly as high as a relevant
one is ranked before it (an untrained model that scores everything alike
gets no credit).

- Text-to-audio (T2A): each caption ranks all audio; R@k is the percentage
  of captions whose audio is within the top k; mAP@10 is the mean over
  captions of 1 / rank when rank <= 10, else 0 (one relevant item).
- Audio-to-text (A2T): each audio ranks all captions; a hit at k counts
  when ANY of its captions is within the top k (the convention of the
  reference implementation; LAION-CLAP #140 shows the disagreement others
  meet when this differs). mAP@10 is the mean over audio of
  AP@10 = sum_i (i / rank_i) / min(#captions of the audio, 10), where
  rank_1 < rank_2 < ... are the ranks of its captions that fall within the
  top 10. With 5 captions per audio this is exactly the reference's
  division by 5.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECALL_CUTOFFS = (1, 5, 10)
MAP_CUTOFF = 10
_ROW_CHUNK = 1024  # queries compared at once: bounds the [chunk, items] boolean matrix


@dataclass
class RetrievalResult:
    metrics: dict[str, float]  # "t2a_R@1" ... "a2t_mAP@10", percentages; median ranks 1-based
    text_to_audio_ranks: np.ndarray  # [C] int64, 1-based rank of each caption's audio
    audio_to_text_ranks: np.ndarray  # [A] int64, 1-based rank of each audio's best caption


def text_to_audio_ranks(similarity: np.ndarray, caption_audio: np.ndarray) -> np.ndarray:
    """[A, C] similarity, [C] audio index of each caption -> [C] 1-based rank of the caption's audio."""
    similarity = np.asarray(similarity, dtype=np.float64)
    ranks = np.empty(similarity.shape[1], dtype=np.int64)
    for start in range(0, similarity.shape[1], _ROW_CHUNK):
        columns = similarity[:, start:start + _ROW_CHUNK]  # [A, chunk]
        audio = caption_audio[start:start + _ROW_CHUNK]
        relevant = columns[audio, np.arange(columns.shape[1])]
        ranks[start:start + _ROW_CHUNK] = (columns >= relevant[None, :]).sum(axis=0)
    return ranks


def audio_to_text_caption_ranks(similarity: np.ndarray, caption_audio: np.ndarray) -> list[np.ndarray]:
    """[A, C] similarity -> per audio, the sorted 1-based ranks of its own captions among all captions."""
    similarity = np.asarray(similarity, dtype=np.float64)
    ranks: list[np.ndarray] = []
    for audio in range(similarity.shape[0]):
        row = similarity[audio]
        own = row[caption_audio == audio]  # [n_a]
        ranks.append(np.sort((row[None, :] >= own[:, None]).sum(axis=1)))
    return ranks


def average_precision_at(sorted_ranks: np.ndarray, cutoff: int = MAP_CUTOFF) -> float:
    """AP@cutoff of one query from the sorted 1-based ranks of all its relevant items."""
    if len(sorted_ranks) == 0:
        return 0.0
    within = sorted_ranks[sorted_ranks <= cutoff]
    precisions = np.arange(1, len(within) + 1) / within
    return float(precisions.sum() / min(len(sorted_ranks), cutoff))


def retrieval_metrics(similarity: np.ndarray, caption_audio: np.ndarray) -> RetrievalResult:
    """Both directions from one [A, C] audio-by-caption similarity matrix.

    `caption_audio` [C] int: index (row of `similarity`) of the audio each caption describes;
    every audio must have at least one caption.
    """
    similarity = np.asarray(similarity)
    caption_audio = np.asarray(caption_audio, dtype=np.int64)
    num_audio, num_captions = similarity.shape
    if caption_audio.shape != (num_captions,):
        raise ValueError(f"caption_audio has shape {caption_audio.shape}, expected ({num_captions},)")
    without_caption = np.setdiff1d(np.arange(num_audio), caption_audio)
    if len(without_caption):
        raise ValueError(f"audio rows {without_caption[:5].tolist()} have no caption")

    t2a = text_to_audio_ranks(similarity, caption_audio)
    a2t_all = audio_to_text_caption_ranks(similarity, caption_audio)
    a2t_best = np.array([ranks[0] for ranks in a2t_all], dtype=np.int64)

    metrics: dict[str, float] = {}
    for k in RECALL_CUTOFFS:
        metrics[f"t2a_R@{k}"] = 100.0 * float(np.mean(t2a <= k))
    metrics[f"t2a_mAP@{MAP_CUTOFF}"] = 100.0 * float(np.mean(np.where(t2a <= MAP_CUTOFF, 1.0 / t2a, 0.0)))
    metrics["t2a_median_rank"] = float(np.median(t2a))
    for k in RECALL_CUTOFFS:
        metrics[f"a2t_R@{k}"] = 100.0 * float(np.mean(a2t_best <= k))
    metrics[f"a2t_mAP@{MAP_CUTOFF}"] = 100.0 * float(np.mean([average_precision_at(r) for r in a2t_all]))
    metrics["a2t_median_rank"] = float(np.median(a2t_best))
    return RetrievalResult(metrics=metrics, text_to_audio_ranks=t2a, audio_to_text_ranks=a2t_best)
