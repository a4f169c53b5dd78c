"""Counting samples dropped under `on_bad_sample: skip`.

Each skipped sample is logged once (the first time it fails) and counted
once per reason; the counts go to the training log. DataLoader workers are
separate processes, so they return their skips beside each batch and the
main process records them here.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger("finelap.data")


@dataclass(frozen=True)
class Skip:
    """One dropped sample: `key` names it (file:line or the audio path), `reason` is a short kind."""

    key: str
    reason: str
    message: str


class SkipCounter:
    """Distinct skipped samples per reason; logs each sample the first time it is skipped."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._counts: Counter[str] = Counter()

    def record(self, skip: Skip) -> None:
        if skip.key in self._seen:
            return
        self._seen.add(skip.key)
        self._counts[skip.reason] += 1
        logger.warning("skipping sample (%s): %s", skip.reason, skip.message)

    @property
    def counts(self) -> dict[str, int]:
        """{reason: number of distinct samples skipped for it}."""
        return dict(sorted(self._counts.items()))

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run neither re-logs nor re-counts a skip."""
        return {"seen": sorted(self._seen), "counts": dict(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        self._seen = set(state["seen"])
        self._counts = Counter(state["counts"])
