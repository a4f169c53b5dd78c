"""Pretrain FineLAP with DeepSpeed.

    deepspeed [--num_gpus N | --hostfile H] finelap/train.py --config configs/X.yaml [--set key=value ...]
    python finelap/train.py --config configs/X.yaml            # one process

One step: a batch of waveforms and labels (finelap.data) -> batched Kaldi
fbank on the model's device -> FineLAP forward (audio tower, one text-tower
call on the step's unique captions and phrases) -> dual-stream sigmoid loss
(finelap.losses, fused kernels, columns gathered across ranks) ->
engine.backward / engine.step. We build the AdamW optimizer (torch's fused
kernel on GPU) and hand it to DeepSpeed, which owns the warm-up + cosine
schedule, gradient clipping and accumulation, ZeRO and precision; we add
crash-safe checkpoints with the sampler position and RNG states
(finelap.checkpoint). The start-up clock, logs, profiling, periodic evaluation
and the embedding probe attach to the loop as hooks (finelap.training.hooks).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script: keep this folder's modules (config.py, data/, ...) from shadowing top-level packages.
    sys.path.pop(0)

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from finelap import checkpoint
from finelap.audio.fbank import compute_features
from finelap.config import Config, ConfigError, add_set_argument, load_config
from finelap.data.loader import build_train_loader
from finelap.kernels import BACKENDS
from finelap.losses import DualStreamSigmoidLoss
from finelap.profiling import PhaseTimer
from finelap.training.engine import build_optimizer, deepspeed_config, freeze
from finelap.training.evaluation import PeriodicEvaluation
from finelap.training.hooks import LastBatch, StepEnd
from finelap.training.probe import EmbeddingProbe
from finelap.training.profile import ProfileSession, timed_batches
from finelap.training.run_log import LogWindow, RunLog, SampleLog
from finelap.training.runtime import Runtime, set_up, show_data_messages
from finelap.training.startup import StartupClock

SKIPPED_NAME = "skipped.jsonl"  # in the run folder: every sample skipped under on_bad_sample: skip, with its reason


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain FineLAP with DeepSpeed.")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    add_set_argument(parser, help="override config keys, e.g. --set optim.lr=1e-4 train.max_steps=100")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest complete checkpoint (or the given tag)")
    parser.add_argument("--profile", action="store_true",
                        help="time each phase of --profile-steps steps (after 2 warm-up steps), then stop and write "
                             "OUTPUT_DIR/profile/breakdown.json; the first --profile-trace-steps of them are also "
                             "traced with torch.profiler (TensorBoard / Perfetto trace in OUTPUT_DIR/profile/), "
                             "which also measures the communication time")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps timed by --profile (after 2 warm-up steps)")
    parser.add_argument("--profile-trace-steps", type=int, default=3,
                        help="of those, steps traced by torch.profiler (a trace grows by tens of MB per GPU step)")
    parser.add_argument("--profile-loss-backends", nargs="+", default=[], metavar="BACKEND", choices=BACKENDS,
                        help="with --profile: also time, at each profiled step, the loss forward + backward of each "
                             "listed finelap.kernels backend on detached copies of that step's embeddings (training "
                             "uses loss.backend); reported as loss_backends_seconds_per_step")
    parser.add_argument("--probe-embeddings", action="store_true",
                        help="after training, embed the last batch through the engine (eval mode) and save the "
                             "inputs and embeddings to OUTPUT_DIR/probe_embeddings.pt, to check an export against")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_args(argv)


def check_inputs(config: Config, resuming: bool = False) -> None:
    """Fail before any process group starts when an input file is missing or a setting is out of range."""
    init_from = config.model.audio.init_from
    if init_from and not resuming and not Path(init_from).exists():
        raise FileNotFoundError(f"model.audio.init_from: not found: {init_from}")
    if config.train.keep_last is not None and config.train.keep_last < 1:
        raise ConfigError(f"train.keep_last must be >= 1 (or null: keep every checkpoint), got {config.train.keep_last}")
    layers = config.optim.text_encoder_trainable_layers
    if layers is not None and layers < 0:
        raise ConfigError(f"optim.text_encoder_trainable_layers must be >= 0, got {layers}")
    if not config.data.sources:
        raise ConfigError("data.sources is empty: list at least one training metadata file")
    for source in config.data.sources:
        if not Path(source.path).is_file():
            raise FileNotFoundError(f"data.sources '{source.name}': metadata file not found: {source.path}")
    if config.data.phrase_bank and not Path(config.data.phrase_bank).is_file():
        raise FileNotFoundError(f"data.phrase_bank: file not found: {config.data.phrase_bank}")
    if config.data.shards and not Path(config.data.shards).is_dir():
        raise FileNotFoundError(f"data.shards: folder not found: {config.data.shards}")
    if config.train.eval_config and not Path(config.train.eval_config).is_file():
        raise FileNotFoundError(f"train.eval_config: file not found: {config.train.eval_config}")
    if bool(config.train.eval_config) != bool(config.train.eval_every):
        raise ConfigError("train.eval_config and train.eval_every go together: set both or neither")


@dataclass
class PendingStep:
    """An optimizer step not yet logged: its losses stay on the device until the next record."""

    step: int
    epoch: int
    losses: torch.Tensor  # [clip, frame] float32, detached, global (equal on every rank)
    frame_rows: int
    phrase_columns: int
    lr: float
    sample_indices: list[int]
    audio_ids: list[str]


class Trainer:
    """One training run. `__init__` builds the model, loss, data and DeepSpeed engine, resumes when
    asked and attaches the hooks; `run` takes, for each batch, `train_step` (features, forward,
    loss, backward, optimizer) then `after_step` (hooks, time budget, log record, checkpoint);
    `finish` ends the run (the hooks' on_finish, then finished.json)."""

    def __init__(self, args: argparse.Namespace, config: Config, runtime: Runtime, startup: StartupClock):
        # here, not at the top: finelap.models imports transformers, seconds that a config error need not wait
        from finelap.models import build_model

        self.args, self.config, self.runtime = args, config, runtime
        rank = runtime.rank
        # Same initial weights on every rank (a resumed run takes every weight from its checkpoint);
        # dropout streams differ per rank.
        model = build_model(config.model, config.train.seed, load_init_from=not args.resume)
        if config.model.audio.init_from and not args.resume and rank == 0:
            print(f"audio encoder initialised from {config.model.audio.init_from}", flush=True)
        freeze(model, config)
        torch.manual_seed(config.train.seed + rank)
        startup.mark("model")
        self.loss_fn = DualStreamSigmoidLoss.from_config(config.loss)
        self.loader = build_train_loader(config, rank=rank, world_size=runtime.world_size)
        startup.mark("data loader")
        steps_per_epoch = len(self.loader) // config.optim.grad_accumulation
        self.total_steps = config.train.epochs * steps_per_epoch
        if config.train.max_steps is not None:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, config, runtime.on_gpu),
            config=deepspeed_config(config, self.total_steps, runtime.use_bf16),
        )
        startup.mark("DeepSpeed engine")

        self.step, self.epoch = 0, 0
        self.nonfinite_skips = self.empty_batches = 0
        self.out_of_time = False
        self.step_indices: list[int] = []  # sample indices of the micro-batches of the step under way
        self.pending: list[PendingStep] = []  # steps not yet in the log
        self.window = LogWindow()  # this rank's counters since the last log record
        self.last: LastBatch | None = None  # the last step's inputs, for the hooks' on_finish
        if args.resume:
            self._resume(args.resume)

        self.timer = PhaseTimer(runtime.device, enabled=args.profile)  # the step's phases, timed under --profile
        self.log = RunLog(runtime.output_dir, rank, self.total_steps, self.step)
        self.profile = ProfileSession(
            self.engine, self.timer, runtime, startup, first_step=self.step, steps=args.profile_steps,
            trace_steps=args.profile_trace_steps, loss_config=config.loss, loss_backends=args.profile_loss_backends,
        ) if args.profile else None
        evaluation = PeriodicEvaluation(config.train.eval_config, config.train.eval_every, runtime.output_dir,
                                        runtime.checkpoint_dir, rank, self.log)
        probe = EmbeddingProbe(self.engine, runtime) if args.probe_embeddings else None
        # called in this order; at the end: the profile report, pending evaluations, the probe, the logs closed
        hooks = (startup, SampleLog(runtime.output_dir, rank), self.profile, evaluation, probe, self.log)
        self.hooks = [hook for hook in hooks if hook is not None]
        self.training_start = time.perf_counter()  # train.max_minutes counts from here

    def _resume(self, tag: str) -> None:
        state = checkpoint.load(self.engine, self.runtime.checkpoint_dir, None if tag == "latest" else tag)
        self.step, self.epoch = state["step"], state["epoch"]
        self.loader.load_state_dict(state)
        if self.runtime.rank == 0:
            print(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.loader.position})", flush=True)

    def run(self) -> None:
        done = self.step >= self.total_steps
        while not done and self.epoch < self.config.train.epochs:
            self.loader.set_epoch(self.epoch)
            for batch in timed_batches(self.loader, self.timer, self.window, self.runtime.rank):
                if not self.train_step(batch):
                    continue
                done = self.after_step()
                if done:
                    break
            if not done:
                self.epoch += 1
        self._write_log_record()

    def train_step(self, batch) -> bool:
        """Forward, loss, backward and optimizer on one batch; False when the batch was skipped
        (no clip left under on_bad_sample: skip, or a non-finite loss under on_nonfinite_loss: skip)
        or did not end an optimizer step (gradient accumulation)."""
        config, runtime, timer = self.config, self.runtime, self.timer
        if config.data.on_bad_sample == "skip" and self._some_rank_has_an_empty_batch(batch):
            self.empty_batches += 1
            return False
        batch = batch.to(runtime.device)
        with timer.phase("feature_extraction"):
            features, frame_counts = compute_features(batch.waveforms, batch.lengths, config.model.audio)
        with timer.phase("forward"):
            output = self.engine(features.to(runtime.compute_dtype), frame_counts, batch.captions, batch.phrases)
        with timer.phase("loss"):
            losses = self.loss_fn(output, batch)
        if self.profile is not None:  # --profile-loss-backends
            self.profile.compare_loss_backends(output, batch)
        self.last = LastBatch(batch, features, frame_counts)
        # clip_loss and frame_loss are global (equal on every rank), so every rank decides alike
        if config.train.on_nonfinite_loss == "skip" and not bool(_finite(losses)):  # a host sync, only here
            self.nonfinite_skips += 1
            return False
        with timer.phase("backward"):
            self.engine.backward(losses.loss)
        with timer.phase("optimizer_step"):
            self.engine.step()
        self.step_indices += batch.sample_index.tolist()
        self.window.clips += len(batch.audio_ids)
        self.window.tokens += output.padded_text_tokens
        if not self.engine.is_gradient_accumulation_boundary():
            return False
        self.step += 1
        self.pending.append(PendingStep(
            self.step, self.epoch, torch.stack([losses.clip_loss, losses.frame_loss]).float(), losses.frame_rows,
            losses.phrase_columns, self.scheduler.get_lr()[0], batch.sample_index.tolist(), list(batch.audio_ids)))
        return True

    def _some_rank_has_an_empty_batch(self, batch) -> bool:
        """Whether skipped clips left this step's batch empty on any rank (collective), so that all ranks
        skip the step together. Collectives take tensors on the process group's device (NCCL refuses CPU
        tensors)."""
        nonempty = torch.tensor(float(len(batch.audio_ids) > 0), device=self.runtime.device)
        dist.all_reduce(nonempty, op=dist.ReduceOp.MIN)
        return nonempty.item() == 0

    def after_step(self) -> bool:
        """The hooks, the time budget, the log record and the checkpoint after optimizer step
        `self.step`; True ends the run."""
        step, train = self.step, self.config.train
        ended = StepEnd(step, self.epoch, self.step_indices)
        stop_requests = [hook.on_step_end(ended) for hook in self.hooks]  # a list: every hook runs
        self.step_indices = []
        done = step >= self.total_steps or any(stop_requests)
        self.out_of_time = self._time_budget_spent()
        evaluate_now = bool(train.eval_every) and step % train.eval_every == 0  # the evaluation reads the checkpoint
        save_now = step % train.save_every == 0 or done or evaluate_now or self.out_of_time
        if step % train.log_every == 0 or save_now:
            self._write_log_record()
        if save_now:
            self.save()
        return done or self.out_of_time

    def _time_budget_spent(self) -> bool:
        """Whether training has run train.max_minutes (collective: rank 0's clock decides for every rank)."""
        max_minutes = self.config.train.max_minutes
        if max_minutes is None:
            return False
        over = torch.tensor(float(time.perf_counter() - self.training_start >= 60 * max_minutes),
                            device=self.runtime.device)
        dist.broadcast(over, src=0)
        spent = bool(over.item())
        if spent and self.step < self.total_steps and self.runtime.rank == 0:
            print(f"train.max_minutes = {max_minutes} reached: stopping at step {self.step} "
                  f"of {self.total_steps}. Where a run stops now depends on the machine's speed, so its "
                  f"results are not comparable with other runs of this config", flush=True)
        return spent

    def _write_log_record(self) -> None:
        """Bring the pending steps' losses to the host in one transfer and write the newest as the
        log record (train.log_every), with the throughput of every rank (one small all-gather); raise
        here if any loss was not finite (on_nonfinite_loss: error)."""
        if not self.pending:
            return
        values = torch.stack([pending.losses for pending in self.pending]).tolist()  # the one host transfer
        for pending, (clip, frame) in zip(self.pending, values):
            if not (math.isfinite(clip) and math.isfinite(frame)):
                raise FloatingPointError(
                    f"non-finite loss at step {pending.step} (epoch {pending.epoch}, rank {self.runtime.rank}, "
                    f"sample indices {pending.sample_indices}, audio ids {pending.audio_ids}): clip {clip}, frame {frame}")
        last = self.pending[-1]
        clip, frame = values[-1]
        self.log.step({
            "step": last.step, "epoch": last.epoch,
            "loss": self.config.loss.alpha * clip + self.config.loss.beta * frame,
            "clip_loss": clip, "frame_loss": frame, "lr": last.lr,
            **self.window.rates(self.runtime.device),  # samples/s of all ranks, data-wait shares (collective)
            "frame_rows": last.frame_rows, "phrase_columns": last.phrase_columns,
            "nonfinite_skips": self.nonfinite_skips, "empty_batches": self.empty_batches,
            **{f"skipped_{reason}": count for reason, count in self.loader.skips.counts.items()},
            **({"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(self.runtime.device) / 2**30}
               if self.runtime.on_gpu else {}),
        }, steps=len(self.pending))
        self.pending = []
        self.window.reset()

    def save(self) -> None:
        """A checkpoint (collective), the list of skipped samples (OUTPUT_DIR/skipped.jsonl), and the
        check that no phrase label has lost every clip to skips (data.on_empty_class); then the hooks'
        on_save."""
        self.loader.gather_skips()  # every rank now holds every rank's skips, so the checkpoint has them all
        if self.runtime.rank == 0:
            self.loader.skips.write_jsonl(self.runtime.output_dir / SKIPPED_NAME)
        state = {"step": self.step, "epoch": self.epoch, **self.loader.state_dict()}
        checkpoint.save(self.engine, self.runtime.checkpoint_dir, self.step, state,
                        module_weights=self.config.deepspeed.zero_stage == 0)
        if self.config.train.keep_last is not None and self.runtime.rank == 0:
            checkpoint.remove_older(self.runtime.checkpoint_dir, keep=self.config.train.keep_last)
        # after the checkpoint, so the progress is kept; every rank holds the same skips and decides alike
        self.loader.check_label_survival(self.config.data.on_empty_class)
        for hook in self.hooks:
            hook.on_save(self.step)

    def finish(self) -> None:
        """The hooks' on_finish, then finished.json (unless profiling cut the run short)."""
        for hook in self.hooks:
            hook.on_finish(self.last)  # None when no step ran: a finished run resumed
        if self.runtime.rank != 0:
            return
        if self.profile is not None and self.step < self.total_steps:
            # profiling ends the run early: it is not finished, and --resume continues it
            print(f"--profile: stopped at step {self.step} of {self.total_steps} after profiling; the run is not "
                  f"finished (continue it with --resume)", flush=True)
        else:
            checkpoint.write_finished(self.runtime.output_dir, self.step, self.total_steps, self.stop_reason())
            print(f"finished at step {self.step}; checkpoints in {self.runtime.checkpoint_dir}", flush=True)

    def stop_reason(self) -> str:
        """What ended the run: "max_minutes" (the time budget cut it short), "max_steps" (train.max_steps
        reached) or "epochs" (every planned epoch ran)."""
        if self.out_of_time and self.step < self.total_steps:
            return "max_minutes"
        max_steps = self.config.train.max_steps
        return "max_steps" if max_steps is not None and self.step >= max_steps else "epochs"


def _finite(losses) -> torch.Tensor:
    return torch.isfinite(losses.clip_loss) & torch.isfinite(losses.frame_loss)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.set)  # config errors stop us before any process starts talking
    check_inputs(config, resuming=bool(args.resume))
    startup = StartupClock()
    runtime = set_up(config)
    show_data_messages(runtime.rank)
    startup.mark("distributed set-up")
    trainer = Trainer(args, config, runtime, startup)
    try:
        trainer.run()
    except checkpoint.CheckpointSpaceError as error:  # a full disk is the user's to fix: say how, without a traceback
        if runtime.rank == 0 or not error.on_every_rank:
            print(f"error (rank {runtime.rank}): {error.strerror}", file=sys.stderr, flush=True)
        return 1
    trainer.finish()
    # every rank leaves together and closes its connections: a rank that exits while another still
    # talks to it can abort in the communicator's threads
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
