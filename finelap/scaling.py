"""`finelap bench scaling`: how well training scales from 1 to N devices (weak scaling).

    finelap bench scaling --config CONFIG [--set key=value ...] --ranks 1 2 4 8 [--steps 10]

For each world size it launches the real trainer with the DeepSpeed launcher
(`deepspeed --num_gpus N finelap/train.py ... --profile`), N GPUs, or N CPU
ranks of one thread each where there is no GPU. data.batch_size is per rank,
so the per-device batch stays fixed and the global batch grows with N. Each
run's profile (OUTPUT/ranks_N/profile/breakdown.json, every rank gathered)
gives the global and per-device clips/s, the communication share of a step
and the slowest rank; efficiency is the per-device rate over the smallest
world size's. The table is printed and written as
benchmarks/results/scaling_<date>_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from finelap.config import add_set_argument
from finelap.launchers import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "finelap" / "train.py"
RESULTS_DIR = REPO / "benchmarks" / "results"


class ScalingError(ValueError):
    """The sweep cannot run as asked (more ranks than devices, a failed run); nothing is reported."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finelap bench scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (data.batch_size is per rank)")
    add_set_argument(parser, help="config overrides for every run, e.g. --set data.num_workers=4")
    parser.add_argument("--ranks", type=int, nargs="+", required=True, metavar="N", help="world sizes to run")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per run (after 2 warm-up steps)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder, removed)")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="folder for the table, JSON and plot")
    return parser.parse_args(argv)


def available_devices() -> tuple[str, int]:
    """("cuda", GPUs) when there is a GPU, else ("cpu", usable cores): one rank per device."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_ranks(ranks: list[int], kind: str, count: int) -> None:
    """Every world size must be positive and fit the devices: a clear error before any run starts."""
    bad = [n for n in ranks if n < 1]
    if bad:
        raise ScalingError(f"--ranks must be positive, got {bad}")
    too_many = [n for n in ranks if n > count]
    if too_many:
        what = f"{count} GPU(s)" if kind == "cuda" else f"{count} CPU core(s) (one rank per core)"
        raise ScalingError(f"--ranks {too_many} ask for more ranks than this machine has: {what}; "
                           "run larger world sizes on a larger node")


def device_label(kind: str) -> str:
    """The device in file names: the GPU's name, or the CPU's model name."""
    if kind == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu"
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            models = [line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
            name = f"cpu {models[0]}" if models else name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def launch_command(config: str, settings: list[str], ranks: int, steps: int, run_dir: Path, port: int) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), str(TRAIN_SCRIPT),
            "--config", config, "--set", *settings, f"train.output_dir={run_dir}",
            "--profile", "--profile-steps", str(steps)]


def run_one(args: argparse.Namespace, ranks: int, run_dir: Path, kind: str) -> dict:
    """Train `ranks` ranks under --profile; their gathered breakdown."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    if kind == "cpu":
        environment.setdefault("OMP_NUM_THREADS", "1")  # a CPU "device" is one core
    environment.pop("RANK", None)
    command = launch_command(args.config, list(args.set), ranks, args.steps, run_dir, free_port())
    print(f"== {ranks} rank(s): {' '.join(command)}", flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"ranks_{ranks}.log"
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    breakdown = run_dir / "profile" / "breakdown.json"
    if result.returncode != 0 or not breakdown.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise ScalingError(f"the {ranks}-rank run failed (exit {result.returncode}); its log: {log_path}\n{tail}")
    return json.loads(breakdown.read_text())


def summarise(breakdowns: dict[int, dict]) -> list[dict]:
    """One row per world size: global and per-device clips/s, efficiency against the smallest
    world size, communication share of a step, and the slowest rank."""
    rows = []
    base_ranks = min(breakdowns)
    base = breakdowns[base_ranks]["global_samples_per_s"] / base_ranks
    for ranks in sorted(breakdowns):
        report = breakdowns[ranks]
        per_device = report["global_samples_per_s"] / ranks
        phases = report["phases_seconds_per_step"]
        slowest = report["slowest_rank"]
        rows.append({
            "ranks": ranks,
            "global_samples_per_s": report["global_samples_per_s"],
            "per_device_samples_per_s": per_device,
            "efficiency": per_device / base,
            "seconds_per_step": report["seconds_per_step"],
            "communication_share": phases.get("communication", 0.0) / max(report["seconds_per_step"], 1e-12),
            "slowest_rank": slowest,
        })
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    base = min(row["ranks"] for row in rows)
    lines = [f"# Weak scaling on {meta['device']} ({meta['date']})", "",
             f"Command: `{meta['command']}`. Per-rank batch fixed; {meta['steps']} profiled steps per run; "
             f"efficiency = per-device clips/s over the {base}-rank run's. {meta['note']}", "",
             "| ranks | global clips/s | clips/s per device | efficiency | s/step | communication | slowest rank |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        slowest = row["slowest_rank"]
        lines.append(f"| {row['ranks']} | {row['global_samples_per_s']:.2f} | {row['per_device_samples_per_s']:.2f} | "
                     f"{row['efficiency']:.1%} | {row['seconds_per_step']:.3f} | {row['communication_share']:.1%} | "
                     f"rank {slowest['rank']} on {slowest['host']}: {slowest['phase']} "
                     f"{slowest['seconds'] * 1e3:.1f} ms (median {slowest['median_seconds'] * 1e3:.1f} ms) |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [row["ranks"] for row in rows]
    measured = [row["global_samples_per_s"] for row in rows]
    ideal = [rows[0]["per_device_samples_per_s"] * n for n in ranks]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(ranks, ideal, "--", color="grey", label="ideal (linear)")
    axis.plot(ranks, measured, "o-", label="measured")
    for row in rows:
        axis.annotate(f"{row['efficiency']:.0%}", (row["ranks"], row["global_samples_per_s"]),
                      textcoords="offset points", xytext=(4, -12), fontsize=8)
    axis.set_xlabel("ranks")
    axis.set_ylabel("global clips/s")
    axis.set_xticks(ranks)
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(rows: list[dict], meta: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"scaling_{meta['date']}_{meta['device']}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, meta)
    stem.with_suffix(".md").write_text(text)
    plot(rows, stem.with_suffix(".png"), f"weak scaling, {meta['device']}")
    print(text, end="")
    print(f"wrote {stem}.{{json,md,png}}")
    return stem


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    kind, count = available_devices()
    try:
        check_ranks(args.ranks, kind, count)
    except ScalingError as error:
        print(f"finelap bench scaling: {error}", file=sys.stderr)
        return 2
    meta = {"date": datetime.date.today().isoformat(), "device": device_label(kind), "steps": args.steps,
            "command": "finelap bench scaling " + " ".join(argv if argv is not None else sys.argv[1:]),
            "note": ("Each CPU rank has one thread (OMP_NUM_THREADS=1) and its own core." if kind == "cpu" else
                     "One rank per GPU.")}
    with tempfile.TemporaryDirectory(prefix="finelap-scaling-") as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        try:
            breakdowns = {n: run_one(args, n, root / f"ranks_{n}", kind) for n in sorted(set(args.ranks))}
        except ScalingError as error:
            print(f"finelap bench scaling: {error}", file=sys.stderr)
            return 1
    write_results(summarise(breakdowns), meta, Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
