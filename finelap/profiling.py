"""Where a training step's time goes: per-phase wall time, communication, MFU.

`PhaseTimer` times named phases of the step (synchronising the device so
asynchronous GPU work is charged to the phase that launched it);
`module_phase_hooks` charges a submodule's forward to a phase;
`communication_seconds` sums collective ops found in a torch.profiler trace;
`matmul_flops` counts the matrix-product flops of a call, the numerator of MFU;
`matmul_peak_flops` measures the device's dense matmul rate, the denominator of MFU;
`gather_json` brings every rank's numbers to every rank (one collective, no pickle).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

_COLLECTIVE_NAMES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "allreduce", "allgather", "reducescatter", "barrier")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates seconds per phase over the steps it is enabled for."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        _synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def per_step(self) -> dict[str, float]:
        """Mean seconds per step for each phase seen."""
        steps = max(self.steps, 1)
        return {name: total / steps for name, total in self.seconds.items()}


def module_phase_hooks(module: torch.nn.Module, timer: PhaseTimer, name: str) -> list:
    """Charge `module`'s forward passes to phase `name` of `timer`. Returns the hook handles."""
    state = {}

    def before(_module, _inputs):
        if timer.enabled:
            _synchronize(timer.device)
            state["start"] = time.perf_counter()

    def after(_module, _inputs, _output):
        if timer.enabled and "start" in state:
            _synchronize(timer.device)
            timer.seconds[name] += time.perf_counter() - state.pop("start")

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def communication_seconds(profiler) -> float:
    """Seconds spent in collective operations (gloo/NCCL all-reduce, all-gather, ...) according to a
    finished torch.profiler run, per profiled step is up to the caller. A collective inside another
    (c10d's op around the backend's) is counted once, as the outermost."""
    def collective(event) -> bool:
        return any(name in event.name.lower() for name in _COLLECTIVE_NAMES)

    total_us = 0.0
    for event in profiler.events():
        if not collective(event):
            continue
        parent = event.cpu_parent
        while parent is not None and not collective(parent):
            parent = parent.cpu_parent
        if parent is None:
            total_us += event.cpu_time_total if event.device_time_total == 0 else event.device_time_total
    return total_us / 1e6


def matmul_flops(call) -> int:
    """Flops of the matrix products (linear, convolution, attention) that `call()` runs.

    Counted at the dispatcher (torch.utils.flop_counter), where a product is seen once whatever
    Python wrappers call it: DeepSpeed's flops profiler, which patches torch functions, counts
    each linear layer twice under ZeRO-3 (its F.linear replacement calls the patched matmul).
    """
    from torch.utils.flop_counter import FlopCounterMode

    # CPU attention has its own op, absent from the counter's table in the releases we use
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    extra = {cpu_attention: _attention_flops} if cpu_attention is not None else {}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        call()
    return counter.get_total_flops()


def _attention_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    """Flops of softmax(Q K^T) V: [b, h, s_q, d] x [b, h, d, s_k], then [b, h, s_q, s_k] x [b, h, s_k, d_v]."""
    batch, heads, queries, depth = query_shape
    keys, value_depth = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (depth + value_depth)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 4096, repeats: int = 10) -> float:
    """Measured dense matmul rate (flop/s) of `device` in `dtype`: the MFU denominator."""
    device = torch.device(device)
    if device.type == "cpu":
        size = min(size, 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


def gather_json(value, device: torch.device) -> list:
    """Every rank's JSON-serialisable `value`, in rank order, on every rank (a collective: every rank
    calls it). Sent as UTF-8 bytes in tensors on the process group's device, never pickled."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    payload = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
    longest = max(int(size.item()) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    received = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(received, padded)
    return [json.loads(bytes(data[:int(size.item())].tolist()).decode()) for data, size in zip(received, sizes)]
