"""Batched Kaldi fbank on CUDA: correctness against torchaudio per clip on CPU, and clips/s.

    PYTHONPATH=. python benchmarks/gpu_fbank.py [--out DIR] [--device cuda]

Needs only torch and torchaudio (no soundfile, no DALI). Exit status 1 when a check fails.
Correctness: clips of many lengths at 8, 16 and 22.05 kHz (tones + noise + DC offset, like
audio), features on the device vs torchaudio.compliance.kaldi.fbank per clip on CPU in
float32 (the reference) and float64 (the exact value). Criterion: max abs difference to the
float32 reference <= 1e-3 in the log domain; where it is above, every such entry must be
one where float32 torchaudio itself is that far from the exact value (an ill-conditioned,
near-empty mel bin), i.e. |ours - exact| <= |reference - exact| + 1e-3.
Also checks that TF32 matmul precision and bf16 autocast set by a training script leave
the features unchanged. Speed: 128 clips x 10 s at 16 kHz, median of repeats, vs torchaudio
per clip on the CPU. Results are printed and saved (JSON + Markdown).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import torchaudio

from finelap.audio.fbank import kaldi_fbank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fbank import median_seconds  # noqa: E402  (a sibling script, not a package)

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-3


def reference_fbank(clip: torch.Tensor, sample_rate: int) -> torch.Tensor:
    clip = clip - clip.mean()
    return torchaudio.compliance.kaldi.fbank(
        clip[None], htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25,
    )


def audio_like(batch: int, num_samples: int, sample_rate: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    time_axis = torch.arange(num_samples) / sample_rate
    frequencies = torch.rand(batch, 3, 1, generator=generator) * (sample_rate / 2 - 100) + 50
    tones = 0.2 * torch.sin(2 * math.pi * frequencies * time_axis).sum(dim=1)
    return tones + 0.05 * torch.randn(batch, num_samples, generator=generator) + 0.01


def check_correctness(device: torch.device) -> dict:
    report = {}
    for sample_rate in (8000, 16000, 22050):
        window = int(sample_rate * 0.025)
        generator = torch.Generator().manual_seed(sample_rate)
        lengths = [window, window + 1, 3 * sample_rate + 17, 10 * sample_rate]
        lengths += torch.randint(window, 10 * sample_rate, (12,), generator=generator).tolist()
        waveforms = audio_like(len(lengths), max(lengths), sample_rate, seed=sample_rate)
        features, frame_counts = kaldi_fbank(waveforms.to(device), torch.tensor(lengths, device=device), sample_rate)
        features, frame_counts = features.cpu(), frame_counts.cpu()
        worst_reference = worst_exact_excess = 0.0
        entries_above = 0
        for row, length in enumerate(lengths):
            reference = reference_fbank(waveforms[row, :length], sample_rate)
            exact = reference_fbank(waveforms[row, :length].double(), sample_rate)
            assert frame_counts[row] == reference.shape[0], (sample_rate, length)
            ours = features[row, : frame_counts[row]]
            difference = (ours - reference).abs()
            worst_reference = max(worst_reference, float(difference.max()))
            entries_above += int((difference > TOLERANCE).sum())
            excess = (ours.double() - exact).abs() - (reference.double() - exact).abs()
            worst_exact_excess = max(worst_exact_excess, float(excess.max()))
            assert torch.all(features[row, frame_counts[row] :] == 0)
        report[sample_rate] = {
            "clips": len(lengths),
            "max_abs_diff_vs_torchaudio_fp32": worst_reference,
            "entries_above_tolerance": entries_above,
            "max_excess_error_vs_exact": worst_exact_excess,
            "passed": worst_reference <= TOLERANCE or worst_exact_excess <= TOLERANCE,
        }
    return report


def check_precision_guard(device: torch.device) -> bool:
    waveforms = audio_like(4, 48000, 16000, seed=1).to(device)
    expected, _ = kaldi_fbank(waveforms)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features, _ = kaldi_fbank(waveforms)
        restored = torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    return restored and features.dtype == torch.float32 and torch.equal(features, expected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--reference-clips", type=int, default=32, help="clips for the torchaudio CPU timing")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1

    correctness = check_correctness(device)
    guard = check_precision_guard(device)
    batch = audio_like(args.clips, 160000, 16000, seed=2).to(device)
    device_rate = args.clips / median_seconds(lambda: kaldi_fbank(batch), args.repeats, device)[0]
    cpu_batch = batch[: args.reference_clips].cpu()
    reference_rate = args.reference_clips / median_seconds(
        lambda: [reference_fbank(clip, 16000) for clip in cpu_batch], 1, torch.device("cpu"))[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "date": datetime.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "correctness": {str(rate): entry for rate, entry in correctness.items()},
        "precision_guard_passed": guard,
        "batched_clips_per_s": device_rate,
        "torchaudio_cpu_per_clip_clips_per_s": reference_rate,
        "speedup": device_rate / reference_rate,
        "clips": args.clips,
    }
    passed = guard and all(entry["passed"] for entry in correctness.values())
    lines = [
        f"# kaldi_fbank on {name} (torch {torch.__version__})",
        "",
        "| sample rate | clips | max abs diff vs torchaudio fp32 | entries > 1e-3 | max excess error vs exact "
        "| passed |",
        "|---|---|---|---|---|---|",
        *[
            f"| {rate} | {entry['clips']} | {entry['max_abs_diff_vs_torchaudio_fp32']:.2e} | "
            f"{entry['entries_above_tolerance']} | {entry['max_excess_error_vs_exact']:.2e} | {entry['passed']} |"
            for rate, entry in correctness.items()
        ],
        "",
        f"TF32 / bf16-autocast guard: {'passed' if guard else 'FAILED'}",
        "",
        f"speed, {args.clips} clips x 10 s at 16 kHz: batched on {name} {device_rate:.0f} clips/s; "
        f"torchaudio per clip on CPU {reference_rate:.1f} clips/s; ratio {result['speedup']:.0f}x",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_fbank_{result['date']}_{name.lower().replace(' ', '-')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
