"""The task types `finelap eval --model` runs, each by its runner, and `evaluate`, which runs a
config's tasks with one model folder."""
from __future__ import annotations

import logging
from pathlib import Path

from finelap.eval.config import EvalConfig
from finelap.eval.embedding import TaskContext
from finelap.eval.grounding import run_grounding
from finelap.eval.report import TaskReport, write_report
from finelap.eval.retrieval import run_retrieval
from finelap.eval.sed import run_sed
from finelap.eval.zero_shot import run_zero_shot

logger = logging.getLogger("finelap.eval")

RUNNERS = {"retrieval": run_retrieval, "zero_shot": run_zero_shot, "sed": run_sed, "grounding": run_grounding}


def evaluate(
    model_dir: str | Path, config: EvalConfig, out_dir: str | Path, save_scores: bool = False
) -> list[TaskReport]:
    """Run every task of `config` with the model folder; write metrics.json, report.md and plots to `out_dir`."""
    from finelap.infer import FineLAPInference  # loads torch models: only when a model is evaluated

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inference = FineLAPInference.from_pretrained(model_dir, device=config.device, batch_size=config.batch_size)
    reports = []
    for task in config.tasks:
        logger.info("evaluating %s (%s)", task.name, task.type)
        context = TaskContext(
            inference=inference, batch_size=task.batch_size or config.batch_size, out_dir=out_dir,
            heatmaps=config.heatmaps, scores_dir=out_dir / "scores" if save_scores else None,
        )
        reports.append(RUNNERS[task.type](task, context))
    write_report(reports, out_dir, title=f"FineLAP evaluation of {Path(model_dir).name}")
    return reports
