"""`finelap export --checkpoint DIR --out MODEL_DIR`: a training checkpoint -> a model folder.

ZeRO-1/2/3 shards are consolidated into one fp32 state dict with DeepSpeed's own
utility (`deepspeed.utils.zero_to_fp32`); a ZeRO-0 checkpoint carries the full
module already (`module.safetensors`, written by the trainer). The result is
written with `FineLAP.save_pretrained`, loadable by `FineLAP.from_pretrained`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from finelap.checkpoint import COMPLETE_MARKER, latest_complete_tag

CONFIG_NAME = "config.yaml"  # the run's full config, written beside the checkpoint tags
ZERO0_MODULE_NAME = "module.safetensors"


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) from either a checkpoints folder (newest complete tag) or a tag folder."""
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    tag = latest_complete_tag(path)
    if tag is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint tag (each needs a {COMPLETE_MARKER} marker)")
    return path, tag


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict:
    """The full fp32 model state dict of a checkpoint tag, whatever its ZeRO stage."""
    module_file = checkpoint_dir / tag / ZERO0_MODULE_NAME
    if module_file.is_file():
        from safetensors.torch import load_file

        return load_file(module_file)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model of `checkpoint` to `out` in the from_pretrained format."""
    from finelap.config import load_config
    from finelap.models import FineLAP

    checkpoint_dir, tag = resolve_checkpoint(checkpoint)
    config_file = checkpoint_dir / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: the run's config is needed to rebuild the model")
    config = load_config(config_file)
    model = FineLAP.from_config(config.model)
    state = consolidated_state_dict(checkpoint_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint_dir / tag}: checkpoint does not match the model of {config_file}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finelap export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoints folder (newest complete tag) or one tag folder")
    parser.add_argument("--out", required=True, help="model folder to write")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
