"""Rank discovery under each launcher, and the scaling sweep's checks and arithmetic."""
from __future__ import annotations

import json
import os

import pytest

from finelap import scaling
from finelap.launchers import first_host, rank_environment


def _no_port():
    raise AssertionError("a launched rank must not pick a port of its own")


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[07-09,12],cpu3", "gpu07"), ("node1,node2", "node1"), ("a-b[001-004]x", "a-b001x"),
    ("single", "single"), ("127.0.0.1", "127.0.0.1"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_variables_become_the_rendezvous_variables():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
               "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_JOB_ID": "123456"}
    assert rank_environment(environ, _no_port) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "NODE_RANK": "2", "MASTER_ADDR": "gpu03",
        "MASTER_PORT": "23456"}  # 20000 + job id mod 10000: the same on every node of the job
    environ.update(MASTER_ADDR="login1", MASTER_PORT="29500")
    chosen = rank_environment(environ, _no_port)
    assert (chosen["MASTER_ADDR"], chosen["MASTER_PORT"]) == ("login1", "29500")


def test_launcher_variables_are_kept_and_the_node_rank_named():
    torchrun = {"RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "GROUP_RANK": "3", "MASTER_ADDR": "h",
                "MASTER_PORT": "1"}
    assert rank_environment(torchrun, _no_port) == {"NODE_RANK": "3"}
    assert rank_environment({"RANK": "0"}, _no_port) == {"NODE_RANK": "0"}


def test_a_lone_process_is_a_world_of_one():
    assert rank_environment({}, lambda: 4321) == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "NODE_RANK": "0",
                                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "4321"}


def test_scaling_refuses_more_ranks_than_devices_before_running(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    code = scaling.main(["--config", "configs/train/tiny_cpu.yaml", "--ranks", "1", str(cores + 1),
                         "--results", str(tmp_path)])
    assert code == 2
    assert f"--ranks [{cores + 1}] ask for more ranks than this machine has: {cores} CPU core(s)" in \
        capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(scaling.ScalingError, match="positive"):
        scaling.check_ranks([0, 1], "cpu", 2)


def test_scaling_table_from_the_runs_profiles(tmp_path):
    def breakdown(ranks, global_rate, step, communication):
        return {"global_samples_per_s": global_rate, "seconds_per_step": step,
                "phases_seconds_per_step": {"forward": step / 2, "communication": communication},
                "slowest_rank": {"rank": ranks - 1, "host": "h", "phase": "data_wait", "seconds": 0.02,
                                 "median_seconds": 0.01}}

    rows = scaling.summarise({2: breakdown(2, 30.0, 0.5, 0.1), 1: breakdown(1, 20.0, 0.4, 0.0)})
    assert [row["ranks"] for row in rows] == [1, 2]
    assert rows[1]["per_device_samples_per_s"] == 15.0
    assert rows[1]["efficiency"] == 15.0 / 20.0
    assert rows[1]["communication_share"] == pytest.approx(0.2)
    meta = {"date": "2026-01-01", "device": "cpu-test", "steps": 3, "command": "finelap bench scaling ...", "note": ""}
    stem = scaling.write_results(rows, meta, tmp_path)
    assert json.loads(stem.with_suffix(".json").read_text())["rows"] == rows
    table = stem.with_suffix(".md").read_text()
    assert "| 2 | 30.00 | 15.00 | 75.0% | 0.500 | 20.0% | rank 1 on h: data_wait 20.0 ms (median 10.0 ms) |" in table
    assert stem.with_suffix(".png").stat().st_size > 0
