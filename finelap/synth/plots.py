"""Timeline PNG of a mixture: the waveform, and one row per label with its labelled segments."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from finelap.synth.files import write_bytes_atomic
from finelap.synth.mixer import Mixture


def plot_timeline(path: str | Path, mixture: Mixture, sample_rate: int, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels = sorted(mixture.segments, key=lambda label: mixture.segments[label][0][0])
    seconds = np.arange(len(mixture.audio)) / sample_rate
    figure, (wave_axis, label_axis) = pyplot.subplots(
        2, 1, figsize=(10, 2 + 0.35 * len(labels)), sharex=True, gridspec_kw={"height_ratios": [2, max(1, len(labels))]}
    )
    wave_axis.plot(seconds, mixture.audio, linewidth=0.3, color="0.3")
    wave_axis.set_ylabel("amplitude")
    wave_axis.set_title(caption, fontsize=8, wrap=True)
    for row, label in enumerate(labels):
        spans = [(start / sample_rate, (end - start) / sample_rate) for start, end in mixture.segments[label]]
        label_axis.broken_barh(spans, (row - 0.4, 0.8), color=f"C{row % 10}")
    label_axis.set_yticks(range(len(labels)), labels, fontsize=8)
    label_axis.set_ylim(-0.6, len(labels) - 0.4)
    label_axis.invert_yaxis()
    label_axis.set_xlabel("time (s)")
    label_axis.set_xlim(0, len(mixture.audio) / sample_rate)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
