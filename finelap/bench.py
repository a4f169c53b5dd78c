"""`finelap bench [NAME ...] [-- ARGS]`: run benchmark scripts of benchmarks/ and write their tables.

Each benchmark is a script in the repository's benchmarks/ folder that prints a
table and saves it (JSON + Markdown) under benchmarks/results/. Arguments after
`--` go to every script named (e.g. `finelap bench fbank -- --clips 16`).

`finelap bench scaling --config CONFIG --ranks 1 2 ...` is the weak-scaling
sweep of the trainer itself (finelap/scaling.py), with its own options.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"

# name -> (script, default arguments, what it measures)
BENCHMARKS = {
    "loss": ("bench_loss.py", [], "fused sigmoid-loss backends: time and peak memory"),
    "fbank": ("bench_fbank.py", [], "batched Kaldi fbank vs torchaudio per clip"),
    "pipeline": ("bench_pipeline.py", [], "audio input: DataLoader vs DALI clips/s"),
    "synth": ("bench_synth.py", [], "synthetic mixtures per second"),
    "dedup": ("bench_train_step.py", ["dedup"], "text tokens per step with and without de-duplication"),
    "train-phases": ("bench_train_step.py", ["cpu-phases"], "per-phase step time of the tiny config (CPU)"),
    "train-gpu": ("bench_train_step.py", ["gpu"], "EAT-base step: ours vs reference-faithful (CUDA)"),
}
DEFAULT = ["loss", "fbank", "pipeline", "synth", "dedup", "train-phases"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scaling"]:
        from finelap import scaling  # imports torch; the script benchmarks run in their own processes

        return scaling.main(argv[1:])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    listing = "\n".join(f"  {name:<13} {help_text}" for name, (_, _, help_text) in BENCHMARKS.items())
    listing += "\n  scaling       weak scaling of training over 1..N ranks (finelap bench scaling --help)"
    parser = argparse.ArgumentParser(prog="finelap bench", description=__doc__.splitlines()[0],
                                     epilog=f"benchmarks:\n{listing}\n(default: {' '.join(DEFAULT)})",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (see below)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if not BENCHMARKS_DIR.is_dir():
        print(f"finelap bench: {BENCHMARKS_DIR} not found: the benchmarks ship with the source tree "
              "(install with `pip install -e .` from a checkout)", file=sys.stderr)
        return 1
    failed = []
    for name in args.names or DEFAULT:
        script, arguments, help_text = BENCHMARKS[name]
        print(f"== {name}: {help_text}", flush=True)
        result = subprocess.run([sys.executable, str(BENCHMARKS_DIR / script), *arguments, *extra])
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"finelap bench: failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0
