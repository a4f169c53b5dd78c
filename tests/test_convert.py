"""EAT and reference FineLAP checkpoints: safe reading, conversion, and outputs equal to the originals.

Checkpoints are written here in each layout with random weights at small sizes, and the outputs
are compared with plain forwards written below from the published facts (EAT: patch Conv2d,
the first T * 8 rows of the stored sin-cos table added to the patches, CLS prepended after, an
embedding LayerNorm, post-norm blocks, exact GELU, no final norm; its input: 1024 fbank frames
unless the checkpoint records another target_length, while its table covers 768 time columns;
the reference FineLAP: its projectors, CLS text pooling and logits = cos / temperature + bias),
in float32 with explicit attention.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import RobertaProcessing
from torch import nn
from transformers import AutoTokenizer, RobertaConfig, RobertaModel, RobertaTokenizerFast

from finelap.config import AudioEncoderConfig
from finelap.convert import main as convert_main
from finelap.eval.cli import main as eval_main
from finelap.models import AudioEncoder, CheckpointError, FineLAP, ModelFolderError
from finelap.models.audio_encoder import sincos_position_embedding_2d
from finelap.models.eat_weights import init_audio_encoder, load_eat_audio_encoder
from finelap.models.reference_weights import convert_reference_checkpoint
from tests.test_eval_end_to_end import dataset  # noqa: F401  (a fixture: a small held-out set of every task)

IMAGE = "modality_encoders.IMAGE."
PATCH, FREQ_PATCHES = 16, 8  # 16 x 16 patches over 128 mel bins
FRAMES = 64  # a 64 x 128 image: 4 time columns
EAT_FRAMES = 1024  # EAT's published input (target_length): 10.24 s, 64 time columns
EAT_TABLE_COLUMNS = 768  # EAT's position table (max_length): 768 time columns, about 2 minutes
EAT_EPS = 1e-6
TOLERANCE = 1e-5  # float32, explicit attention


def eat_position_table(width: int, time_steps: int) -> np.ndarray:
    """EAT's fixed table, [time_steps * 8, width] float32, as MAE computes it: a w-first meshgrid,
    so the first half of the channels encodes the frequency (w) index; numpy float32."""
    grid_w, grid_h = np.meshgrid(np.arange(FREQ_PATCHES, dtype=np.float32), np.arange(time_steps, dtype=np.float32))

    def one_axis(dim: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(width // 2, grid_w), one_axis(width // 2, grid_h)], axis=1).astype(np.float32)


def make_eat_state(width: int = 64, depth: int = 2, seed: int = 0, pre_norm: bool = False,
                   table_columns: int = FRAMES // PATCH) -> dict[str, torch.Tensor]:
    """An EAT encoder's state dict in fairseq's names with random weights (LayerNorms included)."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):  # matrices scaled by 1 / sqrt(fan-in), so that attention does not saturate
        return torch.randn(*shape, generator=generator) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.2)

    state = {
        IMAGE + "local_encoder.proj.weight": random(width, 1, PATCH, PATCH),
        IMAGE + "local_encoder.proj.bias": random(width),
        IMAGE + "extra_tokens": random(1, 1, width),
        IMAGE + "fixed_positional_encoder.positions": torch.from_numpy(eat_position_table(width, table_columns))[None],
    }
    norm = "norm." if pre_norm else IMAGE + "context_encoder.norm."  # pre-norm data2vec: a final norm instead
    state |= {norm + "weight": 1 + random(width), norm + "bias": random(width)}
    for index in range(depth):
        block = f"blocks.{index}."
        state |= {
            block + "attn.qkv.weight": random(3 * width, width), block + "attn.qkv.bias": random(3 * width),
            block + "attn.proj.weight": random(width, width), block + "attn.proj.bias": random(width),
            block + "norm1.weight": 1 + random(width), block + "norm1.bias": random(width),
            block + "mlp.fc1.weight": random(4 * width, width), block + "mlp.fc1.bias": random(4 * width),
            block + "mlp.fc2.weight": random(width, 4 * width), block + "mlp.fc2.bias": random(width),
            block + "norm2.weight": 1 + random(width), block + "norm2.bias": random(width),
        }
    return state


def eat_forward(w: dict[str, torch.Tensor], features: torch.Tensor, heads: int,
                pre_norm: bool = False) -> torch.Tensor:
    """data2vec 2.0 / EAT extract_features without masking: [B, frames, 128] -> [B, 1 + T * 8, W]."""
    width = w[IMAGE + "extra_tokens"].shape[-1]
    x = F.conv2d(features[:, None], w[IMAGE + "local_encoder.proj.weight"], w[IMAGE + "local_encoder.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)  # [B, T * 8, W], index t * 8 + f
    x = x + w[IMAGE + "fixed_positional_encoder.positions"][:, : x.shape[1]]
    x = torch.cat([w[IMAGE + "extra_tokens"].expand(x.shape[0], -1, -1), x], dim=1)
    if not pre_norm:
        x = F.layer_norm(x, (width,), w[IMAGE + "context_encoder.norm.weight"], w[IMAGE + "context_encoder.norm.bias"],
                         EAT_EPS)
    batch, tokens, _ = x.shape
    depth = len({key.split(".")[1] for key in w if key.startswith("blocks.")})
    for index in range(depth):
        b = {key[len(f"blocks.{index}."):]: value for key, value in w.items() if key.startswith(f"blocks.{index}.")}

        def norm(x, which):
            return F.layer_norm(x, (width,), b[f"{which}.weight"], b[f"{which}.bias"], EAT_EPS)

        def attention(x):
            q, k, v = F.linear(x, b["attn.qkv.weight"], b["attn.qkv.bias"]).reshape(
                batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            weights = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            return F.linear((weights @ v).transpose(1, 2).reshape(batch, tokens, width), b["attn.proj.weight"],
                            b["attn.proj.bias"])

        def mlp(x):
            hidden = F.gelu(F.linear(x, b["mlp.fc1.weight"], b["mlp.fc1.bias"]))
            return F.linear(hidden, b["mlp.fc2.weight"], b["mlp.fc2.bias"])

        if pre_norm:
            x = x + attention(norm(x, "norm1"))
            x = x + mlp(norm(x, "norm2"))
        else:
            x = norm(x + attention(x), "norm1")
            x = norm(x + mlp(x), "norm2")
    if pre_norm:
        x = F.layer_norm(x, (width,), w["norm.weight"], w["norm.bias"], EAT_EPS)
    return x


def frame_means(tokens: torch.Tensor) -> torch.Tensor:
    """Frame t = mean of the 8 frequency tokens of time column t (tokens after CLS are time-major)."""
    batch, _, width = tokens.shape
    return tokens[:, 1:].reshape(batch, -1, FREQ_PATCHES, width).mean(dim=2)


def assert_is_eat(encoder: AudioEncoder, state: dict, heads: int, name: str, pre_norm: bool = False,
                  input_frames: int = FRAMES) -> None:
    """The encoder takes `input_frames` fbank frames, gives one frame token per 16 of them, and its
    CLS and frame tokens equal the plain forward's, float32, explicit attention."""
    assert not encoder.training and encoder.config.target_frames == input_frames
    encoder.set_attention_impl("explicit")
    features = torch.randn(2, input_frames, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cls_token, frames, _ = encoder(features, torch.tensor([input_frames, 30]))
        assert frames.shape == (2, input_frames // PATCH, encoder.width)
        for precision in (torch.float32, torch.float64):  # float64: how far float32 rounding is from exact
            expected = eat_forward({key: value.to(precision) for key, value in state.items() if torch.is_tensor(value)},
                                   features.to(precision), heads, pre_norm)
            difference = max((cls_token - expected[:, 0]).abs().max().item(),
                             (frames - frame_means(expected)).abs().max().item())
            print(f"max abs difference, {name}, plain forward in {precision}: {difference:.3g}")  # pytest -s
            assert difference <= TOLERANCE


def fairseq_cfg(width: int = 64, depth: int = 2, heads: int = 2, layer_norm_first: bool = False,
                target_length: int | None = FRAMES) -> dict:
    """fairseq's saved pretraining cfg (plain containers), the fields the architecture comes from;
    target_length None: not recorded."""
    image = {"patch_size": PATCH, "in_chans": 1} | ({"target_length": target_length} if target_length else {})
    return {"_name": "data2vec_multi", "embed_dim": width, "depth": depth, "num_heads": heads, "norm_eps": EAT_EPS,
            "layer_norm_first": layer_norm_first, "mlp_ratio": 4.0, "modalities": {"image": image}}


def save_fairseq(path: Path, model_state: dict, model_cfg: dict) -> Path:
    """What fairseq writes: cfg as plain containers, the model, numpy scalars in the saved metrics."""
    torch.save({
        "cfg": {"model": model_cfg, "task": {"_name": "mae_image_pretraining"}},
        "model": model_state,
        "extra_state": {"metrics": {"loss": np.float64(1.25), "updates": np.int64(10), "dtype": np.dtype("float32")}},
    }, path)
    return path


@pytest.fixture(scope="module")
def pretraining_checkpoint(tmp_path_factory) -> Path:
    """A pretraining checkpoint: the encoder plus its decoder and the EMA teacher, which are dropped."""
    state = make_eat_state()
    state[IMAGE + "decoder.proj.weight"] = torch.zeros(64, 8)
    state["_ema"] = {"0.norm1.weight": torch.ones(64)}
    return save_fairseq(tmp_path_factory.mktemp("eat") / "eat_pretrained.pt", state, fairseq_cfg())


def test_fairseq_pretraining_checkpoint_gives_eats_outputs(pretraining_checkpoint):
    encoder = load_eat_audio_encoder(pretraining_checkpoint)
    config = encoder.config
    assert (config.width, config.depth, config.heads, config.mlp_ratio) == (64, 2, 2, 4.0)
    assert (config.target_frames, config.num_mel_bins, config.patch_size) == (FRAMES, 128, PATCH)
    assert (config.block_norm, config.embedding_norm, config.final_norm, config.norm_eps, config.position_layout,
            config.stored_positions) == ("post", True, False, EAT_EPS, "freq_first", True)
    assert_is_eat(encoder, make_eat_state(), heads=2, name="fairseq pretraining")


def test_fairseq_finetuned_checkpoint_reads_the_pretrained_model_args(tmp_path):
    """Fine-tuned: keys under `model.`, the AudioSet classifier beside them, the architecture in
    cfg.model.pretrained_model_args.model."""
    state = {f"model.{key}": value for key, value in make_eat_state(seed=1).items()}
    state |= {"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64), "head.weight": torch.zeros(527, 64),
              "head.bias": torch.zeros(527)}
    cfg = {"_name": "mae_image_classification", "num_classes": 527,
           "pretrained_model_args": {"model": fairseq_cfg()}}
    encoder = load_eat_audio_encoder(save_fairseq(tmp_path / "eat_ft.pt", state, cfg))
    assert encoder.config.heads == 2  # recorded, not width / 64
    assert_is_eat(encoder, make_eat_state(seed=1), heads=2, name="fairseq fine-tuned")


def test_pre_norm_data2vec_layout_loads_as_pre_norm(tmp_path):
    state = make_eat_state(seed=2, pre_norm=True)
    encoder = load_eat_audio_encoder(save_fairseq(tmp_path / "pre.pt", state, fairseq_cfg(layer_norm_first=True)))
    assert (encoder.config.block_norm, encoder.config.embedding_norm, encoder.config.final_norm) == ("pre", False, True)
    assert_is_eat(encoder, state, heads=2, name="fairseq layer_norm_first", pre_norm=True)


def test_eat_large_sizes_come_from_the_checkpoint(tmp_path):
    """EAT-large's width and heads (1024, 16); one block keeps it fast."""
    state = make_eat_state(width=1024, depth=1, seed=3)
    encoder = load_eat_audio_encoder(save_fairseq(tmp_path / "large.pt", state, fairseq_cfg(1024, 1, 16)))
    assert (encoder.config.width, encoder.config.heads, encoder.config.depth) == (1024, 16, 1)
    assert_is_eat(encoder, state, heads=16, name="fairseq 1024 wide, 16 heads")


PORT_NAMES = {IMAGE + "context_encoder.norm.": "pre_norm.", IMAGE: ""}


def write_port_folder(folder: Path, state: dict, weights_file: str = "model.safetensors") -> Path:
    """A folder in the layout of EAT's Hugging Face port: config.json and the weights under `model.`;
    its position table is longer (max_length time columns) than the image uses."""
    folder.mkdir()
    port = {}
    for key, value in state.items():
        for old, new in PORT_NAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        port[f"model.{key}"] = value
    port["model.fc_norm.weight"], port["model.head.weight"] = torch.ones(64), torch.zeros(527, 64)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "eat", "embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": PATCH, "mel_bins": 128,
        "max_length": 8, "img_size": [FRAMES, 128], "mlp_ratio": 4.0, "layer_norm_first": False, "norm_eps": EAT_EPS,
        "model_variant": "finetune"}))
    if weights_file.endswith(".safetensors"):
        safetensors.torch.save_file({key: value.contiguous() for key, value in port.items()}, folder / weights_file)
    else:
        torch.save(port, folder / weights_file)
    return folder


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_port_folder_gives_eats_outputs(tmp_path, weights_file):
    state = make_eat_state(seed=4, table_columns=8)
    encoder = load_eat_audio_encoder(write_port_folder(tmp_path / "port", state, weights_file))
    assert encoder.config.target_frames == FRAMES and encoder.pos_embed.shape == (8 * 8, 64)  # the table, whole
    assert_is_eat(encoder, state, heads=2, name=f"Hugging Face port ({weights_file})")


def test_default_encoder_keeps_todays_state_dict_keys():
    """Model folders written before the EAT options existed load unchanged (no new keys, same names)."""
    names = set(AudioEncoder(AudioEncoderConfig(width=32, depth=1, heads=2, target_frames=64)).state_dict())
    assert {"norm.weight", "cls_token", "patch_embed.weight"} <= names
    assert not any(name.startswith(("pos_embed", "embedding_norm")) for name in names)


def test_freq_first_layout_is_eats_position_table_at_full_size():
    ours = sincos_position_embedding_2d(768, 64, 8, "freq_first")
    eat = torch.from_numpy(eat_position_table(768, 64))
    assert (ours - eat).abs().max() < 1e-4
    assert (sincos_position_embedding_2d(768, 64, 8, "time_first") - eat).abs().max() > 0.5


def test_convert_eat_round_trip_and_init_from(pretraining_checkpoint, tmp_path, capsys):
    out = tmp_path / "eat_converted"
    assert convert_main(["eat", str(pretraining_checkpoint), "--out", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["audio_encoder.safetensors", "config.yaml"]
    original, converted = load_eat_audio_encoder(pretraining_checkpoint), load_eat_audio_encoder(out)
    assert converted.config == original.config and not converted.training
    assert original.state_dict().keys() == converted.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, converted.state_dict()[name]), name

    port = write_port_folder(tmp_path / "port", make_eat_state(seed=4, table_columns=8))
    assert convert_main(["eat", str(port), "--out", str(tmp_path / "from_port")]) == 0
    for name, tensor in load_eat_audio_encoder(port).state_dict().items():
        assert torch.equal(tensor, load_eat_audio_encoder(tmp_path / "from_port").state_dict()[name]), name

    plain = AudioEncoder(AudioEncoderConfig(**{**vars(original.config), "block_norm": "pre", "final_norm": True}))
    with pytest.raises(CheckpointError, match="does not match model.audio") as error:
        init_audio_encoder(plain, out)
    assert "block_norm = 'post' there, 'pre' in the config" in str(error.value) and "final_norm" in str(error.value)
    assert convert_main(["eat", str(pretraining_checkpoint), "--out", str(out)]) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def released_like_checkpoint(tmp_path_factory) -> Path:
    """EAT as the released FineLAP holds it: a position table of 768 time columns (12,288 frames) and
    no recorded target_length."""
    state = make_eat_state(seed=5, table_columns=EAT_TABLE_COLUMNS)
    return save_fairseq(tmp_path_factory.mktemp("released") / "eat.pt", state, fairseq_cfg(target_length=None))


def test_unrecorded_input_length_is_eats_1024_frames_and_the_table_is_kept_whole(released_like_checkpoint,
                                                                                   tmp_path):
    out = tmp_path / "converted"
    assert convert_main(["eat", str(released_like_checkpoint), "--out", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["audio"]["target_frames"] == EAT_FRAMES
    state = make_eat_state(seed=5, table_columns=EAT_TABLE_COLUMNS)
    for source in (released_like_checkpoint, out):
        encoder = load_eat_audio_encoder(source)
        assert torch.equal(encoder.pos_embed, state[IMAGE + "fixed_positional_encoder.positions"][0])
        assert_is_eat(encoder, state, heads=2, name=f"no target_length, {source.name}", input_frames=EAT_FRAMES)


@pytest.mark.parametrize("target_length", [256, 2048])
def test_a_recorded_target_length_is_honoured(tmp_path, target_length):
    state = make_eat_state(seed=6, table_columns=EAT_TABLE_COLUMNS)
    encoder = load_eat_audio_encoder(save_fairseq(tmp_path / "eat.pt", state, fairseq_cfg(target_length=target_length)))
    assert encoder.pos_embed.shape == (EAT_TABLE_COLUMNS * FREQ_PATCHES, 64)
    assert_is_eat(encoder, state, heads=2, name=f"target_length {target_length}", input_frames=target_length)


def test_target_frames_can_be_raised_up_to_the_stored_table(released_like_checkpoint, tmp_path):
    """A converted folder's config.yaml, or a training config with init_from, may ask for more than
    1024 frames, up to the table's 768 columns; more than that is refused naming the file."""
    out = tmp_path / "converted"
    assert convert_main(["eat", str(released_like_checkpoint), "--out", str(out)]) == 0
    config_file = out / "config.yaml"
    record = yaml.safe_load(config_file.read_text())
    record["model"]["audio"]["target_frames"] = 2 * EAT_FRAMES
    config_file.write_text(yaml.safe_dump(record, sort_keys=False))
    longer = load_eat_audio_encoder(out)
    assert_is_eat(longer, make_eat_state(seed=5, table_columns=EAT_TABLE_COLUMNS), heads=2, name="2048 frames",
                  input_frames=2 * EAT_FRAMES)
    initialised = AudioEncoder(longer.config)
    init_audio_encoder(initialised, released_like_checkpoint)  # which records no input length: 1024 frames
    for name, tensor in longer.state_dict().items():
        assert torch.equal(tensor, initialised.state_dict()[name]), name

    too_long = (EAT_TABLE_COLUMNS + 1) * PATCH
    message = f"fewer than the {too_long // PATCH * FREQ_PATCHES} that target_frames {too_long} needs"
    record["model"]["audio"]["target_frames"] = too_long
    config_file.write_text(yaml.safe_dump(record, sort_keys=False))
    with pytest.raises(CheckpointError, match=message) as error:
        load_eat_audio_encoder(out)
    assert str(out / "audio_encoder.safetensors") in str(error.value)
    with pytest.raises(CheckpointError, match=message) as error:
        init_audio_encoder(AudioEncoder(dataclasses.replace(longer.config, target_frames=too_long)),
                           released_like_checkpoint)
    assert str(released_like_checkpoint) in str(error.value)


class WritesAFile:
    """Unpickling this would create a file: pickle calls builtins.open(path, "w")."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_bad_checkpoints_are_refused_naming_file_and_key_and_leave_no_folder(tmp_path, capsys):
    target = tmp_path / "written_by_the_payload"
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": make_eat_state(), "cfg": {"model": fairseq_cfg()}, "extra": WritesAFile(target)}, unsafe)
    good = save_fairseq(tmp_path / "good.pt", make_eat_state(), fairseq_cfg())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])

    def changed(name: str, change) -> Path:
        state = {f"model.{key}": value for key, value in make_eat_state().items()}  # fine-tuned layout
        change(state)
        return save_fairseq(tmp_path / name, state, {"pretrained_model_args": {"model": fairseq_cfg()}})

    cases = [
        (unsafe, "refusing to load: the checkpoint names io.open"),  # builtins.open pickles as io.open
        (truncated, "truncated or corrupt"),
        (changed("missing.pt", lambda s: s.pop("model.blocks.1.mlp.fc2.bias")), "missing model.blocks.1.mlp.fc2.bias"),
        (changed("shape.pt", lambda s: s.update({"model.blocks.0.attn.qkv.weight": torch.zeros(192, 65)})),
         r"model.blocks.0.attn.qkv.weight has shape \(192, 65\), the model expects \(192, 64\)"),
        (changed("unknown.pt", lambda s: s.update({"model.blocks.0.attn.q_bias": torch.zeros(64),
                                                   "model.extra_head.weight": torch.zeros(2)})),
         "unexpected keys model.blocks.0.attn.q_bias, model.extra_head.weight"),
        (changed("deeper.pt", lambda s: s.update({"model.blocks.2.norm1.weight": torch.ones(64)})),
         "unexpected keys model.blocks.2.norm1.weight"),  # cfg says depth 2
        (changed("layout.pt", lambda s: s[f"model.{IMAGE}fixed_positional_encoder.positions"].copy_(
            torch.from_numpy(eat_position_table(64, 4)[:, ::-1].copy())[None])), "differs from the freq_first"),
        # no recorded target_length: EAT's 1024 frames need 64 columns, the table has 4
        (save_fairseq(tmp_path / "short.pt", make_eat_state(), fairseq_cfg(target_length=None)),
         r"fixed_positional_encoder.positions: the stored position table has 32 rows \(4 time columns of 16 fbank "
         r"frames\), fewer than the 512 that target_frames 1024 needs"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            load_eat_audio_encoder(path)
        assert str(path) in str(error.value)
        out = tmp_path / f"converted_{path.stem}"
        assert convert_main(["eat", str(path), "--out", str(out)]) == 1
        assert str(path) in capsys.readouterr().err
        assert not [found for found in tmp_path.iterdir() if "converted" in found.name]  # nor a temporary folder
    assert not target.exists()  # the payload never ran


# ---------------------------------------------------------------- reference FineLAP

EAT_WIDTH = 128  # the reference file does not record EAT's heads: width / 64 = 2
EMBED = 32  # the reference's local Transformer has 8 heads and a 4 x EMBED feed-forward
EAT_REF = "audio_encoder.audio_enc.model."
SENTENCES = ["a dog barks twice", "rain on a tin roof at night", "a man speaks while a siren wails",
             "birds chirp in the morning", "a car passes by on a wet road", "dog barking and rain"]


def make_trained_roberta_folder(folder: Path) -> Path:
    """A tiny random RoBERTa and a byte-level BPE trained on a few sentences, saved as a
    RobertaTokenizerFast folder (no download)."""
    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                     sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                     mask_token="<mask>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(5)
    RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=40), add_pooling_layer=False
                 ).save_pretrained(folder)
    return folder


class ReferenceHeads(nn.Module):
    """The reference FineLAP's projectors and logit parameters, with its module names."""

    def __init__(self, text_width: int):
        super().__init__()
        torch.manual_seed(3)
        self.temp_global = nn.Parameter(torch.tensor(0.005))  # a scale of 200: beyond the training cap of 100
        self.b_global = nn.Parameter(torch.tensor(-9.5))
        self.temp_local = nn.Parameter(torch.tensor(0.2))
        self.b_local = nn.Parameter(torch.tensor(-4.0))
        self.global_audio_proj = nn.Sequential(nn.Linear(EAT_WIDTH, EMBED), nn.ReLU(), nn.Linear(EMBED, EMBED))
        self.global_text_proj = nn.Sequential(nn.Linear(text_width, EMBED), nn.ReLU(), nn.Linear(EMBED, EMBED))
        layer = nn.TransformerEncoderLayer(EMBED, 8, EMBED * 4, 0.1, activation="relu", batch_first=True)
        self.local_audio_proj = nn.Sequential(nn.Linear(EAT_WIDTH, EMBED), nn.TransformerEncoder(layer, 2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(checkpoint path, text folder, reference state dict, heads, text model) of a tiny reference FineLAP."""
    folder = tmp_path_factory.mktemp("reference")
    text_folder = make_trained_roberta_folder(folder / "roberta")
    text_model = RobertaModel.from_pretrained(text_folder, add_pooling_layer=False).eval()
    heads = ReferenceHeads(text_model.config.hidden_size).eval()
    state = {EAT_REF + key: value
             for key, value in make_eat_state(EAT_WIDTH, seed=1, table_columns=EAT_TABLE_COLUMNS).items()}
    state["audio_encoder.audio_enc.fc_norm.weight"] = torch.ones(EAT_WIDTH)  # the fine-tuned EAT's classifier
    state["audio_encoder.audio_enc.head.weight"] = torch.zeros(527, EAT_WIDTH)
    state |= {f"text_encoder.text_encoder.{key}": value for key, value in text_model.state_dict().items()}
    state["text_encoder.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # older transformers
    state |= heads.state_dict()
    path = folder / "finelap.pt"
    config = {"model_args": {"embed_size": EMBED, "local_audio_proj_type": "transformer",
                             "normalize_dense_audio_embeds": True, "unify_audio_proj": False}}
    torch.save({"model": state, "config": config, "epoch": 15,
                "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-5)}]}}, path)
    return path, text_folder, state, heads, text_model


def reference_outputs(state: dict, heads: ReferenceHeads, text_model, tokenizer, features, texts):
    """The reference's clip, frame and text embeddings and both logits, recomputed plainly."""
    eat = {key[len(EAT_REF):]: value for key, value in state.items() if key.startswith(EAT_REF)}
    tokens = eat_forward(eat, features, heads=EAT_WIDTH // 64)
    clip = F.normalize(heads.global_audio_proj(tokens[:, 0]), dim=-1)
    frames = F.normalize(heads.local_audio_proj(frame_means(tokens)), dim=-1)
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=30, return_tensors="pt")
    hidden = text_model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask)[0]
    text = F.normalize(heads.global_text_proj(hidden[:, 0]), dim=-1)
    clip_logits = clip @ text.T / heads.temp_global + heads.b_global
    frame_logits = torch.einsum("bte,ne->bnt", frames, text) / heads.temp_local + heads.b_local
    return clip, frames, text, clip_logits, frame_logits


def model_outputs(model: FineLAP, features, texts):
    model.audio_encoder.set_attention_impl("explicit")
    clip, frames, _ = model.encode_audio(features, torch.full((features.shape[0],), features.shape[1]))
    text = model.encode_text(texts)
    clip_scale, clip_bias, frame_scale, frame_bias = model.logit_parameters()
    return (clip, frames, text, clip_scale * clip @ text.T + clip_bias,
            frame_scale * torch.einsum("bte,ne->bnt", frames, text) + frame_bias)


def test_reference_checkpoint_gives_the_references_embeddings_and_logits(reference, tmp_path):
    """At the reference's 1024 frames (its file records no input length; its EAT table is longer)."""
    path, text_folder, state, heads, text_model = reference
    out = tmp_path / "model"
    assert convert_main(["reference", str(path), "--text-encoder", str(text_folder), "--out", str(out)]) == 0
    model = FineLAP.from_pretrained(out)
    converted = convert_reference_checkpoint(path, text_folder)
    assert model.config == converted.config and model.config.audio.target_frames == EAT_FRAMES
    for name, tensor in converted.state_dict().items():  # the model folder reloads the same weights
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert torch.equal(model.audio_encoder.pos_embed, state[EAT_REF + IMAGE + "fixed_positional_encoder.positions"][0])
    assert model.config.audio.heads == EAT_WIDTH // 64 and model.config.text.max_tokens == 30
    projector = model.config.projector
    assert (projector.embed_dim, projector.local_layers, projector.local_heads, projector.local_ffn_dim) == (
        EMBED, 2, 8, 4 * EMBED)
    tokenizer = AutoTokenizer.from_pretrained(text_folder)
    assert len(tokenizer("a dog barks twice").input_ids) < 2 + len("a dog barks twice")  # merges were learnt
    features = torch.randn(2, EAT_FRAMES, 128, generator=torch.Generator().manual_seed(8))
    texts = ["a dog barks", "rain on a tin roof at night and a siren far away, then birds chirp in the morning " * 2]
    with torch.no_grad():
        ours = model_outputs(model, features, texts)
        expected = reference_outputs(state, heads, text_model, tokenizer, features, texts)
    assert ours[1].shape == (2, EAT_FRAMES // PATCH, EMBED)
    for name, got, want in zip(("clip", "frames", "text", "clip logits", "frame logits"), ours, expected):
        # logits are up to 1 / 0.005 times the cosines: compare them relative to that scale
        difference = (got - want).abs().max().item() / (1 / 0.005 if "logits" in name else 1)
        print(f"max abs difference, reference {name}{' / 200' if 'logits' in name else ''}: {difference:.3g}")
        assert difference <= TOLERANCE, name


def test_older_reference_names_give_the_same_model(reference, tmp_path):
    path, text_folder, state, _, _ = reference
    old = {}
    for key, value in state.items():
        for new, older in (("global_audio_proj.", "clap_model.audio_proj."),
                           ("global_text_proj.", "clap_model.text_proj."), ("local_audio_proj.", "audio_adapter."),
                           ("audio_encoder.", "clap_model.audio_encoder."), ("text_encoder.", "clap_model.text_encoder.")):
            if key.startswith(new):
                key = older + key[len(new):]
                break
        old[{"temp_global": "clap_model.temp", "b_global": "clap_model.b"}.get(key, key)] = value
    torch.save({"model": old}, tmp_path / "old.pt")
    for source, out in ((path, tmp_path / "new_model"), (tmp_path / "old.pt", tmp_path / "old_model")):
        assert convert_main(["reference", str(source), "--text-encoder", str(text_folder), "--out", str(out)]) == 0
    new, older = FineLAP.from_pretrained(tmp_path / "new_model"), FineLAP.from_pretrained(tmp_path / "old_model")
    for name, tensor in new.state_dict().items():
        assert torch.equal(tensor, older.state_dict()[name]), name


def test_absent_logit_parameters_mean_scale_one_and_bias_zero(reference, tmp_path):
    path, text_folder, state, _, _ = reference
    torch.save({"model": {key: value for key, value in state.items() if key not in ("temp_local", "b_global")}},
               tmp_path / "partial.pt")
    out = tmp_path / "model"
    assert convert_main(["reference", str(tmp_path / "partial.pt"), "--text-encoder", str(text_folder),
                         "--out", str(out)]) == 0
    model = FineLAP.from_pretrained(out)
    clip_scale, clip_bias, frame_scale, frame_bias = (float(value.detach()) for value in model.logit_parameters())
    assert (clip_bias, frame_scale) == (0.0, 1.0)
    assert clip_scale == pytest.approx(1 / 0.005, rel=1e-6) and frame_bias == pytest.approx(-4.0)


def test_reference_configurations_without_a_counterpart_are_refused_by_name(reference, tmp_path, capsys):
    path, text_folder, state, _, _ = reference
    local = {key: value for key, value in state.items() if not key.startswith("local_audio_proj.")}
    gru = nn.GRU(EAT_WIDTH, EMBED // 2, num_layers=2, batch_first=True, bidirectional=True)
    linear = nn.Sequential(nn.Linear(EAT_WIDTH, EMBED), nn.ReLU(), nn.Linear(EMBED, EMBED))
    layer = nn.TransformerEncoderLayer(EAT_WIDTH, 8, EAT_WIDTH * 4, batch_first=True)
    linear_last = nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Linear(EAT_WIDTH, EMBED))

    def projector(module):
        return local | {f"local_audio_proj.{key}": value for key, value in module.state_dict().items()}

    cases = [
        ({"model": projector(gru)}, "local audio projector is of the reference's 'rnn' type"),
        ({"model": projector(linear)}, "'linear' type"),
        ({"model": projector(linear_last)}, "'transformer_linearlast' type"),
        ({"model": state, "config": {"model_args": {"local_audio_proj_type": "rnn"}}}, "'rnn' type"),
        ({"model": state, "config": {"model_args": {"local_audio_proj_type": "transformer", "unify_audio_proj": True}}},
         "unify_audio_proj is on"),
        ({"model": state | {"temp_global": torch.tensor(-0.5)}}, "temp_global = -0.5: a temperature must be positive"),
        ({"model": state | {"cls_proj.weight": torch.zeros(2), "audio_encoder.extra": torch.zeros(1)}},
         "unexpected keys cls_proj.weight, audio_encoder.extra"),
        ({"model": state | {"global_text_proj.0.weight": torch.zeros(EMBED, 31)}},
         "global_text_proj.0.weight has shape (32, 31), the model expects (32, 32)"),
    ]
    for checkpoint, message in cases:
        torch.save(checkpoint, tmp_path / "changed.pt")
        assert convert_main(["reference", str(tmp_path / "changed.pt"), "--text-encoder", str(text_folder),
                             "--out", str(tmp_path / "out")]) == 1
        error = capsys.readouterr().err
        assert message in error.replace("\\", "") or pytest.fail(f"{message!r} not in {error!r}")
        assert not [found for found in tmp_path.iterdir() if found.name != "changed.pt"]


def test_reference_input_longer_than_its_table_is_refused_naming_the_file(reference, tmp_path, capsys):
    path, text_folder, state, _, _ = reference
    short_table = torch.from_numpy(eat_position_table(EAT_WIDTH, 4))[None]
    torch.save({"model": state | {EAT_REF + IMAGE + "fixed_positional_encoder.positions": short_table}},
               tmp_path / "short.pt")
    assert convert_main(["reference", str(tmp_path / "short.pt"), "--text-encoder", str(text_folder),
                         "--out", str(tmp_path / "short_model")]) == 1
    error = capsys.readouterr().err
    assert str(tmp_path / "short.pt") in error and "fewer than the 512 that target_frames 1024 needs" in error

    out = tmp_path / "model"
    assert convert_main(["reference", str(path), "--text-encoder", str(text_folder), "--out", str(out)]) == 0
    record = yaml.safe_load((out / "config.yaml").read_text())
    for target_frames in (2 * EAT_FRAMES, (EAT_TABLE_COLUMNS + 1) * PATCH):
        record["model"]["audio"]["target_frames"] = target_frames
        (out / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        if target_frames <= EAT_TABLE_COLUMNS * PATCH:
            model = FineLAP.from_pretrained(out)
            with torch.no_grad():
                _, frames, _ = model.encode_audio(torch.zeros(1, target_frames, 128), torch.tensor([target_frames]))
            assert frames.shape == (1, target_frames // PATCH, EMBED)
        else:
            with pytest.raises(ModelFolderError, match=f"target_frames {target_frames} needs") as error:
                FineLAP.from_pretrained(out)
            assert str(out / "model.safetensors") in str(error.value)


def test_converted_reference_model_runs_through_finelap_eval(reference, dataset, tmp_path):  # noqa: F811
    path, text_folder, _, _, _ = reference
    model = tmp_path / "model"
    assert convert_main(["reference", str(path), "--text-encoder", str(text_folder), "--out", str(model)]) == 0
    out = tmp_path / "eval"
    assert eval_main(["--model", str(model), "--config", str(dataset / "eval.yaml"), "--out", str(out),
                      "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"toycaps", "toy50", "toysed", "toyground"} <= metrics.keys()
    assert "toycaps" in (out / "report.md").read_text()
