"""Bad input: problems named by file and line, skipped samples, and the labels that skips leave empty.

Training data, synthesis and evaluation all read their files through this module and report through it:
- `read_json_lines` reads every JSON-lines input; `json_object` and `MetadataError` word a bad line's
  problem after its `file:line`, and `Problem` / `format_problems` list every finding of a check.
- Under `on_bad_sample: skip` a bad sample is left out: logged once (the first time it fails), counted
  once per reason and kept with its reason, message and, in training, the epoch and batch where it
  failed (`Skip`, `SkipCounter`); `gather_skips` gives every training rank the skips of all.
- Skipping can take away every item of a label (every source clip of an event class, every training
  clip of a phrase): `LabelSurvival` counts per label the items listed and kept, and `refuse_or_warn`
  stops naming each empty label, its files and why each was dropped (`on_empty_class: error`) or logs
  one loud warning line per label (`warn`).

It imports nothing of finelap.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

# skips and empty labels are logged under the name they have always had, which log settings select
logger = logging.getLogger("finelap.data")

ON_EMPTY_CLASS = ("error", "warn")


# ---------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """A finding of validation: errors make a record unusable, warnings are repaired or tolerated."""

    location: str  # file:line
    kind: str  # short reason, e.g. "inverted_segment"
    message: str
    severity: str = "error"  # "error" | "warning"


class MetadataError(ValueError):
    """A line of an input file (training metadata, phrase bank, source index) is unusable; the message
    starts with `file:line:`."""

    def __init__(self, location: str, reason: str, problem: str) -> None:
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.reason = reason
        self.problem = problem
        # the phrases the unusable line names, as far as they could be read (the metadata reader fills them
        # in): what skipping the line costs each phrase label
        self.phrases: tuple[str, ...] = ()

    def as_problem(self) -> Problem:
        """This error as a validation finding (severity error)."""
        return Problem(self.location, self.reason, self.problem)


def format_problems(problems: list[Problem]) -> str:
    """Every problem on its own line, grouped by kind (errors first, file order within a kind),
    then a table of the count per kind with its first locations, then the totals."""
    ordered = sorted(problems, key=lambda problem: (problem.severity != "error", problem.kind))
    lines = [f"{problem.location}: {problem.severity}: {problem.kind}: {problem.message}" for problem in ordered]
    by_kind: dict[tuple[str, str], list[str]] = {}
    for problem in ordered:
        by_kind.setdefault((problem.severity, problem.kind), []).append(problem.location)
    rows = [("severity", "kind", "count", "first locations")]
    rows += [
        (severity, kind, str(len(locations)), ", ".join(locations[:3]) + (" ..." if len(locations) > 3 else ""))
        for (severity, kind), locations in by_kind.items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines.append("")
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows]
    errors = sum(problem.severity == "error" for problem in problems)
    lines.append(f"\n{errors} errors, {len(problems) - errors} warnings")
    return "\n".join(lines)


# ---------------------------------------------------------------- JSON lines


def read_json_lines(path: str | Path) -> Iterator[tuple[str, object]]:
    """(file:line, the line's JSON value) for each non-blank line of a JSON-lines file, in file order;
    a line that is not JSON gives its json.JSONDecodeError as the value, and reading goes on."""
    path = Path(path)
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                value = error
            yield f"{path}:{number}", value


def json_object(value: object, location: str, what: str) -> dict:
    """A value of `read_json_lines` as a dict; MetadataError naming `location` (file:line) when the line
    is not JSON ("malformed_json") or not a JSON object ("wrong_type"; `what` names the line's kind)."""
    if isinstance(value, json.JSONDecodeError):
        raise MetadataError(location, "malformed_json", f"malformed JSON: {value.msg} (column {value.colno})")
    if not isinstance(value, dict):
        raise MetadataError(location, "wrong_type", f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- skips


@dataclass(frozen=True)
class Skip:
    """One dropped sample: `key` names it (file:line or the audio path), `reason` is a short kind."""

    key: str
    reason: str
    message: str


class SkipCounter:
    """Distinct skipped samples, counted per reason and listed in the order they were first skipped."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._listed: list[dict] = []  # {"key", "reason", "message"} and "epoch", "batch" when known

    def record(self, skip: Skip, epoch: int | None = None, batch: int | None = None) -> None:
        """Count and list `skip` unless its sample was skipped before; `epoch` and `batch` say where in training."""
        if skip.key in self._seen:
            return
        entry = {"key": skip.key, "reason": skip.reason, "message": skip.message}
        if epoch is not None:
            entry["epoch"] = epoch
        if batch is not None:
            entry["batch"] = batch
        self._add(entry)
        logger.warning("skipping sample (%s): %s", skip.reason, skip.message)

    def _add(self, entry: dict) -> None:
        self._seen.add(entry["key"])
        self._counts[entry["reason"]] += 1
        self._listed.append(dict(entry))

    @property
    def counts(self) -> dict[str, int]:
        """{reason: number of distinct samples skipped for it}."""
        return dict(sorted(self._counts.items()))

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def keys(self) -> set[str]:
        """The keys of every skipped sample."""
        return set(self._seen)

    @property
    def listed(self) -> list[dict]:
        """Every skipped sample as {"key", "reason", "message"} (plus "epoch", "batch" in training), first skip first."""
        return [dict(entry) for entry in self._listed]

    def write_jsonl(self, path: str | Path) -> Path:
        """Write `listed` to `path`, one JSON object per line, replacing the file in one step."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text("".join(json.dumps(entry) + "\n" for entry in self._listed), encoding="utf-8")
        os.replace(temporary, path)
        return path

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run neither re-logs, re-counts, re-lists nor loses a skip."""
        return {"seen": sorted(self._seen), "counts": dict(self._counts), "listed": self.listed}

    def load_state_dict(self, state: dict) -> None:
        self._seen = set(state["seen"])
        self._counts = Counter(state["counts"])
        # checkpoints written before skips were listed hold only "seen" and "counts"
        self._listed = [dict(entry) for entry in state.get("listed", [])]

    def merge(self, state: dict) -> None:
        """Add the listed skips of another counter's `state_dict` (another rank's) that this one lacks."""
        for entry in state.get("listed", []):
            if entry["key"] not in self._seen:
                self._add(entry)


def gather_skips(skips: SkipCounter) -> None:
    """Give every rank's counter the skips of all ranks (collective: every rank must call it).

    The result is the same on every rank (rank 0's skips first, then each other rank's new ones in
    rank order), so the checkpoint's copy, saved once for all ranks, holds every rank's skips.
    Without an initialised process group of more than one rank it does nothing.
    """
    # imported here, the one use of torch: only training gathers, and the file readers need not load it
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    states: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(states, skips.state_dict())
    merged = SkipCounter()
    merged.load_state_dict(states[0])
    for state in states[1:]:
        merged.merge(state)
    skips.load_state_dict(merged.state_dict())


# ---------------------------------------------------------------- labels left empty


@dataclass
class LabelSurvival:
    """Items (source clips, training clips) per label: listed, kept, and why each dropped one went."""

    listed: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # label -> one "file:line: why" per dropped item

    def keep(self, labels: Iterable[str]) -> None:
        """One usable item carrying `labels` (each distinct label counted once)."""
        for label in set(labels):
            self.listed[label] += 1
            self.kept[label] += 1

    def keep_counted(self, counts: Mapping[str, int]) -> None:
        """Many usable items at once: `counts` holds per label how many of them carry it."""
        self.listed.update(counts)
        self.kept.update(counts)

    def drop(self, labels: Iterable[str], why: str) -> None:
        """One listed item carrying `labels` that was dropped; `why` names its file and line and the reason."""
        for label in set(labels):
            self.listed[label] += 1
            self.dropped.setdefault(label, []).append(why)

    def dropping(self, items: Iterable[tuple[Iterable[str], str]]) -> LabelSurvival:
        """A copy in which more of the kept items are dropped: `items` holds (labels, why) for each."""
        survival = LabelSurvival(Counter(self.listed), Counter(self.kept), {k: list(v) for k, v in self.dropped.items()})
        for labels, why in items:
            for label in set(labels):
                survival.kept[label] -= 1
                survival.dropped.setdefault(label, []).append(why)
        return survival

    @property
    def empty(self) -> list[str]:
        """Labels that were listed but have no item left, sorted."""
        return sorted(label for label in self.listed if self.kept[label] <= 0)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """{label: {"listed": n, "kept": k}}, labels sorted (for report files)."""
        return {label: {"listed": self.listed[label], "kept": self.kept[label]} for label in sorted(self.listed)}

    def empty_messages(self, what: str) -> list[str]:
        """One message per empty label: `what` names the items ("event sources"), then why each was dropped."""
        return [
            f"'{label}': 0 of {self.listed[label]} {what} left: " + "; ".join(self.dropped.get(label, []))
            for label in self.empty
        ]


def survival_table(per_label: dict[str, dict[str, int]]) -> list[str]:
    """`LabelSurvival.as_dict()` as text: one line per label, kept / listed, the labels left with none marked."""
    width = max((len(label) for label in per_label), default=0)
    digits = max((len(str(counts["listed"])) for counts in per_label.values()), default=1)
    return [
        (f"  {label:<{width}}  {counts['kept']:>{digits}} / {counts['listed']:<{digits}}"
         + ("  <- none left" if not counts["kept"] else "")).rstrip()
        for label, counts in per_label.items()
    ]


def refuse_or_warn(
    survival: LabelSurvival, on_empty_class: str, what: str, setting: str, error: type[Exception] = ValueError
) -> None:
    """When a label has no item left: raise `error` naming every such label, its files and why each
    was dropped (`on_empty_class` "error"), or log one warning line per label ("warn").

    `what` names the items ("event sources", "training clips"), `setting` the option that chooses.
    """
    if on_empty_class not in ON_EMPTY_CLASS:
        raise ValueError(f"{setting} must be one of {list(ON_EMPTY_CLASS)}, got {on_empty_class!r}")
    messages = survival.empty_messages(what)
    if not messages:
        return
    if on_empty_class == "error":
        raise error(
            f"{len(messages)} label(s) have no {what} left ({setting} is 'error'; 'warn' goes on without them):\n  "
            + "\n  ".join(messages)
        )
    for message in messages:
        logger.warning("LABEL WITH NO %s LEFT: %s", what.upper(), message)
