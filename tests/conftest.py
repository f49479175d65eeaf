"""Shared pytest configuration. Keep this generic; add fixtures as needed."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


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
