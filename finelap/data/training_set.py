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

The records stay in their sources' mapped `ClipTable`s (clip_table.py): a
process holds [N] arrays of indices and flags, and a record and its cluster
labels are decoded when a batch needs them.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy
import torch

from finelap.bad_input import LabelSurvival, MetadataError, Skip, SkipCounter, refuse_or_warn
from finelap.config import AudioEncoderConfig, DataConfig
from finelap.data.batch import Batch
from finelap.data.clip_table import ClipTable, open_clip_table
from finelap.data.labels import FrameGrid
from finelap.data.metadata import ClipRecord
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


def clip_labels(record: ClipRecord, bank: PhraseBank) -> ClipLabels:
    """A record's phrases grouped by cluster: each timed cluster with its segments (in label order), and
    the clusters present only without timing."""
    segments_by_cluster: dict[int, list[tuple[float, float]]] = {}
    weak: set[int] = set()
    for label in record.phrases:
        cluster = bank.cluster_of(label.phrase)
        if label.weak:
            weak.add(cluster)
        else:
            segments_by_cluster.setdefault(cluster, []).extend(label.segments)
    positives = tuple((cluster, tuple(segments_by_cluster[cluster])) for cluster in sorted(segments_by_cluster))
    return ClipLabels(positives, tuple(sorted(weak - set(segments_by_cluster))))


def resolve_clip_labels(
    record: ClipRecord, bank: PhraseBank, grid: FrameGrid, max_seconds: float, max_phrases: int, max_active: int
) -> ClipLabels:
    """`clip_labels`, checked: raise MetadataError (naming file:line) when the clip has more positive
    clusters than `max_phrases` or more than `max_active` at one frame."""
    clip = clip_labels(record, bank)
    positives = clip.positives
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
    return clip


class TrainingRecords(Sequence[ClipRecord]):
    """The kept records of every source, in source order (index = global sample index), each decoded on
    access from its source's `ClipTable`: what a process holds is the mapped tables and two [N] arrays."""

    def __init__(self, tables: list[ClipTable], rows: list[numpy.ndarray]) -> None:
        self.tables = tables
        self.row_of = numpy.concatenate(rows)  # [N] int32 row in its source's table
        self.source_of = numpy.repeat(numpy.arange(len(tables), dtype=numpy.int64), [len(r) for r in rows])  # [N]
        self.first = numpy.concatenate([[0], numpy.cumsum([len(r) for r in rows])]).astype(numpy.int64)

    def __len__(self) -> int:
        return len(self.row_of)

    def __getitem__(self, index: int) -> ClipRecord:
        return self.tables[self.source_of[index]].record(self.row_of[index])

    def audio_ids(self) -> Iterator[str]:
        """The audio_id of every record, in index order (without decoding the rest of the records)."""
        for table, first, end in zip(self.tables, self.first, self.first[1:]):
            for row in self.row_of[first:end].tolist():
                yield table.audio_ids[row]

    def indices_of(self, location: str) -> list[int]:
        """The indices of the records at `location` (file:line): one, or none when no kept record is there
        (more only when two sources name the same file)."""
        path, _, line = location.rpartition(":")
        found = []
        for number, table in enumerate(self.tables):
            row = table.row_of_line(int(line)) if str(table.path) == path and line.isdigit() else None
            if row is None:
                continue
            kept = self.row_of[self.first[number] : self.first[number + 1]]
            position = int(numpy.searchsorted(kept, row))
            if position < len(kept) and kept[position] == row:
                found.append(int(self.first[number]) + position)
        return found


@dataclass
class TrainingSet:
    """All training records of the configured sources, in source order; index = global sample index."""

    records: TrainingRecords
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
        failed = (self.records[index] for index in sorted(i for key in why for i in self.records.indices_of(key)))
        survival = self.loaded.dropping(
            ([label.phrase for label in record.phrases], why[record.location]) for record in failed
        )
        refuse_or_warn(survival, on_empty_class, "training clips", "data.on_empty_class")
        return survival


def load_training_set(data: DataConfig, audio: AudioEncoderConfig, skips: SkipCounter | None = None) -> TrainingSet:
    """Read the phrase bank and every source (through its `ClipTable`, converted once and then mapped);
    resolve the phrases to clusters and check every clip's labels.

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
    tables, rows, annotated = [], [], []
    survival = LabelSurvival()

    def drop(error: MetadataError) -> None:
        if skip_mode != "skip":
            raise error
        if skips is not None:
            skips.record(Skip(error.location, error.reason, str(error)))
        survival.drop(error.phrases, str(error))

    for source in data.sources:
        table = open_clip_table(source.path, source.name, data.audio_root, data.cache_dir)
        # registering each distinct text in order of first appearance registers the missing phrases in the
        # order that reading the records line by line does
        for text in table.phrases:
            bank.cluster_of(text)
        # a clip has at most as many timed clusters as timed phrase texts: only one with more of those than
        # max_phrases or max_active can fail the checks
        kept = Counter(dict(zip(table.phrases, table.phrase_records.tolist())))  # records naming each phrase
        problems, failed = table.errors(), []
        for row in numpy.flatnonzero(table.timed_phrases > min(data.max_phrases, data.max_active)).tolist():
            record = table.record(row)
            try:
                resolve_clip_labels(record, bank, grid, audio.max_seconds, data.max_phrases, data.max_active)
            except MetadataError as error:
                error.phrases = tuple(dict.fromkeys(label.phrase for label in record.phrases))
                kept.subtract(error.phrases)
                problems.append((int(table.line[row]), error))
                failed.append(row)
        for _, error in sorted(problems, key=lambda problem: problem[0]):
            drop(error)
        survival.keep_counted(+kept)
        keep = numpy.ones(len(table), dtype=bool)
        keep[failed] = False
        tables.append(table)
        rows.append(numpy.flatnonzero(keep).astype(numpy.int32))
        annotated.append(table.timed_phrases[keep] > 0)
    records = TrainingRecords(tables, rows)
    if not len(records):
        raise ValueError(f"no usable training records in {[source.path for source in data.sources]}")
    refuse_or_warn(survival, data.on_empty_class, "training clips", "data.on_empty_class")
    if data.phrase_bank and bank.missing:
        logger.warning(
            "%d phrases are not in the phrase bank %s and became clusters of their own, e.g. %s",
            len(bank.missing), data.phrase_bank, bank.missing[:10],
        )
    return TrainingSet(
        records, bank,
        [source.name for source in data.sources],
        [source.weight for source in data.sources],
        records.source_of,
        numpy.concatenate(annotated),
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
        records = [training_set.records[index] for index in indices]
        clips = [clip_labels(record, bank) for record in records]
        captions, clip_lists = [], []
        phrase_row: dict[str, int] = {}
        phrase_cluster: list[int] = []
        for index, record, clip in zip(indices, records, clips):
            rng = self.clip_rng(epoch, index)
            captions.append(rng.choice(record.captions))
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
        ignore_width = max((len(clip.weak) for clip in clips if clip.annotated), default=0)
        frame_ignore = torch.full((count, num_frames, ignore_width), -1, dtype=torch.int64) if ignore_width else None
        clip_phrase_index = torch.full((count, self.max_phrases), -1, dtype=torch.int64)
        clip_phrase_labels = torch.zeros(count, self.max_phrases, num_frames)
        for row, clip in enumerate(clips):
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
            audio_ids=[record.audio_id for record in records],
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
