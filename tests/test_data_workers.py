"""`finelap data validate` and `finelap data pack` give the same output for any number of workers:
the same problems in file order, named by file and line, and shards equal byte for byte."""
import io
import json
import tarfile
from pathlib import Path

import numpy
import pytest
import soundfile
from wds2idx import IndexCreator

from finelap.data import worker_pool
from finelap.data.metadata import read_metadata
from finelap.data.shards import pack_shards
from finelap import data_cli

RATE = 16000


def tone(seconds, seed):
    rng = numpy.random.default_rng(seed)
    time = numpy.arange(int(seconds * RATE)) / RATE
    return 0.3 * numpy.sin(2 * numpy.pi * rng.uniform(200, 2000) * time) + 0.01 * rng.standard_normal(len(time))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Training metadata over 24 FLAC and WAV files, with every kind of bad line and file among them,
    and an events index over some of the same files."""
    folder = tmp_path_factory.mktemp("workers")
    lines = []
    for number in range(24):
        name = f"clip{number:02d}.{'flac' if number % 3 else 'wav'}"
        soundfile.write(folder / name, tone(1.0 + 0.1 * number, number), RATE)
        record = {"audio_id": f"clip{number}", "audio_path": name, "caption": f"a tone {number}",
                  "phrases": [{"phrase": "tone", "segments": [[0.1, 0.5]]}]}
        lines.append(json.dumps(record))
    (folder / "clip05.flac").write_bytes((folder / "clip05.flac").read_bytes()[:3000])  # cut short
    (folder / "clip07.flac").unlink()  # missing
    soundfile.write(folder / "clip10.flac", tone(0.05, 10), RATE)  # too short
    (folder / "clip09.wav").write_bytes(b"")  # empty
    lines[3] = lines[3].replace("[0.1, 0.5]", "[0.5, 9.0]")  # ends after the audio: a warning
    lines[8] = lines[8][:-5]  # malformed JSON
    lines[12] = json.dumps({"audio_id": "clip12", "audio_path": "clip12.wav"})  # no caption
    lines[16] = lines[16].replace('"clip16"', '"clip1"')  # duplicate audio_id
    metadata = folder / "train.jsonl"
    metadata.write_text("\n".join(lines) + "\n")
    events = folder / "events.csv"
    events.write_text("path,label\n" + "".join(f"clip{n:02d}.{'flac' if n % 3 else 'wav'},tone\n" for n in range(12)))
    good = folder / "good.jsonl"
    good.write_text("".join(line + "\n" for number, line in enumerate(lines) if number in (1, 2, 4, 13, 14, 17, 19)))
    return {"folder": folder, "metadata": metadata, "events": events, "good": good}


def test_validate_finds_the_same_problems_in_file_order_for_any_workers(collection, monkeypatch):
    monkeypatch.setattr(data_cli, "VALIDATE_WINDOW", 5)  # several windows of lines
    arguments = ([str(collection["metadata"])], None, None, [str(collection["events"])], [])
    one = data_cli.validate(*arguments, workers=1)
    two = data_cli.validate(*arguments, workers=2)
    three = data_cli.validate(*arguments, workers=3)
    assert one == two == three
    problems, notes = one
    metadata, events = collection["metadata"], collection["events"]
    found = [(problem.location, problem.kind) for problem in problems]
    assert found == [
        (f"{metadata}:4", "segment_beyond_audio"),
        (f"{metadata}:6", "audio_unreadable"),
        (f"{metadata}:8", "audio_missing"),
        (f"{metadata}:9", "malformed_json"),
        (f"{metadata}:10", "audio_empty"),
        (f"{metadata}:11", "audio_too_short"),
        (f"{metadata}:13", "missing_field"),
        (f"{metadata}:17", "duplicate_audio_id"),
        (f"{events}:7", "audio_unreadable"),
        (f"{events}:9", "audio_missing"),
        (f"{events}:11", "audio_empty"),
        (f"{events}:12", "audio_too_short"),
    ]
    assert notes[0] == f"{metadata}: training metadata, 24 records"


def test_validate_command_prints_the_same_report_for_any_workers(collection, capsys):
    reports = []
    for workers in ("1", "2"):
        assert data_cli.main(["validate", "--metadata", str(collection["metadata"]), "--workers", workers]) == 1
        reports.append(capsys.readouterr().out)
    assert reports[0] == reports[1]
    assert f"{collection['metadata']}:9: error: malformed_json: " in reports[0]
    assert "6 errors, 2 warnings" in reports[0]


def test_pack_writes_the_same_bytes_for_any_workers(collection, tmp_path):
    sources = [("good", str(collection["good"]), read_metadata(collection["good"], "good"))]
    for workers in (1, 2):
        pack_shards(sources, tmp_path / f"workers{workers}", shard_size=2, workers=workers)
    names = sorted(path.name for path in (tmp_path / "workers1").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "workers2").iterdir())
    assert len([name for name in names if name.endswith(".tar")]) == 4
    for name in names:
        assert (tmp_path / "workers1" / name).read_bytes() == (tmp_path / "workers2" / name).read_bytes(), name


def _tarfile_copy(tar_path, out_path):
    """The members of `tar_path` written again by Python's tarfile (USTAR, mode 0644, as packing sets)."""
    with tarfile.open(tar_path) as archive, tarfile.open(out_path, "w", format=tarfile.USTAR_FORMAT) as copy:
        for member in archive.getmembers():
            data = archive.extractfile(member).read()
            info = tarfile.TarInfo(member.name)
            info.size, info.mode = len(data), 0o644
            copy.addfile(info, io.BytesIO(data))


def test_pack_writes_the_tar_python_writes_and_the_index_dali_writes(collection, tmp_path):
    records = read_metadata(collection["good"], "good")
    pack_shards([("good", str(collection["good"]), records)], tmp_path / "shards", shard_size=3)
    tars = sorted((tmp_path / "shards").glob("shard-*.tar"))
    assert len(tars) == 3
    members = []
    for tar in tars:
        _tarfile_copy(tar, tmp_path / "copy.tar")
        assert tar.read_bytes() == (tmp_path / "copy.tar").read_bytes(), tar.name
        with IndexCreator(str(tar), str(tmp_path / "dali.idx"), verbose=False) as index:
            index.create_index()
        assert tar.with_suffix(".idx").read_text() == (tmp_path / "dali.idx").read_text(), tar.name
        with tarfile.open(tar) as archive:
            members += [archive.extractfile(member).read() for member in archive.getmembers()]
    assert members[0::2] == [Path(record.audio_path).read_bytes() for record in records]
    assert json.loads(members[1])["audio_path"] == "000000000.flac"


def test_pack_names_a_missing_audio_file_before_writing_any_shard(collection, tmp_path, capsys):
    lines = collection["metadata"].read_text().splitlines()
    metadata = tmp_path / "train.jsonl"  # the lines that parse, so that packing reaches the audio files
    metadata.write_text("".join(line + "\n" for number, line in enumerate(lines) if number not in (8, 12, 16)))
    out = tmp_path / "shards"
    assert data_cli.main(["pack", "--metadata", str(metadata), "--audio-root", str(collection["folder"]),
                          "--out", str(out), "--shard-size", "2", "--workers", "2"]) == 1
    assert f"{metadata}:8: audio file not found: {collection['folder'] / 'clip07.flac'}" in capsys.readouterr().err
    assert not list(out.glob("*.tar"))


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_workers_must_be_a_positive_count(collection, workers, capsys):
    with pytest.raises(SystemExit):
        data_cli.main(["validate", "--metadata", str(collection["metadata"]), "--workers", workers])
    assert "--workers" in capsys.readouterr().err


def test_an_ordered_map_raises_a_jobs_error_where_its_result_would_be():
    with worker_pool.ordered_map(2) as map_in_order:
        results = map_in_order(numpy.sqrt, [4.0, 9.0])
        assert list(results) == [2.0, 3.0]
        failing = map_in_order(int, ["1", "x", "3"])
        assert next(failing) == 1
        with pytest.raises(ValueError, match="'x'"):
            next(failing)
