"""Typed config loading: sections, includes, overrides and the errors users meet."""
from pathlib import Path

import pytest

from finelap.config import Config, ConfigError, ModelConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_model_configs_load_with_reference_sizes():
    base = load_config(REPO / "configs/model/eat_base.yaml").model
    assert (base.audio.width, base.audio.depth, base.audio.heads) == (768, 12, 12)
    assert (base.audio.target_frames, base.audio.num_mel_bins, base.audio.patch_size) == (1024, 128, 16)
    assert base.projector.embed_dim == 1024 and base.projector.local_ffn_dim == 4096
    assert base.init_temperature == 0.1 and base.init_bias == -10.0
    eat = base.audio  # EAT-base's own architecture, so its pretrained weights load (tests/test_convert.py)
    assert (eat.block_norm, eat.embedding_norm, eat.final_norm, eat.norm_eps, eat.position_layout,
            eat.stored_positions, eat.init_from) == ("post", True, False, 1e-6, "freq_first", True, None)
    assert load_config(REPO / "configs/train/eat_base.yaml").model.audio == eat
    tiny = load_config(REPO / "configs/model/tiny.yaml").model
    assert tiny.audio.width < base.audio.width and tiny.audio.patch_size == 16


def test_defaults_without_a_file():
    config = load_config()
    assert isinstance(config, Config) and config.loss.frame_negatives == "batch"


def test_include_and_override(tmp_path):
    (tmp_path / "base.yaml").write_text("loss:\n  alpha: 0.5\ndata:\n  batch_size: 8\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\ndata:\n  batch_size: 16\n")
    config = load_config(tmp_path / "run.yaml", ["optim.lr=1e-3", "loss.mode=clip_only", "data.sources=[{name: a, path: a.jsonl}]"])
    assert config.loss.alpha == 0.5
    assert config.data.batch_size == 16  # the including file wins over the include
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.loss.mode == "clip_only"
    assert config.data.sources[0].name == "a" and config.data.sources[0].weight == 1.0


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  audio:\n    widht: 12\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'model\.audio\.widht'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("model:\n  audio:\n    depth: two\n", "model.audio.depth"),
        ("model:\n  audio:\n    depth: 2.5\n", "model.audio.depth"),
        ("loss:\n  mode: triple\n", "loss.mode"),
        ("optim:\n  freeze_audio_encoder: 1\n", "optim.freeze_audio_encoder"),
        ("data:\n  sources: {name: a}\n", "data.sources"),
        ("data:\n  sources: [{name: a}]\n", "data.sources[0]"),
        ("deepspeed:\n  zero_stage: 4\n", "deepspeed.zero_stage"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, text, key):
    path = tmp_path / "typed.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert key in str(error.value) and "typed.yaml" in str(error.value)


def test_override_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--set optim.learning_rate=1.*unknown key .optim.learning_rate."):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["optim.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(path)


def test_section_loading():
    model = load_config(REPO / "configs/model/tiny.yaml", section=Config).model
    assert isinstance(model, ModelConfig)
