"""Maps over worker processes whose results come back in input order, for the data commands
(`finelap data validate`, `finelap data pack`): what they print and write is the same for any
number of workers.

Workers are forked where the platform can (Linux): they start in milliseconds, where spawned
ones would import torch again (seconds each), and the jobs are short (one audio file, one shard).
Each runs torch on one thread, so that N workers use N cores.
"""
from __future__ import annotations

import multiprocessing
import os
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")
OrderedMap = Callable[[Callable[[Item], Result], Iterable[Item]], Iterator[Result]]


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _one_thread() -> None:
    torch.set_num_threads(1)


@contextmanager
def ordered_map(workers: int, chunksize: int = 1) -> Iterator[OrderedMap]:
    """A `map(function, items)` that runs on `workers` processes (in this one for 1) and yields the
    results in the order of `items`; a job's exception is raised where its result would be.
    `function` must be picklable (a module-level function); `chunksize` jobs travel together."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        yield map
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_one_thread) as pool:
        yield lambda function, items: pool.imap(function, items, chunksize=chunksize)
