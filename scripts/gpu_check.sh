#!/usr/bin/env bash
# GPU readiness check: one command, self-contained, for a Linux x86-64 machine with one or
# more NVIDIA GPUs, its own CUDA build of torch (>= 2.6) and no internet.
#
#   bash scripts/gpu_wheels.sh                 # HERE, with the package registries: fills .whl/
#   bash scripts/gpu_check.sh [--out DIR]      # THERE: installs .whl/ privately, runs the check
#   bash scripts/gpu_check.sh --dry-run        # anywhere: the same parts on CPU, tiny sizes
#
# Options: --out DIR (default /tmp/prefopt_gpu_check), --wheels DIR (default .whl),
# --budget-s N (default 480: every part gets its own timeout inside this total),
# --parts a,b,... (default all; see benchmarks/gpu_check.py).
#
# The wheels go into a private target directory with `pip install --no-index --no-deps`; the
# machine's own torch is never replaced. The table is printed and written to
# DIR/gpu_check.md (+ gpu_check.json, one log per part); a part that fails or times out is
# reported and the next one runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=/tmp/prefopt_gpu_check
WHEELS="$ROOT/.whl"
WHEELS_GIVEN=0
DRY=0
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; ARGS+=(--dry-run); shift ;;
        --out) OUT="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; WHEELS_GIVEN=1; shift 2 ;;
        --budget-s|--parts) ARGS+=("$1" "$2"); shift 2 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
# the interpreter: $PYTHON if set; a dry run prefers the project's .venv; else python3
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    PY=python3
    if [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi
fi

# a real run installs the wheels; a dry run only when --wheels is given (to try the install)
if [ "$DRY" = 0 ] || [ "$WHEELS_GIVEN" = 1 ]; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: no wheels in $WHEELS (run scripts/gpu_wheels.sh where pip can reach the registries)" >&2
        exit 2
    fi
    SITE="$(mktemp -d /tmp/prefopt_site.XXXXXX)"
    echo "==> installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE (--no-index --no-deps)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    # a --target directory is not a site dir (its .pth is not run): the check launches the
    # recipe files directly (torchrun / in-process), never through `tune run <name>`
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCHTUNE_PREFOPT_QUIET=1
mkdir -p "$OUT"
exec "$PY" "$ROOT/benchmarks/gpu_check.py" --out "$OUT" "${ARGS[@]}"
