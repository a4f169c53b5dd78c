"""Skipped training samples: each listed once (with where it happened), written as JSON lines, kept across a
resume and across ranks; a phrase label that loses every clip to skips is refused or warned about."""
import json
import logging

import numpy
import pytest
import soundfile
import torch

from finelap.audio.io import AudioLoadError, load_audio
from finelap.config import AudioEncoderConfig, Config, ConfigError, DataConfig, DataSourceConfig, load_config
from finelap.data.loader import build_train_loader
from finelap.data.metadata import MetadataError
from finelap.data.training_set import check_label_survival, load_training_set
from finelap.data.skips import Skip, SkipCounter, gather_skips
from tests.train_fixtures import spawn_ranks

RATE = 16000


def _skip(key: str, reason: str = "audio_truncated") -> Skip:
    return Skip(key, reason, f"{key}: clip.wav: {reason}")


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the counter


def test_every_skipped_sample_is_listed_once_with_where_it_happened(tmp_path):
    skips = SkipCounter()
    skips.record(_skip("m.jsonl:4"), epoch=0, batch=3)
    skips.record(_skip("m.jsonl:4"), epoch=1, batch=0)  # the same clip failing again next epoch
    skips.record(_skip("m.jsonl:9", "malformed_json"))  # read while loading: no epoch or batch
    expected = [
        {"key": "m.jsonl:4", "reason": "audio_truncated", "message": "m.jsonl:4: clip.wav: audio_truncated",
         "epoch": 0, "batch": 3},
        {"key": "m.jsonl:9", "reason": "malformed_json", "message": "m.jsonl:9: clip.wav: malformed_json"},
    ]
    assert skips.listed == expected
    assert skips.counts == {"audio_truncated": 1, "malformed_json": 1} and skips.keys == {"m.jsonl:4", "m.jsonl:9"}
    assert _jsonl(skips.write_jsonl(tmp_path / "run" / "skipped.jsonl")) == expected
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["skipped.jsonl"]  # no temporary file left


def test_a_resumed_counter_neither_relists_nor_loses_a_skip(tmp_path):
    before = SkipCounter()
    before.record(_skip("m.jsonl:2"), epoch=0, batch=1)
    before.record(_skip("m.jsonl:5", "audio_empty"), epoch=0, batch=4)
    torch.save({"skips": before.state_dict()}, tmp_path / "state.pt")  # as a checkpoint's client state

    resumed = SkipCounter()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["skips"])
    resumed.record(_skip("m.jsonl:2"), epoch=1, batch=0)  # the resumed run meets the same clip again
    resumed.record(_skip("m.jsonl:7"), epoch=1, batch=2)
    assert resumed.listed == before.listed + [
        {"key": "m.jsonl:7", "reason": "audio_truncated", "message": "m.jsonl:7: clip.wav: audio_truncated",
         "epoch": 1, "batch": 2}
    ]
    assert resumed.counts == {"audio_empty": 1, "audio_truncated": 2}

    # a checkpoint from before skips were listed: counted and not re-counted, nothing to list
    old = SkipCounter()
    old.load_state_dict({"seen": ["m.jsonl:2"], "counts": {"audio_truncated": 1}})
    old.record(_skip("m.jsonl:2"))
    assert old.counts == {"audio_truncated": 1} and old.listed == []


def test_merge_adds_another_ranks_skips_once():
    rank0, rank1 = SkipCounter(), SkipCounter()
    rank0.record(_skip("m.jsonl:2"), epoch=0, batch=0)
    rank1.record(_skip("m.jsonl:3"), epoch=0, batch=1)
    rank1.record(_skip("m.jsonl:2"), epoch=1, batch=5)  # rank 1 met the clip rank 0 already listed
    rank0.merge(rank1.state_dict())
    assert [(entry["key"], entry["batch"]) for entry in rank0.listed] == [("m.jsonl:2", 0), ("m.jsonl:3", 1)]
    assert rank0.counts == {"audio_truncated": 2}


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    skips = SkipCounter()
    skips.record(_skip("m.jsonl:1"), epoch=0, batch=0)  # both ranks met this clip
    skips.record(_skip(f"m.jsonl:{10 + rank}"), epoch=0, batch=rank)
    gather_skips(skips)
    torch.save(skips.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_gives_every_rank_the_skips_of_all_ranks(tmp_path):
    states = spawn_ranks(_gather_worker, tmp_path, 2, 120, "the 2 gloo ranks")
    assert states[0] == states[1]  # what rank 0 checkpoints holds every rank's skips
    assert [entry["key"] for entry in states[0]["listed"]] == ["m.jsonl:1", "m.jsonl:10", "m.jsonl:11"]
    assert states[0]["counts"] == {"audio_truncated": 3}


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


def test_a_label_whose_every_clip_failed_to_load_is_refused_or_warned(siren_only_on_a_bad_file, tmp_path, caplog):
    config, bad, _ = siren_only_on_a_bad_file
    loader = build_train_loader(config)
    training_set = loader.builder.training_set
    assert check_label_survival(training_set, loader.skips, "error").empty == []  # nothing tried yet
    list(loader)
    with pytest.raises(ValueError, match="data.on_empty_class") as caught:
        check_label_survival(training_set, loader.skips, "error")
    message = str(caught.value)
    assert "'siren': 0 of 1 training clips left" in message and str(bad) in message
    assert f"{tmp_path / 'train.jsonl'}:3" in message and "'dog'" not in message
    with caplog.at_level(logging.WARNING, logger="finelap.data"):
        survival = check_label_survival(training_set, loader.skips, "warn")
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
