"""DataLoader input path on real audio files: batches, resume, shards, bad audio, the `finelap data` CLI."""
import json
import tarfile

import numpy
import pytest
import soundfile
import torch
import torchaudio

from finelap.audio.io import AudioLoadError
from finelap.config import Config, DataConfig, DataSourceConfig
from finelap.data.loader import build_train_loader
from finelap.data.shards import MANIFEST_NAME
from finelap.data.training_set import BatchBuilder
from finelap.data_cli import main as data_cli

BANK = [{"phrase": "dog", "alternatives": ["dog", "dog barking"]}, {"phrase": "car", "alternatives": ["car"]},
        {"phrase": "siren", "alternatives": ["siren"]}, {"phrase": "rain", "alternatives": ["rain"]}]
RATES = (8000, 16000, 44100)


def write_audio_set(folder, count=12, seconds=(0.6, 1.3, 2.1)):
    """`count` clips at mixed rates (8k/16k/44.1k), channels (1/2) and formats (WAV/FLAC); every other one annotated."""
    rng = numpy.random.default_rng(0)
    records = []
    for i in range(count):
        rate, channels = RATES[i % 3], 1 + (i // 3) % 2
        name = f"clip{i:02d}.{'flac' if i % 2 else 'wav'}"
        samples = rng.uniform(-0.5, 0.5, (int(rate * seconds[i % 3]), channels)).astype(numpy.float32)
        soundfile.write(folder / name, samples, rate)
        record = {"audio_id": f"id{i}", "audio_path": name, "caption": f"caption {i}"}
        if i % 2 == 0:
            record["phrases"] = [{"phrase": "dog barking", "segments": [[0.1, 0.45]]},
                                 {"phrase": "car", "segments": [[0.32, 5.0]]}, {"phrase": "rain"}]
        records.append(record)
    return records


def write_jsonl(path, entries):
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return path


def make_config(folder, records, **data_options):
    metadata = write_jsonl(folder / "train.jsonl", records)
    bank = write_jsonl(folder / "bank.jsonl", BANK)
    config = Config()
    options = {"batch_size": 4, "max_phrases": 4, "num_workers": 0, **data_options}
    config.data = DataConfig(sources=[DataSourceConfig("train", str(metadata))], phrase_bank=str(bank), **options)
    return config


def reference_waveform(path):
    """Independent decode: soundfile, channel mean, torchaudio resample to 16 kHz."""
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples).mean(1)
    return torchaudio.functional.resample(mono, rate, 16000) if rate != 16000 else mono


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return folder, write_audio_set(folder)


def all_batches(loader):
    return [batch for batch in loader]


def test_dataloader_batches_hold_the_decoded_clips_and_their_labels(audio_set):
    folder, records = audio_set
    config = make_config(folder, records)
    loader = build_train_loader(config, rank=1, world_size=2)
    batches = all_batches(loader)
    assert len(batches) == len(records) // 8
    builder = BatchBuilder(loader.builder.training_set, config.model.audio, config.data)
    for batch in batches:
        assert batch.waveforms.shape == (4, 160000) and batch.waveforms.dtype == torch.float32
        assert batch.annotated.sum() >= 1  # annotated_fraction 0.25 of 4
        for row, index in enumerate(batch.sample_index.tolist()):
            expected = reference_waveform(folder / records[index]["audio_path"])
            length = int(batch.lengths[row])
            assert batch.audio_ids[row] == records[index]["audio_id"] and length == expected.shape[0]
            torch.testing.assert_close(batch.waveforms[row, :length], expected, atol=2e-4, rtol=0)
            assert (batch.waveforms[row, length:] == 0).all()
        rebuilt = builder.build(batch.sample_index, batch.waveforms, batch.lengths, epoch=0)
        for name in ("phrases", "captions"):
            assert getattr(rebuilt, name) == getattr(batch, name)
        for name in ("phrase_id", "phrase_cluster", "frame_active", "frame_ignore", "clip_phrase_index"):
            assert torch.equal(getattr(rebuilt, name), getattr(batch, name)), name
        dog = loader.builder.training_set.bank.cluster_of("dog")
        for row in batch.annotated.nonzero().flatten().tolist():  # [0.1, 0.45) s covers half or more of
            has_dog = (batch.frame_active[row] == dog).any(-1)  # frames 1 and 2, 0.06 s of frame 0
            assert has_dog.nonzero().flatten().tolist() == [1, 2]


def test_resume_with_worker_processes_continues_where_training_stopped(audio_set):
    folder, records = audio_set
    records = records * 3  # 36 clips: 9 batches of 4 on one rank
    records = [dict(r, audio_id=f"{r['audio_id']}-{n}") for n, r in enumerate(records)]
    config = make_config(folder, records, num_workers=2)
    full = [b.sample_index.tolist() for b in build_train_loader(config, epoch=1)]
    assert len(full) == 9
    interrupted = build_train_loader(config, epoch=1)
    taken = []
    for batch in interrupted:  # the workers have prefetched further than this
        taken.append(batch.sample_index.tolist())
        if len(taken) == 3:
            break
    state = interrupted.state_dict()
    assert state["loader"]["position"] == 3 and state["loader"]["epoch"] == 1
    resumed = build_train_loader(config)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert taken + [b.sample_index.tolist() for b in resumed] == full
    resumed.set_epoch(2)
    assert [b.sample_index.tolist() for b in resumed] != full


def test_packed_shards_give_the_same_batches(audio_set, tmp_path):
    folder, records = audio_set
    config = make_config(folder, records)
    out = tmp_path / "shards"
    assert data_cli(["pack", "--metadata", config.data.sources[0].path, "--out", str(out), "--shard-size", "5"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [s["tar"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all((out / s["index"]).stat().st_size > 0 for s in manifest["shards"])
    with tarfile.open(out / "shard-000001.tar") as archive:
        assert archive.getnames()[:2] == ["000000005.flac", "000000005.json"]
        member = json.loads(archive.extractfile("000000005.json").read())
        assert member["audio_id"] == "id5" and member["audio_path"] == "000000005.flac"
        assert archive.extractfile("000000005.flac").read() == (folder / "clip05.flac").read_bytes()
    from_files = all_batches(build_train_loader(config))
    config.data.shards = str(out)
    from_shards = all_batches(build_train_loader(config))
    for a, b in zip(from_files, from_shards, strict=True):
        assert a.audio_ids == b.audio_ids and a.phrases == b.phrases
        assert torch.equal(a.waveforms, b.waveforms) and torch.equal(a.frame_active, b.frame_active)


def bad_audio_files(folder):
    """(file name, skip reason, message part) for each kind of unusable audio; writes the files."""
    rate = 16000
    good = numpy.random.default_rng(1).uniform(-0.5, 0.5, rate).astype(numpy.float32)
    soundfile.write(folder / "full.wav", good, rate)
    data = (folder / "full.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    soundfile.write(folder / "short.wav", good[: rate // 20], rate)  # 50 ms
    with_nan = good.copy()
    with_nan[100] = numpy.nan
    soundfile.write(folder / "nan.wav", with_nan, rate, subtype="FLOAT")
    return [
        ("missing.wav", "audio_missing", "not found"),
        ("truncated.wav", "audio_truncated", "truncated"),
        ("empty.wav", "audio_empty", "empty"),
        ("corrupt.flac", "audio_unreadable", "cannot decode"),
        ("short.wav", "audio_too_short", "too short"),
        ("nan.wav", "audio_nonfinite", "NaN"),
    ]


def test_bad_audio_raises_naming_file_and_metadata_line(tmp_path):
    cases = bad_audio_files(tmp_path)
    good = {"audio_id": "good", "audio_path": "full.wav", "caption": "fine"}
    for name, _, text in cases:
        records = [good, {"audio_id": "bad", "audio_path": name, "caption": "broken"}] + [good] * 2
        records = [dict(r, audio_id=f"{r['audio_id']}{n}") for n, r in enumerate(records)]
        config = make_config(tmp_path, records)
        with pytest.raises(AudioLoadError) as caught:
            all_batches(build_train_loader(config))
        message = str(caught.value)
        assert str(tmp_path / name) in message and text in message
        assert f"{tmp_path / 'train.jsonl'}:2" in message


def test_skip_mode_drops_bad_audio_and_counts_per_reason(tmp_path):
    cases = bad_audio_files(tmp_path)
    records = [{"audio_id": f"bad{n}", "audio_path": name, "caption": "broken"} for n, (name, _, _) in enumerate(cases)]
    records += [{"audio_id": f"good{n}", "audio_path": "full.wav", "caption": "fine"} for n in range(9)]
    records.insert(3, '{"audio_id": "half a line"')
    config = make_config(tmp_path, records, on_bad_sample="skip", batch_size=5, num_workers=2, annotated_fraction=0.0)
    loader = build_train_loader(config)
    batches = all_batches(loader)
    assert len(batches) == 15 // 5  # 15 usable lines: one epoch is a permutation of them
    loaded = [audio_id for batch in batches for audio_id in batch.audio_ids]
    assert sorted(loaded) == [f"good{n}" for n in range(9)]  # every bad clip left out, never replaced
    for batch in batches:
        assert batch.waveforms.shape[0] == len(batch.audio_ids) == int(batch.lengths.numel())
        assert (batch.lengths > 0).all() and all(batch.waveforms[i, :16000].abs().sum() > 0 for i in range(len(batch.audio_ids)))
    expected = {reason: 1 for _, reason, _ in cases} | {"malformed_json": 1}
    assert loader.skips.counts == dict(sorted(expected.items()))
    all_batches(loader)  # same clips fail again next time: still counted once each
    assert loader.skips.total == len(cases) + 1


def test_skip_reason_comes_from_the_error_not_the_file_path(tmp_path):
    """The reason travels on the error as data: a path full of words the messages use ("Info",
    "NaN", "not found", "empty") does not change how a truncated file is counted."""
    folder = tmp_path / "Info NaN not found empty"
    folder.mkdir()
    rate = 16000
    soundfile.write(folder / "full.wav", numpy.random.default_rng(2).uniform(-0.5, 0.5, rate).astype(numpy.float32),
                    rate)
    data = (folder / "full.wav").read_bytes()
    (folder / "cut.wav").write_bytes(data[: len(data) // 2])
    records = [{"audio_id": "cut", "audio_path": str(folder / "cut.wav"), "caption": "broken"}]
    records += [{"audio_id": f"good{n}", "audio_path": str(folder / "full.wav"), "caption": "fine"} for n in range(3)]
    config = make_config(tmp_path, records, on_bad_sample="skip", batch_size=3, annotated_fraction=0.0)
    loader = build_train_loader(config)
    all_batches(loader)
    assert loader.skips.counts == {"audio_truncated": 1}


def test_validate_reports_every_problem_with_file_and_line(tmp_path, capsys):
    bad_audio_files(tmp_path)
    metadata = write_jsonl(tmp_path / "m.jsonl", [
        {"audio_id": "a", "audio_path": "full.wav", "caption": "fine",
         "phrases": [{"phrase": "dog", "segments": [[0.2, 0.5]]}]},
        {"audio_id": "b", "audio_path": "full.wav", "caption": "",
         "phrases": [{"phrase": "dog", "segments": [[0.2, 0.5]]}]},
        {"audio_id": "c", "audio_path": "nan.wav", "caption": "x"},
        {"audio_id": "d", "audio_path": "full.wav", "caption": "x",
         "phrases": [{"phrase": "unknown thing", "segments": [[0.5, 3.0]]}]},
        '{"audio_id": ',
        {"audio_id": "f", "audio_path": "full.wav", "caption": "x", "phrases": [{"phrase": "dog", "segments": [[2, 1]]}]},
    ])
    bank = write_jsonl(tmp_path / "bank.jsonl", BANK)
    assert data_cli(["validate", "--metadata", str(metadata), "--bank", str(bank)]) == 1
    out = capsys.readouterr().out
    assert f"{metadata}:2: error: empty_caption" in out
    assert f"{metadata}:3: error: audio_nonfinite: {tmp_path / 'nan.wav'}: audio contains NaN" in out
    assert f"{metadata}:4: warning: segment_beyond_audio" in out and "ends after the audio (1.000 s)" in out
    assert f"{metadata}:4: warning: phrase_not_in_bank: phrase 'unknown thing'" in out
    assert f"{metadata}:5: error: malformed_json" in out
    assert f"{metadata}:6: error: inverted_segment" in out
    assert f"{metadata}:1:" not in out
    table = out[out.index("severity"):]
    rows = {tuple(line.split()[:3]) for line in table.splitlines()[1:] if line.strip()}
    assert {("error", "empty_caption", "1"), ("warning", "phrase_not_in_bank", "1"), ("error", "audio_nonfinite", "1")} <= rows
    assert "4 errors, 2 warnings" in out

    clean = write_jsonl(tmp_path / "clean.jsonl", [
        {"audio_id": "a", "audio_path": "full.wav", "caption": "fine", "phrases": [{"phrase": "dog", "segments": [[0, 1]]}]},
        {"audio_id": "d", "audio_path": "full.wav", "caption": "x", "phrases": [{"phrase": "unknown thing"}]},
    ])
    assert data_cli(["validate", "--metadata", str(clean), "--bank", str(bank)]) == 0
    assert "0 errors, 1 warnings" in capsys.readouterr().out
    assert data_cli(["validate", "--metadata", str(clean), "--bank", str(bank), "--strict"]) == 1
    assert data_cli(["validate", "--metadata", str(clean), "--metadata", str(metadata)]) == 1
