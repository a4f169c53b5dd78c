"""The records of one training metadata file as flat arrays: parsed once, mapped by every process.

`open_clip_table(path, source, audio_root, cache_dir)` parses the JSON-lines file with the checks of
metadata.py (`iter_metadata`, unchanged) into the columns below and caches them beside the file
(mapped_cache.py: keyed by its size, mtime and the blake2b digest of its bytes; one process of a
node converts under a lock and the others wait and map the result). Every rank and DataLoader
worker then maps the same pages, and `ClipTable.record(row)` decodes one `ClipRecord` on demand,
equal to the one parsing the line gives.

Columns, for R records (the usable lines), L phrase labels, S segments and P distinct phrase texts:

    line           [R] int64       the record's line number in the file
    audio_id       R strings
    audio_path     R strings       as written (normalised by pathlib), resolved on access
    caption_start  [R + 1] int64   record r's captions are caption[caption_start[r] : caption_start[r + 1]]
    caption        strings
    label_start    [R + 1] int64   record r's phrase labels, the same way
    label_phrase   [L] int64       each label's text, an index into `phrase`
    segment_start  [L + 1] int64   label l's segments are segments[segment_start[l] : segment_start[l + 1]]
    segments       [S, 2] float64  onset, offset in seconds (negative onsets already clipped to 0)
    timed_phrases  [R] int32       distinct phrase texts with segments per record (> 0: the clip is annotated)
    phrase         P strings       distinct phrase texts of the records, in order of first appearance
    phrase_records [P] int64       records naming each phrase text

(strings as `mapped_cache.Strings`). The unusable lines (reason, message and the phrases they name)
and the warnings of the usable ones are kept by line number too, so a table read from the cache
reports what parsing the file reports, with the same file:line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy

from finelap.bad_input import MetadataError, Problem
from finelap.data.mapped_cache import Built, Columns, Strings, cache_key, file_identity, load_or_build
from finelap.data.metadata import ClipRecord, PhraseLabel, iter_metadata, resolve_audio_path

LAYOUT = "finelap-clip-table-1"


def convert_metadata(path: str | Path) -> Built:
    """Parse a metadata file into the table's arrays and its "errors" and "warnings" documents."""
    lines, audio_ids, audio_paths, captions, caption_counts = [], [], [], [], []
    label_counts, label_phrase, segment_counts, segments, timed_phrases = [], [], [], [], []
    phrase_number: dict[str, int] = {}
    phrase_records: list[int] = []
    errors, warnings = [], []
    # resolving against "." leaves a relative path as written: the table resolves it when a record is read
    for record, problems in iter_metadata(path, "", audio_root=Path()):
        line = int(record.location.rpartition(":")[2])
        if isinstance(record, MetadataError):
            errors.append([line, record.reason, record.problem, list(record.phrases)])
            continue
        warnings += [[line, problem.kind, problem.message] for problem in problems]
        lines.append(line)
        audio_ids.append(record.audio_id)
        audio_paths.append(record.audio_path)
        captions += record.captions
        caption_counts.append(len(record.captions))
        label_counts.append(len(record.phrases))
        numbers = [phrase_number.setdefault(label.phrase, len(phrase_number)) for label in record.phrases]
        phrase_records += [0] * (len(phrase_number) - len(phrase_records))
        for number in set(numbers):
            phrase_records[number] += 1
        timed_phrases.append(len({number for number, label in zip(numbers, record.phrases) if label.segments}))
        label_phrase += numbers
        for label in record.phrases:
            segment_counts.append(len(label.segments))
            segments += label.segments
    arrays = {
        "line": numpy.asarray(lines, dtype=numpy.int64),
        "caption_start": _starts(caption_counts),
        "label_start": _starts(label_counts),
        "label_phrase": numpy.asarray(label_phrase, dtype=numpy.int64),
        "segment_start": _starts(segment_counts),
        "segments": numpy.asarray(segments, dtype=numpy.float64).reshape(-1, 2),
        "timed_phrases": numpy.asarray(timed_phrases, dtype=numpy.int32),
        "phrase_records": numpy.asarray(phrase_records, dtype=numpy.int64),
        **Strings.arrays("audio_id", audio_ids),
        **Strings.arrays("audio_path", audio_paths),
        **Strings.arrays("caption", captions),
        **Strings.arrays("phrase", list(phrase_number)),
    }
    return arrays, {"errors": errors, "warnings": warnings}


def _starts(counts: list[int]) -> numpy.ndarray:
    """[n + 1] int64 offsets of n consecutive runs of `counts` items."""
    starts = numpy.zeros(len(counts) + 1, dtype=numpy.int64)
    numpy.cumsum(numpy.asarray(counts, dtype=numpy.int64), out=starts[1:])
    return starts


def open_clip_table(
    path: str | Path, source: str, audio_root: str | Path | None = None, cache_dir: str | Path | None = None
) -> ClipTable:
    """The table of metadata file `path` (named `source`): mapped from its cache, converted first when the
    cache is missing or was built from another version of the file; `cache_dir` is where the cache goes
    when the file's folder cannot be written (data.cache_dir)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    key = cache_key(LAYOUT, file_identity(path))
    columns = load_or_build(path, key, lambda: convert_metadata(path), cache_dir, "metadata cache")
    return ClipTable(path, source, audio_root, columns)


class ClipTable:
    """The usable records of one metadata file, decoded on demand from the columns (module docstring)."""

    def __init__(self, path: Path, source: str, audio_root: str | Path | None, columns: Columns) -> None:
        self.path = path  # as the sources name it: locations read f"{path}:{line}"
        self.source = source
        self.audio_root = audio_root
        self.base_folder = Path(audio_root) if audio_root is not None else path.parent
        self.columns = columns
        self.line = columns["line"]
        self.caption_start = columns["caption_start"]
        self.label_start = columns["label_start"]
        self.label_phrase = columns["label_phrase"]
        self.segment_start = columns["segment_start"]
        self.segments = columns["segments"]
        self.timed_phrases = columns["timed_phrases"]
        self.phrase_records = columns["phrase_records"]
        self.audio_ids = Strings.of(columns, "audio_id")
        self.audio_paths = Strings.of(columns, "audio_path")
        self.captions = Strings.of(columns, "caption")
        self.phrases = Strings.of(columns, "phrase")

    def __reduce__(self):
        """Pickled (a worker started by spawn or forkserver) with its columns: a mapped table as its folder."""
        return ClipTable, (self.path, self.source, self.audio_root, self.columns)

    def __len__(self) -> int:
        return len(self.line)

    def location(self, row: int) -> str:
        return f"{self.path}:{self.line[row]}"

    def record(self, row: int) -> ClipRecord:
        """The record of row `row` (0 <= row < len), as `parse_record` gives it."""
        first_caption, end_caption = self.caption_start[row : row + 2].tolist()
        first_label, end_label = self.label_start[row : row + 2].tolist()
        bounds = self.segment_start[first_label : end_label + 1].tolist()
        segments = [tuple(segment) for segment in self.segments[bounds[0] : bounds[-1]].tolist()]
        phrases = tuple(
            PhraseLabel(self.phrases[number], tuple(segments[start - bounds[0] : end - bounds[0]]))
            for number, start, end in zip(self.label_phrase[first_label:end_label].tolist(), bounds, bounds[1:])
        )
        return ClipRecord(
            self.audio_ids[row],
            resolve_audio_path(self.audio_paths[row], self.base_folder),
            tuple(self.captions[number] for number in range(first_caption, end_caption)),
            phrases,
            self.source,
            self.location(row),
        )

    def row_of_line(self, line: int) -> int | None:
        """The row of the record on `line`; None when that line holds no usable record."""
        row = int(numpy.searchsorted(self.line, line))
        return row if row < len(self) and self.line[row] == line else None

    def errors(self) -> list[tuple[int, MetadataError]]:
        """(line, its MetadataError, `phrases` filled in) of every unusable line, in file order."""
        found = []
        for line, reason, problem, phrases in self.columns.document("errors"):
            error = MetadataError(f"{self.path}:{line}", reason, problem)
            error.phrases = tuple(phrases)
            found.append((line, error))
        return found

    def warnings(self) -> list[Problem]:
        """The warnings of the usable lines (repairs such as a negative onset clipped to 0), in file order."""
        return [
            Problem(f"{self.path}:{line}", kind, message, "warning")
            for line, kind, message in self.columns.document("warnings")
        ]

    def iter_lines(self) -> Iterator[tuple[ClipRecord | MetadataError, list[Problem]]]:
        """What `iter_metadata` yields for the file: (record, its warnings) or (MetadataError, []) per line."""
        warnings: dict[int, list[Problem]] = {}
        for problem in self.warnings():
            warnings.setdefault(int(problem.location.rpartition(":")[2]), []).append(problem)
        errors = self.errors()
        error_number = 0
        for row, line in enumerate(self.line.tolist()):
            while error_number < len(errors) and errors[error_number][0] < line:
                yield errors[error_number][1], []
                error_number += 1
            yield self.record(row), warnings.get(line, [])
        for _, error in errors[error_number:]:
            yield error, []
