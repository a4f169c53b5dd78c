"""`finelap eval`: retrieval, zero-shot, SED and grounding metrics of a FineLAP model folder.

    finelap eval --model MODEL_DIR --config configs/eval/X.yaml [--out DIR] [--save-scores]
    finelap eval sed --scores DIR --ground-truth GT.tsv --durations D.tsv [--out DIR]
    finelap eval grounding --scores DIR --ground-truth G.jsonl [--durations D.tsv] [--out DIR]

The first form runs every task of the config (finelap.eval.config), each on
its own files, and writes metrics.json, report.md and PNG plots into --out.
The other two score saved frame scores (sed_scores_eval score files, one TSV
per clip or per (audio, phrase) pair, as written by `--save-scores`), so
other systems are measured the same way. Metric definitions: finelap/metrics/*.py.

A metric that cannot be computed does not stop the others: they are all
written, the failed one is null in metrics.json with its error under the
task's "metric_errors", the error is printed to stderr, and the exit status
is 1 (as for bad input, which writes nothing). A metric computed differently
from its definition (PSDS2 of a single event class, without cross-trigger)
is named under "metric_notes", in report.md and on the terminal.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from finelap.audio.io import AudioLoadError
from finelap.config import ConfigError, add_set_argument
from finelap.eval.config import load_eval_config
from finelap.eval.readers import EvalDataError
from finelap.eval.report import write_report
from finelap.eval.saved_scores import evaluate_grounding_scores, evaluate_sed_scores
from finelap.eval.tasks import evaluate


def model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finelap eval",
        description="Evaluate a FineLAP model folder on the tasks of an eval config "
                    "('finelap eval sed|grounding --help': score saved score files instead).",
    )
    parser.add_argument("--model", required=True, type=Path, help="model folder written by FineLAP.save_pretrained")
    parser.add_argument("--config", required=True, type=Path,
                        help="eval config, e.g. configs/eval/audiocaps_clotho_retrieval.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    add_set_argument(parser, dest="overrides", help="override config keys, e.g. --set batch_size=32")
    parser.add_argument("--save-scores", action="store_true",
                        help="also write SED / grounding frame scores as sed_scores_eval files under OUT/scores/TASK")
    return parser


def sed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finelap eval sed", description="SED metrics of saved sed_scores_eval score files."
    )
    parser.add_argument("--scores", required=True, type=Path, help="folder of score TSVs, one per clip (<clip id>.tsv)")
    parser.add_argument("--ground-truth", required=True, type=Path, help="DCASE TSV: filename onset offset event_label")
    parser.add_argument("--durations", required=True, type=Path, help="TSV: filename duration")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_sed"))
    parser.add_argument("--name", default="sed", help="task name in metrics.json and the report")
    parser.add_argument("--alpha-st", type=float, default=1.0, help="PSDS instability penalty (default 1)")
    parser.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    return parser


def grounding_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finelap eval grounding",
                                     description="Grounding metrics of saved per-(audio, phrase) score files.")
    parser.add_argument("--scores", required=True, type=Path, help="folder of score TSVs named <pair id>.tsv")
    parser.add_argument("--ground-truth", required=True, type=Path, help="grounding JSON lines or AudioGrounding JSON")
    parser.add_argument("--durations", type=Path, default=None,
                        help="TSV: filename duration (default: where each score file ends)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_grounding"))
    parser.add_argument("--name", default="grounding")
    parser.add_argument("--median-filter", type=int, default=3, help="frames, on threshold decisions (1 = off)")
    parser.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    return parser


def main(argv: list[str]) -> int:
    """Run `finelap eval` (module docstring); returns the exit status.

    0: every metric computed. 1: bad input or config (nothing written), or a
    metric that could not be computed: then the other metrics are still
    written, the failed one is null in metrics.json with its error under
    "metric_errors", and each failure is printed to stderr.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] == "sed":
            args = sed_parser().parse_args(argv[1:])
            reports = [evaluate_sed_scores(args.scores, args.ground_truth, args.durations, args.out, args.name,
                                           args.alpha_st, args.on_bad_sample)]
            metrics_path, report_path = write_report(reports, args.out, title="SED evaluation of saved scores")
        elif argv and argv[0] == "grounding":
            args = grounding_parser().parse_args(argv[1:])
            reports = [evaluate_grounding_scores(args.scores, args.ground_truth, args.out, args.durations,
                                                 args.name, args.median_filter, args.on_bad_sample)]
            metrics_path, report_path = write_report(reports, args.out, title="Grounding evaluation of saved scores")
        else:
            from finelap.models.finelap import ModelFolderError  # imports torch: only when a model is evaluated

            args = model_parser().parse_args(argv)
            config = load_eval_config(args.config, args.overrides)
            if args.device is not None:
                config.device = args.device
            try:
                reports = evaluate(args.model, config, args.out, save_scores=args.save_scores)
            except ModelFolderError as error:
                raise EvalDataError(str(error)) from None
            metrics_path, report_path = args.out / "metrics.json", args.out / "report.md"
    except (EvalDataError, ConfigError, AudioLoadError) as error:
        print(f"finelap eval: error: {error}", file=sys.stderr)
        return 1
    print_metrics(metrics_path)
    print(f"wrote {metrics_path} and {report_path}")
    failures = [(report.name, metric, error) for report in reports for metric, error in report.metric_errors.items()]
    for task, metric, error in failures:
        print(f"finelap eval: error: task '{task}': {metric} could not be computed: {error} "
              f"(null in {metrics_path}, which holds the metrics that were computed)", file=sys.stderr)
    return 1 if failures else 0


def print_metrics(metrics_path: Path) -> None:
    """Each task's metrics on the terminal, as metrics.json holds them (no value: n/a), then its metric notes."""
    for task, values in json.loads(Path(metrics_path).read_text()).items():
        notes = values.pop("metric_notes", {})
        values.pop("metric_errors", None)  # main prints these to stderr
        cells = [f"{name} {'n/a' if value is None else f'{value:.4g}' if isinstance(value, float) else value}"
                 for name, value in values.items()]
        print(f"{task}: " + ", ".join(cells))
        for metric, note in notes.items():
            print(f"{task}: note: {metric} {note}")
