"""The training input: sampler -> audio decoding -> `Batch`, on the DataLoader or the DALI path.

`build_train_loader(config, rank, world_size)` returns a `TrainLoader`:
iterate it for one epoch of this rank's batches, `set_epoch(e)` before each
epoch, and checkpoint `state_dict()` (epoch and the next global batch, counted
in batches handed to training, not prefetched ones, and the skipped samples)
to resume exactly. Before each checkpoint `gather_skips()` gives every rank the
skips of all; after it, `check_label_survival` refuses or warns about a phrase
label that skips have left with no clip.

DataLoader path: worker processes decode with `load_audio` (soundfile,
downmix, resample to 16 kHz, crop to max_seconds), from the files or from
the shards, and collate into a `Batch` padded to max_seconds. A file that
fails raises AudioLoadError naming it and its metadata line; with
`on_bad_sample: skip` the clip is left out of its batch (the batch is then
smaller, possibly empty, so that every rank still takes the same number of
steps) and the skip, returned beside the batch, is counted and listed (with
its epoch and batch) in `skips`.

DALI path (`finelap.audio.dali.DaliAudioLoader`, decoding and resampling on
DALI's CPU threads, the batch moved to the current GPU when there is one):
- from files: each epoch DALI reads this rank's files in the sampler's
  order, one sampler batch per DALI batch, so batches are the DataLoader
  path's (waveforms within the resampler difference that tests/test_dali.py
  measures). Labels are joined by the sample index DALI returns.
- from shards (`data.shards`): DALI's webdataset reader decides the order:
  the shards are split between ranks, shuffled with a seed per epoch, every
  clip once per epoch (len(this rank's part) // batch_size batches, the same
  on every rank). Source weights and `annotated_fraction` are not applied
  there; a resumed epoch re-reads and drops the batches already used.
  Labels are joined through the member key (the packed index) -> audio_id.
DALI has no skip mode: run `finelap data validate` first.
"""
from __future__ import annotations

import functools
import gc
from typing import Iterator

import numpy
import torch
from torch.utils.data import DataLoader, Dataset

from finelap.audio.io import AudioLoadError, load_audio, load_audio_bytes
from finelap.bad_input import LabelSurvival, Skip, SkipCounter, gather_skips
from finelap.config import AudioEncoderConfig, Config
from finelap.data.batch import Batch
from finelap.data.sampler import HeterogeneousBatchSampler
from finelap.data.training_set import BatchBuilder, TrainingSet, load_training_set
from finelap.data.shards import ShardIndex


class ClipDataset(Dataset):
    """index -> (index, waveform [S] float32 16 kHz mono cropped to max_seconds, or None, Skip or None)."""

    def __init__(
        self, training_set: TrainingSet, audio: AudioEncoderConfig, on_bad_sample: str, shards: ShardIndex | None
    ) -> None:
        self.training_set = training_set
        self.sample_rate = audio.sample_rate
        self.max_seconds = audio.max_seconds
        self.on_bad_sample = on_bad_sample
        self.shards = shards

    def __len__(self) -> int:
        return len(self.training_set)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, Skip | None]:
        record = self.training_set.records[index]
        try:
            if self.shards is None:
                waveform, _ = load_audio(record.audio_path, self.sample_rate, self.max_seconds)
            else:
                member = self.shards.member(record.audio_id, record.location)
                name = f"{member.tar_path}:{member.name}"
                waveform, _ = load_audio_bytes(self.shards.read(member), name, self.sample_rate, self.max_seconds)
        except AudioLoadError as error:
            message = f"{error} (metadata {record.location})"
            if self.on_bad_sample != "skip":
                raise AudioLoadError(message, error.reason) from None
            return index, None, Skip(record.location, error.reason, message)
        return index, waveform, None


def collate_clips(
    items: list[tuple[int, torch.Tensor | None, Skip | None]], builder: BatchBuilder, epoch: int
) -> tuple[Batch, list[Skip]]:
    """Decoded clips -> (Batch of the clips that loaded, skips of those that did not)."""
    loaded = [(index, waveform) for index, waveform, _ in items if waveform is not None]
    waveforms, lengths = builder.pad([waveform for _, waveform in loaded])
    sample_index = torch.tensor([index for index, _ in loaded], dtype=torch.int64)
    return builder.build(sample_index, waveforms, lengths, epoch), [skip for _, _, skip in items if skip is not None]


class TrainLoader:
    """One rank's batches for an epoch; resumable through state_dict / load_state_dict."""

    def __init__(
        self,
        builder: BatchBuilder,
        sampler: HeterogeneousBatchSampler,
        dataset: ClipDataset,
        num_workers: int,
        skips: SkipCounter,
    ) -> None:
        self.builder = builder
        self.sampler = sampler
        self.dataset = dataset
        self.num_workers = num_workers
        self.skips = skips  # counted per reason for the training log, each listed for skipped.jsonl
        self.epoch = sampler.epoch
        self.position = sampler.position  # next global batch to hand to training

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch starts from its first batch (a restored position is kept)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        """Batches left in this epoch."""
        return len(self.sampler) - self.position

    def state_dict(self) -> dict:
        """What a checkpoint's client state keeps of the input: "loader" (the sampler's state, the epoch and
        the next batch) and "skips" (every sample skipped so far, so a resumed run neither re-counts nor
        loses one)."""
        position = self.sampler.state_dict()
        position.update(epoch=self.epoch, position=self.position)
        return {"loader": position, "skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from the "loader" and "skips" entries of `state` (a checkpoint's client state)."""
        self.sampler.load_state_dict(state["loader"])
        self.epoch, self.position = self.sampler.epoch, self.sampler.position
        self.skips.load_state_dict(state["skips"])

    def gather_skips(self) -> None:
        """Give this rank's skips those of every rank (collective: every rank calls it), so that the
        checkpoint, saved once for all ranks, and the list of skipped samples hold them all."""
        gather_skips(self.skips)

    def check_label_survival(self, on_empty_class: str) -> LabelSurvival:
        """Refuse (ValueError) or warn, per `on_empty_class` (data.on_empty_class), when the skips so far have
        taken every clip of a phrase label; returns the per-label counts (see TrainingSet.check_label_survival)."""
        return self.builder.training_set.check_label_survival(self.skips, on_empty_class)

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.epoch, self.sampler.position = self.epoch, self.position
        for batch, skips in self._batches():
            for skip in skips:
                self.skips.record(skip, epoch=self.epoch, batch=self.position)
            self.position += 1
            yield batch

    def _batches(self) -> Iterator[tuple[Batch, list[Skip]]]:
        collate = functools.partial(collate_clips, builder=self.builder, epoch=self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,
        )
        if not self.num_workers:
            return iter(loader)
        # The workers fork when iteration starts. Frozen, the objects they inherit are left out of their
        # garbage collector, whose traversal would otherwise copy every page holding one into each worker.
        gc.collect()
        gc.freeze()
        try:
            return iter(loader)
        finally:
            gc.unfreeze()


class DaliTrainLoader(TrainLoader):
    """The DALI input path behind the same interface (see the module docstring)."""

    def __init__(
        self, builder: BatchBuilder, sampler: HeterogeneousBatchSampler, dataset: ClipDataset, num_threads: int,
        skips: SkipCounter,
    ) -> None:
        super().__init__(builder, sampler, dataset, num_threads, skips)
        self.shards = dataset.shards
        if self.shards is not None:
            keys = numpy.fromiter(map(self.shards.key_of, builder.training_set.records.audio_ids()), dtype=numpy.int64)
            packed = keys >= 0
            # packed key -> training index (-1: packed but not in this training set)
            self.index_of_key = numpy.full(self.shards.num_samples, -1, dtype=numpy.int64)
            self.index_of_key[keys[packed]] = numpy.flatnonzero(packed)

    def _dali_options(self, **extra) -> dict:
        return dict(
            batch_size=self.sampler.batch_size, sample_rate=self.builder.sample_rate,
            max_seconds=self.builder.max_seconds, num_threads=max(self.num_workers, 1),
            device_id=torch.cuda.current_device() if torch.cuda.is_available() else None, **extra,
        )

    def __len__(self) -> int:
        if self.shards is None:
            return super().__len__()
        # DALI splits N samples as [r * N // W, (r + 1) * N // W); drop_last keeps the smallest part's full batches
        total, world = self.shards.num_samples, self.sampler.world_size
        smallest = min((r + 1) * total // world - r * total // world for r in range(world))
        return smallest // self.sampler.batch_size - self.position

    def _shard_loader(self):
        from finelap.audio.dali import DaliAudioLoader

        return DaliAudioLoader.from_shards(
            self.shards.folder, **self._dali_options(
                shard_id=self.sampler.rank, num_shards=self.sampler.world_size, shuffle=True,
                seed=self.sampler.seed * 100_003 + self.epoch, drop_last=True,
            ),
        )

    def _batches(self) -> Iterator[tuple[Batch, list[Skip]]]:
        from finelap.audio.dali import DaliAudioLoader

        if self.shards is None:
            plan = self.sampler.plan(self.epoch)[self.position :, self.sampler.rank].reshape(-1)
            if len(plan) == 0:
                return
            records = self.builder.training_set.records
            loader = DaliAudioLoader.from_files([records[i].audio_path for i in plan], plan.tolist(), **self._dali_options())
            for sample_index, waveforms, lengths in loader:
                yield self.builder.build(sample_index, waveforms, lengths.cpu(), self.epoch), []
            return
        for number, (keys, waveforms, lengths) in enumerate(self._shard_loader()):
            if number < self.position:
                continue
            sample_index = torch.from_numpy(self.index_of_key[keys.numpy()])
            if (sample_index < 0).any():
                key = int(keys[int((sample_index < 0).nonzero()[0])])
                raise KeyError(f"shard member {key:09d} of {self.shards.folder} is not in the training metadata")
            yield self.builder.build(sample_index, waveforms, lengths.cpu(), self.epoch), []


def build_train_loader(config: Config, rank: int = 0, world_size: int = 1, epoch: int = 0) -> TrainLoader:
    """This rank's training input for `config.data` (DataLoader or DALI path), starting at `epoch`.

    DALI threads: data.num_workers. Skips (bad metadata lines, and audio on the DataLoader path) are
    counted in the loader's own counter, `loader.skips`.
    """
    data, audio = config.data, config.model.audio
    skips = SkipCounter()
    training_set = load_training_set(data, audio, skips)
    sampler = HeterogeneousBatchSampler(
        training_set.source_of, training_set.annotated, training_set.source_weights, data.batch_size,
        rank=rank, world_size=world_size, annotated_fraction=data.annotated_fraction, seed=data.seed,
    )
    sampler.set_epoch(epoch)
    builder = BatchBuilder(training_set, audio, data)
    shards = ShardIndex(data.shards, data.cache_dir) if data.shards else None
    dataset = ClipDataset(training_set, audio, data.on_bad_sample, shards)
    if data.pipeline == "dali":
        if data.on_bad_sample == "skip":
            raise ValueError("data.pipeline 'dali' has no skip mode: use on_bad_sample 'error' (run "
                             "`finelap data validate` first) or data.pipeline 'dataloader'")
        return DaliTrainLoader(builder, sampler, dataset, data.num_workers, skips)
    return TrainLoader(builder, sampler, dataset, data.num_workers, skips)
