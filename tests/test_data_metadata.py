"""Metadata and phrase bank: reference formats, lookups, automatic clustering, bad lines."""
import json
import random

import pytest
import torch

from finelap.bad_input import MetadataError, SkipCounter
from finelap.data.metadata import read_metadata
from finelap.data.phrase_bank import PhraseBank, cluster_phrases, minilm_embedder


def write_lines(path, entries):
    path.write_text("".join((entry if isinstance(entry, str) else json.dumps(entry)) + "\n" for entry in entries))
    return path


GOOD = {
    "audio_id": "a1", "audio_path": "clips/a1.wav", "caption": ["a dog barks", "barking nearby"],
    "phrases": [{"phrase": "dog barking", "segments": [[0.5, 1.25], [3, 4]]}, {"phrase": "wind"}],
}


def test_reference_metadata_parses(tmp_path):
    other_root = tmp_path / "audio"
    entries = [GOOD, "", {"audio_id": "a2", "audio_path": "/abs/a2.flac", "caption": "rain"}]
    path = write_lines(tmp_path / "train.jsonl", entries)
    first, second = read_metadata(path, "train")
    assert first.audio_path == str(tmp_path / "clips" / "a1.wav")
    assert first.captions == ("a dog barks", "barking nearby")
    assert first.phrases[0].segments == ((0.5, 1.25), (3.0, 4.0)) and not first.phrases[0].weak
    assert first.phrases[1].weak and first.annotated
    assert first.location == f"{path}:1" and first.source == "train"
    assert second.captions == ("rain",) and second.phrases == () and not second.annotated
    assert second.audio_path == "/abs/a2.flac" and second.location == f"{path}:3"
    rooted = read_metadata(path, "train", audio_root=other_root)[0]
    assert rooted.audio_path == str(other_root / "clips" / "a1.wav")


def _with(**changes):
    entry = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    return entry


BAD_LINES = [
    ('{"audio_id": "x", "caption": ', "malformed_json", "malformed JSON"),
    (_with(audio_path=None), "missing_field", "missing field 'audio_path'"),
    (_with(audio_id=7), "wrong_type", "field 'audio_id' must be a string"),
    (_with(caption=""), "empty_caption", "empty caption"),
    (_with(caption=["ok", " "]), "empty_caption", "empty caption"),
    (_with(caption=[]), "empty_caption", "empty caption"),
    (_with(caption={"text": "x"}), "wrong_type", "'caption' must be a string or a list"),
    (_with(phrases={"phrase": "x"}), "wrong_type", "'phrases' must be a list"),
    (_with(phrases=[{"segments": [[0, 1]]}]), "missing_field", "phrases[0]: missing field 'phrase'"),
    (_with(phrases=[{"phrase": "x", "segments": [[0, "1"]]}]), "wrong_type", "segment 0 must be [onset, offset]"),
    (_with(phrases=[{"phrase": "x", "segments": [[0, 1, 2]]}]), "wrong_type", "segment 0 must be [onset, offset]"),
    (_with(phrases=[{"phrase": "x", "segments": [[0, 1], [2.5, 2.0]]}]), "inverted_segment", "onset 2.5 > offset 2.0"),
    ('[1, 2]', "wrong_type", "must be a JSON object"),
]


@pytest.mark.parametrize("line, reason, text", BAD_LINES)
def test_bad_metadata_line_names_file_and_line(tmp_path, line, reason, text):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, line, GOOD])
    with pytest.raises(MetadataError) as caught:
        read_metadata(path, "m")
    assert str(caught.value).startswith(f"{path}:2: ")
    assert text in str(caught.value)
    assert caught.value.reason == reason


def test_skip_mode_drops_bad_lines_and_counts_per_reason(tmp_path, caplog):
    lines = [GOOD] + [line for line, _, _ in BAD_LINES] + [_with(audio_id="last")]
    path = write_lines(tmp_path / "m.jsonl", lines)
    skips = SkipCounter()
    records = read_metadata(path, "m", on_bad_sample="skip", skips=skips)
    assert [r.audio_id for r in records] == ["a1", "last"]
    expected = {}
    for _, reason, _ in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert skips.counts == dict(sorted(expected.items()))
    read_metadata(path, "m", on_bad_sample="skip", skips=skips)  # the same lines again: logged and counted once
    assert skips.total == len(BAD_LINES)
    assert sum("skipping sample" in r.message for r in caplog.records) == len(BAD_LINES)
    assert f"{path}:3" in caplog.text


def test_negative_segment_is_clipped_to_zero(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [_with(phrases=[{"phrase": "x", "segments": [[-1.0, 0.5], [-2, -1]]}])])
    (record,) = read_metadata(path, "m")
    assert record.phrases[0].segments == ((0.0, 0.5), (0.0, 0.0))


def test_bank_lookups_and_alternatives(tmp_path):
    path = write_lines(tmp_path / "bank.jsonl", [
        {"phrase": "Dog", "alternatives": ["dog barking", "Barking dog", "bark"]},
        {"phrase": "car engine", "alternatives": []},
        "",
        {"phrase": "siren", "alternatives": ["police siren"]},
    ])
    bank = PhraseBank.read(path)
    assert len(bank) == 3
    assert bank.cluster_of("dog") == bank.cluster_of("barking  DOG") == bank.cluster_of("bark") == 0
    assert bank.cluster_of("car engine") == 1 and bank.cluster_of("police siren") == 2
    assert bank.cluster_name(0) == "Dog" and bank.alternatives(1) == ("car engine",)
    rng = random.Random(0)
    draws = {bank.draw_alternative(0, rng) for _ in range(200)}
    assert draws == {"dog barking", "Barking dog", "bark"}
    assert bank.missing == []
    new = bank.cluster_of("glass breaking")
    assert new == 3 and bank.cluster_of("Glass breaking") == 3 and bank.missing == ["glass breaking"]
    assert bank.draw_alternative(new, rng) == "glass breaking"
    out = tmp_path / "written.jsonl"
    bank.write(out)
    again = PhraseBank.read(out)
    assert [again.alternatives(i) for i in range(4)] == [bank.alternatives(i) for i in range(4)]


@pytest.mark.parametrize("line, text", [
    ('{"phrase": "a", "alternatives": ["b"', "malformed JSON"),
    ({"alternatives": ["b"]}, "missing field 'phrase'"),
    ({"phrase": "a", "alternatives": "b"}, "'alternatives' must be a list"),
    ({"phrase": "dog", "alternatives": ["x"]}, "already in cluster 0"),
])
def test_bad_bank_line_names_file_and_line(tmp_path, line, text):
    path = write_lines(tmp_path / "bank.jsonl", [{"phrase": "dog", "alternatives": ["bark"]}, line])
    with pytest.raises(MetadataError) as caught:
        PhraseBank.read(path)
    assert str(caught.value).startswith(f"{path}:2: ") and text in str(caught.value)
    skips = SkipCounter()
    assert len(PhraseBank.read(path, "skip", skips)) == 1 and skips.total == 1


def test_automatic_clustering_joins_synonyms_with_minilm(tmp_path):
    phrases = [
        "dog", "dog barking", "Barking dog", "car engine", "engine idling", "siren", "police siren",
        "rain", "heavy rain", "cat meowing", "glass breaking", "dog",
    ]
    bank = cluster_phrases(phrases, embed=minilm_embedder())
    groups = [
        {"dog", "dog barking", "barking dog"}, {"car engine", "engine idling"},
        {"siren", "police siren"}, {"rain", "heavy rain"}, {"cat meowing"}, {"glass breaking"},
    ]
    assert len(bank) == len(groups)
    for group in groups:
        assert len({bank.cluster_of(p) for p in group}) == 1, group
    assert len({bank.cluster_of(next(iter(group))) for group in groups}) == len(groups)
    assert bank.cluster_of("dog") == 0 and bank.alternatives(0) == ("dog", "dog barking", "Barking dog")
    path = tmp_path / "auto_bank.jsonl"
    bank.write(path)
    assert PhraseBank.read(path).cluster_of("police siren") == bank.cluster_of("siren")


def test_clustering_is_thresholded_and_names_the_central_member():
    vectors = {"a": [1.0, 0.0], "b": [0.8, 0.6], "c": [-0.6, 0.8], "d": [0.6, 0.8]}

    def embed(texts):
        return torch.tensor([vectors[t] for t in texts])

    # cosines: a-b 0.8, a-d 0.6, b-d 0.96, d-c 0.28, b-c 0, a-c -0.6
    strict = cluster_phrases(["a", "b", "c", "d"], embed=embed, threshold=0.9)
    assert [strict.alternatives(i) for i in range(len(strict))] == [("a",), ("b", "d"), ("c",)]
    # average linkage: {b, d} to a = 0.7 joins at 0.5; {a, b, d} to c = -0.107 does not
    loose = cluster_phrases(["a", "b", "c", "d"], embed=embed, threshold=0.5)
    assert [loose.alternatives(i) for i in range(len(loose))] == [("a", "b", "d"), ("c",)]
    assert loose.cluster_name(0) == "b"  # mean cosine to the members: a 0.8, b 0.92, d 0.853
