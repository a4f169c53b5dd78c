"""Synthetic SED pipeline throughput on the built-in sound bank.

    python benchmarks/bench_synth.py [--mixtures 1000] [--workers 2] [--seconds 10] [--sample-rate 16000]

Writes the built-in bank and `mixtures` mixtures (default settings: 1-5 events,
12-20 dB SNR, 16-bit WAV, no stems or plots) into a temporary folder with
`workers` processes, and reports mixtures per second of the mixing stage
(workers started, sources checked) and of the whole run. The machine's load
average is recorded beside the numbers, since other work on the same cores
slows every stage. The table is printed and saved (JSON + Markdown) under
benchmarks/results/ (or --out). Goal: >= 50 mixtures/s on 2 cores (10 s, 16 kHz),
so a FineLAP-100k-sized set takes under 35 minutes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

from finelap.synth.bank import BankSettings, bank_paths, write_builtin_bank
from finelap.synth.mixer import MixSettings
from finelap.synth.pipeline import SynthConfig, run_synthesis

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_PER_SECOND = 50.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixtures", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        bank = write_builtin_bank(Path(folder) / "bank", BankSettings(sample_rate=args.sample_rate))
        bank_seconds = time.perf_counter() - began
        events, backgrounds, phrase_bank = bank_paths(bank, "train")
        config = SynthConfig(
            str(events), str(backgrounds), str(Path(folder) / "out"), phrase_bank=str(phrase_bank),
            num_mixtures=args.mixtures, workers=args.workers,
            mix=MixSettings(sample_rate=args.sample_rate, duration_s=args.seconds), progress=False,
        )  # fmt: skip
        load_before = os.getloadavg()
        summary = run_synthesis(config)
        load_after = os.getloadavg()

    mixing_rate = summary.made_now / summary.mixture_seconds
    overall_rate = summary.made_now / summary.seconds
    result = {
        "date": datetime.date.today().isoformat(),
        "device": f"cpu-{os.cpu_count()}core",
        "mixtures": args.mixtures,
        "workers": args.workers,
        "seconds_per_mixture": args.seconds,
        "sample_rate": args.sample_rate,
        "bank_seconds": round(bank_seconds, 2),
        "run_seconds": round(summary.seconds, 2),
        "mixing_seconds": round(summary.mixture_seconds, 2),
        "mixtures_per_second_mixing": round(mixing_rate, 1),
        "mixtures_per_second_overall": round(overall_rate, 1),
        "hours_for_100k_mixtures": round(100_000 / mixing_rate / 3600, 2),
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "goal_mixtures_per_second": GOAL_PER_SECOND,
    }
    table = "\n".join(
        [
            f"# synth: {args.mixtures} mixtures x {args.seconds:g} s at {args.sample_rate} Hz, built-in bank, "
            f"{args.workers} workers, {result['device']}",
            "",
            "| stage | seconds | mixtures/s |",
            "|---|---|---|",
            f"| mixing (workers up, sources checked) | {summary.mixture_seconds:.1f} | {mixing_rate:.1f} |",
            f"| whole run (worker start, source check, mixing, assembly) | {summary.seconds:.1f} | {overall_rate:.1f} |",
            "",
            f"goal >= {GOAL_PER_SECOND:g} mixtures/s: **{'met' if mixing_rate >= GOAL_PER_SECOND else 'not met'}** "
            f"(100k mixtures: {result['hours_for_100k_mixtures']} h); bank written in {bank_seconds:.1f} s; "
            f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
            f"({os.cpu_count()} cores; a load above the core count means the cores were shared).",
        ]
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"synth_{result['date']}_{result['device']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
