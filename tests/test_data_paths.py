"""The DataLoader and DALI input paths give the same samples and labels, from files and from shards.

Waveforms agree up to the resampler difference measured in tests/test_dali.py (DALI's
windowed sinc vs torchaudio's): band-limited content here, so >= 40 dB SNR away from the
clip edges; 16 kHz files decode identically; lengths within one sample. The largest
interior difference seen here is 6e-3 (a 44.1 kHz clip): the faint white noise above
the 8 kHz cut-off is filtered differently, so the bound on it is 1e-2.
"""
import json

import numpy
import pytest
import soundfile
import torch

from finelap.config import Config, DataConfig, DataSourceConfig
from finelap.data.loader import DaliTrainLoader, build_train_loader
from finelap.data_cli import main as data_cli

EDGE = 64  # samples at each end where the two resamplers' start-up transients differ
# (rate, channels, format, seconds): every rate and channel count of the issue, WAV and FLAC
CLIPS = [(8000, 1, "wav", 1.3), (16000, 2, "flac", 0.9), (44100, 2, "flac", 1.7), (44100, 1, "wav", 1.1),
         (8000, 2, "flac", 0.7), (16000, 1, "wav", 1.5)] * 2


def tones(seconds, rate, channels, seed):
    """[frames, channels] tones below 2.8 kHz (0.7 x the 8 kHz files' Nyquist) plus faint noise."""
    rng = numpy.random.default_rng(seed)
    time = numpy.arange(int(seconds * rate))[:, None] / rate
    signal = sum(0.2 * numpy.sin(2 * numpy.pi * rng.uniform(100, 2800, channels) * time + rng.uniform(0, 6))
                 for _ in range(3))
    return signal + 0.002 * rng.standard_normal(signal.shape)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paths")
    records = []
    for number, (rate, channels, extension, seconds) in enumerate(CLIPS):
        name = f"clip{number:02d}.{extension}"
        soundfile.write(folder / name, tones(seconds, rate, channels, number), rate, subtype="PCM_16")
        record = {"audio_id": f"clip{number}", "audio_path": name, "caption": [f"caption {number}", f"other {number}"]}
        if number % 2:
            record["phrases"] = [{"phrase": "dog", "segments": [[0.05, 0.4]]},
                                 {"phrase": "engine", "segments": [[0.3, 0.6], [0.9, 3.0]]}, {"phrase": "rain"}]
        records.append(record)
    metadata = folder / "train.jsonl"
    metadata.write_text("".join(json.dumps(r) + "\n" for r in records))
    bank = folder / "bank.jsonl"
    bank.write_text("".join(json.dumps({"phrase": p, "alternatives": a}) + "\n" for p, a in [
        ("dog", ["dog", "dog barking"]), ("engine", ["engine", "motor"]), ("rain", ["rain"]),
        ("siren", ["siren"]), ("speech", ["speech", "talking"]), ("music", ["music"])]))
    shards = folder / "shards"
    assert data_cli(["pack", "--metadata", str(metadata), "--out", str(shards), "--shard-size", "5"]) == 0
    return metadata, bank, shards


def config_for(dataset, pipeline, shards=False):
    metadata, bank, shard_folder = dataset
    config = Config()
    config.data = DataConfig(
        sources=[DataSourceConfig("train", str(metadata))], phrase_bank=str(bank), pipeline=pipeline,
        shards=str(shard_folder) if shards else None, batch_size=4, max_phrases=4, num_workers=1,
    )
    return config


def per_clip(batch):
    """{sample index: (audio_id, caption, its per-clip phrase texts, frame_active rows, length, waveform)}."""
    clips = {}
    for row, index in enumerate(batch.sample_index.tolist()):
        texts = [batch.phrases[i] for i in batch.clip_phrase_index[row].tolist() if i >= 0]
        clips[index] = (batch.audio_ids[row], batch.captions[row], texts, batch.frame_active[row],
                        int(batch.lengths[row]), batch.waveforms[row].cpu())
    return clips


def assert_same_clip(expected, found, index):
    assert expected[:3] == found[:3], index
    assert torch.equal(expected[3], found[3]), index
    assert abs(expected[4] - found[4]) <= 1, index
    rate = CLIPS[index][0]
    length = min(expected[4], found[4])
    reference, waveform = expected[5][:length], found[5][:length]
    if rate == 16000:
        assert torch.equal(reference, waveform), index
    else:
        interior = slice(EDGE, length - EDGE)
        error = (waveform[interior] - reference[interior]).double()
        snr = 10 * torch.log10(reference[interior].double().pow(2).sum() / error.pow(2).sum())
        assert snr >= 40 and error.abs().max() <= 1e-2, (index, float(snr))


def test_files_dali_batches_equal_dataloader_batches(dataset):
    for epoch in (0, 1):
        loaders = {}
        for pipeline in ("dataloader", "dali"):
            loaders[pipeline] = build_train_loader(config_for(dataset, pipeline), rank=1, world_size=2, epoch=epoch)
        assert isinstance(loaders["dali"], DaliTrainLoader)
        reference, dali = list(loaders["dataloader"]), list(loaders["dali"])
        assert len(reference) == len(dali) == len(CLIPS) // 8
        for a, b in zip(reference, dali):
            assert torch.equal(a.sample_index, b.sample_index) and a.phrases == b.phrases
            for name in ("phrase_id", "phrase_cluster", "frame_active", "clip_phrase_index", "annotated"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert torch.equal(a.frame_ignore, b.frame_ignore) if a.frame_ignore is not None else b.frame_ignore is None
            expected, found = per_clip(a), per_clip(b)
            for index in expected:
                assert_same_clip(expected[index], found[index], index)


def test_shards_dali_and_dataloader_give_the_same_samples(dataset):
    # one rank: the DataLoader epoch (half the clips annotated, 2 of 4 slots) and the DALI shard epoch
    # both hold every clip once; the orders differ, each clip's labels and audio agree
    from_loader = build_train_loader(config_for(dataset, "dataloader", shards=True), epoch=2)
    from_dali = build_train_loader(config_for(dataset, "dali", shards=True), epoch=2)
    assert len(from_dali) == len(CLIPS) // 4
    expected, found = {}, {}
    for batch in from_loader:
        expected.update(per_clip(batch))
    orders = []
    for batch in from_dali:
        found.update(per_clip(batch))
        orders += batch.sample_index.tolist()
    assert sorted(expected) == sorted(found) == list(range(len(CLIPS)))
    for index in expected:
        assert_same_clip(expected[index], found[index], index)
    from_dali.set_epoch(3)
    assert [i for b in from_dali for i in b.sample_index.tolist()] != orders  # reshuffled each epoch


def test_dali_has_no_skip_mode(dataset):
    config = config_for(dataset, "dali")
    config.data.on_bad_sample = "skip"
    with pytest.raises(ValueError, match="'dali' has no skip mode"):
        build_train_loader(config)
