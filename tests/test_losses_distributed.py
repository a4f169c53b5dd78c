"""DualStreamSigmoidLoss on 2 gloo ranks equals one process over the concatenated batch.

Definition of correct for a data-parallel loss: after DeepSpeed averages the
ranks' gradients, training must be what one process over the concatenated
batch would do. So the mean of the ranks' losses, the logged global values,
the counts and the rank-averaged parameter gradients all equal the
single-process ones (fp32, relative error <= 1e-5).
"""

import pytest
import torch

from tests.distributed_loss_worker import SCENARIOS, WORLD_SIZE, concatenate, rank_shares, run_loss, worker
from tests.train_fixtures import spawn_ranks

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed_loss")
    return spawn_ranks(worker, out_dir, WORLD_SIZE, 240, "the 2-rank loss workers")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_match_one_process(rank_results, scenario):
    variant, loss_kwargs = SCENARIOS[scenario]
    expected = run_loss(*concatenate(rank_shares(variant)), loss_kwargs)
    ranks = [results[scenario] for results in rank_results]

    # The data-parallel average of the ranks' losses is the single-process loss.
    mean_loss = sum(rank["loss"] for rank in ranks) / WORLD_SIZE
    assert _relative_error(mean_loss, expected["loss"]) <= TOLERANCE
    for rank in ranks:
        assert _relative_error(rank["clip_loss"], expected["clip_loss"]) <= TOLERANCE
        assert _relative_error(rank["frame_loss"], expected["frame_loss"]) <= TOLERANCE
        assert rank["counts"] == expected["counts"]
    active_streams = {"clip_only": ["clip_loss"], "frame_only_batch": ["frame_loss"]}.get(
        scenario, ["clip_loss", "frame_loss"])
    for stream in active_streams:
        assert expected[stream] > 0

    # Gradients averaged over ranks (as DDP / DeepSpeed do) equal the single-process gradients.
    gradients = ranks[0]["gradients"]
    for name, expected_gradient in expected["gradients"].items():
        assert torch.equal(gradients[name], ranks[1]["gradients"][name]), name
        if expected_gradient.abs().max() > 0:
            assert _relative_error(gradients[name], expected_gradient) <= TOLERANCE, name
        else:
            assert gradients[name].abs().max() == 0, name
    streams_parameters = {"clip_only": ["audio.weight", "text.weight", "log_clip_scale", "clip_bias"],
                          "frame_only_batch": ["frame.weight", "text.weight", "log_frame_scale", "frame_bias"]}
    for name in streams_parameters.get(scenario, ["audio.weight", "frame.weight", "text.weight", "log_clip_scale",
                                                  "clip_bias", "log_frame_scale", "frame_bias"]):
        assert expected["gradients"][name].abs().max() > 0, name


def test_scenarios_cover_duplicates_uneven_ranks_and_a_rank_without_annotated_clips():
    mixed = [batch for _, batch in rank_shares("mixed")]
    assert set(mixed[0].phrase_id.tolist()) & set(mixed[1].phrase_id.tolist())
    assert len(mixed[0].captions) != len(mixed[1].captions)
    assert len(mixed[0].phrases) != len(mixed[1].phrases)
    unannotated = [batch for _, batch in rank_shares("rank1_unannotated")]
    assert not unannotated[1].annotated.any() and len(unannotated[1].phrases) == 0


@pytest.mark.distributed
def test_plain_all_gather_gives_wrong_gradients(rank_results):
    """The pitfall the autograd gather avoids: without it the text tower's gradient is wrong."""
    expected = run_loss(*concatenate(rank_shares("mixed")), dict(mode="clip_only"))["gradients"]
    naive = rank_results[0]["naive_gather_clip_only"]["gradients"]
    correct = rank_results[0]["clip_only"]["gradients"]
    assert _relative_error(correct["text.weight"], expected["text.weight"]) <= TOLERANCE
    assert _relative_error(naive["text.weight"], expected["text.weight"]) > 0.05
    # The audio side only reads local rows, so it is unaffected.
    assert _relative_error(naive["audio.weight"], expected["audio.weight"]) <= TOLERANCE
