"""Start-up of the training input at scale: the metadata each rank reads and holds, and the shard index.

    metadata_ladder(sizes, workdir) -> [row per size]      (training metadata of `size` clips)
    shard_index_ladder(sizes, workdir) -> [row per size]   (a shard folder of `size` clips)

bench_data_scale.py tables the rows. Every measurement runs in a fresh Python process (this file run
with --child), timed after its imports; memory comes from /proc: peak = the process's highest RSS
minus its RSS before the step, private = Private_Clean + Private_Dirty of /proc/PID/smaps_rollup.

Metadata row (synthetic JSON lines, about 25% of clips with timed phrases, some weak phrases, list
captions and non-ASCII text; a phrase bank over most phrases):
    size (clips), jsonl_mib
    parse_s, parse_peak_mib           what every rank did before the cache: read_metadata, then
                                      resolve_clip_labels for each record (Python objects for both)
    parse_worker_private_mib          private MiB of one of 2 forked workers that read every record and its labels
    parse_worker_baseline_mib         the same for workers that read nothing (their garbage collector runs)
    convert_s, convert_peak_mib       first load_training_set: parse, convert, write the cache, load
    cache_mib                         size of the cache folder
    startup_s, startup_peak_mib       load_training_set of a rank once the cache is there
    rank_private_mib                  private MiB that loading adds to a rank while another rank maps the cache
    worker_private_mib                private MiB of one of 2 forked workers that decode every record and
                                      its cluster labels, forked as TrainLoader forks (garbage collector frozen)
    worker_baseline_mib               the same for workers that read nothing
Shard index row (synthetic: a manifest and DALI index files of `size` clips in shards of 5000; real
tars of tiny members up to `scan_up_to` clips, so that scanning them can be timed, empty stand-ins
above, dated before their index files):
    size (clips), shards, index_mib
    scan_s                            reading every tar header (what ShardIndex did before); None above scan_up_to
    first_open_s                      ShardIndex without its cache: read the index files, write the cache
    open_s, open_peak_mib             ShardIndex of a rank once the cache is there
    rank_private_mib                  private MiB that opening adds to a rank while another rank maps the cache
    lookup_us                         one member(audio_id) lookup, mean over 20000 random ids
    cache_mib
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy

from finelap.bad_input import SkipCounter
from finelap.config import AudioEncoderConfig, DataConfig, DataSourceConfig
from finelap.data.labels import FrameGrid
from finelap.data.metadata import read_metadata
from finelap.data.phrase_bank import PhraseBank
from finelap.data.shards import MANIFEST_FORMAT, MANIFEST_NAME, ShardIndex, shard_index_lines, shard_stem
from finelap.data.training_set import clip_labels, load_training_set, resolve_clip_labels

MIB = 1024 * 1024
SHARD_SIZE = 5000
PHRASES = ["dog barking", "car passing", "siren", "rain", "speech", "music", "bird song", "door slam", "wind",
           "engine idling", "glass breaking", "footsteps", "applause", "typing", "thunder", "water running",
           "baby crying", "cat meowing", "alarm", "café chatter", "猫の鳴き声", "train horn", "helicopter",
           "church bell"]


# ---------------------------------------------------------------- metadata


def write_metadata(folder: Path, clips: int, seed: int = 0) -> tuple[Path, Path]:
    """`clips` lines of training metadata and a phrase bank in `folder`; returns their paths."""
    rng = numpy.random.default_rng(seed)
    vocabulary = [f"{phrase} {n}" if n else phrase for n in range(25) for phrase in PHRASES]  # 600 phrase texts
    folder.mkdir(parents=True, exist_ok=True)
    metadata, bank = folder / "train.jsonl", folder / "bank.jsonl"
    with bank.open("w", encoding="utf-8") as out:
        for start in range(0, 480, 3):  # the bank covers 480 of the 600 texts, three to a cluster
            out.write(json.dumps({"phrase": vocabulary[start], "alternatives": vocabulary[start : start + 3]}) + "\n")
    kinds, counts = rng.random(clips), rng.integers(1, 5, clips)
    with metadata.open("w", encoding="utf-8") as out:
        for n in range(clips):
            line = {"audio_id": f"clip-{n:08d}", "audio_path": f"audio/{n // 1000:05d}/clip-{n:08d}.flac"}
            words = " ".join(PHRASES[(n * 7 + k) % len(PHRASES)] for k in range(3))
            caption = f"a recording with {words}, heard from a distance in a busy street"
            line["caption"] = [caption, f"{words} nearby", f"clip {n}: {words}"] if kinds[n] < 0.3 else caption
            if kinds[n] < 0.25:
                phrases = []
                for k in range(int(counts[n])):
                    onset = round(float(rng.uniform(0, 8)), 3)
                    segments = [[onset, round(onset + float(rng.uniform(0.2, 2)), 3)]]
                    if k % 2:
                        segments.append([round(onset + 2.5, 3), round(onset + 3.1, 3)])
                    phrases.append({"phrase": vocabulary[(n + 37 * k) % len(vocabulary)], "segments": segments})
                phrases.append({"phrase": vocabulary[(n * 13) % len(vocabulary)]})  # a weak label
                line["phrases"] = phrases
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return metadata, bank


def metadata_ladder(sizes: list[int], workdir: str | Path) -> list[dict]:
    """One row per size (module docstring); the files are written under `workdir` and removed afterwards."""
    rows = []
    for clips in sizes:
        folder = Path(workdir) / f"metadata-{clips}"
        metadata, bank = write_metadata(folder, clips)
        row = {"size": clips, "jsonl_mib": metadata.stat().st_size / MIB}
        parse = _child("parse", metadata, bank, workers=2)
        row.update(parse_s=parse["seconds"], parse_peak_mib=parse["peak_mib"],
                   parse_worker_private_mib=parse["worker_private_mib"],
                   parse_worker_baseline_mib=parse["worker_baseline_mib"])
        convert = _child("load", metadata, bank)
        row.update(convert_s=convert["seconds"], convert_peak_mib=convert["peak_mib"],
                   cache_mib=_folder_mib(Path(f"{metadata}.finelap-cache")))
        with _holding("load", metadata, bank):  # the first rank keeps the cache mapped
            startup = _child("load", metadata, bank, workers=2)
        row.update(startup_s=startup["seconds"], startup_peak_mib=startup["peak_mib"],
                   rank_private_mib=startup["private_mib"], worker_private_mib=startup["worker_private_mib"],
                   worker_baseline_mib=startup["worker_baseline_mib"])
        rows.append(row)
        shutil.rmtree(folder)
    return rows


# ---------------------------------------------------------------- shard index


def write_shards(folder: Path, clips: int, real_tars: bool) -> None:
    """A shard folder of `clips` clips in shards of SHARD_SIZE: manifest, DALI index files and tars (real ones of
    tiny members, or empty stand-ins dated a day before their index files)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, first in enumerate(range(0, clips, SHARD_SIZE)):
        keys = range(first, min(first + SHARD_SIZE, clips))
        tar_path, index_path = folder / f"{shard_stem(number)}.tar", folder / f"{shard_stem(number)}.idx"
        if real_tars:
            with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as archive:
                for key in keys:
                    for name, data in ((f"{key:09d}.flac", b"f" * 100), (f"{key:09d}.json", b"{}")):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        archive.addfile(info, io.BytesIO(data))
            lines = shard_index_lines(tar_path)
        else:
            tar_path.touch()
            lines = [f"v1.2 {len(keys)}"] + [
                f"flac {1024 * (2 * n) + 512} 100 {key:09d}.flac json {1024 * (2 * n + 1) + 512} 2 {key:09d}.json"
                for n, key in enumerate(keys)]
        index_path.write_text("\n".join(lines) + "\n")
        if not real_tars:
            stamp = index_path.stat().st_mtime_ns - 86400 * 10**9
            os.utime(tar_path, ns=(stamp, stamp))
        shards.append({"tar": tar_path.name, "index": index_path.name, "first_key": first,
                       "audio_ids": [f"clip-{key:08d}" for key in keys]})
    manifest = {"format": MANIFEST_FORMAT, "num_samples": clips, "sources": [], "shards": shards}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def shard_index_ladder(sizes: list[int], workdir: str | Path, scan_up_to: int = 200_000) -> list[dict]:
    """One row per size (module docstring); the files are written under `workdir` and removed afterwards."""
    rows = []
    for clips in sizes:
        folder = Path(workdir) / f"shards-{clips}"
        write_shards(folder, clips, real_tars=clips <= scan_up_to)
        row = {"size": clips, "shards": -(-clips // SHARD_SIZE),
               "index_mib": sum(path.stat().st_size for path in folder.glob("*.idx")) / MIB,
               "scan_s": _child("scan", folder)["seconds"] if clips <= scan_up_to else None}
        row["first_open_s"] = _child("shards", folder)["seconds"]
        with _holding("shards", folder):
            opened = _child("shards", folder)
        row.update(open_s=opened["seconds"], open_peak_mib=opened["peak_mib"], rank_private_mib=opened["private_mib"],
                   lookup_us=opened["lookup_us"], cache_mib=_folder_mib(folder / "shards.json.finelap-cache"))
        rows.append(row)
        shutil.rmtree(folder)
    return rows


# ---------------------------------------------------------------- measuring in a fresh process


def _child(mode: str, *paths: Path, workers: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--workers", str(workers), *map(str, paths)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class _holding:
    """A process that has done `mode` and holds the result (the first rank) while the block runs."""

    def __init__(self, mode: str, *paths: Path) -> None:
        self.command = [sys.executable, __file__, "--child", mode, "--hold", *map(str, paths)]

    def __enter__(self):
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.process.stdout.readline()  # "ready"
        return self

    def __exit__(self, *_) -> None:
        self.process.stdin.close()
        self.process.wait()


def _folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / MIB


def _rollup(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        values[name] = int(value.split()[0]) * 1024
    return values


def _peak_rss() -> int:
    """This process's highest RSS in bytes (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _private(pid: int | str = "self") -> int:
    rollup = _rollup(pid)
    return rollup["Private_Clean"] + rollup["Private_Dirty"]


def _forked_workers(touch, count: int, frozen: bool) -> float:
    """Private MiB of one of `count` forked processes that each ran `touch` (measured while all of them are
    alive and have run it, so pages they both read count as shared), the largest. `frozen`: fork as
    TrainLoader starts its workers, with the garbage collector's objects frozen."""
    if frozen:
        gc.collect()
        gc.freeze()
    children = []
    for _ in range(count):
        report_read, report_write = os.pipe()
        order_read, order_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            touch()
            gc.collect()
            os.write(report_write, b"t")
            os.read(order_read, 1)  # every worker has run `touch`
            os.write(report_write, json.dumps(_private()).encode() + b"\n")
            os.read(order_read, 1)  # every worker has measured
            os._exit(0)
        children.append((pid, report_read, order_write))
    gc.unfreeze()
    for _, report_read, _ in children:
        os.read(report_read, 1)
    for _, _, order_write in children:
        os.write(order_write, b"m")
    private = [int(os.read(report_read, 100)) for _, report_read, _ in children]
    for pid, _, order_write in children:
        os.write(order_write, b"x")
        os.waitpid(pid, 0)
    return max(private) / MIB


def _run_child(mode: str, paths: list[str], workers: int, hold: bool) -> None:
    before_rss, before_private = _rollup()["Rss"], _private()
    start = time.perf_counter()
    row = {}
    if mode == "parse":  # what load_training_set did before the cache: every record and its labels as objects
        bank = PhraseBank.read(paths[1])
        grid = FrameGrid.from_audio_config(AudioEncoderConfig())
        records = read_metadata(paths[0], "train")
        labels = [resolve_clip_labels(record, bank, grid, 10.0, 20, 8) for record in records]

        def touch():
            for record, clip in zip(records, labels):
                (record.audio_id, record.audio_path, record.captions, clip.positives, clip.weak)
    elif mode == "load":
        data = DataConfig(sources=[DataSourceConfig("train", paths[0])], phrase_bank=paths[1])
        training_set = load_training_set(data, AudioEncoderConfig(), SkipCounter())

        def touch():
            for index in range(len(training_set)):
                clip_labels(training_set.records[index], training_set.bank)
    elif mode == "scan":
        manifest = json.loads((Path(paths[0]) / "shards.json").read_text())
        members = {}
        for shard in manifest["shards"]:
            with tarfile.open(Path(paths[0]) / shard["tar"]) as archive:
                for info in archive:
                    key, _, extension = info.name.partition(".")
                    if info.isfile() and extension != "json":
                        members[int(key)] = (shard["tar"], info.name, info.offset_data, info.size)
        row["members"] = len(members)
    elif mode == "shards":
        index = ShardIndex(paths[0])
    row["seconds"] = time.perf_counter() - start
    row["peak_mib"] = (_peak_rss() - before_rss) / MIB
    row["private_mib"] = (_private() - before_private) / MIB
    if mode == "shards":
        rng = numpy.random.default_rng(1)
        wanted = [f"clip-{key:08d}" for key in rng.integers(0, index.num_samples, 20000)]
        start = time.perf_counter()
        for audio_id in wanted:
            index.member(audio_id)
        row["lookup_us"] = (time.perf_counter() - start) / len(wanted) * 1e6
    if workers:
        row["worker_baseline_mib"] = _forked_workers(lambda: None, workers, frozen=mode == "load")
        row["worker_private_mib"] = _forked_workers(touch, workers, frozen=mode == "load")
    if hold:
        print("ready", flush=True)
        sys.stdin.read()
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["parse", "load", "scan", "shards"], help="(internal) one measurement")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--metadata-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--shard-sizes", type=int, nargs="*", default=[100_000])
    parser.add_argument("--workdir", default="/tmp/finelap-data-scale")
    args = parser.parse_args()
    if args.child:
        _run_child(args.child, args.paths, args.workers, args.hold)
        return
    for row in metadata_ladder(args.metadata_sizes, args.workdir) + shard_index_ladder(args.shard_sizes, args.workdir):
        print(json.dumps({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}))


if __name__ == "__main__":
    main()
