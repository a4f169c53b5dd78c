"""Where a run's start-up goes: seconds from the process's creation to each set-up stage and to
the end of the first step, printed once that step ends and kept in --profile's breakdown.json."""
from __future__ import annotations

import time

import psutil  # a requirement of DeepSpeed
import torch.distributed as dist

from finelap.training.hooks import Hook, StepEnd

FIRST_STEP = "first step"  # compiles kernels and starts the data workers


class StartupClock(Hook):
    """`mark(stage)` at the end of each set-up stage; the first step's end is marked by the hook."""

    def __init__(self):
        self.started = time.time() - psutil.Process().create_time()  # interpreter, imports, config, input check
        self.origin = time.perf_counter() - self.started
        self.seconds: dict[str, float] = {"imports, config and input check": round(self.started, 2)}
        self.last = self.started

    def mark(self, stage: str) -> None:
        now = time.perf_counter() - self.origin
        self.seconds[stage] = round(now - self.last, 2)
        self.last = now

    def summary(self) -> str:
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
        return f"start-up: the first step ended {self.last:.1f} s after the process started ({stages})"

    def on_step_end(self, step: StepEnd) -> bool:
        if FIRST_STEP not in self.seconds:
            self.mark(FIRST_STEP)
            if dist.get_rank() == 0:
                print(self.summary(), flush=True)
        return False
