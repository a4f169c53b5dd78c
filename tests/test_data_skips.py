"""Skipped training samples: each listed once (with where it happened in training), kept in the loader's
state across a resume; a phrase label that loses every clip to skips is refused or warned about."""
import json
import logging

import numpy
import pytest
import soundfile

from finelap.audio.io import AudioLoadError, load_audio
from finelap.bad_input import MetadataError, SkipCounter
from finelap.config import AudioEncoderConfig, Config, ConfigError, DataConfig, DataSourceConfig, load_config
from finelap.data.loader import build_train_loader
from finelap.data.training_set import load_training_set

RATE = 16000


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the training data path


def _tone(path, seconds: float = 0.5, frequency: float = 440.0):
    t = numpy.arange(int(seconds * RATE)) / RATE
    soundfile.write(path, (0.3 * numpy.sin(2 * numpy.pi * frequency * t)).astype(numpy.float32), RATE)
    return path


def _config(folder, records: list, **data_options) -> Config:
    metadata = folder / "train.jsonl"
    metadata.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    config = Config()
    options = {"batch_size": 2, "max_phrases": 4, "num_workers": 0, "annotated_fraction": 0.0, **data_options}
    config.data = DataConfig(sources=[DataSourceConfig("train", str(metadata))], **options)
    return config


def _record(audio_id: str, path: str, phrase: str) -> dict:
    return {"audio_id": audio_id, "audio_path": path, "caption": f"a {phrase}",
            "phrases": [{"phrase": phrase, "segments": [[0.1, 0.4]]}]}


@pytest.fixture
def siren_only_on_a_bad_file(tmp_path):
    """Three good 'dog' clips and the only 'siren' clip, a text file named .wav (metadata line 3)."""
    good = _tone(tmp_path / "dog.wav")
    bad = tmp_path / "siren clip.wav"
    bad.write_text("not audio, a text file renamed .wav\n")
    with pytest.raises(AudioLoadError) as caught:
        load_audio(bad, RATE)
    records = [_record("d0", good.name, "dog"), _record("d1", good.name, "dog"), _record("s", bad.name, "siren"),
               _record("d2", good.name, "dog")]
    return _config(tmp_path, records, on_bad_sample="skip"), bad, caught.value.reason


def test_the_training_loader_lists_each_skipped_clip_with_its_epoch_and_batch(siren_only_on_a_bad_file, tmp_path):
    config, bad, reason = siren_only_on_a_bad_file
    loader = build_train_loader(config)
    batches = list(loader)
    short = [number for number, batch in enumerate(batches) if len(batch.audio_ids) == 1]
    assert len(batches) == 2 and len(short) == 1  # the batch that lost the bad clip
    location = f"{tmp_path / 'train.jsonl'}:3"
    (entry,) = loader.skips.listed
    assert {key: entry[key] for key in ("key", "reason", "epoch", "batch")} == {
        "key": location, "reason": reason, "epoch": 0, "batch": short[0]}
    assert str(bad) in entry["message"] and location in entry["message"]
    loader.set_epoch(1)
    list(loader)
    assert len(loader.skips.listed) == 1  # failing again next epoch lists it no second time
    assert _jsonl(loader.skips.write_jsonl(tmp_path / "skipped.jsonl")) == [entry]


def test_the_loaders_state_carries_its_skips_across_a_resume(siren_only_on_a_bad_file):
    config, _, _ = siren_only_on_a_bad_file
    loader = build_train_loader(config)
    next(iter(loader))
    next(iter(loader))  # the second batch: the bad clip is in one of the two
    state = loader.state_dict()
    assert set(state) == {"loader", "skips"} and state["loader"]["position"] == 2  # a checkpoint's client-state keys
    resumed = build_train_loader(config)
    resumed.load_state_dict({"step": 1, "epoch": 0, **state})  # as the trainer saves and loads it
    assert resumed.position == 2 and resumed.skips.listed == loader.skips.listed and len(loader.skips.listed) == 1
    with pytest.raises(ValueError, match="'siren': 0 of 1 training clips left"):
        resumed.check_label_survival("error")


def test_a_label_whose_every_clip_failed_to_load_is_refused_or_warned(siren_only_on_a_bad_file, tmp_path, caplog):
    config, bad, _ = siren_only_on_a_bad_file
    loader = build_train_loader(config)
    assert loader.check_label_survival("error").empty == []  # nothing tried yet
    list(loader)
    with pytest.raises(ValueError, match="data.on_empty_class") as caught:
        loader.check_label_survival("error")
    message = str(caught.value)
    assert "'siren': 0 of 1 training clips left" in message and str(bad) in message
    assert f"{tmp_path / 'train.jsonl'}:3" in message and "'dog'" not in message
    with caplog.at_level(logging.WARNING, logger="finelap.data"):
        survival = loader.check_label_survival("warn")
    assert survival.as_dict() == {"dog": {"listed": 3, "kept": 3}, "siren": {"listed": 1, "kept": 0}}
    warnings = [record.getMessage() for record in caplog.records if "LABEL WITH NO" in record.getMessage()]
    assert len(warnings) == 1 and "'siren'" in warnings[0] and str(bad) in warnings[0]


def test_labels_lost_to_skipped_metadata_lines_are_refused_or_warned_at_load(tmp_path, caplog):
    lines = [
        _record("a", "a.wav", "dog"),
        {"audio_id": "b", "audio_path": "b.wav", "phrases": [{"phrase": "siren", "segments": [[0, 1]]}]},  # no caption
        {**_record("c", "c.wav", "car"), "phrases": [{"phrase": "car", "segments": [[2, 1]]},  # inverted
                                                     {"phrase": "dog", "segments": [[0, 1]]}]},
        '{"audio_id": "d", "phrases": [{"phrase": "rain"',  # malformed: its labels cannot be read
    ]
    metadata = tmp_path / "train.jsonl"
    data = _config(tmp_path, lines, on_bad_sample="skip").data
    with pytest.raises(ValueError) as caught:
        load_training_set(data, AudioEncoderConfig(), SkipCounter())
    message = str(caught.value)
    assert "2 label(s) have no training clips left (data.on_empty_class is 'error'" in message
    assert f"'car': 0 of 1 training clips left: {metadata}:3: phrases[0]: segment 0 has onset 2.0 > offset 1.0" in message
    assert f"'siren': 0 of 1 training clips left: {metadata}:2: missing field 'caption'" in message
    assert "'dog'" not in message  # one of its two clips is left

    data.on_empty_class = "warn"
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="finelap.data"):
        training_set = load_training_set(data, AudioEncoderConfig(), skips)
    assert [record.audio_id for record in training_set.records] == ["a"] and skips.total == 3
    assert training_set.loaded.as_dict() == {
        "car": {"listed": 1, "kept": 0}, "dog": {"listed": 2, "kept": 1}, "siren": {"listed": 1, "kept": 0}}
    warnings = [record.getMessage() for record in caplog.records if "LABEL WITH NO" in record.getMessage()]
    assert len(warnings) == 2 and "'car'" in warnings[0] and "'siren'" in warnings[1]

    data.on_bad_sample = "error"  # without skipping, the first bad line is the error, as before
    with pytest.raises(MetadataError, match=rf"{metadata}:2: missing field 'caption'"):
        load_training_set(data, AudioEncoderConfig(), SkipCounter())


def test_on_empty_class_is_a_checked_config_key():
    assert load_config(None, ["data.on_empty_class=warn"]).data.on_empty_class == "warn"
    assert Config().data.on_empty_class == "error"
    with pytest.raises(ConfigError, match=r"data\.on_empty_class.*must be one of \['error', 'warn'\]"):
        load_config(None, ["data.on_empty_class=skip"])
