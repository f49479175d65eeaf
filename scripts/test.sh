#!/usr/bin/env bash
# Set up from scratch and run the tests against the INSTALLED package (a real wheel).
#
#   bash scripts/test.sh [pytest args...]        e.g.  bash scripts/test.sh -k registry -x
#
# 1. creates the virtual environment if missing (python3 -m venv),
# 2. pip install torch==2.13.0 FIRST (so the `torch>=2.5` range never pulls another build),
# 3. pip install ".[test]": a regular, non-editable install of the wheel hatchling builds
#    (recipes/ and configs/ followed through the package's symlinks, plus the .pth hook),
# 4. runs ruff (lint + format check, pyproject's settings), then pytest with the venv's
#    `pytest` script from the repo root. The console script puts
#    only its own bin/ directory on sys.path (unlike `python -m pytest`, which would put the
#    repo root first), and pyproject's --import-mode=importlib adds nothing either, so
#    `import torchtune_prefopt` in a test is the installed copy in site-packages, not ./
#    torchtune_prefopt. The pytest header says which one was imported, and
#    test_tests_import_the_installed_package asserts it (TORCHTUNE_PREFOPT_EXPECT_INSTALLED=1).
#
# Exit status: pytest's own (5, "no tests collected", is a failure too).
#
# Environment:
#   PREFOPT_VENV        virtual environment to use/create (default: <repo>/.venv)
#   PYTHON              interpreter that creates it (default: python3)
#   PREFOPT_SETUP_ONLY  1: stop after the installs (scripts/demo.sh uses this)
#   PREFOPT_NO_LINT     1: skip `ruff check` / `ruff format --check` (run before pytest)
#   PREFOPT_TEST_WORKERS  pytest-xdist workers (default: auto, one per core; 0: serial)
#
# Note: this replaces an editable install in that venv with a regular one; developers who
# want their edits live again run `pip install --no-deps --no-build-isolation -e .`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PREFOPT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip_install() {
    # -qq: errors only (the machine-wide pip config makes -q print many harmless warnings)
    "$VENV/bin/python" -m pip install -qq --disable-pip-version-check "$@"
}

echo "==> pip install torch==2.13.0"
pip_install "torch==2.13.0"

echo "==> pip install $ROOT[test] (regular install of the wheel)"
pip_install "$ROOT[test]"
# pip may keep an already-installed copy of the same version (e.g. an editable install):
# make sure the package itself is the freshly built wheel.
if ! "$VENV/bin/python" -I - "$ROOT" <<'PY'
import json, sys
from importlib import metadata
from pathlib import Path

dist = metadata.distribution("torchtune-prefopt")
direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
editable = direct_url.get("dir_info", {}).get("editable", False)
import torchtune_prefopt
from_source = Path(torchtune_prefopt.__file__).resolve().parent == Path(sys.argv[1], "torchtune_prefopt").resolve()
sys.exit(1 if editable or from_source else 0)
PY
then
    echo "==> replacing the editable/source install with the wheel"
    pip_install --no-deps --force-reinstall "$ROOT"
fi

if [ "${PREFOPT_SETUP_ONLY:-0}" = "1" ]; then
    exit 0
fi

cd "$ROOT"
if [ "${PREFOPT_NO_LINT:-0}" != "1" ]; then
    # house style (pyproject's [tool.ruff]); the `test` extra installs ruff
    echo "==> ruff check && ruff format --check"
    "$VENV/bin/ruff" check -q .
    "$VENV/bin/ruff" format --check -q .
fi

# One worker per core (pytest-xdist; tests/conftest.py keeps each worker on one thread and one
# run at a time), whole modules per worker; the 15 slowest tests are printed at the end.
# PREFOPT_TEST_WORKERS=0 runs serially; arguments after these win (e.g. -n 0).
WORKERS="${PREFOPT_TEST_WORKERS:-auto}"
echo "==> pytest -n $WORKERS --dist loadfile --durations=15 $*"
export TORCHTUNE_PREFOPT_EXPECT_INSTALLED=1
exec "$VENV/bin/pytest" -n "$WORKERS" --dist loadfile --durations=15 "$@"
