"""EAT's pretrained audio encoder in FineLAP's AudioEncoder, and the folder `finelap convert eat` writes.

`load_eat_audio_encoder(source)` builds EAT's encoder with its weights; `init_audio_encoder` loads
them into a model's audio tower (`model.audio.init_from`).

EAT (data2vec 2.0's image encoder over a [target_length x 128] log-mel image) comes in three layouts:

  fairseq checkpoint (`ckpt["model"]`; keys prefixed `model.` when fine-tuned,
  `audio_encoder.audio_enc.model.` inside a reference FineLAP checkpoint):
    modality_encoders.IMAGE.local_encoder.proj     patch Conv2d            -> patch_embed
    modality_encoders.IMAGE.extra_tokens           [1, 1, W] CLS token     -> cls_token
    modality_encoders.IMAGE.fixed_positional_encoder.positions  [1, >= T*Fq, W] -> pos_embed (kept whole)
    modality_encoders.IMAGE.context_encoder.norm   LayerNorm over tokens   -> embedding_norm (post-norm models)
    blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}        -> blocks.N.(same; mlp.fc1/2 -> mlp.0/3)
    norm                                           final LayerNorm         -> norm (pre-norm models only)
  Hugging Face port (a folder: config.json, model.safetensors or pytorch_model.bin), keys under `model.`:
    local_encoder.proj, extra_tokens, fixed_positional_encoder.positions, pre_norm (the embedding
    LayerNorm), blocks.N... as above
  converted folder (`finelap convert eat`): config.yaml (the `model.audio` section) and
    audio_encoder.safetensors (an AudioEncoder state dict, float32)

The decoder, the EMA teacher (`_ema`), the AudioSet classifier (`fc_norm`, `head`) and the other
pretraining parts are left out; any other key is an error. The architecture is the recorded one
(fairseq: `cfg["model"]`, or `cfg["model"]["pretrained_model_args"]["model"]` when fine-tuned; the
port: config.json), else what the shapes show with EAT's defaults (64-wide heads, eps 1e-6, post-norm).
The input length is the recorded target_length, else EAT's published 1024 frames: never the position
table's length, which is EAT's max_length (768 time columns, about 2 minutes of audio).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import yaml

from finelap.config import AudioEncoderConfig, load_config
from finelap.models.audio_encoder import AudioEncoder, sincos_position_embedding_2d
from finelap.models.checkpoint_files import (
    CheckpointError, check_state_dict, load_safetensors, load_torch_checkpoint,
)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "audio_encoder.safetensors"
PORT_CONFIG_FILE = "config.json"
PORT_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes, newest first
PORT_PREFIX = "model."
EAT_MEL_BINS = 128  # fairseq's EAT builds its image as target_length x 128 mel bins
EAT_TARGET_FRAMES = 1024  # EAT's preprocessing pads or crops every clip to 1024 fbank frames (10.24 s)
EAT_HEAD_WIDTH = 64  # width per attention head when the checkpoint does not record the head count
EAT_NORM_EPS = 1e-6
POST_NORM = dict(block_norm="post", embedding_norm=True, final_norm=False)  # layer_norm_first: false (EAT)
PRE_NORM = dict(block_norm="pre", embedding_norm=False, final_norm=True)  # layer_norm_first: true
# Config fields that do not change what the weights compute (target_frames: a stored position table
# covers any input length up to its own; hold_stored_positions checks that).
NOT_ARCHITECTURE = ("max_seconds", "target_frames", "dropout", "init_from")
POSITION_TOLERANCE = 1e-4  # EAT's table is numpy float32 sin/cos; ours float64 rounded to float32

_IMAGE = "modality_encoders.IMAGE."
_FAIRSEQ_NAMES = {  # fairseq name -> AudioEncoder name, besides the blocks
    _IMAGE + "local_encoder.proj.weight": "patch_embed.weight",
    _IMAGE + "local_encoder.proj.bias": "patch_embed.bias",
    _IMAGE + "extra_tokens": "cls_token",
    _IMAGE + "fixed_positional_encoder.positions": "pos_embed",
    _IMAGE + "context_encoder.norm.weight": "embedding_norm.weight",
    _IMAGE + "context_encoder.norm.bias": "embedding_norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_PORT_NAMES = {name.replace(_IMAGE, "").replace("context_encoder.norm", "pre_norm"): ours
               for name, ours in _FAIRSEQ_NAMES.items()}
# Parts of EAT's checkpoints that are not the encoder (prefix-relative name starts).
DROPPED = ("_ema", _IMAGE + "decoder.", "shared_decoder.", "recon_proj.", "cls_proj.", "center", "fc_norm.", "head.")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_MLP = {"mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}


@dataclass
class _AudioSection:
    audio: AudioEncoderConfig


@dataclass
class _ConvertedConfigFile:
    """config.yaml of a converted folder: only `model.audio`, so a training config can include it."""

    model: _AudioSection


def find_eat_prefix(state: dict) -> str | None:
    """The key prefix under which `state` holds a fairseq EAT encoder ("", "model.", ...), or None."""
    for key in state:
        if key.endswith(_IMAGE + "local_encoder.proj.weight"):
            return key[: -len(_IMAGE + "local_encoder.proj.weight")]
    return None


def check_only_dropped(keys: list[str], source: str, prefix: str = "") -> None:
    """Raise CheckpointError listing the `keys` that are not, after `prefix`, one of EAT's DROPPED parts."""
    unexpected = [key for key in keys if not key[len(prefix):].startswith(DROPPED)]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {', '.join(unexpected)}")


def eat_audio_weights(state: dict, prefix: str, source: str, recorded: dict | None = None,
                      port: bool = False) -> tuple[AudioEncoderConfig, dict[str, torch.Tensor]]:
    """The EAT encoder under `prefix` in `state` (fairseq names, or the port's if `port`) ->
    (its AudioEncoderConfig, AudioEncoder state dict), checked: every key there is read or one of
    DROPPED, and names and shapes match the architecture.

    `recorded`: the recorded architecture (fairseq model config or the port's config.json), if any.
    """
    names = _PORT_NAMES if port else _FAIRSEQ_NAMES
    recorded = recorded or {}
    weights, skipped, read_from = {}, [], {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        block = _BLOCK_KEY.fullmatch(name)
        if name in names:
            ours = names[name]
        elif block:
            index, part, kind = block.groups()
            ours = f"blocks.{index}.{_MLP.get(part, part)}.{kind}"
        else:
            skipped.append(key)
            continue
        weights[ours], read_from[ours] = value, key
    check_only_dropped(skipped, source, prefix)
    for needed in ("patch_embed.weight", "pos_embed"):
        if needed not in weights:
            raise CheckpointError(f"{source}: missing {prefix}{_source_name(needed, names)}")
    config = _architecture(weights, recorded, source)
    weights["pos_embed"] = weights["pos_embed"].reshape(-1, weights["pos_embed"].shape[-1])  # [1, rows, W] -> [rows, W]
    with torch.device("meta"):  # names and shapes only
        encoder = AudioEncoder(config)
    hold_stored_positions(encoder, weights, source, read_from["pos_embed"])
    read_from |= {name: prefix + _source_name(name, names) for name in encoder.state_dict() if name not in weights}
    weights = {name: tensor.float().contiguous() for name, tensor in weights.items()}
    check_state_dict(encoder, weights, source, read_from)
    _check_positions(weights["pos_embed"], config, source)
    return config, weights


def _architecture(weights: dict, recorded: dict, source: str) -> AudioEncoderConfig:
    """The recorded architecture, completed from the shapes and EAT's defaults."""
    width, _, patch, _ = weights["patch_embed.weight"].shape
    width = int(recorded.get("embed_dim") or width)
    patch = int(recorded.get("patch_size") or patch)
    mel_bins = int(recorded.get("mel_bins") or EAT_MEL_BINS)
    target_frames = int(recorded.get("target_length") or EAT_TARGET_FRAMES)
    depth = recorded.get("depth") or len({name.split(".")[1] for name in weights if name.startswith("blocks.")})
    heads = recorded.get("num_heads")
    if not heads and width % EAT_HEAD_WIDTH:
        raise CheckpointError(f"{source}: the checkpoint does not record the number of attention heads and the "
                              f"width {width} is not a multiple of EAT's {EAT_HEAD_WIDTH}-wide heads")
    first_mlp = weights.get("blocks.0.mlp.0.weight")
    mlp_ratio = recorded.get("mlp_ratio") or (first_mlp.shape[0] / width if first_mlp is not None else 4.0)
    pre_norm = recorded.get("layer_norm_first")
    if pre_norm is None:  # data2vec's pre-norm models have a final norm and no embedding norm
        pre_norm = "norm.weight" in weights and "embedding_norm.weight" not in weights
    return AudioEncoderConfig(
        num_mel_bins=mel_bins, target_frames=target_frames, patch_size=patch, width=width, depth=int(depth),
        heads=int(heads or width // EAT_HEAD_WIDTH), mlp_ratio=float(mlp_ratio),
        norm_eps=float(recorded.get("norm_eps") or EAT_NORM_EPS), position_layout="freq_first",
        stored_positions=True, **(PRE_NORM if pre_norm else POST_NORM),
    )


def _source_name(name: str, names: dict[str, str]) -> str:
    """AudioEncoder state-dict name -> the name it is read from (inverse of the renaming)."""
    for theirs, ours in names.items():
        if ours == name:
            return theirs
    for theirs, ours in _MLP.items():
        name = name.replace(f".{ours}.", f".{theirs}.")
    return name


def hold_stored_positions(encoder: AudioEncoder, weights: dict[str, torch.Tensor], source: str,
                          table_name: str = "pos_embed") -> None:
    """Size `encoder`'s stored position table to `weights["pos_embed"]` ([rows, W], kept whole), so that
    the state dicts match; CheckpointError naming `source` and `table_name` when it has too few rows for
    the encoder's target_frames."""
    table = weights.get("pos_embed")
    if not encoder.config.stored_positions or table is None or table.dim() != 2:
        return  # nothing to hold; check_state_dict reports a missing or misshapen table
    try:
        encoder.hold_position_table(table.shape[0])
    except ValueError as error:
        raise CheckpointError(f"{source}: {table_name}: {error}") from None


def _check_positions(table: torch.Tensor, config: AudioEncoderConfig, source: str) -> None:
    """The stored [rows, W] table must be the sin-cos table of the layout the config names (catches a
    layout mix-up), all of it."""
    freq_patches = config.num_mel_bins // config.patch_size
    time_patches = -(-table.shape[0] // freq_patches)
    expected = sincos_position_embedding_2d(config.width, time_patches, freq_patches,
                                            config.position_layout)[: table.shape[0]]
    error = (table.float() - expected).abs().max().item()
    if error > POSITION_TOLERANCE:
        raise CheckpointError(
            f"{source}: the fixed position table differs from the {config.position_layout} sin-cos layout "
            f"by up to {error:.3g}"
        )


def _fairseq_architecture(cfg) -> dict:
    """fairseq's saved cfg -> the recorded architecture (the pretrained model's, for a fine-tuned one)."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        return {}
    pretrained = model.get("pretrained_model_args")
    if isinstance(pretrained, dict) and isinstance(pretrained.get("model"), dict):
        model = pretrained["model"]
    image = (model.get("modalities") or {}).get("image") or {}
    recorded = {key: model.get(key) for key in ("embed_dim", "depth", "num_heads", "norm_eps", "layer_norm_first",
                                                "mlp_ratio")}
    recorded |= {key: image.get(key) for key in ("patch_size", "target_length")}
    return {key: value for key, value in recorded.items() if value is not None}


def read_eat_checkpoint(path: str | Path) -> tuple[AudioEncoderConfig, dict[str, torch.Tensor]]:
    """A fairseq EAT checkpoint (pretraining or fine-tuned) -> (AudioEncoderConfig, AudioEncoder state dict)."""
    checkpoint = load_torch_checkpoint(path)
    state = checkpoint.get("model", checkpoint)
    prefix = find_eat_prefix(state) if isinstance(state, dict) else None
    if prefix is None:
        raise CheckpointError(f"{path}: no EAT encoder found (no key ending in {_IMAGE}local_encoder.proj.weight)")
    check_only_dropped([key for key in state if not key.startswith(prefix)], str(path))  # fc_norm, head
    return eat_audio_weights(state, prefix, str(path), _fairseq_architecture(checkpoint.get("cfg")))


def read_port_folder(directory: Path) -> tuple[AudioEncoderConfig, dict[str, torch.Tensor]]:
    """A folder of EAT's Hugging Face port -> (AudioEncoderConfig, AudioEncoder state dict)."""
    weights_path = next((directory / name for name in PORT_WEIGHTS_FILES if (directory / name).is_file()), None)
    if weights_path is None:
        raise CheckpointError(f"{directory}: no {' or '.join(PORT_WEIGHTS_FILES)} beside {PORT_CONFIG_FILE}")
    try:
        port_config = json.loads((directory / PORT_CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory / PORT_CONFIG_FILE}: not readable JSON: {error}") from None
    recorded = {key: port_config.get(key) for key in ("embed_dim", "depth", "num_heads", "norm_eps",
                                                      "layer_norm_first", "mlp_ratio", "patch_size")}
    recorded["mel_bins"] = port_config.get("mel_bins")
    recorded["target_length"] = (port_config.get("img_size") or [None])[0]
    if weights_path.suffix == ".safetensors":
        state = load_safetensors(weights_path)
    else:
        state = load_torch_checkpoint(weights_path)
    check_only_dropped([key for key in state if not key.startswith(PORT_PREFIX)], str(weights_path))
    recorded = {key: value for key, value in recorded.items() if value is not None}
    return eat_audio_weights(state, PORT_PREFIX, str(weights_path), recorded, port=True)


def save_audio_encoder_folder(config: AudioEncoderConfig, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """Write config.yaml and audio_encoder.safetensors into `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    record = dataclasses.asdict(dataclasses.replace(config, init_from=None))
    (directory / CONFIG_FILE).write_text(yaml.safe_dump({"model": {"audio": record}}, sort_keys=False))
    safetensors.torch.save_file(weights, str(directory / WEIGHTS_FILE))


def read_audio_encoder_folder(directory: Path) -> tuple[AudioEncoderConfig, dict[str, torch.Tensor]]:
    """A folder written by `save_audio_encoder_folder` -> (AudioEncoderConfig, AudioEncoder state dict)."""
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory / CONFIG_FILE}: missing (a converted audio encoder folder holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}, as `finelap convert eat` writes them)")
    config = load_config(directory / CONFIG_FILE, section=_ConvertedConfigFile).model.audio
    weights = load_safetensors(directory / WEIGHTS_FILE)
    with torch.device("meta"):
        encoder = AudioEncoder(config)
    hold_stored_positions(encoder, weights, str(directory / WEIGHTS_FILE))
    check_state_dict(encoder, weights, str(directory / WEIGHTS_FILE))
    return config, weights


def read_pretrained_audio_encoder(source: str | Path) -> tuple[AudioEncoderConfig, dict[str, torch.Tensor]]:
    """An EAT checkpoint file, a folder of EAT's Hugging Face port or a converted folder ->
    (AudioEncoderConfig, AudioEncoder state dict)."""
    source = Path(source)
    if not source.is_dir():
        return read_eat_checkpoint(source)
    if (source / WEIGHTS_FILE).is_file():
        return read_audio_encoder_folder(source)
    if (source / PORT_CONFIG_FILE).is_file():
        return read_port_folder(source)
    raise CheckpointError(f"{source}: neither a converted audio encoder folder ({CONFIG_FILE}, {WEIGHTS_FILE}) "
                          f"nor a folder of EAT's Hugging Face port ({PORT_CONFIG_FILE} and weights)")


def check_same_architecture(found: AudioEncoderConfig, wanted: AudioEncoderConfig, source: str) -> None:
    """Raise CheckpointError naming every field (besides NOT_ARCHITECTURE) where the two configs differ."""
    differences = [
        f"{field.name} = {getattr(found, field.name)!r} there, {getattr(wanted, field.name)!r} in the config"
        for field in dataclasses.fields(AudioEncoderConfig)
        if field.name not in NOT_ARCHITECTURE and getattr(found, field.name) != getattr(wanted, field.name)
    ]
    if differences:
        raise CheckpointError(f"{source}: the audio encoder does not match model.audio: {'; '.join(differences)}")


def load_eat_audio_encoder(source: str | Path) -> AudioEncoder:
    """EAT's encoder with its architecture and weights, in eval mode, from a fairseq checkpoint
    (pretraining or fine-tuned), a folder of EAT's Hugging Face port or a `finelap convert eat` folder."""
    config, weights = read_pretrained_audio_encoder(source)
    encoder = AudioEncoder(config)
    encoder.load_state_dict(weights)
    return encoder.eval()


def init_audio_encoder(encoder: AudioEncoder, source: str | Path) -> None:
    """Load the weights of `source` (any layout load_eat_audio_encoder reads) into an existing `encoder`,
    after checking that its architecture is the one `encoder.config` describes and that a stored
    position table covers its target_frames."""
    found, weights = read_pretrained_audio_encoder(source)
    check_same_architecture(found, encoder.config, str(source))
    hold_stored_positions(encoder, weights, str(source))
    encoder.load_state_dict(weights)
