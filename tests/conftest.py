"""Shared pytest configuration. Keep this generic; add fixtures as needed.

Parallel runs (``scripts/test.sh`` runs ``pytest -n <workers> --dist loadfile``, pytest-xdist):

* each test module runs on one worker, so its module-scoped runs (``tune_harness.RunPool``)
  are made once, as in a serial run;
* a worker computes on one thread (``OMP_NUM_THREADS=1``, set here before torch is imported)
  and launches one run at a time (``tune_harness.JOBS``): with one worker per core, the
  2-process runs, the runs of the pools and the tests' own tensors never oversubscribe the
  cores (OpenMP threads spinning on a busy core make a CPU job 5-10x slower);
* the modules that take longest start first (:data:`HEAVY_MODULES`, measured: the slowest
  tests are printed by ``--durations``), so no long module starts last on an idle machine.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("PREFOPT_TEST_JOBS", "1")

#: modules by measured wall time on the 2-core CI machine, longest first (the rest follow in
#: their usual order); only the order of the modules changes, never the order inside one
HEAVY_MODULES = (
    "test_frontier.py",
    "test_hf_models.py",
    "test_recipe_e2e.py",
    "test_smollm2.py",
    "test_crash_resume.py",
    "test_gpu_check.py",
    "test_packing_recipe.py",
    "test_reference_recipe.py",
    "test_compare.py",
    "test_bad_input.py",
    "test_loss_terms_recipe.py",
    "test_trl_equality.py",
    "test_heldout_eval.py",
    "test_readme_commands.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


def pytest_report_header(config):
    """Say which torchtune_prefopt the tests import: the installed wheel or the source tree."""
    try:
        import torchtune_prefopt
    except Exception as exc:  # pragma: no cover - reported, the tests will fail anyway
        return f"torchtune_prefopt: NOT importable ({type(exc).__name__}: {exc})"
    package_dir = Path(torchtune_prefopt.__file__).resolve().parent
    if package_dir == REPO_ROOT / "torchtune_prefopt":
        kind = "source tree (editable install or sys.path)"
    else:
        kind = "installed copy"
    return f"torchtune_prefopt: {package_dir} [{kind}]"
