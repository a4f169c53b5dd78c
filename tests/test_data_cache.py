"""The metadata converted once into mapped arrays, and the shards' offsets read from their index files: what
they give equals what parsing the files and scanning the tars gives, and they follow the files they come from."""
import json
import logging
import multiprocessing
import os
import pickle
import re
import tarfile
import time
from pathlib import Path

import numpy
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader, Dataset

from finelap.bad_input import MetadataError, SkipCounter
from finelap.config import AudioEncoderConfig, Config, DataConfig, DataSourceConfig
from finelap.data.clip_table import open_clip_table
from finelap.data.loader import build_train_loader
from finelap.data.mapped_cache import load_or_build
from finelap.data.metadata import iter_metadata, read_metadata
from finelap.data.shards import ShardIndex, pack_shards, shard_index_lines
from finelap.data.training_set import load_training_set

RATE = 16000

LINES = [
    {"audio_id": "a", "audio_path": "clips/a.wav", "caption": "un chien aboie près d'un café ☕ — 犬",
     "phrases": [{"phrase": "dog barking", "segments": [[0.5, 1.25], [3, 4]]}, {"phrase": "wind"}]},
    {"audio_id": "b", "audio_path": "/abs/b.flac", "caption": ["rain on a roof", "Regen 🌧"]},  # no phrases
    "",
    {"audio_id": "c", "audio_path": "./c.wav", "caption": "a car", "extra": 1,
     "phrases": [{"phrase": "car", "segments": [[-0.5, 2.0]]}, {"phrase": "Dog  Barking", "segments": []}]},
    '{"audio_id": "d", "phrases": [{"phrase": "siren"',  # malformed
    {"audio_id": "e", "audio_path": "e.wav", "caption": "",  # empty caption: unusable, names its phrase
     "phrases": [{"phrase": "siren", "segments": [[0, 1]]}]},
    {"audio_id": "f", "audio_path": "f.wav", "caption": "wind and a car",
     "phrases": [{"phrase": "wind", "segments": [[0, 10]]}, {"phrase": "car", "segments": [[2, 1]]}]},  # inverted
    {"audio_id": "g", "audio_path": "g.wav", "caption": "gulls", "phrases": [{"phrase": "gull", "segments": None}]},
]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def comparable(stream):
    """iter_metadata's (record or error, warnings) per line, with errors as (location, reason, message, phrases)."""
    return [
        ((item.location, item.reason, str(item), item.phrases) if isinstance(item, MetadataError) else item, warnings)
        for item, warnings in stream
    ]


def cache_writes(caplog) -> int:
    return sum("writing its metadata cache" in record.getMessage() for record in caplog.records)


def test_the_table_gives_what_parsing_gives_converted_and_mapped(tmp_path, caplog):
    path = write_lines(tmp_path / "train.jsonl", LINES)
    expected = comparable(iter_metadata(path, "train"))
    assert [type(item).__name__ for item, _ in expected] == ["ClipRecord", "ClipRecord", "ClipRecord", "tuple",
                                                              "tuple", "tuple", "ClipRecord"]
    assert expected[2][1][0].kind == "negative_segment"  # a warning, kept with its line
    with caplog.at_level(logging.INFO, logger="finelap.data"):
        converted = open_clip_table(path, "train")
        mapped = open_clip_table(path, "train")
    assert cache_writes(caplog) == 1  # the second open maps what the first wrote
    assert isinstance(mapped.segments.base, numpy.memmap)
    assert mapped.columns.folder.parent == Path(f"{path}.finelap-cache")
    for table in (converted, mapped):
        assert comparable(table.iter_lines()) == expected
        assert [table.record(row) for row in range(len(table))] == read_metadata(path, "train", on_bad_sample="skip")
    assert mapped.record(0).captions == ("un chien aboie près d'un café ☕ — 犬",)
    assert mapped.record(2).phrases[0].segments == ((0.0, 2.0),) and mapped.record(2).phrases[1].weak
    # the audio root is applied when a record is read, so another one needs no new conversion
    rooted = open_clip_table(path, "train", audio_root=tmp_path / "audio")
    assert [rooted.record(row) for row in range(len(rooted))] == read_metadata(
        path, "train", audio_root=tmp_path / "audio", on_bad_sample="skip")


def test_an_edited_file_is_read_again_even_with_its_size_and_mtime_kept(tmp_path, caplog):
    path = write_lines(tmp_path / "train.jsonl", [{"audio_id": "x1", "audio_path": "a.wav", "caption": "dog"}])
    before = path.stat()
    assert open_clip_table(path, "train").record(0).audio_id == "x1"
    path.write_text(path.read_text().replace("x1", "y2"))  # same size, other bytes
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    with caplog.at_level(logging.INFO, logger="finelap.data"):
        assert open_clip_table(path, "train").record(0).audio_id == "y2"
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # touched: read again
        assert open_clip_table(path, "train").record(0).audio_id == "y2"
    assert cache_writes(caplog) == 2
    assert len(list(Path(f"{path}.finelap-cache").glob("key-*"))) == 1  # older versions are removed


def test_skips_and_errors_from_the_cache_name_the_original_lines(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", LINES)
    data = DataConfig(sources=[DataSourceConfig("train", str(path))], on_bad_sample="skip", on_empty_class="warn",
                      max_phrases=4)
    runs = []
    for _ in range(2):  # the first converts, the second maps
        skips = SkipCounter()
        training_set = load_training_set(data, AudioEncoderConfig(), skips)
        runs.append((skips.listed, [record.location for record in training_set.records],
                     training_set.loaded.as_dict(), training_set.annotated.tolist()))
    assert runs[0] == runs[1]
    listed, locations, loaded, annotated = runs[0]
    assert [(entry["key"], entry["reason"]) for entry in listed] == [
        (f"{path}:5", "malformed_json"), (f"{path}:6", "empty_caption"), (f"{path}:7", "inverted_segment")]
    assert locations == [f"{path}:{line}" for line in (1, 2, 4, 8)] and annotated == [True, False, True, False]
    assert loaded["siren"] == {"listed": 1, "kept": 0} and loaded["wind"] == {"listed": 2, "kept": 1}
    data.on_bad_sample = "error"
    with pytest.raises(MetadataError, match=rf"^{path}:5: malformed JSON"):
        load_training_set(data, AudioEncoderConfig(), SkipCounter())


def test_a_clip_failing_the_label_checks_is_found_among_the_mapped_records(tmp_path):
    crowded = {"audio_id": "z", "audio_path": "z.wav", "caption": "many",
               "phrases": [{"phrase": f"p{n}", "segments": [[0, 1]]} for n in range(3)]}
    path = write_lines(tmp_path / "train.jsonl", [LINES[0], crowded, LINES[1]])
    data = DataConfig(sources=[DataSourceConfig("train", str(path))], max_active=2)
    with pytest.raises(MetadataError, match=rf"^{path}:2: 3 clusters sound at frame 0 > data.max_active = 2"):
        load_training_set(data, AudioEncoderConfig(), SkipCounter())
    data.on_bad_sample, data.on_empty_class = "skip", "warn"
    skips = SkipCounter()
    training_set = load_training_set(data, AudioEncoderConfig(), skips)
    assert [record.audio_id for record in training_set.records] == ["a", "b"] and skips.counts == {"too_many_active": 1}


def _tone(path: Path, seconds: float, frequency: float) -> Path:
    t = numpy.arange(int(seconds * RATE)) / RATE
    soundfile.write(path, (0.3 * numpy.sin(2 * numpy.pi * frequency * t)).astype(numpy.float32), RATE)
    return path


def _audio_config(folder: Path, **data_options) -> Config:
    lines = []
    for n in range(16):
        _tone(folder / f"clip{n}.wav", 0.4 + 0.1 * (n % 5), 200 + 40 * n)
        line = {"audio_id": f"id{n}", "audio_path": f"clip{n}.wav", "caption": [f"tone {n}", f"note {n}"]}
        if n % 3 == 0:
            line["phrases"] = [{"phrase": "tone", "segments": [[0.1, 0.3]]}, {"phrase": f"hum {n % 2}"}]
        lines.append(line)
    metadata = write_lines(folder / "train.jsonl", lines)
    bank = write_lines(folder / "bank.jsonl", [{"phrase": "tone", "alternatives": ["tone", "beep"]},
                                               {"phrase": "hum 0", "alternatives": []},
                                               {"phrase": "noise", "alternatives": []}])
    config = Config()
    options = {"batch_size": 4, "max_phrases": 3, "num_workers": 0, **data_options}
    config.data = DataConfig(sources=[DataSourceConfig("train", str(metadata))], phrase_bank=str(bank), **options)
    return config


def _batches(config: Config) -> list:
    """Every batch of two epochs, as dicts of fields."""
    loader, batches = build_train_loader(config), []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches += [vars(batch) for batch in loader]
    return batches


def _assert_same_batches(first: list, second: list) -> None:
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one.keys() == other.keys()
        for name, value in one.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[name]), name
            else:
                assert value == other[name], name


def test_training_batches_are_the_same_with_and_without_a_cache(tmp_path, caplog):
    config = _audio_config(tmp_path, num_workers=2)
    metadata = Path(config.data.sources[0].path)
    cached = _batches(config)
    assert (Path(f"{metadata}.finelap-cache")).is_dir()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "train.jsonl").write_bytes(metadata.read_bytes())
    (other / "train.jsonl.finelap-cache").write_text("a file where the cache folder would go\n")
    config.data.sources[0].path = str(other / "train.jsonl")
    config.data.audio_root = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="finelap.data"):
        in_memory = _batches(config)
    notes = [r.getMessage() for r in caplog.records if "no metadata cache could be written" in r.getMessage()]
    assert len(notes) == 1 and "set data.cache_dir" in notes[0]
    _assert_same_batches(cached, in_memory)
    config.data.cache_dir = str(tmp_path / "caches")  # the fallback folder for a metadata folder that cannot be written
    _assert_same_batches(cached, _batches(config))
    assert len(list((tmp_path / "caches").glob("train.jsonl-*.finelap-cache/key-*"))) == 1


class _RecordsSeenByWorkers(Dataset):
    def __init__(self, training_set, cache_folder: Path) -> None:
        self.training_set = training_set
        self.cache_folder = str(cache_folder)

    def __len__(self) -> int:
        return len(self.training_set)

    def __getitem__(self, index: int):
        record = self.training_set.records[index]
        mapped = self.cache_folder in Path("/proc/self/maps").read_text()
        return os.getpid(), record, mapped


def test_forked_dataloader_workers_read_the_records_from_the_mapped_cache(tmp_path):
    config = _audio_config(tmp_path)
    training_set = load_training_set(config.data, config.model.audio, SkipCounter())
    cache_folder = Path(f"{config.data.sources[0].path}.finelap-cache")
    loader = DataLoader(_RecordsSeenByWorkers(training_set, cache_folder), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    seen = list(loader)
    assert {pid for pid, _, _ in seen} - {os.getpid()} and all(mapped for _, _, mapped in seen)
    assert [record for _, record, _ in seen] == read_metadata(config.data.sources[0].path, "train")


def test_a_mapped_table_is_pickled_as_its_folder(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", LINES * 200)
    table = open_clip_table(path, "train", audio_root=tmp_path / "audio")
    pickled = pickle.dumps(table)
    assert len(pickled) < 2000  # a spawned worker maps the folder again instead of receiving a copy of the arrays
    again = pickle.loads(pickled)
    assert [again.record(row) for row in range(len(again))] == [table.record(row) for row in range(len(table))]


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def _open_concurrently(path: Path, built: Path, start, results) -> None:
    def build():
        with built.open("a") as out:
            out.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a slow conversion: the others arrive while it runs
        return {"numbers": numpy.arange(5)}, {"source": path.name}

    messages = _Messages()
    data_logger = logging.getLogger("finelap.data")
    data_logger.addHandler(messages)
    data_logger.setLevel(logging.INFO)
    start.wait()
    columns = load_or_build(path, "k1", build, None, "test cache")
    results.put((columns.folder, columns["numbers"].tolist(), columns.document("source"), messages.messages))


def test_one_process_converts_while_the_others_wait_and_map_its_cache(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", LINES)
    built = tmp_path / "built-by"
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_open_concurrently, args=(path, built, start, results)) for _ in range(4)]
    for process in processes:
        process.start()
    seen = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join()
    assert len(built.read_text().splitlines()) == 1
    assert [found[:3] for found in seen] == [(Path(f"{path}.finelap-cache") / "key-k1", [0, 1, 2, 3, 4],
                                              "train.jsonl")] * 4
    assert sorted(item.name for item in Path(f"{path}.finelap-cache").iterdir()) == ["key-k1", "lock"]
    # the one converting says so and how long it took; the others say they wait (none is silent while it waits)
    writing = [f"{path}: writing its test cache to {path}.finelap-cache/key-k1 (once; later runs map it)"]
    waiting = [f"{path}: another process is writing its test cache; waiting to map it"]
    messages = sorted((found[3] for found in seen), key=len, reverse=True)
    assert messages[0][0] == writing[0] and re.fullmatch(rf"{re.escape(str(path))}: test cache written in "
                                                          r"\d+\.\d s", messages[0][1]) and len(messages[0]) == 2
    assert messages[1:] == [waiting] * 3


# ---------------------------------------------------------------- shard index


@pytest.fixture
def packed(tmp_path):
    """Seven clips packed three to a shard by `pack_shards` (which writes the index files)."""
    folder = tmp_path / "clips"
    folder.mkdir()
    lines = [{"audio_id": f"clip-{n}", "audio_path": _tone(folder / f"c{n}.wav", 0.2 + 0.05 * n, 300).name,
              "caption": "a tone"} for n in range(7)]
    metadata = write_lines(folder / "train.jsonl", lines)
    out = tmp_path / "shards"
    pack_shards([("train", str(metadata), read_metadata(metadata, "train"))], out, 3)
    return out


def _scanned_members(folder: Path) -> dict:
    """audio_id -> (tar, member name, data offset, size), from reading every tar's headers."""
    manifest = json.loads((folder / "shards.json").read_text())
    members = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["tar"]) as archive:
            infos = [info for info in archive if not info.name.endswith(".json")]
        for audio_id, info in zip(shard["audio_ids"], infos, strict=True):
            members[audio_id] = (str(folder / shard["tar"]), info.name, info.offset_data, info.size)
    return members


def _members(index: ShardIndex, audio_ids) -> dict:
    return {audio_id: tuple(vars(index.member(audio_id)).values()) for audio_id in audio_ids}


def test_the_shard_index_reads_the_offsets_that_scanning_the_tars_finds(packed, caplog):
    scanned = _scanned_members(packed)
    with caplog.at_level(logging.INFO, logger="finelap.data"):
        index = ShardIndex(packed)
        again = ShardIndex(packed)
    assert sum("writing its shard offsets cache" in r.getMessage() for r in caplog.records) == 1
    assert _members(index, scanned) == _members(again, scanned) == scanned and index.num_samples == 7
    assert index.read(index.member("clip-4")) == (packed.parent / "clips" / "c4.wav").read_bytes()
    assert index.key_of("clip-6") == 6 and index.key_of("not packed") == -1
    assert pickle.loads(pickle.dumps(index)).member("clip-4") == index.member("clip-4")
    with pytest.raises(KeyError, match="audio_id 'not packed' is not in the shards"):
        index.member("not packed")
    # the index files rebuilt from a tar are the ones packing writes (the ones DALI writes: test_data_workers.py)
    for shard in sorted(packed.glob("shard-*.tar")):
        assert "\n".join(shard_index_lines(shard)) + "\n" == shard.with_suffix(".idx").read_text()


def test_a_missing_or_stale_shard_index_is_rebuilt_once_with_a_message(packed, caplog):
    ShardIndex(packed)
    written_by_dali = (packed / "shard-000001.idx").read_text()
    (packed / "shard-000001.idx").unlink()
    tar = packed / "shard-000002.tar"
    os.utime(tar, ns=(tar.stat().st_atime_ns, (packed / "shard-000002.idx").stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="finelap.data"):
        index = ShardIndex(packed)
        ShardIndex(packed)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert f"shard {packed / 'shard-000001.tar'}: its index {packed / 'shard-000001.idx'} is missing" in messages[0]
    assert f"shard {tar}: its index {packed / 'shard-000002.idx'} is older than the shard" in messages[1]
    assert (packed / "shard-000001.idx").read_text() == written_by_dali
    assert _members(index, _scanned_members(packed)) == _scanned_members(packed)


def test_a_corrupt_shard_index_is_an_error_naming_it(packed):
    idx = packed / "shard-000001.idx"
    idx.write_text("\n".join(idx.read_text().splitlines()[:-1]) + "\n")  # cut short: a sample missing
    with pytest.raises(ValueError, match=rf"{idx}: not a readable shard index \(2 samples listed, the first line says"):
        ShardIndex(packed)
    idx.write_text("v1.2 1\nwav 512 not-a-size 000000003.wav\n")
    with pytest.raises(ValueError, match=rf"{idx}: not a readable shard index \(line 2: member '000000003.wav'"):
        ShardIndex(packed)
