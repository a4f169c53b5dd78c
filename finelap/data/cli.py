"""`finelap data validate | pack | cluster`: check training metadata, write shards, build a phrase bank.

    finelap data validate --metadata M.jsonl [--metadata M2.jsonl] [--bank B.jsonl] [--strict]
        Checks every line and audio file (decodable, duration, segments within
        the audio, phrases in the bank); prints each problem with file:line and a
        summary table by kind. Exit status 1 on any error (with --strict, on any
        warning too), 0 otherwise.
    finelap data pack --metadata M.jsonl [...] --out DIR --shard-size N
        WebDataset tar shards (audio + JSON), DALI index files and shards.json.
    finelap data cluster --metadata M.jsonl [...] --out BANK.jsonl [--threshold T]
        A phrase bank from the metadata's phrases (text-encoder embeddings,
        agglomerative clustering), in the reference format.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import soundfile

from finelap.audio.io import AudioLoadError, load_audio
from finelap.data.metadata import ClipRecord, MetadataError, Problem, iter_metadata, read_metadata
from finelap.data.phrase_bank import DEFAULT_CLUSTER_THRESHOLD, PhraseBank, cluster_phrases
from finelap.data.shards import pack_shards


def _audio_problems(record: ClipRecord) -> list[Problem]:
    """Decode the whole file at its own rate (no resampling needed to check it) and compare segments to its duration."""
    try:
        info = soundfile.info(record.audio_path)
        load_audio(record.audio_path, sample_rate=info.samplerate, max_seconds=None)
    except (AudioLoadError, soundfile.LibsndfileError, RuntimeError) as error:
        return [Problem(record.location, "bad_audio", str(error))]
    duration = info.frames / info.samplerate
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


def validate(metadata_paths: list[str], bank_path: str | None, audio_root: str | None) -> list[Problem]:
    """Every problem of the metadata files, their audio and (if given) the phrase bank."""
    problems: list[Problem] = []
    bank = None
    if bank_path is not None:
        try:
            bank = PhraseBank.read(bank_path)
        except MetadataError as error:
            problems.append(Problem(error.location, error.reason, error.problem))
    first_seen: dict[str, str] = {}
    for path in metadata_paths:
        for record, warnings in iter_metadata(path, Path(path).stem, audio_root):
            problems.extend(warnings)
            if isinstance(record, MetadataError):
                problems.append(Problem(record.location, record.reason, record.problem))
                continue
            if record.audio_id in first_seen:
                problems.append(Problem(
                    record.location, "duplicate_audio_id",
                    f"audio_id {record.audio_id!r} already used at {first_seen[record.audio_id]}", "warning",
                ))
            first_seen.setdefault(record.audio_id, record.location)
            problems.extend(_audio_problems(record))
            if bank is not None:
                problems.extend(
                    Problem(record.location, "phrase_not_in_bank",
                            f"phrase {label.phrase!r} is not in the bank; it becomes a cluster of its own", "warning")
                    for label in record.phrases if label.phrase not in bank
                )
    return problems


def _print_report(problems: list[Problem], out) -> None:
    for problem in problems:
        print(f"{problem.location}: {problem.severity}: {problem.kind}: {problem.message}", file=out)
    by_kind: dict[tuple[str, str], list[str]] = defaultdict(list)
    for problem in problems:
        by_kind[(problem.severity, problem.kind)].append(problem.location)
    rows = [("severity", "kind", "count", "first locations")]
    rows += [
        (severity, kind, str(len(locations)), ", ".join(locations[:3]) + (" ..." if len(locations) > 3 else ""))
        for (severity, kind), locations in sorted(by_kind.items())
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    print("", file=out)
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3], file=out)
    errors = sum(problem.severity == "error" for problem in problems)
    print(f"\n{errors} errors, {len(problems) - errors} warnings", file=out)


def _sources(metadata_paths: list[str], audio_root: str | None) -> list[tuple[str, str, list[ClipRecord]]]:
    return [(Path(path).stem, path, read_metadata(path, Path(path).stem, audio_root)) for path in metadata_paths]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finelap data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="check metadata lines and audio files")
    pack = commands.add_parser("pack", help="write WebDataset tar shards")
    cluster = commands.add_parser("cluster", help="build a phrase bank by clustering the metadata's phrases")
    for command in (check, pack, cluster):
        command.add_argument("--metadata", action="append", required=True, help="metadata JSON lines (repeatable)")
        command.add_argument("--audio-root", help="folder relative audio paths resolve against (default: metadata's)")
    check.add_argument("--bank", help="phrase bank JSON lines")
    check.add_argument("--strict", action="store_true", help="warnings also make the exit status 1")
    pack.add_argument("--out", required=True, help="output folder")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    cluster.add_argument("--out", required=True, help="bank file to write")
    cluster.add_argument("--threshold", type=float, default=DEFAULT_CLUSTER_THRESHOLD, help="cosine similarity")
    cluster.add_argument("--linkage", default="average", choices=["average", "complete", "single"])
    args = parser.parse_args(argv)

    try:
        if args.command == "validate":
            problems = validate(args.metadata, args.bank, args.audio_root)
            _print_report(problems, sys.stdout)
            failing = [p for p in problems if p.severity == "error" or args.strict]
            return 1 if failing else 0
        sources = _sources(args.metadata, args.audio_root)
        if args.command == "pack":
            manifest = pack_shards(sources, args.out, args.shard_size)
            print(f"wrote {len(manifest['shards'])} shards of {manifest['num_samples']} samples to {args.out}")
            return 0
        phrases = [label.phrase for _, _, records in sources for record in records for label in record.phrases]
        bank = cluster_phrases(phrases, threshold=args.threshold, linkage=args.linkage)
        bank.write(args.out)
        print(f"wrote {len(bank)} clusters of {len(set(phrases))} phrases to {args.out}")
        return 0
    except (MetadataError, FileNotFoundError, ValueError) as error:
        print(f"finelap data {args.command}: {error}", file=sys.stderr)
        return 1
