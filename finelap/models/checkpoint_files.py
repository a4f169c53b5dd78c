"""Reading weights made elsewhere (EAT, the reference FineLAP) safely, and the one error for them.

Such checkpoints are pickles. They are read with `torch.load(weights_only=True)`, which builds
only tensors and plain containers; the few other globals a fairseq checkpoint needs (numpy
scalars and dtypes in its saved training metrics) are allowed by name, anything else is refused
before any of the file is unpickled.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy
import safetensors.torch
import torch
from safetensors import SafetensorError


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, a global that is not allowed, a missing key, a shape
    mismatch or keys nothing reads. The message names the file and the key(s)."""


def _allowed_globals() -> dict[str, object]:
    """Global name in a pickle -> the object it may resolve to: numpy scalars and dtypes only."""
    core = numpy._core if hasattr(numpy, "_core") else numpy.core  # numpy 2 moved numpy.core to numpy._core
    scalar = core.multiarray.scalar  # pickles name it by the module of the numpy that wrote them
    allowed = {"numpy.core.multiarray.scalar": scalar, "numpy._core.multiarray.scalar": scalar,
               "numpy.dtype": numpy.dtype}
    for name in dir(numpy.dtypes):
        value = getattr(numpy.dtypes, name)
        if isinstance(value, type) and issubclass(value, numpy.dtype):
            allowed[f"numpy.dtypes.{name}"] = value
    return allowed


def load_torch_checkpoint(path: str | Path) -> dict:
    """The object saved in a torch checkpoint file (a mapping), on the CPU, without running its code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (OSError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt, or older than torch's zip format?): "
            f"{error}"
        ) from None
    allowed = _allowed_globals()
    refused = sorted(name for name in found if name not in allowed)
    if refused:
        raise CheckpointError(
            f"{path}: refusing to load: the checkpoint names {', '.join(refused)}, which loading would run "
            "(only tensors, plain containers and numpy scalars are read)"
        )
    try:
        # all of them, not only the globals named: rebuilding a numpy dtype also builds its DType class
        with torch.serialization.safe_globals([(value, name) for name, value in allowed.items()]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {error}") from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, got {type(checkpoint).__name__}")
    return checkpoint


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming the file when it cannot be read."""
    try:
        return safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     source_names: Mapping[str, str] | None = None) -> None:
    """Raise CheckpointError unless `state` has exactly `module`'s state-dict keys with the same shapes.

    `source_names`: our name -> the name in the file, for the messages (default: the same).
    """
    def named(keys):
        return ", ".join((source_names or {}).get(key, key) for key in keys)

    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        raise CheckpointError(f"{source}: missing {named(missing)}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {named(unexpected)}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: {named([key])} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
