"""`finelap data validate | pack | cluster`: check training metadata and synthesis inputs, write shards,
build a phrase bank.

    finelap data validate [--metadata M.jsonl ...] [--events E.csv ...] [--backgrounds B.jsonl ...]
                          [--bank BANK.jsonl] [--strict] [--workers N]
        Checks every line and audio file; prints what each file is, each problem
        with file:line and a summary table by kind. Metadata: audio decodable and
        long enough, segments within the audio, phrases in the bank. Events and
        backgrounds indexes (what `finelap synth --events/--backgrounds` reads):
        every line, every clip decoded and put through synthesis's energy filter
        (its default settings), labels in the bank, and the class balance: usable
        clips and seconds per label. A file given under the wrong option (an index
        as --metadata, say) is named as such instead of checked line by line.
        Exit status 1 on any error (with --strict, on any warning too), 0 otherwise.
        Audio files are checked by N processes (default: every core); the report is
        the same for any N.

    finelap data pack --metadata M.jsonl [...] --out DIR --shard-size N [--workers N]
        WebDataset tar shards (audio + JSON), DALI index files and shards.json;
        shards are written by N processes (default: every core), byte for byte
        the same for any N.

    finelap data cluster --metadata M.jsonl [...] --out BANK.jsonl [--threshold T]
        A phrase bank from the metadata's phrases (text-encoder embeddings, the
        graph of phrase pairs above the threshold, agglomerative clustering on it),
        in the published FineLAP format.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

# validate checks the inputs of training and of synthesis, so this command sits above finelap.data and
# finelap.synth, in a module of its own: finelap.synth reads phrase banks of finelap.data, never the reverse
from finelap.audio.io import AudioLoadError, audio_seconds
from finelap.bad_input import MetadataError, Problem, format_problems
from finelap.data.metadata import ClipRecord, iter_metadata, read_metadata
from finelap.data.phrase_bank import DEFAULT_CLUSTER_THRESHOLD, LINKAGES, PhraseBank, cluster_phrases
from finelap.data.shards import pack_shards
from finelap.data.worker_pool import OrderedMap, default_workers, ordered_map
from finelap.synth.mixer import MixSettings
from finelap.synth.pipeline import SynthConfig
from finelap.synth.sources import EnergyFilter, IndexEntry, check_sources, examine

# Metadata lines read at a time while their audio files are checked: memory stays bounded for
# any file, and the workers stay busy (each line's check is one decode).
VALIDATE_WINDOW = 2048
# Audio checks sent to a worker at once.
VALIDATE_CHUNK = 8

# The kinds of input file, recognised from their content: what each holds, and the option that takes it.
FILE_KINDS = {
    "metadata": ("training metadata (audio_id, audio_path, caption)", "--metadata"),
    "index": ("an events/backgrounds index (path, label)", "--events or --backgrounds"),
    "bank": ("a phrase bank (phrase, alternatives)", "--bank"),
}


def file_kind(path: str | Path) -> str | None:
    """"metadata", "index" or "bank" from a file's CSV header or its first JSON object; None if neither says."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        if path.suffix.lower() == ".csv":
            header = next(csv.reader(handle), [])
            return "index" if "path" in header and {"label", "labels"} & set(header) else None
        for text in handle:
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                continue
            if not isinstance(entry, dict):
                return None
            if "audio_path" in entry:
                return "metadata"
            if "path" in entry and {"label", "labels"} & entry.keys():
                return "index"
            return "bank" if "phrase" in entry else None
    return None


def _wrong_kind(path: str, expected: str) -> Problem | None:
    """One problem for the whole file when it looks like another kind than its option takes."""
    kind = file_kind(path)
    if kind is None or kind == expected:
        return None
    description, option = FILE_KINDS[kind]
    return Problem(path, "wrong_kind_of_file",
                   f"this looks like {description}, not {FILE_KINDS[expected][0]}: check it with {option}")


def _audio_problems(record: ClipRecord) -> list[Problem]:
    """Decode the whole file as training does (at its own rate: no resampling needed to check it) and
    compare segments to its duration."""
    try:
        duration = audio_seconds(record.audio_path)
    except AudioLoadError as error:
        return [Problem(record.location, error.reason, str(error))]
    problems = []
    for label in record.phrases:
        for onset, offset in label.segments:
            if offset > duration:
                problems.append(Problem(
                    record.location, "segment_beyond_audio",
                    f"phrase {label.phrase!r}: segment [{onset}, {offset}] ends after the audio ({duration:.3f} s); "
                    "clipped to it", "warning",
                ))
    return problems


def validate(
    metadata_paths: list[str],
    bank_path: str | None,
    audio_root: str | None,
    events: list[str] = (),
    backgrounds: list[str] = (),
    workers: int = 1,
) -> tuple[list[Problem], list[str]]:
    """Every problem of the given files and their audio, and lines saying what each file was checked as
    (with each index's class balance). Audio files are decoded by `workers` processes; the problems
    and notes are the same, in file order, for any number."""
    with ordered_map(workers, VALIDATE_CHUNK) as map_in_order:
        return _validate(metadata_paths, bank_path, audio_root, events, backgrounds, map_in_order)


def _validate(
    metadata_paths: list[str],
    bank_path: str | None,
    audio_root: str | None,
    events: list[str],
    backgrounds: list[str],
    map_in_order: OrderedMap,
) -> tuple[list[Problem], list[str]]:
    problems: list[Problem] = []
    notes: list[str] = []
    bank = None
    if bank_path is not None:
        if (wrong := _wrong_kind(bank_path, "bank")) is not None:
            problems.append(wrong)
        else:
            bank, errors = PhraseBank.check(bank_path)
            problems += [error.as_problem() for error in errors]
            notes.append(f"{bank_path}: phrase bank, {len(bank)} clusters")
    first_seen: dict[str, str] = {}
    for path in metadata_paths:
        if (wrong := _wrong_kind(path, "metadata")) is not None:
            problems.append(wrong)
            continue
        lines = 0
        remaining = iter_metadata(path, Path(path).stem, audio_root)
        while window := list(itertools.islice(remaining, VALIDATE_WINDOW)):
            lines += len(window)
            audio_checks = map_in_order(_audio_problems, [r for r, _ in window if not isinstance(r, MetadataError)])
            for record, warnings in window:
                problems.extend(warnings)
                if isinstance(record, MetadataError):
                    problems.append(record.as_problem())
                    continue
                if record.audio_id in first_seen:
                    problems.append(Problem(
                        record.location, "duplicate_audio_id",
                        f"audio_id {record.audio_id!r} already used at {first_seen[record.audio_id]}", "warning",
                    ))
                first_seen.setdefault(record.audio_id, record.location)
                problems.extend(next(audio_checks))
                if bank is not None:
                    problems.extend(
                        Problem(record.location, "phrase_not_in_bank",
                                f"phrase {label.phrase!r} is not in the bank; it becomes a cluster of its own",
                                "warning")
                        for label in record.phrases if label.phrase not in bank
                    )
        notes.append(f"{path}: training metadata, {lines} records")
    for role, paths in (("event", events), ("background", backgrounds)):
        for path in paths:
            if (wrong := _wrong_kind(path, "index")) is not None:
                problems.append(wrong)
                continue
            index_problems, index_notes = validate_index(path, role, bank, map_in_order)
            problems += index_problems
            notes += index_notes
    return problems, notes


def _examine_with_synthesis_defaults(task: tuple[IndexEntry, str]):
    """`examine` one (index entry, role) as `finelap synth` does with its default settings."""
    entry, role = task
    return examine(entry, role, MixSettings.sample_rate, EnergyFilter(), SynthConfig.min_background_seconds)


def validate_index(
    path: str, role: str, bank: PhraseBank | None, map_in_order: OrderedMap
) -> tuple[list[Problem], list[str]]:
    """The problems of an events or backgrounds index and its clips, checked as `finelap synth` checks
    them (its default rate and energy filter), and lines saying what it is and its class balance.
    `map_in_order` examines the clips (`ordered_map`'s, to use worker processes)."""
    sample_rate = MixSettings.sample_rate
    try:
        check = check_sources([(path, role)], lambda tasks: map_in_order(_examine_with_synthesis_defaults, tasks))
    except MetadataError as error:  # the whole file is unreadable (its extension, its CSV header)
        return [error.as_problem()], []
    problems = list(check.problems)
    problems += [
        Problem(rejection.location, rejection.reason,
                f"{rejection.path}: {rejection.detail}; synthesis's energy filter leaves it out", "warning")
        for rejection in check.rejected
    ]
    usable = {clip.location: clip for clip in check.accepted[role]}
    clips, seconds, left_out, first_location = Counter(), Counter(), Counter(), {}
    for entry, _ in check.entries:
        for label in entry.labels:
            first_location.setdefault(label, entry.location)
            if entry.location in usable:
                clips[label] += 1
                seconds[label] += usable[entry.location].length / sample_rate
            else:
                left_out[label] += 1
    labels = sorted(first_location)
    for label in labels:
        if not clips[label]:
            problems.append(Problem(first_location[label], "label_without_usable_clip",
                                    f"label {label!r}: none of its {left_out[label]} clips is usable", "warning"))
        if bank is not None and label not in bank:
            problems.append(Problem(
                first_location[label], "label_not_in_bank",
                f"label {label!r} is not in the phrase bank; captions use it as written", "warning",
            ))
    usable_seconds = "audible seconds" if role == "event" else "seconds"
    rows = [("label", "usable clips", usable_seconds, "left out")]
    rows += [(label, str(clips[label]), f"{seconds[label]:.1f}", str(left_out[label])) for label in labels]
    rows.append(("(all clips)", str(len(usable)), f"{sum(clip.length for clip in usable.values()) / sample_rate:.1f}",
                 str(len(check.entries) - len(usable))))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    notes = [f"{path}: {role}s index, {len(check.entries)} clips listed, {len(labels)} labels"]
    notes += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return problems, notes


def _sources(metadata_paths: list[str], audio_root: str | None) -> list[tuple[str, str, list[ClipRecord]]]:
    return [(Path(path).stem, path, read_metadata(path, Path(path).stem, audio_root)) for path in metadata_paths]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finelap data", description=" ".join(__doc__.split("\n\n")[0].split()))
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "validate", help="check training metadata or synthesis inputs: every line and audio file",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pack = commands.add_parser("pack", help="write WebDataset tar shards")
    cluster = commands.add_parser("cluster", help="build a phrase bank by clustering the metadata's phrases")
    for command in (check, pack, cluster):
        command.add_argument("--metadata", action="append", required=command is not check,
                             help="metadata JSON lines (repeatable)")
        command.add_argument("--audio-root", help="folder relative audio paths resolve against (default: metadata's)")
    check.add_argument("--events", action="append", default=[], metavar="INDEX",
                       help="events index for `finelap synth` (.csv or .jsonl: path, label[s]; repeatable)")
    check.add_argument("--backgrounds", action="append", default=[], metavar="INDEX",
                       help="backgrounds index for `finelap synth` (.csv or .jsonl: path, label; repeatable)")
    check.add_argument("--bank", "--phrase-bank", dest="bank",
                       help="phrase bank JSON lines: checked, and metadata phrases and index labels looked up in it")
    check.add_argument("--strict", action="store_true", help="warnings also make the exit status 1")
    pack.add_argument("--out", required=True, help="output folder")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    for command in (check, pack):
        command.add_argument("--workers", type=_positive_int, default=default_workers(),
                             help="processes that read audio (default: every core); the output is the same for any")
    cluster.add_argument("--out", required=True, help="bank file to write")
    cluster.add_argument("--threshold", type=float, default=DEFAULT_CLUSTER_THRESHOLD, help="cosine similarity")
    cluster.add_argument("--linkage", default="average", choices=LINKAGES)
    args = parser.parse_args(argv)

    try:
        if args.command == "validate":
            if not (args.metadata or args.events or args.backgrounds or args.bank):
                check.error("give at least one of --metadata, --events, --backgrounds, --bank")
            problems, notes = validate(args.metadata or [], args.bank, args.audio_root, args.events, args.backgrounds,
                                       args.workers)
            print("".join(note + "\n" for note in notes) + ("\n" if notes else "") + format_problems(problems))
            failing = [p for p in problems if p.severity == "error" or args.strict]
            return 1 if failing else 0
        sources = _sources(args.metadata, args.audio_root)
        if args.command == "pack":
            manifest = pack_shards(sources, args.out, args.shard_size, args.workers)
            print(f"wrote {len(manifest['shards'])} shards of {manifest['num_samples']} samples to {args.out}")
            return 0
        phrases = [label.phrase for _, _, records in sources for record in records for label in record.phrases]
        bank = cluster_phrases(phrases, threshold=args.threshold, linkage=args.linkage, progress=True)
        bank.write(args.out)
        print(f"wrote {len(bank)} clusters of {len(set(phrases))} phrases to {args.out}")
        return 0
    except (MetadataError, FileNotFoundError, ValueError) as error:
        print(f"finelap data {args.command}: {error}", file=sys.stderr)
        return 1
