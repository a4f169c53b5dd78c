"""Training metadata: the JSON-lines format of the published FineLAP code, read and checked.

One line per clip:
    {"audio_id": str, "audio_path": str, "caption": str | [str, ...],
     "phrases": [{"phrase": str, "segments": [[onset_s, offset_s], ...]}, ...]}
`phrases` is optional (a caption-only clip); a phrase whose `segments` is
missing or empty is a weak, clip-level label (present somewhere, timing
unknown). Relative audio paths resolve against `audio_root` or else the
metadata file's folder. Extra keys are allowed and ignored.

Every problem names the file and line. Inverted segments (onset > offset)
are rejected; negative onsets are clipped to 0 here, offsets beyond the
audio are clipped when the audio's duration is known (labels.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from finelap.bad_input import MetadataError, Problem, Skip, SkipCounter, json_object, read_json_lines


@dataclass(frozen=True)
class PhraseLabel:
    """A phrase of a clip; `segments` in seconds with 0 <= onset <= offset, empty for a weak label."""

    phrase: str
    segments: tuple[tuple[float, float], ...]

    @property
    def weak(self) -> bool:
        return not self.segments


@dataclass(frozen=True)
class ClipRecord:
    audio_id: str
    audio_path: str  # resolved path (or, in shards, the member name)
    captions: tuple[str, ...]  # one or more; one is drawn per epoch
    phrases: tuple[PhraseLabel, ...]
    source: str  # name of the metadata source
    location: str  # file:line of the record, for messages

    @property
    def annotated(self) -> bool:
        """True when at least one phrase has timestamped segments (the clip gives frame rows)."""
        return any(not label.weak for label in self.phrases)


def _require_string(record: dict, key: str, location: str, where: str = "") -> str:
    prefix = f"{where}: " if where else ""
    if key not in record:
        raise MetadataError(location, "missing_field", f"{prefix}missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise MetadataError(
            location, "wrong_type", f"{prefix}field '{key}' must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise MetadataError(location, "empty_field", f"{prefix}field '{key}' is empty")
    return value


def _parse_captions(record: dict, location: str) -> tuple[str, ...]:
    if "caption" not in record:
        raise MetadataError(location, "missing_field", "missing field 'caption'")
    caption = record["caption"]
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not all(isinstance(text, str) for text in captions):
        raise MetadataError(location, "wrong_type", "field 'caption' must be a string or a list of strings")
    if not captions or any(not text.strip() for text in captions):
        raise MetadataError(location, "empty_caption", "empty caption")
    return tuple(captions)


def _parse_segments(raw, where: str, location: str, warnings: list[Problem]) -> tuple[tuple[float, float], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise MetadataError(location, "wrong_type", f"{where}: 'segments' must be a list of [onset, offset]")
    segments = []
    for number, segment in enumerate(raw):
        if (
            not isinstance(segment, (list, tuple))
            or len(segment) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in segment)
        ):
            raise MetadataError(
                location, "wrong_type", f"{where}: segment {number} must be [onset, offset] in seconds, got {segment!r}"
            )
        onset, offset = float(segment[0]), float(segment[1])
        if not (math.isfinite(onset) and math.isfinite(offset)):
            raise MetadataError(location, "wrong_type", f"{where}: segment {number} is not finite: {segment!r}")
        if onset > offset:
            raise MetadataError(
                location, "inverted_segment", f"{where}: segment {number} has onset {onset} > offset {offset}"
            )
        if onset < 0:
            warnings.append(Problem(
                location, "negative_segment",
                f"{where}: segment {number} [{onset}, {offset}] starts before 0 s; clipped to 0", "warning",
            ))
            onset, offset = 0.0, max(offset, 0.0)
        segments.append((onset, offset))
    return tuple(segments)


def _parse_phrases(record: dict, location: str, warnings: list[Problem]) -> tuple[PhraseLabel, ...]:
    raw = record.get("phrases")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise MetadataError(location, "wrong_type", "field 'phrases' must be a list")
    labels = []
    for number, item in enumerate(raw):
        where = f"phrases[{number}]"
        if not isinstance(item, dict):
            raise MetadataError(location, "wrong_type", f"{where} must be an object with 'phrase' and 'segments'")
        phrase = _require_string(item, "phrase", location, where)
        labels.append(PhraseLabel(phrase, _parse_segments(item.get("segments"), where, location, warnings)))
    return tuple(labels)


def parse_record(
    value: object, location: str, base_folder: Path, source: str
) -> tuple[ClipRecord, list[Problem]]:
    """One metadata line's JSON value (`read_json_lines`) -> (record, warnings); raises MetadataError for an
    unusable line."""
    record = json_object(value, location, "a record")
    warnings: list[Problem] = []
    audio_id = _require_string(record, "audio_id", location)
    audio_path = _require_string(record, "audio_path", location)
    captions = _parse_captions(record, location)
    phrases = _parse_phrases(record, location, warnings)
    resolved = resolve_audio_path(audio_path, base_folder)
    return ClipRecord(audio_id, resolved, captions, phrases, source, location), warnings


def resolve_audio_path(audio_path: str, base_folder: Path) -> str:
    """A metadata line's `audio_path` as the record holds it: absolute paths as they are, relative ones
    under `base_folder` (`audio_root`, or else the metadata file's folder)."""
    path = Path(audio_path)
    return str(path if path.is_absolute() else base_folder / path)


def iter_metadata(path: str | Path, source: str, audio_root: str | Path | None = None):
    """Yield (record or MetadataError, warnings) for every non-blank line of a metadata file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    base_folder = Path(audio_root) if audio_root is not None else path.parent
    for location, value in read_json_lines(path):
        try:
            yield parse_record(value, location, base_folder, source)
        except MetadataError as error:
            error.phrases = named_phrases(value)
            yield error, []


def named_phrases(value: object) -> tuple[str, ...]:
    """The phrase strings a metadata line's JSON value names, read leniently (for a line that failed to
    parse): the `phrase` of each object in a `phrases` list; () when the line is not a JSON object holding one."""
    phrases = value.get("phrases") if isinstance(value, dict) else None
    if not isinstance(phrases, list):
        return ()
    named = (item.get("phrase") for item in phrases if isinstance(item, dict))
    return tuple(dict.fromkeys(phrase for phrase in named if isinstance(phrase, str) and phrase.strip()))


def read_metadata(
    path: str | Path,
    source: str,
    audio_root: str | Path | None = None,
    on_bad_sample: str = "error",
    skips: SkipCounter | None = None,
) -> list[ClipRecord]:
    """All records of one metadata file. A bad line raises MetadataError, or with
    on_bad_sample="skip" is dropped and counted in `skips`."""
    records = []
    for record, _ in iter_metadata(path, source, audio_root):
        if isinstance(record, MetadataError):
            if on_bad_sample != "skip":
                raise record
            if skips is not None:
                skips.record(Skip(record.location, record.reason, str(record)))
            continue
        records.append(record)
    return records
