"""--profile: the phase breakdown covers every profiled step, the torch.profiler trace only the
first --profile-trace-steps; MFU's flop count of matrix products."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from finelap.checkpoint import FINISHED_NAME
from finelap.profiling import matmul_flops
from finelap.training.profile import slowest_rank
from tests.train_fixtures import run_training, write_training_set


def test_matmul_flops_counts_linear_and_attention():
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    assert matmul_flops(lambda: linear(x)) == 2 * 3 * 16 * 8
    # [batch 2, heads 4, 5 queries, depth 6] against 7 keys: Q K^T and the weighted sum of V
    query, key, value = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 7, 6), torch.randn(2, 4, 7, 6)
    assert matmul_flops(lambda: F.scaled_dot_product_attention(query, key, value)) == 2 * (2 * 2 * 4 * 5 * 7 * 6)


@pytest.mark.distributed
def test_profile_times_every_step_and_traces_a_few(tmp_path):
    data = write_training_set(tmp_path / "tones", clips=8)
    out = tmp_path / "run"
    result = run_training(data, out, 1, "data.batch_size=2", "deepspeed.zero_stage=0", "train.epochs=5",
                          "train.max_steps=20", "train.save_every=100",
                          extra_args=("--profile", "--profile-steps", "3", "--profile-trace-steps", "1",
                                      "--profile-loss-backends", "reference", "chunked"))
    # profiling ended the run at step 5 of 20: it says so and does not mark the run finished
    assert "--profile: stopped at step 5 of 20 after profiling" in result.stdout
    assert not (out / FINISHED_NAME).exists()
    report = json.loads((out / "profile" / "breakdown.json").read_text())
    assert report["steps_profiled"] == 3 and report["steps_traced"] == 1
    phases = report["phases_seconds_per_step"]
    assert {"data_wait", "forward", "loss", "backward", "optimizer_step"} <= set(phases)
    assert 0 < report["mfu"] and report["forward_flops_per_step"] > 0
    # the other loss backends timed on the profiled steps' embeddings, outside the step's time
    compared = report["loss_backends_seconds_per_step"]
    assert set(compared) == {"reference", "chunked"} and all(seconds > 0 for seconds in compared.values())
    assert not any(name.startswith("loss_backend") for name in phases)
    assert "loss forward + backward on the step's embeddings" in result.stdout
    # where the start-up went, up to the end of the first step
    startup = report["startup_seconds"]
    assert list(startup) == ["imports, config and input check", "distributed set-up", "model",
                             "data loader", "DeepSpeed engine", "first step"]
    assert all(seconds >= 0 for seconds in startup.values()) and startup["imports, config and input check"] > 0
    assert "start-up: the first step ended" in result.stdout
    # the run stops after 2 warm-up + 3 profiled steps, with no checkpoint (max_steps is far)
    assert [record["step"] for record in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())] == [
        1, 2, 3, 4, 5]
    [trace] = list((out / "profile").glob("*.pt.trace.json"))
    steps = {event["name"] for event in json.loads(trace.read_text())["traceEvents"]
             if str(event.get("name", "")).startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2"}
    # one rank: its own entry, the global rate from its clips and wall time, itself the slowest
    [entry] = report["ranks"]
    assert (entry["rank"], entry["node_rank"], entry["local_rank"], entry["clips"]) == (0, 0, 0, 3 * 2)
    assert report["global_samples_per_s"] == entry["clips"] / entry["wall_seconds"] == entry["samples_per_s"]
    assert report["slowest_rank"]["rank"] == 0


def _rank(rank: int, communication: float, **phases: float) -> dict:
    phases = {"data_wait": 0.01, "feature_extraction": 0.02, "forward": 0.10, "audio_encode": 0.06, "loss": 0.03,
              "backward": 0.2, "optimizer_step": 0.05, **phases, "communication": communication}
    step = sum(seconds for name, seconds in phases.items() if name not in ("audio_encode", "communication"))
    return {"rank": rank, "host": f"node-{rank // 2}", "phases_seconds_per_step": phases, "seconds_per_step": step}


def test_the_slowest_rank_is_the_one_the_others_wait_for():
    """Ranks in lockstep: rank 2's slow feature extraction makes the others wait in collectives
    (in loss and backward, and so in their communication time); rank 2 is named, with its phase."""
    ranks = [_rank(0, 0.30, loss=0.13, backward=0.30), _rank(1, 0.31, loss=0.12, backward=0.31),
             _rank(2, 0.05, feature_extraction=0.22), _rank(3, 0.29, loss=0.14, backward=0.29)]
    assert slowest_rank(ranks) == {"rank": 2, "host": "node-1", "phase": "feature_extraction", "seconds": 0.22,
                                   "median_seconds": 0.02}
    # two ranks: the median lies halfway, yet the waiting rank's own work is the shorter
    assert slowest_rank([_rank(0, 0.45, loss=0.43), _rank(1, 0.05, data_wait=0.41)])["rank"] == 1
    # all alike: the first rank, at its longest phase
    assert slowest_rank([_rank(0, 0.1), _rank(1, 0.1)])["phase"] == "backward"
