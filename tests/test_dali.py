"""DALI input path (CPU pipeline) against load_audio, from files and from WebDataset shards.

The two paths resample differently (DALI's windowed sinc vs torchaudio's default Hann
sinc of width 6, whose passband droops slightly). Measured on the clips below (three
0.2-amplitude tones between 100 Hz and 3.5 kHz plus faint noise, 8 to 44.1 kHz, 1 or 2
channels): away from the first/last 64 samples, SNR 44-51 dB and max abs difference
<= 6.4e-3 (about 1% of the 0.6 peak); including the edges, where the filters' start-up
transients differ (up to 0.16), SNR >= 40 dB. Asserted: interior SNR >= 40 dB and max abs
difference <= 1e-2, whole-clip SNR >= 35 dB, lengths within 1 sample, and 16 kHz files
decoded identically.
"""
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from wds2idx import IndexCreator

from finelap.audio.dali import DaliAudioLoader
from finelap.audio.io import AudioLoadError, load_audio

MAX_SECONDS = 2.0
EDGE = 64  # samples at each end where the resamplers' transients differ
# (sample rate, channels, format, seconds): every rate and channel count, cropped and not
CLIPS = [
    (16000, 1, "wav", 1.0), (22050, 2, "flac", 2.5), (44100, 2, "flac", 1.3), (8000, 1, "wav", 0.7),
    (44100, 1, "wav", 2.2), (8000, 2, "flac", 1.6), (22050, 1, "wav", 0.4), (16000, 2, "flac", 1.9),
    (44100, 2, "wav", 0.9), (22050, 2, "flac", 1.1),
]
FIRST_INDEX = 100  # global sample indices of the generated set: 100, 101, ...


def tones(seconds: float, sample_rate: int, channels: int, seed: int) -> np.ndarray:
    """[frames, channels] tones below 3.5 kHz (inside every rate's band) plus faint white noise."""
    rng = np.random.default_rng(seed)
    time = np.arange(int(seconds * sample_rate))[:, None] / sample_rate
    signal = sum(
        0.2 * np.sin(2 * np.pi * rng.uniform(100, 3500, channels) * time + rng.uniform(0, 6)) for _ in range(3)
    )
    return signal + 0.002 * rng.standard_normal(signal.shape)


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory):
    """(paths, global indices) of the generated clips, and a shard folder in the packer's layout."""
    folder = tmp_path_factory.mktemp("dali")
    paths, indices = [], []
    for number, (sample_rate, channels, extension, seconds) in enumerate(CLIPS):
        path = folder / f"clip{number}.{extension}"
        soundfile.write(path, tones(seconds, sample_rate, channels, seed=number), sample_rate, subtype="PCM_16")
        paths.append(path)
        indices.append(FIRST_INDEX + number)
    shards = folder / "shards"
    write_shards(shards, paths, indices, shard_size=4)
    return paths, indices, shards


def write_shards(folder, paths, indices, shard_size):
    """shard-NNNNNN.tar with {key}.{ext} + {key}.json members (key = 9-digit global index) and .idx files."""
    folder.mkdir()
    for shard, start in enumerate(range(0, len(paths), shard_size)):
        tar_path = folder / f"shard-{shard:06d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for path, index in zip(paths[start : start + shard_size], indices[start : start + shard_size]):
                key = f"{index:09d}"
                record = {"audio_id": path.stem, "audio_path": f"{key}{path.suffix}", "caption": "tones"}
                members = [(f"{key}{path.suffix}", path.read_bytes()), (f"{key}.json", json.dumps(record).encode())]
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        with IndexCreator(str(tar_path), str(tar_path.with_suffix(".idx")), verbose=False) as index:
            index.create_index()


def collect(loader):
    """{sample index: (waveform row [S], length)} over one epoch, and the batch sizes seen."""
    clips, batch_sizes = {}, []
    for sample_index, waveforms, lengths in loader:
        assert sample_index.dtype == lengths.dtype == torch.int64 and waveforms.dtype == torch.float32
        assert waveforms.shape == (len(sample_index), int(MAX_SECONDS * 16000))
        batch_sizes.append(len(sample_index))
        for index, waveform, length in zip(sample_index.tolist(), waveforms, lengths.tolist()):
            assert index not in clips
            clips[index] = (waveform, length)
    return clips, batch_sizes


def snr_db(signal: torch.Tensor, reference: torch.Tensor) -> float:
    noise = (signal - reference).square().sum().clamp_min(1e-20)
    return float(10 * torch.log10(reference.square().sum() / noise))


def assert_matches_load_audio(clips, paths, indices):
    assert sorted(clips) == sorted(indices)
    for path, index in zip(paths, indices):
        waveform, length = clips[index]
        expected, expected_length = load_audio(path, max_seconds=MAX_SECONDS)
        assert abs(length - expected_length) <= 1, path
        assert torch.all(waveform[length:] == 0), path  # zero padding after the true length
        common = min(length, expected_length)
        assert snr_db(waveform[:common], expected[:common]) >= 35, path
        interior = slice(EDGE, common - EDGE)
        assert snr_db(waveform[interior], expected[interior]) >= 40, path
        assert (waveform[interior] - expected[interior]).abs().max() <= 1e-2, path
        if soundfile.info(str(path)).samplerate == 16000:
            assert torch.equal(waveform[:common], expected[:common]), path


def test_files_match_load_audio(audio_set):
    paths, indices, _ = audio_set
    loader = DaliAudioLoader.from_files(paths, indices, batch_size=4, max_seconds=MAX_SECONDS)
    clips, batch_sizes = collect(loader)
    assert batch_sizes == [4, 4, 2] and len(loader) == 3
    assert_matches_load_audio(clips, paths, indices)


def test_files_keep_the_given_order_across_epochs(audio_set):
    paths, indices, _ = audio_set
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    loader = DaliAudioLoader.from_files([paths[i] for i in order], [indices[i] for i in order],
                                        batch_size=3, max_seconds=MAX_SECONDS)
    for _ in range(2):
        seen = [index for sample_index, _, _ in loader for index in sample_index.tolist()]
        assert seen == [indices[i] for i in order]


def test_shards_match_load_audio(audio_set):
    paths, indices, shards = audio_set
    loader = DaliAudioLoader.from_shards(shards, batch_size=4, max_seconds=MAX_SECONDS)
    clips, batch_sizes = collect(loader)
    assert batch_sizes == [4, 4, 2]
    assert_matches_load_audio(clips, paths, indices)


def test_shards_without_index_files(audio_set, tmp_path):
    paths, indices, shards = audio_set
    for tar_path in shards.glob("*.tar"):
        (tmp_path / tar_path.name).write_bytes(tar_path.read_bytes())
    clips, _ = collect(DaliAudioLoader.from_shards(tmp_path, batch_size=4, max_seconds=MAX_SECONDS))
    with_index, _ = collect(DaliAudioLoader.from_shards(shards, batch_size=4, max_seconds=MAX_SECONDS))
    assert sorted(clips) == sorted(with_index) == sorted(indices)
    assert all(torch.equal(clips[index][0], with_index[index][0]) for index in indices)


@pytest.mark.parametrize("source", ["files", "shards"])
def test_ranks_get_disjoint_parts_covering_the_data(audio_set, source):
    paths, indices, shards = audio_set
    seen, lengths = [], []
    for rank in range(3):
        options = dict(batch_size=2, max_seconds=MAX_SECONDS, shard_id=rank, num_shards=3)
        loader = (DaliAudioLoader.from_files(paths, indices, **options) if source == "files"
                  else DaliAudioLoader.from_shards(shards, **options))
        part = [index for sample_index, _, _ in loader for index in sample_index.tolist()]
        seen.append(part)
        lengths.append(len(loader))
    assert sorted(sum(seen, [])) == sorted(indices)
    assert [len(part) for part in seen] == [3, 3, 4]
    assert lengths == [2, 2, 2]


def test_drop_last_gives_every_rank_the_same_full_batches(audio_set):
    paths, indices, _ = audio_set
    loaders = [DaliAudioLoader.from_files(paths, indices, batch_size=3, max_seconds=MAX_SECONDS, shard_id=rank,
                                          num_shards=2, drop_last=True) for rank in range(2)]
    for _ in range(2):  # the dropped tail is drained: the second epoch starts at the shard's beginning
        parts = [[sample_index.tolist() for sample_index, _, _ in loader] for loader in loaders]
        assert parts == [[indices[0:3]], [indices[5:8]]]


def test_shuffle_is_a_permutation(audio_set):
    paths, indices, _ = audio_set
    loader = DaliAudioLoader.from_files(paths, indices, batch_size=4, max_seconds=MAX_SECONDS, shuffle=True, seed=3)
    seen = [index for sample_index, _, _ in loader for index in sample_index.tolist()]
    assert sorted(seen) == indices


def test_no_crop_pads_to_the_longest_clip(audio_set):
    paths, indices, _ = audio_set
    loader = DaliAudioLoader.from_files(paths[:3], indices[:3], batch_size=3, max_seconds=None)
    (sample_index, waveforms, lengths), = list(loader)
    assert lengths.tolist()[1] == int(2.5 * 16000)
    assert waveforms.shape == (3, int(lengths.max()))


# ---------------------------------------------------------------- bad input


def loader_over(paths):
    return DaliAudioLoader.from_files(paths, batch_size=2, max_seconds=MAX_SECONDS)


def test_corrupt_file_names_its_batch(audio_set, tmp_path):
    paths, _, _ = audio_set
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioLoadError, match=r"batch 1 of shard 0, one of \[.*corrupt\.wav.*\].*Format not recognised"):
        list(loader_over([paths[0], paths[1], corrupt, paths[3]]))


def test_truncated_flac_names_the_file(audio_set, tmp_path):
    paths, _, _ = audio_set
    encoded = paths[1].read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(encoded[: len(encoded) // 3])
    with pytest.raises(AudioLoadError, match=r"cut\.flac: cannot decode audio \(DALI\)"):
        list(loader_over([paths[0], cut]))


def test_truncated_member_of_a_shard_names_tar_and_member(audio_set, tmp_path):
    paths, _, _ = audio_set
    cut = tmp_path / "cut.flac"
    cut.write_bytes(paths[1].read_bytes()[:3000])
    write_shards(tmp_path / "shards", [paths[0], cut], [7, 8], shard_size=2)
    with pytest.raises(AudioLoadError, match=r"shard-000000\.tar:\d+:000000008\.flac: cannot decode audio \(DALI\)"):
        list(DaliAudioLoader.from_shards(tmp_path / "shards", batch_size=2, max_seconds=MAX_SECONDS))


def test_short_clip_names_the_file(audio_set, tmp_path):
    paths, _, _ = audio_set
    soundfile.write(tmp_path / "short.wav", tones(0.05, 44100, 2, seed=1), 44100)
    with pytest.raises(AudioLoadError, match=r"short\.wav: audio is too short: 50\.0 ms < 100 ms"):
        list(loader_over([paths[0], tmp_path / "short.wav"]))


def test_non_finite_samples_name_the_file(audio_set, tmp_path):
    paths, _, _ = audio_set
    data = tones(0.5, 16000, 1, seed=2).astype(np.float32)
    data[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", data, 16000, subtype="FLOAT")
    with pytest.raises(AudioLoadError, match=r"nan\.wav: audio contains NaN or Inf samples"):
        list(loader_over([paths[0], tmp_path / "nan.wav"]))


def test_missing_shards_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard-\\*.tar files"):
        DaliAudioLoader.from_shards(tmp_path)
