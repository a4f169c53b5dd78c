"""This process's place in a training run: join the process group, pick the device and precision."""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from finelap.checkpoint import CONFIG_NAME
from finelap.config import Config, dump_config
from finelap.launchers import free_port, rank_environment

SHM_FOLDER = Path("/dev/shm")
DATA_MESSAGES = "finelap-data-messages"  # the name of the handler show_data_messages adds


@dataclass
class Runtime:
    """This process's place in the run: rank, device and precision, and the run folders."""

    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype
    use_bf16: bool
    output_dir: Path
    checkpoint_dir: Path
    local_rank: int = 0  # the rank among this node's processes
    node_rank: int = 0  # the node's rank (the launcher's; 0 on one node)
    host: str = ""  # this node's host name

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def set_up(config: Config) -> Runtime:
    """Join (or, run as one process, form) the process group, whichever launcher started this
    process (finelap.launchers); pick the device and precision; write the run's config beside its
    checkpoints."""
    on_gpu = torch.cuda.is_available()
    os.environ.update(rank_environment(os.environ, free_port))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    use_bf16 = config.deepspeed.precision == "bf16" or (config.deepspeed.precision == "auto" and on_gpu)
    output_dir = Path(config.train.output_dir)
    runtime = Runtime(rank, dist.get_world_size(), device, torch.bfloat16 if use_bf16 else torch.float32, use_bf16,
                      output_dir, output_dir / "checkpoints", local_rank, int(os.environ["NODE_RANK"]),
                      socket.gethostname())
    if rank == 0:
        runtime.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, runtime.checkpoint_dir / CONFIG_NAME)
    dist.barrier()
    if not on_gpu:
        unlink_shared_allreduce_buffer(rank)
    return runtime


def show_data_messages(rank: int) -> None:
    """Print the input's messages on this process's stderr, each led by its rank: a metadata or shard-offsets
    cache being written (minutes at millions of clips, on one process per node) or waited for, skipped samples,
    rebuilt shard indexes. Added once per process; the messages still reach any handler of the root logger."""
    data_logger = logging.getLogger("finelap.data")
    handler = next((handler for handler in data_logger.handlers if handler.get_name() == DATA_MESSAGES), None)
    if handler is None:
        handler = _CurrentStderr()
        handler.set_name(DATA_MESSAGES)
        data_logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    if data_logger.getEffectiveLevel() > logging.INFO:
        data_logger.setLevel(logging.INFO)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes, as logging's last resort does."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def unlink_shared_allreduce_buffer(rank: int) -> None:
    """Remove the shared-memory name DeepSpeed's CPU communicator creates for this rank when all
    ranks are local; DeepSpeed never does, so each CPU run would leave 69 MB of RAM per rank in
    /dev/shm until reboot. Call it after a barrier that follows init_distributed: by then every
    rank has mapped every buffer, and a mapping outlives its name."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (SHM_FOLDER / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)
