"""The synthesis run: check sources, make mixtures in worker processes, assemble the outputs.

Output folder:
    audio/<id>.wav            mixtures (WAV, `subtype`)
    metadata.jsonl            training metadata (published FineLAP format), audio_path relative to this folder
    ground_truth.tsv          DCASE ground truth: filename, onset, offset, event_label (seconds)
    durations.tsv             filename, duration (seconds)
    phrase_bank.jsonl         the clusters of the labels used (published FineLAP format)
    mixtures.jsonl            everything drawn per mixture: sources, crops, SNRs, gains, placements
    report.json               accepted, rejected and skipped source clips: counts per reason, event
                              sources listed and kept per class, and every rejection and skip listed
    classes.txt               the event classes (labels of the accepted event sources), one per line
    labels.jsonl              zero-shot labels of the mixtures that hold exactly one event class
                              ({"audio_path", "label"}); absent when no mixture does
    eval.yaml                 `finelap eval --model MODEL --config OUT/eval.yaml`: retrieval (metadata.jsonl),
                              zero-shot (labels.jsonl), SED (ground_truth.tsv) and grounding on this set
    stems/<id>/*.wav          with save_stems: background.wav and event_<k>.wav, at mixture level
    plots/<id>.png            with plots: a timeline of the mixture
    sources.json, synth_config.json, fragments/   bookkeeping for workers and resuming

Resuming: a mixture is done when its fragment (fragments/<id>.json, written
last and atomically) exists; a rerun with the same settings makes only the
missing ones, then assembles the outputs from all fragments in index order.
The number of mixtures may grow between runs: mixture i depends only on
(seed, i).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from tqdm import tqdm

from finelap.bad_input import LabelSurvival, Skip, SkipCounter, refuse_or_warn
from finelap.data.phrase_bank import PhraseBank
from finelap.synth.captions import load_captioner
from finelap.synth.files import write_text_atomic, write_wav_atomic
from finelap.synth.errors import InputProblems, SynthError
from finelap.synth.mixer import Mixture, MixSettings, synthesize
from finelap.synth.sources import EnergyFilter, IndexEntry, Rejection, SourceClip, check_sources, examine, load_source

logger = logging.getLogger("finelap.synth")

WAV_SUBTYPES = ("PCM_16", "PCM_24", "PCM_32")
STEM_SUBTYPE = "PCM_24"  # stems are for analysis: 24-bit keeps their sum within 1e-6 of the mixture
CLIP_CACHE_BYTES = 1 << 30  # per worker: decoded source clips kept in memory


@dataclass(frozen=True)
class SynthConfig:
    events_index: str
    backgrounds_index: str
    out_dir: str
    phrase_bank: str | None = None  # synonyms for captions and the output phrase bank
    num_mixtures: int = 100
    seed: int = 0
    workers: int = 1
    mix: MixSettings = field(default_factory=MixSettings)
    energy: EnergyFilter = field(default_factory=EnergyFilter)
    min_background_seconds: float = 1.0
    on_bad_sample: Literal["error", "skip"] = "error"
    on_empty_class: Literal["error", "warn"] = "error"  # an event class left with no usable source
    save_stems: bool = False
    plots: bool = False
    captioner: str | None = None  # "package.module:callable"; None: rule-based
    subtype: str = "PCM_16"
    prefix: str = "synth"
    progress: bool = True

    def audio_id(self, index: int) -> str:
        return f"{self.prefix}_{index:06d}"


@dataclass
class SynthSummary:
    out_dir: Path
    mixtures: int
    made_now: int  # the rest were complete from an earlier run
    seconds: float  # the whole run: sources, mixtures, assembly
    mixture_seconds: float  # making the mixtures only (workers already started, sources checked)
    report: dict


# ---------------------------------------------------------------- worker side


class _Worker:
    """What one process needs: the config, the accepted sources (read from sources.json) and a clip cache."""

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently used first
        self._cached_bytes = 0
        self._sources: dict | None = None
        self._captioner = None

    def examine(self, task: tuple[IndexEntry, str]):
        entry, role = task
        config = self.config
        outcome = examine(entry, role, config.mix.sample_rate, config.energy, config.min_background_seconds)
        if isinstance(outcome, SourceClip):
            self.load(outcome)
        return outcome

    def load(self, clip: SourceClip) -> np.ndarray:
        """The clip's whole waveform, decoded once and kept while it is among the recently used."""
        waveform = self._cache.get(clip.path)
        if waveform is not None:
            self._cache.move_to_end(clip.path)
            return waveform
        waveform = load_source(clip.path, self.config.mix.sample_rate)
        self._cache[clip.path] = waveform
        self._cached_bytes += waveform.nbytes
        while self._cached_bytes > CLIP_CACHE_BYTES and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        return waveform

    def make(self, index: int) -> int:
        if self._sources is None:
            self._sources = _read_sources(self.out_dir / "sources.json")
            self._captioner = load_captioner(self.config.captioner)
        sources = self._sources
        mixture = synthesize(
            index, self.config.seed, sources["events"], sources["backgrounds"], self.config.mix, self.load, sources["names"]
        )
        _write_mixture(self.config, mixture, self._captioner)
        return index


_WORKER: _Worker | None = None


def _init_worker(config: SynthConfig) -> None:
    global _WORKER
    torch.set_num_threads(1)  # parallel work is across processes; torch threads would only contend
    _WORKER = _Worker(config)


def _examine_task(task):
    return _WORKER.examine(task)


def _make_task(index: int) -> int:
    return _WORKER.make(index)


def _write_mixture(config: SynthConfig, mixture: Mixture, captioner) -> None:
    """Write the audio (and stems, plot), then the fragment that marks the mixture done."""
    out_dir, sample_rate = Path(config.out_dir), config.mix.sample_rate
    audio_id = config.audio_id(mixture.index)
    filename = f"{audio_id}.wav"
    write_wav_atomic(out_dir / "audio" / filename, mixture.audio, sample_rate, config.subtype)

    def span(start: int, end: int) -> list[float]:
        return [start / sample_rate, end / sample_rate]

    caption_events = [
        {
            "label": event.label,
            "name": event.name,
            "role": "event",
            "segments": [span(s, s + event.length) for s in event.starts],
            "snr_db": event.snr_db,
        }
        for event in mixture.events
    ]
    caption_events.append(
        {
            "label": mixture.background.label,
            "name": mixture.background.name,
            "role": "background",
            "segments": [span(0, len(mixture.audio))],
            "snr_db": None,
        }
    )
    caption = captioner(caption_events)
    if not isinstance(caption, str) or not caption.strip():
        raise SynthError(
            f"captioner {config.captioner!r} returned {caption!r} for {audio_id}: a non-empty string is needed"
        )

    stem_paths: list[str | None] = [None] * len(mixture.events)
    background_stem_path = None
    if config.save_stems:
        background_stem_path = f"stems/{audio_id}/background.wav"
        write_wav_atomic(out_dir / background_stem_path, mixture.background_stem, sample_rate, STEM_SUBTYPE)
        for number in range(len(mixture.events)):
            stem_paths[number] = f"stems/{audio_id}/event_{number:02d}.wav"
            write_wav_atomic(out_dir / stem_paths[number], mixture.event_stem(number), sample_rate, STEM_SUBTYPE)
    if config.plots:
        from finelap.synth.plots import plot_timeline

        plot_timeline(out_dir / "plots" / f"{audio_id}.png", mixture, sample_rate, caption)

    first_onset = {label: spans[0][0] for label, spans in mixture.segments.items()}
    phrases = [
        {"phrase": label, "segments": [span(s, e) for s, e in mixture.segments[label]]}
        for label in sorted(mixture.segments, key=lambda label: (first_onset[label], label))
    ]
    metadata = {"audio_id": audio_id, "audio_path": f"audio/{filename}", "caption": caption, "phrases": phrases}
    details = {
        "audio_id": audio_id,
        "audio_path": f"audio/{filename}",
        "duration": len(mixture.audio) / sample_rate,
        "sample_rate": sample_rate,
        "mixture_gain": mixture.mixture_gain,
        "caption": caption,
        "background": {
            "label": mixture.background.label,
            "name": mixture.background.name,
            "source": mixture.background.source.path,
            "source_location": mixture.background.source.location,
            "offset_s": mixture.background.offset / sample_rate,
            "rms_dbfs": mixture.background.dbfs,
            "gain": mixture.background.gain,
            "stem": background_stem_path,
        },
        "events": [
            {
                "label": event.label,
                "name": event.name,
                "source": event.source.path,
                "source_location": event.source.location,
                "crop_start_s": (event.source.start + event.crop_start) / sample_rate,
                "length_s": event.length / sample_rate,
                "snr_db": event.snr_db,
                "gain": event.gain,
                "placements": [span(s, s + event.length) for s in event.starts],
                "stem": stem_path,
            }
            for event, stem_path in zip(mixture.events, stem_paths)
        ],
    }
    ground_truth = [
        [filename, onset, offset, phrase["phrase"]] for phrase in phrases for onset, offset in phrase["segments"]
    ]
    ground_truth.sort(key=lambda row: (row[1], row[3]))
    fragment = {"metadata": metadata, "details": details, "ground_truth": ground_truth}
    write_text_atomic(out_dir / "fragments" / f"{audio_id}.json", json.dumps(fragment))


# ---------------------------------------------------------------- sources


def _read_sources(path: Path) -> dict:
    """sources.json -> {"events": [SourceClip], "backgrounds": [SourceClip], "names": {label: [words]}}."""
    data = json.loads(path.read_text(encoding="utf-8"))

    def clips(rows: list[dict]) -> list[SourceClip]:
        return [SourceClip(**{**row, "labels": tuple(row["labels"])}) for row in rows]

    return {"events": clips(data["events"]), "backgrounds": clips(data["backgrounds"]), "names": data["names"]}


def _names(bank: PhraseBank, labels: set[str]) -> dict[str, list[str]]:
    """label -> the cluster name and alternatives a caption may use for it."""
    names = {}
    for label in sorted(labels):
        if label in bank:
            cluster = bank.cluster_of(label)
            words = [bank.cluster_name(cluster), *bank.alternatives(cluster)]
            names[label] = list(dict.fromkeys(words))
        else:
            names[label] = [label]
    return names


def _settings_fingerprint(config: SynthConfig, sources_text: str) -> dict:
    """What fixes the content of every mixture; a resumed run must match it."""
    settings = asdict(config)
    # where things are and how the run goes do not change a mixture; the sources' digest covers the inputs
    for key in ("num_mixtures", "workers", "progress", "out_dir", "events_index", "backgrounds_index"):
        settings.pop(key)
    for key in ("phrase_bank", "on_bad_sample", "on_empty_class"):
        settings.pop(key)
    settings["sources_sha256"] = hashlib.sha256(sources_text.encode()).hexdigest()
    return json.loads(json.dumps(settings))


def _check_resume(out_dir: Path, fingerprint: dict) -> None:
    path = out_dir / "synth_config.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != fingerprint:
            keys = set(previous) | set(fingerprint)
            changed = sorted(key for key in keys if previous.get(key) != fingerprint.get(key))
            raise SynthError(
                f"{out_dir} holds mixtures made with other settings (differing: {', '.join(changed)}); "
                "use a new output folder or delete this one"
            )
    write_text_atomic(path, json.dumps(fingerprint, indent=1) + "\n")


# ---------------------------------------------------------------- the run


def run_synthesis(config: SynthConfig) -> SynthSummary:
    """Make `config.num_mixtures` mixtures into `config.out_dir` (resuming what is there)."""
    began = time.perf_counter()
    config.mix.validate()
    if config.subtype not in WAV_SUBTYPES:
        raise SynthError(f"subtype {config.subtype!r}: choose one of {', '.join(WAV_SUBTYPES)}")
    if config.num_mixtures < 0 or config.workers < 1:
        raise SynthError("num_mixtures must be >= 0 and workers >= 1")
    load_captioner(config.captioner)  # fail now, not in a worker
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skips = SkipCounter()
    bank, bank_errors = PhraseBank.check(config.phrase_bank) if config.phrase_bank else (PhraseBank(), [])

    pool = None
    if config.workers > 1:
        # spawn: workers start clean (no forked torch threads) on every platform
        pool = multiprocessing.get_context("spawn").Pool(config.workers, initializer=_init_worker, initargs=(config,))
        worker = None
    else:
        worker = _Worker(config)
    try:
        # every line and clip is checked before anything is made, so all problems are reported at once
        check = check_sources(
            [(config.events_index, "event"), (config.backgrounds_index, "background")],
            lambda tasks: pool.imap(_examine_task, tasks, chunksize=8) if pool else map(worker.examine, tasks),
            config.progress,
        )
        problems = [error.as_problem() for error in bank_errors] + check.problems
        if problems and config.on_bad_sample != "skip":
            raise InputProblems(problems)
        for problem in problems:
            skips.record(Skip(problem.location, problem.kind, f"{problem.location}: {problem.message}"))
        event_entries = [entry for entry, role in check.entries if role == "event"]
        accepted, rejected = check.accepted, check.rejected
        for rejection in rejected:
            logger.info("rejected %s (%s): %s", rejection.location, rejection.reason, rejection.detail)
        survival = _event_survival(event_entries, accepted["event"], rejected, skips)
        refuse_or_warn(survival, config.on_empty_class, "event sources", "--on-empty-class", SynthError)
        for role, index_path in (("event", config.events_index), ("background", config.backgrounds_index)):
            if not accepted[role]:
                reasons = Counter(r.reason for r in rejected)
                raise SynthError(f"{index_path}: no usable {role} clip (rejected: {dict(reasons)}, skipped: {skips.counts})")

        labels = {label for clips in accepted.values() for clip in clips for label in clip.labels}
        sources = {
            "events": [asdict(clip) for clip in accepted["event"]],
            "backgrounds": [asdict(clip) for clip in accepted["background"]],
            "names": _names(bank, labels),
        }
        sources_text = json.dumps(sources, indent=1) + "\n"
        _check_resume(out_dir, _settings_fingerprint(config, sources_text))
        write_text_atomic(out_dir / "sources.json", sources_text)

        fragments = out_dir / "fragments"
        pending = [i for i in range(config.num_mixtures) if not (fragments / f"{config.audio_id(i)}.json").is_file()]
        mixtures_began = time.perf_counter()
        done = pool.imap_unordered(_make_task, pending, chunksize=4) if pool else map(worker.make, pending)
        initial = config.num_mixtures - len(pending)
        progress_off = None if config.progress else True  # None: tqdm shows bars only on a terminal
        for _ in tqdm(done, total=config.num_mixtures, initial=initial, desc="mixtures", disable=progress_off):
            pass
        mixture_seconds = time.perf_counter() - mixtures_began
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    report = _assemble(config, bank, accepted, rejected, skips, survival)
    seconds = time.perf_counter() - began
    return SynthSummary(out_dir, config.num_mixtures, len(pending), seconds, mixture_seconds, report)


def _event_survival(
    entries: list[IndexEntry], accepted: list[SourceClip], rejected: list[Rejection], skips: SkipCounter
) -> LabelSurvival:
    """Per event class: the index entries listing it, and those accepted (each dropped one with why)."""
    kept = {clip.location for clip in accepted}
    why = {
        rejection.location: f"{rejection.location}: {rejection.path}: rejected ({rejection.reason}: {rejection.detail})"
        for rejection in rejected
    }
    why.update({entry["key"]: entry["message"] for entry in skips.listed})
    survival = LabelSurvival()
    for entry in entries:
        if entry.location in kept:
            survival.keep(entry.labels)
        else:
            survival.drop(entry.labels, why.get(entry.location, f"{entry.location}: {entry.path}: not usable"))
    return survival


def _assemble(
    config: SynthConfig, bank: PhraseBank, accepted, rejected: list[Rejection], skips: SkipCounter,
    survival: LabelSurvival,
) -> dict:
    """Write metadata, TSVs, phrase bank, details, evaluation files and report from the fragments, in index order."""
    out_dir = Path(config.out_dir)
    fragments = [
        json.loads((out_dir / "fragments" / f"{config.audio_id(index)}.json").read_text(encoding="utf-8"))
        for index in range(config.num_mixtures)
    ]
    metadata = "".join(json.dumps(fragment["metadata"]) + "\n" for fragment in fragments)
    details = "".join(json.dumps(fragment["details"]) + "\n" for fragment in fragments)
    ground_truth = "".join(
        "\t".join(map(str, row)) + "\n" for fragment in fragments for row in fragment["ground_truth"]
    )
    durations = "".join(
        f"{Path(fragment['details']['audio_path']).name}\t{fragment['details']['duration']}\n" for fragment in fragments
    )
    write_text_atomic(out_dir / "metadata.jsonl", metadata)
    write_text_atomic(out_dir / "mixtures.jsonl", details)
    write_text_atomic(out_dir / "ground_truth.tsv", "filename\tonset\toffset\tevent_label\n" + ground_truth)
    write_text_atomic(out_dir / "durations.tsv", "filename\tduration\n" + durations)

    used_labels = sorted({event["label"] for fragment in fragments for event in fragment["details"]["events"]})
    clusters = {bank.cluster_of(label) for label in used_labels}
    write_text_atomic(
        out_dir / "phrase_bank.jsonl",
        "".join(
            json.dumps({"phrase": bank.cluster_name(cluster), "alternatives": list(bank.alternatives(cluster))}) + "\n"
            for cluster in sorted(clusters)
        ),
    )
    _write_evaluation_files(out_dir, fragments, sorted({label for clip in accepted["event"] for label in clip.labels}))
    report = {
        "mixtures": config.num_mixtures,
        "accepted": {"events": len(accepted["event"]), "backgrounds": len(accepted["background"])},
        "rejected": dict(sorted(Counter(rejection.reason for rejection in rejected).items())),
        "skipped": skips.counts,
        "mixtures_scaled_to_peak_limit": sum(1 for fragment in fragments if fragment["details"]["mixture_gain"] < 1.0),
        "event_sources_per_class": survival.as_dict(),
        "rejections": [asdict(rejection) for rejection in rejected],
        "skips": skips.listed,
    }
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def _write_evaluation_files(out_dir: Path, fragments: list[dict], classes: list[str]) -> None:
    """classes.txt, labels.jsonl (mixtures with one event class) and eval.yaml, whose tasks read this
    folder's files: `finelap eval --model MODEL --config OUT/eval.yaml` from any working directory."""
    write_text_atomic(out_dir / "classes.txt", "".join(label + "\n" for label in classes))
    single = [fragment["metadata"] for fragment in fragments if len(fragment["metadata"]["phrases"]) == 1]
    labels_path = out_dir / "labels.jsonl"
    if single:
        write_text_atomic(labels_path, "".join(
            json.dumps({"audio_path": metadata["audio_path"], "label": metadata["phrases"][0]["phrase"]}) + "\n"
            for metadata in single
        ))
    else:
        labels_path.unlink(missing_ok=True)  # an earlier run's, made with other mixtures
    tasks = []
    if fragments:
        tasks.append({"name": "retrieval", "type": "retrieval", "metadata": "metadata.jsonl"})
    if single:
        tasks.append({"name": "zero_shot", "type": "zero_shot", "metadata": "labels.jsonl", "classes": "classes.txt"})
    if any(fragment["metadata"]["phrases"] for fragment in fragments):
        tasks.append({"name": "sed", "type": "sed", "metadata": "ground_truth.tsv", "durations": "durations.tsv",
                      "audio_root": "audio", "classes": "classes.txt"})
        tasks.append({"name": "grounding", "type": "grounding", "metadata": "metadata.jsonl",
                      "durations": "durations.tsv"})
    if not tasks:
        (out_dir / "eval.yaml").unlink(missing_ok=True)  # no mixture to evaluate on
        return
    header = (
        "# Evaluation on this synthetic set, written by `finelap synth`:\n"
        "#   finelap eval --model MODEL_DIR --config THIS_FILE --out DIR\n"
        "# root: paths below are relative to this file's folder.\n"
    )
    write_text_atomic(out_dir / "eval.yaml", header + yaml.safe_dump({"root": ".", "tasks": tasks}, sort_keys=False))
