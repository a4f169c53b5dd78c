"""Crash-safe training checkpoints on top of DeepSpeed's own.

DeepSpeed writes the model, optimizer and scheduler states of every rank
(`engine.save_checkpoint`). We add what an exact resume also needs
(sampler position, RNG states, skip counters, step counters) as its
client state, and a `COMPLETE` marker that rank 0 writes only after every
rank has finished writing. `--resume` picks the newest tag that has the
marker, so a process killed while writing leaves a tag that is ignored.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

# The run folder (train.output_dir):
#   checkpoints/config.yaml             the run's full config (rebuilds the model for export)
#   checkpoints/stepNNNNNNNNN/          one tag: DeepSpeed's files, rng_rankNNNNN.pt per rank,
#                                       module.safetensors under ZeRO-0, COMPLETE written last
#   finished.json                       written last by a run that ended normally
COMPLETE_MARKER = "COMPLETE"
CONFIG_NAME = "config.yaml"
# Under ZeRO-0, DeepSpeed keeps the module inside a pickled file that needs arbitrary unpickling to
# read; this safetensors copy of the fp32 weights is what `finelap export` reads instead.
ZERO0_MODULE_NAME = "module.safetensors"
FINISHED_NAME = "finished.json"
FULL_DISK_HEADROOM = 2**20  # bytes: a write that failed with less than this left free failed for want of space
_TAG = re.compile(r"^step(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step{step:09d}"


def complete_tags(checkpoint_dir: str | Path) -> list[str]:
    """Tags under `checkpoint_dir` that finished writing, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=lambda name: int(_TAG.match(name).group(1)))


def latest_complete_tag(checkpoint_dir: str | Path) -> str | None:
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


def rng_state() -> dict:
    """Every random generator a training step draws from, for this rank, as plain
    tensors and numbers (so it loads with torch.load(weights_only=True))."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state.tolist()), gauss))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointSpaceError(OSError):
    """The disk cannot hold the next checkpoint; the message (`strerror`) names the folder, the free and
    the needed space, the newest complete checkpoint and how to go on. `on_every_rank`: every rank
    raised the same error (the check before writing), rather than only the rank whose write failed."""

    def __init__(self, message: str, on_every_rank: bool):
        super().__init__(errno.ENOSPC, message)
        self.on_every_rank = on_every_rank


def save(engine, checkpoint_dir: str | Path, step: int, client_state: dict, module_weights: bool = False) -> str:
    """Save a checkpoint of every rank, then mark it complete. Collective: all ranks call it.

    `client_state` (sampler position, counters) is the same on every rank; RNG states
    differ per rank, so each rank writes its own small file beside DeepSpeed's.
    `module_weights` (ZeRO-0): rank 0 also writes the module's fp32 weights as safetensors.

    Before writing, every rank checks that its disk has room for the checkpoint (see
    `needed_bytes`), and all stop together with a CheckpointSpaceError when one has not. A write
    that fails all the same (the disk filled meanwhile) removes the incomplete tag folder, so it
    holds no space, and raises CheckpointSpaceError when the disk is full; the launcher then ends
    the other ranks.
    """
    tag = tag_for_step(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    checkpoint_dir = Path(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    needed, basis = needed_bytes(engine, checkpoint_dir)
    _check_space_on_every_rank(engine.device, checkpoint_dir, tag, needed, basis)
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        if module_weights and rank == 0:  # before the COMPLETE marker, so a complete ZeRO-0 tag always has it
            state = {name: value.detach().float().contiguous() for name, value in engine.module.state_dict().items()}
            save_file(state, str(tag_dir / ZERO0_MODULE_NAME))
        _atomic_torch_save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
        _barrier()
        if rank == 0:
            marker = tag_dir / COMPLETE_MARKER
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, marker)
    except Exception as error:
        written = folder_bytes(tag_dir)
        free = shutil.disk_usage(checkpoint_dir).free
        shutil.rmtree(tag_dir, ignore_errors=True)
        # torch's writer reports a full disk as a RuntimeError without errno ("unexpected pos ..."): a disk
        # left with less than the rest of the checkpoint, or next to nothing, was full
        if _disk_full(error) or free < max(needed - written, FULL_DISK_HEADROOM):
            cause = (str(error).strip().splitlines() or [""])[0]
            raise CheckpointSpaceError(_space_message(
                f"the disk filled while saving checkpoint {tag} in {checkpoint_dir} ({type(error).__name__}: "
                f"{cause}); the incomplete {tag_dir} was removed", checkpoint_dir, free, needed, basis),
                on_every_rank=False) from error
        error.add_note(f"saving checkpoint {tag} failed; the incomplete {tag_dir} was removed")
        raise
    _barrier()
    return tag


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (0 when it does not exist)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def needed_bytes(engine, checkpoint_dir: Path) -> tuple[int, str]:
    """(bytes the next checkpoint needs, what that number is): the size of the newest complete
    checkpoint, which the next one repeats; before the first, a lower bound from the parameter and
    optimizer bytes (the weights in their dtype, an fp32 master copy of low-precision trainable
    weights and Adam's two fp32 moments), which a write that fails all the same still reports."""
    previous = latest_complete_tag(checkpoint_dir)
    if previous is not None:
        return folder_bytes(checkpoint_dir / previous), f"the size of the previous checkpoint {previous}"
    total = 0
    for parameter in engine.module.parameters():
        numel = getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 holds a shard; ds_numel is the whole
        total += numel * parameter.element_size()
        if parameter.requires_grad:
            total += numel * (8 + (4 if parameter.element_size() < 4 else 0))
    return total, "an estimate from the parameter and optimizer bytes"


def _check_space_on_every_rank(device: torch.device, checkpoint_dir: Path, tag: str, needed: int, basis: str) -> None:
    """Every rank compares the free space of its checkpoint folder with `needed`; all raise the same
    CheckpointSpaceError when one is short (collective, before anything is written)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    mine = torch.tensor([shutil.disk_usage(checkpoint_dir).free, needed], dtype=torch.float64, device=device)
    ranks = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(ranks, mine)
    for rank, (free, rank_needed) in enumerate(value.tolist() for value in ranks):
        if free < rank_needed:
            where = f" on rank {rank}" if len(ranks) > 1 else ""
            raise CheckpointSpaceError(_space_message(
                f"not enough free space to save checkpoint {tag} in {checkpoint_dir}{where}; nothing was written",
                checkpoint_dir, int(free), int(rank_needed), basis), on_every_rank=True)


def _space_message(what: str, checkpoint_dir: Path, free: int, needed: int, basis: str) -> str:
    latest = latest_complete_tag(checkpoint_dir)
    resume = (f"The newest complete checkpoint is {checkpoint_dir / latest}: make room (or set train.keep_last), "
              f"then continue from it with --resume." if latest is not None else
              "There is no complete checkpoint yet: make room, then start the run again.")
    return f"{what}. Free: {_size(free)}; needed: about {_size(needed)} ({basis}). {resume}"


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _disk_full(error: BaseException) -> bool:
    """True when `error`, or an error it came from, is ENOSPC: an OSError with that errno, or the
    system's message for it inside another library's error (safetensors reports it so)."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_finished(output_dir: str | Path, step: int, total_steps: int, stopped_by: str) -> None:
    """Mark the run as ended normally at `step` of `total_steps`; `stopped_by` names what ended it:
    "max_minutes" (the time budget, before `total_steps`), "max_steps" or "epochs"."""
    path = Path(output_dir) / FINISHED_NAME
    path.write_text(json.dumps({"step": step, "total_steps": total_steps, "stopped_by": stopped_by}) + "\n")


def read_finished(output_dir: str | Path) -> dict | None:
    """What `write_finished` wrote ({"step", "total_steps", "stopped_by"}), or None for a run that did not end."""
    path = Path(output_dir) / FINISHED_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def remove_older(checkpoint_dir: str | Path, keep: int) -> list[str]:
    """Delete every complete checkpoint but the newest `keep` (train.keep_last); returns their tags.

    Only complete tags count and go: a half-written newer tag is never what a resume would use.
    """
    old = complete_tags(checkpoint_dir)[:-keep]
    for tag in old:
        shutil.rmtree(Path(checkpoint_dir) / tag)
    return old


def load(engine, checkpoint_dir: str | Path, tag: str | None = None) -> dict:
    """Load the given (or newest complete) tag into `engine`; restore this rank's RNG.

    Returns the client state saved with it. Raises FileNotFoundError when there is none.
    """
    tag = tag or latest_complete_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir} (a tag needs its {COMPLETE_MARKER} marker)")
    tag_dir = Path(checkpoint_dir) / tag
    if not (tag_dir / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir} is incomplete (no {COMPLETE_MARKER} marker): it was interrupted while writing")
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: was this checkpoint written with a different number of ranks?")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
