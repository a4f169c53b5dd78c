"""Per-label survival: how many items of each label were listed and how many are left after skips.

Skipping bad inputs (`on_bad_sample: skip`), or the synthesis energy filter,
can take away every source clip of an event class or every training clip of
a phrase. A label left with nothing would then be missing from the data
without a word, so synthesis and training count, per label, the items listed
and the items kept, and a label left with none is an error naming it, its
files and why each was dropped (`on_empty_class: error`, the default), or one
loud warning line per label (`on_empty_class: warn`).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

logger = logging.getLogger("finelap.data")

ON_EMPTY_CLASS = ("error", "warn")


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
