"""Batched Kaldi fbank vs torchaudio.compliance.kaldi.fbank clip by clip.

    python benchmarks/bench_fbank.py [--clips 64] [--seconds 10] [--repeats 5] [--device cpu|cuda]

Both sides compute the reference model's features (clip mean removed, 128 mel bins,
25 ms / 10 ms) of `clips` random clips at 16 kHz. Each side runs `repeats` times after a
warm-up; the median time gives clips/s. The table is printed and saved (JSON + Markdown)
under benchmarks/results/ (or --out). Goal: batched >= 3x per-clip on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torchaudio

from finelap.audio.fbank import kaldi_fbank

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def per_clip_fbank(waveforms: torch.Tensor, sample_rate: int) -> list[torch.Tensor]:
    """The reference model's extraction, one torchaudio call per clip."""
    features = []
    for clip in waveforms:
        clip = clip - clip.mean()
        features.append(
            torchaudio.compliance.kaldi.fbank(
                clip[None], htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25,
            )
        )
    return features


def median_seconds(run, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    run()  # warm-up: caches, FFT plans, CUDA context
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    waveforms = (0.1 * torch.randn(args.clips, int(args.seconds * args.sample_rate), generator=generator)).to(device)

    batched_s, batched_times = median_seconds(lambda: kaldi_fbank(waveforms, sample_rate=args.sample_rate),
                                              args.repeats, device)
    per_clip_s, per_clip_times = median_seconds(lambda: per_clip_fbank(waveforms, args.sample_rate),
                                                args.repeats, device)
    batched, _ = kaldi_fbank(waveforms, sample_rate=args.sample_rate)
    max_abs_diff = max(float((b - r).abs().max()) for b, r in zip(batched, per_clip_fbank(waveforms, args.sample_rate)))

    result = {
        "date": datetime.date.today().isoformat(),
        "device": device_slug(device),
        "torch_threads": torch.get_num_threads(),
        "clips": args.clips,
        "seconds_per_clip": args.seconds,
        "sample_rate": args.sample_rate,
        "repeats": args.repeats,
        "batched_clips_per_s": args.clips / batched_s,
        "per_clip_clips_per_s": args.clips / per_clip_s,
        "speedup": per_clip_s / batched_s,
        "batched_times_s": batched_times,
        "per_clip_times_s": per_clip_times,
        "max_abs_diff_log_mel": max_abs_diff,
    }
    rows = [
        ("batched kaldi_fbank", f"{result['batched_clips_per_s']:.1f}", f"{batched_s * 1000:.0f}"),
        ("torchaudio per clip", f"{result['per_clip_clips_per_s']:.1f}", f"{per_clip_s * 1000:.0f}"),
    ]
    table = "\n".join(
        [
            f"# fbank: {args.clips} clips x {args.seconds:g} s at {args.sample_rate} Hz, {result['device']} "
            f"({result['torch_threads']} torch threads), median of {args.repeats}",
            "",
            "| implementation | clips/s | ms per batch |",
            "|---|---|---|",
            *[f"| {name} | {rate} | {ms} |" for name, rate, ms in rows],
            "",
            f"speed-up batched / per clip: **{result['speedup']:.2f}x**; "
            f"max abs difference (log mel): {max_abs_diff:.2e}",
        ]
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"fbank_{result['date']}_{result['device']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
