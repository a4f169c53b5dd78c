"""--profile: where a training step's time goes, per phase, with MFU and communication time.

The trainer times its phases with a `PhaseTimer` (finelap.profiling) and fetches batches through
`timed_batches`; `ProfileSession` is the hook that runs the torch profiler over those steps, ends
the run after them and writes OUTPUT_DIR/profile/breakdown.json.
"""
from __future__ import annotations

import dataclasses
import json

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from finelap.config import LossConfig
from finelap.losses import DualStreamSigmoidLoss
from finelap.profiling import PhaseTimer, communication_seconds, matmul_flops, matmul_peak_flops, module_phase_hooks
from finelap.training.hooks import Hook, LastBatch, StepEnd
from finelap.training.runtime import Runtime
from finelap.training.startup import StartupClock

WARM_UP_STEPS = 2  # run, not timed: their time goes to compiling kernels and starting the data workers
PHASES = ("data_wait", "feature_extraction", "forward", "audio_encode", "text_encode", "loss", "backward",
          "optimizer_step", "communication")  # in the order of a step; the report lists them so
IN_FORWARD = ("text_encode", "audio_encode")  # parts of forward, not added to the step's time
# the loss's inputs: detached copies of these, with gradients, feed each compared loss backend
LOSS_INPUTS = ("clip_embeddings", "frame_embeddings", "caption_embeddings", "phrase_embeddings",
               "clip_scale", "clip_bias", "frame_scale", "frame_bias")


def timed_batches(loader, timer: PhaseTimer):
    """Iterate `loader`, charging the wait for each batch to the data_wait phase."""
    batches = iter(loader)
    while True:
        with timer.phase("data_wait"):
            batch = next(batches, None)
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
        if not self.timing and self.timer.steps == WARM_UP_STEPS:
            self.timer.seconds.clear()
            self.timer.steps, self.timing = 0, True
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
        """Per-phase breakdown, samples/s per device, MFU (matrix-product flops of `last`'s forward) and,
        on CUDA, the peak memory allocated (GiB): printed, and saved to OUTPUT_DIR/profile/breakdown.json."""
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
        return report


def _table(report: dict) -> str:
    """The printed breakdown: ms per step and share of the step for each phase, then the totals."""
    per_step, step_seconds = report["phases_seconds_per_step"], report["seconds_per_step"]
    peak_memory, compared = report.get("peak_gpu_memory_gib"), report.get("loss_backends_seconds_per_step")
    lines = [f"{'phase':<26} {'ms/step':>10} {'share':>7}"]
    for name, seconds in per_step.items():
        label = f"  {name} (in forward)" if name in IN_FORWARD else name
        lines.append(f"{label:<26} {seconds * 1e3:>10.1f} {seconds / max(step_seconds, 1e-9):>7.1%}")
    lines.append(f"samples/s per device: {report['samples_per_s_per_device']:.2f}   MFU: {report['mfu']:.2%}"
                 + (f"   peak GPU memory: {peak_memory:.1f} GiB" if peak_memory is not None else ""))
    if compared:
        lines.append("loss forward + backward on the step's embeddings (not in the step's time): "
                     + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in compared.items()))
    return "\n".join(lines)
