"""`finelap synth`: build a synthetic SED set, from your own clips or from the built-in sound bank.

    finelap synth --builtin-bank bank/ --bank-split train --out synth_train -n 1000
    finelap synth --builtin-bank bank/ --bank-split eval --out synth_eval -n 200 --seed 1
    finelap synth --events events.csv --backgrounds backgrounds.jsonl --phrase-bank bank.jsonl \\
                  --out synth -n 100000 --workers 16 --on-bad-sample skip

`--builtin-bank DIR` alone writes the bank (WAVs, indexes, phrase bank) and stops.
Besides the mixtures and their training metadata, the output folder holds what
`finelap eval` needs (ground truth, durations, classes.txt, zero-shot labels.jsonl
and eval.yaml): `finelap eval --model MODEL_DIR --config OUT/eval.yaml`. The
report prints, and report.json keeps, the event sources kept per class and every
skipped line or clip.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from finelap.audio.io import AudioLoadError
from finelap.bad_input import ON_EMPTY_CLASS, MetadataError, survival_table
from finelap.synth.bank import SPLITS, BankSettings, bank_paths, write_builtin_bank
from finelap.synth.errors import SynthError
from finelap.synth.mixer import MixSettings
from finelap.synth.pipeline import WAV_SUBTYPES, SynthConfig, run_synthesis
from finelap.synth.sources import EnergyFilter

_MIX, _ENERGY = MixSettings(), EnergyFilter()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finelap synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--builtin-bank", metavar="DIR", help="write the procedural sound bank here and mix from it")
    inputs.add_argument("--bank-split", choices=SPLITS, default="train", help="bank variations to use (train and eval share none)")
    inputs.add_argument("--bank-variations", type=int, default=BankSettings.variations, help="variations per event class")
    inputs.add_argument("--bank-background-variations", type=int, default=BankSettings.background_variations)
    inputs.add_argument("--bank-background-seconds", type=float, default=BankSettings.background_seconds)
    inputs.add_argument("--bank-seed", type=int, default=BankSettings.seed)
    inputs.add_argument("--events", metavar="INDEX", help="events index (.csv or .jsonl: path, label[s])")
    inputs.add_argument("--backgrounds", metavar="INDEX", help="backgrounds index (.csv or .jsonl: path, label)")
    inputs.add_argument("--phrase-bank", metavar="FILE", help="phrase bank (JSON lines) for synonyms and the output bank")
    inputs.add_argument(
        "--on-bad-sample", choices=("error", "skip"), default="error",
        help="bad index or phrase-bank lines, unreadable clips. error: check every line and clip first, list "
        "every problem (grouped, counted per kind) and make nothing; skip: leave them out, counted in report.json",
    )
    inputs.add_argument(
        "--on-empty-class", choices=ON_EMPTY_CLASS, default="error",
        help="an event class left with no usable source (all skipped or rejected). error: stop, naming the class, "
        "its files and why each was dropped; warn: one warning line per class, and mix without it",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="output folder (an existing run there is resumed)")
    run.add_argument("-n", "--num-mixtures", type=int, default=100)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    run.add_argument("--captioner", metavar="MODULE:CALLABLE", help="caption function: f(events) -> str")
    run.add_argument("--save-stems", action="store_true", help="also write background and per-event stems")
    run.add_argument("--plots", action="store_true", help="also write a timeline PNG per mixture")
    run.add_argument("--subtype", choices=WAV_SUBTYPES, default="PCM_16", help="WAV sample format of the mixtures")
    run.add_argument("--prefix", default="synth", help="file names are PREFIX_000000.wav, ...")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    mix = parser.add_argument_group("mixtures")
    mix.add_argument("--sample-rate", type=int, default=_MIX.sample_rate)
    mix.add_argument("--duration", type=float, default=_MIX.duration_s, help="seconds")
    mix.add_argument("--events-per-mixture", type=int, nargs=2, metavar=("MIN", "MAX"), default=_MIX.events_per_mixture)
    mix.add_argument("--snr-db", type=float, nargs=2, metavar=("LOW", "HIGH"), default=_MIX.snr_db)
    mix.add_argument("--background-dbfs", type=float, nargs=2, metavar=("LOW", "HIGH"), default=_MIX.background_dbfs)
    mix.add_argument("--repeat-below", type=float, default=_MIX.repeat_below_s, help="repeat events shorter than this (s)")
    mix.add_argument("--repeats", type=int, nargs=2, metavar=("MIN", "MAX"), default=_MIX.repeats)
    mix.add_argument("--min-repeat-gap", type=float, default=_MIX.min_repeat_gap_s, help="seconds between repeats")
    mix.add_argument("--max-event-seconds", type=float, default=_MIX.max_event_s, help="crop longer events (default: duration)")
    mix.add_argument("--peak-limit", type=float, default=_MIX.peak_limit)
    mix.add_argument("--alternative-name-probability", type=float, default=_MIX.alternative_name_probability)

    energy = parser.add_argument_group("energy filter")
    energy.add_argument("--trim-db", type=float, default=_ENERGY.threshold_db, help="audible: within this many dB of the peak")
    energy.add_argument("--min-event-seconds", type=float, default=_ENERGY.min_seconds)
    energy.add_argument("--min-active-fraction", type=float, default=_ENERGY.min_active_fraction)
    energy.add_argument("--min-background-seconds", type=float, default=1.0)
    return parser


def config_from_args(args: argparse.Namespace, events: str, backgrounds: str, phrase_bank: str | None) -> SynthConfig:
    mix = MixSettings(
        sample_rate=args.sample_rate,
        duration_s=args.duration,
        events_per_mixture=tuple(args.events_per_mixture),
        snr_db=tuple(args.snr_db),
        background_dbfs=tuple(args.background_dbfs),
        repeat_below_s=args.repeat_below,
        repeats=tuple(args.repeats),
        min_repeat_gap_s=args.min_repeat_gap,
        max_event_s=args.max_event_seconds,
        peak_limit=args.peak_limit,
        alternative_name_probability=args.alternative_name_probability,
    )
    energy = EnergyFilter(args.trim_db, args.min_event_seconds, args.min_active_fraction)
    return SynthConfig(
        events_index=events,
        backgrounds_index=backgrounds,
        out_dir=args.out,
        phrase_bank=phrase_bank,
        num_mixtures=args.num_mixtures,
        seed=args.seed,
        workers=args.workers,
        mix=mix,
        energy=energy,
        min_background_seconds=args.min_background_seconds,
        on_bad_sample=args.on_bad_sample,
        on_empty_class=args.on_empty_class,
        save_stems=args.save_stems,
        plots=args.plots,
        captioner=args.captioner,
        subtype=args.subtype,
        prefix=args.prefix,
        progress=not args.quiet,
    )


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.builtin_bank and args.events:
        parser.error("give either --builtin-bank or --events/--backgrounds, not both")
    if not args.builtin_bank and not (args.events and args.backgrounds and args.out):
        parser.error("give --builtin-bank DIR, or --events, --backgrounds and --out")
    try:
        phrase_bank = args.phrase_bank
        events, backgrounds = args.events, args.backgrounds
        if args.builtin_bank:
            settings = BankSettings(
                sample_rate=args.sample_rate,
                variations=args.bank_variations,
                background_variations=args.bank_background_variations,
                background_seconds=args.bank_background_seconds,
                seed=args.bank_seed,
            )
            write_builtin_bank(args.builtin_bank, settings)
            events_path, backgrounds_path, bank_path = bank_paths(args.builtin_bank, args.bank_split)
            events, backgrounds, phrase_bank = str(events_path), str(backgrounds_path), phrase_bank or str(bank_path)
            print(f"sound bank: {args.builtin_bank} (split {args.bank_split}: {events_path.name}, {backgrounds_path.name})")
            if not args.out:
                return 0
        summary = run_synthesis(config_from_args(args, events, backgrounds, phrase_bank))
    except (SynthError, MetadataError, AudioLoadError, FileNotFoundError) as error:
        print(f"finelap synth: error: {error}", file=sys.stderr)
        return 2
    report = summary.report
    rate = summary.made_now / summary.mixture_seconds if summary.mixture_seconds > 0 else 0.0
    print(
        f"{summary.mixtures} mixtures in {summary.out_dir} ({summary.made_now} made now at {rate:.1f}/s, "
        f"{summary.seconds:.1f} s in all); "
        f"sources accepted {json.dumps(report['accepted'])}, rejected {json.dumps(report['rejected'])}, "
        f"skipped {json.dumps(report['skipped'])} (each listed in report.json); "
        f"{report['mixtures_scaled_to_peak_limit']} mixtures scaled down to the peak limit"
    )
    print("event sources per class (kept / listed):")
    print("\n".join(survival_table(report["event_sources_per_class"])))
    if (summary.out_dir / "eval.yaml").is_file():
        print(f"evaluate on this set: finelap eval --model MODEL_DIR --config {summary.out_dir / 'eval.yaml'}")
    return 0
