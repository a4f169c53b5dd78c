"""Evaluation file readers and config: the formats, and bad input named by file and line."""
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import soundfile

from finelap.config import ConfigError
from finelap.eval.config import EvalTaskConfig, load_eval_config, prompt_for
from finelap.eval.readers import (
    BadInputPolicy, EvalDataError, read_classes, read_durations, read_grounding, read_labels, read_retrieval,
    read_sed_ground_truth,
)
from finelap.eval.sed import prepare_sed_ground_truth
from finelap.eval.tasks import RUNNERS


@pytest.fixture
def audio(tmp_path):
    for name in ("a.wav", "b.wav"):
        soundfile.write(tmp_path / name, np.zeros(1600, dtype=np.float32), 16000)
    return tmp_path


def test_retrieval_reader_accepts_any_number_of_captions_and_names_bad_lines(audio):
    path = audio / "retrieval.jsonl"
    path.write_text(
        json.dumps({"audio_id": "a", "audio_path": "a.wav", "caption": ["one", "two", "three"]}) + "\n\n"
        + json.dumps({"audio_id": "b", "audio_path": str(audio / "b.wav"), "caption": "single"}) + "\n"
    )
    items = read_retrieval(path, None, BadInputPolicy())
    assert [(item.audio_id, item.captions) for item in items] == [("a", ["one", "two", "three"]), ("b", ["single"])]
    assert items[0].audio_path == audio / "a.wav"

    path.write_text(path.read_text() + '{"audio_id": "c", "audio_path": "c.wav", caption: []}\n')
    with pytest.raises(EvalDataError, match=rf"^{path}:4: not valid JSON"):
        read_retrieval(path, None, BadInputPolicy())
    policy = BadInputPolicy("skip")
    assert len(read_retrieval(path, None, policy)) == 2
    assert policy.skips.counts == {"malformed_json": 1}

    path.write_text(json.dumps({"audio_id": "a", "audio_path": "a.wav", "caption": ["", "x"]}) + "\n")
    with pytest.raises(EvalDataError, match=rf"{path}:1: field 'caption' must be a non-empty string"):
        read_retrieval(path, None, BadInputPolicy())


def test_labels_absent_from_the_class_list_name_file_and_line(audio):
    labels = audio / "labels.csv"
    labels.write_text("filename,label\na.wav,dog_bark\nb.wav,cat\n")
    classes = audio / "classes.txt"
    classes.write_text("dog_bark\nsiren\n")
    with pytest.raises(EvalDataError, match=rf"{labels}:3: label\(s\) \['cat'\] are not in the class list"):
        read_labels(labels, None, BadInputPolicy(), read_classes(classes))
    clips = read_labels(labels, None, BadInputPolicy())
    assert [clip.labels for clip in clips] == [["dog_bark"], ["cat"]]

    multi = audio / "labels.jsonl"
    multi.write_text(json.dumps({"audio_path": "a.wav", "labels": ["dog_bark", "siren"]}) + "\n"
                     + json.dumps({"audio_path": "b.wav", "caption": "siren"}) + "\n")
    assert [clip.labels for clip in read_labels(multi, None, BadInputPolicy(), ["dog_bark", "siren"])] == [
        ["dog_bark", "siren"], ["siren"]]

    classes.write_text("dog_bark\nsiren\n\ndog_bark\n")
    with pytest.raises(EvalDataError, match=rf"{classes}:4: class 'dog_bark' already listed at line 1"):
        read_classes(classes)
    labels.write_text("file,label\na.wav,dog\n")
    with pytest.raises(EvalDataError, match=rf"{labels}:1: header .* must hold 'filename' and 'label'"):
        read_labels(labels, None, BadInputPolicy())
    assert prompt_for("dog_bark", "The sound of {label}") == "The sound of dog bark"


def test_sed_ground_truth_rows_are_checked_line_by_line(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("filename\tonset\toffset\tevent_label\na.wav\t0.5\t1.0\tDog\nempty.wav\t\t\t\n"
                    "b.wav\tsoon\t1.0\tDog\n")
    with pytest.raises(EvalDataError, match=rf"^{path}:4: column 'onset' is not a number: 'soon'"):
        read_sed_ground_truth(path, BadInputPolicy())
    path.write_text("filename\tonset\toffset\tevent_label\na.wav\t0.5\t1.0\tDog\nempty.wav\t\t\t\nb.wav\t2.0\t1.0\tDog\n")
    with pytest.raises(EvalDataError, match=rf"{path}:4: event needs 0 <= onset < offset"):
        read_sed_ground_truth(path, BadInputPolicy())
    policy = BadInputPolicy("skip")
    truth = read_sed_ground_truth(path, policy)
    assert truth.events == {"a": [(0.5, 1.0, "Dog")], "empty": [], "b": []}
    assert policy.skips.counts == {"bad_segment": 1}
    path.write_text("filename onset offset event_label\na.wav 0.5 1.0 Dog\n")
    with pytest.raises(EvalDataError, match=rf"{path}:1: header .* lacks column"):
        read_sed_ground_truth(path, BadInputPolicy())


def test_durations_and_clipping_of_events_to_the_clip(tmp_path):
    durations_path = tmp_path / "durations.tsv"
    durations_path.write_text("filename\tduration\na.wav\t2.0\nb.wav\t-1\n")
    with pytest.raises(EvalDataError, match=rf"{durations_path}:3: duration must be positive"):
        read_durations(durations_path)
    durations_path.write_text("audio_id\tduration\na.wav\t2.0\nb.wav\t10\n")
    durations, _ = read_durations(durations_path)
    assert durations == {"a": 2.0, "b": 10.0}
    events = {"a": [(0.5, 3.0, "Dog"), (1.0, 1.5, "Dog")], "c": [(0.0, 1.0, "Dog")]}
    policy = BadInputPolicy("skip")
    kept, kept_durations, merged = prepare_sed_ground_truth(events, durations, {"c": "gt.tsv:7"}, durations_path, policy)
    assert kept == {"a": [(0.5, 2.0, "Dog")]} and kept_durations == {"a": 2.0} and merged == 1
    with pytest.raises(EvalDataError, match=rf"gt.tsv:7: clip 'c' has no duration in {durations_path}"):
        prepare_sed_ground_truth(events, durations, {"c": "gt.tsv:7"}, durations_path, BadInputPolicy())


def test_grounding_reads_training_jsonl_and_both_audiogrounding_layouts(audio):
    jsonl = audio / "grounding.jsonl"
    jsonl.write_text(json.dumps({"audio_id": "a", "audio_path": "a.wav", "caption": "a dog barks then a car",
                                 "phrases": [{"phrase": "a dog", "segments": [[0.1, 0.5], [0.0, 0.0]]},
                                             {"phrase": "a car", "segments": [[0.5, 0.9]]}]}) + "\n")
    pairs = read_grounding(jsonl, None, BadInputPolicy())
    assert [(p.pair_id, p.phrase, p.segments) for p in pairs] == [
        ("a__0_0", "a dog", [(0.1, 0.5)]), ("a__0_1", "a car", [(0.5, 0.9)])]

    version2 = audio / "test.json"
    version2.write_text(json.dumps([{"audiocap_id": 7, "audio_id": "b.wav", "tokens": "people talk",
                                     "phrases": [{"phrase": "people", "start_index": 0, "end_index": 0,
                                                  "segments": [[0.0, 0.05]]}]}]))
    assert [(p.audio_id, p.audio_path, p.segments) for p in read_grounding(version2, None, BadInputPolicy())] == [
        ("b", audio / "b.wav", [(0.0, 0.05)])]
    version1 = audio / "v1.json"
    version1.write_text(json.dumps([{"audio_id": "a.wav", "tokens": "x", "phrase": "a dog", "timestamps": [[0.2, 0.4]]},
                                    {"audio_id": "b.wav", "tokens": "y", "phrase": "a cat", "timestamps": [[0.4, 0.2]]}]))
    with pytest.raises(EvalDataError, match=rf"{version1}: item 1: phrase 'a cat': segment needs 0 <= onset < offset"):
        read_grounding(version1, None, BadInputPolicy())
    with pytest.raises(EvalDataError, match=r"grounding metadata not found: .*missing.jsonl"):
        read_grounding(audio / "missing.jsonl", None, BadInputPolicy())


def test_eval_config_errors_name_the_key_and_file(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("tasks:\n  - {name: s, type: sed, metadata: gt.tsv, median_filtr: 3}\n")
    with pytest.raises(ConfigError, match=rf"{config}: unknown key 'tasks\[0\].median_filtr'"):
        load_eval_config(config)
    config.write_text("tasks:\n  - {name: s, type: sed, metadata: gt.tsv}\n")
    with pytest.raises(ConfigError, match=rf"{config}: key 'tasks\[0\].durations' is required for a sed task"):
        load_eval_config(config)
    config.write_text("tasks:\n  - {name: z, type: zero_shot, metadata: l.csv, prompt_template: 'The sound of {}'}\n")
    with pytest.raises(ConfigError, match=r"prompt_template' = 'The sound of \{\}' must use '\{label\}'"):
        load_eval_config(config)
    config.write_text("tasks:\n  - {name: z, type: zero_shot, metadata: l.csv, prompt_template: '{label} of {x}'}\n")
    with pytest.raises(ConfigError, match=r"as its only placeholder"):
        load_eval_config(config)


def test_shipped_eval_configs_load():
    configs = sorted((Path(__file__).resolve().parents[1] / "configs/eval").glob("*.yaml"))
    types = {task.type for path in configs for task in load_eval_config(path).tasks}
    assert types == {"retrieval", "zero_shot", "sed", "grounding"}


def test_every_task_type_the_config_allows_has_a_runner():
    allowed = typing.get_args(typing.get_type_hints(EvalTaskConfig)["type"])
    assert sorted(allowed) == sorted(RUNNERS)
