"""Short table of a gpu_check.sh run: each step's status, the loss benchmark's key rows and targets,
the loss parts' times and the best config of each triton_gemm / triton_pass sweep, the fbank and
training tables.

    python benchmarks/gpu_summary.py OUT_DIR [STEPS_TSV]
"""
import glob
import json
import os
import sys


def main(out_dir, steps_file):
    print("\n================ GPU check summary ================")
    if steps_file and os.path.exists(steps_file):
        print(f"{'step':24s} {'status':>8s} {'seconds':>8s}")
        with open(steps_file) as steps:
            for line in steps:
                name, rc, seconds = line.rstrip("\n").split("\t")
                status = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"rc={rc}")
                print(f"{name:24s} {status:>8s} {seconds:>8s}")
    for path in sorted(glob.glob(os.path.join(out_dir, "bench_loss_*.json"))):
        with open(path) as handle:
            report = json.load(handle)
        print(f"\nloss benchmark on {report['device']}, {report['dtype']}"
              + (f", torch.mm {report['matmul_tflops']:.0f} TFLOP/s" if "matmul_tflops" in report else ""))
        print(f"{'stream':6s} {'M':>6s} {'N':>6s} {'D':>4s} {'backend':11s} {'ms':>9s} {'TFLOP/s':>8s} "
              f"{'peak/(in+g)':>11s}")
        for row in report["rows"]:
            head = f"{row['stream']:6s} {row['M']:>6d} {row['N']:>6d} {row['D']:>4d} {row['backend']:11s}"
            if "error" in row:
                print(f"{head} error: {row['error'][:60]}")
            else:
                print(f"{head} {row['time_ms']:9.2f} {row['tflops_6mnd']:8.3g} "
                      f"{row['peak_vs_inputs_plus_gradients']:11.2f}")
        for target in report.get("targets", []):
            print(f"target {target['name']}: {target['value']:.3f} ({target['target']}) "
                  f"{'met' if target['passed'] else 'NOT MET'}")
    for path in sorted(glob.glob(os.path.join(out_dir, "gpu_tune_loss_*.json"))):
        with open(path) as handle:
            sweep = json.load(handle)
        print(f"\nwhere the time goes at {sweep['M']}x{sweep['N']}x{sweep['D']} (ms):")
        for name, milliseconds in sweep.get("phases", {}).items():
            print(f"  {name:60s} {milliseconds:8.3f}")
        for backend, best in sweep.get("best", {}).items():  # the best launch config of each backend
            print(f"{backend} sweep best: {best['config']} R={best['chunk_rows']} "
                  f"{best['total_ms']:.3f} ms, {best['tflops_6mnd']:.1f} TFLOP/s")
    for pattern in ("gpu_fbank_*.md", "train_gpu_*.md", "train_step_gpu_*.md"):
        for path in sorted(glob.glob(os.path.join(out_dir, pattern))):
            with open(path) as handle:
                print("\n" + handle.read().strip())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu_check", sys.argv[2] if len(sys.argv) > 2 else None)
