"""Times each candidate launch config of the triton loss backends at one size (CUDA).

    python benchmarks/gpu_tune_loss.py [--backend triton_gemm|triton] [--size M N D K]
                                       [--dtype bfloat16] [--budget SECONDS] [--out DIR]

triton_gemm (default; also sweeps triton_pass): first the time of each part at the
default configs (phase_times), then per launch config (triton_gemm: BLOCK_M, BLOCK_N,
BLOCK_K, GROUP_M, warps, stages; triton_pass: BLOCK_M, BLOCK_N, warps) and chunk size R,
the loss alone (no gradients) and the loss with every gradient (plus the two cuBLAS
GEMMs), with the rate counting 6 * M * N * D flops (medians of CUDA-event timings after
warm-up); writes a JSON table (with the device name) to --out. Used to choose
GPU_TILE_CONFIGS and GPU_PASS_CONFIGS in kernels/triton_gemm_sigmoid_loss.py.

triton: per (BLOCK_OWN, BLOCK_STREAM, num_warps, num_stages), the row pass (loss,
dA, ds, db) and the column pass (dT) times and their rates counting the
4 * M * N * D flops of each pass; used to choose the lists in
kernels/triton_sigmoid_loss.py. Every config compiles, so --budget stops early.
"""
import argparse
import datetime
import json
import os
import re
import time

import torch
import triton.testing

from bench_loss import _cpu_time_ms, _cuda_time_ms
from finelap.kernels import counted_entries, triton_gemm_sigmoid_loss
from finelap.kernels.registry import CHUNKED_GEMM_BACKENDS
from finelap.kernels.triton_sigmoid_loss import _CONFIGS_BY_WIDTH, _block_width, fused_sigmoid_loss

EXTRA_CANDIDATES = {512: [(64, 32, 8, 4), (64, 16, 8, 4)],
                    256: [(128, 32, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton_gemm", choices=["triton_gemm", "triton"])
    parser.add_argument("--size", type=int, nargs=4, default=[65536, 8192, 512, 2], metavar=("M", "N", "D", "K"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; remaining configs are skipped")
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=[4096, 8192],
                        help="chunk sizes R to try with each config (each capped at what the 256 MiB default workspace "
                             "allows that backend)")
    parser.add_argument("--out", help="triton_gemm: folder for gpu_tune_loss_<date>_<device>.json")
    parser.add_argument("--device", default="cuda", help="cpu only to check the script (TRITON_INTERPRET=1)")
    parser.add_argument("--export-best", metavar="DIR",
                        help="print `export` lines that make triton_gemm use the best config of the sweep in DIR")
    args = parser.parse_args()
    if args.export_best:
        export_best(args.export_best)
        return
    M, N, D, K = args.size
    dtype = getattr(torch, args.dtype)
    device = args.device
    rows = torch.nn.functional.normalize(torch.randn(M, D, device=device), dim=1).to(dtype)
    columns = torch.nn.functional.normalize(torch.randn(N, D, device=device), dim=1).to(dtype)
    phrase_cluster = torch.randint(0, N // 2, (N,), device=device)
    frame_active = torch.randint(-1, N // 2, (M, K), device=device)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    inverse = 1.0 / counted_entries(phrase_cluster, M).float()
    inputs = (rows, columns, scale, bias, frame_active, phrase_cluster, None, True, inverse)
    if args.backend == "triton_gemm":
        sweep_gemm(args, inputs)
    else:
        sweep_two_pass(args, inputs)


def sweep_gemm(args, inputs):
    """Every (launch config, R) pair of triton_gemm and triton_pass: loss-only and full times.
    Each backend's default config comes first, so a spent budget still leaves both measured."""
    M, N, D, K = args.size
    rows = inputs[0]
    flops = 6 * M * N * D
    results = []
    on_gpu = rows.device.type == "cuda"
    median_ms = _cuda_time_ms if on_gpu else _cpu_time_ms
    report = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", date=datetime.date.today().isoformat(),
                  torch=torch.__version__, triton=triton.__version__, dtype=args.dtype, M=M, N=N, D=D, K=K,
                  results=results)
    start = time.time()
    print(f"triton_gemm / triton_pass M={M} N={N} D={D} K={K} {args.dtype}; rate counts 6*M*N*D flops")
    report["phases"] = phase_times(inputs, median_ms, 3 if on_gpu else 0, 15 if on_gpu else 1)
    print("where the time goes at the default configs (ms, all chunks):")
    for name, value in report["phases"].items():
        print(f"  {name:60s} {value:8.3f}")
    module = triton_gemm_sigmoid_loss
    candidates = {"triton_gemm": module.GPU_TILE_CONFIGS if on_gpu else [module.default_tile_config()],
                  "triton_pass": module.GPU_PASS_CONFIGS if on_gpu else [module.default_pass_config()]}
    plan = []  # (backend, config, R): the defaults of both backends first
    for rank in range(max(len(configs) for configs in candidates.values())):
        for backend, configs in candidates.items():
            if rank < len(configs):
                largest = module.chunk_rows_for(M, N, D, rows.dtype, logits_by=CHUNKED_GEMM_BACKENDS[backend])
                for chunk_rows in sorted({min(value, largest) for value in args.chunk_rows}):
                    plan.append((backend, configs[rank], chunk_rows))
    for backend, config, chunk_rows in plan:
        logits_by = CHUNKED_GEMM_BACKENDS[backend]
        if time.time() - start > args.budget:
            print("budget spent; skipped", backend, tuple(config), chunk_rows)
            continue
        entry = dict(backend=backend, config=dict(config._asdict()), chunk_rows=chunk_rows,
                     workspace_mib=module.workspace_bytes_needed(min(chunk_rows, M), N, D, rows.dtype, logits_by)
                     / 2**20)
        launch = dict(tile_config=config) if logits_by == "triton" else dict(pass_config=config)

        def run(gradients):
            return module.fused_sigmoid_loss(
                *inputs, compute_row_grad=gradients, compute_column_grad=gradients,
                compute_parameter_grad=gradients, chunk_rows=chunk_rows, logits_by=logits_by, **launch)
        try:
            compile_start = time.time()
            run(True)
            run(False)
            if on_gpu:
                torch.cuda.synchronize()
            entry["compile_s"] = time.time() - compile_start
            for _ in range(3 if on_gpu else 0):  # warm-up
                run(True)
            repeats = 15 if on_gpu else 1
            entry["loss_only_ms"] = median_ms(lambda: run(False), repeats)
            entry["total_ms"] = median_ms(lambda: run(True), repeats)
            entry["tflops_6mnd"] = flops / (entry["total_ms"] * 1e-3) / 1e12
        except Exception as error:  # a config that does not compile or fit is reported, not fatal
            entry["error"] = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        results.append(entry)
        if "error" in entry:
            print(backend, tuple(config), chunk_rows, "failed:", entry["error"], flush=True)
        else:
            print(f"{backend:11s} {str(tuple(config)):28s} R={chunk_rows:6d} loss only {entry['loss_only_ms']:7.3f} ms  "
                  f"total {entry['total_ms']:7.3f} ms  {entry['tflops_6mnd']:6.1f} TFLOP/s", flush=True)
    report["best"] = {}
    for backend in CHUNKED_GEMM_BACKENDS:
        timed = [r for r in results if "error" not in r and r["backend"] == backend]
        if timed:
            best = report["best"][backend] = min(timed, key=lambda r: r["total_ms"])
            print(f"best {backend}: {best['config']} R={best['chunk_rows']} {best['total_ms']:.3f} ms "
                  f"({best['tflops_6mnd']:.1f} TFLOP/s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
        path = os.path.join(args.out, f"gpu_tune_loss_{report['date']}_{slug}.json")
        with open(path, "w") as handle:
            json.dump(report, handle, indent=1)
        print("written:", path)


def phase_times(inputs, median_ms, warmup, repeats):
    """Milliseconds of each part of triton_gemm and triton_pass at their default configs and R,
    and of the library GEMMs alone on the same shapes, summed over the row chunks: which part
    misses the GEMM rate (the flops of each part are in its name)."""
    rows, columns = inputs[0], inputs[1]
    M, N, D = rows.shape[0], columns.shape[0], rows.shape[1]
    module = triton_gemm_sigmoid_loss

    def fused(logits_by, row_grad, column_grad, parameter_grad):
        return lambda: module.fused_sigmoid_loss(
            *inputs, compute_row_grad=row_grad, compute_column_grad=column_grad,
            compute_parameter_grad=parameter_grad, logits_by=logits_by)

    chunk_rows = module.chunk_rows_for(M, N, D, rows.dtype, logits_by="triton")
    chunks = [slice(start, min(start + chunk_rows, M)) for start in range(0, M, chunk_rows)]
    coefficients = torch.rand(min(chunk_rows, M), N, device=rows.device).to(rows.dtype)
    logits = torch.empty(min(chunk_rows, M), N, device=rows.device)
    accumulator = torch.zeros(N, D, device=rows.device)

    def each_chunk(operation):
        return lambda: [operation(chunk) for chunk in chunks]

    def column_gemm(chunk):  # as the backend does it: fp32 accumulator, 16-bit operands
        grad = coefficients[:chunk.stop - chunk.start]
        module._matmul_into_fp32(accumulator, grad.t(), rows[chunk], accumulate=True)

    def logits_gemm(chunk):  # triton_pass's first step: fp32 result
        module._matmul_into_fp32(logits[:chunk.stop - chunk.start], rows[chunk], columns.t(), accumulate=False)

    candidates = {
        f"library logits GEMM A T^T, bf16 result, R={chunk_rows} (2MND)": each_chunk(lambda c: rows[c] @ columns.t()),
        f"library logits GEMM A T^T, fp32 result, R={chunk_rows} (2MND)": each_chunk(logits_gemm),
        f"library GEMM g T, R={chunk_rows} (2MND)": each_chunk(lambda c: coefficients[:c.stop - c.start] @ columns),
        f"library GEMM g^T A, fp32 accumulate, R={chunk_rows} (2MND)": each_chunk(column_gemm),
        "triton_gemm loss only (logits GEMM + epilogue, 2MND)": fused("triton", False, False, False),
        "triton_gemm loss + d(scale), d(bias) (tile sums)": fused("triton", False, False, True),
        "triton_gemm + row gradient (g stored, g T: 4MND)": fused("triton", True, False, False),
        "triton_gemm + column gradient (g stored, g^T A: 4MND)": fused("triton", False, True, False),
        "triton_gemm everything (6MND)": fused("triton", True, True, True),
        "triton_pass loss only (library logits GEMM + pass, 2MND)": fused("library", False, False, False),
        "triton_pass + row gradient (g stored, g T: 4MND)": fused("library", True, False, False),
        "triton_pass everything (6MND)": fused("library", True, True, True),
    }
    times = {}
    for name, run in candidates.items():
        try:
            run()
            for _ in range(warmup):
                run()
            times[name] = median_ms(run, repeats)
        except Exception as error:  # one part failing must not hide the others
            print(f"  {name}: failed: {str(error).splitlines()[0][:160] if str(error) else type(error).__name__}")
    return times


def export_best(folder):
    """Shell lines setting the tuning variables of triton_gemm and triton_pass to the fastest
    sweep entries of each."""
    import glob

    paths = sorted(glob.glob(os.path.join(folder, "gpu_tune_loss_*.json")))
    best = json.load(open(paths[-1])).get("best") if paths else None
    module = triton_gemm_sigmoid_loss
    for backend, entry in (best or {}).items():
        if backend not in CHUNKED_GEMM_BACKENDS:  # a file of an older sweep
            continue
        config = ",".join(str(value) for value in entry["config"].values())
        logits_by = CHUNKED_GEMM_BACKENDS[backend]
        print(f"export {module.TILES_ENV if logits_by == 'triton' else module.PASS_ENV}={config}")
        print(f"export {module.MAX_CHUNK_ROWS_ENV[logits_by]}={entry['chunk_rows']}")


def sweep_two_pass(args, inputs):
    """Every launch config of the two-pass triton backend: row pass and column pass times."""
    M, N, D, K = args.size
    rows, columns, scale, bias, frame_active, phrase_cluster, _, _, inverse = inputs
    width = _block_width(D)
    candidates = list(dict.fromkeys(_CONFIGS_BY_WIDTH[max(64, width)] + EXTRA_CANDIDATES.get(width, [])))
    start = time.time()
    print(f"M={M} N={N} D={D} K={K} {args.dtype}; rates count 4*M*N*D flops per pass")
    for config, prefetch in [(config, prefetch) for config in candidates for prefetch in (True, False)]:
        if time.time() - start > args.budget:
            print("budget spent; skipped", config, "prefetch" if prefetch else "")
            continue

        def run(column_pass):
            return fused_sigmoid_loss(rows, columns, scale, bias, frame_active, phrase_cluster, None, True, inverse,
                                      compute_row_grad=True, compute_column_grad=column_pass,
                                      compute_parameter_grad=True, configs=[config], prefetch=prefetch)
        try:
            compile_start = time.time()
            run(True)
            torch.cuda.synchronize()
            compile_seconds = time.time() - compile_start
            row_ms = triton.testing.do_bench(lambda: run(False), warmup=5, rep=50)
            both_ms = triton.testing.do_bench(lambda: run(True), warmup=5, rep=50)
        except Exception as error:  # a config that does not compile or fit is reported, not fatal
            print(config, "failed:", str(error).splitlines()[0][:120])
            continue
        column_ms = both_ms - row_ms
        rate = lambda ms: 4 * M * N * D / (ms * 1e-3) / 1e12  # noqa: E731
        total_rate = 6 * M * N * D / (both_ms * 1e-3) / 1e12
        print(f"{str(config):16s}{' prefetch' if prefetch else '         '} "
              f"row {row_ms:7.3f} ms {rate(row_ms):6.1f} TFLOP/s  "
              f"column {column_ms:7.3f} ms {rate(column_ms):6.1f} TFLOP/s  "
              f"total {both_ms:7.3f} ms  6MND rate {total_rate:6.1f}  (compile {compile_seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
