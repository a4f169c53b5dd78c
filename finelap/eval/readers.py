"""Readers of the evaluation file formats, with errors that name the file and line.

Formats (those of the published evaluation sets as users have them):
- Retrieval: JSON lines `{"audio_id", "audio_path", "caption": str | [str, ...]}`.
- Zero-shot labels: CSV with a header holding `filename` and `label` columns
  (other names configurable, other columns ignored), or JSON lines `{"audio_path", "label": str}` /
  `{"audio_path", "labels": [str, ...]}` (`caption` is read as `label`, the
  reference's classification files); an optional class list file holds one
  label per line.
- SED: DCASE TSV `filename onset offset event_label` (a row with empty
  onset/offset/label lists a clip without events) and a durations TSV
  `filename duration` (`audio_id` is accepted for `filename`). A clip's id is
  its filename without extension, as in sed_scores_eval.
- Grounding: JSON lines in the training format `{"audio_id", "audio_path",
  "caption", "phrases": [{"phrase", "segments": [[on, off], ...]}]}`, or an
  AudioGrounding JSON file: a list of `{"audio_id", "tokens", "phrases":
  [{"phrase", "segments"}]}` (v2) or of `{"audio_id", "tokens", "phrase",
  "timestamps"}` (v1), audio files found as audio_root / audio_id.
  A segment [0, 0] means "no segment" (AudioGrounding's padding).

Relative audio paths resolve against `audio_root`, by default the folder of
the metadata file. Bad records raise `EvalDataError` naming file:line, or,
under `on_bad_sample: skip`, are counted per reason and logged once.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finelap.bad_input import Skip, SkipCounter, read_json_lines


class EvalDataError(ValueError):
    """An evaluation file is missing or malformed; the message names the file and line."""


class BadInputPolicy:
    """`on_bad_sample`: "error" raises EvalDataError, "skip" counts the sample and goes on."""

    def __init__(self, on_bad_sample: str = "error") -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.skips = SkipCounter()

    def bad(self, where: str, reason: str, message: str) -> None:
        """Report one bad sample at `where` (file:line); returns only when skipping."""
        if self.on_bad_sample == "error":
            raise EvalDataError(f"{where}: {message}")
        self.skips.record(Skip(key=where, reason=reason, message=f"{where}: {message}"))


# ---------------------------------------------------------------- records


@dataclass
class RetrievalItem:
    audio_id: str
    audio_path: Path
    captions: list[str]
    where: str  # file:line


@dataclass
class LabelledClip:
    audio_path: Path
    labels: list[str]
    where: str


@dataclass
class SedGroundTruth:
    """Events per clip id (filename without extension)."""

    events: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)  # onset s, offset s, label
    filenames: dict[str, str] = field(default_factory=dict)  # clip id -> filename as written
    where: dict[str, str] = field(default_factory=dict)  # clip id -> file:line of its first row

    @property
    def labels(self) -> list[str]:
        return sorted({label for events in self.events.values() for _, _, label in events})


@dataclass
class GroundingPair:
    """One (audio, phrase) pair; `pair_id` names its score file."""

    pair_id: str
    audio_id: str  # clip id: audio filename without extension
    audio_path: Path
    phrase: str
    segments: list[tuple[float, float]]
    where: str


# ---------------------------------------------------------------- helpers


def clip_id(filename: str) -> str:
    """A clip's id: its file name without folder and extension (sed_scores_eval's convention)."""
    return Path(filename).name.rsplit(".", maxsplit=1)[0]


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{what} not found: {path}")
    return path


def _resolve_audio(path_text: str, audio_root: Path) -> Path:
    path = Path(path_text)
    return path if path.is_absolute() else audio_root / path


def _json_lines(path: Path, policy: BadInputPolicy):
    """Yield (where, record dict) for each line of a JSON-lines file that holds a JSON object; every
    other non-blank line is a bad sample."""
    for where, value in read_json_lines(path):
        if isinstance(value, json.JSONDecodeError):
            policy.bad(where, "malformed_json", f"not valid JSON ({value.msg})")
        elif not isinstance(value, dict):
            policy.bad(where, "malformed_json", f"expected a JSON object, got {type(value).__name__}")
        else:
            yield where, value


def _text_field(record: dict, key: str, where: str, policy: BadInputPolicy) -> str | None:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        policy.bad(where, "missing_field", f"field '{key}' must be a non-empty string, got {value!r}")
        return None
    return value


def _existing_audio(path: Path, where: str, policy: BadInputPolicy) -> Path | None:
    if not path.is_file():
        policy.bad(where, "audio_missing", f"audio file not found: {path}")
        return None
    return path


def _number(text: str, column: str, where: str, policy: BadInputPolicy) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        policy.bad(where, "malformed_row", f"column '{column}' is not a number: {text!r}")
        return None
    if not math.isfinite(value):
        policy.bad(where, "malformed_row", f"column '{column}' is not finite: {text!r}")
        return None
    return value


def _tsv_rows(path: Path, required: tuple[str, ...], aliases: dict[str, str] | None = None):
    """Yield (where, row dict, fits the header) of a tab-separated file whose header holds `required` columns."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise EvalDataError(f"{path}:1: empty file, expected a header with columns {list(required)}")
        header = [(aliases or {}).get(name.strip(), name.strip()) for name in header]
        missing = [name for name in required if name not in header]
        if missing:
            raise EvalDataError(f"{path}:1: header {header} lacks column(s) {missing}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))  # trailing empty cells may be cut
            yield where, dict(zip(header, cells)), len(row) <= len(header)


# ---------------------------------------------------------------- retrieval


def read_retrieval(path: str | Path, audio_root: str | Path | None, policy: BadInputPolicy) -> list[RetrievalItem]:
    """Retrieval JSON lines -> items in file order (each audio once, any number of captions)."""
    path = _require_file(path, "retrieval metadata")
    root = Path(audio_root) if audio_root is not None else path.parent
    items: list[RetrievalItem] = []
    seen: dict[str, str] = {}
    for where, record in _json_lines(path, policy):
        audio_text = _text_field(record, "audio_path", where, policy)
        if audio_text is None:
            continue
        audio_id = record.get("audio_id", clip_id(audio_text))
        if not isinstance(audio_id, str) or not audio_id:
            policy.bad(where, "missing_field", f"field 'audio_id' must be a non-empty string, got {audio_id!r}")
            continue
        captions = record.get("caption")
        captions = [captions] if isinstance(captions, str) else captions
        if (
            not isinstance(captions, list) or not captions
            or not all(isinstance(c, str) and c.strip() for c in captions)
        ):
            message = f"field 'caption' must be a non-empty string or list of them, got {record.get('caption')!r}"
            policy.bad(where, "empty_caption", message)
            continue
        if audio_id in seen:
            policy.bad(where, "duplicate", f"audio_id '{audio_id}' already listed at {seen[audio_id]}")
            continue
        audio_path = _existing_audio(_resolve_audio(audio_text, root), where, policy)
        if audio_path is None:
            continue
        seen[audio_id] = where
        items.append(RetrievalItem(audio_id, audio_path, list(captions), where))
    if not items:
        raise EvalDataError(f"{path}: no usable retrieval items")
    return items


# ---------------------------------------------------------------- zero-shot


def read_classes(path: str | Path) -> list[str]:
    """A class list: one label per line, blank lines ignored, no duplicates."""
    path = _require_file(path, "class list")
    classes: list[str] = []
    where_of: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        label = line.strip()
        if not label:
            continue
        if label in where_of:
            raise EvalDataError(f"{path}:{number}: class '{label}' already listed at line {where_of[label]}")
        where_of[label] = number
        classes.append(label)
    if not classes:
        raise EvalDataError(f"{path}: the class list is empty")
    return classes


def read_labels(
    path: str | Path, audio_root: str | Path | None, policy: BadInputPolicy, classes: list[str] | None = None,
    filename_column: str = "filename", label_column: str = "label",
) -> list[LabelledClip]:
    """Zero-shot label file (CSV or JSON lines, by suffix) -> labelled clips.

    A CSV's columns are named by `filename_column` and `label_column` (ESC-50's
    meta/esc50.csv: "filename" and "category"). With `classes`, a label absent
    from it is a bad sample naming file:line.
    """
    path = _require_file(path, "label file")
    root = Path(audio_root) if audio_root is not None else path.parent
    known = set(classes) if classes is not None else None
    clips: list[LabelledClip] = []
    for where, audio_text, labels in _label_records(path, policy, filename_column, label_column):
        if not labels or not all(isinstance(label, str) and label.strip() for label in labels):
            policy.bad(where, "missing_field", f"labels must be non-empty strings, got {labels!r}")
            continue
        if known is not None:
            unknown = [label for label in labels if label not in known]
            if unknown:
                policy.bad(where, "unknown_label", f"label(s) {unknown} are not in the class list")
                continue
        audio_path = _existing_audio(_resolve_audio(audio_text, root), where, policy)
        if audio_path is not None:
            clips.append(LabelledClip(audio_path, list(labels), where))
    if not clips:
        raise EvalDataError(f"{path}: no usable labelled clips")
    return clips


def _label_records(path: Path, policy: BadInputPolicy, filename_column: str, label_column: str):
    """Yield (where, audio path text, [labels]) from a CSV or JSON-lines label file."""
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            if filename_column not in header or label_column not in header:
                raise EvalDataError(
                    f"{path}:1: header {header} must hold '{filename_column}' and '{label_column}' columns"
                )
            for row in reader:
                where = f"{path}:{reader.line_num}"
                filename = (row.get(filename_column) or "").strip()
                label = (row.get(label_column) or "").strip()
                if not filename:
                    policy.bad(where, "missing_field", f"empty '{filename_column}'")
                    continue
                yield where, filename, [label] if label else []
        return
    for where, record in _json_lines(path, policy):
        audio_text = _text_field(record, "audio_path", where, policy)
        if audio_text is None:
            continue
        if "labels" in record:
            labels = record["labels"]
            if not isinstance(labels, list):
                policy.bad(where, "missing_field", f"field 'labels' must be a list, got {labels!r}")
                continue
        else:
            label = record.get("label", record.get("caption"))
            labels = [label] if label is not None else []
        yield where, audio_text, labels


# ---------------------------------------------------------------- SED


def read_sed_ground_truth(path: str | Path, policy: BadInputPolicy) -> SedGroundTruth:
    """DCASE event TSV -> events per clip id (onset < offset checked; rows without a label list a clip)."""
    path = _require_file(path, "ground-truth TSV")
    truth = SedGroundTruth()
    for where, row, complete in _tsv_rows(path, ("filename", "onset", "offset", "event_label")):
        if not complete:
            policy.bad(where, "malformed_row", "more tab-separated columns than the header")
            continue
        filename = row["filename"]
        if not filename:
            policy.bad(where, "malformed_row", "empty 'filename'")
            continue
        identifier = clip_id(filename)
        truth.events.setdefault(identifier, [])
        truth.filenames.setdefault(identifier, filename)
        truth.where.setdefault(identifier, where)
        if not row["event_label"] and not row["onset"] and not row["offset"]:
            continue  # a clip without events
        onset = _number(row["onset"], "onset", where, policy)
        offset = _number(row["offset"], "offset", where, policy)
        if onset is None or offset is None:
            continue
        if not row["event_label"]:
            policy.bad(where, "malformed_row", "empty 'event_label'")
            continue
        if onset < 0 or offset <= onset:
            policy.bad(where, "bad_segment", f"event needs 0 <= onset < offset, got onset {onset} offset {offset}")
            continue
        truth.events[identifier].append((onset, offset, row["event_label"]))
    if not truth.events:
        raise EvalDataError(f"{path}: no clips listed")
    return truth


def read_durations(path: str | Path) -> tuple[dict[str, float], dict[str, str]]:
    """Durations TSV -> ({clip id: seconds}, {clip id: file:line})."""
    path = _require_file(path, "durations TSV")
    durations: dict[str, float] = {}
    where_of: dict[str, str] = {}
    strict = BadInputPolicy("error")
    for where, row, complete in _tsv_rows(path, ("filename", "duration"), aliases={"audio_id": "filename"}):
        if not complete:
            raise EvalDataError(f"{where}: more tab-separated columns than the header")
        identifier = clip_id(row["filename"])
        duration = _number(row["duration"], "duration", where, strict)
        if duration <= 0:
            raise EvalDataError(f"{where}: duration must be positive, got {duration}")
        if identifier in durations:
            raise EvalDataError(f"{where}: clip '{identifier}' already has a duration at {where_of[identifier]}")
        durations[identifier] = duration
        where_of[identifier] = where
    return durations, where_of


# ---------------------------------------------------------------- grounding


def read_grounding(
    path: str | Path, audio_root: str | Path | None, policy: BadInputPolicy, check_audio: bool = True
) -> list[GroundingPair]:
    """Grounding metadata (JSON lines, or an AudioGrounding .json list) -> (audio, phrase) pairs.

    `check_audio=False` accepts pairs whose audio file is absent (scoring saved scores).
    """
    path = _require_file(path, "grounding metadata")
    root = Path(audio_root) if audio_root is not None else path.parent
    pairs: list[GroundingPair] = []
    for item_index, (where, record) in enumerate(_grounding_records(path, policy)):
        if "audio_path" in record:
            audio_text = _text_field(record, "audio_path", where, policy)
        else:
            audio_text = _text_field(record, "audio_id", where, policy)
        if audio_text is None:
            continue
        if "phrases" in record:
            phrases = record["phrases"]
        elif "phrase" in record:
            phrases = [{"phrase": record["phrase"], "segments": record.get("timestamps")}]
        else:
            policy.bad(where, "missing_field", "needs 'phrases' (or 'phrase' with 'timestamps')")
            continue
        if not isinstance(phrases, list) or not phrases:
            policy.bad(where, "missing_field", f"field 'phrases' must be a non-empty list, got {phrases!r}")
            continue
        parsed = [_grounding_phrase(entry, where, policy) for entry in phrases]
        if any(entry is None for entry in parsed):
            continue
        audio_path = _resolve_audio(audio_text, root)
        if check_audio and _existing_audio(audio_path, where, policy) is None:
            continue
        identifier = clip_id(audio_text)
        for phrase_index, (phrase, segments) in enumerate(parsed):
            pair_id = f"{identifier}__{item_index}_{phrase_index}"
            pairs.append(GroundingPair(pair_id, identifier, audio_path, phrase, segments, where))
    if not pairs:
        raise EvalDataError(f"{path}: no usable (audio, phrase) pairs")
    return pairs


def _grounding_records(path: Path, policy: BadInputPolicy):
    if path.suffix.lower() == ".jsonl":
        yield from _json_lines(path, policy)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvalDataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise EvalDataError(f"{path}: an AudioGrounding file must hold a JSON list of items")
    for index, record in enumerate(records):
        where = f"{path}: item {index}"
        if not isinstance(record, dict):
            policy.bad(where, "malformed_json", f"expected a JSON object, got {type(record).__name__}")
            continue
        yield where, record


def _grounding_phrase(entry, where: str, policy: BadInputPolicy) -> tuple[str, list[tuple[float, float]]] | None:
    """One {"phrase", "segments"} entry -> (phrase, segments), [0, 0] padding dropped."""
    if not isinstance(entry, dict) or not isinstance(entry.get("phrase"), (str, list)):
        policy.bad(where, "missing_field", f"phrase entry needs a 'phrase' string, got {entry!r}")
        return None
    phrase = entry["phrase"] if isinstance(entry["phrase"], str) else " ".join(entry["phrase"])  # v1: tokens
    if not phrase.strip():
        policy.bad(where, "missing_field", "empty 'phrase'")
        return None
    segments = []
    for segment in entry.get("segments") or []:
        if (
            not isinstance(segment, (list, tuple)) or len(segment) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in segment)
        ):
            policy.bad(where, "bad_segment", f"phrase '{phrase}': segment {segment!r} must be [onset, offset] seconds")
            return None
        onset, offset = float(segment[0]), float(segment[1])
        if onset == 0 and offset == 0:
            continue
        if onset < 0 or offset <= onset:
            policy.bad(where, "bad_segment", f"phrase '{phrase}': segment needs 0 <= onset < offset, got {segment}")
            return None
        segments.append((onset, offset))
    return phrase, segments
