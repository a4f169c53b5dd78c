"""Samples dropped under `on_bad_sample: skip`: counted, listed and written out.

Each skipped sample is logged once (the first time it fails), counted once
per reason (the counts go to the training log) and kept with its reason,
message and, in training, the epoch and batch where it failed, so that
`write_jsonl` can list every one of them in a machine-readable file.
DataLoader workers are separate processes, so they return their skips
beside each batch and the main process records them here; each rank
records its own, and `gather_skips` gives every rank the skips of all.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("finelap.data")


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
