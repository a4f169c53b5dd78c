"""The PSDS a perfect frame classifier would reach, for each frame-label rule.

    python benchmarks/label_rule_ceiling.py --ground-truth GT.tsv --durations D.tsv [--hop 0.16]

The frame stream is trained to reproduce frame labels on the encoder's grid
(finelap/data/labels.py). A model that learned them perfectly scores 1 on
the frames its rule marks and 0 elsewhere; this script builds exactly those
scores from a DCASE ground-truth TSV (with FrameGrid, the code training
uses) and evaluates them like `finelap eval` does (sed_scores_eval, PSDS1 and
PSDS2 with the DCASE parameters). The gap to 1.0 is what the rule itself
costs, before any learning. The table is printed and saved (JSON +
Markdown) under benchmarks/results/ (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from sed_scores_eval import io

from finelap.data.labels import FRAME_LABEL_RULES, FrameGrid
from finelap.metrics.sed import sed_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def perfect_scores(ground_truth: dict, durations: dict, grid: FrameGrid, classes: list[str]) -> dict:
    """audio id -> score DataFrame: 1 on the frames the rule labels active for each class, else 0."""
    scores = {}
    for audio_id, duration in durations.items():
        frames = min(math.ceil(duration / grid.hop_seconds), grid.num_frames)
        edges = np.minimum(np.arange(frames + 1) * grid.hop_seconds, duration)
        values = np.zeros((frames, len(classes)))
        for onset, offset, label in ground_truth.get(audio_id, []):
            active = grid.mask([(onset, offset)], duration)[:frames].numpy()
            values[active, classes.index(label)] = 1.0
        scores[audio_id] = pd.DataFrame(np.column_stack([edges[:-1], edges[1:], values]),
                                        columns=["onset", "offset", *classes])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ground-truth", type=Path, required=True, help="DCASE TSV: filename onset offset event_label")
    parser.add_argument("--durations", type=Path, required=True, help="TSV: filename duration")
    parser.add_argument("--hop", type=float, default=0.16, help="encoder frame hop in seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    ground_truth = io.read_ground_truth_events(str(args.ground_truth))
    durations = io.read_audio_durations(str(args.durations))
    ground_truth = {audio_id: ground_truth.get(audio_id, []) for audio_id in durations}
    classes = sorted({label for events in ground_truth.values() for _, _, label in events})
    num_frames = math.ceil(max(durations.values()) / args.hop)
    rows = []
    for rule in FRAME_LABEL_RULES:
        grid = FrameGrid(args.hop, num_frames, rule)
        metrics = sed_metrics(perfect_scores(ground_truth, durations, grid, classes), ground_truth, durations).metrics
        rows.append({"rule": rule, "psds1": metrics["psds1"], "psds2": metrics["psds2"],
                     "segment_f1_macro": metrics["segment_f1_macro"]})
    result = {"date": datetime.date.today().isoformat(), "ground_truth": str(args.ground_truth),
              "clips": len(durations), "classes": len(classes), "hop_seconds": args.hop, "rows": rows}
    table = ["| frame-label rule | PSDS1 | PSDS2 | segment F1 (macro) |", "|---|---|---|---|"]
    table += [f"| {r['rule']} | {r['psds1']:.3f} | {r['psds2']:.3f} | {r['segment_f1_macro']:.3f} |" for r in rows]
    print(f"A perfect classifier of each rule's frame labels: {len(durations)} clips, {len(classes)} classes, "
          f"hop {args.hop} s\n" + "\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"label_rule_ceiling_{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
