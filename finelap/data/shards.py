"""WebDataset tar shards of training audio: packing, and random access for the DataLoader path.

Layout of a shard folder:
    shard-000000.tar   members {key}.{ext} (the original audio file's bytes,
                       ext its lower-case extension) and {key}.json (the
                       metadata record, audio_path replaced by the member name);
                       key = f"{global_index:09d}", the record's index in the packed metadata
    shard-000000.idx   DALI index of the tar (the file DALI's wds2idx would write), so that
                       fn.readers.webdataset starts without scanning the archive; ShardIndex
                       reads the offsets from it too, and rebuilds it when it is missing or
                       older than its tar
    shards.json        manifest: sources, and per shard its files and the audio_ids in order
    shards.json.finelap-cache/   ShardIndex's offsets as arrays, mapped by every process
Training joins shard members to metadata records by audio_id, which must be
unique across the packed metadata.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy

from finelap.data.mapped_cache import Built, Strings, cache_key, file_identity, load_or_build
from finelap.data.metadata import ClipRecord
from finelap.data.worker_pool import ordered_map

logger = logging.getLogger("finelap.data")

MANIFEST_NAME = "shards.json"
MANIFEST_FORMAT = "finelap-webdataset-1"
INDEX_VERSION = "v1.2"  # the first word of DALI's index files (wds2idx)
OFFSETS_LAYOUT = "finelap-shard-offsets-1"


def shard_stem(number: int) -> str:
    return f"shard-{number:06d}"


def record_to_json(record: ClipRecord, audio_path: str) -> dict:
    """The reference-format record of `record`, pointing at `audio_path`."""
    caption = record.captions[0] if len(record.captions) == 1 else list(record.captions)
    entry = {"audio_id": record.audio_id, "audio_path": audio_path, "caption": caption}
    if record.phrases:
        entry["phrases"] = [
            {"phrase": label.phrase, "segments": [list(segment) for segment in label.segments]}
            for label in record.phrases
        ]
    return entry


class _ShardWriter:
    """A USTAR tar written member by member, byte for byte what `tarfile` writes for the same members (mode 0644,
    mtime 0, no owner; two zero blocks and zero padding to a 10 KiB record at the end), and the lines of its
    DALI index (what DALI's wds2idx would write reading it back), from the offsets known while writing, so
    that no tar is read again. (os.sendfile instead of the reads and writes was slower on a 2-core AMD EPYC:
    0.87 s against 0.75 s for 1024 ten-second stereo FLAC files.)"""

    def __init__(self, tar: io.BufferedWriter) -> None:
        self._tar = tar  # open for writing, at its start
        self._offset = 0
        self._samples: list[str] = []

    def add_sample(self, audio_member: str, record: ClipRecord, json_member: str, json_bytes: bytes) -> None:
        with open(record.audio_path, "rb") as audio:
            size = os.fstat(audio.fileno()).st_size
            audio_at = self._header(audio_member, size)
            self._copy(audio, size, record)
            self._pad(size)
        json_at = self._header(json_member, len(json_bytes))
        self._tar.write(json_bytes)
        self._pad(len(json_bytes))
        self._samples.append(f"{_extension(audio_member)} {audio_at} {size} {audio_member} "
                             f"{_extension(json_member)} {json_at} {len(json_bytes)} {json_member}")

    def finish(self) -> list[str]:
        """Ends the tar; the lines of its index."""
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._tar.write(bytes(2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
        return [f"{INDEX_VERSION} {len(self._samples)}", *self._samples]

    def _header(self, name: str, size: int) -> int:
        """Writes a member's header; where its data will start."""
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        self._tar.write(header)
        self._offset += len(header)
        return self._offset

    def _pad(self, size: int) -> None:
        padding = -size % tarfile.BLOCKSIZE
        self._tar.write(bytes(padding))
        self._offset += size + padding

    def _copy(self, audio: io.BufferedReader, size: int, record: ClipRecord) -> None:
        copied = 0
        while chunk := audio.read(min(PACK_COPY_BYTES, size - copied)):
            self._tar.write(chunk)
            copied += len(chunk)
        if copied != size:
            raise ValueError(f"{record.location}: audio file {Path(record.audio_path)} changed while it was packed "
                             f"({size} bytes, then {copied})")


def _extension(member: str) -> str:
    return member.partition(".")[2]


# bytes per read and write of the audio (the default of tarfile, 16 KiB, took half of packing's time)
PACK_COPY_BYTES = 4 * 2**20


def pack_shards(
    sources: Sequence[tuple[str, str, Sequence[ClipRecord]]], out_dir: str | Path, shard_size: int, workers: int = 1
) -> dict:
    """Write shards of `shard_size` samples for the records of (name, metadata path, records)
    sources, in order; returns the manifest (also written to out_dir/shards.json). `workers`
    processes write the shards, each file byte for byte the same for any number of them."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [record for _, _, source_records in sources for record in source_records]
    first_location: dict[str, str] = {}
    for record in records:
        if record.audio_id in first_location:
            raise ValueError(
                f"{record.location}: audio_id {record.audio_id!r} is already used at "
                f"{first_location[record.audio_id]}; shards are joined to metadata by audio_id"
            )
        first_location[record.audio_id] = record.location
    jobs = [(out_dir, number, start, records[start : start + shard_size])
            for number, start in enumerate(range(0, len(records), shard_size))]
    paths = [str(record.audio_path) for record in records]
    starts = range(0, len(paths), CHECK_BLOCK)
    with ordered_map(workers) as map_in_order:
        # every audio file is there before any shard is written (the workers look, CHECK_BLOCK paths a job)
        for start, missing in zip(starts, map_in_order(_first_missing, (paths[s : s + CHECK_BLOCK] for s in starts))):
            if missing >= 0:
                record = records[start + missing]
                raise FileNotFoundError(f"{record.location}: audio file not found: {Path(record.audio_path)}")
        shards = list(map_in_order(_write_shard, jobs))
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_samples": len(records),
        "sources": [
            {"name": name, "metadata": str(path), "count": len(source_records)}
            for name, path, source_records in sources
        ],
        "shards": shards,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


CHECK_BLOCK = 4096  # audio paths a worker looks for in one job


def _first_missing(paths: list[str]) -> int:
    """The index of the first path that is not a file; -1 when all are."""
    return next((index for index, path in enumerate(paths) if not os.path.isfile(path)), -1)


def _write_shard(job: tuple[Path, int, int, list[ClipRecord]]) -> dict:
    """Shard `number` (its tar and DALI index) of the records from key `start` on; its manifest entry."""
    out_dir, number, start, chunk = job
    stem = shard_stem(number)
    tar_path = out_dir / f"{stem}.tar"
    with open(tar_path, "wb") as tar:
        shard = _ShardWriter(tar)
        for offset, record in enumerate(chunk):
            key = f"{start + offset:09d}"
            audio_path = Path(record.audio_path)
            member = f"{key}{audio_path.suffix.lower() or '.audio'}"
            shard.add_sample(member, record, f"{key}.json",
                             json.dumps(record_to_json(record, member)).encode("utf-8"))
        index_lines = shard.finish()
    (out_dir / f"{stem}.idx").write_text("\n".join(index_lines) + "\n", encoding="utf-8")  # after the tar: newer
    return {
        "tar": tar_path.name, "index": f"{stem}.idx", "first_key": start,
        "audio_ids": [record.audio_id for record in chunk],
    }


@dataclass(frozen=True)
class ShardMember:
    tar_path: str
    name: str  # member name, e.g. 000000012.flac
    offset: int  # byte offset of the member's data in the tar
    size: int


class ShardIndex:
    """audio_id -> where its audio bytes lie in the shards; reads them by seeking (safe in worker processes).

    Built from the index files that packing writes, never by reading every tar: their offsets are converted
    once into arrays (below) cached beside the manifest (mapped_cache.py: keyed by the manifest's bytes, and
    rebuilt when a tar or index file beside it changes), which every rank and worker maps. An index file that
    is missing or older than its tar is rebuilt once from the tar's headers, with a warning naming the shard;
    one that cannot be read is an error naming it.

    Arrays, K = num_samples, by key: offset, size [K] int64 (the audio member's data in its tar), shard [K]
    int32, member (K strings: member names), audio_id (K strings); id_hash [K] uint64 (blake2b of each
    audio_id, ascending) with id_key [K] int64 (the key of each) to find a key by audio_id.
    """

    def __init__(self, folder: str | Path, cache_dir: str | Path | None = None) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"shard manifest not found: {manifest_path} (write shards with `finelap data pack`)")
        columns = load_or_build(
            manifest_path, cache_key(OFFSETS_LAYOUT, file_identity(manifest_path)),
            lambda: _convert_shard_indexes(self.folder), cache_dir, "shard offsets cache",
            current=lambda cached: cached.document("files") == _file_stats(self.folder, cached.document("shards")),
        )
        self.shards: list[dict] = columns.document("shards")  # {"tar", "index", "first_key", "count"} per shard
        self.num_samples = sum(shard["count"] for shard in self.shards)
        self._offset, self._size, self._shard = columns["offset"], columns["size"], columns["shard"]
        self._id_hash, self._id_key = columns["id_hash"], columns["id_key"]
        self._members = Strings.of(columns, "member")
        self._audio_ids = Strings.of(columns, "audio_id")
        self._tar_paths = self.tar_paths
        self._cache_dir = cache_dir

    def __reduce__(self):
        """Pickled (a worker started by spawn or forkserver) as its folder: unpickling opens it again."""
        return ShardIndex, (self.folder, self._cache_dir)

    @property
    def tar_paths(self) -> list[str]:
        return [str(self.folder / shard["tar"]) for shard in self.shards]

    @property
    def index_paths(self) -> list[str]:
        return [str(self.folder / shard["index"]) for shard in self.shards]

    def key_of(self, audio_id: str) -> int:
        """The key (packed index) of `audio_id`; -1 when it is not in the shards."""
        wanted = numpy.uint64(_id_hash(audio_id))
        position = int(numpy.searchsorted(self._id_hash, wanted))
        while position < len(self._id_hash) and self._id_hash[position] == wanted:
            key = int(self._id_key[position])
            if self._audio_ids[key] == audio_id:
                return key
            position += 1
        return -1

    def member(self, audio_id: str, location: str = "") -> ShardMember:
        key = self.key_of(audio_id)
        if key < 0:
            where = f"{location}: " if location else ""
            raise KeyError(f"{where}audio_id {audio_id!r} is not in the shards of {self.folder}")
        return ShardMember(self._tar_paths[self._shard[key]], self._members[key], int(self._offset[key]),
                           int(self._size[key]))

    def read(self, member: ShardMember) -> bytes:
        with open(member.tar_path, "rb") as tar:
            tar.seek(member.offset)
            return tar.read(member.size)


def _id_hash(audio_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(audio_id.encode("utf-8"), digest_size=8).digest(), "little")


def _file_stats(folder: Path, shards: list[dict]) -> list[list[int] | None]:
    """[tar size, tar mtime_ns, index size, index mtime_ns] per shard; None for a shard missing a file."""
    stats = []
    for shard in shards:
        try:
            tar, index = (folder / shard["tar"]).stat(), (folder / shard["index"]).stat()
        except FileNotFoundError:
            stats.append(None)
            continue
        stats.append([tar.st_size, tar.st_mtime_ns, index.st_size, index.st_mtime_ns])
    return stats


def shard_index_lines(tar_path: str | Path) -> list[str]:
    """DALI's index of a tar (what its wds2idx writes), from the tar's headers: a "v1.2 N" line, then for each
    of the N samples (consecutive members of one name before the first dot) one line of
    `extension offset size name` for every member, offset being where the member's data starts."""
    samples: list[tuple[str, list[str]]] = []
    with tarfile.open(tar_path) as archive:
        for info in archive:
            if not info.isreg():
                continue
            dot = info.name.find(".", info.name.rfind("/") + 1)
            basename, extension = info.name[:dot], info.name[dot + 1 :]
            if not basename or basename.endswith("/"):
                continue
            if not samples or samples[-1][0] != basename:
                samples.append((basename, []))
            samples[-1][1].append(f"{extension} {info.offset_data} {info.size} {info.name}")
    return [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(members) for _, members in samples]


def _fresh_index_lines(tar_path: Path, index_path: Path) -> Iterator[str]:
    """The lines of a shard's index file; one that is missing or older than its tar is first rebuilt from the
    tar (in memory only, when it cannot be written)."""
    if not tar_path.is_file():
        raise FileNotFoundError(f"shard not found: {tar_path} (listed in {tar_path.parent / MANIFEST_NAME})")
    if index_path.is_file() and index_path.stat().st_mtime_ns >= tar_path.stat().st_mtime_ns:
        with index_path.open(encoding="utf-8") as lines:
            yield from lines
        return
    state = "older than the shard" if index_path.is_file() else "missing"
    logger.warning("shard %s: its index %s is %s; rebuilding it from the tar's headers", tar_path, index_path, state)
    lines = shard_index_lines(tar_path)
    temporary = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(temporary, index_path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        logger.warning("shard %s: could not write %s (%s); using the rebuilt index in memory", tar_path,
                       index_path, error.strerror)
    yield from lines


def _convert_shard_indexes(folder: Path) -> Built:
    """The ShardIndex arrays from the manifest and every shard's index file, and the "shards" and "files"
    documents (the shard list, and the tar and index files' sizes and mtimes the arrays were read from)."""
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path}: unknown shard format {manifest.get('format')!r}")
    total = manifest["num_samples"]
    offset = numpy.full(total, -1, dtype=numpy.int64)
    size = numpy.full(total, -1, dtype=numpy.int64)
    shard_of = numpy.full(total, -1, dtype=numpy.int32)
    members = [""] * total
    audio_ids: list[str] = []
    for number, shard in enumerate(manifest["shards"]):
        tar_path, index_path = folder / shard["tar"], folder / shard["index"]
        first, count = shard["first_key"], len(shard["audio_ids"])
        for key, member, member_offset, member_size in _audio_members(_fresh_index_lines(tar_path, index_path),
                                                                      index_path, tar_path):
            if first <= key < first + count:
                offset[key], size[key], shard_of[key], members[key] = member_offset, member_size, number, member
        missing = numpy.flatnonzero(shard_of[first : first + count] != number)
        if len(missing):
            key = first + int(missing[0])
            audio_id = shard["audio_ids"][missing[0]]
            raise ValueError(f"{tar_path}: no audio member for key {key:09d} (audio_id {audio_id!r})")
        audio_ids += shard["audio_ids"]
    id_hash = numpy.fromiter(map(_id_hash, audio_ids), dtype=numpy.uint64, count=len(audio_ids))
    id_key = numpy.argsort(id_hash, kind="stable").astype(numpy.int64)
    shards = [{"tar": shard["tar"], "index": shard["index"], "first_key": shard["first_key"],
               "count": len(shard["audio_ids"])} for shard in manifest["shards"]]
    arrays = {
        "offset": offset, "size": size, "shard": shard_of, "id_hash": id_hash[id_key], "id_key": id_key,
        **Strings.arrays("member", members), **Strings.arrays("audio_id", audio_ids),
    }
    return arrays, {"shards": shards, "files": _file_stats(folder, shards)}


def _audio_members(lines: Iterator[str], index_path: Path, tar_path: Path) -> Iterator[tuple[int, str, int, int]]:
    """(key, member name, data offset, size) of each sample's audio member (any member but its .json) in the
    lines of an index file; ValueError naming the file when it is not one."""
    def unreadable(why: str) -> ValueError:
        return ValueError(f"{index_path}: not a readable shard index ({why}); delete it to have it rebuilt from "
                          f"{tar_path.name}")

    lines = iter(lines)
    header = next(lines, "").split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise unreadable(f"first line {' '.join(header)!r}, expected '{INDEX_VERSION} <samples>'")
    samples = 0
    for number, line in enumerate(lines, start=2):
        fields = line.split()
        if not fields:
            continue
        samples += 1
        if len(fields) % 4:
            raise unreadable(f"line {number} does not hold 'extension offset size name' per member")
        for start in range(0, len(fields), 4):
            _, offset, size, name = fields[start : start + 4]
            key, _, extension = name.partition(".")
            if extension == "json":
                continue
            if not (key.isdigit() and offset.isdigit() and size.isdigit()):
                raise unreadable(f"line {number}: member {name!r} at {offset!r}, size {size!r}")
            yield int(key), name, int(offset), int(size)
    if samples != int(header[1]):
        raise unreadable(f"{samples} samples listed, the first line says {header[1]}")
