#!/usr/bin/env bash
# Builds .gpu_carry/ (git-ignored): what a lent GPU machine lacks for a FineLAP training run,
# as files that travel with the working tree, since that machine cannot download anything.
#
#   make venv && bash benchmarks/build_gpu_carry.sh      # from the repository root; idempotent
#
#   .gpu_carry/wheels/                CPython 3.12 manylinux x86_64 wheels: deepspeed and the runtime
#                                     requirements of it and of soundfile that the machine has not,
#                                     and pytest-xdist
#   .gpu_carry/roberta_base_random/   roberta-base-sized config.json + tokenizer, no weights
#
# On the GPU machine (Python 3.12, torch already there):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .gpu_carry/wheels/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
#   python3 benchmarks/make_random_text_tower.py .gpu_carry/roberta_base_random   # random weights, ~500 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}  # needs transformers + tokenizers (the tokenizer)
command -v "$PY" >/dev/null || { echo "$PY not found: run 'make venv' first (or set PYTHON)" >&2; exit 1; }
CARRY=.gpu_carry
WHEELS=$CARRY/wheels
LIMIT_MIB=60  # the carried paths may total 64 MiB, and the working tree travels too
start=$SECONDS

pin() {  # the version setup.py pins for $1: setup.py stays the one place of the project's pins
    local version
    version=$(sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" setup.py)
    [ -n "$version" ] || { echo "no pin for $1 in setup.py" >&2; exit 1; }
    echo "$version"
}
DEEPSPEED=$(pin deepspeed)

# Not pinned in setup.py (pip resolves them for the venv): the versions the venv resolved.
# pydantic pins pydantic-core exactly and wants typing-extensions>=4.16, likely newer than the
# machine's own, so typing-extensions comes along although the machine has one.
BINARIES=(
    hjson==3.1.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    "soundfile==$(pin soundfile)" cffi==2.1.1 pycparser==3.12  # soundfile's wheel bundles libsndfile
    pytest-xdist==3.8.0 execnet==2.1.2  # the CUDA kernel tests in parallel processes: their compiles overlap
)
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

mkdir -p "$WHEELS"
wheel_of() {  # NAME VERSION -> its wheel file, or nothing (wheel file names use _ for -)
    compgen -G "$WHEELS/${1//-/_}-$2-*.whl" | head -n 1 || true
}
kept=" "
keep() {  # NAME VERSION: the wheel must be there now, and survives the clean-up below
    local file
    file=$(wheel_of "$1" "$2")
    [ -n "$file" ] || { echo "no wheel of $1 $2 in $WHEELS" >&2; exit 1; }
    kept+="$file "
}
for spec in "${BINARIES[@]}"; do
    name=${spec%%==*} version=${spec##*==}
    [ -n "$(wheel_of "$name" "$version")" ] ||
        "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$WHEELS" "$spec"
    keep "$name" "$version"
done

# deepspeed ships only an sdist. In pip's isolated build env torch is absent, so the wheel records
# no torch/CUDA version and DS_BUILD_OPS=0 leaves every op to JIT compilation on the GPU machine.
# (--no-build-isolation fails with a bare setuptools, and in the venv would record its CPU torch.)
if [ -z "$(wheel_of deepspeed "$DEEPSPEED")" ]; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "deepspeed==$DEEPSPEED"
fi
keep deepspeed "$DEEPSPEED"

# Exactly one version of each package: drop what an earlier run with other pins left.
for file in "$WHEELS"/*.whl; do
    [[ "$kept" == *" $file "* ]] || { echo "removing stale $file"; rm -f "$file"; }
done

# Config and tokenizer only: the random weights are made on the GPU machine (500 MB won't travel).
"$PY" benchmarks/make_random_text_tower.py "$CARRY/roberta_base_random" --config-only

ls -l "$WHEELS" | awk 'NR > 1 { printf "%10d  %s\n", $5, $9 }'
bytes=$(du -sb "$CARRY" | cut -f1)
awk -v b="$bytes" -v c="$CARRY" -v l="$LIMIT_MIB" -v s=$((SECONDS - start)) \
    'BEGIN { printf "%s: %.1f MiB in all (limit %d MiB), built in %ds\n", c, b / 1048576, l, s }'
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "$CARRY is over $LIMIT_MIB MiB (weights left in roberta_base_random/?)" >&2
    exit 1
fi
