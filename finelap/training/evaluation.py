"""Evaluation of checkpoints while training goes on (train.eval_config every train.eval_every steps)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from finelap.checkpoint import tag_for_step
from finelap.training.hooks import Hook, LastBatch, StepEnd
from finelap.training.run_log import RunLog


class PeriodicEvaluation(Hook):
    """Rank 0 evaluates each checkpoint saved at a multiple of `every` steps: `finelap export` then
    `finelap eval` in a background process, output in OUTPUT_DIR/eval/<tag>/ and its log in
    OUTPUT_DIR/eval/<tag>.log. Finished results go to the run log as eval/... scalars; the run's end
    waits for the evaluations still running."""

    def __init__(self, eval_config: str | None, every: int | None, output_dir: Path, checkpoint_dir: Path,
                 rank: int, log: RunLog):
        self.enabled = bool(eval_config) and rank == 0
        self.eval_config, self.every, self.log = eval_config, every, log
        self.output_dir, self.checkpoint_dir = output_dir, checkpoint_dir
        self.running = {}  # step -> the subprocess.Popen evaluating it

    def on_step_end(self, step: StepEnd) -> bool:
        for eval_step, metrics in self.finished():
            self.log.evaluation(eval_step, metrics)
        return False

    def on_save(self, step: int) -> None:
        if self.enabled and step % self.every == 0:
            self.start(step)

    def on_finish(self, last: LastBatch | None) -> None:
        for eval_step, metrics in self.finished(wait=True):
            self.log.evaluation(eval_step, metrics)

    def start(self, step: int) -> None:
        tag = tag_for_step(step)
        out = self.output_dir / "eval" / tag
        model = out / "model"
        finelap = [sys.executable, "-m", "finelap.cli"]
        export = finelap + ["export", "--checkpoint", str(self.checkpoint_dir / tag), "--out", str(model)]
        evaluate = finelap + ["eval", "--model", str(model), "--config", str(self.eval_config), "--out", str(out),
                              "--device", "cpu"]
        command = f"{shlex.join(export)} && {shlex.join(evaluate)}"
        out.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.output_dir / "eval" / f"{tag}.log", "w")
        self.running[step] = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT)

    def finished(self, wait: bool = False) -> list[tuple[int, dict]]:
        """(step, metrics) of evaluations that ended since the last call; `wait` for all of them."""
        results = []
        for step, process in list(self.running.items()):
            if wait:
                process.wait()
            if process.poll() is None:
                continue
            del self.running[step]
            metrics_file = self.output_dir / "eval" / tag_for_step(step) / "metrics.json"
            if metrics_file.is_file():  # also after a metric failed: the others were computed and written
                results.append((step, json.loads(metrics_file.read_text())))
            if process.returncode != 0:
                print(f"evaluation of step {step} failed (exit {process.returncode}); see "
                      f"{self.output_dir / 'eval' / (tag_for_step(step) + '.log')}", file=sys.stderr, flush=True)
        return results
