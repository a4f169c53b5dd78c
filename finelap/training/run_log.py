"""The run's records: rank 0's step log (JSON lines, TensorBoard, progress bar, time left) and
each rank's log of the samples every step consumed."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from finelap.training.hooks import Hook, LastBatch, StepEnd


@dataclass
class LogWindow:
    """This rank's counters since the last log record (kept without any synchronisation), and the
    record's throughput fields gathered from every rank's counters at the record."""

    started: float = field(default_factory=time.perf_counter)  # seconds, time.perf_counter
    clips: int = 0  # clips this rank trained on
    tokens: int = 0  # text-tower token positions this rank encoded, padding included
    data_wait: float = 0.0  # seconds this rank waited for its batches

    def reset(self) -> None:
        self.started, self.clips, self.tokens, self.data_wait = time.perf_counter(), 0, 0, 0.0

    def rates(self, device: torch.device) -> dict:
        """The log record's throughput fields, from every rank's counters (a collective: every rank
        calls it at each record, one all-gather of three numbers):
        samples_per_s: the clips of all ranks over the window's wall time (the longest rank's);
        data_wait_share_max / _median: the share of its window a rank spent waiting for data, for the
        rank that waited most (data_wait_slowest_rank) and the median rank; tokens_encoded: this rank's."""
        local = torch.tensor([self.clips, time.perf_counter() - self.started, self.data_wait],
                             dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            local = torch.stack(gathered)
        clips, elapsed, waits = local.reshape(-1, 3).T.tolist()
        shares = [wait / max(seconds, 1e-9) for wait, seconds in zip(waits, elapsed)]
        slowest = max(range(len(shares)), key=shares.__getitem__)
        return {"samples_per_s": sum(clips) / max(max(elapsed), 1e-9), "tokens_encoded": self.tokens,
                "data_wait_share_max": shares[slowest], "data_wait_share_median": statistics.median(shares),
                "data_wait_slowest_rank": slowest}


class RunLog(Hook):
    """Rank 0's record of the run: JSON lines per step (OUTPUT_DIR/train_log.jsonl), TensorBoard
    scalars, a progress bar, and a printed estimate of the time left (ETA_FIRST steps after the first
    record, then at every tenth of the run). Other ranks' RunLog does nothing."""

    ETA_FIRST = 10

    def __init__(self, output_dir: Path, rank: int, total_steps: int, start_step: int):
        self.rank, self.total_steps = rank, total_steps
        self.bar = self.writer = self.file = None
        self.eta_from = self.next_estimate = None  # (step, time) the next estimate measures from; its step
        if rank != 0:
            return
        self.file = open(output_dir / "train_log.jsonl", "a")
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def step(self, record: dict, steps: int = 1) -> None:
        """Write `record`, the newest of `steps` optimizer steps since the last record (train.log_every)."""
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        self.bar.set_postfix(clip=f"{record['clip_loss']:.4f}", frame=f"{record['frame_loss']:.4f}",
                             lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
        self.bar.update(steps)
        self._estimate(record["step"])

    def _estimate(self, step: int) -> None:
        """Print the measured time per step and the time left: ETA_FIRST steps after the first record
        (whose steps also paid for start-up, so they are not measured), then at each tenth of the run."""
        now = time.perf_counter()
        if self.eta_from is None:
            self.eta_from, self.next_estimate = (step, now), step + self.ETA_FIRST
            return
        if step < self.next_estimate or step >= self.total_steps:
            return
        since_step, since = self.eta_from
        per_step = (now - since) / (step - since_step)
        left = per_step * (self.total_steps - step)
        finish = time.strftime("%H:%M", time.localtime(time.time() + left))
        measured = f"step {step}" if step == since_step + 1 else f"steps {since_step + 1}-{step}"
        self.bar.write(f"step {step} of {self.total_steps}: {per_step:.2f} s per step ({measured}), "
                       f"about {_duration(left)} left (done near {finish})")
        tenth = max(1, self.total_steps // 10)
        self.eta_from, self.next_estimate = (step, now), (step // tenth + 1) * tenth

    def evaluation(self, step: int, metrics: dict) -> None:
        """Scalars of a finished evaluation: eval/<task>/<metric> at the checkpoint's step."""
        if self.rank != 0:
            return
        for task, values in metrics.items():
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"eval/{task}/{name}", value, step)
        self.file.write(json.dumps({"step": step, "eval": metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.rank == 0:
            self.bar.close()
            self.writer.close()
            self.file.close()

    def on_finish(self, last: LastBatch | None) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """'1 h 05 min', '12 min 30 s' or '45 s'."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class SampleLog(Hook):
    """Per-rank JSON lines of the sample indices each optimizer step consumed, for resume audits:
    OUTPUT_DIR/samples_rankNNNNN.jsonl, one {"step", "epoch", "samples"} per step."""

    def __init__(self, output_dir: Path, rank: int):
        self.file = open(output_dir / f"samples_rank{rank:05d}.jsonl", "a")

    def on_step_end(self, step: StepEnd) -> bool:
        self.file.write(json.dumps({"step": step.step, "epoch": step.epoch, "samples": step.sample_indices}) + "\n")
        self.file.flush()
        return False

    def on_finish(self, last: LastBatch | None) -> None:
        self.file.close()
