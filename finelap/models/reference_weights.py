"""A checkpoint of the reference FineLAP implementation (EAT audio tower) as a FineLAP model.

The reference saves {"model": state_dict, "config": {...}, "epoch": ...} with
  audio_encoder.audio_enc.model.*   EAT (see finelap.models.eat_weights); .fc_norm/.head dropped
  text_encoder.text_encoder.*       a Hugging Face encoder without pooler (RoBERTa-base)  -> text_encoder.model.*
  global_audio_proj.{0,2}           Linear-ReLU-Linear on the CLS token                  -> clip_projector.mlp
  global_text_proj.{0,2}            Linear-ReLU-Linear on the text CLS token             -> text_projector.mlp
  local_audio_proj.0                Linear on the frame tokens                           -> frame_projector.linear
  local_audio_proj.1.layers.N       nn.TransformerEncoder layers (8 heads, ReLU)         -> frame_projector.context
  temp_global, b_global, temp_local, b_local   logits = cos / temp + b (0-d)  -> clip/frame_log_scale = -log temp, bias
Older files name them clap_model.audio_proj / text_proj / temp / b, audio_adapter and
clap_model.<rest> (renamed as the reference's own fix_ckpt does). A logit parameter the reference
was configured without (value 0 in its config) is absent: no temperature means scale 1, no bias 0.
FineLAP stores a scale as its log and caps it (model.max_logit_scale, 100 for training); the
reference does not, so an imported model's cap is raised to its largest 1 / temperature. Its frame tokens are, like ours, the means of the 8 frequency
patches of each time column; its text tower truncates at 30 tokens and pools the first token; the
file does not record EAT's head count, which is EAT's width / 64, nor its input length, which is
EAT's 1024 frames (the reference pads or crops every clip to them; EAT's stored position table is
longer, 768 time columns, and is kept whole). Only its "transformer" local
projector with normalised frame embeddings and separate global projectors (the released
configuration) has a FineLAP counterpart; the "rnn", "linear" and "transformer_linearlast" types
are refused by name.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from finelap.config import ModelConfig, ProjectorConfig, TextEncoderConfig
from finelap.models.checkpoint_files import CheckpointError, check_state_dict, load_torch_checkpoint
from finelap.models.eat_weights import check_only_dropped, eat_audio_weights, hold_stored_positions
from finelap.models.finelap import FineLAP

EAT_OUTER_PREFIX = "audio_encoder.audio_enc."  # fairseq's fine-tuning wrapper: model.* plus fc_norm/head
EAT_PREFIX = EAT_OUTER_PREFIX + "model."
TEXT_PREFIX = "text_encoder.text_encoder."
LOCAL_HEADS = 8  # the reference's local Transformer has 8 heads whatever its width
LOCAL_DROPOUT = 0.1
TEXT_MAX_TOKENS = 30
RENAMES = {
    "global_audio_proj.": "clip_projector.mlp.",
    "global_text_proj.": "text_projector.mlp.",
    "local_audio_proj.0.": "frame_projector.linear.",
    "local_audio_proj.1.": "frame_projector.context.",
}
OLD_NAMES = {  # older reference files, in the order the reference's fix_ckpt applies them
    "audio_adapter.": "local_audio_proj.",
    "clap_model.text_proj.": "global_text_proj.",
    "clap_model.audio_proj.": "global_audio_proj.",
    "clap_model.": "",
}
OLD_LOGIT_NAMES = {"clap_model.b": "b_global", "clap_model.temp": "temp_global"}
LOGIT_PARAMETERS = {  # reference name -> (FineLAP name, whether it is a temperature)
    "temp_global": ("clip_log_scale", True),
    "b_global": ("clip_bias", False),
    "temp_local": ("frame_log_scale", True),
    "b_local": ("frame_bias", False),
}
# The reference's local projector types, told apart by their keys when the file's config does not name it.
LOCAL_TYPE_KEYS = {
    "rnn": re.compile(r"local_audio_proj\.weight_ih_l0"),  # a bidirectional GRU on the frame tokens
    "linear": re.compile(r"local_audio_proj\.2\.weight"),  # Linear-ReLU-Linear
    "transformer_linearlast": re.compile(r"local_audio_proj\.0\.layers\.0\."),  # Transformer, then Linear
    "transformer": re.compile(r"local_audio_proj\.1\.layers\.0\."),  # Linear, then Transformer
}
# buffers older Hugging Face versions saved; today they are rebuilt and not in the state dict
REBUILT_TEXT_BUFFERS = ("embeddings.position_ids",)


def convert_reference_checkpoint(path: str | Path, text_folder: str | Path) -> FineLAP:
    """The reference checkpoint at `path` as a FineLAP model (eval mode); `text_folder` is the Hugging
    Face folder of its text tower (config.json and tokenizer files; its weights are not read)."""
    source = str(path)
    checkpoint = load_torch_checkpoint(path)
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a state dict under 'model'")
    state = {_current_name(key): value for key, value in state.items()}
    if f"{EAT_PREFIX}modality_encoders.IMAGE.local_encoder.proj.weight" not in state:
        raise CheckpointError(f"{source}: not a reference FineLAP checkpoint with an EAT audio tower "
                              f"(no {EAT_PREFIX}modality_encoders.IMAGE.local_encoder.proj.weight)")
    _check_supported(state, checkpoint.get("config"), source)
    audio_config, audio_weights = eat_audio_weights(state, EAT_PREFIX, source)
    config = ModelConfig(audio=audio_config, text=_text_config(text_folder), projector=_projector_config(state, source))
    weights = {f"audio_encoder.{name}": tensor for name, tensor in audio_weights.items()}
    read_from = {}  # FineLAP name -> the file's name, for the messages
    # EAT is read above; beside it the fine-tuning wrapper holds only its classifier (fc_norm, head).
    check_only_dropped([key for key in state if key.startswith(EAT_OUTER_PREFIX) and not key.startswith(EAT_PREFIX)],
                       source, EAT_OUTER_PREFIX)
    unexpected = []
    for key, value in state.items():
        if key.startswith(EAT_OUTER_PREFIX):
            continue
        if key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX):]
            if name in REBUILT_TEXT_BUFFERS:
                continue
            ours, value = f"text_encoder.model.{name}", value
        elif key in LOGIT_PARAMETERS:
            ours, value = LOGIT_PARAMETERS[key][0], _logit_parameter(key, value, source)
        elif any(key.startswith(old) for old in RENAMES):
            old = next(old for old in RENAMES if key.startswith(old))
            ours = RENAMES[old] + key[len(old):]
        else:
            unexpected.append(key)
            continue
        weights[ours], read_from[ours] = value, key
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {', '.join(unexpected)}")
    for name, _ in LOGIT_PARAMETERS.values():
        weights.setdefault(name, torch.zeros(1))  # absent: scale exp(0) = 1 or bias 0, as the reference computes
    # the reference's scale 1 / temperature is not capped: the model's cap must let it through
    largest_scale = max(math.exp(weights[name].item()) for name, is_temperature in LOGIT_PARAMETERS.values()
                        if is_temperature)
    config.max_logit_scale = max(config.max_logit_scale, largest_scale * (1 + 1e-6))
    model = FineLAP(config, text_folder=text_folder, load_text_weights=False)
    hold_stored_positions(model.audio_encoder, audio_weights, source)  # EAT's table, kept whole
    weights = {name: tensor.float() for name, tensor in weights.items()}
    check_state_dict(model, weights, source, read_from)
    model.load_state_dict(weights)
    return model.eval()


def _current_name(key: str) -> str:
    """A key of an older reference file -> today's name (unchanged if it is one)."""
    if key in OLD_LOGIT_NAMES:
        return OLD_LOGIT_NAMES[key]
    for old, new in OLD_NAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _check_supported(state: dict, reference_config, source: str) -> None:
    """Refuse, by name, the reference's configurations that FineLAP does not compute."""
    args = reference_config.get("model_args", {}) if isinstance(reference_config, dict) else {}
    local_type = args.get("local_audio_proj_type") or next(
        (name for name, pattern in LOCAL_TYPE_KEYS.items() if any(pattern.match(key) for key in state)), None)
    if local_type != "transformer":
        found = f"is of the reference's {local_type!r} type" if local_type else "is missing (no local_audio_proj.*)"
        raise CheckpointError(f"{source}: the local audio projector {found}; only its 'transformer' type "
                              "(Linear, then a Transformer) has a FineLAP counterpart")
    if args.get("unify_audio_proj"):
        raise CheckpointError(f"{source}: unify_audio_proj is on (the local projector also makes the clip "
                              "embedding); FineLAP has separate global and local projectors")
    if args.get("normalize_dense_audio_embeds") is False:
        raise CheckpointError(f"{source}: normalize_dense_audio_embeds is off; FineLAP's frame embeddings are "
                              "L2-normalised")


def _text_config(text_folder: str | Path) -> TextEncoderConfig:
    return TextEncoderConfig(path=str(text_folder), pooling="cls", max_tokens=TEXT_MAX_TOKENS)


def _projector_config(state: dict, source: str) -> ProjectorConfig:
    """Sizes of the projectors, read from their weights."""
    layer_key = re.compile(r"local_audio_proj\.1\.layers\.(\d+)\.")
    layers = {match.group(1) for key in state if (match := layer_key.match(key))}
    for needed in ("global_audio_proj.0.weight", "local_audio_proj.1.layers.0.linear1.weight"):
        if needed not in state:
            raise CheckpointError(f"{source}: missing {needed}")
    return ProjectorConfig(
        embed_dim=state["global_audio_proj.0.weight"].shape[0],
        local_type="transformer",
        local_layers=len(layers),
        local_heads=LOCAL_HEADS,
        local_ffn_dim=state["local_audio_proj.1.layers.0.linear1.weight"].shape[0],
        local_dropout=LOCAL_DROPOUT,
    )


def _logit_parameter(name: str, value: torch.Tensor, source: str) -> torch.Tensor:
    """A reference temperature or bias (0-d) -> FineLAP's [1] parameter (log scale for a temperature)."""
    if value.numel() != 1:
        raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, expected a single value")
    number = float(value)
    if not LOGIT_PARAMETERS[name][1]:
        return torch.tensor([number])
    if not number > 0:
        raise CheckpointError(f"{source}: {name} = {number:g}: a temperature must be positive")
    return torch.tensor([-math.log(number)])
