"""One synthetic mixture: events placed over a background at drawn times and SNRs.

Every random choice of mixture `index` comes from
`numpy.random.default_rng([seed, index])`, so a mixture does not depend on
which worker made it or on the other mixtures. Times are integers in
samples; seconds are derived from them (sample / sample_rate) only when
written out, so labels are exact to the sample.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np

from finelap.synth.errors import SynthError
from finelap.synth.sources import SourceClip, audible_extent


@dataclass(frozen=True)
class MixSettings:
    """Mixture parameters; ranges are [low, high], drawn uniformly."""

    sample_rate: int = 16000
    duration_s: float = 10.0
    events_per_mixture: tuple[int, int] = (1, 5)
    snr_db: tuple[float, float] = (12.0, 20.0)  # event RMS over background RMS
    background_dbfs: tuple[float, float] = (-40.0, -30.0)  # background RMS, dB re full scale
    repeat_below_s: float = 3.0  # events shorter than this are placed `repeats` times
    repeats: tuple[int, int] = (1, 3)
    min_repeat_gap_s: float = 0.1  # silence between two placements of one event
    max_event_s: float | None = None  # longer events are cropped to this (None: the mixture duration)
    peak_limit: float = 0.99  # the mixture (and each stem) is scaled down to stay within this
    alternative_name_probability: float = 0.5  # chance a caption calls an event by a synonym

    def validate(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple) and value[0] > value[1]:
                raise SynthError(f"{field.name}: low {value[0]} > high {value[1]}")
        if self.sample_rate <= 0 or self.duration_s <= 0:
            raise SynthError("sample_rate and duration_s must be positive")
        if self.events_per_mixture[0] < 1 or self.repeats[0] < 1:
            raise SynthError("events_per_mixture and repeats start at 1")
        if not 0 < self.peak_limit <= 1:
            raise SynthError(f"peak_limit {self.peak_limit} must be in (0, 1]")
        if self.min_repeat_gap_s < 0 or (self.max_event_s is not None and self.max_event_s <= 0):
            raise SynthError("min_repeat_gap_s must be >= 0 and max_event_s > 0")

    @property
    def num_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))


@dataclass
class PlacedEvent:
    """One event clip placed `len(starts)` times (repeats never overlap)."""

    label: str
    name: str  # what the caption calls it
    source: SourceClip
    crop_start: int  # samples from the start of the source's audible extent
    length: int  # samples per placement
    snr_db: float
    gain: float  # applied to the source samples, the mixture gain included
    starts: list[int]  # placement onsets, samples


@dataclass
class Background:
    label: str
    name: str
    source: SourceClip
    offset: int  # samples into the source where the mixture starts (it wraps when shorter)
    dbfs: float  # drawn RMS level before the mixture gain
    gain: float  # applied to the source samples, the mixture gain included


@dataclass
class Mixture:
    """A rendered mixture; waveforms are float64 at the final level (mixture gain applied)."""

    index: int
    audio: np.ndarray  # [S]
    background_stem: np.ndarray  # [S]
    event_sounds: list[np.ndarray]  # per entry of `events`: [length] one placement of it
    mixture_gain: float  # 1, or less when the peak limit scaled everything down
    background: Background
    events: list[PlacedEvent]  # in order of first onset
    segments: dict[str, list[tuple[int, int]]]  # label -> merged [start, end) sample ranges, sorted

    def event_stem(self, number: int) -> np.ndarray:
        """[S] event `number` alone, all its placements, silence elsewhere."""
        event, sound = self.events[number], self.event_sounds[number]
        stem = np.zeros(len(self.audio))
        for start in event.starts:
            stem[start : start + event.length] = sound
        return stem


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of [start, end) ranges; overlapping or touching ranges become one."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples))))


def _draw_name(rng: np.random.Generator, label: str, names: dict[str, list[str]], probability: float) -> str:
    synonyms = [name for name in names.get(label, ()) if name != label]
    if synonyms and rng.random() < probability:
        return synonyms[int(rng.integers(len(synonyms)))]
    return label


def synthesize(
    index: int,
    seed: int,
    events: Sequence[SourceClip],
    backgrounds: Sequence[SourceClip],
    settings: MixSettings,
    load: Callable[[SourceClip], np.ndarray],
    names: dict[str, list[str]],
) -> Mixture:
    """Make mixture `index`. `load(clip)` -> the clip's whole [S] waveform at the synthesis rate;
    `names[label]` -> words a caption may use for the label (its synonyms)."""
    rng = np.random.default_rng([seed, index])
    num_samples = settings.num_samples

    background_source = backgrounds[int(rng.integers(len(backgrounds)))]
    background_label = background_source.labels[int(rng.integers(len(background_source.labels)))]
    background_name = _draw_name(rng, background_label, names, settings.alternative_name_probability)
    waveform = load(background_source)
    if len(waveform) >= num_samples:
        offset = int(rng.integers(len(waveform) - num_samples + 1))
        background_stem = waveform[offset : offset + num_samples].astype(np.float64)
    else:  # loop a short background
        offset = int(rng.integers(len(waveform)))
        background_stem = waveform[(offset + np.arange(num_samples)) % len(waveform)].astype(np.float64)
    background_rms = _rms(background_stem)
    if background_rms == 0.0:
        raise SynthError(
            f"{background_source.location}: background {background_source.path} is silent from sample {offset}"
        )
    dbfs = float(rng.uniform(*settings.background_dbfs))
    background_gain = 10 ** (dbfs / 20) / background_rms
    background_stem = background_stem * background_gain
    target_rms = 10 ** (dbfs / 20)

    count = int(rng.integers(settings.events_per_mixture[0], settings.events_per_mixture[1] + 1))
    picks = rng.choice(len(events), size=count, replace=count > len(events))
    max_length = num_samples
    if settings.max_event_s is not None:
        max_length = min(num_samples, int(round(settings.max_event_s * settings.sample_rate)))
    gap = int(round(settings.min_repeat_gap_s * settings.sample_rate))
    audio = background_stem.copy()
    placed, sounds = [], []
    for pick in picks:
        source = events[int(pick)]
        label = source.labels[int(rng.integers(len(source.labels)))]
        name = _draw_name(rng, label, names, settings.alternative_name_probability)
        audible = load(source)[source.start : source.end]
        crop_start, length = 0, len(audible)
        if length > max_length:
            crop_start = int(rng.integers(length - max_length + 1))
            extent = audible_extent(audible[crop_start : crop_start + max_length], source.threshold)
            if extent is None:  # the window fell in a quiet stretch: use the clip's opening instead
                crop_start, extent = 0, audible_extent(audible[:max_length], source.threshold)
            crop_start, length = crop_start + extent[0], extent[1] - extent[0]
        sound = audible[crop_start : crop_start + length].astype(np.float64)
        snr_db = float(rng.uniform(*settings.snr_db))
        gain = target_rms * 10 ** (snr_db / 20) / _rms(sound)
        repeats = 1
        if length < settings.repeat_below_s * settings.sample_rate:
            repeats = int(rng.integers(settings.repeats[0], settings.repeats[1] + 1))
        while repeats > 1 and repeats * length + (repeats - 1) * gap > num_samples:
            repeats -= 1
        # Non-overlapping placements, uniform over all arrangements: sorted draws in the free
        # room, each shifted past the placements (and gaps) before it.
        free = num_samples - repeats * length - (repeats - 1) * gap
        starts = np.sort(rng.integers(0, free + 1, size=repeats)) + np.arange(repeats) * (length + gap)
        sound = sound * gain
        for start in starts:
            audio[start : start + length] += sound
        placed.append(PlacedEvent(label, name, source, crop_start, length, snr_db, gain, [int(s) for s in starts]))
        sounds.append(sound)

    peak = max(np.max(np.abs(audio)), np.max(np.abs(background_stem)), *(np.max(np.abs(s)) for s in sounds))
    mixture_gain = 1.0 if peak <= settings.peak_limit else settings.peak_limit / peak
    if mixture_gain != 1.0:
        audio, background_stem = audio * mixture_gain, background_stem * mixture_gain
        sounds = [sound * mixture_gain for sound in sounds]
        for event in placed:
            event.gain *= mixture_gain

    order = sorted(range(len(placed)), key=lambda i: (placed[i].starts[0], i))
    placed, sounds = [placed[i] for i in order], [sounds[i] for i in order]
    ranges: dict[str, list[tuple[int, int]]] = {}
    for event in placed:
        ranges.setdefault(event.label, []).extend((s, s + event.length) for s in event.starts)
    segments = {label: merge_ranges(spans) for label, spans in ranges.items()}
    background = Background(
        background_label, background_name, background_source, offset, dbfs, background_gain * mixture_gain
    )
    return Mixture(index, audio, background_stem, sounds, mixture_gain, background, placed, segments)
