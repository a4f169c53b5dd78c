"""Training-step benchmarks: phrase de-duplication, CPU phase breakdown, GPU step vs reference-faithful.

    python benchmarks/bench_train_step.py dedup          # tokens encoded per step, with vs without de-duplication
    python benchmarks/bench_train_step.py cpu-phases     # per-phase step time of the tiny config (train.py --profile)
    python benchmarks/bench_train_step.py gpu --out DIR  # one EAT-base step, ours vs reference-faithful (CUDA)

Tables are printed and saved (JSON + Markdown) under benchmarks/results/ (or --out).

The reference-like mix: batch 128; every annotated clip carries exactly 20 phrases (its
positives plus negatives drawn from other clusters, each a random alternative) from a bank
of a few hundred clusters; the reference encodes every caption and phrase occurrence,
padded to 30 tokens, where we encode each unique string once with dynamic padding.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

SOUNDS = [
    "dog", "cat", "bird", "siren", "engine", "rain", "wind", "thunder", "door", "knock", "bell", "alarm",
    "baby", "speech", "laughter", "applause", "music", "guitar", "piano", "drum", "violin", "car", "truck",
    "train", "plane", "helicopter", "water", "stream", "waves", "fire", "footsteps", "keyboard", "typing",
    "phone", "clock", "horn", "whistle", "cough", "sneeze", "snoring", "crowd", "cheering", "frog", "insect",
    "cow", "horse", "sheep", "chicken", "rooster", "duck", "owl", "crow", "glass", "dishes", "vacuum",
    "blender", "microwave", "toilet", "shower", "faucet",
]
MANNERS = ["barking", "ringing", "humming", "rumbling", "crackling", "chirping", "beeping", "splashing", "whirring", "tapping"]


def reference_like_bank(clusters: int = 300, seed: int = 0) -> list[list[str]]:
    """`clusters` phrase clusters of 1-3 alternatives each, e.g. ["dog barking", "barking dog", "dog"]."""
    rng = random.Random(seed)
    bank = []
    for index in range(clusters):
        sound, manner = SOUNDS[index % len(SOUNDS)], MANNERS[(index // len(SOUNDS)) % len(MANNERS)]
        names = [f"{sound} {manner}", f"{manner} {sound}", f"a {sound} {manner} loudly"]
        bank.append(names[: rng.randint(1, 3)])
    return bank


def reference_like_step(bank: list[list[str]], clips: int = 128, annotated: int = 128, phrases_per_clip: int = 20,
                        seed: int = 0) -> tuple[list[str], list[str]]:
    """(captions [clips], phrase occurrences [annotated * phrases_per_clip]) of one step."""
    rng = random.Random(seed)
    captions, phrases = [], []
    for clip in range(clips):
        events = rng.sample(range(len(bank)), rng.randint(1, 4))
        captions.append(" and ".join(rng.choice(bank[e]) for e in events) + f" in scene {clip}")
        if clip < annotated:
            negatives = rng.sample([c for c in range(len(bank)) if c not in events], phrases_per_clip - len(events))
            phrases += [rng.choice(bank[c]) for c in events + negatives]
    return captions, phrases


def padded_tokens(tokenizer, texts: list[str], max_tokens: int = 30, pad_to_max: bool = False) -> int:
    """Token positions one padded encoder call over `texts` processes."""
    if not texts:
        return 0
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]
    return len(texts) * (max_tokens if pad_to_max else max(lengths))


def bench_dedup(args) -> dict:
    from transformers import AutoTokenizer

    from finelap.models.text_encoder import default_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), local_files_only=True)
    bank = reference_like_bank(args.clusters)
    rows = []
    for annotated in (32, 128):
        ratios = []
        for seed in range(5):
            captions, phrases = reference_like_step(bank, annotated=annotated, seed=seed)
            reference = padded_tokens(tokenizer, captions + phrases, pad_to_max=True)
            ours = padded_tokens(tokenizer, list(dict.fromkeys(captions + phrases)))
            ratios.append((reference, ours, len(set(phrases)), len(phrases)))
        reference, ours = statistics.mean(r[0] for r in ratios), statistics.mean(r[1] for r in ratios)
        rows.append({
            "clips": 128, "annotated_clips": annotated, "phrase_occurrences": ratios[0][3],
            "unique_phrases_mean": statistics.mean(r[2] for r in ratios),
            "tokens_reference": reference, "tokens_dedup": ours, "reduction": reference / ours,
        })
    table = ["| clips | annotated | phrase occurrences | unique phrases | tokens (all, padded to 30) | tokens (unique, dynamic padding) | reduction |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['clips']} | {r['annotated_clips']} | {r['phrase_occurrences']} | {r['unique_phrases_mean']:.0f} | "
              f"{r['tokens_reference']:.0f} | {r['tokens_dedup']:.0f} | {r['reduction']:.1f}x |" for r in rows]
    return {"benchmark": "text tokens encoded per step", "bank_clusters": args.clusters, "rows": rows, "table": table}


def bench_cpu_phases(args) -> dict:
    """Run the real trainer with --profile on a small synthetic set; read its breakdown."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "finelap.cli", "synth", "--builtin-bank", str(tmp / "bank"),
                        "--out", str(tmp / "set"), "--num-mixtures", "32", "--duration", "2.56", "--workers", "1"],
                       check=True, cwd=REPO)
        run_dir = tmp / "run"
        overrides = [f"data.sources=[{{name: synth, path: {tmp / 'set' / 'metadata.jsonl'}}}]",
                     f"data.phrase_bank={tmp / 'set' / 'phrase_bank.jsonl'}", f"train.output_dir={run_dir}",
                     "train.save_every=1000", "data.batch_size=8"]
        command = [sys.executable, str(REPO / "finelap" / "train.py"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
                   "--profile", "--profile-steps", "3"] + [item for o in overrides for item in ("--set", o)]
        subprocess.run(["deepspeed", "--num_gpus", "1"] + command[1:] if args.deepspeed else command, check=True, cwd=REPO)
        report = json.loads((run_dir / "profile" / "breakdown.json").read_text())
        report.pop("trace_dir")  # a temporary folder, gone with it
    phases = report["phases_seconds_per_step"]
    table = ["| phase | ms / step | share of step |", "|---|---|---|"]
    table += [f"| {name + (' (part of forward)' if name.endswith('_encode') else '')} | {seconds * 1e3:.1f} | "
              f"{seconds / report['seconds_per_step']:.1%} |" for name, seconds in phases.items()]
    table.append(f"| **step** | {report['seconds_per_step'] * 1e3:.1f} | {report['samples_per_s_per_device']:.1f} clips/s |")
    load = os.getloadavg()[0]
    table.append(f"\n1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores (above the core count: shared).")
    return {"benchmark": "tiny config training step, CPU, per phase", "report": report, "table": table,
            "load_average": load}


def bench_gpu(args) -> dict:
    """One training step (forward, loss, backward, AdamW) of EAT-base + a 6-layer text tower at batch 128, bf16.

    ours: batched fbank on the GPU, SDPA attention, unique texts encoded once, triton loss.
    reference-faithful: per-clip torchaudio fbank on the CPU, explicit attention (audio and text),
    every caption/phrase occurrence encoded (padded to 30 tokens), materialised `reference` loss.
    """
    import torchaudio

    from finelap.audio.fbank import compute_features, normalize_fbank, pad_or_crop_frames
    from finelap.config import load_config
    from finelap.kernels import clip_sigmoid_loss, frame_sigmoid_loss
    from finelap.models import FineLAP

    device = torch.device(args.device)
    config = load_config(REPO / "configs/model/eat_base.yaml").model
    model = FineLAP(config, text_folder=args.text_folder, load_text_weights=False).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    bank = reference_like_bank(args.clusters)
    captions, phrase_occurrences = reference_like_step(bank, clips=args.batch, annotated=args.annotated)
    clusters = {name: c for c, names in enumerate(bank) for name in names}
    generator = torch.Generator().manual_seed(0)
    batch, seconds = args.batch, 10.0
    waveforms = torch.randn(batch, int(seconds * 16000), generator=generator) * 0.1
    lengths = torch.full((batch,), waveforms.shape[1], dtype=torch.int64)
    frames_per_clip = config.audio.target_frames // config.audio.patch_size
    groups = torch.arange(batch, device=device)

    def frame_labels(phrases: list[str]):
        """Random 0-3 active clusters per frame of each annotated clip, drawn from its own phrases."""
        cluster = torch.tensor([clusters[p] for p in phrases], device=device)
        rows = args.annotated * frames_per_clip
        active = torch.full((rows, 4), -1, dtype=torch.int64, device=device)
        own = torch.randint(0, len(phrases), (rows, 2), generator=generator).to(device)
        active[:, :2] = cluster[own]
        return cluster, active

    def step(ours: bool) -> None:
        for module in model.audio_encoder.modules():
            if hasattr(module, "attention_impl"):
                module.attention_impl = "sdpa" if ours else "explicit"
        model.text_encoder.model.config._attn_implementation = "sdpa" if ours else "eager"
        if ours:
            features, frame_counts = compute_features(waveforms.to(device, non_blocking=True), lengths.to(device), config.audio)
            phrases = list(dict.fromkeys(phrase_occurrences))
        else:
            per_clip = [torchaudio.compliance.kaldi.fbank(
                (w - w.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25) for w in waveforms]
            counts = torch.tensor([f.shape[0] for f in per_clip])
            padded = torch.nn.utils.rnn.pad_sequence(per_clip, batch_first=True)
            features, frame_counts = pad_or_crop_frames(padded, counts, config.audio.target_frames)
            features, frame_counts = normalize_fbank(features).to(device), frame_counts.to(device)
            phrases = phrase_occurrences
        with torch.autocast(device.type, dtype=torch.bfloat16):
            clip, frames, frame_mask = model.encode_audio(features, frame_counts)
            if ours:
                text = model.encode_text(captions + phrases)
            else:
                # every occurrence through the encoder, padded to max_tokens as the reference does
                tokenizer = model.text_encoder.tokenizer
                tokens = tokenizer(captions + phrases, padding="max_length", truncation=True,
                                   max_length=config.text.max_tokens, return_tensors="pt").to(device)
                hidden = model.text_encoder.model(**tokens).last_hidden_state[:, 0]
                text = model.text_projector(hidden)
            clip_scale, clip_bias, frame_scale, frame_bias = model.logit_parameters()
        caption_emb, phrase_emb = text[: len(captions)], text[len(captions):]
        cluster, active = frame_labels(phrases)
        rows = frames[: args.annotated].reshape(-1, frames.shape[-1])
        backend = (args.loss_backend or "triton") if ours else "reference"
        loss = clip_sigmoid_loss(clip, caption_emb, groups, groups, clip_scale, clip_bias, backend=backend)
        loss = loss + frame_sigmoid_loss(rows, phrase_emb, cluster, active, frame_scale, frame_bias, backend=backend)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, ours in (("ours", True), ("reference_faithful", False)):
        for _ in range(args.warmup):
            step(ours)
        synchronize()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(ours)
            synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results[name] = {"median_step_s": median, "clips_per_s": batch / median, "times_s": times,
                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
    speedup = results["ours"]["clips_per_s"] / results["reference_faithful"]["clips_per_s"]
    table = ["| configuration | step (s, median) | clips/s | peak GPU memory (GiB) |", "|---|---|---|---|"]
    table += [f"| {name} | {r['median_step_s']:.3f} | {r['clips_per_s']:.1f} | {r['peak_memory_gib'] or 0:.1f} |"
              for name, r in results.items()]
    table.append(f"| speed-up | | {speedup:.2f}x | |")
    return {"benchmark": f"EAT-base training step, batch {batch}, bf16 autocast",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu-2core",
            "annotated_clips": args.annotated, "results": results, "speedup": speedup, "table": table}


def save(result: dict, name: str, out: Path) -> None:
    device = result.get("device") or "cpu-2core"
    stem = f"{name}_{datetime.date.today().isoformat()}_{device.replace(' ', '-')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(f"# {result['benchmark']}\n\n" + "\n".join(result["table"]) + "\n")
    print("\n".join(result["table"]))
    print(f"saved {out / stem}.json and .md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["dedup", "cpu-phases", "gpu"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--clusters", type=int, default=300, help="phrase-bank clusters of the reference-like mix")
    parser.add_argument("--annotated", type=int, default=32, help="GPU: annotated clips of the 128 (frame rows = 64 each)")
    parser.add_argument("--text-folder", type=Path, help="GPU: a text encoder folder (config.json + tokenizer)")
    parser.add_argument("--device", default="cuda", help="gpu part: the device (cpu only for a smoke run)")
    parser.add_argument("--batch", type=int, default=128, help="gpu part: clips per step")
    parser.add_argument("--loss-backend", help="gpu part: our loss backend (default triton)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deepspeed", action="store_true", help="cpu-phases: launch through the deepspeed launcher")
    args = parser.parse_args()
    if args.part == "dedup":
        save(bench_dedup(args), "train_step_dedup", args.out)
    elif args.part == "cpu-phases":
        save(bench_cpu_phases(args), "train_step_phases", args.out)
    else:
        save(bench_gpu(args), "train_step_gpu", args.out)


if __name__ == "__main__":
    main()
