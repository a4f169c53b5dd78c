"""The trainer under the standard multi-node launchers, on this machine: two torchrun "nodes"
(one rank each, both local rank 0, rendezvous on 127.0.0.1) against the DeepSpeed launcher's
one-node two-rank run; two processes started as srun starts them (SLURM_* variables only),
one of them slowed on purpose, whose profile must name it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finelap.checkpoint import COMPLETE_MARKER, latest_complete_tag, tag_for_step
from tests.train_fixtures import REPO, environment, free_port, run_training, step_log, train_command, write_training_set

pytestmark = pytest.mark.distributed

STEPS = 3
COMMON = ("data.batch_size=4", "deepspeed.zero_stage=1", "train.epochs=2", f"train.max_steps={STEPS}",
          "train.save_every=1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_training_set(tmp_path_factory.mktemp("tones"))


@pytest.fixture(scope="module")
def one_node_run(data, tmp_path_factory):
    """The DeepSpeed launcher: one node, two ranks."""
    out = tmp_path_factory.mktemp("one_node")
    run_training(data, out, 2, *COMMON)
    return out


def _script_arguments(data: dict, out: Path, *overrides: str, extra_args: tuple = ()) -> list[str]:
    """train.py and its arguments, without the launcher."""
    return train_command(data, out, 1, *overrides, extra_args=extra_args)[1:]


def _run_processes(commands: list[list[str]], environments: list[dict], out: Path, timeout: int = 400) -> None:
    out.mkdir(parents=True, exist_ok=True)
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=open(out.parent / f"{out.name}_{index}.log", "w"),
                                  stderr=subprocess.STDOUT)
                 for index, (command, env) in enumerate(zip(commands, environments))]
    try:
        codes = [process.wait(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    if any(codes):
        logs = "\n".join((out.parent / f"{out.name}_{index}.log").read_text()[-3000:] for index in range(len(commands)))
        raise AssertionError(f"exit codes {codes}:\n{logs}")


def _two_torchrun_nodes(data: dict, out: Path, *overrides: str, extra_args: tuple = ()) -> None:
    """Two torchrun node launchers, one rank each (both local rank 0), c10d rendezvous on 127.0.0.1."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    endpoint = f"127.0.0.1:{free_port()}"
    script = _script_arguments(data, out, *overrides, extra_args=extra_args)
    commands = [[torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", out.name, *script]
                for node in range(2)]
    _run_processes(commands, [environment(), environment()], out)


def _losses(out: Path) -> dict[int, tuple[float, float]]:
    return {record["step"]: (record["clip_loss"], record["frame_loss"]) for record in step_log(out)}


def test_two_torchrun_nodes_match_one_node_and_resume(data, one_node_run, tmp_path):
    out = tmp_path / "two_nodes"
    _two_torchrun_nodes(data, out, *COMMON)
    assert _losses(out) == _losses(one_node_run)  # the same ranks, the same arithmetic: equal to the bit
    tag = latest_complete_tag(out / "checkpoints")
    assert tag == tag_for_step(STEPS)
    assert (out / "checkpoints" / tag / COMPLETE_MARKER).is_file()

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / tag_for_step(1), resumed / "checkpoints" / tag_for_step(1))
    _two_torchrun_nodes(data, resumed, *COMMON, extra_args=("--resume",))
    got = _losses(resumed)
    assert sorted(got) == [2, 3]
    assert all(got[step] == _losses(out)[step] for step in got)


def _srun_environment(rank: int, world_size: int, port: int) -> dict:
    """What srun gives each task of a two-node step (the rendezvous variables come from these alone)."""
    env = environment()
    for name in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_STEP_NUM_TASKS=str(world_size),
               SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="7",
               MASTER_PORT=str(port))
    return env


def test_srun_ranks_with_a_planted_straggler_are_profiled_by_rank(data, tmp_path):
    """Rank 1 waits 0.4 s for each batch (a test-only delay in its data loading): the profile
    lists both ranks with their node ranks and names rank 1 and data_wait as the slow one."""
    out = tmp_path / "srun"
    port = free_port()
    # 16 clips, 8 per step: 3 epochs hold the 2 warm-up and 3 profiled steps
    script = [sys.executable, *_script_arguments(data, out, "data.batch_size=4", "deepspeed.zero_stage=1",
                                                  "train.epochs=3", "train.max_steps=5",
                                                  extra_args=("--profile", "--profile-steps", "3",
                                                              "--profile-trace-steps", "1"))]
    environments = [_srun_environment(rank, 2, port) for rank in range(2)]
    environments[1]["FINELAP_PLANTED_DATA_DELAY"] = "1:0.4"
    _run_processes([script, script], environments, out)

    report = json.loads((out / "profile" / "breakdown.json").read_text())
    ranks = report["ranks"]
    assert report["steps_profiled"] == 3
    assert [entry["rank"] for entry in ranks] == [0, 1]
    assert [entry["node_rank"] for entry in ranks] == [0, 1]
    assert all(entry["local_rank"] == 0 and entry["host"] for entry in ranks)
    assert all(entry["phases_seconds_per_step"]["data_wait"] >= 0 for entry in ranks)
    assert ranks[1]["phases_seconds_per_step"]["data_wait"] >= 0.4
    assert ranks[0]["phases_seconds_per_step"]["data_wait"] < 0.4
    slowest = report["slowest_rank"]
    assert (slowest["rank"], slowest["phase"]) == (1, "data_wait")
    waits = [entry["phases_seconds_per_step"]["data_wait"] for entry in ranks]
    assert (slowest["seconds"], slowest["median_seconds"]) == (waits[1], (waits[0] + waits[1]) / 2)
    # clips of both ranks over the profiled steps' wall time; each rank trained 4 clips per step
    assert [entry["clips"] for entry in ranks] == [4 * 3, 4 * 3]
    assert report["global_samples_per_s"] == sum(entry["clips"] for entry in ranks) / max(
        entry["wall_seconds"] for entry in ranks)
    # every log record: the throughput of both ranks, and rank 1 waiting for data most
    for record in step_log(out):
        assert record["data_wait_slowest_rank"] == 1
        least = 2 * record["data_wait_share_median"] - record["data_wait_share_max"]  # two ranks: the other one's
        assert record["data_wait_share_max"] > 2 * least >= 0
