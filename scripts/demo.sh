#!/usr/bin/env bash
# Set up like scripts/test.sh (venv, torch, regular install), then train the tiny DPO demo:
#
#   bash scripts/demo.sh [extra recipe args...]     e.g.  bash scripts/demo.sh max_steps_per_epoch=5
#
# Runs `tune run prefopt_distributed --config tiny/dpo output_dir=/tmp/torchtune_prefopt/demo overwrite_output_dir=true "$@"` from an
# empty temporary directory, to show that the recipe and the config are found by name from
# anywhere. Outputs go to the demo's own output_dir (not tiny/dpo's, so the README's next
# commands start clean); a demo replaces its previous demo run there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PREFOPT_VENV:-$ROOT/.venv}"

PREFOPT_SETUP_ONLY=1 bash "$ROOT/scripts/test.sh"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
echo "==> (in $WORK) tune run prefopt_distributed --config tiny/dpo output_dir=/tmp/torchtune_prefopt/demo overwrite_output_dir=true $*"
"$VENV/bin/tune" run prefopt_distributed --config tiny/dpo output_dir=/tmp/torchtune_prefopt/demo overwrite_output_dir=true "$@"
