"""Evaluation outputs: metrics.json, a Markdown report, and PNG plots; and the parts of a task's report
that several tasks share (the note on skipped samples, the PSD-ROC report, heatmap file names).

Frame-score heatmaps are drawn by `finelap.plots.plot_frame_scores`; the
plots here are the evaluation-only ones (PSD-ROC curves, retrieval ranks, F1 by threshold).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finelap.eval.readers import BadInputPolicy


@dataclass
class TaskReport:
    """What one evaluated task contributes to the outputs."""

    name: str
    type: str
    metrics: dict[str, float]
    inputs: dict[str, str] = field(default_factory=dict)  # what was evaluated: file paths, counts
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped samples, merged events, ...
    metric_notes: dict[str, str] = field(default_factory=dict)  # metric -> how it departs from its definition
    metric_errors: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed

    def note_lines(self) -> list[str]:
        """Notes, then one line per noted metric and per failed metric."""
        return (
            self.notes
            + [f"{metric}: {note}" for metric, note in self.metric_notes.items()]
            + [f"{metric} could not be computed: {error}" for metric, error in self.metric_errors.items()]
        )


def skip_notes(policy: BadInputPolicy) -> list[str]:
    """The report's note on the samples `policy` skipped, counted per reason (none skipped: no note)."""
    if not policy.skips.total:
        return []
    counts = ", ".join(f"{reason}: {count}" for reason, count in policy.skips.counts.items())
    return [f"skipped {policy.skips.total} bad sample(s) ({counts})"]


def write_metrics_json(reports: list[TaskReport], path: Path) -> Path:
    """{task name: {metric: value}}; NaN becomes null (JSON has no NaN).

    A task's entry also holds "metric_notes" and "metric_errors" ({metric: text}) when it has any.
    """
    data = {}
    for report in reports:
        data[report.name] = {key: (None if isinstance(value, float) and math.isnan(value) else value)
                             for key, value in report.metrics.items()}
        if report.metric_notes:
            data[report.name]["metric_notes"] = report.metric_notes
        if report.metric_errors:
            data[report.name]["metric_errors"] = report.metric_errors
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _format(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def markdown_report(reports: list[TaskReport], relative_to: Path, title: str = "FineLAP evaluation") -> str:
    """One section per task: its inputs, a metric | value table, notes and its plots (paths relative to the report)."""
    lines = [f"# {title}", ""]
    for report in reports:
        lines += [f"## {report.name} ({report.type})", ""]
        for key, value in report.inputs.items():
            lines.append(f"- {key}: `{value}`")
        if report.inputs:
            lines.append("")
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in report.metrics.items()]
        lines.append("")
        notes = report.note_lines()
        for note in notes:
            lines.append(f"> {note}")
        if notes:
            lines.append("")
        for plot in report.plots:
            relative = Path(plot).relative_to(relative_to) if Path(plot).is_relative_to(relative_to) else Path(plot)
            lines += [f"![{relative.stem}]({relative.as_posix()})", ""]
    return "\n".join(lines)


def write_report(reports: list[TaskReport], out_dir: Path, title: str = "FineLAP evaluation") -> tuple[Path, Path]:
    """Write metrics.json and report.md into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = write_metrics_json(reports, out_dir / "metrics.json")
    report_path = out_dir / "report.md"
    report_path.write_text(markdown_report(reports, out_dir, title) + "\n")
    return metrics_path, report_path


def psd_report(
    name: str, task_type: str, result, inputs: dict[str, str], out_dir: Path, notes: list[str],
    metric_notes: dict[str, str] | None = None,
) -> TaskReport:
    """The report of a SED or grounding result (metrics with their PSD-ROCs): PSD-ROC plot, notes, and
    the metrics that failed."""
    plot = plot_psd_rocs(result.psd_rocs, result.metrics, out_dir / f"{name}_psd_roc.png", f"{name}: PSD-ROC")
    return TaskReport(name, task_type, result.metrics, inputs=inputs, plots=[plot], notes=notes,
                      metric_notes=metric_notes or {}, metric_errors=result.failures)


def heatmap_path(out_dir: Path, task: str, clip: str) -> Path:
    """Where a task's frame-score heatmap of one clip goes (characters unsafe in file names become "_")."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in clip)
    return out_dir / f"{task}_heatmap_{safe}.png"


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_psd_rocs(
    rocs: dict[str, tuple[np.ndarray, np.ndarray]], values: dict[str, float], path: Path, title: str
) -> Path:
    """PSD-ROC staircase curves (eTPR versus eFPR per hour), one per PSDS setting, labelled with its PSDS."""
    figure = _figure()
    axes = figure.add_subplot()
    for name, (true_positive_rate, false_positive_rate) in rocs.items():
        axes.step(false_positive_rate, true_positive_rate, where="post", label=f"{name} = {values[name]:.3f}")
    axes.set_xlabel("eFPR (per hour)")
    axes.set_ylabel("eTPR")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=100)
    return path


def plot_rank_histogram(ranks: np.ndarray, path: Path, title: str) -> Path:
    """Histogram of the 1-based text-to-audio ranks, R@1/5/10 cut-offs marked."""
    ranks = np.asarray(ranks)
    figure = _figure()
    axes = figure.add_subplot()
    bins = np.arange(1, int(ranks.max()) + 2) if ranks.max() <= 50 else np.unique(
        np.geomspace(1, ranks.max() + 1, 40).astype(int))
    axes.hist(ranks, bins=bins, color="tab:blue", edgecolor="white")
    if ranks.max() > 50:
        axes.set_xscale("log")
    for cutoff in (1, 5, 10):
        axes.axvline(cutoff + 1, color="tab:red", linestyle="--", linewidth=1)
    axes.set_xlabel("rank of the caption's audio (1 = best; dashed: R@1/5/10 cut-offs)")
    axes.set_ylabel("captions")
    axes.set_title(title)
    figure.savefig(path, dpi=100)
    return path


def plot_threshold_f1(thresholds: np.ndarray, f1: np.ndarray, path: Path, title: str) -> Path:
    """Grounding F1 versus decision threshold (the curve under threshold_auc)."""
    figure = _figure(6.0, 3.5)
    axes = figure.add_subplot()
    axes.plot(thresholds, f1, marker=".")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("threshold")
    axes.set_ylabel("F1")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
    return path
