"""FineLAP model parts: audio encoder, text encoder, projectors, full model, model folders."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers.pre_tokenizers import ByteLevel
from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

from finelap.audio.fbank import compute_features
from finelap.config import ConfigError, ProjectorConfig, TextEncoderConfig
from finelap.models import (
    AudioEncoder,
    FineLAP,
    GlobalProjector,
    LocalProjector,
    ModelFolderError,
    TextEncoder,
    build_model,
    load_model_config,
)
from finelap.models.text_encoder import length_groups

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
SAMPLE_RATE = 16000


def tiny_config(*overrides: str):
    """configs/model/tiny.yaml with 2.56 s of audio (256 fbank frames, 16 frame tokens)."""
    return load_model_config(TINY_CONFIG, ["model.audio.target_frames=256", *overrides])


def kaldi_frame_count(num_samples: int) -> int:
    """25 ms windows every 10 ms, whole windows only (Kaldi snip_edges)."""
    return 1 + (num_samples - 400) // 160


class TextEncoderCalls:
    """Counts calls of the Hugging Face text model and records the batch it saw (a forward hook)."""

    def __init__(self, hf_model: torch.nn.Module):
        self.input_ids: list[torch.Tensor] = []
        self.handle = hf_model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.input_ids.append(kwargs["input_ids"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------- audio encoder


def test_audio_encoder_shapes_hop_and_validity_mask():
    config = tiny_config().audio
    encoder = AudioEncoder(config).eval()
    assert encoder.frame_hop_seconds == pytest.approx(0.16)
    assert encoder.num_frames == 16
    seconds = [2.0, 0.5, 3.0]  # the last is longer than the 2.56 s input and gets cropped
    lengths = torch.tensor([int(s * SAMPLE_RATE) for s in seconds])
    waveforms = torch.randn(len(seconds), int(lengths.max())) * 0.1
    features, frame_counts = compute_features(waveforms, lengths, config)
    with torch.no_grad():
        cls_token, frames, mask = encoder(features, frame_counts)
    assert cls_token.shape == (3, config.width)
    assert frames.shape == (3, 16, config.width)
    assert mask.dtype == torch.bool and mask.shape == (3, 16)
    expected_valid = [math.ceil(min(kaldi_frame_count(int(n)), 256) / 16) for n in lengths]
    assert expected_valid == [13, 3, 16]
    assert mask.sum(dim=1).tolist() == expected_valid
    for row, valid in zip(mask, expected_valid):  # valid frames form a prefix
        assert row[:valid].all() and not row[valid:].any()

    finer = AudioEncoder(dataclasses.replace(config, patch_size=8))
    assert finer.frame_hop_seconds == pytest.approx(0.08)
    assert finer.frame_mask(torch.tensor([17])).sum() == 3  # columns starting at 0, 8, 16

    with pytest.raises(ValueError, match=r"features must be \[B, 256, 128\]"):
        encoder(torch.zeros(1, 100, 128), torch.tensor([100]))


def test_frame_tokens_average_the_frequency_patches_of_each_time_column():
    """With no blocks, frame t = mean_f LayerNorm(patch(t, f) @ W + b + pos(t, f)), computed here by hand."""
    config = dataclasses.replace(tiny_config().audio, depth=0)
    encoder = AudioEncoder(config).double().eval()
    torch.nn.init.normal_(encoder.norm.weight)
    torch.nn.init.normal_(encoder.norm.bias)
    features = torch.randn(2, 256, 128, dtype=torch.float64)
    with torch.no_grad():
        cls_token, frames, _ = encoder(features, torch.tensor([256, 256]))

    width, patch = config.width, config.patch_size
    patches = features.unfold(1, patch, patch).unfold(2, patch, patch)  # [B, T=16, Fq=8, time, mel]
    kernel = encoder.patch_embed.weight[:, 0]  # [W, time, mel]
    embedded = torch.einsum("btfij,wij->btfw", patches, kernel) + encoder.patch_embed.bias

    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    time_angles = torch.arange(16, dtype=torch.float64)[:, None, None] * omega  # [T, 1, W/4]
    freq_angles = torch.arange(8, dtype=torch.float64)[None, :, None] * omega  # [1, Fq, W/4]
    position = torch.cat(
        [time_angles.sin().expand(16, 8, quarter), time_angles.cos().expand(16, 8, quarter),
         freq_angles.sin().expand(16, 8, quarter), freq_angles.cos().expand(16, 8, quarter)],
        dim=-1,
    )
    expected = encoder.norm(embedded + position).mean(dim=2)
    torch.testing.assert_close(frames, expected, rtol=1e-4, atol=1e-5)  # position embedding built in float32
    torch.testing.assert_close(cls_token, encoder.norm(encoder.cls_token[:, 0].double()).expand(2, -1))


def test_a_stored_position_table_longer_than_the_image_is_kept_whole_and_its_first_rows_added():
    """EAT stores a table for 768 time columns: an encoder of fewer columns loads it whole (so that a
    longer target_frames can use it) and adds its first T * Fq rows; a shorter one is refused."""
    config = tiny_config("model.audio.stored_positions=true").audio  # 16 time columns x 8 frequency rows
    table = torch.randn(48 * 8, config.width)
    weights = AudioEncoder(config).state_dict() | {"pos_embed": table}
    encoder, exact = AudioEncoder(config).eval(), AudioEncoder(config).eval()
    encoder.load_state_dict(weights)
    exact.load_state_dict(weights | {"pos_embed": table[: 16 * 8]})
    assert torch.equal(encoder.state_dict()["pos_embed"], table)
    features, frame_counts = torch.randn(2, 256, 128), torch.tensor([256, 90])
    with torch.no_grad():
        for got, expected in zip(encoder(features, frame_counts), exact(features, frame_counts)):
            assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match=r"pos_embed: the stored position table has 64 rows \(8 time columns of "
                                           r"16 fbank frames\), fewer than the 128 that target_frames 256 needs"):
        AudioEncoder(config).load_state_dict(weights | {"pos_embed": table[:64]})


def test_sdpa_attention_matches_explicit_softmax_attention_values_and_gradients():
    config = dataclasses.replace(tiny_config().audio, dropout=0.0)
    encoder = AudioEncoder(config).double()
    features = torch.randn(2, 256, 128, dtype=torch.float64)
    frame_counts = torch.tensor([256, 120])

    results = {}
    for impl in ("sdpa", "explicit"):
        encoder.set_attention_impl(impl)
        encoder.zero_grad()
        inputs = features.clone().requires_grad_(True)
        cls_token, frames, _ = encoder(inputs, frame_counts)
        (cls_token.pow(2).sum() + (frames * torch.linspace(-1, 1, frames.shape[-1], dtype=torch.float64)).sum()).backward()
        results[impl] = (cls_token.detach(), frames.detach(), inputs.grad,
                         {name: p.grad.clone() for name, p in encoder.named_parameters()})

    sdpa, explicit = results["sdpa"], results["explicit"]
    torch.testing.assert_close(sdpa[0], explicit[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sdpa[1], explicit[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sdpa[2], explicit[2], rtol=1e-9, atol=1e-10)
    assert sdpa[3].keys() == explicit[3].keys()
    for name in sdpa[3]:
        torch.testing.assert_close(sdpa[3][name], explicit[3][name], rtol=1e-9, atol=1e-10, msg=name)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        encoder.set_attention_impl("flash")


# ---------------------------------------------------------------- projectors


@pytest.mark.parametrize("local_type", ["transformer", "gru", "linear"])
def test_local_projector_shapes_norms_and_context(local_type):
    torch.manual_seed(0)
    config = ProjectorConfig(embed_dim=16, local_type=local_type, local_layers=1, local_heads=2,
                             local_ffn_dim=32, local_dropout=0.0)
    projector = LocalProjector(32, config).eval()
    frames = torch.randn(3, 5, 32)
    with torch.no_grad():
        out = projector(frames)
        changed = frames.clone()
        changed[:, 0] += 1.0
        out_changed = projector(changed)
    assert out.shape == (3, 5, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 5))
    # transformer and GRU mix information across frames; the linear type is per frame
    last_frame_moved = not torch.allclose(out[:, -1], out_changed[:, -1])
    assert last_frame_moved == (local_type != "linear")


def test_projector_errors_and_global_projector():
    with pytest.raises(ValueError, match="embed_dim 15 must be even"):
        LocalProjector(8, ProjectorConfig(embed_dim=15, local_type="gru"))
    projector = GlobalProjector(24, 16)
    out = projector(torch.randn(7, 24))
    assert out.shape == (7, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(7))
    first, _, second = projector.mlp
    x = torch.randn(3, 24)
    torch.testing.assert_close(projector(x), torch.nn.functional.normalize(second(first(x).clamp_min(0)), dim=-1))


# ---------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(pooling="cls", max_tokens=30)).eval()


def test_unique_string_encoding_equals_naive_encoding(minilm):
    texts = ["a dog barks", "rain", "a dog barks", "a car passes by slowly", "rain", "rain"]
    with torch.no_grad(), TextEncoderCalls(minilm.model) as calls:
        unique, _ = minilm.encode_unique(texts)
    assert len(calls.input_ids) == 1 and calls.input_ids[0].shape[0] == 3  # each distinct string once
    with torch.no_grad():
        naive, _ = minilm.encode(texts)
        one_by_one = torch.cat([minilm.encode([text])[0] for text in texts])
    assert unique.shape == (6, minilm.hidden_size) == (6, 384)
    torch.testing.assert_close(unique, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unique, one_by_one, rtol=1e-5, atol=1e-5)  # padding does not leak


def test_pooling_truncation_and_empty_batch(minilm):
    text = "glass shatters on a tiled floor"
    tokens = minilm.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.model(**tokens).last_hidden_state[0]
        encoded, _ = minilm.encode([text])
        torch.testing.assert_close(encoded[0], hidden[0])
        mean_encoder = TextEncoder(TextEncoderConfig(pooling="mean"))
        encoded, _ = mean_encoder.encode([text, "a"])
        torch.testing.assert_close(encoded[0], hidden.mean(dim=0), rtol=1e-5, atol=1e-5)

        long_text = " ".join(["word"] * 100)
        with TextEncoderCalls(minilm.model) as calls:
            minilm.encode([long_text, "short"])
        assert calls.input_ids[0].shape == (2, 30)  # truncated at max_tokens, padded to the longest
        with TextEncoderCalls(minilm.model) as calls:
            empty, _ = minilm.encode([])
        assert empty.shape == (0, 384) and len(calls.input_ids) == 1


class EmbeddingRows:
    """Records how many texts each call of the text tower's embedding layer saw (a forward hook)."""

    def __init__(self, encoder: TextEncoder):
        self.rows: list[int] = []
        encoder.model.embeddings.register_forward_hook(
            lambda module, args, kwargs, output: self.rows.append(output.shape[0]), with_kwargs=True)


@pytest.mark.parametrize("trainable_layers", [2, 0])
def test_frozen_bottom_cache_gives_the_plain_towers_outputs_and_gradients(trainable_layers):
    plain = TextEncoder(TextEncoderConfig(pooling="mean", dropout=0.0))
    cached = TextEncoder(TextEncoderConfig(pooling="mean", dropout=0.0, cache_frozen=True, cache_size=4))
    cached.load_state_dict(plain.state_dict())
    for encoder in (plain, cached):
        encoder.train_top_layers(trainable_layers)
        encoder.train()
    assert cached.frozen_bottom() == 6 - trainable_layers
    rows = EmbeddingRows(cached)
    long_text = "a short high beep then a falling chirp over distant babble"
    calls = [  # (texts, rows the frozen bottom must see: the misses, or 1 when every text is cached)
        (["a dog barks", "rising chirp", long_text, "rising chirp"], 3),
        (["rising chirp", "rain", "a dog barks", "low beep", "glass shatters"], 3),  # 2 hits; 6 > 4 evicts 2
        (["a dog barks", "rain", "low beep"], 1),
        (["a dog barks", "rising chirp", long_text], 2),  # the two least recently used were evicted
    ]
    for texts, bottom_rows in calls:
        weights = torch.randn(len(texts), 384, dtype=torch.float64)
        outputs = []
        for encoder in (plain, cached):
            encoder.zero_grad()
            out, _ = encoder.encode(texts)
            if out.requires_grad:
                (out.double() * weights).sum().backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        assert rows.rows.pop() == bottom_rows and not rows.rows
        assert cached.cached_texts <= 4
        top = [p for layer in plain.layers()[6 - trainable_layers:] for p in layer.parameters()]
        top_cached = [p for layer in cached.layers()[6 - trainable_layers:] for p in layer.parameters()]
        if top:  # float32 sums in another order: within 1e-4 of the largest gradient entry
            expected = torch.cat([p.grad.flatten() for p in top])
            got = torch.cat([p.grad.flatten() for p in top_cached])
            assert expected.abs().max() > 0 and (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    # evaluation and inference do not use the cache; loading weights empties it
    cached.eval()
    with torch.no_grad():
        torch.testing.assert_close(cached.encode(["rain", "hail"])[0], plain.eval().encode(["rain", "hail"])[0])
    assert rows.rows == [2]
    cached.load_state_dict(plain.state_dict())
    assert cached.cached_texts == 0


def make_roberta_folder(folder: Path) -> Path:
    """A tiny randomly initialised RoBERTa with a byte-level BPE tokenizer (the 256 byte symbols, no merges)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    vocab["<mask>"] = len(vocab)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    RobertaModel(config).save_pretrained(folder)
    RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


def test_roberta_folder_works(tmp_path):
    folder = make_roberta_folder(tmp_path / "roberta")
    encoder = TextEncoder(TextEncoderConfig(path=str(folder), pooling="cls", max_tokens=30)).eval()
    assert encoder.hidden_size == 32
    reference = RobertaModel.from_pretrained(folder).eval()
    texts = ["a dog barks", "rain on a tin roof at night"]
    with torch.no_grad():
        encoded, _ = encoder.encode(texts)
        for row, text in enumerate(texts):
            tokens = encoder.tokenizer([text], return_tensors="pt")
            assert tokens["input_ids"][0, 0] == 0  # RoBERTa's <s> comes first
            torch.testing.assert_close(encoded[row], reference(**tokens).last_hidden_state[0, 0], rtol=1e-5, atol=1e-5)

    config = tiny_config(f"model.text.path={folder}")
    model = FineLAP(config).eval()
    model.save_pretrained(tmp_path / "model")
    loaded = FineLAP.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts), rtol=0, atol=0)


# ---------------------------------------------------------------- FineLAP


@pytest.fixture(scope="module")
def model() -> FineLAP:
    return build_model(tiny_config(), seed=0).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory


def random_batch(batch_size: int = 2):
    torch.manual_seed(1)
    return torch.randn(batch_size, 256, 128), torch.tensor([256, 90][:batch_size])


@pytest.mark.parametrize(
    "captions, phrases",
    [
        (["a dog barks near a car", "rain"], ["dog", "rain", "dog"]),
        (["a dog barks near a car", "rain"], []),
        ([], ["dog", "car horn"]),
        ([], []),
    ],
)
def test_forward_runs_the_text_encoder_once(model, captions, phrases):
    features, frame_counts = random_batch()
    with torch.no_grad(), TextEncoderCalls(model.text_encoder.model) as calls:
        out = model(features, frame_counts, captions, phrases)
    assert len(calls.input_ids) == 1
    assert calls.input_ids[0].shape[0] == max(len(set(captions + phrases)), 1)
    assert out.padded_text_tokens == calls.input_ids[0].numel()  # one length group: [texts, longest]
    embed = model.embed_dim
    assert out.clip_embeddings.shape == (2, embed)
    assert out.frame_embeddings.shape == (2, 16, embed)
    assert out.frame_mask.sum(dim=1).tolist() == [16, 6]
    assert out.caption_embeddings.shape == (len(captions), embed)
    assert out.phrase_embeddings.shape == (len(phrases), embed)
    assert out.frame_hop_seconds == pytest.approx(0.16)
    for embeddings in (out.clip_embeddings, out.frame_embeddings, out.caption_embeddings, out.phrase_embeddings):
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(embeddings.shape[:-1]))
    with torch.no_grad():
        if captions:
            torch.testing.assert_close(out.caption_embeddings, model.encode_text(captions), rtol=1e-5, atol=1e-5)
        if phrases:
            torch.testing.assert_close(out.phrase_embeddings, model.encode_text(phrases), rtol=1e-5, atol=1e-5)
        clip, frames, mask = model.encode_audio(features, frame_counts)
    torch.testing.assert_close(out.clip_embeddings, clip)
    torch.testing.assert_close(out.frame_embeddings, frames)


def test_logit_parameters_initialisation_gradients_and_cap():
    config = tiny_config("model.init_temperature=0.05", "model.init_bias=-7.5")
    model = FineLAP(config)
    features, frame_counts = random_batch(1)
    out = model(features, frame_counts, ["a dog"], ["dog"])
    assert out.clip_scale.item() == pytest.approx(20.0) and out.frame_scale.item() == pytest.approx(20.0)
    assert out.clip_bias.item() == -7.5 and out.frame_bias.item() == -7.5
    (2 * out.clip_scale + 3 * out.clip_bias + 5 * out.frame_scale + 7 * out.frame_bias).backward()
    assert model.clip_log_scale.grad.item() == pytest.approx(2 * 20.0)  # d exp(s) / ds = exp(s)
    assert model.clip_bias.grad.item() == pytest.approx(3.0)
    assert model.frame_log_scale.grad.item() == pytest.approx(5 * 20.0)
    assert model.frame_bias.grad.item() == pytest.approx(7.0)
    with torch.no_grad():
        model.clip_log_scale.fill_(math.log(1000.0))
    assert model.logit_parameters()[0].item() == pytest.approx(100.0)  # capped as in SigLIP


def test_save_load_round_trip_gives_identical_outputs(model, tmp_path):
    with torch.no_grad():
        model.clip_log_scale.fill_(2.5)
        model.frame_bias.fill_(-3.25)
    directory = tmp_path / "saved"
    model.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["config.yaml", "model.safetensors", "text_encoder"]
    assert yaml.safe_load((directory / "config.yaml").read_text())["model"] == dataclasses.asdict(model.config)
    loaded = FineLAP.from_pretrained(directory)
    assert loaded.text_encoder.folder == directory / "text_encoder"
    assert not loaded.training

    features, frame_counts = random_batch()
    captions, phrases = ["a dog barks near a car", "rain"], ["dog", "rain"]
    with torch.no_grad():
        before = model(features, frame_counts, captions, phrases)
        after = loaded(features, frame_counts, captions, phrases)
    for field in dataclasses.fields(before):
        expected, actual = getattr(before, field.name), getattr(after, field.name)
        if isinstance(expected, torch.Tensor):
            assert torch.equal(expected, actual), field.name
        else:
            assert expected == actual, field.name
    assert float(after.clip_scale) == pytest.approx(math.exp(2.5)) and float(after.frame_bias) == -3.25


def linked_copy(source: Path, target: Path, leave_out: str | None = None) -> Path:
    """Hard-link copy of a model folder, without the file `leave_out` (relative path)."""
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if path.is_file() and relative.as_posix() != leave_out:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target / relative)
    return target


@pytest.mark.parametrize(
    "leave_out", ["config.yaml", "model.safetensors", "text_encoder/config.json", "text_encoder/tokenizer_config.json"]
)
def test_model_folder_missing_a_file_names_it(model_dir, tmp_path, leave_out):
    folder = linked_copy(model_dir, tmp_path / "model", leave_out)
    with pytest.raises(ModelFolderError, match="missing from the model folder") as error:
        FineLAP.from_pretrained(folder)
    assert str(folder / leave_out) in str(error.value)


def test_model_folder_errors_name_the_file_and_the_problem(model_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="model folder not found") as error:
        FineLAP.from_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)

    shutil.rmtree(linked_copy(model_dir, tmp_path / "no_text") / "text_encoder")
    with pytest.raises(ModelFolderError, match="missing from the model folder") as error:
        FineLAP.from_pretrained(tmp_path / "no_text")
    assert str(tmp_path / "no_text" / "text_encoder" / "config.json") in str(error.value)

    no_vocabulary = linked_copy(model_dir, tmp_path / "no_vocabulary", leave_out="text_encoder/tokenizer.json")
    with pytest.raises(ModelFolderError, match="the tokenizer has no vocabulary") as error:
        FineLAP.from_pretrained(no_vocabulary)
    assert str(no_vocabulary / "text_encoder") in str(error.value)

    unknown_key = linked_copy(model_dir, tmp_path / "unknown_key", leave_out="config.yaml")
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    config["model"]["audio"]["n_layers"] = 3
    (unknown_key / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"unknown key 'model\.audio\.n_layers'") as error:
        FineLAP.from_pretrained(unknown_key)
    assert str((unknown_key / "config.yaml").resolve()) in str(error.value)

    deeper = linked_copy(model_dir, tmp_path / "deeper", leave_out="config.yaml")
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    config["model"]["audio"]["depth"] = 3
    (deeper / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelFolderError, match="weights do not match the architecture") as error:
        FineLAP.from_pretrained(deeper)
    assert str(deeper / "model.safetensors") in str(error.value) and "blocks.2" in str(error.value)

    corrupt = linked_copy(model_dir, tmp_path / "corrupt", leave_out="model.safetensors")
    (corrupt / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelFolderError, match="not a readable safetensors file") as error:
        FineLAP.from_pretrained(corrupt)
    assert str(corrupt / "model.safetensors") in str(error.value)


def test_load_model_config_rejects_other_sections(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": {"audio": {"depth": 1}}, "optim": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match="unknown key 'optim'"):
        load_model_config(path)
    tiny = load_model_config(TINY_CONFIG, ["model.projector.local_type=gru"])
    assert tiny.audio.width == 128 and tiny.projector.local_type == "gru"


def test_length_groups_find_the_least_padding_of_any_split():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([3, 4, 4, 5, 9, 17, 23, 30]) for _ in range(rng.randint(1, 9))]
        for groups in range(1, len(lengths) + 1):
            split = length_groups(lengths, groups)
            assert len(split) == groups and all(split)
            assert sorted(index for rows in split for index in rows) == list(range(len(lengths)))
            cost = sum(len(rows) * max(lengths[i] for i in rows) for rows in split)
            # every assignment of the texts to `groups` labelled groups, none empty
            brute = min(
                sum(len(rows) * max(lengths[i] for i in rows) for rows in by_group)
                for labels in itertools.product(range(groups), repeat=len(lengths))
                for by_group in [[[i for i, g in enumerate(labels) if g == k] for k in range(groups)]]
                if all(by_group)
            ) if len(lengths) <= 5 else cost
            assert cost == brute, (lengths, groups, split)
    with pytest.raises(ValueError, match="3 texts into 4"):
        length_groups([1, 2, 3], 4)


def token_counts(encoder: TextEncoder, texts: list[str]) -> list[int]:
    """Tokens per text, special tokens included, truncated as the encoder truncates."""
    return [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=encoder.config.max_tokens)["input_ids"]]


@pytest.mark.parametrize("cache_frozen", [False, True])
def test_length_buckets_give_the_single_calls_outputs_and_gradients(cache_frozen):
    single = TextEncoder(TextEncoderConfig(pooling="mean", dropout=0.0, cache_frozen=cache_frozen))
    bucketed = TextEncoder(TextEncoderConfig(pooling="mean", dropout=0.0, cache_frozen=cache_frozen, length_buckets=2))
    bucketed.load_state_dict(single.state_dict())
    for encoder in (single, bucketed):
        encoder.train_top_layers(2)
        encoder.train()
    rows = EmbeddingRows(bucketed)
    layer_calls = []
    bucketed.layers()[-1].register_forward_hook(
        lambda module, args, kwargs, output: layer_calls.append((args[0] if args else kwargs["hidden_states"]).shape),
        with_kwargs=True)
    long_text = "a short high beep then a falling chirp over distant babble and a dog far away"
    for texts in (["rising chirp", long_text, "rain", "a dog barks at the door", "rain"], ["rain"], []):
        weights = torch.randn(len(texts), 384, dtype=torch.float64)
        outputs = []
        for encoder in (single, bucketed):
            encoder.zero_grad()
            out, padded_tokens = encoder.encode(texts)
            assert out.shape == (len(texts), 384)
            if texts:
                (out.double() * weights).sum().backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        expected = torch.cat([p.grad.flatten() for p in single.layers()[-1].parameters()]) if texts else None
        if texts:
            got = torch.cat([p.grad.flatten() for p in bucketed.layers()[-1].parameters()])
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        # the top layer runs exactly twice per call (ZeRO-3: the same on every rank), the bottom once when cached
        assert len(layer_calls) == 2
        if len(texts) >= 2:  # the short texts are padded apart from the long ones
            assert sorted(shape[1] for shape in layer_calls)[0] < max(token_counts(bucketed, texts))
        assert len(rows.rows) == (1 if cache_frozen else 2)
        # what the tower ran on, padding included: each group padded to its own longest text
        assert padded_tokens == sum(shape[0] * shape[1] for shape in layer_calls)  # the bucketed encoder's
        layer_calls.clear()
        rows.rows.clear()
    lengths = token_counts(bucketed, ["rising chirp", long_text, "rain"])
    assert bucketed.encode(["rising chirp", long_text, "rain"])[1] == 2 * max(lengths[0], lengths[2]) + lengths[1]
    assert single.encode(["rising chirp", long_text, "rain"])[1] == 3 * max(lengths)
    with pytest.raises(ValueError, match="length_buckets = 0"):
        TextEncoder(TextEncoderConfig(length_buckets=0))


def test_logit_scales_get_their_gradient_after_zero3_frees_the_parameters():
    """ZeRO-3 empties a parameter's storage after the forward pass (in a process's first step even a
    small persistent one's) and does not gather FineLAP's own parameters again for the backward (its
    output is a dataclass): the logit parameters' backward must not read them."""
    model = FineLAP(tiny_config("model.init_temperature=0.05"))
    clip_scale, clip_bias, frame_scale, frame_bias = model.logit_parameters()
    for parameter in (model.clip_log_scale, model.clip_bias, model.frame_log_scale, model.frame_bias):
        parameter.data = torch.empty(0)  # what ZeRO-3 does when it releases a parameter
    (2 * clip_scale + 3 * clip_bias + 5 * frame_scale + 7 * frame_bias).backward()
    assert model.clip_log_scale.grad.item() == pytest.approx(2 * 20.0)
    assert model.frame_log_scale.grad.item() == pytest.approx(5 * 20.0)
    assert model.clip_bias.grad.item() == 3.0 and model.frame_bias.grad.item() == 7.0
