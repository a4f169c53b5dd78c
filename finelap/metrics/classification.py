"""Zero-shot classification metrics.

Single-label sets (ESC-50, UrbanSound8K, VGGSound): accuracy, the
percentage of clips whose highest-scoring class is their label.
Multi-label sets: mAP, the mean over classes that have at least one
positive clip of the average precision of that class's ranking of clips
(torchmetrics' binary average precision per class), in percent.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import multilabel_average_precision


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """[N, K] class scores, [N] int target class -> accuracy in percent (ties: the lowest class index wins)."""
    predictions = np.argmax(np.asarray(scores), axis=1)
    return 100.0 * float(np.mean(predictions == np.asarray(targets)))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """[N, K] class scores, [N, K] 0/1 targets -> macro mAP in percent over classes with a positive clip."""
    targets = np.asarray(targets).astype(np.int64)
    present = targets.sum(axis=0) > 0
    if not present.any():
        raise ValueError("no class has a positive clip: mAP is undefined")
    per_class = multilabel_average_precision(
        torch.as_tensor(np.asarray(scores)[:, present], dtype=torch.float64),
        torch.as_tensor(targets[:, present]),
        num_labels=int(present.sum()),
        average="none",
    )
    return 100.0 * float(per_class.mean())
