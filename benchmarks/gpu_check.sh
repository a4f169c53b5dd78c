#!/usr/bin/env bash
# One GPU check for a lent CUDA machine: carried packages installed, the kernels' CUDA
# correctness tests, the loss benchmark against torch.compile, the triton_gemm tile/chunk
# sweep, the CUDA fbank check, and real DeepSpeed training runs (ZeRO-2/3, profile,
# kill and resume). Full results (JSON with the device name) go under $OUT; a short
# table is printed last. On the GPU machine the carried wheels and this working tree are
# installed into a temporary folder first; with --cpu-smoke the environment's own install is used.
#
#   bash benchmarks/build_gpu_carry.sh     # here, first: wheels and text tower into .gpu_carry/
#   bash benchmarks/gpu_check.sh           # on the GPU machine, from the repository root
#   STEPS="kernels_cuda bench_loss" bash benchmarks/gpu_check.sh   # only some steps
#
# Sized for one command of about 9 minutes on one H100 or H200: the step limits below sum to
# 515 s, plus installing the carried wheels and this tree. On one H200 (2026-11-28) the CUDA
# tests alone ran past 200 s in one process (they now run in 8), and `train` launched 5
# sub-runs of 40-46 s start-up each (now 3).
#   bash benchmarks/gpu_check.sh --cpu-smoke                        # the script's logic on CPU, tiny sizes
#
# Python: $PYTHON if set; else, with --cpu-smoke, the checkout's .venv when there is one; else python3.
# The exit status is 1 when any step failed (the summary table is still printed), else 0.
#
# Each step is one `run_step NAME SECONDS COMMAND...`: it has its own timeout, its output
# goes to $OUT/gpu_check.log, its exit status and seconds to the summary, and a failing
# step does not stop the others. $OUT holds at most 8 files (all the machine returns):
# the log and each step's JSON (+ Markdown) results.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/benchmarks/results/gpu_check}
mkdir -p "$OUT"
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
if [ -z "${PYTHON:-}" ]; then
    if [ "$SMOKE" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then
        PYTHON=$REPO/.venv/bin/python
        export PATH="$REPO/.venv/bin:$PATH"  # its deepspeed launcher, for the training smoke run
    else
        PYTHON=$(command -v python3 || command -v python)
    fi
fi
echo "python: $PYTHON"
CARRY=$REPO/.gpu_carry

# Packages the GPU machine lacks (DeepSpeed, soundfile, ...) travel as wheels in .gpu_carry/;
# this project is installed beside them (not editable: kernels/ and csrc/ go where they belong).
if [ "$SMOKE" = 0 ]; then
    SITE=/tmp/finelap_site
    if [ -d "$CARRY/wheels" ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$CARRY"/wheels/*.whl || echo "installing the carried wheels failed"
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
        --target "$SITE" "$REPO" || echo "installing finelap failed"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

STEPS_FILE=$WORK/steps.tsv
: > "$STEPS_FILE"
rm -f "$OUT/gpu_check.log"
STEPS=${STEPS-"kernels_cuda bench_loss tune_loss fbank train"}  # STEPS="": the environment step alone
run_step() {  # NAME TIMEOUT_SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    if [ "$name" != environment ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
    echo "=== $name (timeout ${limit}s)"
    start=$(date +%s)
    echo "=== $name" >> "$OUT/gpu_check.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log" | tail -n 40
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$STEPS_FILE"
}

kernel_tests() {  # -v: each test's outcome as it ends, so a run cut by its timeout still says
    # which test was running; PYTHONSAFEPATH (python -P, inherited by pytest-xdist's workers): the
    # repository root must not shadow the installed package; -n 8: compiles overlap in 8 processes
    local parallel=()
    "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 8)
    PYTHONSAFEPATH=1 "$PYTHON" -m pytest -v --tb=short -p no:cacheprovider -o addopts="" --import-mode=importlib \
        "${parallel[@]}" tests/test_kernels_cuda.py
}

run_step environment 60 "$PYTHON" -c "
import importlib.util, torch, triton
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')
for name in ('deepspeed', 'soundfile', 'pydantic', 'hjson', 'transformers'):
    print(name, 'present' if importlib.util.find_spec(name) else 'MISSING')
"
export -f kernel_tests
export PYTHON OUT
run_step kernels_cuda 110 bash -c kernel_tests  # skips itself without CUDA
if [ "$SMOKE" = 1 ]; then
    # the triton backends run on CPU tensors under the interpreter
    run_step bench_loss 600 env TRITON_INTERPRET=1 "$PYTHON" benchmarks/bench_loss.py --device cpu --preset smoke --backends reference chunked triton_gemm triton_pass \
        --repeats 1 --out-dir "$OUT"
    run_step tune_loss 300 env TRITON_INTERPRET=1 "$PYTHON" benchmarks/gpu_tune_loss.py --device cpu --size 300 70 24 2 --chunk-rows 64 512 \
        --out "$OUT"
    run_step train 900 "$PYTHON" benchmarks/gpu_train_run.py --cpu-smoke --out "$OUT"
else
    # where the time goes, then launch configs x chunk sizes of triton_gemm and triton_pass at the
    # target size; the benchmark then runs the best of each
    run_step tune_loss 75 "$PYTHON" benchmarks/gpu_tune_loss.py --budget 45 --out "$OUT"
    eval "$("$PYTHON" benchmarks/gpu_tune_loss.py --export-best "$OUT" 2>/dev/null)"
    run_step bench_loss 110 "$PYTHON" benchmarks/bench_loss.py --device cuda --preset gpu-check --out-dir "$OUT"
    # batched Kaldi fbank on the GPU vs torchaudio per clip on the CPU: correctness and clips/s
    run_step fbank 30 "$PYTHON" benchmarks/gpu_fbank.py --out "$OUT"
    # DeepSpeed on the GPU: EAT-base + a RoBERTa-base-sized text tower (random weights), ZeRO-2/3,
    # profile, kill and resume; the text tower's config and tokenizer are carried.
    # (the text tower's random weights are made there: 500 MB would not travel)
    # TRAIN_ARGS: more options of gpu_train_run.py (e.g. --loss-backend triton)
    # On an H200 each sub-run took 40-46 s to reach its first step (2026-11-28).
    run_step train 190 "$PYTHON" benchmarks/gpu_train_run.py --out "$OUT" --text-folder "$CARRY/roberta_base_random" \
        --budget 180 ${TRAIN_ARGS:-}
    # one EAT-base step, ours vs a reference-faithful configuration (not in the default STEPS)
    run_step train_step 120 "$PYTHON" benchmarks/bench_train_step.py gpu --text-folder "$CARRY/roberta_base_random" \
        --warmup 1 --repeats 2 --out "$OUT"
fi

"$PYTHON" benchmarks/gpu_summary.py "$OUT" "$STEPS_FILE" | tee -a "$OUT/gpu_check.log"
summary_rc=${PIPESTATUS[0]}
failed=$(awk -F'\t' '$2 != 0 { printf "%s%s (exit %s)", sep, $1, $2; sep = ", " }' "$STEPS_FILE")
[ "$summary_rc" = 0 ] || failed="${failed:+$failed, }summary (exit $summary_rc)"
if [ -n "$failed" ]; then
    echo "gpu_check FAILED: $failed" | tee -a "$OUT/gpu_check.log" >&2
    exit 1
fi
