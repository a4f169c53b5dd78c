"""`finelap export`: a training checkpoint, or a training config's untrained model -> a model folder.

    finelap export --checkpoint DIR --out MODEL_DIR
    finelap export --untrained --config CONFIG [--set KEY=VALUE ...] --out MODEL_DIR

`--untrained` writes the weights a training run of CONFIG starts from
(`finelap.models.build_model` with its train.seed): the baseline to compare a trained model with.

ZeRO-1/2/3 shards are consolidated into one fp32 state dict with DeepSpeed's own
utility (`deepspeed.utils.zero_to_fp32`); a ZeRO-0 checkpoint carries the full
module already (`module.safetensors`, written by the trainer). The result is
written with `FineLAP.save_pretrained`, loadable by `FineLAP.from_pretrained`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from finelap.checkpoint import COMPLETE_MARKER, CONFIG_NAME, ZERO0_MODULE_NAME, latest_complete_tag
from finelap.config import add_set_argument, load_config
from finelap.models import FineLAP, build_model


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
    checkpoint_dir, tag = resolve_checkpoint(checkpoint)
    config_file = checkpoint_dir / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: the run's config is needed to rebuild the model")
    config = load_config(config_file)
    model = FineLAP(config.model)  # every weight comes from the checkpoint
    state = consolidated_state_dict(checkpoint_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint_dir / tag}: checkpoint does not match the model of {config_file}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.save_pretrained(out)
    return Path(out)


def export_untrained(config_path: str | Path, out: str | Path, overrides: list[str] = ()) -> Path:
    """Write the untrained baseline of a training config (with `--set` overrides) to `out`."""
    config = load_config(config_path, overrides)
    build_model(config.model, config.train.seed).save_pretrained(out)
    return Path(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finelap export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="checkpoints folder (newest complete tag) or one tag folder")
    parser.add_argument("--untrained", action="store_true", help="write the initial weights of a training --config")
    parser.add_argument("--config", help="with --untrained: the training config (YAML)")
    add_set_argument(parser, help="with --untrained: override config keys, as the trainer's --set")
    parser.add_argument("--out", required=True, help="model folder to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.untrained == bool(args.checkpoint):
        parser.error("give either --checkpoint or --untrained --config CONFIG")
    if args.untrained:
        if not args.config:
            parser.error("--untrained needs --config (the training config)")
        out = export_untrained(args.config, args.out, args.set)
        print(f"exported the untrained model of {args.config} -> {out}")
        return 0
    if args.config or args.set:
        parser.error("--config and --set go with --untrained (a checkpoint carries its run's config)")
    out = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
