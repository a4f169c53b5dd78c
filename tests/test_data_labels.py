"""Frame grid labels, cluster-based phrase sampling and the Batch builder (no audio decoding here)."""
import hashlib
import json
from fractions import Fraction

import pytest
import torch

from finelap.bad_input import MetadataError, SkipCounter
from finelap.config import AudioEncoderConfig, DataConfig, DataSourceConfig, load_config
from finelap.data.labels import FrameGrid
from finelap.data.training_set import BatchBuilder, load_training_set, phrase_id

AUDIO = AudioEncoderConfig()
HOP = Fraction(16, 100)  # exact: 16 fbank frames of 10 ms


def reference_frames(segments, duration, rule="half", num_frames=64):
    """Active frames in exact rational arithmetic. "any": overlapped with positive length by a segment;
    "half": covered by a segment for at least half the hop, else the segment's most covered frame."""
    active = set()
    for onset, offset in segments:
        onset, offset = max(Fraction(str(onset)), Fraction(0)), min(Fraction(str(offset)), Fraction(str(duration)))
        overlap = {t: min(offset, (t + 1) * HOP) - max(onset, t * HOP) for t in range(num_frames)}
        touched = [t for t in range(num_frames) if overlap[t] > 0]
        if rule == "any" or not touched:
            active |= set(touched)
            continue
        half = [t for t in touched if overlap[t] >= HOP / 2]
        active |= set(half) if half else {max(touched, key=lambda t: (overlap[t], -t))}
    return active


def test_grid_comes_from_the_model_config():
    grid = FrameGrid.from_audio_config(AUDIO)
    assert grid.num_frames == 64 and grid.hop_seconds == pytest.approx(0.16)
    eat = load_config("configs/model/eat_base.yaml").model.audio
    assert FrameGrid.from_audio_config(eat) == grid
    assert FrameGrid.from_audio_config(AudioEncoderConfig(patch_size=8, target_frames=512)) == FrameGrid(0.08, 64)


@pytest.mark.parametrize("segment, any_overlap, half", [
    ((0.0, 0.32), {0, 1}, {0, 1}),  # ends exactly on the edge of frame 2: does not reach it
    ((0.32, 0.5), {2, 3}, {2}),  # starts exactly at frame 2; covers 0.02 s of frame 3
    ((0.48, 0.64), {3}, {3}),  # 3 * 0.16 is 0.48000000000000004 in floats: still exactly frame 3
    ((0.40, 0.56), {2, 3}, {2, 3}),  # exactly half of frames 2 and 3: both
    ((0.30, 0.58), {1, 2, 3}, {2, 3}),  # a 0.28 s event: 0.48 s of frames under "any", 0.32 s under "half"
    ((0.3199, 0.3201), {1, 2}, {1}),  # covers no frame by half: its most covered frame (tie: the earlier)
    ((0.3199, 0.3202), {1, 2}, {2}),
    ((0.5, 0.5), set(), set()),  # zero length: nothing
    ((9.9, 12.0), {61, 62}, {62}),  # beyond max_seconds (10 s): clipped, frame 62 spans [9.92, 10.08)
    ((10.0, 11.0), set(), set()),
])
def test_frame_edges(segment, any_overlap, half):
    for rule, expected in (("any", any_overlap), ("half", half)):
        grid = FrameGrid.from_audio_config(AUDIO, rule)
        mask = grid.mask([segment], duration=10.0)
        assert set(mask.nonzero().flatten().tolist()) == expected == reference_frames([segment], 10.0, rule), rule


@pytest.mark.parametrize("rule", ["half", "any"])
def test_random_segments_match_exact_reference(rule):
    grid = FrameGrid.from_audio_config(AUDIO, rule)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        # onsets on a 10 ms grid hit frame edges often
        onset, length = torch.randint(0, 1100, (2,), generator=generator).tolist()
        segment = (onset / 100, (onset + length // 3) / 100)
        duration = int(torch.randint(50, 1001, (1,), generator=generator)) / 100
        found = set(grid.mask([segment], duration).nonzero().flatten().tolist())
        assert found == reference_frames([segment], duration, rule), (segment, duration)
    with pytest.raises(ValueError, match="frame_label_rule must be one of"):
        FrameGrid(0.16, 64, "majority")


def write_set(tmp_path, records, bank=None):
    metadata = tmp_path / "meta.jsonl"
    metadata.write_text("".join(json.dumps(r) + "\n" for r in records))
    bank_path = None
    if bank is not None:
        bank_path = tmp_path / "bank.jsonl"
        bank_path.write_text("".join(json.dumps({"phrase": n, "alternatives": a}) + "\n" for n, a in bank))
    return metadata, bank_path


BANK = [
    ("dog", ["dog", "dog barking", "barking dog"]), ("car", ["car", "car engine"]), ("siren", ["siren"]),
    ("rain", ["rain", "rainfall"]), ("wind", ["wind"]), ("speech", ["speech", "talking"]),
    ("music", ["music"]), ("bird", ["bird", "birdsong"]),
]
RECORDS = [
    {"audio_id": "a", "audio_path": "a.wav", "caption": ["first a", "second a"],
     "phrases": [{"phrase": "dog barking", "segments": [[0.1, 0.5], [2.0, 2.32]]},
                 {"phrase": "barking dog", "segments": [[5.0, 5.1]]},
                 {"phrase": "car", "segments": [[0.32, 3.0]]},
                 {"phrase": "rain"}]},
    {"audio_id": "b", "audio_path": "b.wav", "caption": "only a caption"},
    {"audio_id": "c", "audio_path": "c.wav", "caption": "c",
     "phrases": [{"phrase": "glass breaking", "segments": [[1.0, 9.0]]}, {"phrase": "siren", "segments": [[4, 12]]}]},
    {"audio_id": "d", "audio_path": "d.wav", "caption": "weak only", "phrases": [{"phrase": "wind"}]},
]


def build_set(tmp_path, records=RECORDS, bank=BANK, **data_options):
    metadata, bank_path = write_set(tmp_path, records, bank)
    data = DataConfig(
        sources=[DataSourceConfig("s", str(metadata))], phrase_bank=str(bank_path) if bank_path else None,
        **{"max_phrases": 5, "max_active": 3, **data_options},
    )
    return data, load_training_set(data, AUDIO, SkipCounter())


def test_batch_labels_table_and_ids(tmp_path):
    data, training_set = build_set(tmp_path)
    bank = training_set.bank
    assert bank.missing == ["glass breaking"] and bank.cluster_of("glass breaking") == len(BANK)
    builder = BatchBuilder(training_set, AUDIO, data)
    sample_index = torch.tensor([2, 1, 0, 3])
    lengths = torch.tensor([8 * 16000, 160000, 160000, 32000])  # clip 2 lasts 8 s: its siren stops there
    batch = builder.build(sample_index, torch.randn(4, 160000), lengths, epoch=3)

    assert batch.audio_ids == ["c", "b", "a", "d"]
    assert batch.annotated.tolist() == [True, False, True, False]
    assert torch.equal(batch.clip_group, sample_index) and torch.equal(batch.sample_index, sample_index)
    assert batch.captions[1] == "only a caption" and batch.captions[2] in ("first a", "second a")
    assert len(set(batch.phrases)) == len(batch.phrases)
    for text, ident, cluster in zip(batch.phrases, batch.phrase_id, batch.phrase_cluster):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        assert int(ident) == phrase_id(text) == int.from_bytes(digest, "little") % 2**63
        assert int(cluster) == bank.cluster_of(text)

    durations = {2: 8.0, 0: 10.0}
    for row, index in ((0, 2), (2, 0)):
        record = training_set.records[index]
        expected = {}
        for label in record.phrases:
            for frame in reference_frames(label.segments, durations[index]):
                expected.setdefault(frame, set()).add(bank.cluster_of(label.phrase))
        for frame in range(64):
            found = [c for c in batch.frame_active[row, frame].tolist() if c >= 0]
            assert found == sorted(expected.get(frame, set())), (index, frame)
    assert (batch.frame_active[[1, 3]] == -1).all() and (batch.clip_phrase_index[[1, 3]] == -1).all()

    # weak "rain" of clip a: ignored at every frame of a, nowhere else
    rain = bank.cluster_of("rain")
    assert batch.frame_ignore.shape == (4, 64, 1)
    assert (batch.frame_ignore[2] == rain).all() and (batch.frame_ignore[[0, 1, 3]] == -1).all()
    assert bank.cluster_of("rainfall") in batch.phrase_cluster.tolist()

    # per_clip lists: positives first (one alternative per cluster), then negatives, max_phrases in all
    row_a = batch.clip_phrase_index[2].tolist()
    clusters_a = [int(batch.phrase_cluster[i]) for i in row_a]
    dog, car = bank.cluster_of("dog"), bank.cluster_of("car")
    assert clusters_a[:2] == sorted([dog, car]) and len(set(clusters_a)) == 5
    assert not set(clusters_a[2:]) & {dog, car, rain}
    for slot, phrase_row in enumerate(row_a):
        mask = batch.clip_phrase_labels[2, slot].bool()
        assert torch.equal(mask, (batch.frame_active[2] == int(batch.phrase_cluster[phrase_row])).any(-1))
    assert batch.clip_phrase_labels[2, 2:].sum() == 0

    again = builder.build(sample_index, batch.waveforms, lengths, epoch=3)
    assert again.phrases == batch.phrases and again.captions == batch.captions


def test_no_ignore_tensor_without_weak_labels(tmp_path):
    data, training_set = build_set(tmp_path, RECORDS[1:3])
    batch = BatchBuilder(training_set, AUDIO, data).build(torch.tensor([0, 1]), torch.zeros(2, 160000),
                                                          torch.tensor([160000, 160000]), epoch=0)
    assert batch.frame_ignore is None


def test_negatives_never_share_a_cluster_with_positives(tmp_path):
    data, training_set = build_set(tmp_path, max_phrases=6)
    builder = BatchBuilder(training_set, AUDIO, data)
    bank = training_set.bank
    seen_negatives = {0: set(), 1: set()}
    captions = set()
    for epoch in range(300):
        batch = builder.build(torch.tensor([0, 2]), torch.zeros(2, 10), torch.tensor([10, 10]), epoch)
        captions.add(batch.captions[0])
        for row, record in ((0, training_set.records[0]), (1, training_set.records[2])):
            excluded = {bank.cluster_of(label.phrase) for label in record.phrases}
            positives = len({bank.cluster_of(label.phrase) for label in record.phrases if not label.weak})
            clusters = [int(batch.phrase_cluster[i]) for i in batch.clip_phrase_index[row] if i >= 0]
            negatives = clusters[positives:]
            assert len(set(clusters)) == len(clusters) == 6
            assert not set(negatives) & excluded
            seen_negatives[row] |= set(negatives)
    all_clusters = set(range(len(bank)))  # every bank cluster outside the clip's own is drawn eventually
    assert seen_negatives[0] == all_clusters - {bank.cluster_of(p) for p in ("dog", "car", "rain")}
    assert seen_negatives[1] == all_clusters - {bank.cluster_of(p) for p in ("glass breaking", "siren")}
    assert captions == {"first a", "second a"}


def test_too_many_active_clusters_names_the_line(tmp_path):
    crowded = {"audio_id": "x", "audio_path": "x.wav", "caption": "x",
               "phrases": [{"phrase": p, "segments": [[1.0, 2.0]]} for p in ("dog", "car", "siren", "rain")]}
    metadata, _ = write_set(tmp_path, RECORDS[:2] + [crowded], BANK)
    with pytest.raises(MetadataError, match=rf"{metadata}:3: 4 clusters sound at frame 6 > data.max_active = 3"):
        build_set(tmp_path, RECORDS[:2] + [crowded])
    with pytest.raises(MetadataError, match=rf"{metadata}:3: 4 distinct phrase clusters .*max_phrases = 3"):
        build_set(tmp_path, RECORDS[:2] + [crowded], max_phrases=3, max_active=8)
    # "dog" and "siren" are on the skipped line only: warned about, not refused
    _, training_set = build_set(tmp_path, RECORDS[:2] + [crowded], on_bad_sample="skip", on_empty_class="warn")
    assert [r.audio_id for r in training_set.records] == ["a", "b"]
