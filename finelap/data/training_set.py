"""The training set, cluster-based phrase sampling, and building a `Batch`.

Per annotated clip (one with timestamped phrases) the reference draws
N = max_phrases phrases: one alternative of each positive cluster (the
clusters of its timed phrases), then negatives: distinct clusters drawn
uniformly from the bank that are neither positive nor weakly present in the
clip (weak = a phrase without segments), each as a random alternative. The
batch's phrase table is the union of these texts over the batch (plus an
alternative of each weak cluster), keyed by text; the batch-negatives frame
stream uses the whole table, `per_clip` mode each clip's own list.

Randomness (caption choice, alternatives, negatives) is drawn from a
generator seeded by (seed, epoch, sample index): the same on every rank,
worker and input path, and different each epoch.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Sequence

import numpy
import torch

from finelap.bad_input import LabelSurvival, MetadataError, Skip, SkipCounter, refuse_or_warn
from finelap.config import AudioEncoderConfig, DataConfig
from finelap.data.batch import Batch
from finelap.data.labels import FrameGrid
from finelap.data.metadata import ClipRecord, iter_metadata
from finelap.data.phrase_bank import PhraseBank

logger = logging.getLogger("finelap.data")


def phrase_id(text: str) -> int:
    """Stable 63-bit id of a phrase text (blake2b): equal on every process and rank."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class ClipLabels:
    """A clip's phrases resolved to clusters (ids ascending)."""

    positives: tuple[tuple[int, tuple[tuple[float, float], ...]], ...]  # (cluster, its segments in seconds)
    weak: tuple[int, ...]  # clusters present without timing, not also positive

    @property
    def annotated(self) -> bool:
        return bool(self.positives)


def resolve_clip_labels(
    record: ClipRecord, bank: PhraseBank, grid: FrameGrid, max_seconds: float, max_phrases: int, max_active: int
) -> ClipLabels:
    """Group a record's phrases by cluster; raise MetadataError (naming file:line) when the
    clip has more positive clusters than `max_phrases` or more than `max_active` at one frame."""
    segments_by_cluster: dict[int, list[tuple[float, float]]] = {}
    weak: set[int] = set()
    for label in record.phrases:
        cluster = bank.cluster_of(label.phrase)
        if label.weak:
            weak.add(cluster)
        else:
            segments_by_cluster.setdefault(cluster, []).extend(label.segments)
    positives = tuple((cluster, tuple(segments_by_cluster[cluster])) for cluster in sorted(segments_by_cluster))
    if len(positives) > max_phrases:
        raise MetadataError(
            record.location, "too_many_phrases",
            f"{len(positives)} distinct phrase clusters with segments > data.max_phrases = {max_phrases}",
        )
    if positives:
        active_per_frame = torch.stack([grid.mask(segments, max_seconds) for _, segments in positives]).sum(0)
        if int(active_per_frame.max()) > max_active:
            frame = int(active_per_frame.argmax())
            raise MetadataError(
                record.location, "too_many_active",
                f"{int(active_per_frame.max())} clusters sound at frame {frame} > data.max_active = {max_active}",
            )
    return ClipLabels(positives, tuple(sorted(weak - set(segments_by_cluster))))


@dataclass
class TrainingSet:
    """All training records of the configured sources, in source order; index = global sample index."""

    records: list[ClipRecord]
    labels: list[ClipLabels]
    bank: PhraseBank
    source_names: list[str]
    source_weights: list[float]
    source_of: numpy.ndarray  # [N] int64 index into source_names
    annotated: numpy.ndarray  # [N] bool
    loaded: LabelSurvival  # per phrase label: clips listed in the metadata, and kept once bad lines were skipped

    def __len__(self) -> int:
        return len(self.records)

    def check_label_survival(self, skips: SkipCounter, on_empty_class: str) -> LabelSurvival:
        """Per phrase label: clips listed, and clips left once the records `skips` lists (audio that failed
        to load in training, keyed by the record's file:line) are taken out too. Refuses (ValueError) or
        warns, per `on_empty_class` (data.on_empty_class), when that leaves a label with none. A label is
        empty only once every one of its clips has been tried and skipped, so call it again as training
        goes on (at checkpoints)."""
        why = {entry["key"]: entry["message"] for entry in skips.listed}
        failed = [([label.phrase for label in record.phrases], why[record.location])
                  for record in self.records if record.location in why]
        survival = self.loaded.dropping(failed)
        refuse_or_warn(survival, on_empty_class, "training clips", "data.on_empty_class")
        return survival


def load_training_set(data: DataConfig, audio: AudioEncoderConfig, skips: SkipCounter | None = None) -> TrainingSet:
    """Read the phrase bank and every source; resolve each clip's phrases to clusters.

    Phrases are registered in source and line order, so ids of phrases missing
    from the bank are the same in every process that reads the same files.
    With on_bad_sample "skip", a phrase label whose every clip was skipped is
    refused or warned about per data.on_empty_class.
    """
    if not data.sources:
        raise ValueError("data.sources is empty: give at least one metadata file")
    skip_mode = data.on_bad_sample
    bank = PhraseBank.read(data.phrase_bank, skip_mode, skips) if data.phrase_bank else PhraseBank()
    grid = FrameGrid.from_audio_config(audio, data.frame_label_rule)
    records, labels, source_of = [], [], []
    survival = LabelSurvival()

    def drop(error: MetadataError, phrases) -> None:
        if skip_mode != "skip":
            raise error
        if skips is not None:
            skips.record(Skip(error.location, error.reason, str(error)))
        survival.drop(phrases, str(error))

    for source_number, source in enumerate(data.sources):
        for record, _ in iter_metadata(source.path, source.name, data.audio_root):
            if isinstance(record, MetadataError):
                drop(record, record.phrases)
                continue
            phrases = [label.phrase for label in record.phrases]
            try:
                clip = resolve_clip_labels(record, bank, grid, audio.max_seconds, data.max_phrases, data.max_active)
            except MetadataError as error:
                drop(error, phrases)
                continue
            survival.keep(phrases)
            records.append(record)
            labels.append(clip)
            source_of.append(source_number)
    if not records:
        raise ValueError(f"no usable training records in {[source.path for source in data.sources]}")
    refuse_or_warn(survival, data.on_empty_class, "training clips", "data.on_empty_class")
    if data.phrase_bank and bank.missing:
        logger.warning(
            "%d phrases are not in the phrase bank %s and became clusters of their own, e.g. %s",
            len(bank.missing), data.phrase_bank, bank.missing[:10],
        )
    return TrainingSet(
        records, labels, bank,
        [source.name for source in data.sources],
        [source.weight for source in data.sources],
        numpy.asarray(source_of, dtype=numpy.int64),
        numpy.asarray([clip.annotated for clip in labels], dtype=bool),
        survival,
    )


def draw_clip_phrases(
    clip: ClipLabels, bank: PhraseBank, max_phrases: int, rng: random.Random
) -> list[tuple[str, int]]:
    """[(text, cluster)]: an alternative of each positive cluster, then up to max_phrases in
    total with negatives, distinct clusters outside the clip's positive and weak clusters."""
    excluded = {cluster for cluster, _ in clip.positives} | set(clip.weak)
    wanted = max(max_phrases - len(clip.positives), 0)
    candidates = min(len(bank), wanted + len(excluded))  # enough draws that `wanted` survive the exclusion
    negatives = [cluster for cluster in rng.sample(range(len(bank)), candidates) if cluster not in excluded][:wanted]
    chosen = [cluster for cluster, _ in clip.positives] + negatives
    return [(bank.draw_alternative(cluster, rng), cluster) for cluster in chosen]


class BatchBuilder:
    """Turns (sample indices, waveforms, lengths) into a `Batch`; both input paths use it."""

    def __init__(self, training_set: TrainingSet, audio: AudioEncoderConfig, data: DataConfig) -> None:
        self.training_set = training_set
        self.grid = FrameGrid.from_audio_config(audio, data.frame_label_rule)
        self.sample_rate = audio.sample_rate
        self.max_seconds = audio.max_seconds
        self.max_phrases = data.max_phrases
        self.max_active = data.max_active
        self.seed = data.seed

    def clip_rng(self, epoch: int, sample_index: int) -> random.Random:
        """The clip's generator for this epoch (string seeds hash with SHA-512: stable across processes)."""
        return random.Random(f"{self.seed}:{epoch}:{sample_index}")

    def build(self, sample_index: torch.Tensor, waveforms: torch.Tensor, lengths: torch.Tensor, epoch: int) -> Batch:
        """sample_index [B] int64, waveforms [B, S] float32 zero-padded, lengths [B] int64 -> Batch."""
        training_set = self.training_set
        bank = training_set.bank
        count, num_frames = len(sample_index), self.grid.num_frames
        indices = [int(i) for i in sample_index]
        captions, clip_lists = [], []
        phrase_row: dict[str, int] = {}
        phrase_cluster: list[int] = []
        for index in indices:
            rng = self.clip_rng(epoch, index)
            captions.append(rng.choice(training_set.records[index].captions))
            clip = training_set.labels[index]
            drawn = []
            if clip.annotated:
                drawn = draw_clip_phrases(clip, bank, self.max_phrases, rng)
                drawn += [(bank.draw_alternative(cluster, rng), cluster) for cluster in clip.weak]
            for text, cluster in drawn:
                if text not in phrase_row:
                    phrase_row[text] = len(phrase_cluster)
                    phrase_cluster.append(cluster)
            clip_lists.append(drawn[: len(drawn) - len(clip.weak)] if clip.annotated else [])

        frame_active = torch.full((count, num_frames, self.max_active), -1, dtype=torch.int64)
        ignore_width = max((len(training_set.labels[i].weak) for i in indices if training_set.annotated[i]), default=0)
        frame_ignore = torch.full((count, num_frames, ignore_width), -1, dtype=torch.int64) if ignore_width else None
        clip_phrase_index = torch.full((count, self.max_phrases), -1, dtype=torch.int64)
        clip_phrase_labels = torch.zeros(count, self.max_phrases, num_frames)
        for row, index in enumerate(indices):
            clip = training_set.labels[index]
            if not clip.annotated:
                continue
            duration = float(lengths[row]) / self.sample_rate
            masks = torch.stack([self.grid.mask(segments, duration) for _, segments in clip.positives])  # [n_pos, T]
            clusters = torch.tensor([cluster for cluster, _ in clip.positives])
            slots = masks.long().cumsum(0) - 1  # slot of each active cluster at each frame, in cluster order
            positive, frame = masks.nonzero(as_tuple=True)
            frame_active[row, frame, slots[positive, frame]] = clusters[positive]
            if clip.weak:
                frame_ignore[row, :, : len(clip.weak)] = torch.tensor(clip.weak)
            texts = clip_lists[row]
            clip_phrase_index[row, : len(texts)] = torch.tensor([phrase_row[text] for text, _ in texts])
            clip_phrase_labels[row, : len(clip.positives)] = masks.float()

        return Batch(
            audio_ids=[training_set.records[i].audio_id for i in indices],
            waveforms=waveforms,
            lengths=lengths,
            captions=captions,
            caption_clip=torch.arange(count, dtype=torch.int64),
            clip_group=sample_index.clone(),
            annotated=torch.as_tensor(training_set.annotated[indices], dtype=torch.bool),
            phrases=list(phrase_row),
            phrase_id=torch.tensor([phrase_id(text) for text in phrase_row], dtype=torch.int64),
            phrase_cluster=torch.tensor(phrase_cluster, dtype=torch.int64),
            frame_active=frame_active,
            frame_ignore=frame_ignore,
            clip_phrase_index=clip_phrase_index,
            clip_phrase_labels=clip_phrase_labels,
            sample_index=sample_index.clone(),
        )

    def pad(self, waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms of any lengths -> ([B, S] float32 zero-padded to max_seconds, [B] int64 lengths)."""
        width = int(round(self.max_seconds * self.sample_rate))
        padded = torch.zeros(len(waveforms), width)
        lengths = torch.zeros(len(waveforms), dtype=torch.int64)
        for row, waveform in enumerate(waveforms):
            length = min(int(waveform.shape[0]), width)
            padded[row, :length] = waveform[:length]
            lengths[row] = length
        return padded, lengths
