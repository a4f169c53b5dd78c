"""Real-world audio collections: MP3 length estimates, and every bad input found in one pass.

Every file is encoded here by libsndfile (MP3 through LAME and mpg123, Ogg Vorbis, WAV at
22.05-48 kHz, mono and stereo) under names with spaces and non-ASCII characters; the bad ones
are made the way they happen: a 0-byte file, text renamed .wav, an MP3 cut short, a missing file.
"""
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from finelap.audio.io import AudioLoadError, audio_seconds, load_audio, load_audio_bytes
from finelap.config import Config, DataConfig, DataSourceConfig
from finelap.data.loader import build_train_loader
from finelap.data_cli import main as data_cli
from finelap.data_cli import validate
from finelap.synth.cli import main as synth_main
from finelap.synth.errors import InputProblems
from finelap.synth.mixer import MixSettings
from finelap.synth.pipeline import SynthConfig, run_synthesis

MPEG1_LAYER3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)


def tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """[frames, channels] a 440 Hz tone with a little noise: audible from end to end."""
    time = np.arange(int(seconds * rate)) / rate
    noise = 0.05 * np.random.default_rng(seed).standard_normal((len(time), channels))
    return 0.3 * np.sin(2 * np.pi * 440 * time)[:, None] + noise


def mp3(samples: np.ndarray, rate: int, bitrate_mode: str) -> bytes:
    """An MP3 as libsndfile (LAME) writes it: a Xing (VBR, ABR) or Info (CBR) header frame first.
    (soundfile sets the bitrate mode only together with a compression level.)"""
    encoded = io.BytesIO()
    soundfile.write(encoded, samples, rate, format="MP3", bitrate_mode=bitrate_mode, compression_level=0.5)
    return encoded.getvalue()


def without_info_frame(encoded: bytes) -> bytes:
    """The MP3 less its first frame, LAME's Info frame (MPEG-1 Layer III CBR), as from encoders that
    write none: libsndfile then estimates the length from the file's size."""
    header = int.from_bytes(encoded[:4], "big")
    assert header >> 21 == 0x7FF and (header >> 19) & 3 == 3 and (header >> 17) & 3 == 1  # sync, MPEG-1, Layer III
    bitrate = MPEG1_LAYER3_KBPS[(header >> 12) & 15] * 1000
    rate = (44100, 48000, 32000)[(header >> 10) & 3]
    length = 144 * bitrate // rate + ((header >> 9) & 1)
    assert b"Info" in encoded[:length] and encoded[length] == 0xFF  # the next frame starts right after it
    return encoded[length:]


def xing_frames_raised(encoded: bytes, extra_frames: int) -> bytes:
    """The MP3 with its Xing header's frame count raised: the declared length overshoots what decodes."""
    at = encoded.index(b"Xing")
    assert int.from_bytes(encoded[at + 4 : at + 8], "big") & 1  # the frame count field is present
    frames = int.from_bytes(encoded[at + 8 : at + 12], "big")
    return encoded[: at + 8] + (frames + extra_frames).to_bytes(4, "big") + encoded[at + 12 :]


def declared_and_decoded(path: Path) -> tuple[int, int]:
    with soundfile.SoundFile(path) as audio_file:
        return audio_file.frames, len(audio_file.read(audio_file.frames))


def reference_waveform(path: Path) -> torch.Tensor:
    """Independent decode of everything the file holds: soundfile to the end, channel mean, resample."""
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return torchaudio.functional.resample(torch.from_numpy(samples).mean(1), rate, 16000)


# ---------------------------------------------------------------- MP3 in load_audio


@pytest.mark.parametrize("rate, channels, bitrate_mode", [
    (44100, 1, "CONSTANT"), (48000, 2, "AVERAGE"), (22050, 1, "VARIABLE"), (32000, 2, "CONSTANT"),
])
def test_mp3_with_its_header_decodes_fully_and_loads(tmp_path, rate, channels, bitrate_mode):
    path = tmp_path / "clip.mp3"
    path.write_bytes(mp3(tone(1.0, rate, channels), rate, bitrate_mode))
    assert declared_and_decoded(path) == (rate, rate)  # the header's gapless length is exact

    waveform, length = load_audio(path, max_seconds=None)

    assert length == 16000 and torch.allclose(waveform, reference_waveform(path), atol=1e-5)
    assert audio_seconds(path) == 1.0


def _overshooting_mp3s() -> dict[str, bytes]:
    constant = mp3(tone(2.0, 44100), 44100, "CONSTANT")
    return {
        "no_info_header": without_info_frame(constant),
        # 1000 bytes that are not audio after the last frame (a tag block mpg123 does not know)
        "no_info_header_trailing_bytes": without_info_frame(constant) + bytes(1000),
        "xing_frame_count_two_over": xing_frames_raised(mp3(tone(2.0, 44100, 2), 44100, "VARIABLE"), 2),
    }


@pytest.mark.parametrize("case", sorted(_overshooting_mp3s()))
def test_mp3_whose_length_estimate_overshoots_loads_what_decodes(tmp_path, case):
    """Files that play in full, whose estimated length is one to two frames more than decodes
    (2284 samples for the trailing bytes, close to the 2320 seen in a real collection)."""
    path = tmp_path / f"{case}.mp3"
    path.write_bytes(_overshooting_mp3s()[case])
    declared, decoded = declared_and_decoded(path)
    assert 0 < declared - decoded <= 2 * 1152 + 200

    waveform, length = load_audio(path, max_seconds=None)

    assert length == math.ceil(decoded * 16000 / 44100)
    assert torch.allclose(waveform, reference_waveform(path), atol=1e-5)
    assert audio_seconds(path) == decoded / 44100
    from_bytes, _ = load_audio_bytes(path.read_bytes(), "000000001.mp3", max_seconds=None)
    assert torch.equal(from_bytes, waveform)
    cropped, cropped_length = load_audio(path, max_seconds=1.0)  # the crop reads less than decodes
    assert cropped_length == 16000 and torch.equal(cropped, waveform[:16000])


@pytest.mark.parametrize("rate, channels, bitrate_mode", [(44100, 1, "CONSTANT"), (48000, 2, "VARIABLE")])
@pytest.mark.parametrize("kept", [0.12, 0.5, 0.95])
def test_cut_mp3_is_refused_naming_the_file(tmp_path, rate, channels, bitrate_mode, kept):
    whole = mp3(tone(3.0, rate, channels), rate, bitrate_mode)
    path = tmp_path / "coupé à 12 %.mp3"
    path.write_bytes(whole[: int(len(whole) * kept)])
    with pytest.raises(AudioLoadError) as error:
        load_audio(path, max_seconds=None)
    assert error.value.reason in ("audio_truncated", "audio_unreadable")
    assert str(error.value).startswith(f"{path}: ")
    if error.value.reason == "audio_truncated":
        declared, decoded = declared_and_decoded(path)
        assert f"header declares {declared} frames, only {decoded} could be read" in str(error.value)
    with pytest.raises(AudioLoadError):
        audio_seconds(path)


def test_wav_and_flac_shortfalls_stay_errors(tmp_path):
    """The MP3 tolerance is MP3's alone: a WAV missing 2000 samples (less than 3 MPEG frames) is cut."""
    samples = tone(1.0, 16000)
    soundfile.write(tmp_path / "whole.wav", samples, 16000, subtype="PCM_16")
    encoded = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "short.wav").write_bytes(encoded[: len(encoded) - 2000 * 2])
    with pytest.raises(AudioLoadError, match=r"short\.wav: truncated audio") as error:
        load_audio(tmp_path / "short.wav")
    assert error.value.reason == "audio_truncated"
    soundfile.write(tmp_path / "whole.flac", tone(2.0, 44100, 2), 44100, subtype="PCM_16")
    encoded = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "short.flac").write_bytes(encoded[: len(encoded) - 2000])
    with pytest.raises(AudioLoadError, match=r"short\.flac: (truncated audio|cannot decode)"):
        load_audio(tmp_path / "short.flac", max_seconds=None)


# ---------------------------------------------------------------- a collection with planted bad files


@pytest.fixture
def collection(tmp_path):
    """Events (CSV), backgrounds (JSON lines) and a phrase bank over good and bad clips.

    Good: WAV 22.05 kHz mono under a folder with a space, an MP3 44.1 kHz stereo under non-ASCII
    names, an MP3 whose length estimate overshoots (the only clip of its class), Ogg Vorbis 48 kHz
    stereo, a 16 kHz background. Bad, one per kind: a 0-byte file, text renamed .wav, an MP3 cut to
    12% of its bytes, a missing file, a line without a label, a background line without a label, a
    bank line without a phrase.
    """
    clips = tmp_path / "my clips"
    (clips / "dog sounds").mkdir(parents=True)
    (clips / "café").mkdir()
    soundfile.write(clips / "dog sounds" / "bark 1.wav", tone(0.6, 22050, seed=1), 22050)
    (clips / "café" / "oiseau chanté.mp3").write_bytes(mp3(tone(0.8, 44100, 2, seed=2), 44100, "VARIABLE"))
    (clips / "canard.mp3").write_bytes(without_info_frame(mp3(tone(1.0, 44100, seed=3), 44100, "CONSTANT")) + bytes(1000))
    soundfile.write(clips / "pluie.ogg", tone(0.7, 48000, 2, seed=4), 48000, format="OGG", subtype="VORBIS")
    (clips / "empty.wav").write_bytes(b"")
    (clips / "notes.wav").write_text("not audio, only a text file renamed\n" * 20)
    whole = mp3(tone(2.0, 44100, seed=5), 44100, "CONSTANT")
    (clips / "cut.mp3").write_bytes(whole[: int(len(whole) * 0.12)])
    soundfile.write(tmp_path / "street.wav", 0.05 * np.random.default_rng(6).standard_normal(3 * 16000), 16000)

    events = tmp_path / "events.csv"
    events.write_text(
        "path,label\n"
        '"my clips/dog sounds/bark 1.wav",dog barking\n'  # line 2
        "my clips/café/oiseau chanté.mp3,bird singing\n"  # 3
        "my clips/canard.mp3,duck quacking\n"  # 4
        "my clips/pluie.ogg,rain\n"  # 5
        "my clips/empty.wav,rain\n"  # 6
        "my clips/notes.wav,dog barking\n"  # 7
        "my clips/cut.mp3,bird singing\n"  # 8
        "my clips/gone.wav,rain\n"  # 9
        "my clips/pluie.ogg,\n",  # 10
        encoding="utf-8",
    )
    backgrounds = tmp_path / "backgrounds.jsonl"
    backgrounds.write_text(
        json.dumps({"path": "street.wav", "label": "street noise"}) + "\n" + json.dumps({"path": "street.wav"}) + "\n"
    )
    bank = tmp_path / "bank.jsonl"
    bank.write_text("".join(json.dumps(line) + "\n" for line in [
        {"phrase": "dog barking", "alternatives": ["dog barking", "a dog barks"]},
        {"alternatives": ["nothing"]},
        {"phrase": "bird singing", "alternatives": ["bird singing", "birdsong"]},
        {"phrase": "duck quacking", "alternatives": ["duck quacking"]},
        {"phrase": "street noise", "alternatives": ["street noise"]},
    ]))
    expected = {  # (file, line) -> reason of every planted problem
        ("events.csv", 6): "audio_empty",
        ("events.csv", 7): "audio_unreadable",
        ("events.csv", 9): "audio_missing",
        ("events.csv", 10): "empty_label",
        ("backgrounds.jsonl", 2): "missing_field",
        ("bank.jsonl", 2): "missing_field",
    }
    return {"folder": tmp_path, "events": events, "backgrounds": backgrounds, "bank": bank, "expected": expected}


def _found(problems) -> dict[tuple[str, int], str]:
    """(file name, line) -> kind, for problems located at file:line."""
    found = {}
    for problem in problems:
        path, line = problem.location.rsplit(":", 1)
        found[(Path(path).name, int(line))] = problem.kind
    return found


def _expected_with_cut(collection, found: dict) -> dict:
    """The planted problems; the 12% MP3 may fail to open (unreadable) or decode short (truncated)."""
    assert found.get(("events.csv", 8)) in ("audio_truncated", "audio_unreadable")
    return {**collection["expected"], ("events.csv", 8): found[("events.csv", 8)]}


def _synth_config(collection, **overrides) -> SynthConfig:
    return SynthConfig(
        str(collection["events"]), str(collection["backgrounds"]), str(collection["folder"] / "out"),
        phrase_bank=str(collection["bank"]), num_mixtures=2, workers=1, mix=MixSettings(duration_s=3.0),
        progress=False, **overrides,
    )


def test_synthesis_lists_every_bad_input_at_once_and_makes_nothing(collection):
    with pytest.raises(InputProblems) as error:
        run_synthesis(_synth_config(collection))
    found = _found(error.value.problems)
    assert found == _expected_with_cut(collection, found)  # every planted problem, and no good file
    message = str(error.value)
    for name in ("empty.wav: audio file is empty (0 bytes)", "notes.wav: cannot decode audio", "cut.mp3: ",
                 "gone.wav: audio file not found", "field 'label' is empty", "missing field 'phrase'"):
        assert name in message
    assert re.search(r"^error +audio_empty +1 ", message, re.MULTILINE)  # the table: a count per kind
    assert "7 errors, 0 warnings" in message
    out = collection["folder"] / "out"
    assert not (out / "metadata.jsonl").exists() and not list(out.glob("fragments/*"))


def test_synthesis_skips_and_counts_the_same_problems(collection):
    summary = run_synthesis(_synth_config(collection, on_bad_sample="skip"))
    report = summary.report
    cut_reason = report["skipped"].keys() - {"audio_empty", "audio_missing", "audio_unreadable", "empty_label",
                                             "missing_field"}
    assert report["accepted"] == {"events": 4, "backgrounds": 1}  # the overshooting MP3 among them
    assert sum(report["skipped"].values()) == 7 and cut_reason <= {"audio_truncated"}
    assert report["skipped"]["missing_field"] == 2
    sources = json.loads((collection["folder"] / "out" / "sources.json").read_text())
    assert "duck quacking" in {label for clip in sources["events"] for label in clip["labels"]}


def test_synth_command_prints_every_problem_grouped(collection, capsys):
    arguments = ["--events", str(collection["events"]), "--backgrounds", str(collection["backgrounds"]),
                 "--phrase-bank", str(collection["bank"]), "--out", str(collection["folder"] / "cli"),
                 "--workers", "1", "--quiet"]
    assert synth_main(arguments) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r".*:\d+: error: ", line)]
    assert len(lines) == 7
    # grouped by kind: each kind's lines together
    kinds = [line.split(": error: ")[1].split(":")[0] for line in lines]
    assert kinds == sorted(kinds)
    assert f"{collection['events']}:6: error: audio_empty: " in err and "--on-bad-sample skip" in err


# ---------------------------------------------------------------- finelap data validate


def test_validate_checks_indexes_as_synthesis_does(collection, capsys):
    problems, _ = validate([], str(collection["bank"]), None, [str(collection["events"])],
                           [str(collection["backgrounds"])])
    errors = _found(problem for problem in problems if problem.severity == "error")
    assert errors == _expected_with_cut(collection, errors)  # the same problems synthesis lists
    warnings = {(problem.kind, problem.message) for problem in problems if problem.severity == "warning"}
    assert warnings == {("label_not_in_bank", "label 'rain' is not in the phrase bank; captions use it as written")}

    assert data_cli(["validate", "--events", str(collection["events"]), "--backgrounds", str(collection["backgrounds"]),
                     "--phrase-bank", str(collection["bank"])]) == 1
    out = capsys.readouterr().out
    assert f"{collection['events']}: events index, 8 clips listed, 4 labels" in out
    assert f"{collection['backgrounds']}: backgrounds index, 1 clips listed, 1 labels" in out
    assert f"{collection['bank']}: phrase bank, 4 clusters" in out
    balance = {}  # index file name -> label -> (usable clips, seconds, left out)
    for line in out.splitlines():
        if heading := re.match(r"(.*): (events|backgrounds) index, ", line):
            table = balance.setdefault(Path(heading.group(1)).name, {})
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 4 and cells[1].isdigit():
            table[cells[0]] = (int(cells[1]), float(cells[2]), int(cells[3]))
    counts = {name: {label: (row[0], row[2]) for label, row in rows.items()} for name, rows in balance.items()}
    assert counts == {
        "events.csv": {"bird singing": (1, 1), "dog barking": (1, 1), "duck quacking": (1, 0), "rain": (1, 2),
                       "(all clips)": (4, 4)},
        "backgrounds.jsonl": {"street noise": (1, 0), "(all clips)": (1, 0)},
    }
    assert balance["events.csv"]["duck quacking"][1] == pytest.approx(1.0, abs=0.1)  # audible seconds
    assert balance["backgrounds.jsonl"]["street noise"][1] == pytest.approx(3.0)
    assert f"{collection['events']}:6: error: audio_empty: " in out and "audio file is empty (0 bytes)" in out
    assert "7 errors, 1 warnings" in out


def test_validate_names_a_file_given_under_the_wrong_option(collection, capsys):
    metadata = collection["folder"] / "train.jsonl"
    metadata.write_text(json.dumps({"audio_id": "a", "audio_path": "street.wav", "caption": "traffic"}) + "\n")
    assert data_cli(["validate", "--metadata", str(collection["events"])]) == 1
    out = capsys.readouterr().out
    assert (f"{collection['events']}: error: wrong_kind_of_file: this looks like an events/backgrounds index "
            "(path, label), not training metadata (audio_id, audio_path, caption): check it with --events or "
            "--backgrounds") in out
    assert "malformed_json" not in out and "1 errors, 0 warnings" in out
    assert data_cli(["validate", "--events", str(metadata), "--metadata", str(collection["bank"])]) == 1
    out = capsys.readouterr().out
    assert f"{metadata}: error: wrong_kind_of_file: this looks like training metadata" in out
    assert f"{collection['bank']}: error: wrong_kind_of_file: this looks like a phrase bank" in out
    assert data_cli(["validate", "--metadata", str(metadata)]) == 0
    assert f"{metadata}: training metadata, 1 records" in capsys.readouterr().out


def test_validate_metadata_uses_the_loaders_words(collection, capsys):
    """One loader, one wording: a 0-byte file reads as in synthesis, an MP3 estimate is no problem."""
    folder = collection["folder"]
    metadata = folder / "train.jsonl"
    metadata.write_text("".join(json.dumps(record) + "\n" for record in [
        {"audio_id": "empty", "audio_path": "my clips/empty.wav", "caption": "nothing"},
        {"audio_id": "duck", "audio_path": "my clips/canard.mp3", "caption": "a duck quacks",
         "phrases": [{"phrase": "duck quacking", "segments": [[0.0, 1.0]]}]},
    ]))
    assert data_cli(["validate", "--metadata", str(metadata)]) == 1
    out = capsys.readouterr().out
    assert f"{metadata}:1: error: audio_empty: {folder / 'my clips' / 'empty.wav'}: audio file is empty (0 bytes)" in out
    assert "Format not recognised" not in out and f"{metadata}:2:" not in out


# ---------------------------------------------------------------- training data path


def test_training_loader_reads_the_overshooting_mp3_and_counts_the_cut_one(collection):
    folder = collection["folder"]
    good = ["my clips/canard.mp3", "my clips/café/oiseau chanté.mp3", "my clips/pluie.ogg"]
    records = [{"audio_id": f"good{n}", "audio_path": path, "caption": "a sound"} for n, path in enumerate(good)]
    metadata = folder / "train.jsonl"

    def loader(records, **options):
        metadata.write_text("".join(json.dumps(record) + "\n" for record in records))
        config = Config()
        config.data = DataConfig(sources=[DataSourceConfig("train", str(metadata))], batch_size=3, max_phrases=4,
                                 num_workers=0, annotated_fraction=0.0, **options)
        return build_train_loader(config)

    [batch] = list(loader(records))  # the default: any bad file is an error; none is
    duck, _ = load_audio(folder / "my clips" / "canard.mp3")
    assert any(torch.equal(row[: len(duck)], duck) for row in batch.waveforms)
    skipping = loader(records + [{"audio_id": "cut", "audio_path": "my clips/cut.mp3", "caption": "broken"}],
                      on_bad_sample="skip")
    list(skipping)
    assert list(skipping.skips.counts) in (["audio_truncated"], ["audio_unreadable"])
    assert skipping.skips.total == 1
