#!/usr/bin/env bash
# Download, HERE (a machine with the package registries), the pure-Python wheels a GPU machine
# without internet needs to run scripts/gpu_check.sh: this package, torchtune 0.6.1,
# torchao 0.15 and the few dependencies such a machine usually lacks. Its own torch (CUDA
# build), transformers, safetensors, tokenizers, sentencepiece, tiktoken, pyarrow, pandas,
# numpy, requests, pyyaml, tqdm, xxhash, fsspec, huggingface-hub ... are used as they are.
#
#   bash scripts/gpu_wheels.sh [DIR]        # default DIR: .whl (git-ignored)
#   bash scripts/gpu_wheels.sh --list       # print what would be downloaded, download nothing
#
# Target: CPython 3.12, manylinux x86-64 (the lent H100/H200 machines). Every wheel is
# installed there with `pip install --no-index --no-deps --target <private dir>` by
# scripts/gpu_check.sh, so the machine's own torch is never touched. The folder stays small
# (about 10 MiB; torchao's wheel is most of it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"

# name==version: pinned to what the tests here run with (torchtune is final at 0.6.1;
# torchao >= 0.16 breaks `import torchtune`). kagglehub/kagglesdk: only `tune`'s CLI imports
# them (its `download` subcommand); datasets/dill/multiprocess: torchtune's and our data code.
WHEELS=(
    "torchtune==0.6.1"
    "torchao==0.15.0"
    "omegaconf==2.4.0"
    "datasets==5.2.0"
    "dill==0.4.1"
    "multiprocess==0.70.19"
    "kagglehub==1.0.3"
    "kagglesdk==0.1.38"
    "trl==1.16.0"        # the packing benchmark's TRL column (benchmarks/bench_packing.py)
    "accelerate==1.15.0" # TRL's trainer backend
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "torchtune-prefopt (built from $ROOT)" "${WHEELS[@]}"
    exit 0
fi
DIR="${1:-$ROOT/.whl}"
mkdir -p "$DIR"
rm -f "$DIR"/*.whl

echo "==> building this package's wheel"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DIR" "$ROOT" \
    || "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DIR" "$ROOT"

echo "==> downloading: ${WHEELS[*]}"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"

ls -la "$DIR"
du -sh "$DIR"
