"""Forward + backward speed and peak extra memory of the sigmoid-loss backends.

    python benchmarks/bench_loss.py --device cpu                 # CPU target sweep
    python benchmarks/bench_loss.py --device cuda                # GPU target sweep
    python benchmarks/bench_loss.py --device cpu --preset smoke  # seconds, checks the script

Times are medians of forward+backward (CUDA events after warm-up on GPU,
time.perf_counter on CPU). Peak extra memory is what a run adds on top of
its inputs: torch.cuda.max_memory_allocated on GPU; on CPU each backend runs
in a fresh subprocess and the peak RSS (VmHWM, reset through clear_refs) is
compared with the RSS before the run. Flop rates count 6 * M * N * D (the
forward logits matmul and the two gradient matmuls). On CUDA the script also
measures the bf16 matmul rate of the device (a large torch.mm). Results go to
benchmarks/results/bench_loss_<date>_<device>.{json,md}; the table is printed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from finelap.kernels import clip_problem, clip_sigmoid_loss, frame_problem, frame_sigmoid_loss, reference, registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (stream, M, N, D, K): frame stream rows are frames and columns unique phrases with K
# active clusters per frame; the clip stream has N captions over M clips.
PRESETS = {
    "cpu": [("frame", 16384, 4096, 256, 2), ("frame", 4096, 1024, 256, 2), ("clip", 4096, 4096, 256, 1)],
    "cuda": [("frame", 65536, 8192, 512, 2), ("frame", 16384, 4096, 512, 2), ("clip", 32768, 32768, 512, 1)],
    "gpu-check": [("frame", 65536, 8192, 512, 2), ("frame", 65536, 8192, 1024, 2), ("clip", 16384, 16384, 512, 1),
                  ("frame", 16384, 4096, 512, 2)],
    "smoke": [("frame", 300, 70, 24, 2), ("clip", 64, 96, 16, 1)],
}
# The GPU targets: sizes where the chunked-GEMM backends must beat torch.compile of the eager loss.
TARGET_BACKENDS = tuple(registry.CHUNKED_GEMM_BACKENDS)
GPU_TARGET_SIZES = [("frame", 65536, 8192, 512), ("frame", 65536, 8192, 1024), ("clip", 16384, 16384, 512)]
GPU_TARGET_WORKSPACE_MIB = 256
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_inputs(stream, M, N, D, K, dtype, device, seed=0):
    """Keyword arguments of the loss (embeddings L2-normalised) and the tensors needing gradients."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = F.normalize(torch.randn(M, D, device=device, generator=generator), dim=1).to(dtype)
    columns = F.normalize(torch.randn(N, D, device=device, generator=generator), dim=1).to(dtype)
    scale = torch.tensor(10.0, device=device)
    bias = torch.tensor(-10.0, device=device)
    leaves = [rows, columns, scale, bias]
    for leaf in leaves:
        leaf.requires_grad_()
    if stream == "clip":
        groups = torch.arange(M, device=device)
        return dict(audio=rows, text=columns, audio_group=groups, text_group=torch.arange(N, device=device) % M,
                    scale=scale, bias=bias), leaves
    num_clusters = max(1, N // 2)  # about two phrases (synonyms) per cluster
    phrase_cluster = torch.randint(0, num_clusters, (N,), device=device, generator=generator)
    frame_active = torch.randint(0, num_clusters, (M, K), device=device, generator=generator)
    frame_active[torch.rand(M, K, device=device, generator=generator) < 0.3] = -1  # silent slots
    return dict(frames=rows, phrases=columns, phrase_cluster=phrase_cluster, frame_active=frame_active,
                scale=scale, bias=bias), leaves


def default_backends(device, dtype_name):
    """Every registered backend that takes `device` embeddings of that dtype; on CUDA also 'compiled'."""
    return [*registry.supporting(device, DTYPES[dtype_name]), *(["compiled"] if device == "cuda" else [])]


def loss_function(stream, backend):
    """A callable(**inputs) -> loss for a backend name ('compiled' = torch.compile of the reference backend)."""
    if backend == "compiled":
        problem = clip_problem if stream == "clip" else frame_problem
        compiled = torch.compile(reference.sigmoid_loss, dynamic=False)
        return lambda **inputs: compiled(problem(**inputs))
    public = clip_sigmoid_loss if stream == "clip" else frame_sigmoid_loss
    return lambda **inputs: public(**inputs, backend=backend)


def forward_backward(function, inputs, leaves):
    for leaf in leaves:
        leaf.grad = None
    loss = function(**inputs)
    loss.backward()
    return loss


def _tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _cuda_time_ms(run, repeats):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cpu_time_ms(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_cuda(stream, M, N, D, K, dtype, backend, warmup, repeats):
    """One backend at one size on the current CUDA device."""
    inputs, leaves = make_inputs(stream, M, N, D, K, dtype, "cuda")
    function = loss_function(stream, backend)
    for _ in range(warmup):
        forward_backward(function, inputs, leaves)
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = forward_backward(function, inputs, leaves)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    gradients = [leaf.grad.detach().float().clone() for leaf in leaves]
    time_ms = _cuda_time_ms(lambda: forward_backward(function, inputs, leaves), repeats)
    return dict(time_ms=time_ms, extra_bytes=extra, input_bytes=_tensor_bytes(inputs.values()),
                gradient_bytes=_tensor_bytes(leaves), loss=float(loss.detach())), gradients


def _rss_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_cpu_worker(stream, M, N, D, K, dtype, backend, repeats):
    """Runs in a fresh process: peak RSS delta of one forward+backward, then the median time."""
    function = loss_function(stream, backend)
    small, small_leaves = make_inputs(stream, 8, 8, 8, K, dtype, "cpu")
    forward_backward(function, small, small_leaves)  # loads libraries, builds/loads extensions
    inputs, leaves = make_inputs(stream, M, N, D, K, dtype, "cpu")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    baseline = _rss_bytes("VmRSS")
    loss = forward_backward(function, inputs, leaves)
    extra = _rss_bytes("VmHWM") - baseline
    time_ms = _cpu_time_ms(lambda: forward_backward(function, inputs, leaves), repeats)
    return dict(time_ms=time_ms, extra_bytes=extra, input_bytes=_tensor_bytes(inputs.values()),
                gradient_bytes=_tensor_bytes(leaves), loss=float(loss.detach()))


def measure_cpu(stream, M, N, D, K, dtype_name, backend, repeats):
    """measure_cpu_worker in a fresh interpreter; glibc is told to return freed memory at once."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    command = [sys.executable, os.path.abspath(__file__), "--worker",
               json.dumps([stream, M, N, D, K, dtype_name, backend, repeats])]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "worker failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_tflops(dtype, size=8192, repeats=30):
    """Median rate of a [size, size] @ [size, size] torch.mm on the current CUDA device."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(5):
        torch.mm(a, b)
    time_ms = _cuda_time_ms(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / (time_ms * 1e-3) / 1e12


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return platform.processor() or "cpu"


def _relative_difference(got, want):
    return max(((g - w).abs().max() / w.abs().max().clamp(min=1e-30)).item() for g, w in zip(got, want))


def run_sweep(args):
    dtype = DTYPES[args.dtype]
    rows, chunked_gradients = [], {}
    report = dict(device=device_name(args.device), device_type=args.device, dtype=args.dtype,
                  torch=torch.__version__, date=datetime.date.today().isoformat(), rows=rows)
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    from finelap.kernels import triton_gemm_sigmoid_loss
    report["triton_gemm_tuning"] = {name: os.environ.get(name) for name in (
        triton_gemm_sigmoid_loss.TILES_ENV, triton_gemm_sigmoid_loss.PASS_ENV,
        *triton_gemm_sigmoid_loss.MAX_CHUNK_ROWS_ENV.values()) if os.environ.get(name)}
    if args.device == "cuda":
        report["matmul_tflops"] = matmul_tflops(dtype)
        print(f"{args.dtype} torch.mm rate on {report['device']}: {report['matmul_tflops']:.1f} TFLOP/s", flush=True)
    sizes = [tuple(size) for size in args.sizes] if args.sizes else PRESETS[args.preset]
    for stream, M, N, D, K in sizes:
        for backend in args.backends:
            entry = dict(stream=stream, M=M, N=N, D=D, K=K, dtype=args.dtype, backend=backend)
            try:
                if args.device == "cuda":
                    result, gradients = measure_cuda(stream, M, N, D, K, dtype, backend, args.warmup, args.repeats)
                    size = (stream, M, N, D, K)
                    if backend == "chunked":  # fp32 arithmetic: the yardstick for the other backends
                        chunked_gradients[size] = gradients
                    elif size in chunked_gradients:
                        result["max_rel_diff_vs_chunked"] = _relative_difference(gradients, chunked_gradients[size])
                    del gradients
                    torch.cuda.empty_cache()
                else:
                    result = measure_cpu(stream, M, N, D, K, args.dtype, backend, args.repeats)
                entry.update(result)
                entry["tflops_6mnd"] = 6 * M * N * D / (entry["time_ms"] * 1e-3) / 1e12
                entry["peak_vs_inputs_plus_gradients"] = ((entry["input_bytes"] + entry["extra_bytes"])
                                                          / (entry["input_bytes"] + entry["gradient_bytes"]))
            except Exception as error:  # one backend failing (e.g. out of memory) must not end the sweep
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(entry)
            print(_format_row(entry, rows), flush=True)
            _write(report, args)
    report["targets"] = check_targets(report)
    return report, _write(report, args)


def _reference_row(entry, rows):
    for other in rows:
        if other["backend"] == "reference" and all(other[k] == entry[k] for k in ("stream", "M", "N", "D", "K")):
            return other
    return None


def _speedup(entry, rows):
    ref = _reference_row(entry, rows)
    if ref is None or "time_ms" not in ref or "time_ms" not in entry:
        return None
    return ref["time_ms"] / entry["time_ms"]


def _format_row(entry, rows):
    head = (f"{entry['stream']:5s} {entry['M']:>6d} {entry['N']:>6d} {entry['D']:>4d} {entry['K']:>2d} "
            f"{entry['backend']:11s}")
    if "error" in entry:
        return f"{head} ERROR {entry['error']}"
    speedup = _speedup(entry, rows)
    diff = entry.get("max_rel_diff_vs_chunked")
    return (f"{head} {entry['time_ms']:10.2f} ms {entry['tflops_6mnd']:7.3g} TFLOP/s "
            f"extra {entry['extra_bytes'] / 2**20:9.1f} MiB  "
            f"peak/(in+grad) {entry['peak_vs_inputs_plus_gradients']:5.2f}"
            + (f"  x{speedup:.2f} vs ref" if speedup else "")
            + (f"  diff {diff:.1e}" if diff is not None else ""))


def check_targets(report):
    """The issue's targets at the target size, as (name, value, bound, passed) lines."""
    rows = [r for r in report["rows"] if "error" not in r]
    checks = []

    def find(backend, size):
        return next((r for r in rows
                     if r["backend"] == backend and (r["stream"], r["M"], r["N"], r["D"]) == size), None)

    if report["device_type"] == "cpu":
        size = ("frame", 16384, 4096, 256)
        cpp, ref = find("cpp", size), find("reference", size)
        if cpp and ref:
            checks.append(("cpp extra memory / reference", cpp["extra_bytes"] / ref["extra_bytes"], "<= 0.05"))
            checks.append(("cpp time / reference", cpp["time_ms"] / ref["time_ms"], "<= 0.7"))
    else:
        for size, backend in [(size, backend) for size in GPU_TARGET_SIZES for backend in TARGET_BACKENDS]:
            fused, compiled = find(backend, size), find("compiled", size)
            name = "{} {} {}x{}x{}".format(backend, *size)
            if fused:
                checks.append((f"{name}: 6MND rate / bf16 matmul rate",
                               fused["tflops_6mnd"] / report["matmul_tflops"], ">= 0.45"))
                checks.append((f"{name}: extra MiB beyond the gradients",
                               (fused["extra_bytes"] - fused["gradient_bytes"]) / 2**20,
                               f"<= {GPU_TARGET_WORKSPACE_MIB}"))
            if fused and compiled:
                checks.append((f"{name}: time / torch.compile(reference) time",
                               fused["time_ms"] / compiled["time_ms"], "<= 0.75"))
    return [dict(name=name, value=value, target=bound,
                 passed=(value <= float(bound[3:])) if bound.startswith("<=") else (value >= float(bound[3:])))
            for name, value, bound in checks]


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _write(report, args):
    out_dir = args.out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"bench_loss_{report['date']}_{_slug(report['device'])}")
    with open(stem + ".json", "w") as handle:
        json.dump(report, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(report))
    return [stem + ".json", stem + ".md"]


def markdown(report):
    lines = [f"# Sigmoid-loss backends, forward + backward, {report['device']} ({report['date']})", "",
             f"torch {report['torch']}, triton {report['triton']}, inputs {report['dtype']}."]
    if "matmul_tflops" in report:
        lines.append(f"Measured {report['dtype']} torch.mm rate: {report['matmul_tflops']:.1f} TFLOP/s.")
    if report.get("triton_gemm_tuning"):
        lines.append(f"triton_gemm / triton_pass tuning from the sweep: {report['triton_gemm_tuning']}.")
    lines += ["", "| stream | M | N | D | K | backend | median ms | TFLOP/s (6MND) | peak extra MiB "
              "| peak / (inputs + grads) | speed-up vs reference |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        size = f"| {r['stream']} | {r['M']} | {r['N']} | {r['D']} | {r['K']} | {r['backend']} |"
        if "error" in r:
            lines.append(f"{size} error: {r['error']} | | | | |")
            continue
        speedup = _speedup(r, report["rows"])
        lines.append(f"{size} {r['time_ms']:.2f} | {r['tflops_6mnd']:.3g} | {r['extra_bytes'] / 2**20:.1f} "
                     f"| {r['peak_vs_inputs_plus_gradients']:.2f} | {'' if speedup is None else f'{speedup:.2f}x'} |")
    if report.get("targets"):
        lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {t['value']:.3f} | {t['target']} | {'yes' if t['passed'] else 'NO'} |"
                  for t in report["targets"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="size list (default: the device's)")
    parser.add_argument("--sizes", type=lambda text: [s if i == 0 else int(s) for i, s in enumerate(text.split(","))],
                        nargs="+", help="explicit sizes as stream,M,N,D,K (overrides --preset)")
    parser.add_argument("--backends", nargs="+", help="default: the device's backends for --dtype")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--warmup", type=int, default=3, help="CUDA warm-up runs")
    parser.add_argument("--repeats", type=int, help="timed runs (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--out-dir", help=f"where JSON and Markdown go (default {RESULTS_DIR})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset = args.preset or args.device
    args.dtype = args.dtype or DEFAULT_DTYPE[args.device]
    args.backends = args.backends or default_backends(args.device, args.dtype)
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        stream, M, N, D, K, dtype_name, backend, repeats = json.loads(args.worker)
        print(json.dumps(measure_cpu_worker(stream, M, N, D, K, DTYPES[dtype_name], backend, repeats)))
        return 0
    report, files = run_sweep(args)
    print()
    print(markdown(report))
    print("written:", " ".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
