"""Times each candidate launch config of the triton loss kernels at one size (CUDA).

    python benchmarks/gpu_tune_loss.py [--size M N D K] [--dtype bfloat16] [--budget SECONDS]

Prints, per (BLOCK_OWN, BLOCK_STREAM, num_warps, num_stages), the row pass
(loss, dA, ds, db) and the column pass (dT) times and their rates counting the
4 * M * N * D flops of each pass; used to choose the lists in
kernels/triton_sigmoid_loss.py. Every config compiles, so --budget stops early.
"""
import argparse
import time

import torch
import triton.testing

from finelap.kernels import counted_entries
from finelap.kernels.triton_sigmoid_loss import _CONFIGS_BY_WIDTH, _block_width, fused_sigmoid_loss

EXTRA_CANDIDATES = {512: [(64, 32, 8, 4), (64, 16, 8, 4)],
                    256: [(128, 32, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=4, default=[65536, 8192, 512, 2], metavar=("M", "N", "D", "K"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; remaining configs are skipped")
    args = parser.parse_args()
    M, N, D, K = args.size
    dtype = getattr(torch, args.dtype)
    rows = torch.nn.functional.normalize(torch.randn(M, D, device="cuda"), dim=1).to(dtype)
    columns = torch.nn.functional.normalize(torch.randn(N, D, device="cuda"), dim=1).to(dtype)
    phrase_cluster = torch.randint(0, N // 2, (N,), device="cuda")
    frame_active = torch.randint(-1, N // 2, (M, K), device="cuda")
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    inverse = 1.0 / counted_entries(phrase_cluster, M).float()
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
