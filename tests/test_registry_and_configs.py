"""`tune ls/cp` registration, config-name resolution and --config parsing.

The CLI tests run the real installed `tune` (next to sys.executable) in subprocesses whose
working directory is a fresh tmp_path, so they exercise the .pth hook exactly as a user
would. Third-party configs come from a real (tiny) distribution written under tmp_path:
a package folder plus `<dist>.dist-info/{METADATA,entry_points.txt}`, put on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import torchtune_prefopt
from torchtune_prefopt import _config, _tune_registry
from torchtune_prefopt._config import (
    ConfigNotFoundError,
    available_configs,
    load_config,
    resolve_config,
)
from tune_harness import run_process, tune

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd: Path, pythonpath: Path | None = None, extra_env: dict | None = None):
    env = dict(extra_env or {})
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return run_process(args, cwd, env)


def _tune(args, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    return tune(args, cwd, {"PYTHONPATH": str(pythonpath)} if pythonpath is not None else None)


def _python(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", textwrap.dedent(code)], cwd, pythonpath)


def _ls_configs(stdout: str, recipe: str) -> list[str]:
    """Config names listed under `recipe` in `tune ls` output."""
    names, inside = [], False
    for line in stdout.splitlines()[1:]:
        recipe_col, config_col = line[:40].strip(), line[41:].strip()
        if recipe_col:
            inside = recipe_col == recipe
        if inside and config_col:
            names.append(config_col)
    return names


def _write_config_dist(site: Path, dist: str, package: str, files: dict[str, str]) -> Path:
    """A minimal installed distribution exposing `package` in the configs entry-point group."""
    pkg_dir = site / package
    pkg_dir.mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("")
    for rel, text in files.items():
        path = pkg_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[torchtune_prefopt.configs]\n{dist} = {package}\n")
    return pkg_dir


PACKAGED_DPO = _config.packaged_configs_dir() / "tiny" / "dpo.yaml"
ACME_YAML = "# acme's own config\nbatch_size: 2\n"


@pytest.fixture
def acme_site(tmp_path: Path) -> Path:
    """tmp site dir with distribution `acme-prefopt-configs` providing `acme/dpo_big`."""
    site = tmp_path / "site"
    _write_config_dist(
        site, "acme-prefopt-configs", "acme_prefopt_configs", {"acme/dpo_big.yaml": ACME_YAML}
    )
    return site


# --------------------------------------------------------------------------------------
# the installation itself


def test_tests_import_the_installed_package():
    """Under scripts/test.sh the tests must see the installed wheel, not ./torchtune_prefopt."""
    if os.environ.get("TORCHTUNE_PREFOPT_EXPECT_INSTALLED") != "1":
        pytest.skip("only asserted under scripts/test.sh (TORCHTUNE_PREFOPT_EXPECT_INSTALLED=1)")
    package_dir = Path(torchtune_prefopt.__file__).resolve().parent
    assert package_dir != REPO_ROOT / "torchtune_prefopt"
    assert package_dir.parent == Path(sysconfig.get_paths()["purelib"]).resolve()
    # the wheel carries real copies of the symlinked folders
    assert (package_dir / "configs" / "tiny" / "dpo.yaml").is_file()
    assert not (package_dir / "configs").is_symlink()


def test_pth_hook_is_free_at_startup(tmp_path):
    """The .pth runs at every interpreter start: it must not import torch/torchtune."""
    out = _python("import sys; print('torch' in sys.modules)", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

    out = _python(
        """
        import json, sys
        print(json.dumps({
            "heavy": sorted(m for m in ("torch", "torchtune", "omegaconf", "numpy")
                            if m in sys.modules),
            "finder": any(getattr(f, "_torchtune_prefopt_finder", False) for f in sys.meta_path),
        }))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"heavy": [], "finder": True}


def test_registry_entries_in_process():
    """Absolute paths, distributed, registered once however often install() runs."""
    import torchtune._recipe_registry as registry

    _tune_registry.install()
    _tune_registry.install()
    assert _tune_registry._register(registry) is True
    ours = [r for r in registry.get_all_recipes() if r.name == "prefopt_distributed"]
    assert len(ours) == 1
    recipe = ours[0]
    assert recipe.supports_distributed is True
    assert Path(recipe.file_path).is_absolute()
    assert Path(recipe.file_path).name == "prefopt_distributed.py"
    configs = {c.name: c.file_path for c in recipe.configs}
    everything = {name: str(path) for name, path in available_configs().items()}
    assert configs == {
        n: p for n, p in everything.items() if not _tune_registry.is_compare_config(n)
    }
    compare = [r for r in registry.get_all_recipes() if r.name == "prefopt_compare"]
    if compare:  # each config is listed once, under the recipe that runs it
        assert {c.name: c.file_path for c in compare[0].configs} == {
            n: p for n, p in everything.items() if _tune_registry.is_compare_config(n)
        }
    assert Path(configs["tiny/dpo"]).samefile(PACKAGED_DPO)
    # the loader wrapper does not show
    assert type(registry.__loader__).__name__ != "_PatchingLoader"
    # the finder leaves once both of its modules fired (the launcher: `tune run`'s Run class)
    import torchtune._cli.run as launcher

    assert getattr(launcher.Run._run_distributed, "_torchtune_prefopt_registered", False)
    assert not any(getattr(f, "_torchtune_prefopt_finder", False) for f in sys.meta_path)


def test_register_is_defensive():
    import types

    assert _tune_registry._register(types.ModuleType("empty")) is False

    odd = types.ModuleType("odd")
    odd._ALL_RECIPES = []
    odd.Recipe = lambda name: None  # a signature torchtune may one day have
    odd.Config = lambda **kw: kw
    assert _tune_registry._register(odd) is False
    assert odd._ALL_RECIPES == []


# --------------------------------------------------------------------------------------
# the real `tune` CLI


@pytest.mark.slow
def test_tune_ls_lists_recipe_and_configs(tmp_path):
    out = _tune(["ls"], tmp_path)
    assert out.returncode == 0, out.stderr
    listed = _ls_configs(out.stdout, "prefopt_distributed")
    assert "tiny/dpo" in listed
    everything = set(available_configs())
    compare = {n for n in everything if _tune_registry.is_compare_config(n)}
    assert set(listed) == everything - compare
    assert set(_ls_configs(out.stdout, "prefopt_compare")) == compare
    # torchtune's own recipes are still there
    assert _ls_configs(out.stdout, "full_finetune_distributed")


@pytest.mark.slow
def test_tune_cp_config_copies_exact_bytes(tmp_path):
    out = _tune(["cp", "tiny/dpo", "./my.yaml"], tmp_path)
    assert out.returncode == 0, out.stderr
    copied = (tmp_path / "my.yaml").read_bytes()
    assert copied == PACKAGED_DPO.read_bytes()
    assert copied == (REPO_ROOT / "configs" / "tiny" / "dpo.yaml").read_bytes()


@pytest.mark.slow
def test_tune_cp_recipe(tmp_path):
    source = REPO_ROOT / "recipes" / "prefopt_distributed.py"
    out = _tune(["cp", "prefopt_distributed", "./r.py"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r.py").read_bytes() == source.read_bytes()


@pytest.mark.slow
def test_third_party_configs_via_entry_point(tmp_path, acme_site):
    work = tmp_path / "work"
    work.mkdir()
    expected = acme_site / "acme_prefopt_configs" / "acme" / "dpo_big.yaml"

    out = _tune(["ls"], work, pythonpath=acme_site)
    assert out.returncode == 0, out.stderr
    listed = _ls_configs(out.stdout, "prefopt_distributed")
    assert "acme/dpo_big" in listed and "tiny/dpo" in listed

    out = _tune(["cp", "acme/dpo_big", "./a.yaml"], work, pythonpath=acme_site)
    assert out.returncode == 0, out.stderr
    assert (work / "a.yaml").read_text() == ACME_YAML

    out = _python(
        """
        from torchtune_prefopt._config import resolve_config
        print(resolve_config("acme/dpo_big"))
        print(resolve_config("tiny/dpo"))
        """,
        work,
        pythonpath=acme_site,
    )
    assert out.returncode == 0, out.stderr
    acme, tiny = out.stdout.splitlines()
    assert Path(acme).samefile(expected)
    assert Path(tiny).samefile(PACKAGED_DPO)


@pytest.mark.slow
def test_config_name_clash_is_an_error_naming_both(tmp_path):
    site = tmp_path / "site"
    clash = _write_config_dist(
        site, "clashing-configs", "clashing_configs", {"tiny/dpo.yaml": "batch_size: 1\n"}
    )

    out = _python(
        """
        from torchtune_prefopt._config import resolve_config, ConfigNameClashError
        try:
            resolve_config("tiny/dpo")
        except ConfigNameClashError as exc:
            print(exc)
        else:
            print("no error")
        """,
        tmp_path,
        pythonpath=site,
    )
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert "'tiny/dpo'" in message
    assert "torchtune-prefopt" in message and str(_config.packaged_configs_dir()) in message
    assert "clashing-configs" in message and str(clash / "tiny" / "dpo.yaml") in message
    assert len(message.splitlines()) == 1

    # `tune` keeps working: our configs stay registered, the clash is reported on stderr
    out = _tune(["ls"], tmp_path, pythonpath=site)
    assert out.returncode == 0, out.stderr
    assert "tiny/dpo" in _ls_configs(out.stdout, "prefopt_distributed")
    assert "provided twice" in out.stderr


def test_clash_between_two_third_party_packages(tmp_path):
    site = tmp_path / "site"
    _write_config_dist(site, "one-configs", "one_configs", {"x/y.yaml": "a: 1\n"})
    _write_config_dist(site, "two-configs", "two_configs", {"x/y.yaml": "a: 2\n"})
    out = _python(
        """
        from torchtune_prefopt._config import available_configs
        available_configs()
        """,
        tmp_path,
        pythonpath=site,
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("torchtune_prefopt._config.ConfigNameClashError:")
    assert "'x/y'" in last and "one-configs" in last and "two-configs" in last


# --------------------------------------------------------------------------------------
# resolve_config / load_config / parse


def test_resolve_config_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("tiny/dpo").samefile(PACKAGED_DPO)
    assert resolve_config("tiny/dpo").is_absolute()
    assert resolve_config("tiny/dpo.yaml").samefile(PACKAGED_DPO)  # suffix tolerated

    # an existing file path wins over a name, relative to the current directory
    local = tmp_path / "tiny" / "dpo.yaml"
    local.parent.mkdir()
    local.write_text("batch_size: 3\n")
    assert resolve_config("tiny/dpo.yaml") == local
    assert resolve_config(str(local)) == local
    assert resolve_config("tiny/dpo").samefile(PACKAGED_DPO)  # not a file: still the name


def test_unknown_config_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigNotFoundError) as info:
        resolve_config("tiny/dpp")
    message = str(info.value)
    assert "\n" not in message
    assert "'tiny/dpp'" in message and "tiny/dpo" in message and "tune ls" in message
    assert isinstance(info.value, ValueError)
    from torchtune_prefopt.errors import PrefOptUserError

    assert isinstance(info.value, PrefOptUserError)


def test_parse_exits_with_one_line_for_unknown_config(tmp_path):
    script = tmp_path / "my_recipe.py"
    script.write_text(
        textwrap.dedent(
            """
            from torchtune_prefopt._config import parse

            @parse
            def recipe_main(cfg):
                print("ran", cfg.batch_size)

            if __name__ == "__main__":
                recipe_main()
            """
        )
    )
    out = _run([sys.executable, script, "--config", "tiny/dpp"], tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("my_recipe.py: error: unknown config 'tiny/dpp'")
    assert "Traceback" not in out.stderr

    # under torchrun only rank 0 reports; PREFOPT_DEBUG=1 shows the traceback
    out = _run([sys.executable, script, "--config", "tiny/dpp"], tmp_path, extra_env={"RANK": "1"})
    assert (out.returncode, out.stderr) == (2, "")
    out = _run(
        [sys.executable, script, "--config", "tiny/dpp"], tmp_path, extra_env={"PREFOPT_DEBUG": "1"}
    )
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "ConfigNotFoundError" in out.stderr


@pytest.mark.slow
def test_parse_runs_recipe_with_config_name(tmp_path):
    script = tmp_path / "my_recipe.py"
    script.write_text(
        textwrap.dedent(
            """
            from torchtune_prefopt._config import parse

            @parse
            def recipe_main(cfg):
                print("ran", cfg.batch_size, "eval_every_n_steps" in cfg)

            if __name__ == "__main__":
                recipe_main()
            """
        )
    )
    out = _run(
        [sys.executable, script, "--config", "tiny/dpo", "batch_size=5", "~eval_every_n_steps"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ran 5 False"


def test_load_config_matches_torchtune_parse_semantics():
    from omegaconf import OmegaConf
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    # (torchtune refuses `~` on keys holding a _component_, e.g. ~eval_dataset)
    overrides = ["batch_size=4", "loss.beta=0.5", "~eval_every_n_steps", "optimizer.lr=1e-4"]
    cfg = load_config(["--config", "tiny/dpo", *overrides])

    parser = TuneRecipeArgumentParser()
    yaml_args, cli_args = parser.parse_known_args(["--config", str(PACKAGED_DPO), *overrides])
    reference = _merge_yaml_and_cli_args(yaml_args, cli_args)

    assert OmegaConf.to_container(cfg, resolve=False) == OmegaConf.to_container(
        reference, resolve=False
    )
    assert cfg.batch_size == 4 and cfg.loss.beta == 0.5 and "eval_every_n_steps" not in cfg
    assert cfg.checkpointer.output_dir == cfg.output_dir  # interpolation kept and working


def test_load_config_rejects_what_torchtune_rejects():
    with pytest.raises(ValueError, match="Additional flag arguments not supported"):
        load_config(["--config", "tiny/dpo", "--batch_size", "3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(["--config", "tiny/dpo", "batch_size"])
    with pytest.raises(ConfigNotFoundError):
        load_config(["--config", "no/such_config"])


def test_swapping_a_component_starts_from_its_own_defaults():
    """`KEY=NAME` for a component: the new component gets its own defaults plus what the
    command line sets; the old component's arguments are not carried over."""
    from torchtune_prefopt.losses import build_loss

    cfg = load_config(["--config", "tiny/dpo", "loss=simpo"])
    assert dict(cfg.loss) == {"_component_": "simpo"}
    simpo = build_loss(cfg.loss)
    assert (simpo.beta, simpo.gamma) == (2.0, 1.0)  # SimPO's defaults, not DPO's beta=0.1
    cfg = load_config(["--config", "tiny/dpo", "loss=ipo", "loss.tau=0.05"])
    assert dict(cfg.loss) == {"_component_": "ipo", "tau": 0.05}
    # the same component under another name keeps its arguments
    for same in ("dpo", "torchtune_prefopt.losses.DPOLoss"):
        cfg = load_config(["--config", "tiny/dpo", f"loss={same}", "loss.label_smoothing=0.1"])
        assert (cfg.loss.beta, cfg.loss.label_smoothing) == (0.1, 0.1)
    # `KEY._component_=...` keeps torchtune's semantics (arguments stay), as documented there
    cfg = load_config(
        ["--config", "tiny/dpo", "loss._component_=torchtune_prefopt.losses.RobustDPOLoss"]
    )
    assert cfg.loss.beta == 0.1
    # any component, e.g. the optimizer: AdamW's arguments do not leak into SGD
    cfg = load_config(["--config", "tiny/dpo", "optimizer=torch.optim.SGD", "optimizer.lr=0.01"])
    assert dict(cfg.optimizer) == {"_component_": "torch.optim.SGD", "lr": 0.01}
    # null still disables an optional component
    cfg = load_config(["--config", "tiny/dpo", "eval_dataset=null"])
    assert cfg.eval_dataset.get("_component_") is None
