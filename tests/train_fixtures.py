"""A small training set the training tests write and read back: real WAV files,
reference-format metadata and phrase bank, a tiny random text tower, and helpers that
launch the trainer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

from finelap.launchers import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "finelap" / "train.py"
CONFIG = REPO / "configs" / "train" / "tiny_cpu.yaml"
SAMPLE_RATE = 16000
SECONDS = 2.56

# cluster -> (alternatives, tone frequency in Hz)
SOUNDS = {
    "beep": (["beep", "electronic beep"], 1000.0),
    "low hum": (["low hum", "humming"], 120.0),
    "whistle": (["whistle", "high whistle"], 3000.0),
    "buzz": (["buzz", "buzzing"], 450.0),
}


def write_training_set(folder: Path, clips: int = 16, seed: int = 0) -> dict:
    """`clips` WAVs; even clips carry timestamped phrases, odd ones only a caption."""
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    names = list(SOUNDS)
    lines = []
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    for index in range(clips):
        audio = 0.01 * rng.standard_normal(t.size)
        chosen = rng.choice(len(names), size=2, replace=False)
        phrases = []
        for cluster in chosen:
            onset = float(rng.uniform(0.0, 1.5))
            offset = float(min(onset + rng.uniform(0.3, 1.0), SECONDS))
            inside = (t >= onset) & (t < offset)
            audio[inside] += 0.3 * np.sin(2 * np.pi * SOUNDS[names[cluster]][1] * t[inside])
            phrases.append({"phrase": SOUNDS[names[cluster]][0][index % 2], "segments": [[round(onset, 4), round(offset, 4)]]})
        path = folder / "audio" / f"clip_{index:03d}.wav"
        soundfile.write(path, audio.astype(np.float32), SAMPLE_RATE)
        record = {"audio_id": f"clip_{index:03d}", "audio_path": f"audio/{path.name}",
                  "caption": f"a {names[chosen[0]]} and a {names[chosen[1]]} over noise, take {index}"}
        if index % 2 == 0:
            record["phrases"] = phrases
        lines.append(json.dumps(record))
    metadata = folder / "metadata.jsonl"
    metadata.write_text("\n".join(lines) + "\n")
    retrieval = folder / "retrieval.jsonl"
    retrieval.write_text("".join(
        json.dumps({"audio_id": json.loads(line)["audio_id"], "audio_path": json.loads(line)["audio_path"],
                    "caption": [json.loads(line)["caption"], "a tone over noise"]}) + "\n" for line in lines[:6]))
    eval_config = folder / "eval.yaml"
    eval_config.write_text(f"batch_size: 4\ntasks:\n  - name: tones\n    type: retrieval\n    metadata: {retrieval}\n")
    bank = folder / "phrase_bank.jsonl"
    bank.write_text("".join(json.dumps({"phrase": name, "alternatives": alts}) + "\n" for name, (alts, _) in SOUNDS.items()))
    return {"metadata": metadata, "bank": bank, "eval_config": eval_config,
            "text_tower": write_tiny_text_tower(folder / "text_tower")}


def write_tiny_text_tower(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the bundled MiniLM's tokenizer: the training
    tests are about the trainer, and this keeps their steps fast and their checkpoints small."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from finelap.models.text_encoder import default_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), local_files_only=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def train_command(data: dict, output_dir: Path, ranks: int, *overrides: str, extra_args: tuple = ()) -> list[str]:
    settings = [
        f"data.sources=[{{name: tones, path: {data['metadata']}}}]",
        f"data.phrase_bank={data['bank']}",
        f"train.output_dir={output_dir}",
        f"model.text.path={data['text_tower']}",
        *overrides,
    ]
    # one --set with every pair, as a user types it (tests/test_cli.py checks the repeated form too)
    arguments = ["--config", str(CONFIG), "--set", *settings] + list(extra_args)
    if ranks == 1:
        return [sys.executable, str(TRAIN_SCRIPT)] + arguments
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(TRAIN_SCRIPT)] + arguments


def environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    return env


def run_training(data: dict, output_dir: Path, ranks: int, *overrides: str, extra_args: tuple = (), timeout: int = 300):
    """Run the trainer to completion; fail with its output when it fails."""
    result = subprocess.run(train_command(data, output_dir, ranks, *overrides, extra_args=extra_args), cwd=REPO,
                            env=environment(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def step_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def sample_log(output_dir: Path, rank: int) -> list[dict]:
    path = output_dir / f"samples_rank{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def spawn_ranks(worker, out_dir: Path, ranks: int, timeout: float, what: str) -> list[dict]:
    """Run worker(rank, port, out_dir) in `ranks` spawned processes (a gloo group on a free port);
    each saves its result to out_dir/rank{rank}.pt. Fails the test after `timeout` seconds."""
    import time

    import pytest
    import torch
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=ranks, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish within {timeout:.0f} s")
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(ranks)]
