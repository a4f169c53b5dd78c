"""Source clips: reading event/background indexes and the energy filter.

Index files list one clip per line, as CSV (header with `path` and `label`
or `labels`) or JSON lines (`{"path": ..., "label": ...}`, extra keys
ignored). A label field may hold several comma-separated labels (or a JSON
list); one is drawn each time the clip is used. Relative paths resolve
against the index file's folder.

`check_sources` reads every line and decodes every clip before anything is
made, and returns every problem found (synthesis and `finelap data validate`
both call it), so a collection with many bad files is fixed in one pass.

The energy filter finds the audible extent of an event clip: the first and
last sample whose magnitude reaches `threshold_db` below the clip's peak.
Clips that are silent, shorter than `min_seconds` once trimmed, or whose
trimmed extent is mostly quiet (fewer than `min_active_fraction` of its
10 ms frames reach the threshold) are rejected and reported, not errors.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from finelap.audio.io import AudioLoadError, load_audio
from finelap.bad_input import MetadataError, Problem, json_object, read_json_lines

FRAME_SECONDS = 0.01  # frame of the active-fraction measure


@dataclass(frozen=True)
class EnergyFilter:
    threshold_db: float = 40.0  # a sample is audible when |x| >= peak * 10**(-threshold_db / 20)
    min_seconds: float = 0.1  # trimmed extent shorter than this: rejected ("too_short")
    min_active_fraction: float = 0.1  # share of 10 ms frames in the extent with an audible sample


@dataclass(frozen=True)
class IndexEntry:
    """One index line: the clip's resolved path and its candidate labels."""

    path: str
    labels: tuple[str, ...]
    location: str  # "index_file:line"


@dataclass(frozen=True)
class SourceClip:
    """An accepted clip: its audible extent [start, end) in samples at the synthesis rate."""

    path: str
    labels: tuple[str, ...]
    location: str
    start: int
    end: int
    threshold: float  # absolute audibility threshold (amplitude) used for the trim

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Rejection:
    """A clip the energy filter (or the background length check) turned down."""

    location: str
    path: str
    reason: str  # silent | too_short | sparse
    detail: str


# ---------------------------------------------------------------- index files


def read_index(path: str | Path) -> tuple[list[IndexEntry], list[MetadataError]]:
    """The entries of a CSV or JSON-lines index and the error of every bad line (each names file:line).

    Every line is read. A missing file, an unknown extension or a CSV header without
    `path` and `label` columns raise (FileNotFoundError, MetadataError): no line is usable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    entries, errors = [], []
    for location, parse in _index_lines(path):
        try:
            raw_path, labels = parse()
        except MetadataError as error:
            errors.append(error)
            continue
        entries.append(IndexEntry(str((path.parent / raw_path).resolve()), labels, location))
    return entries, errors


def _index_lines(path: Path):
    """Yield (location, parse) per non-blank line; parse() -> (path, labels) or raises MetadataError."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            if "path" not in fields or not ({"label", "labels"} & set(fields)):
                problem = f"CSV header must name 'path' and 'label' columns, got {fields}"
                raise MetadataError(f"{path}:1", "missing_field", problem)
            label_column = "label" if "label" in fields else "labels"
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as error:
                    location = f"{path}:{reader.line_num}"
                    problem = f"malformed CSV: {error}"
                    yield location, lambda location=location, problem=problem: _raise(location, "malformed_csv", problem)
                    continue
                location = f"{path}:{reader.line_num}"
                yield location, lambda row=row, location=location: _fields(row["path"], row.get(label_column), location)
    elif path.suffix.lower() in (".jsonl", ".json"):
        for location, value in read_json_lines(path):
            yield location, lambda value=value, location=location: _json_fields(value, location)
    else:
        raise MetadataError(str(path), "unknown_format", "index files must be .csv or .jsonl (JSON lines)")


def _raise(location: str, reason: str, problem: str):
    raise MetadataError(location, reason, problem)


def _json_fields(value: object, location: str) -> tuple[str, tuple[str, ...]]:
    entry = json_object(value, location, "an index line")
    label = entry.get("label", entry.get("labels"))
    return _fields(entry.get("path"), label, location)


def _fields(raw_path, raw_labels, location: str) -> tuple[str, tuple[str, ...]]:
    if raw_path is None:
        raise MetadataError(location, "missing_field", "missing field 'path'")
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise MetadataError(location, "wrong_type", "field 'path' must be a non-empty string")
    if raw_labels is None:
        raise MetadataError(location, "missing_field", "missing field 'label'")
    if isinstance(raw_labels, str):
        labels = tuple(label.strip() for label in raw_labels.split(",") if label.strip())
    elif isinstance(raw_labels, list) and all(isinstance(label, str) for label in raw_labels):
        labels = tuple(label.strip() for label in raw_labels if label.strip())
    else:
        raise MetadataError(location, "wrong_type", "field 'label' must be a string or a list of strings")
    if not labels:
        raise MetadataError(location, "empty_label", "field 'label' is empty")
    return raw_path.strip(), labels


# ---------------------------------------------------------------- energy filter


def audible_extent(waveform: np.ndarray, threshold: float) -> tuple[int, int] | None:
    """[start, end) from the first to the last sample with |x| >= threshold (> 0); None if none is."""
    audible = np.flatnonzero(np.abs(waveform) >= threshold)
    if len(audible) == 0:
        return None
    return int(audible[0]), int(audible[-1]) + 1


def active_fraction(waveform: np.ndarray, threshold: float, sample_rate: int) -> float:
    """Share of the 10 ms frames of `waveform` that hold at least one sample with |x| >= threshold."""
    frame = max(1, int(round(FRAME_SECONDS * sample_rate)))
    frames = -(-len(waveform) // frame)
    padded = np.zeros(frames * frame, dtype=waveform.dtype)
    padded[: len(waveform)] = np.abs(waveform)
    return float(np.mean(padded.reshape(frames, frame).max(axis=1) >= threshold))


def filter_event(
    waveform: np.ndarray, sample_rate: int, energy: EnergyFilter
) -> tuple[int, int, float] | tuple[str, str]:
    """(start, end, threshold) of the audible extent, or (reason, detail) when the clip is rejected."""
    peak = float(np.max(np.abs(waveform)))
    if peak == 0.0:
        return "silent", "all samples are zero"
    threshold = peak * 10 ** (-energy.threshold_db / 20)
    start, end = audible_extent(waveform, threshold)
    if end - start < energy.min_seconds * sample_rate:
        return "too_short", f"audible extent {(end - start) / sample_rate:.3f} s < {energy.min_seconds} s"
    fraction = active_fraction(waveform[start:end], threshold, sample_rate)
    if fraction < energy.min_active_fraction:
        return "sparse", f"active fraction {fraction:.3f} < {energy.min_active_fraction}"
    return start, end, threshold


def filter_background(
    waveform: np.ndarray, sample_rate: int, min_seconds: float
) -> tuple[int, int, float] | tuple[str, str]:
    """Backgrounds are used whole: only silent or too short ones are rejected."""
    if float(np.max(np.abs(waveform))) == 0.0:
        return "silent", "all samples are zero"
    if len(waveform) < min_seconds * sample_rate:
        return "too_short", f"{len(waveform) / sample_rate:.3f} s < {min_seconds} s"
    return 0, len(waveform), 0.0


def load_source(path: str, sample_rate: int) -> np.ndarray:
    """[S] float32 mono waveform at `sample_rate`, the whole file (AudioLoadError names the file)."""
    waveform, _ = load_audio(path, sample_rate, max_seconds=None)
    return waveform.numpy()


def examine(entry: IndexEntry, role: str, sample_rate: int, energy: EnergyFilter, min_background_seconds: float):
    """Load and filter one index entry -> SourceClip | Rejection | Problem (unreadable audio)."""
    try:
        waveform = load_source(entry.path, sample_rate)
    except AudioLoadError as error:
        return Problem(entry.location, error.reason, str(error))
    if role == "event":
        outcome = filter_event(waveform, sample_rate, energy)
    else:
        outcome = filter_background(waveform, sample_rate, min_background_seconds)
    if isinstance(outcome[0], str):
        return Rejection(entry.location, entry.path, outcome[0], outcome[1])
    start, end, threshold = outcome
    return SourceClip(entry.path, entry.labels, entry.location, start, end, threshold)


# ---------------------------------------------------------------- checking every source


@dataclass
class SourceCheck:
    """What reading the indexes and examining every clip found, in index order."""

    entries: list[tuple[IndexEntry, str]] = field(default_factory=list)  # (entry, role) of every readable line
    accepted: dict[str, list[SourceClip]] = field(default_factory=lambda: {"event": [], "background": []})
    rejected: list[Rejection] = field(default_factory=list)  # turned down by the energy filter: not errors
    problems: list[Problem] = field(default_factory=list)  # bad lines and unreadable audio: errors unless skipped


def check_sources(
    indexes: list[tuple[str, str]],
    examine_all: Callable[[list[tuple[IndexEntry, str]]], Iterable],
    progress: bool = False,
) -> SourceCheck:
    """Read every line of each (index file, role) and examine every clip listed; never stop at a problem.

    `examine_all` maps the [(entry, role)] list to `examine`'s outcomes in the same order
    (a process pool's `imap`, or a plain `map`). Whole-file errors raise, as in `read_index`.
    """
    check = SourceCheck()
    for index_path, role in indexes:
        entries, errors = read_index(index_path)
        check.entries += [(entry, role) for entry in entries]
        check.problems += [error.as_problem() for error in errors]
    # disable=None: tqdm shows the bar only on a terminal
    outcomes = tqdm(examine_all(check.entries), total=len(check.entries), desc="sources",
                    disable=None if progress else True)
    for (_, role), outcome in zip(check.entries, outcomes):
        if isinstance(outcome, Problem):
            check.problems.append(outcome)
        elif isinstance(outcome, Rejection):
            check.rejected.append(outcome)
        else:
            check.accepted[role].append(outcome)
    return check
