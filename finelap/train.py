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
(finelap.checkpoint), logs and profiling.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script: keep this folder's modules (config.py, data/, ...) from shadowing top-level packages.
    sys.path.pop(0)

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finelap.checkpoint import CheckpointSpaceError, tag_for_step
from finelap.config import Config, ConfigError, add_set_argument, deep_merge, dump_config, load_config
from finelap.kernels import BACKENDS


SHM_FOLDER = Path("/dev/shm")
SKIPPED_NAME = "skipped.jsonl"  # in the run folder: every sample skipped under on_bad_sample: skip, with its reason


def unlink_shared_allreduce_buffer(rank: int) -> None:
    """Remove the shared-memory name DeepSpeed's CPU communicator creates for this rank when all
    ranks are local; DeepSpeed never does, so each CPU run would leave 69 MB of RAM per rank in
    /dev/shm until reboot. Call it after a barrier that follows init_distributed: by then every
    rank has mapped every buffer, and a mapping outlives its name."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (SHM_FOLDER / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


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


def deepspeed_config(config: Config, total_steps: int, use_bf16: bool) -> dict:
    """The DeepSpeed JSON for this run; `deepspeed.config` entries override ours, nested keys one by
    one (setting zero_optimization.overlap_comm keeps the stage).

    No "optimizer" section: `build_optimizer` makes it (DeepSpeed's own would JIT-compile its
    FusedAdam with nvcc on GPU); the "scheduler" section still drives that optimizer's lr.
    """
    optim = config.optim
    ds = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": optim.grad_accumulation,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                # DeepSpeed refuses 0 (a 1-step run, or warmup_steps: 0): one step is no warm-up either
                "warmup_num_steps": max(1, min(optim.warmup_steps, total_steps - 1)),
                "warmup_type": "linear",
            },
        },
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,  # our own log does this
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, config.deepspeed.config)


def freeze(model, config: Config) -> None:
    """Reference options: freeze the audio tower, the text tower and/or the projectors; or train
    only the text tower's top optim.text_encoder_trainable_layers layers."""
    trainable_layers = config.optim.text_encoder_trainable_layers
    if trainable_layers is not None and not config.optim.freeze_text_encoder:
        model.text_encoder.train_top_layers(trainable_layers)
    groups = {
        "freeze_audio_encoder": [model.audio_encoder],
        "freeze_text_encoder": [model.text_encoder],
        "freeze_projectors": [model.clip_projector, model.frame_projector, model.text_projector],
    }
    for option, modules in groups.items():
        if getattr(config.optim, option):
            for module in modules:
                module.requires_grad_(False)


def parameter_groups(model, config: Config) -> list[dict]:
    """Trainable parameters as AdamW groups: the text tower at optim.text_encoder_lr when set.

    The schedule scales each group's own peak lr, so the two keep their ratio throughout.
    """
    text = {id(p) for p in model.text_encoder.parameters()}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    rest = [p for _, p in trainable if id(p) not in text]
    text_params = [p for _, p in trainable if id(p) in text]
    if config.optim.text_encoder_lr is None:
        return [{"params": rest + text_params}]
    groups = [{"params": rest}, {"params": text_params, "lr": config.optim.text_encoder_lr}]
    return [group for group in groups if group["params"]]


def build_optimizer(model, config: Config, on_gpu: bool) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`: what DeepSpeed's "torch_adam" AdamW was (the same numbers on
    CPU), with torch's fused kernel on GPU."""
    optim = config.optim
    return torch.optim.AdamW(parameter_groups(model, config), lr=optim.lr, betas=tuple(optim.betas),
                             weight_decay=optim.weight_decay, fused=True if on_gpu else None)


class PeriodicEvaluation:
    """Rank 0 evaluates checkpoints while training goes on: `finelap export` then `finelap eval`
    in a background process per checkpoint; finished results go to the run log as eval/... scalars."""

    def __init__(self, eval_config: str | None, output_dir: Path, checkpoint_dir: Path, rank: int):
        self.enabled = bool(eval_config) and rank == 0
        self.eval_config, self.output_dir, self.checkpoint_dir = eval_config, output_dir, checkpoint_dir
        self.running = {}  # step -> the subprocess.Popen evaluating it

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        import shlex
        import subprocess

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


class RunLog:
    """Rank 0's record of the run: JSON lines per step, TensorBoard scalars, a progress bar, and a
    printed estimate of the time left (ETA_FIRST steps after the first record, then at every tenth of the run)."""

    ETA_FIRST = 10

    def __init__(self, output_dir: Path, rank: int, total_steps: int, start_step: int):
        self.rank, self.total_steps = rank, total_steps
        self.bar = self.writer = self.file = None
        self.eta_from = self.next_estimate = None  # (step, time) the next estimate measures from; its step
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

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


def _duration(seconds: float) -> str:
    """'1 h 05 min', '12 min 30 s' or '45 s'."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def sample_log(output_dir: Path, rank: int):
    """Per-rank JSON lines of the sample indices each optimizer step consumed (resume audits)."""
    return open(output_dir / f"samples_rank{rank:05d}.jsonl", "a")


@dataclass
class Runtime:
    """This process's place in the run: rank, device and precision, and the run folders."""

    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype
    use_bf16: bool
    output_dir: Path
    checkpoint_dir: Path

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def set_up(config: Config) -> Runtime:
    """Join (or, run as one process, form) the process group; pick the device and precision;
    write the run's config beside its checkpoints."""
    import deepspeed
    import torch.distributed as dist

    from finelap.checkpoint import CONFIG_NAME

    on_gpu = torch.cuda.is_available()
    if "RANK" not in os.environ:  # `python finelap/train.py`: a world of one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    use_bf16 = config.deepspeed.precision == "bf16" or (config.deepspeed.precision == "auto" and on_gpu)
    output_dir = Path(config.train.output_dir)
    runtime = Runtime(rank, dist.get_world_size(), device, torch.bfloat16 if use_bf16 else torch.float32, use_bf16,
                      output_dir, output_dir / "checkpoints")
    if rank == 0:
        runtime.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, runtime.checkpoint_dir / CONFIG_NAME)
    dist.barrier()
    if not on_gpu:
        unlink_shared_allreduce_buffer(rank)
    return runtime


class StartupClock:
    """Seconds from the process's start to each stage of the set-up and to the end of the first
    step (which compiles kernels and starts the data workers): where a run's start-up goes."""

    def __init__(self):
        import psutil  # a requirement of DeepSpeed

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
    """One training run, in the order a step happens:

    build (model, loss, data, DeepSpeed engine) -> `resume` (optional) -> `run`: for each batch
    `train_step` (features, forward, loss, backward, optimizer), then `after_step` (log, save,
    evaluate, time budget) -> `finish` (profile, probe, finished.json).
    """

    def __init__(self, args: argparse.Namespace, config: Config, runtime: Runtime, startup: StartupClock):
        import deepspeed

        from finelap.data.loader import build_train_loader
        from finelap.losses import DualStreamSigmoidLoss
        from finelap.models import build_model
        from finelap.profiling import PhaseTimer, module_phase_hooks

        self.args, self.config, self.runtime, self.startup = args, config, runtime, startup
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
        self.compared_losses = {  # --profile-loss-backends
            backend: DualStreamSigmoidLoss.from_config(dataclasses.replace(config.loss, backend=backend))
            for backend in (args.profile_loss_backends if args.profile else [])}
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
        self.timer = PhaseTimer(runtime.device, enabled=args.profile)
        self.hooks = module_phase_hooks(self.engine.module.text_encoder.model, self.timer, "text_encode")
        self.hooks += module_phase_hooks(self.engine.module.audio_encoder, self.timer, "audio_encode")
        self.profiler = None
        self.evaluation = PeriodicEvaluation(config.train.eval_config, runtime.output_dir, runtime.checkpoint_dir, rank)
        self.batch = self.features = self.frame_counts = None  # the last step's inputs (--profile, --probe-embeddings)
        self.out_of_time = self.profile_warm = False
        self.nonfinite_skips = self.empty_batches = 0
        self.step_indices: list[int] = []
        self.pending: list[PendingStep] = []
        self.window_start, self.window_samples, self.window_tokens = time.perf_counter(), 0, 0

    def resume(self, tag: str) -> None:
        from finelap import checkpoint

        state = checkpoint.load(self.engine, self.runtime.checkpoint_dir, None if tag == "latest" else tag)
        self.step, self.epoch = state["step"], state["epoch"]
        self.loader.load_state_dict(state)
        if self.runtime.rank == 0:
            print(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.loader.position})", flush=True)

    def run(self) -> None:
        args, runtime = self.args, self.runtime
        self.profile_end = self.step + 2 + args.profile_steps
        self.trace_steps = max(1, min(args.profile_trace_steps, args.profile_steps))
        if args.profile:
            self.profiler = _start_profiler(runtime.output_dir, runtime.device, self.trace_steps)
        self.log = RunLog(runtime.output_dir, runtime.rank, self.total_steps, self.step)
        self.samples = sample_log(runtime.output_dir, runtime.rank)
        self.training_start = time.perf_counter()
        done = self.step >= self.total_steps
        while not done and self.epoch < self.config.train.epochs:
            self.loader.set_epoch(self.epoch)
            for batch in _timed(self.loader, self.timer):
                if not self.train_step(batch):
                    continue
                done = self.after_step()
                if done:
                    break
            if not done:
                self.epoch += 1
        self._flush_log()

    def train_step(self, batch) -> bool:
        """Forward, loss, backward and optimizer on one batch; False when the batch was skipped
        (no clip left under on_bad_sample: skip, or a non-finite loss under on_nonfinite_loss: skip)
        or did not end an optimizer step (gradient accumulation)."""
        from finelap.audio.fbank import compute_features

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
        if self.profile_warm:  # --profile-loss-backends, in the timed steps
            self._time_loss_backends(output, batch)
        self.batch, self.features, self.frame_counts = batch, features, frame_counts
        # clip_loss and frame_loss are global (equal on every rank), so every rank decides alike
        if config.train.on_nonfinite_loss == "skip" and not bool(_finite(losses)):  # a host sync, only here
            self.nonfinite_skips += 1
            return False
        with timer.phase("backward"):
            self.engine.backward(losses.loss)
        with timer.phase("optimizer_step"):
            self.engine.step()
        self.step_indices += batch.sample_index.tolist()
        self.window_samples += len(batch.audio_ids) * runtime.world_size
        self.window_tokens += output.padded_text_tokens
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
        import torch.distributed as dist

        nonempty = torch.tensor(float(len(batch.audio_ids) > 0), device=self.runtime.device)
        dist.all_reduce(nonempty, op=dist.ReduceOp.MIN)
        return nonempty.item() == 0

    def _time_loss_backends(self, output, batch) -> None:
        """--profile-loss-backends: the loss forward + backward of each listed backend on detached
        copies of this step's embeddings, each timed as phase `loss_backend[NAME]` (not part of the
        step's time; every rank runs them, as the losses gather across ranks)."""
        fields = ("clip_embeddings", "frame_embeddings", "caption_embeddings", "phrase_embeddings",
                  "clip_scale", "clip_bias", "frame_scale", "frame_bias")
        for backend, loss_fn in self.compared_losses.items():
            copy = dataclasses.replace(output, **{name: getattr(output, name).detach().requires_grad_()
                                                  for name in fields})
            with self.timer.phase(f"loss_backend[{backend}]"):
                loss_fn(copy, batch).loss.backward()

    def after_step(self) -> bool:
        """Log, save, evaluate and check the time budget after optimizer step `self.step`; True ends the run."""
        import torch.distributed as dist

        config, runtime, step = self.config, self.runtime, self.step
        if "first step" not in self.startup.seconds:
            self.startup.mark("first step")
            if runtime.rank == 0:
                print(self.startup.summary(), flush=True)
        self.samples.write(json.dumps({"step": step, "epoch": self.epoch, "samples": self.step_indices}) + "\n")
        self.samples.flush()
        self.step_indices = []
        self.timer.steps += 1
        done = step >= self.total_steps
        if self.profiler is not None:
            self.profiler.step()
            if not self.profile_warm and self.timer.steps == 2:  # the first two steps are warm-up
                self.timer.seconds.clear()
                self.timer.steps, self.profile_warm = 0, True
            done = done or step >= self.profile_end
        evaluate_now = bool(config.train.eval_every) and step % config.train.eval_every == 0
        if config.train.max_minutes is not None:  # rank 0's clock decides for every rank
            over = torch.tensor(float(time.perf_counter() - self.training_start >= 60 * config.train.max_minutes),
                                device=runtime.device)
            dist.broadcast(over, src=0)
            self.out_of_time = bool(over.item())
            if self.out_of_time and step < self.total_steps and runtime.rank == 0:
                print(f"train.max_minutes = {config.train.max_minutes} reached: stopping at step {step} "
                      f"of {self.total_steps}. Where a run stops now depends on the machine's speed, so its "
                      f"results are not comparable with other runs of this config", flush=True)
        save_now = step % config.train.save_every == 0 or done or evaluate_now or self.out_of_time
        if step % config.train.log_every == 0 or save_now:
            self._flush_log()
        if save_now:
            self.save()
            if evaluate_now:
                self.evaluation.start(step)
        for eval_step, metrics in self.evaluation.finished():
            self.log.evaluation(eval_step, metrics)
        return done or self.out_of_time

    def _flush_log(self) -> None:
        """Bring the pending steps' losses to the host in one transfer and write the newest as the
        log record (train.log_every); raise here if any was not finite (on_nonfinite_loss: error)."""
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
        elapsed = time.perf_counter() - self.window_start
        self.log.step({
            "step": last.step, "epoch": last.epoch,
            "loss": self.config.loss.alpha * clip + self.config.loss.beta * frame,
            "clip_loss": clip, "frame_loss": frame,
            "lr": last.lr, "samples_per_s": self.window_samples / max(elapsed, 1e-9),
            "tokens_encoded": self.window_tokens, "frame_rows": last.frame_rows,
            "phrase_columns": last.phrase_columns, "nonfinite_skips": self.nonfinite_skips,
            "empty_batches": self.empty_batches,
            **{f"skipped_{reason}": count for reason, count in self.loader.skips.counts.items()},
            **({"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(self.runtime.device) / 2**30}
               if self.runtime.on_gpu else {}),
        }, steps=len(self.pending))
        self.pending = []
        self.window_start, self.window_samples, self.window_tokens = time.perf_counter(), 0, 0

    def save(self) -> None:
        """A checkpoint (collective), the list of skipped samples (OUTPUT_DIR/skipped.jsonl), and the
        check that no phrase label has lost every clip to skips (data.on_empty_class)."""
        from finelap import checkpoint

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

    def finish(self) -> None:
        """Profile report, pending evaluations, --probe-embeddings, then finished.json (unless profiling cut the run)."""
        from finelap import checkpoint

        runtime, rank, step = self.runtime, self.runtime.rank, self.step
        ran = self.batch is not None  # a resumed run that was already finished takes no step
        if self.profiler is not None:
            self.profiler.stop()
            if ran:
                _write_profile(runtime.output_dir, self.timer, self.profiler, min(self.trace_steps, self.timer.steps),
                               self.engine, self.features, self.frame_counts, self.batch, runtime.device,
                               runtime.compute_dtype, runtime.world_size, self.startup)
            elif rank == 0:
                print("--profile: no step ran (the run had already finished), nothing to profile", flush=True)
        for eval_step, metrics in self.evaluation.finished(wait=True):
            self.log.evaluation(eval_step, metrics)
        if self.args.probe_embeddings:
            if ran:
                _probe_embeddings(self.engine, self.features.to(runtime.compute_dtype), self.frame_counts, self.batch,
                                  runtime.output_dir / "probe_embeddings.pt", rank)
            elif rank == 0:
                print("--probe-embeddings: no step ran (the run had already finished), no batch to embed", flush=True)
        for handle in self.hooks:
            handle.remove()
        self.samples.close()
        self.log.close()
        if rank == 0 and self.profiler is not None and step < self.total_steps:
            # profiling ends the run early: it is not finished, and --resume continues it
            print(f"--profile: stopped at step {step} of {self.total_steps} after profiling; the run is not finished "
                  f"(continue it with --resume)", flush=True)
        elif rank == 0:
            checkpoint.write_finished(runtime.output_dir, step, self.total_steps, self.stop_reason())
            print(f"finished at step {step}; checkpoints in {runtime.checkpoint_dir}", flush=True)


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
    startup.mark("DeepSpeed import and distributed set-up")
    trainer = Trainer(args, config, runtime, startup)
    if args.resume:
        trainer.resume(args.resume)
    try:
        trainer.run()
    except CheckpointSpaceError as error:  # a full disk is the user's to fix: say how, without a traceback
        if runtime.rank == 0 or not error.on_every_rank:
            print(f"error (rank {runtime.rank}): {error.strerror}", file=sys.stderr, flush=True)
        return 1
    trainer.finish()
    return 0


def _probe_embeddings(engine, features, frame_counts, batch, path: Path, rank: int) -> None:
    """Embed one batch through the engine in eval mode (every rank: ZeRO-3 gathers collectively); rank 0 saves."""
    engine.eval()
    with torch.no_grad():
        output = engine(features, frame_counts, batch.captions, batch.phrases)
    engine.train()
    if rank == 0:
        torch.save({
            "inputs": {"features": features.float().cpu(), "frame_counts": frame_counts.cpu(),
                       "captions": list(batch.captions), "phrases": list(batch.phrases)},
            **{name: getattr(output, name).float().cpu() for name in
               ("clip_embeddings", "frame_embeddings", "caption_embeddings", "phrase_embeddings")},
        }, path)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timed(loader, timer):
    """Iterate `loader`, charging the wait for each batch to the data_wait phase."""
    batches = iter(loader)
    while True:
        with timer.phase("data_wait"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _start_profiler(output_dir: Path, device: torch.device, trace_steps: int):
    """torch.profiler over the `trace_steps` steps after the 2 warm-up steps, then idle: the phase
    timer goes on alone, since a trace of every timed step is slow to write and to open."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=2, active=trace_steps, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(output_dir / "profile")),
        record_shapes=False,
    )
    profiler.start()
    return profiler


def _write_profile(output_dir, timer, profiler, traced_steps, engine, features, frame_counts, batch, device, dtype,
                   world_size, startup) -> None:
    """Per-phase breakdown, samples/s per device, MFU (matrix-product flops) and, on CUDA, the peak
    memory allocated (GiB), printed and saved. Communication comes from the `traced_steps` traced steps."""
    import torch.distributed as dist

    from finelap.profiling import communication_seconds, matmul_flops, matmul_peak_flops

    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    per_step = timer.per_step()
    # text_encode and audio_encode are parts of forward; communication overlaps backward and the step
    per_step["communication"] = communication_seconds(profiler) / max(traced_steps, 1)
    order = ("data_wait", "feature_extraction", "forward", "audio_encode", "text_encode", "loss", "backward",
             "optimizer_step", "communication")
    compared = {name[len("loss_backend["):-1]: seconds for name, seconds in per_step.items()
                if name.startswith("loss_backend[")}
    per_step = {name: per_step[name] for name in order if name in per_step}
    step_seconds = sum(v for k, v in per_step.items() if k not in ("text_encode", "audio_encode", "communication"))
    with torch.no_grad():
        forward_flops = matmul_flops(lambda: engine(features.to(dtype), frame_counts, batch.captions, batch.phrases))
    train_flops = 3 * forward_flops  # the backward's products are twice the forward's
    peak = matmul_peak_flops(device, dtype)
    clips = len(batch.audio_ids)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world_size,
        "steps_profiled": timer.steps,
        "steps_traced": traced_steps,
        "seconds_per_step": step_seconds,
        "phases_seconds_per_step": per_step,
        "clips_per_step_per_device": clips,
        "samples_per_s_per_device": clips / max(step_seconds, 1e-9),
        "forward_flops_per_step": forward_flops,
        "mfu": train_flops / max(step_seconds, 1e-9) / peak,
        "measured_matmul_peak_flops": peak,
        "trace_dir": str(output_dir / "profile"),
    }
    if peak_memory is not None:
        report["peak_gpu_memory_gib"] = peak_memory
    if compared:  # --profile-loss-backends: loss forward + backward on this run's embeddings, per backend
        report["loss_backends_seconds_per_step"] = compared
    report["startup_seconds"] = startup.seconds
    if dist.get_rank() == 0:
        (output_dir / "profile").mkdir(parents=True, exist_ok=True)
        (output_dir / "profile" / "breakdown.json").write_text(json.dumps(report, indent=2))
        lines = [f"{'phase':<26} {'ms/step':>10} {'share':>7}"]
        for name, seconds in per_step.items():
            label = f"  {name} (in forward)" if name in ("text_encode", "audio_encode") else name
            lines.append(f"{label:<26} {seconds * 1e3:>10.1f} {seconds / max(step_seconds, 1e-9):>7.1%}")
        lines.append(f"samples/s per device: {report['samples_per_s_per_device']:.2f}   MFU: {report['mfu']:.2%}"
                     + (f"   peak GPU memory: {peak_memory:.1f} GiB" if peak_memory is not None else ""))
        if compared:
            lines.append("loss forward + backward on the step's embeddings (not in the step's time): "
                         + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in compared.items()))
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
