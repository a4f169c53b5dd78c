"""`make demo`: FineLAP end to end on built-in data, no downloads.

Builds the tiny model (configs/model/tiny.yaml: random audio tower, the
bundled pretrained MiniLM text tower), saves it as a model folder, writes a
10 s test recording (a rising chirp, then two beeps), and runs the
`finelap infer` command on it: scores JSON and a frame-score heatmap PNG.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile

from finelap import infer
from finelap.config import load_config
from finelap.models import FineLAP

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000


def demo_recording(path: Path) -> Path:
    """10 s at 16 kHz: quiet noise, a 1-3 s chirp (400 -> 2000 Hz), beeps (1 kHz) at 5-5.5 s and 7-7.5 s."""
    rng = np.random.default_rng(0)
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    audio = 0.01 * rng.standard_normal(t.size)
    chirp = (t >= 1) & (t < 3)
    phase = 2 * np.pi * (400 * (t - 1) + 0.5 * 800 * (t - 1) ** 2)
    audio[chirp] += 0.3 * np.sin(phase[chirp])
    for start in (5.0, 7.0):
        beep = (t >= start) & (t < start + 0.5)
        audio[beep] += 0.3 * np.sin(2 * np.pi * 1000 * t[beep])
    soundfile.write(path, audio.astype(np.float32), SAMPLE_RATE)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--model-config", type=Path, default=REPO / "configs/model/tiny.yaml")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    print("[1/3] building the tiny FineLAP model", flush=True)
    model_dir = args.out / "model"
    FineLAP.from_config(load_config(args.model_config).model).save_pretrained(model_dir)
    print("[2/3] writing a test recording", flush=True)
    recording = demo_recording(args.out / "demo.wav")
    print("[3/3] finelap infer", flush=True)
    return infer.main([
        "--model", str(model_dir), "--audio", str(recording), "--out", str(args.out / "infer"),
        "--captions", "a rising chirp followed by two beeps", "rain on a roof",
        "--phrases", "chirp", "beep", "rain",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
