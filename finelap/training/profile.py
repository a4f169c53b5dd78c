"""--profile: where a training step's time goes, per phase and per rank, with MFU and communication.

The trainer times its phases with a `PhaseTimer` (finelap.profiling) and fetches batches through
`timed_batches`; `ProfileSession` is the hook that runs the torch profiler over those steps, ends
the run after them, gathers every rank's phases to rank 0, names the slowest rank and writes
OUTPUT_DIR/profile/breakdown.json.

A rank is slow when its own work takes longest: its step less its time in collectives (where a
rank waits for the others, so in lockstep every rank's wall time per step is the same). Its slow
phase is the one furthest above the ranks' median. PLANTED_DELAY (an environment variable,
"RANK:SECONDS") makes that rank sleep before each batch, to check that a profile finds a slow
data loader.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from finelap.config import LossConfig
from finelap.losses import DualStreamSigmoidLoss
from finelap.profiling import (
    PhaseTimer, communication_seconds, gather_json, matmul_flops, matmul_peak_flops, module_phase_hooks,
)
from finelap.training.hooks import Hook, LastBatch, StepEnd
from finelap.training.run_log import LogWindow
from finelap.training.runtime import Runtime
from finelap.training.startup import StartupClock

WARM_UP_STEPS = 2  # run, not timed: their time goes to compiling kernels and starting the data workers
PHASES = ("data_wait", "feature_extraction", "forward", "audio_encode", "text_encode", "loss", "backward",
          "optimizer_step", "communication")  # in the order of a step; the report lists them so
IN_FORWARD = ("text_encode", "audio_encode")  # parts of forward, not added to the step's time
# the loss's inputs: detached copies of these, with gradients, feed each compared loss backend
LOSS_INPUTS = ("clip_embeddings", "frame_embeddings", "caption_embeddings", "phrase_embeddings",
               "clip_scale", "clip_bias", "frame_scale", "frame_bias")


PLANTED_DELAY = "FINELAP_PLANTED_DATA_DELAY"  # "RANK:SECONDS": a test-only straggler


def planted_delay(rank: int) -> float:
    """Seconds this rank sleeps before each batch under PLANTED_DELAY (0 without it)."""
    value = os.environ.get(PLANTED_DELAY)
    if not value:
        return 0.0
    slow_rank, _, seconds = value.partition(":")
    return float(seconds) if int(slow_rank) == rank else 0.0


def timed_batches(loader, timer: PhaseTimer, window: LogWindow, rank: int):
    """Iterate `loader`, charging the wait for each batch to the data_wait phase (under --profile)
    and to the log window's data-wait seconds (always: two clock reads per batch)."""
    batches, delay = iter(loader), planted_delay(rank)
    while True:
        start = time.perf_counter()
        with timer.phase("data_wait"):
            if delay:
                time.sleep(delay)
            batch = next(batches, None)
        window.data_wait += time.perf_counter() - start
        if batch is None:
            return
        yield batch


class ProfileSession(Hook):
    """Times each phase of `steps` steps after WARM_UP_STEPS warm-up steps (the trainer's `timer`,
    enabled), traces the first `trace_steps` of them with torch.profiler (a TensorBoard / Perfetto
    trace in OUTPUT_DIR/profile/, which also measures communication), then ends the run. With
    `loss_backends`, also times each listed loss backend on the timed steps' embeddings."""

    def __init__(self, engine, timer: PhaseTimer, runtime: Runtime, startup: StartupClock, first_step: int,
                 steps: int, trace_steps: int, loss_config: LossConfig, loss_backends: list[str]):
        self.engine, self.timer, self.runtime, self.startup = engine, timer, runtime, startup
        self.end_step = first_step + WARM_UP_STEPS + steps
        self.trace_steps = max(1, min(trace_steps, steps))
        self.timing = False  # past the warm-up
        self.clips = 0  # clips this rank trained on in the timed steps
        self.timed_from = self.timed_until = 0.0  # wall clock (time.perf_counter) of the timed steps
        self.compared_losses = {
            backend: DualStreamSigmoidLoss.from_config(dataclasses.replace(loss_config, backend=backend))
            for backend in loss_backends}
        self.module_hooks = module_phase_hooks(engine.module.text_encoder.model, timer, "text_encode")
        self.module_hooks += module_phase_hooks(engine.module.audio_encoder, timer, "audio_encode")
        self.profiler = profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.on_gpu else []),
            # the trace covers the first trace_steps timed steps, then the phase timer goes on alone:
            # a trace of every timed step is slow to write and to open
            schedule=schedule(wait=0, warmup=WARM_UP_STEPS, active=self.trace_steps, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(runtime.output_dir / "profile")),
            record_shapes=False,
        )
        self.profiler.start()

    def compare_loss_backends(self, output, batch) -> None:
        """In the timed steps, the loss forward + backward of each compared backend on detached copies of
        this step's embeddings, each timed as phase `loss_backend[NAME]` (not part of the step's time;
        every rank runs them, as the losses gather across ranks)."""
        if not self.timing:
            return
        for backend, loss_fn in self.compared_losses.items():
            copy = dataclasses.replace(output, **{name: getattr(output, name).detach().requires_grad_()
                                                  for name in LOSS_INPUTS})
            with self.timer.phase(f"loss_backend[{backend}]"):
                loss_fn(copy, batch).loss.backward()

    def on_step_end(self, step: StepEnd) -> bool:
        self.timer.steps += 1
        self.profiler.step()
        now = time.perf_counter()
        if self.timing:
            self.clips += len(step.sample_indices)
            self.timed_until = now
        elif self.timer.steps == WARM_UP_STEPS:
            self.timer.seconds.clear()
            self.timer.steps, self.timing = 0, True
            self.timed_from = self.timed_until = now
        return step.step >= self.end_step

    def on_finish(self, last: LastBatch | None) -> None:
        self.profiler.stop()
        if last is not None:
            self.write(last)
        elif self.runtime.rank == 0:
            print("--profile: no step ran (the run had already finished), nothing to profile", flush=True)
        for handle in self.module_hooks:
            handle.remove()

    def write(self, last: LastBatch) -> None:
        """Per-phase breakdown, samples/s per device, MFU (matrix-product flops of `last`'s forward),
        on CUDA the peak memory allocated (GiB), and every rank's phases with the slowest rank named:
        printed, and saved to OUTPUT_DIR/profile/breakdown.json."""
        report = self.report(last)
        if self.runtime.rank == 0:
            folder = self.runtime.output_dir / "profile"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "breakdown.json").write_text(json.dumps(report, indent=2))
            print(_table(report), flush=True)

    def report(self, last: LastBatch) -> dict:
        """breakdown.json's content; every rank computes it (the flop count's forward may gather)."""
        device, dtype = self.runtime.device, self.runtime.compute_dtype
        peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if self.runtime.on_gpu else None
        traced_steps = min(self.trace_steps, self.timer.steps)
        per_step = self.timer.per_step()
        # communication overlaps backward and the step, so it is shown but not added
        per_step["communication"] = communication_seconds(self.profiler) / max(traced_steps, 1)
        compared = {name[len("loss_backend["):-1]: seconds for name, seconds in per_step.items()
                    if name.startswith("loss_backend[")}
        per_step = {name: per_step[name] for name in PHASES if name in per_step}
        step_seconds = sum(seconds for name, seconds in per_step.items() if name not in (*IN_FORWARD, "communication"))
        batch = last.batch
        with torch.no_grad():
            forward_flops = matmul_flops(lambda: self.engine(last.features.to(dtype), last.frame_counts,
                                                             batch.captions, batch.phrases))
        train_flops = 3 * forward_flops  # the backward's products are twice the forward's
        peak = matmul_peak_flops(device, dtype)
        clips = len(batch.audio_ids)
        report = {
            "device": torch.cuda.get_device_name(device) if self.runtime.on_gpu else "cpu",
            "world_size": self.runtime.world_size,
            "steps_profiled": self.timer.steps,
            "steps_traced": traced_steps,
            "seconds_per_step": step_seconds,
            "phases_seconds_per_step": per_step,
            "clips_per_step_per_device": clips,
            "samples_per_s_per_device": clips / max(step_seconds, 1e-9),
            "forward_flops_per_step": forward_flops,
            "mfu": train_flops / max(step_seconds, 1e-9) / peak,
            "measured_matmul_peak_flops": peak,
            "trace_dir": str(self.runtime.output_dir / "profile"),
        }
        if peak_memory is not None:
            report["peak_gpu_memory_gib"] = peak_memory
        if compared:  # --profile-loss-backends: loss forward + backward on this run's embeddings, per backend
            report["loss_backends_seconds_per_step"] = compared
        report["startup_seconds"] = self.startup.seconds
        gather_start = time.perf_counter()
        ranks = gather_json(self.rank_entry(per_step, step_seconds, peak_memory), device)
        report["ranks"] = ranks
        report["global_samples_per_s"] = sum(entry["clips"] for entry in ranks) / max(
            max(entry["wall_seconds"] for entry in ranks), 1e-9)
        report["slowest_rank"] = slowest_rank(ranks)
        report["gather_seconds"] = time.perf_counter() - gather_start  # the one collective of the per-rank report
        return report

    def rank_entry(self, per_step: dict, step_seconds: float, peak_memory: float | None) -> dict:
        """This rank's part of the report: where it runs, its phases and its own clips per second."""
        runtime = self.runtime
        wall_seconds = self.timed_until - self.timed_from
        entry = {"rank": runtime.rank, "host": runtime.host, "node_rank": runtime.node_rank,
                 "local_rank": runtime.local_rank, "phases_seconds_per_step": per_step,
                 "seconds_per_step": step_seconds, "clips": self.clips, "wall_seconds": wall_seconds,
                 "samples_per_s": self.clips / max(wall_seconds, 1e-9)}
        if peak_memory is not None:
            entry["peak_gpu_memory_gib"] = peak_memory
        return entry


def slowest_rank(ranks: list[dict]) -> dict:
    """The rank whose own work per step is longest (its step less its communication, where ranks
    wait for one another) and its phase furthest above the ranks' median (on a tie, the longest)."""
    own = [entry["seconds_per_step"] - entry["phases_seconds_per_step"].get("communication", 0.0) for entry in ranks]
    slow = ranks[max(range(len(ranks)), key=own.__getitem__)]
    phases = [name for name in slow["phases_seconds_per_step"] if name not in (*IN_FORWARD, "communication")]
    median = {name: statistics.median(entry["phases_seconds_per_step"].get(name, 0.0) for entry in ranks)
              for name in phases}
    seconds = slow["phases_seconds_per_step"]
    phase = max(phases, key=lambda name: (seconds[name] - median[name], seconds[name]))
    return {"rank": slow["rank"], "host": slow["host"], "phase": phase, "seconds": seconds[phase],
            "median_seconds": median[phase]}


def _table(report: dict) -> str:
    """The printed breakdown: for each phase rank 0's ms per step and share of its step and, with
    more than one rank, the median, min and max over ranks; then the totals and the slowest rank."""
    per_step, step_seconds = report["phases_seconds_per_step"], report["seconds_per_step"]
    peak_memory, compared = report.get("peak_gpu_memory_gib"), report.get("loss_backends_seconds_per_step")
    ranks = report["ranks"]
    several = len(ranks) > 1
    lines = [f"{'phase':<26} {'ms/step':>10} {'share':>7}"
             + (f" {'median':>9} {'min':>9} {'max':>9}  (ms/step over {len(ranks)} ranks)" if several else "")]
    for name, seconds in per_step.items():
        label = f"  {name} (in forward)" if name in IN_FORWARD else name
        line = f"{label:<26} {seconds * 1e3:>10.1f} {seconds / max(step_seconds, 1e-9):>7.1%}"
        if several:
            values = [entry["phases_seconds_per_step"].get(name, 0.0) * 1e3 for entry in ranks]
            line += f" {statistics.median(values):>9.1f} {min(values):>9.1f} {max(values):>9.1f}"
        lines.append(line)
    lines.append(f"samples/s per device: {report['samples_per_s_per_device']:.2f}   "
                 f"all ranks: {report['global_samples_per_s']:.2f}   MFU: {report['mfu']:.2%}"
                 + (f"   peak GPU memory: {peak_memory:.1f} GiB" if peak_memory is not None else ""))
    if several:
        slow = report["slowest_rank"]
        lines.append(f"slowest: rank {slow['rank']} on {slow['host']}: {slow['phase']} {slow['seconds'] * 1e3:.1f} ms "
                     f"per step, median {slow['median_seconds'] * 1e3:.1f} ms")
    if compared:
        lines.append("loss forward + backward on the step's embeddings (not in the step's time): "
                     + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in compared.items()))
    return "\n".join(lines)
