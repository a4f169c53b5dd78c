"""Audio input throughput: DataLoader path (worker processes) vs DALI path (CPU threads).

    python benchmarks/bench_pipeline.py [--clips 96] [--batch-size 16] [--repeats 3]

Generates `clips` 10 s 44.1 kHz stereo FLAC files (tones plus noise) in a temporary folder;
every path decodes, downmixes, resamples them to 16 kHz mono, crops/pads to 10 s:
- dataloader: `finelap.data.loader.build_train_loader` (2 workers, load_audio), the
  training input with its `Batch` building (caption-only metadata);
- dataloader (audio only): a torch DataLoader over load_audio, 2 persistent workers,
  padding in collate: the same decode work as DALI without the Batch building;
- dali: `DaliAudioLoader` over the files, 2 DALI threads, CPU pipeline.
Each path runs one warm-up epoch (worker / pipeline start-up), then `repeats` timed
epochs; clips/s is from the median. The table is printed and saved (JSON + Markdown)
under benchmarks/results/ (or --out). Goal: DALI >= 1.5x the DataLoader path on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch.utils.data import DataLoader, Dataset

from finelap.audio.io import load_audio

RESULTS = Path(__file__).resolve().parent / "results"
SECONDS, SOURCE_RATE, CHANNELS = 10.0, 44100, 2


def write_clips(folder: Path, count: int) -> list[Path]:
    """`count` FLAC files of tones plus noise, 10 s, 44.1 kHz stereo, 16-bit."""
    rng = np.random.default_rng(0)
    time_axis = np.arange(int(SECONDS * SOURCE_RATE))[:, None] / SOURCE_RATE
    paths = []
    for number in range(count):
        tones = sum(0.15 * np.sin(2 * np.pi * rng.uniform(50, 6000, CHANNELS) * time_axis) for _ in range(3))
        audio = tones + 0.02 * rng.standard_normal(tones.shape)
        path = folder / f"clip{number:04d}.flac"
        soundfile.write(path, audio, SOURCE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


class AudioFiles(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_audio(self.paths[index], 16000, SECONDS)[0]


def pad_batch(waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    padded = torch.zeros(len(waveforms), int(SECONDS * 16000))
    for row, waveform in enumerate(waveforms):
        padded[row, : waveform.shape[0]] = waveform
    return padded, torch.tensor([waveform.shape[0] for waveform in waveforms])


def training_loader(folder: Path, paths: list[Path], batch_size: int, workers: int):
    """The training input of finelap.data on caption-only metadata for `paths`."""
    from finelap.config import Config, DataConfig, DataSourceConfig
    from finelap.data.loader import build_train_loader

    metadata = folder / "metadata.jsonl"
    metadata.write_text("".join(
        json.dumps({"audio_id": path.stem, "audio_path": str(path), "caption": f"tones number {n}"}) + "\n"
        for n, path in enumerate(paths)
    ))
    config = Config(data=DataConfig(
        sources=[DataSourceConfig(name="bench", path=str(metadata))], batch_size=batch_size,
        num_workers=workers, annotated_fraction=0.0,
    ))
    return build_train_loader(config)


def time_epochs(loader, repeats: int, clips: int) -> list[float]:
    """Seconds per epoch for `repeats` epochs after one warm-up epoch; checks every clip arrives."""
    times = []
    for epoch in range(repeats + 1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        start = time.perf_counter()
        seen = sum(len(lengths_of(batch)) for batch in loader)
        if epoch:
            times.append(time.perf_counter() - start)
        if seen != clips:
            raise RuntimeError(f"an epoch delivered {seen} clips, expected {clips}")
    return times


def lengths_of(batch) -> torch.Tensor:
    """[B] lengths of a Batch, a (waveforms, lengths) pair or a DALI (index, waveforms, lengths) triple."""
    return batch.lengths if hasattr(batch, "lengths") else batch[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers and DALI threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from finelap.audio.dali import DaliAudioLoader

    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        paths = write_clips(folder, args.clips)
        audio_only = DataLoader(AudioFiles(paths), batch_size=args.batch_size, num_workers=args.workers,
                                collate_fn=pad_batch, persistent_workers=True)
        paths_under_test = [
            ("dataloader (finelap.data.loader)", lambda: training_loader(folder, paths, args.batch_size, args.workers)),
            ("dataloader (audio only)", lambda: audio_only),
            ("dali", lambda: DaliAudioLoader.from_files(paths, batch_size=args.batch_size, max_seconds=SECONDS,
                                                        num_threads=args.workers)),
        ]
        for name, build in paths_under_test:
            loader = build()
            times = time_epochs(loader, args.repeats, args.clips)
            rows.append({"path": name, "clips_per_s": args.clips / statistics.median(times), "epoch_times_s": times})
            print(f"{name}: {rows[-1]['clips_per_s']:.1f} clips/s")

    by_name = {row["path"]: row["clips_per_s"] for row in rows}
    result = {
        "date": datetime.date.today().isoformat(),
        "device": f"cpu-{os.cpu_count()}core",
        "clips": args.clips,
        "clip": f"{SECONDS:g} s {SOURCE_RATE} Hz {CHANNELS}-channel FLAC -> 16 kHz mono",
        "batch_size": args.batch_size,
        "workers_or_threads": args.workers,
        "repeats": args.repeats,
        "rows": rows,
        "dali_over_dataloader": by_name["dali"] / by_name["dataloader (finelap.data.loader)"],
        "dali_over_audio_only_dataloader": by_name["dali"] / by_name["dataloader (audio only)"],
    }
    table = "\n".join([
        f"# audio input: {args.clips} x {result['clip']}, batch {args.batch_size}, "
        f"{args.workers} workers / threads, {result['device']}, median of {args.repeats} epochs",
        "",
        "| path | clips/s |",
        "|---|---|",
        *[f"| {row['path']} | {row['clips_per_s']:.1f} |" for row in rows],
        "",
        f"DALI / DataLoader path: **{result['dali_over_dataloader']:.2f}x**; "
        f"DALI / audio-only DataLoader: {result['dali_over_audio_only_dataloader']:.2f}x",
    ])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"pipeline_{result['date']}_{result['device']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
