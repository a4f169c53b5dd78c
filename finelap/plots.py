"""Figures written to files (matplotlib's Agg canvas; no display, no global pyplot state)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def plot_frame_scores(
    scores,
    phrases: Sequence[str],
    frame_hop_seconds: float,
    path: str | Path,
    segments: Sequence[Sequence[tuple[float, float]]] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG heatmap of frame scores: one row per phrase, time in seconds on the x axis.

    scores: [P, T] probabilities in [0, 1] (array or tensor), frame t spanning
    [t * frame_hop_seconds, (t + 1) * frame_hop_seconds).
    segments: optional ground truth, one list of (onset_s, offset_s) per phrase, drawn as outlines.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2 or scores.shape[0] != len(phrases):
        raise ValueError(f"scores must be [len(phrases)={len(phrases)}, T], got shape {scores.shape}")
    if segments is not None and len(segments) != len(phrases):
        raise ValueError(f"segments must hold one list per phrase ({len(phrases)}), got {len(segments)}")
    num_phrases, num_frames = scores.shape
    duration = num_frames * frame_hop_seconds

    figure = Figure(figsize=(max(6.0, 0.5 * duration + 3.0), 1.0 + 0.4 * max(num_phrases, 1)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(
        scores,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        extent=(0.0, duration, num_phrases - 0.5, -0.5),
    )
    axes.set_yticks(range(num_phrases), labels=list(phrases))
    axes.set_xlabel("time (s)")
    figure.colorbar(image, ax=axes, label="probability")
    if segments is not None:
        label = "ground truth"
        for row, phrase_segments in enumerate(segments):
            for onset, offset in phrase_segments:
                axes.add_patch(
                    Rectangle(
                        (onset, row - 0.45), offset - onset, 0.9, fill=False, edgecolor="red", linewidth=2, label=label
                    )
                )
                label = None  # one legend entry
        if label is None:
            axes.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # above the plot
    if title:
        axes.set_title(title)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
