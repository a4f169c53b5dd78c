"""HeterogeneousBatchSampler: annotated share, source mixing, disjoint ranks, determinism, resume."""
import math

import numpy
import pytest

from finelap.data.sampler import HeterogeneousBatchSampler

# 3 sources: 300 caption-only clips, 100 clips of which 20 annotated, 40 annotated clips
SOURCE_OF = numpy.repeat([0, 1, 2], [300, 100, 40])
ANNOTATED = numpy.zeros(440, dtype=bool)
ANNOTATED[300:320] = True
ANNOTATED[400:] = True


def make(rank=0, world_size=2, batch_size=16, fraction=0.25, seed=7, weights=(1.0, 1.0, 1.0)):
    return HeterogeneousBatchSampler(
        SOURCE_OF, ANNOTATED, weights, batch_size, rank=rank, world_size=world_size,
        annotated_fraction=fraction, seed=seed,
    )


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_length_and_annotated_fraction_per_rank_batch():
    for fraction in (0.25, 0.5, 0.1):
        for rank in (0, 1):
            sampler = make(rank=rank, fraction=fraction)
            batches = epoch_batches(sampler, 0)
            assert len(batches) == len(sampler) == 440 // 32
            for batch in batches:
                assert len(batch) == 16
                assert ANNOTATED[batch].sum() >= math.ceil(fraction * 16)


def test_ranks_take_disjoint_slots_of_the_same_global_batch():
    plans = [epoch_batches(make(rank=rank), 1) for rank in (0, 1)]
    whole = make().plan(1)
    for step, (first, second) in enumerate(zip(*plans)):
        assert first == whole[step, 0].tolist() and second == whole[step, 1].tolist()
    # 16 annotated + 48 caption-only clips, 4 ranks x 4 clips, 1 annotated slot: each stream is
    # used exactly once per epoch, so the epoch is a permutation and ranks never share a clip
    annotated = numpy.arange(64) < 16
    ranks = [HeterogeneousBatchSampler(numpy.zeros(64, dtype=int), annotated, [1.0], 4, rank=r, world_size=4, seed=3)
             for r in range(4)]
    batches = [epoch_batches(sampler, 0) for sampler in ranks]
    assert sorted(i for rank in batches for batch in rank for i in batch) == list(range(64))
    assert all(annotated[batch].sum() == 1 for rank in batches for batch in rank)


def test_annotated_slots_follow_the_weighted_share_when_larger():
    # source 1: 20 % annotated, source 2: all annotated; equal weights -> p = (0 + 0.2 + 1) / 3 = 0.4
    assert make(fraction=0.25).annotated_slots == round(0.4 * 16)
    assert make(fraction=0.5).annotated_slots == 8
    assert make(weights=(1.0, 0.0, 0.0)).annotated_slots == 0  # annotated clips only in weight-0 sources


def test_deterministic_per_seed_and_epoch():
    assert epoch_batches(make(), 3) == epoch_batches(make(), 3)
    assert epoch_batches(make(), 3) != epoch_batches(make(), 4)
    assert epoch_batches(make(), 3) != epoch_batches(make(seed=8), 3)


def test_sources_are_mixed_by_weight():
    sampler = make(world_size=1, batch_size=40, fraction=0.0, weights=(1.0, 3.0, 0.0))
    drawn = numpy.concatenate([sampler.plan(epoch).ravel() for epoch in range(20)])
    shares = numpy.bincount(SOURCE_OF[drawn], minlength=3) / len(drawn)
    assert shares == pytest.approx([0.25, 0.75, 0.0], abs=0.02)
    # a stream uses every clip once before any again: source 1's 20 annotated clips fill 6 slots per batch
    plan = sampler.plan(0)
    assert sampler.annotated_slots == 6  # weighted annotated share (0 * 1 + 0.2 * 3) / 4 = 0.15 of 40
    annotated_stream = plan[:, :, :6].ravel()
    for start in range(0, len(annotated_stream) - 19, 20):
        assert sorted(annotated_stream[start : start + 20]) == list(range(300, 320))
    caption_only = plan[:, :, 6:].ravel()
    source_zero = caption_only[SOURCE_OF[caption_only] == 0]
    assert len(set(source_zero.tolist())) == len(source_zero)  # fewer draws than clips: no repeats


def test_single_source_epoch_is_a_permutation():
    sampler = HeterogeneousBatchSampler(numpy.zeros(64, dtype=int), numpy.zeros(64, dtype=bool), [1.0], 8,
                                        rank=0, world_size=2, seed=1)
    assert sorted(sampler.plan(0).ravel().tolist()) == list(range(64))


def test_resumed_sampler_yields_exactly_the_remaining_batches():
    full = epoch_batches(make(rank=1), 2)
    interrupted = make(rank=1)
    interrupted.set_epoch(2)
    iterator = iter(interrupted)
    done = [next(iterator) for _ in range(5)]
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["position"] == 5

    resumed = make(rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop's usual call keeps the restored position
    assert done + list(resumed) == full
    assert list(resumed) == []  # the epoch is over until the next set_epoch
    resumed.set_epoch(3)
    assert list(resumed) == epoch_batches(make(rank=1), 3)


def test_restore_rejects_another_layout_and_tiny_sets():
    state = make(world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size = 2, this run has 4"):
        make(world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="440 samples cannot fill one global batch of 256 x 2 ranks"):
        make(batch_size=256)


def test_without_annotated_clips_no_slots_are_reserved():
    sampler = HeterogeneousBatchSampler(numpy.zeros(32, dtype=int), numpy.zeros(32, dtype=bool), [1.0], 8,
                                        annotated_fraction=0.5)
    assert sampler.annotated_slots == 0 and len(list(sampler)) == 4
