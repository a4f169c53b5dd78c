"""`finelap convert`: weights trained elsewhere -> FineLAP's formats.

    finelap convert eat SRC --out DIR
        EAT's audio encoder (a fairseq checkpoint, pretrained or fine-tuned, or a folder of its
        Hugging Face port) -> DIR/config.yaml (the `model.audio` section) and
        DIR/audio_encoder.safetensors, which load_eat_audio_encoder and `model.audio.init_from` read
    finelap convert reference SRC.pt --text-encoder TEXT_DIR --out MODEL_DIR
        a reference FineLAP checkpoint (EAT audio tower) -> a model folder for
        FineLAP.from_pretrained, `finelap infer` and `finelap eval`

Checkpoints are read without running code from them. The output is written to a temporary
folder beside the target and renamed at the end, so a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


def write_folder_atomically(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` on a new temporary folder beside `out`, then rename it to `out`.

    `out` must not exist yet; on any error the temporary folder is removed.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        write(staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def convert_eat(source: str | Path, out: str | Path) -> Path:
    """Write EAT's audio encoder from `source` (any layout load_eat_audio_encoder reads) as a folder at `out`."""
    from finelap.models.eat_weights import read_pretrained_audio_encoder, save_audio_encoder_folder

    config, weights = read_pretrained_audio_encoder(source)
    return write_folder_atomically(out, lambda folder: save_audio_encoder_folder(config, weights, folder))


def convert_reference(source: str | Path, text_folder: str | Path, out: str | Path) -> Path:
    """Write the reference FineLAP checkpoint `source` as a model folder at `out`."""
    from finelap.models.reference_weights import convert_reference_checkpoint

    model = convert_reference_checkpoint(source, text_folder)
    return write_folder_atomically(out, model.save_pretrained)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finelap convert", description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    eat = kinds.add_parser("eat", help="EAT's audio encoder -> a folder for model.audio.init_from")
    eat.add_argument("source", help="EAT checkpoint (.pt) or a folder of its Hugging Face port")
    eat.add_argument("--out", required=True, help="folder to write (must not exist)")
    reference = kinds.add_parser("reference", help="a reference FineLAP checkpoint -> a model folder")
    reference.add_argument("source", help="reference FineLAP checkpoint (.pt)")
    reference.add_argument("--text-encoder", required=True,
                           help="Hugging Face folder of its text tower (config.json and tokenizer files)")
    reference.add_argument("--out", required=True, help="model folder to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.kind == "eat":
            out = convert_eat(args.source, args.out)
        else:
            out = convert_reference(args.source, args.text_encoder, args.out)
    except (ValueError, OSError) as error:  # CheckpointError, ConfigError, a bad text folder, an existing --out
        print(f"finelap convert: error: {error}", file=sys.stderr)
        return 1
    print(f"converted {args.source} -> {out}")
    return 0
