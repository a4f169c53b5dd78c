"""Distributed sampler that mixes sources by weight and guarantees annotated clips per batch.

Epoch plan, drawn from a generator seeded by (seed, epoch), identical on
every rank:
- An epoch is len(dataset) // (batch_size * world_size) global batches
  (as many samples as the dataset holds, the remainder dropped).
- Mixing by weight: a draw picks source s with probability proportional to
  its weight, then a clip of s. Annotated (frame-labelled) and caption-only
  clips are drawn from two separate streams: each rank's batch has
  A = max(ceil(annotated_fraction * batch_size), round(p * batch_size))
  annotated slots, p being the annotated share the weighted mixture would
  give, and batch_size - A caption-only slots; so at least the configured
  fraction of every rank's batch is annotated whenever the dataset has
  annotated clips. Within a stream a slot picks source s with probability
  proportional to weight_s * (its clips of that kind / its clips).
- Each source's stream takes its clips in a random order and reshuffles
  when it runs out: an up-weighted (or annotated-boosted) source repeats
  within an epoch, a down-weighted one is partly left out.
- Global batch b is an array [world_size, batch_size]; rank r takes row r,
  so ranks get disjoint slots of every global batch (an index can repeat
  only where a stream runs out and reshuffles inside one global batch).

Position: `state_dict()` holds (epoch, next global batch); a sampler loaded
from it yields exactly the batches that were not yet yielded. A DataLoader
prefetches, so checkpoint the loader's state (loader.py), which counts the
batches handed to training.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy


class HeterogeneousBatchSampler:
    """Yields this rank's batch of global sample indices (list[int]) for each global batch."""

    def __init__(
        self,
        source_of: numpy.ndarray,
        annotated: numpy.ndarray,
        source_weights: Sequence[float],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        annotated_fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        """source_of [N] int source index of each sample, annotated [N] bool, source_weights [num_sources]."""
        self.source_of = numpy.asarray(source_of, dtype=numpy.int64)
        self.annotated = numpy.asarray(annotated, dtype=bool)
        self.source_weights = numpy.asarray(source_weights, dtype=numpy.float64)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if not 0.0 <= annotated_fraction <= 1.0:
            raise ValueError(f"annotated_fraction {annotated_fraction} is not in [0, 1]")
        if (
            (self.source_weights < 0).any() or not numpy.isfinite(self.source_weights).all()
            or not self.source_weights.sum() > 0
        ):
            raise ValueError(f"source weights must be finite, >= 0 and not all 0, got {list(source_weights)}")
        # clips of weight-0 sources are never drawn
        self.drawable = self.source_weights[self.source_of] > 0
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.annotated_slots = self._annotated_slots(annotated_fraction)
        self.num_batches = len(self.source_of) // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{len(self.source_of)} samples cannot fill one global batch of "
                f"{batch_size} x {world_size} ranks = {batch_size * world_size}"
            )
        self.epoch = 0
        self.position = 0  # next global batch of this epoch

    def _annotated_slots(self, annotated_fraction: float) -> int:
        """A: annotated slots of each rank's batch (see the module docstring)."""
        if not (self.annotated & self.drawable).any():
            return 0
        if not (~self.annotated & self.drawable).any():
            return self.batch_size
        sizes = numpy.bincount(self.source_of, minlength=len(self.source_weights))
        annotated = numpy.bincount(self.source_of[self.annotated], minlength=len(self.source_weights))
        share = numpy.divide(annotated, sizes, out=numpy.zeros(len(sizes)), where=sizes > 0)
        weights = self.source_weights * (sizes > 0)
        natural = float((weights * share).sum() / weights.sum())
        slots = max(math.ceil(annotated_fraction * self.batch_size), round(natural * self.batch_size))
        return min(slots, self.batch_size)

    def __len__(self) -> int:
        """Global batches per epoch (each rank yields one batch per global batch)."""
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed,
            "batch_size": self.batch_size, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key} = {state[key]}, this run has {getattr(self, key)}: "
                    "the epoch plan would differ, so the position cannot be restored"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan(self.epoch)
        while self.position < self.num_batches:
            batch = plan[self.position, self.rank].tolist()
            self.position += 1
            yield batch

    def plan(self, epoch: int) -> numpy.ndarray:
        """[num_batches, world_size, batch_size] int64 sample indices of the whole epoch, annotated slots first."""
        rng = numpy.random.default_rng([self.seed, epoch])
        slots = self.num_batches * self.world_size
        annotated = self._draw(rng, self.annotated & self.drawable, slots * self.annotated_slots)
        captioned = self._draw(rng, ~self.annotated & self.drawable, slots * (self.batch_size - self.annotated_slots))
        shape = (self.num_batches, self.world_size, -1)
        return numpy.concatenate([annotated.reshape(shape), captioned.reshape(shape)], axis=2)

    def _draw(self, rng: numpy.random.Generator, eligible: numpy.ndarray, count: int) -> numpy.ndarray:
        """`count` indices among `eligible` samples: sources by weight x eligible share, streams reshuffled per pass."""
        if count == 0:
            return numpy.zeros(0, dtype=numpy.int64)
        pools = [numpy.flatnonzero(eligible & (self.source_of == s)) for s in range(len(self.source_weights))]
        sizes = numpy.bincount(self.source_of, minlength=len(pools))
        weights = numpy.array([w * len(pool) / max(size, 1) for w, pool, size in zip(self.source_weights, pools, sizes)])
        chosen_source = rng.choice(len(pools), size=count, p=weights / weights.sum())
        drawn = numpy.empty(count, dtype=numpy.int64)
        for source, pool in enumerate(pools):
            where = numpy.flatnonzero(chosen_source == source)
            passes = math.ceil(len(where) / len(pool)) if len(pool) else 0
            stream = [rng.permutation(pool) for _ in range(passes)]
            drawn[where] = numpy.concatenate(stream)[: len(where)] if stream else []
        return drawn
