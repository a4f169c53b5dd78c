"""`deepspeed finelap/train.py` on one GPU: step time per phase under ZeRO-2 and ZeRO-3,
the loss backends timed on the real step's embeddings, and a kill + exact resume.

    python benchmarks/gpu_train_run.py --out DIR --text-folder ROBERTA_FOLDER   # one GPU, at most --budget (180 s)
    python benchmarks/gpu_train_run.py --out DIR --cpu-smoke                    # the same logic on CPU, tiny sizes

Steps: synthesise a training set (`finelap synth`, built-in bank) in a temporary folder;
then one `deepspeed --num_gpus 1 finelap/train.py` per sub-run, each with its own output
folder and timeout:

  zero2   EAT-base config (ZeRO-2), --profile: clips/s, ms per phase, MFU, peak memory, start-up
          seconds; with --profile-loss-backends, the loss forward + backward of each backend
          of --compare-backends (the eager, materialised reference among them) on each
          profiled step's own embeddings
  zero3   the same with configs/deepspeed/zero3.yaml included
  resume  the profiled run of --resume-stage also saves a checkpoint at step K = steps - 4
          (between timed steps: saves are outside every phase); a new launch resumes from
          it, is SIGKILLed (its whole process group) once step K+4 is logged, and its losses
          of steps K+1..K+4 must match those the uninterrupted run logged

Each launch pays tens of seconds of start-up (40-46 s on an H200, 2026-11-28), so the
eager loss is compared inside the zero2 run and the resume reuses a profiled run's
checkpoint: three launches in all.

A failing or timed-out sub-run is recorded and the others still run. Results go to
OUT/train_gpu_<date>_<device>.json and .md (rewritten after every sub-run, so an outer
timeout still leaves them); traces, checkpoints and data stay in the temporary folder,
which is deleted at the end.

The text tower: --text-folder is a Hugging Face folder (config.json + tokenizer). Without
weights in it, a copy with seeded random weights is written to the temporary folder.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "finelap" / "train.py"
RUN_NAMES = ("zero2", "zero3", "resume")
PHASES = ("data_wait", "feature_extraction", "forward", "audio_encode", "text_encode", "loss", "backward",
          "optimizer_step", "communication")
LOSS_KEYS = ("loss", "clip_loss", "frame_loss")
# One bf16 unit roundoff: GPU kernels that reduce in a different order (atomics) change the
# weights after a resumed step by far less than bf16 resolves, so a resumed loss that is off
# by more than this is a resume bug, not rounding. On CPU (fp32, deterministic) it must be exact.
GPU_RESUME_RTOL = 2.0**-8

class Interrupted(Exception):
    """SIGTERM (an outer timeout): stop, kill the running sub-run, write what we have."""


def _on_sigterm(signum, frame):
    # sub-runs lead their own sessions, so nothing else ends them: let the clean-up finish
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher() -> list[str]:
    """The deepspeed launcher of this interpreter: a `deepspeed` script beside it or on PATH
    whose shebang runs it, else the launcher's module (a script of another Python would
    start ranks without this interpreter's packages)."""
    candidates = [Path(sys.executable).parent / "deepspeed"]
    if shutil.which("deepspeed"):
        candidates.append(Path(shutil.which("deepspeed")))
    for script in candidates:
        try:
            first = script.read_text(errors="replace").splitlines()[0]
        except (OSError, IndexError):
            continue
        if script.parent == Path(sys.executable).parent or sys.executable in first:
            return [str(script)]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def kill_group(process: subprocess.Popen, patience: float = 15.0) -> list[int]:
    """SIGKILL the process group a sub-run leads (launcher, ranks, data workers) and wait for it
    to empty; returns the PIDs still in it after `patience` seconds."""
    deadline = time.perf_counter() + patience
    while True:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process.poll() is None:
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        left = group_members(process.pid)
        if not left or time.perf_counter() > deadline:
            return left
        time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """Live processes still in process group `pgid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_command(command: list[str], log: Path, timeout: float, cwd: Path, env: dict) -> dict:
    """Run `command` in its own process group with output to `log`; kill the group at `timeout` s."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # also when the launcher exited: a rank or data worker it left behind holds the GPU
            leftover = kill_group(process)
    result = {"rc": process.returncode, "seconds": round(time.perf_counter() - start, 1), "timed_out": timed_out}
    if leftover:
        result["processes_left_in_group"] = leftover
    if timed_out or process.returncode != 0:
        result["log_tail"] = tail(log)
    return result


def read_log(path: Path) -> list[dict]:
    """train_log.jsonl records (a line cut short by a kill is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def step_records(records: list[dict]) -> dict[int, dict]:
    """step -> its training record (evaluation records skipped; a later record of a step wins)."""
    return {record["step"]: record for record in records if "loss" in record}


class Check:
    """The whole run: settings, sub-run results, the report files rewritten as they come."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.perf_counter()
        self.smoke = args.cpu_smoke
        self.device, self.device_slug = self._device()
        self.tmp = Path(tempfile.mkdtemp(prefix="finelap_train_run_"))
        self.launcher = launcher()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.env.pop("RANK", None)
        if self.smoke:
            self.env["OMP_NUM_THREADS"] = "1"
        stem = f"train_gpu_{datetime.date.today().isoformat()}_{self.device_slug}"
        self.json_path, self.md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
        self.result = {
            "benchmark": "deepspeed finelap/train.py on one device: phases, ZeRO-2 vs ZeRO-3, fused vs eager loss, "
                         "kill and resume",
            "date": datetime.date.today().isoformat(), "device": self.device,
            "mode": "cpu-smoke" if self.smoke else "gpu",
            "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
            "environment": self._environment(), "launcher": self.launcher,
            "steps": {}, "runs": {}, "resume": None, "errors": [],
        }

    # ------------------------------------------------------------ helpers

    def _device(self) -> tuple[str, str]:
        if self.args.cpu_smoke:
            return "cpu", f"cpu-{os.cpu_count()}core"
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
                return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        except Exception as error:  # the report still gets written, naming the problem
            return f"unknown ({error})", "unknown"
        return "cpu (no CUDA device)", f"cpu-{os.cpu_count()}core"

    @staticmethod
    def _environment() -> dict:
        versions = {"python": platform.python_version()}
        for package in ("torch", "triton", "deepspeed", "transformers"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = None
        return versions

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_left(self) -> float:
        return self.args.budget - self.elapsed()

    def timeout(self) -> float | None:
        """This sub-run's timeout (s), or None when the budget cannot fit another."""
        left = self.time_left() - 5
        return None if left < 20 else min(self.args.timeout, left)

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    # ------------------------------------------------------------ stages

    def synthesize(self) -> bool:
        args = self.args
        command = [sys.executable, "-m", "finelap.cli", "synth", "--builtin-bank", str(self.tmp / "bank"),
                   "--out", str(self.tmp / "set"), "--num-mixtures", str(args.mixtures), "--duration",
                   str(args.duration), "--workers", str(args.workers), "--quiet"]
        timeout = self.timeout()
        result = run_command(command, self.tmp / "synth.log", timeout or 1, self.tmp, self.env)
        result.update(mixtures=args.mixtures, duration_s=args.duration, workers=args.workers)
        self.result["steps"]["synth"] = result
        ok = result["rc"] == 0 and (self.tmp / "set" / "metadata.jsonl").is_file()
        self.say(f"synth: {args.mixtures} mixtures of {args.duration} s with {args.workers} workers: "
                 f"{'ok' if ok else 'FAILED'} in {result['seconds']} s")
        return ok

    def text_folder(self) -> Path | None:
        """The text tower folder the runs use; None: the config's (the bundled encoder)."""
        folder = self.args.text_folder
        if folder is None:
            return None
        folder = folder.resolve()
        if any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file():
            self.result["steps"]["text_tower"] = {"folder": str(folder), "weights": "from the folder"}
            return folder
        target = self.tmp / "text_tower"
        shutil.copytree(folder, target)
        result = run_command([sys.executable, str(REPO / "benchmarks" / "make_random_text_tower.py"), str(target)],
                             self.tmp / "text_tower.log", 120, self.tmp, self.env)
        if result["rc"] == 0:
            result.update(weights="random (make_random_text_tower.py)",
                          report=tail(self.tmp / "text_tower.log", 300).strip().splitlines()[-1])
        self.result["steps"]["text_tower"] = {"folder": str(folder), **result}
        self.say(f"text tower: random weights for {folder.name}: {'ok' if result['rc'] == 0 else 'FAILED'} "
                 f"in {result['seconds']} s")
        return target if result["rc"] == 0 else False

    def configs(self) -> dict[int, Path]:
        """ZeRO stage -> training config: the base config (ZeRO-2), and a file that adds zero3.yaml."""
        base = REPO / "configs" / "train" / ("tiny_cpu.yaml" if self.smoke else "eat_base.yaml")
        zero3 = self.tmp / "zero3.yaml"
        zero3.write_text(f"include: [{base}, {REPO / 'configs' / 'deepspeed' / 'zero3.yaml'}]\n")
        return {2: base, 3: zero3}

    def overrides(self, output_dir: Path, text_folder: Path | None, max_steps: int, save_every: int) -> list[str]:
        args, data = self.args, self.tmp / "set"
        settings = [
            f"data.sources=[{{name: synth, path: {data / 'metadata.jsonl'}}}]",
            f"data.phrase_bank={data / 'phrase_bank.jsonl'}",
            f"data.batch_size={args.batch}", f"data.num_workers={args.data_workers}",
            f"optim.warmup_steps={args.warmup_steps}", "train.epochs=1000", f"train.max_steps={max_steps}",
            f"train.save_every={save_every}", "train.seed=0", "data.seed=0", f"train.output_dir={output_dir}",
            "train.log_every=1",  # a record per step: per-step rates, the kill point and the resumed losses
        ]
        if text_folder is not None:
            settings.append(f"model.text.path={text_folder}")
        return settings

    def train_command(self, config: Path, settings: list[str], extra: list[str]) -> list[str]:
        return (self.launcher + ["--num_gpus", "1", "--master_port", str(free_port()), str(TRAIN_SCRIPT),
                                 "--config", str(config)]
                + [item for setting in settings for item in ("--set", setting)] + extra)

    def resume_step(self) -> int:
        """K: the step whose checkpoint the resume sub-run starts from (4 steps before the profile ends)."""
        return max(1, self.args.steps - 4)

    def run_settings(self, name: str, text_folder: Path | None) -> list[str]:
        """The settings of profiled run `name`; the resume sub-run repeats those of its source run."""
        args = self.args
        source = f"zero{args.resume_stage}"
        keeps_checkpoint = name == source and "resume" in args.runs
        # max_steps past the last profiled step: the same LR schedule in every run
        settings = self.overrides(self.tmp / "runs" / name, text_folder, max_steps=2 * args.steps,
                                  save_every=self.resume_step() if keeps_checkpoint else 10**6)
        return settings + [f"loss.backend={args.loss_backend}"]

    def profiled_run(self, name: str, stage: int, config: Path, text_folder: Path | None) -> None:
        args = self.args
        output_dir = self.tmp / "runs" / name
        extra = ["--profile", "--profile-steps", str(args.steps - 2), "--profile-trace-steps", str(args.trace_steps)]
        if name == "zero2" and args.compare_backends:
            extra += ["--profile-loss-backends", *args.compare_backends]
        command = self.train_command(config, self.run_settings(name, text_folder), extra)
        entry = {"zero_stage": stage, "loss_backend": args.loss_backend, "status": "running"}
        self.result["runs"][name] = entry
        timeout = self.timeout()
        if timeout is None:
            entry["status"] = "skipped: out of budget"
            self.say(f"{name}: skipped (out of budget)")
            return
        self.say(f"{name}: ZeRO-{stage}, loss {args.loss_backend}, {args.steps} steps of batch {args.batch} "
                 f"(timeout {timeout:.0f} s)")
        entry.update(run_command(command, self.tmp / f"{name}.log", timeout, self.tmp, self.env))
        breakdown = output_dir / "profile" / "breakdown.json"
        records = step_records(read_log(output_dir / "train_log.jsonl"))
        if breakdown.is_file():
            report = json.loads(breakdown.read_text())
            report.pop("trace_dir", None)
            traces = [p for p in (output_dir / "profile").rglob("*") if p.is_file() and p.name != "breakdown.json"]
            entry.update(report, trace_mib=round(sum(p.stat().st_size for p in traces) / 2**20, 1))
        entry["steps_logged"] = len(records)
        # per-step rate from the run's log: a slow outlier (a kernel tuned late, a data stall) shows here
        rates = sorted(record["samples_per_s"] for step, record in records.items() if step > 2)
        if rates:
            entry["logged_clips_per_s"] = {"min": rates[0], "median": rates[len(rates) // 2], "max": rates[-1]}
        if records:
            last = records[max(records)]
            entry["last_losses"] = {key: last[key] for key in LOSS_KEYS}
            entry["losses_finite"] = all(abs(r[key]) < float("inf") for r in records.values() for key in LOSS_KEYS)
        ok = entry["rc"] == 0 and breakdown.is_file()
        entry["status"] = ("ok" if ok else "timed out" if entry["timed_out"] else
                           f"failed (exit {entry['rc']})" if entry["rc"] != 0 else "no profile/breakdown.json")
        self.say(f"{name}: {entry['status']} in {entry['seconds']} s"
                 + (f": {entry['samples_per_s_per_device']:.1f} clips/s, {entry['seconds_per_step'] * 1e3:.0f} ms/step"
                    if ok else ""))
        # traces: the disk of a short-lived machine; the resume's source run keeps its checkpoints and log
        shutil.rmtree(output_dir / "profile" if name == f"zero{args.resume_stage}" else output_dir,
                      ignore_errors=True)

    def resume_run(self, config: Path, text_folder: Path | None) -> None:
        """Resume the source run from its checkpoint K in a new launch; SIGKILL it once step K+4 is
        logged; compare the losses of the steps both launches logged."""
        from finelap.checkpoint import COMPLETE_MARKER, tag_for_step

        args = self.args
        k, stage, source = self.resume_step(), args.resume_stage, f"zero{args.resume_stage}"
        last = min(k + 4, args.steps)
        output_dir = self.tmp / "runs" / source
        entry = {"zero_stage": stage, "loss_backend": args.loss_backend, "source_run": source, "resumed_from_step": k,
                 "status": "running"}
        self.result["resume"] = entry
        self.result["runs"]["resume"] = entry
        tag_dir = output_dir / "checkpoints" / tag_for_step(k)
        if not (tag_dir / COMPLETE_MARKER).is_file():
            entry["status"] = f"no complete checkpoint of step {k} from {source}"
            self.say(f"resume: {entry['status']}")
            return
        timeout = self.timeout()
        if timeout is None:
            entry["status"] = "skipped: out of budget"
            self.say("resume: skipped (out of budget)")
            return
        self.say(f"resume: ZeRO-{stage}, from {source}'s checkpoint of step {k}, killed after step {last} "
                 f"(timeout {timeout:.0f} s)")
        log_path = output_dir / "train_log.jsonl"
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        lines_before = len(text.splitlines())
        start = time.perf_counter()
        second_log = self.tmp / "resume.log"
        command = self.train_command(config, self.run_settings(source, text_folder), ["--resume", tag_for_step(k)])
        with open(second_log, "w") as handle:
            process = subprocess.Popen(command, cwd=self.tmp, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            killed_at = None
            try:
                while process.poll() is None and time.perf_counter() - start < timeout:
                    after = step_records(read_log(log_path)[lines_before:])
                    if after and max(after) >= last:
                        killed_at = max(after)
                        break
                    time.sleep(0.05)
            finally:
                leftover = kill_group(process)
        second = {"rc": process.returncode, "seconds": round(time.perf_counter() - start, 1),
                  "killed_after_step": killed_at, "processes_left_in_group": leftover,
                  "resume_message": f"resumed from step {k} " in tail(second_log, 10**7)}
        entry["second"] = second
        records = read_log(log_path)
        before, after = step_records(records[:lines_before]), step_records(records[lines_before:])
        entry.update(self.compare(before, after))
        memory = [r["peak_gpu_memory_gib"] for r in list(before.values()) + list(after.values())
                  if "peak_gpu_memory_gib" in r]
        if memory:
            entry["peak_gpu_memory_gib"] = max(memory)
        if killed_at is None:
            second["log_tail"] = tail(second_log)
            entry["status"] = ("the resumed run timed out" if time.perf_counter() - start >= timeout
                               else f"the resumed run ended before step {last} (exit {process.returncode})")
        elif not second["resume_message"] or not entry["resumed_from_expected_step"]:
            entry["status"] = f"the resumed run did not start from step {k}"
        else:
            entry["status"] = "ok" if entry["agree"] else "losses differ"
        self.say(f"resume: {entry['status']}: steps {entry.get('steps_compared')} compared, max |diff| "
                 f"{entry.get('max_abs_diff')}, max rel {entry.get('max_rel_diff')} (tolerance {entry.get('rtol')})")
        shutil.rmtree(output_dir, ignore_errors=True)

    def compare(self, before: dict[int, dict], after: dict[int, dict]) -> dict:
        k = self.resume_step()
        steps = sorted(step for step in before if step > k and step in after)
        rtol = 0.0 if self.device == "cpu" or self.device.startswith("cpu ") else GPU_RESUME_RTOL
        rows, max_abs, max_rel = [], 0.0, 0.0
        for step in steps:
            row = {"step": step}
            for key in LOSS_KEYS:
                a, b = before[step][key], after[step][key]
                diff = abs(a - b)
                rel = diff / max(abs(a), 1e-12)
                row[key] = [a, b]
                max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
            row["lr_equal"] = before[step]["lr"] == after[step]["lr"]
            rows.append(row)
        after_steps = sorted(after)
        return {
            "steps_before_kill": sorted(before), "steps_after_resume": after_steps,
            "resumed_from_expected_step": bool(after_steps) and after_steps[0] == k + 1,
            "steps_compared": steps, "comparison": rows, "max_abs_diff": max_abs, "max_rel_diff": max_rel,
            "exact": bool(steps) and max_abs == 0.0, "rtol": rtol,
            "agree": bool(steps) and len(steps) >= 2 and max_rel <= rtol
                     and all(row["lr_equal"] for row in rows) and after_steps[0] == k + 1,
        }

    # ------------------------------------------------------------ report

    def table(self) -> list[str]:
        header = (["sub-run", "ZeRO", "loss backend", "clips/s", "step ms"] + [f"{p} ms" for p in PHASES]
                  + ["MFU", "peak GPU GiB", "status"])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, run in self.result["runs"].items():
            if name == "resume":
                continue
            phases = run.get("phases_seconds_per_step", {})
            cells = [name, str(run.get("zero_stage")), run.get("loss_backend", ""),
                     _number(run.get("samples_per_s_per_device"), 1), _number(_ms(run.get("seconds_per_step")), 1)]
            cells += [_number(_ms(phases.get(p)), 1) for p in PHASES]
            mfu = run.get("mfu")
            cells += [f"{mfu:.1%}" if mfu is not None else "", _number(run.get("peak_gpu_memory_gib"), 2),
                      run.get("status", "")]
            lines.append("| " + " | ".join(cells) + " |")
        runs = self.result["runs"]
        compared = runs.get("zero2", {}).get("loss_backends_seconds_per_step")
        if compared:
            lines += ["", "Loss forward + backward on each profiled ZeRO-2 step's own embeddings (both streams, "
                          "columns gathered; outside the step's time): "
                      + ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in compared.items()) + "."]
        for name, run in runs.items():
            if run.get("startup_seconds"):
                stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in run["startup_seconds"].items())
                lines.append(f"Start-up of {name} (s): {stages}.")
        resume = self.result.get("resume")
        if resume:
            text = (f"Kill and resume (ZeRO-{resume['zero_stage']}, {resume['source_run']}'s checkpoint of step "
                    f"{resume['resumed_from_step']}; loss, clip_loss and frame_loss): {resume.get('status')}")
            killed = resume.get("second", {}).get("killed_after_step")
            if killed is not None:
                text += f"; the resumed launch killed after step {killed}"
            if resume.get("steps_compared"):
                text += (f"; steps {resume['steps_compared']} compared: max |diff| {resume['max_abs_diff']:.3e}, "
                         f"max relative {resume['max_rel_diff']:.3e} (tolerance {resume['rtol']:.3g}; "
                         f"{'bitwise equal' if resume['exact'] else 'not bitwise equal'})")
            if resume.get("peak_gpu_memory_gib") is not None:
                text += f"; peak GPU memory {resume['peak_gpu_memory_gib']:.2f} GiB"
            lines += ["", text + "."]
        lines.append("")
        lines.append(f"Phases: audio_encode and text_encode are parts of forward; communication overlaps backward and "
                     f"the optimizer step (from the traced steps). Total wall time {self.elapsed():.0f} s.")
        return lines

    def write(self) -> None:
        self.result["total_seconds"] = round(self.elapsed(), 1)
        self.result["table"] = self.table()
        self.args.out.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.result, indent=2) + "\n")
        settings = self.result["settings"]
        versions = ", ".join(f"{name} {version}" for name, version in self.result["environment"].items())
        text_tower = self.result["steps"].get("text_tower")
        tower = (f"{Path(text_tower['folder']).name} (weights: {text_tower.get('weights', 'none, build failed')})"
                 if text_tower else "the config's")
        self.md_path.write_text(
            f"# deepspeed finelap/train.py on {self.device}\n\n"
            f"{'CPU smoke run (tiny config)' if self.smoke else 'EAT-base audio tower'}, batch {settings['batch']}, "
            f"{settings['steps']} steps per profiled run (2 warm-up), {settings['mixtures']} mixtures of "
            f"{settings['duration']} s, {settings['data_workers']} data workers; text tower {tower}; "
            f"{versions}.\n\n" + "\n".join(self.result["table"]) + "\n")

    def cleanup(self) -> None:
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def _number(value, digits: int, style: str = "f") -> str:
    return "" if value is None else f"{value:.{digits}{style}}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the two report files (JSON + Markdown)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CPU, tiny config (configs/train/tiny_cpu.yaml, 2.56 s clips), a few steps")
    parser.add_argument("--text-folder", type=Path,
                        help="text tower folder (config.json + tokenizer; without weights: random ones, seed 0)")
    parser.add_argument("--batch", type=int, help="clips per step (default 128; smoke 4)")
    parser.add_argument("--steps", type=int, help="steps per profiled run, 2 of them warm-up (default 30; smoke 5)")
    parser.add_argument("--trace-steps", type=int, default=3, help="of those, steps traced by torch.profiler")
    parser.add_argument("--mixtures", type=int, help="training mixtures (default: batch x steps, one epoch)")
    parser.add_argument("--duration", type=float, help="seconds per mixture (default 10; smoke 2.56)")
    parser.add_argument("--workers", type=int, help="synth worker processes (default: the CPU count)")
    parser.add_argument("--data-workers", type=int, help="DataLoader workers per rank (default 8; smoke 1)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="optim.warmup_steps of every run")
    parser.add_argument("--resume-stage", type=int, choices=(2, 3), default=2,
                        help="resume run: the ZeRO stage, i.e. the profiled run whose checkpoint it resumes")
    parser.add_argument("--loss-backend", default="auto", help="loss backend of every run")
    parser.add_argument("--compare-backends", nargs="*",
                        help="zero2: loss backends timed on each profiled step's embeddings (default: triton_gemm "
                             "triton_pass triton reference; smoke: chunked reference)")
    parser.add_argument("--runs", nargs="+", choices=RUN_NAMES, default=list(RUN_NAMES), help="sub-runs to do")
    parser.add_argument("--timeout", type=float, help="seconds per sub-run (default 100; smoke 400)")
    parser.add_argument("--budget", type=float,
                        help="seconds for everything: a sub-run that no longer fits is skipped "
                             "(default 180; smoke 1500)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (data, logs, traces)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = {"batch": 4 if smoke else 128, "steps": 5 if smoke else 30, "duration": 2.56 if smoke else 10.0,
                "workers": min(os.cpu_count() or 1, 2 if smoke else 16), "data_workers": 1 if smoke else 8,
                "timeout": 400.0 if smoke else 100.0, "budget": 1500.0 if smoke else 180.0,
                "compare_backends": ["chunked", "reference"] if smoke else ["triton_gemm", "triton_pass", "triton",
                                                                            "reference"]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mixtures is None:
        args.mixtures = args.batch * args.steps
    if args.steps < 5:
        parser.error("--steps must be at least 5 (2 warm-up steps, and the resume's checkpoint 4 steps before the end)")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    check = Check(args)
    check.say(f"device {check.device}; launcher {' '.join(check.launcher)}; temporary folder {check.tmp}")
    try:
        check.write()
        if check.synthesize():
            text_folder = check.text_folder()
            if text_folder is not False:
                configs = check.configs()
                for name, stage in (("zero2", 2), ("zero3", 3)):
                    if name in args.runs or (name == f"zero{args.resume_stage}" and "resume" in args.runs):
                        try:
                            check.profiled_run(name, stage, configs[stage], text_folder)
                        except Interrupted:
                            raise
                        except Exception as error:
                            check.result["errors"].append(f"{name}: {error!r}")
                            check.result["runs"].setdefault(name, {})["status"] = f"error: {error!r}"
                        check.write()
                if "resume" in args.runs:
                    try:
                        check.resume_run(configs[args.resume_stage], text_folder)
                    except Interrupted:
                        raise
                    except Exception as error:
                        check.result["errors"].append(f"resume: {error!r}")
                        check.result["runs"].setdefault("resume", {})["status"] = f"error: {error!r}"
    except Interrupted as error:
        check.result["errors"].append(f"interrupted: {error}")
        for run in check.result["runs"].values():
            if run.get("status") == "running":
                run["status"] = "interrupted"
    except Exception as error:
        check.result["errors"].append(f"{error!r}")
    finally:
        check.write()
        check.cleanup()
    print("\n".join(check.result["table"]))
    if check.result["errors"]:
        print("errors: " + "; ".join(check.result["errors"]))
    print(f"saved {check.json_path} and {check.md_path.name}; total {check.elapsed():.0f} s", flush=True)
    runs = check.result["runs"]
    return 0 if runs and all(run.get("status") == "ok" for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
