"""Where a trainer process learns its rank: from whichever standard launcher started it.

- the DeepSpeed launcher (`deepspeed --num_gpus N` or `--hostfile H`) and
  torchrun (`--nnodes N --node-rank K --rdzv-endpoint HOST:PORT`) set RANK,
  LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, used as they are, and
  the node's rank as CROSS_RANK (DeepSpeed) or GROUP_RANK (torchrun);
- SLURM's `srun` sets SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS),
  SLURM_LOCALID and SLURM_NODEID; the first host of SLURM_JOB_NODELIST is the rendezvous host
  (MASTER_ADDR if set), MASTER_PORT if set else one derived from the job id;
- none of them (`python finelap/train.py`): a world of one process.
"""
from __future__ import annotations

import re
import socket
from collections.abc import Mapping

SLURM_PORT_BASE = 20000  # srun without MASTER_PORT: 20000 + job id mod 10000, the same on every node


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous on it (the OS picks one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if match is None or not match.group(1):
        raise ValueError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def rank_environment(environ: Mapping[str, str], free_port) -> dict[str, str]:
    """The rendezvous variables torch.distributed reads (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) and NODE_RANK, for the launcher that started this process;
    `free_port()` is called only for a world of one process."""
    if "RANK" in environ:  # the DeepSpeed launcher, torchrun, or a user who set them
        for name in ("GROUP_RANK", "CROSS_RANK", "NODE_RANK", "SLURM_NODEID"):
            if name in environ:
                return {"NODE_RANK": environ[name]}
        return {"NODE_RANK": "0"}
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", ""))
        address = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        port = environ.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % 10000)
        world_size = environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"])  # the srun step's tasks
        return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": world_size,
                "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"), "NODE_RANK": environ.get("SLURM_NODEID", "0"),
                "MASTER_ADDR": address, "MASTER_PORT": port}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": environ.get("MASTER_PORT") or str(free_port())}
