"""`make demo`: FineLAP end to end on built-in data, no downloads.

    python -m finelap.demo --out demo_out              # the full demo (about 12 minutes on 2 idle CPU cores)
    python -m finelap.demo --out demo_out --reduced    # every stage at toy size (CI)
    python -m finelap.demo --out demo_out/ablation --ablation   # clip_only vs frame_only vs dual

Stages, each printed with its progress and timed:
1. data: the built-in sound bank (`finelap synth --builtin-bank`), training
   mixtures with timestamped phrases, more mixtures kept as caption-only clips
   (a second metadata source without phrases), and held-out sets from the
   bank's eval split (no source sound shared with training): retrieval with
   several captions per clip, SED (DCASE TSV + durations), grounding, and
   zero-shot classification of single-event clips over the bank's classes.
2. train: `deepspeed --num_gpus 2 finelap/train.py --config configs/demo/train.yaml`
   (2 CPU ranks, ZeRO-2, dual-stream loss with batch-global frame negatives).
3. export: `finelap export`, plus the untrained model (the run's initial weights) as a baseline.
4. eval: `finelap eval --config configs/demo/eval.yaml` for both models.
5. report: OUT/report.md with the metrics table (untrained vs trained, the
   learning bar), the training-loss curves and a frame-score heatmap with
   the ground truth overlaid.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from finelap.config import add_set_argument, load_config
from finelap.launchers import free_port
from finelap.synth.captions import rule_based_caption

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "configs" / "demo" / "train.yaml"
EVAL_CONFIG = REPO / "configs" / "demo" / "eval.yaml"
LOSS_MODES = ("clip_only", "frame_only", "dual")
# Threads of each of the 2 training ranks: floating-point sums split over threads add in another
# order, so the numbers are exact for one thread count (and one CPU type).
TRAIN_THREADS_PER_RANK = 1


@dataclass(frozen=True)
class DemoSize:
    """How much data and training one demo run makes."""

    annotated: int  # training mixtures with timestamped phrases
    caption_only: int  # training mixtures kept with their caption only
    eval_mixtures: int  # held-out mixtures: retrieval, SED and grounding
    zero_shot_clips: int  # held-out single-event clips
    captions_per_clip: int  # retrieval captions per held-out mixture
    bank_variations: int  # sounds per event class in the built-in bank; a quarter are held out
    train_settings: tuple[str, ...]  # --set overrides of configs/demo/train.yaml


FULL = DemoSize(annotated=2000, caption_only=2000, eval_mixtures=600, zero_shot_clips=360, captions_per_clip=3,
                bank_variations=48, train_settings=())
REDUCED = DemoSize(annotated=32, caption_only=32, eval_mixtures=24, zero_shot_clips=18, captions_per_clip=2,
                   bank_variations=8,
                   train_settings=("train.max_steps=3", "train.save_every=3", "data.batch_size=4",
                               "optim.warmup_steps=1", "data.num_workers=0"))


class StageClock:
    """Prints a header per stage and records its wall time in seconds."""

    def __init__(self, total: int) -> None:
        self.total, self.number, self.seconds = total, 0, {}

    def run(self, name: str, description: str, action):
        self.number += 1
        print(f"\n[{self.number}/{self.total}] {description}", flush=True)
        start = time.perf_counter()
        result = action()
        self.seconds[name] = time.perf_counter() - start
        print(f"[{self.number}/{self.total}] {name} done in {self.seconds[name]:.0f} s", flush=True)
        return result


# ---------------------------------------------------------------- 1. data


def _synth(bank: Path, variations: int, split: str, out: Path, count: int, seed: int, prefix: str,
           *extra: str) -> Path:
    from finelap.synth import cli as synth_cli

    arguments = ["--builtin-bank", str(bank), "--bank-variations", str(variations), "--bank-split", split,
                 "--out", str(out), "-n", str(count),
                 "--seed", str(seed), "--prefix", prefix, "--workers", str(min(2, os.cpu_count() or 1)),
                 "--duration", "5", "--events-per-mixture", "1", "3", *extra]
    if synth_cli.main(arguments) != 0:
        raise RuntimeError(f"finelap synth {' '.join(arguments)} failed")
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def caption_variants(details: dict, alternatives: dict[str, list[str]], count: int, seed: int) -> list[str]:
    """`count` distinct captions of one mixture: its own, then the rule-based captioner on the same
    events named by other synonyms (which also changes the wording it draws)."""
    captions = [details["caption"]]
    rng = random.Random(f"{seed}:{details['audio_id']}")
    events = [{"label": e["label"], "name": e["name"], "role": "event", "segments": e["placements"],
               "snr_db": e["snr_db"]} for e in details["events"]]
    background = details["background"]
    events.append({"label": background["label"], "name": background["name"], "role": "background",
                   "segments": [[0.0, details["duration"]]], "snr_db": None})
    for _ in range(8 * count):
        if len(captions) == count:
            break
        renamed = [{**event, "name": rng.choice(alternatives.get(event["label"], [event["label"]]))} for event in events]
        caption = rule_based_caption(renamed)
        if caption not in captions:
            captions.append(caption)
    return captions


def _names_of(bank_folder: Path) -> dict[str, list[str]]:
    """label -> the words it may be called by (the label and its alternatives)."""
    rows = _read_jsonl(bank_folder / "phrase_bank.jsonl")
    return {row["phrase"]: [row["phrase"], *row["alternatives"]] for row in rows}


def make_data(data_dir: Path, size: DemoSize) -> dict:
    """Write the bank, the training sources and the held-out sets; returns their paths."""
    bank = data_dir / "bank"
    annotated = _synth(bank, size.bank_variations, "train", data_dir / "train_annotated", size.annotated, 0, "mix")
    caption_source = _synth(bank, size.bank_variations, "train", data_dir / "train_caption_only", size.caption_only,
                            1, "cap")
    caption_only = _write_jsonl(caption_source / "caption_only.jsonl", [
        {"audio_id": row["audio_id"], "audio_path": row["audio_path"], "caption": row["caption"]}
        for row in _read_jsonl(caption_source / "metadata.jsonl")
    ])
    held_out = _synth(bank, size.bank_variations, "eval", data_dir / "eval_mixtures", size.eval_mixtures, 2, "eval")
    single = _synth(bank, size.bank_variations, "eval", data_dir / "eval_single_events", size.zero_shot_clips,
                    3, "single", "--events-per-mixture", "1", "1")

    names = _names_of(bank)
    _write_jsonl(held_out / "retrieval.jsonl", [
        {"audio_id": details["audio_id"], "audio_path": details["audio_path"],
         "caption": caption_variants(details, names, size.captions_per_clip, seed=2)}
        for details in _read_jsonl(held_out / "mixtures.jsonl")
    ])
    classes = "".join(row["phrase"] + "\n" for row in _read_jsonl(annotated / "phrase_bank.jsonl"))
    (data_dir / "classes.txt").write_text(classes)
    _write_jsonl(single / "labels.jsonl", [
        {"audio_path": row["audio_path"], "label": row["phrases"][0]["phrase"]}
        for row in _read_jsonl(single / "metadata.jsonl")
    ])
    _check_held_out(bank)
    counts = {"annotated": size.annotated, "caption_only": size.caption_only,
              "eval_mixtures": size.eval_mixtures, "zero_shot_clips": size.zero_shot_clips}
    print("data: " + ", ".join(f"{key} {value}" for key, value in counts.items()), flush=True)
    return {"annotated": annotated / "metadata.jsonl", "caption_only": caption_only,
            "phrase_bank": annotated / "phrase_bank.jsonl", "counts": counts}


def _check_held_out(bank: Path) -> None:
    """The eval split of the bank shares no file with the train split."""
    shared = set()
    for kind in ("events", "backgrounds"):
        train = {row["path"] for row in _read_jsonl(bank / f"{kind}_train.jsonl")}
        shared |= train & {row["path"] for row in _read_jsonl(bank / f"{kind}_eval.jsonl")}
    if shared:
        raise RuntimeError(f"held-out sounds also used for training: {sorted(shared)[:5]}")


# ---------------------------------------------------------------- 2. train, 3. export


def train_settings(data: dict, output_dir: Path, size: DemoSize, loss_mode: str) -> list[str]:
    return [
        f"data.sources=[{{name: annotated, path: {data['annotated']}}}, "
        f"{{name: caption_only, path: {data['caption_only']}}}]",
        f"data.phrase_bank={data['phrase_bank']}",
        f"train.output_dir={output_dir}",
        f"loss.mode={loss_mode}",
        *size.train_settings,
    ]


def train(data: dict, output_dir: Path, size: DemoSize, loss_mode: str = "dual") -> Path:
    """2 CPU ranks, one thread each (the machine's 2 cores), through the deepspeed launcher."""
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a new run, not a resume of an older one
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "finelap" / "train.py"), "--config", str(TRAIN_CONFIG)]
    for setting in train_settings(data, output_dir, size, loss_mode):
        command += ["--set", setting]

    steps = load_config(TRAIN_CONFIG, list(size.train_settings)).train.max_steps
    print(f"training {steps} steps, a fixed schedule whatever the machine's speed (the trainer prints the time "
          f"left after its first steps and at every tenth)", flush=True)
    print("$ " + " ".join(command), flush=True)
    environment = dict(os.environ, OMP_NUM_THREADS=str(TRAIN_THREADS_PER_RANK), TOKENIZERS_PARALLELISM="false",
                       PYTHONUNBUFFERED="1")
    subprocess.run(command, cwd=REPO, env=environment, check=True)
    return output_dir


def export_models(run_dir: Path, trained_dir: Path, untrained_dir: Path, size: DemoSize) -> None:
    """The trained model (`finelap export`) and the same model at its initial weights
    (`finelap export --untrained`: the trainer's seed rule)."""
    from finelap import export

    if export.main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(trained_dir)]) != 0:
        raise RuntimeError(f"finelap export of {run_dir / 'checkpoints'} failed")
    export.export_untrained(TRAIN_CONFIG, untrained_dir, list(size.train_settings))
    print(f"untrained baseline: {untrained_dir}", flush=True)


# ---------------------------------------------------------------- 4. eval


def evaluate_model(model_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    """`finelap eval` with configs/demo/eval.yaml, whose paths are relative to the data folder."""
    command = [sys.executable, "-m", "finelap.cli", "eval", "--model", str(model_dir.resolve()),
               "--config", str(EVAL_CONFIG), "--out", str(out_dir.resolve())]
    subprocess.run(command, cwd=data_dir, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"), check=True)
    return json.loads((out_dir / "metrics.json").read_text())


# ---------------------------------------------------------------- 5. report

# (task, metric, label, chance-level function of the task's metrics or None)
HEADLINE = (
    ("retrieval", "t2a_R@1", "text-to-audio R@1 (%)", lambda m: 100.0 / m["num_audio"]),
    ("retrieval", "t2a_R@10", "text-to-audio R@10 (%)", lambda m: 1000.0 / m["num_audio"]),
    ("retrieval", "a2t_R@1", "audio-to-text R@1 (%)", None),
    ("retrieval", "t2a_mAP@10", "text-to-audio mAP@10 (%)", None),
    ("zero_shot", "accuracy", "zero-shot accuracy (%)", lambda m: 100.0 / m["num_classes"]),
    ("sed", "psds1", "SED PSDS1", None),
    ("sed", "psds2", "SED PSDS2", None),
    ("sed", "event_f1_macro", "SED event F1 (macro)", None),
    ("sed", "segment_f1_macro", "SED segment F1 (macro)", None),
    ("grounding", "psds1", "grounding PSDS1", None),
    ("grounding", "threshold_auc", "grounding threshold-AUC", None),
)


def learning_bar(trained: dict, untrained: dict) -> list[tuple[str, bool, str]]:
    """The demo's pass criteria: (criterion, met, measured)."""
    psds, psds0 = trained["sed"]["psds1"], untrained["sed"]["psds1"]
    r1, audio = trained["retrieval"]["t2a_R@1"], trained["retrieval"]["num_audio"]
    accuracy, classes = trained["zero_shot"]["accuracy"], trained["zero_shot"]["num_classes"]
    return [
        ("PSDS1 > 0.25", psds > 0.25, f"{psds:.3f}"),
        ("PSDS1 >= 3x untrained", psds >= 3 * psds0, f"{psds:.3f} vs {psds0:.3f}"),
        ("text-to-audio R@1 >= 10x chance", r1 >= 10 * 100.0 / audio, f"{r1:.2f}% vs chance {100.0 / audio:.2f}%"),
        ("zero-shot accuracy >= 5x chance", accuracy >= 5 * 100.0 / classes,
         f"{accuracy:.1f}% vs chance {100.0 / classes:.1f}%"),
    ]


def _value(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def metrics_table(columns: dict[str, dict]) -> list[str]:
    """Markdown rows: one per headline metric, one column per model (name -> metrics.json)."""
    names = list(columns)
    lines = ["| task | metric | chance | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for task, metric, label, chance in HEADLINE:
        first = columns[names[0]][task]
        lines.append(f"| {task} | {label} | {_value(chance(first)) if chance else ''} | "
                     + " | ".join(_value(columns[name][task].get(metric)) for name in names) + " |")
    return lines


def plot_losses(log_paths: dict[str, Path], path: Path) -> Path:
    """Clip and frame losses against the step, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for name, log_path in log_paths.items():
        records = _read_jsonl(log_path)
        steps = [r["step"] for r in records]
        for axis, key in zip(axes, ("clip_loss", "frame_loss")):
            values = [r[key] for r in records]
            if any(values):
                axis.plot(steps, values, label=name, linewidth=1)
    for axis, title in zip(axes, ("clip stream loss", "frame stream loss")):
        axis.set(title=title, xlabel="optimizer step", ylabel="loss", yscale="log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.savefig(path, dpi=110)
    return path


def _finished(run_dir: Path) -> dict:
    """What a training run that ended normally wrote last: {"step", "total_steps", "stopped_by"}."""
    from finelap.checkpoint import read_finished

    finished = read_finished(run_dir)
    if finished is None:
        raise FileNotFoundError(f"{run_dir}: the training run did not finish (no finished.json)")
    return finished


def _stop_note(run_dir: Path) -> str:
    """Says so when train.max_minutes ended the run before its planned steps."""
    finished = _finished(run_dir)
    if finished["step"] < finished["total_steps"]:
        return (f" (of {finished['total_steps']} planned: the time budget train.max_minutes stopped it, so these "
                "numbers depend on how fast the machine was and are not comparable with other runs)")
    return ""


def _steps_note(run_dirs: dict[str, Path]) -> str:
    """One sentence on the steps each run reached: the same for all, or which differ (not comparable)."""
    finished = {name: _finished(run_dir) for name, run_dir in run_dirs.items()}
    steps = {entry["step"] for entry in finished.values()}
    if len(steps) == 1 and all(entry["step"] == entry["total_steps"] for entry in finished.values()):
        return f"Every run trained the same {steps.pop()} steps."
    reached = ", ".join(f"{name} {entry['step']} of {entry['total_steps']}" for name, entry in finished.items())
    return (f"**Not comparable**: the runs trained different numbers of steps ({reached}; train.max_minutes "
            "or a changed train.max_steps), so the table compares budgets as much as methods.")


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what `platform` knows of it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_note() -> str:
    """What the report's numbers are exact for: the CPU type and the thread counts it ran with."""
    import torch  # heavy: imported only where a stage needs it, as the other stages do

    return (f"Machine: {cpu_name()}, {os.cpu_count()} logical cores; training ran 2 ranks x "
            f"{TRAIN_THREADS_PER_RANK} thread, evaluation {torch.get_num_threads()} threads. The same config and "
            "seed give these numbers to the digit on this CPU type with these thread counts, on an idle or a busy "
            "machine; another CPU type (or thread count) rounds floats differently in the last bits, which moves "
            "the metrics by about as much as another seed does (README).")


def write_demo_report(out: Path, trained: dict, untrained: dict, counts: dict, seconds: dict, run_dir: Path,
                      eval_dir: Path, size: DemoSize) -> Path:
    """OUT/report.md: the data and machine, the metrics of both models, the learning bar, the time per
    stage, the training-loss plot and a frame-score heatmap of a held-out mixture."""
    batch_size = load_config(TRAIN_CONFIG, list(size.train_settings)).data.batch_size
    curves = plot_losses({"dual": run_dir / "train_log.jsonl"}, out / "training_loss.png")
    heatmaps = sorted(eval_dir.glob("sed_heatmap_*.png"))
    heatmap = shutil.copyfile(heatmaps[0], out / "frame_scores_heatmap.png") if heatmaps else None
    log = _read_jsonl(run_dir / "train_log.jsonl")
    lines = ["# FineLAP demo", "",
             f"Training data: {counts['annotated']} mixtures with timestamped phrases + {counts['caption_only']} "
             f"caption-only clips (5 s each). Held out: {counts['eval_mixtures']} mixtures (retrieval, SED, "
             f"grounding) and {counts['zero_shot_clips']} single-event clips (zero-shot), from sounds never "
             f"used in training. Training: {log[-1]['step']} steps of 2 x {batch_size} clips on 2 CPU ranks"
             f"{_stop_note(run_dir)}.", "", machine_note(), "",
             "## Metrics (held-out sets)", ""]
    lines += metrics_table({"untrained": untrained, "trained": trained})
    lines += ["", "## Learning bar", "", "| criterion | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if met else 'NO'} | {measured} |" for name, met, measured in learning_bar(trained, untrained)]
    lines += ["", "## Run time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in seconds.items()]
    lines += [f"| total | {sum(seconds.values()):.0f} |", "", "## Training loss", "",
              f"![training loss]({curves.name})", ""]
    if heatmap is not None:
        lines += ["## Frame scores of a held-out mixture (ground truth outlined)", "",
                  f"![frame scores]({Path(heatmap).name})", ""]
    lines += ["Full evaluation reports: [trained](eval_trained/report.md), [untrained](eval_untrained/report.md).", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


# ---------------------------------------------------------------- entry points


def run_demo(out: Path, size: DemoSize) -> Path:
    clock = StageClock(5)
    data_dir = out / "data"
    data = clock.run("data", "synthesizing the sound bank, training set and held-out sets", lambda: make_data(data_dir, size))
    run_dir = clock.run("train", "pretraining with DeepSpeed (2 CPU ranks, ZeRO-2, dual-stream loss)",
                        lambda: train(data, out / "train", size))
    clock.run("export", "exporting the trained model and the untrained baseline",
              lambda: export_models(run_dir, out / "model", out / "model_untrained", size))
    trained, untrained = clock.run("eval", "evaluating both models on every held-out set", lambda: (
        evaluate_model(out / "model", data_dir, out / "eval_trained"),
        evaluate_model(out / "model_untrained", data_dir, out / "eval_untrained"),
    ))
    seconds = dict(clock.seconds)
    report = clock.run("report", "writing the report", lambda: write_demo_report(
        out, trained, untrained, data["counts"], seconds, run_dir, out / "eval_trained", size))
    print("\n" + "\n".join(metrics_table({"untrained": untrained, "trained": trained})), flush=True)
    for name, met, measured in learning_bar(trained, untrained):
        print(f"{'PASS' if met else 'FAIL'}  {name}: {measured}", flush=True)
    print(f"\nreport: {report}", flush=True)
    return report


def run_ablation(out: Path, size: DemoSize) -> Path:
    """clip_only, frame_only and dual on the same data, batch and number of steps; one comparison table."""
    clock = StageClock(1 + 2 * len(LOSS_MODES))
    data_dir = out / "data"
    data = clock.run("data", "synthesizing the data", lambda: make_data(data_dir, size))
    from finelap.checkpoint import read_finished

    results, logs = {}, {}
    for mode in LOSS_MODES:
        run_dir = out / f"train_{mode}"
        if read_finished(run_dir) is not None:  # an interrupted ablation goes on where it stopped
            print(f"{run_dir} holds a finished run: not trained again (delete it to retrain)", flush=True)
        else:
            clock.run(f"train {mode}", f"pretraining with loss.mode={mode}", lambda: train(data, run_dir, size, mode))
        logs[mode] = run_dir / "train_log.jsonl"

        def export_and_evaluate():
            from finelap import export

            export.export(run_dir / "checkpoints", out / f"model_{mode}")
            return evaluate_model(out / f"model_{mode}", data_dir, out / f"eval_{mode}")

        results[mode] = clock.run(f"eval {mode}", f"exporting and evaluating {mode}", export_and_evaluate)
    curves = plot_losses(logs, out / "training_loss.png")
    lines = ["# FineLAP ablation: clip-level, frame-level and dual-stream pretraining", "",
             "Same data, batch, seed and schedule; only `loss.mode` differs. "
             + _steps_note({mode: out / f"train_{mode}" for mode in LOSS_MODES}), ""]
    lines += metrics_table(results)
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in clock.seconds.items()]
    lines += ["", f"![training loss]({curves.name})", ""]
    report = out / "ablation.md"
    report.write_text("\n".join(lines))
    print("\n" + "\n".join(metrics_table(results)) + f"\n\nablation table: {report}", flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--reduced", action="store_true", help="toy sizes and 3 training steps (the CI test)")
    parser.add_argument("--ablation", action="store_true", help="train clip_only, frame_only and dual; compare them")
    add_set_argument(parser, help="override configs/demo/train.yaml for the training run(s), e.g. optim.lr=1e-3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    size = REDUCED if args.reduced else FULL
    if args.set:
        size = replace(size, train_settings=size.train_settings + tuple(args.set))
    (run_ablation if args.ablation else run_demo)(args.out.resolve(), size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
