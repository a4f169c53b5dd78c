"""WebDataset tar shards of training audio: packing, and random access for the DataLoader path.

Layout of a shard folder:
    shard-000000.tar   members {key}.{ext} (the original audio file's bytes,
                       ext its lower-case extension) and {key}.json (the
                       metadata record, audio_path replaced by the member name);
                       key = f"{global_index:09d}", the record's index in the packed metadata
    shard-000000.idx   DALI index of the tar (written by DALI's wds2idx), so that
                       fn.readers.webdataset starts without scanning the archive
    shards.json        manifest: sources, and per shard its files and the audio_ids in order
Training joins shard members to metadata records by audio_id, which must be
unique across the packed metadata.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from finelap.data.metadata import ClipRecord

MANIFEST_NAME = "shards.json"
MANIFEST_FORMAT = "finelap-webdataset-1"


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


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def pack_shards(
    sources: Sequence[tuple[str, str, Sequence[ClipRecord]]], out_dir: str | Path, shard_size: int
) -> dict:
    """Write shards of `shard_size` samples for the records of (name, metadata path, records)
    sources, in order; returns the manifest (also written to out_dir/shards.json)."""
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
    shards = []
    for start in range(0, len(records), shard_size):
        stem = shard_stem(len(shards))
        tar_path = out_dir / f"{stem}.tar"
        chunk = records[start : start + shard_size]
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for offset, record in enumerate(chunk):
                key = f"{start + offset:09d}"
                audio_path = Path(record.audio_path)
                if not audio_path.is_file():
                    raise FileNotFoundError(f"{record.location}: audio file not found: {audio_path}")
                member = f"{key}{audio_path.suffix.lower() or '.audio'}"
                _add_member(archive, member, audio_path.read_bytes())
                _add_member(archive, f"{key}.json", json.dumps(record_to_json(record, member)).encode("utf-8"))
        from wds2idx import IndexCreator  # DALI's indexer: only packing needs DALI, not training

        with IndexCreator(str(tar_path), str(out_dir / f"{stem}.idx"), verbose=False) as index:
            index.create_index()
        shards.append({
            "tar": tar_path.name, "index": f"{stem}.idx", "first_key": start,
            "audio_ids": [record.audio_id for record in chunk],
        })
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


@dataclass(frozen=True)
class ShardMember:
    tar_path: str
    name: str  # member name, e.g. 000000012.flac
    offset: int  # byte offset of the member's data in the tar
    size: int


class ShardIndex:
    """audio_id -> where its audio bytes lie in the shards; reads them by seeking (safe in worker processes)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"shard manifest not found: {manifest_path} (write shards with `finelap data pack`)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path}: unknown shard format {self.manifest.get('format')!r}")
        self.members: dict[str, ShardMember] = {}
        for shard in self.manifest["shards"]:
            tar_path = self.folder / shard["tar"]
            audio_members = {}
            with tarfile.open(tar_path) as archive:
                for info in archive:
                    key, _, extension = info.name.partition(".")
                    if info.isfile() and extension != "json":
                        audio_members[int(key)] = ShardMember(str(tar_path), info.name, info.offset_data, info.size)
            for number, audio_id in enumerate(shard["audio_ids"]):
                key = shard["first_key"] + number
                if key not in audio_members:
                    raise ValueError(f"{tar_path}: no audio member for key {key:09d} (audio_id {audio_id!r})")
                self.members[audio_id] = audio_members[key]

    @property
    def tar_paths(self) -> list[str]:
        return [str(self.folder / shard["tar"]) for shard in self.manifest["shards"]]

    @property
    def index_paths(self) -> list[str]:
        return [str(self.folder / shard["index"]) for shard in self.manifest["shards"]]

    def member(self, audio_id: str, location: str = "") -> ShardMember:
        if audio_id not in self.members:
            where = f"{location}: " if location else ""
            raise KeyError(f"{where}audio_id {audio_id!r} is not in the shards of {self.folder}")
        return self.members[audio_id]

    def read(self, member: ShardMember) -> bytes:
        with open(member.tar_path, "rb") as tar:
            tar.seek(member.offset)
            return tar.read(member.size)
