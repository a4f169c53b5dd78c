"""Flat arrays derived from an input file, cached beside it and memory-mapped by every process.

Training metadata and shard offsets are converted once into numpy arrays (`NAME.npy`, mapped
read-only when opened) and a few JSON documents (`NAME.json`, read when first asked for); the ranks
and DataLoader workers of a node then share the pages of one file instead of each holding Python
objects.

Where: `INPUT.finelap-cache/key-DIGEST/` beside the input file (INPUT is its file name). Where that
folder cannot be written, under `fallback_dir` (data.cache_dir), in a folder named after the input's
name and a digest of its absolute path; where neither can be written, the arrays are built in memory
for this process only, with a one-line warning that says so.

Key: DIGEST is a blake2b digest of the layout name and of the input's size, mtime_ns and the blake2b
digest of its bytes (`file_identity`), so an edited file gets a new key even when it keeps its size
and modification time. Where a cache depends on more files than the one it is keyed by (the shards'
offsets, on the tar and index files beside the manifest), a `current` check rebuilds it when they
changed. Once a new version is written, the folders of older keys are removed.

Concurrency: the first process to take the lock (`fcntl.flock` on `INPUT.finelap-cache/lock`)
builds into a temporary folder and renames it to `key-DIGEST/`; the others wait on the lock and then
map the finished folder, which every process checks for before taking the lock. A rename is atomic,
so no process ever maps a half-written cache, also on a file system without locks (there several
processes may build at once, and the first rename wins).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy

logger = logging.getLogger("finelap.data")

CACHE_SUFFIX = ".finelap-cache"
# errors that mean "no cache can be written here": permissions, a read-only or full file system, a file in the way
CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ENOTDIR)

Built = tuple[dict[str, numpy.ndarray], dict[str, object]]  # (arrays, JSON documents) by name


def file_identity(path: str | Path) -> dict:
    """{"size", "mtime_ns", "blake2b"} of a file: its size and modification time, and the blake2b
    digest (16 bytes, hex) of its bytes, read in one streamed pass."""
    path = Path(path)
    status = path.stat()
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "blake2b": digest}


def cache_key(layout: str, derived_from: object) -> str:
    """The key of a cache of `layout` built from `derived_from` (JSON-serialisable), 20 hex digits."""
    text = json.dumps([layout, derived_from], sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=10).hexdigest()


class Columns:
    """Named arrays and JSON documents: mapped from a cache folder, or held in memory.

    Pickling a mapped one (a DataLoader worker started by spawn or forkserver) pickles its folder, and
    unpickling maps the folder again rather than copying the arrays.
    """

    def __init__(
        self, arrays: dict[str, numpy.ndarray], documents: dict[str, object] | None = None, folder: Path | None = None
    ) -> None:
        self.arrays = arrays
        self.folder = folder
        self._documents = dict(documents or {})

    @classmethod
    def open(cls, folder: str | Path) -> Columns:
        """Map every NAME.npy of `folder` read-only."""
        folder = Path(folder)
        arrays = {path.stem: numpy.asarray(numpy.load(path, mmap_mode="r")) for path in folder.glob("*.npy")}
        return cls(arrays, folder=folder)

    def __getitem__(self, name: str) -> numpy.ndarray:
        return self.arrays[name]

    def document(self, name: str) -> object:
        """The JSON document `name` (read from the folder the first time it is asked for)."""
        if name not in self._documents:
            self._documents[name] = json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))
        return self._documents[name]

    def __reduce__(self):
        if self.folder is not None:
            return Columns.open, (self.folder,)
        return Columns, (self.arrays, self._documents)


class Strings:
    """n strings in one UTF-8 buffer: string i is utf8[offsets[i] : offsets[i + 1]]; stored as the arrays
    NAME.offsets ([n + 1] int64) and NAME.utf8 (uint8)."""

    def __init__(self, offsets: numpy.ndarray, utf8: numpy.ndarray) -> None:
        self.offsets = offsets
        self.utf8 = utf8
        self._bytes = memoryview(utf8)

    @classmethod
    def of(cls, columns: Columns, name: str) -> Strings:
        return cls(columns[f"{name}.offsets"], columns[f"{name}.utf8"])

    @staticmethod
    def arrays(name: str, strings: Sequence[str]) -> dict[str, numpy.ndarray]:
        """The two arrays that store `strings` under `name`."""
        encoded = [text.encode("utf-8") for text in strings]
        offsets = numpy.zeros(len(encoded) + 1, dtype=numpy.int64)
        numpy.cumsum(numpy.fromiter(map(len, encoded), dtype=numpy.int64, count=len(encoded)), out=offsets[1:])
        utf8 = numpy.frombuffer(b"".join(encoded), dtype=numpy.uint8)
        return {f"{name}.offsets": offsets, f"{name}.utf8": utf8}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        """String `index` (0 <= index < len)."""
        if not 0 <= index < len(self):
            raise IndexError(f"string {index} of {len(self)}")
        return str(self._bytes[self.offsets[index] : self.offsets[index + 1]], "utf-8")

    def __reduce__(self):
        return Strings, (self.offsets, self.utf8)

    def __iter__(self) -> Iterator[str]:
        utf8, offsets = self.utf8.tobytes(), self.offsets.tolist()
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield utf8[start:end].decode("utf-8")


def load_or_build(
    source: Path,
    key: str,
    build: Callable[[], Built],
    fallback_dir: str | Path | None,
    what: str,
    current: Callable[[Columns], bool] | None = None,
) -> Columns:
    """The cache `key` of `source`: mapped when it is there, else built by `build` (once per node, under
    the lock) and written; built in memory when no cache folder can be written. `what` names the cache
    in messages ("metadata cache"). `current` says whether a cache found is still valid for what the key
    does not cover (the shards' offsets: the files beside the manifest); one that is not is rebuilt."""
    roots = [Path(f"{source}{CACHE_SUFFIX}")]
    if fallback_dir is not None:
        absolute = str(source.resolve()).encode("utf-8")
        name = f"{source.name}-{hashlib.blake2b(absolute, digest_size=8).hexdigest()}{CACHE_SUFFIX}"
        roots.append(Path(fallback_dir) / name)
    refusals = []
    for root in roots:
        folder = root / f"key-{key}"
        if (columns := _open_current(folder, current)) is not None:
            return columns
        try:
            with _locked(root, lambda: logger.info("%s: another process is writing its %s; waiting to map it",
                                                   source, what)) as held:
                if (columns := _open_current(folder, current)) is not None:
                    return columns
                temporary = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
                try:
                    logger.info("%s: writing its %s to %s (once; later runs map it)", source, what, folder)
                    began = time.perf_counter()
                    arrays, documents = build()
                    _write(temporary, arrays, documents)
                    _publish(temporary, folder)
                finally:
                    shutil.rmtree(temporary, ignore_errors=True)
                logger.info("%s: %s written in %.1f s", source, what, time.perf_counter() - began)
                _remove_older(root, folder, held)
                return Columns.open(folder)
        except OSError as error:
            if error.errno not in CANNOT_WRITE:
                raise
            refusals.append(f"{root}: {error.strerror}")
    logger.warning(
        "%s: no %s could be written (%s); reading it in this process only (set data.cache_dir to a writable "
        "folder to keep one)", source, what, "; ".join(refusals),
    )
    arrays, documents = build()
    return Columns(arrays, documents)


def _open_current(folder: Path, current: Callable[[Columns], bool] | None) -> Columns | None:
    if not folder.is_dir():
        return None
    columns = Columns.open(folder)
    return columns if current is None or current(columns) else None


@contextmanager
def _locked(root: Path, waiting: Callable[[], None]) -> Iterator[bool]:
    """Hold the cache folder's lock, calling `waiting` first when another process holds it; yields False where
    the file system has no locks (then nothing is held)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("a") as lock:
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting()
                fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(folder: Path, arrays: dict[str, numpy.ndarray], documents: dict[str, object]) -> None:
    for name, array in arrays.items():
        numpy.save(folder / f"{name}.npy", numpy.ascontiguousarray(array))
    for name, document in documents.items():
        (folder / f"{name}.json").write_text(json.dumps(document), encoding="utf-8")


def _publish(temporary: Path, folder: Path) -> None:
    """Rename the written folder into place, replacing a version that is no longer current; where another
    process got there first (a file system without locks), keep its folder."""
    if folder.is_dir():
        aside = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        os.rename(folder, aside / folder.name)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(temporary, folder)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not folder.is_dir():
            raise


def _remove_older(root: Path, folder: Path, held: bool) -> None:
    """Remove the folders of other keys (a process still mapping one keeps its pages) and, while holding the
    lock, the temporary folders that builds which died left behind."""
    for other in root.iterdir():
        stale = other.name.startswith("key-") or (held and other.name.startswith(".tmp-"))
        if stale and other != folder and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
