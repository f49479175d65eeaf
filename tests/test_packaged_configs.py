"""Every packaged config (``configs/**/*.yaml``) is loadable, valid and runnable by name.

Fast and download-free: real-model configs are checked down to their builders' signatures
(and model builders are instantiated on the ``meta`` device, no memory, no weights); the tiny
configs additionally build their model, tokenizer, loss and datasets for real.

Checked for each config:
    * OmegaConf loads it, interpolations resolve, every top-level key is in the recipe's
      key table (``training.recipe_config``) and its ``validate_config`` passes (with ``device=cpu``, the
      only check that needs hardware);
    * every ``_component_`` resolves with torchtune's own resolver, and its keyword arguments
      (plus what the recipe passes: ``tokenizer=``, the optimizer's params, ...) bind to the
      callable's signature;
    * the loss builds with ``build_loss`` and matches the config's name; the dataset kind
      (paired vs unpaired KTO rows) matches the loss; SimPO configs load no reference;
    * the header comment says how to launch it, and the name resolves with ``resolve_config``;
and overall: one config per loss for every required model family / fine-tuning kind.
Configs whose header launches another of our recipes (``prefopt_compare``) get only the
generic checks (loads, launch command, name resolution, distinct output_dir).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config as tt_config
from torchtune.config._utils import _get_component_from_path

from torchtune_prefopt import _config
from torchtune_prefopt.losses import build_loss
from torchtune_prefopt.losses.registry import get_loss_class
from torchtune_prefopt.training import recipe_config

REPO_ROOT = Path(__file__).resolve().parents[1]

LOSS_NAMES = ("dpo", "ipo", "kto", "simpo")
# (config-name prefix, fine-tuning kind) that must exist for every loss in LOSS_NAMES.
REQUIRED = {
    ("tiny/", "full"),
    ("tiny/", "lora"),
    ("qwen2_5/0.5B", "full"),
    ("llama3_2/1B", "full"),
    ("llama3_2/1B", "lora"),
    ("llama3_1/8B", "full"),
    ("llama3_1/8B", "lora"),
    ("llama3_3/70B", "lora"),
    ("hf/", "full"),  # any HF folder: model_dir=<folder>
    ("hf/", "lora"),
    ("smollm2/135M", "full"),
    ("smollm2/135M", "lora"),
}
# No config name may equal one torchtune itself ships: `tune cp NAME` searches every recipe, so
# a clash would make one of the two unreachable. Our names are <size>_<loss>[_lora].
ALLOWED_TORCHTUNE_CLASHES: set = set()
KTO_BUILDERS = {
    "torchtune_prefopt.data.kto_dataset",
    "torchtune_prefopt.data.unpaired_from_paired",
    "torchtune_prefopt.data.synthetic_kto_dataset",
}
# What the recipe passes to each component besides the config's own keyword arguments.
RECIPE_ARGS: Dict[str, Dict[str, Any]] = {
    "model": {},
    "tokenizer": {},
    "checkpointer": {},
    "ref_checkpointer": {},
    "dataset": {"tokenizer": None},
    "eval_dataset": {"tokenizer": None},
    "optimizer": {"params": []},
    "lr_scheduler": {"optimizer": None, "num_training_steps": 1, "last_epoch": -1},
    "metric_logger": {},
}


def _config_dir() -> Path:
    return _config.packaged_configs_dir()


def _all_names() -> List[str]:
    return sorted(_config._yaml_files(_config_dir()))


def _path(name: str) -> Path:
    return _config_dir() / f"{name}.yaml"


def _header(name: str) -> str:
    lines = []
    for line in _path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _launched_recipes(name: str) -> set:
    """Recipes the header's ``tune run ... RECIPE --config NAME`` lines launch."""
    return set(re.findall(rf"(\S+) --config {re.escape(name)}(?![\w/.-])", _header(name)))


ALL_NAMES = _all_names()
# Configs of our other recipes (e.g. prefopt_compare's tiny/compare) get the generic checks
# only; every other config is a prefopt_distributed config and gets them all.
NAMES = [
    n
    for n in ALL_NAMES
    if not (_launched_recipes(n) and "prefopt_distributed" not in _launched_recipes(n))
]
TINY = [n for n in NAMES if n.startswith("tiny/")]
REAL = [n for n in NAMES if not n.startswith("tiny/")]


@functools.lru_cache(maxsize=None)
def _raw(name: str) -> DictConfig:
    return OmegaConf.load(_path(name))


@functools.lru_cache(maxsize=None)
def _hf_folder() -> str:
    """A tiny SmolLM2-like HF folder (config.json, weights, tokenizer): what ``model_dir`` of
    the ``hf/*`` and ``smollm2/*`` configs points at here (no download)."""
    import tempfile

    from hf_families import make_family_folder

    return str(make_family_folder("smollm2", Path(tempfile.mkdtemp(prefix="prefopt-hf-")) / "m"))


def _cfg(name: str) -> DictConfig:
    cfg = _raw(name).copy()
    if "model_dir" in cfg.keys():  # hf/* (required: ???) and smollm2/* (the download folder)
        cfg.model_dir = _hf_folder()
    return cfg


def _parse_name(name: str):
    """``tiny/dpo_lora`` -> ("tiny/", "lora", "dpo"); ``llama3_1/8B_kto`` -> ("llama3_1/8B", "full", "kto")."""
    family, base = name.split("/", 1)
    if family in ("tiny", "hf"):
        loss, _, lora = base.partition("_")
        return f"{family}/", ("lora" if lora == "lora" else "full"), loss
    m = re.fullmatch(r"(?P<size>[^_]+)_(?P<loss>[a-z]+)(?P<lora>_lora)?", base)
    assert m, f"{name}: config names are <family>/<size>_<loss>[_lora] (like tiny/<loss>[_lora])"
    return f"{family}/{m['size']}", ("lora" if m["lora"] else "full"), m["loss"]


def _components(node: Any, where: str = ""):
    """Yield (dotted key, DictConfig) for every node with a ``_component_``."""
    if isinstance(node, DictConfig):
        if "_component_" in node:
            yield where, node
        for k in node.keys():
            yield from _components(node[k], f"{where}.{k}" if where else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _components(v, f"{where}[{i}]")


def _is_lora_model(cfg: DictConfig) -> bool:
    return cfg.model._component_.rsplit(".", 1)[-1].startswith("lora_")


# ----------------------------------------------------------------------------- per config


def test_configs_found():
    assert TINY and REAL, f"no configs under {_config_dir()}"
    repo_configs = REPO_ROOT / "configs"
    if repo_configs.is_dir() and not _same(repo_configs, _config_dir()):
        # Installed copy (scripts/test.sh): it must be the current source tree's configs.
        assert sorted(_config._yaml_files(repo_configs)) == ALL_NAMES, (
            "installed configs are stale; reinstall"
        )


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@pytest.mark.parametrize("name", NAMES)
def test_loads_and_validates(name):
    cfg = _cfg(name)
    assert "config" not in cfg
    unknown = sorted(set(cfg.keys()) - set(recipe_config.known_keys()))
    assert not unknown, f"{name}: keys not in the recipe's key table: {unknown}"
    OmegaConf.to_container(cfg, resolve=True)  # every ${...} interpolation resolves
    assert str(cfg.device) in ("cpu", "cuda")
    cfg.device = "cpu"  # the only hardware-dependent check in validate_config
    recipe_config.validate_config(cfg, local=False)  # no weights here: structure, not files
    assert cfg.checkpointer.output_dir == cfg.output_dir
    assert cfg.metric_logger.log_dir.startswith(str(cfg.output_dir))


@pytest.mark.parametrize("name", NAMES)
def test_components_resolve_and_bind(name):
    cfg = _cfg(name)
    seen = 0
    for key, node in _components(cfg):
        if key == "loss":
            continue  # may be a short name; test_loss_builds_and_matches_name
        path = node._component_
        obj = _get_component_from_path(path)
        kwargs = {
            k: v
            for k, v in OmegaConf.to_container(node, resolve=True).items()
            if k != "_component_"
        }
        top = key.split(".", 1)[0].split("[", 1)[0]
        assert top in RECIPE_ARGS, f"{name}: unexpected component at '{key}'"
        try:
            inspect.signature(obj).bind(**RECIPE_ARGS[top], **kwargs)
        except TypeError as err:
            pytest.fail(
                f"{name}: {key} = {path}({sorted(kwargs)}) does not match its signature: {err}"
            )
        seen += 1
    assert seen >= 7


@pytest.mark.parametrize("name", NAMES)
def test_loss_builds_and_matches_name(name):
    cfg = _cfg(name)
    _, kind, loss_name = _parse_name(name)
    assert loss_name in LOSS_NAMES, f"{name}: unknown loss in name"
    loss = build_loss(cfg.loss)
    assert type(loss) is get_loss_class(loss_name), f"{name}: loss is {type(loss).__name__}"

    ds = cfg.dataset._component_
    if not loss.paired:
        assert ds in KTO_BUILDERS, f"{name}: KTO needs unpaired rows, dataset is {ds}"
        assert cfg.batch_size >= 2
    else:
        assert ds not in KTO_BUILDERS, f"{name}: paired loss with unpaired dataset {ds}"
    if cfg.get("eval_dataset") is not None:
        assert cfg.eval_dataset._component_ not in KTO_BUILDERS, "evaluation is paired"
    if loss.reference_free:
        assert cfg.get("ref_checkpointer") is None
        assert (cfg.get("reference") or {}).get("quantization") is None
    assert _is_lora_model(cfg) == (kind == "lora")
    if kind == "lora":
        for key in (
            "lora_attn_modules",
            "apply_lora_to_mlp",
            "apply_lora_to_output",
            "lora_rank",
            "lora_alpha",
        ):
            assert key in cfg.model, f"{name}: the recipe reads model.{key}"
        assert cfg.get("ref_checkpointer") is None, (
            "LoRA's reference is the base with adapters disabled"
        )


@pytest.mark.parametrize("name", ALL_NAMES)
def test_header_says_how_to_launch(name):
    header = _header(name)
    assert "tune run" in header and _launched_recipes(name), (
        f"{name}: no launch command in the header"
    )
    if name not in NAMES:
        return  # another recipe's config
    assert "--nproc_per_node" in header
    if name in REAL:
        assert "tune download" in header
        if "llama" in name:
            assert "HF_TOKEN" in header or "--hf-token" in header
        if name.startswith("llama3_3/70B"):
            assert "--nnodes" in header and "--rdzv_endpoint" in header and "srun" in header


@pytest.mark.parametrize("name", ALL_NAMES)
def test_resolve_config_finds_it(name):
    assert "config" not in _raw(name)
    assert _same(_config.resolve_config(name), _path(name))
    assert _same(_config.resolve_config(f"{name}.yaml"), _path(name))


# ----------------------------------------------------------------------------- real models


@pytest.mark.parametrize("name", REAL)
def test_real_config_settings(name):
    cfg = _cfg(name)
    prefix, kind, loss_name = _parse_name(name)
    loss = build_loss(cfg.loss)
    assert cfg.device == "cuda" and cfg.dtype == "bf16"
    assert cfg.compile is False
    assert cfg.metric_logger._component_ == "torchtune.training.metric_logging.DiskLogger"
    assert cfg.save_every_n_steps and cfg.keep_last_n_checkpoints
    if prefix in ("llama3_1/8B", "llama3_3/70B"):
        assert cfg.enable_activation_checkpointing is True
    if not loss.reference_free:
        assert cfg.reference.quantization is None
    # The tokenizer and the checkpoint come from the same download.
    if "model_dir" in cfg:  # one folder for all three
        raw = _raw(name)
        for key in ("model", "tokenizer", "checkpointer"):
            assert OmegaConf.to_container(raw[key])["model_dir"] == "${model_dir}", f"{name}: {key}"
        if prefix != "hf/":
            assert str(raw.model_dir) in _header(name)
    else:
        ckpt_dir = str(cfg.checkpointer.checkpoint_dir).rstrip("/")
        assert str(cfg.tokenizer.path).startswith(ckpt_dir + "/")
        assert str(cfg.checkpointer.checkpoint_dir) in _header(name)
    # Paper-range hyper-parameters (see the comments in the configs).
    lr = float(cfg.optimizer.lr)
    assert (5e-6 <= lr <= 5e-5) if kind == "lora" else (3e-7 <= lr <= 1e-6), f"{name}: lr {lr}"
    if loss_name == "dpo":
        assert loss.beta == pytest.approx(0.1)
    elif loss_name == "ipo":
        assert 0.01 <= loss.tau <= 0.1 and loss.average_logps is True
    elif loss_name == "kto":
        assert loss.beta == pytest.approx(0.1)
        assert loss.desirable_weight == loss.undesirable_weight == 1.0
    elif loss_name == "simpo":
        assert 2.0 <= loss.beta <= 10.0 and 0.3 <= loss.gamma / loss.beta <= 0.8


def test_output_dirs_are_distinct():
    dirs = {}
    for name in ALL_NAMES:
        out = str(_raw(name).output_dir)
        assert out not in dirs, f"{name} and {dirs.get(out)} share output_dir {out}"
        dirs[out] = name


@functools.lru_cache(maxsize=None)
def _meta_model_adapters(model_yaml: str) -> int:
    """Build a model config on the meta device (no memory); return its number of LoRA params."""
    from torchtune.modules.peft import get_adapter_params

    with torch.device("meta"):
        model = tt_config.instantiate(OmegaConf.create(model_yaml))
    return len(get_adapter_params(model))


@pytest.mark.parametrize("name", REAL)
def test_real_model_builds_on_meta_device(name):
    cfg = _cfg(name)
    n_adapters = _meta_model_adapters(OmegaConf.to_yaml(cfg.model, resolve=True))
    assert (n_adapters > 0) == _is_lora_model(cfg)


def test_torchtune_name_clashes_are_known_and_resolve_to_ours():
    from torchtune._recipe_registry import get_all_recipes

    recipes = get_all_recipes()
    builtin = {c.name for r in recipes if not r.name.startswith("prefopt_") for c in r.configs}
    clashes = set(ALL_NAMES) & builtin
    assert clashes <= ALLOWED_TORCHTUNE_CLASHES, (
        f"new clash with torchtune's configs: {clashes - ALLOWED_TORCHTUNE_CLASHES}"
    )
    ours = next((r for r in recipes if r.name == "prefopt_distributed"), None)
    assert ours is not None, (
        "prefopt_distributed is not registered with tune (the .pth hook did not run)"
    )
    from torchtune._cli.run import Run

    for name in sorted(clashes):
        found = Run._get_config(
            None, name, ours
        )  # what `tune run prefopt_distributed --config NAME` uses
        assert found is not None and _same(Path(found.file_path), _path(name))


# ----------------------------------------------------------------------------- coverage


def test_one_config_per_loss_per_required_family():
    have = {_parse_name(n) for n in NAMES}
    missing = sorted(
        f"{prefix}{'' if prefix.endswith('/') else '_'}{kind}_{loss}"
        for prefix, kind in REQUIRED
        for loss in LOSS_NAMES
        if (prefix, kind, loss) not in have
    )
    assert not missing, f"missing configs: {missing}"


# ----------------------------------------------------------------------------- tiny configs


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer(tok_yaml: str):
    return tt_config.instantiate(OmegaConf.create(tok_yaml))


@functools.lru_cache(maxsize=None)
def _tiny_dataset(tok_yaml: str, ds_yaml: str):
    """Tokenizing a synthetic split takes seconds: build each (tokenizer, dataset) once."""
    return tt_config.instantiate(OmegaConf.create(ds_yaml), tokenizer=_tiny_tokenizer(tok_yaml))


@pytest.mark.parametrize("name", TINY)
def test_tiny_components_instantiate(name):
    from torchtune.modules.peft import get_adapter_params

    cfg = _cfg(name)
    assert cfg.device == "cpu"
    model = tt_config.instantiate(cfg.model)
    assert (len(get_adapter_params(model)) > 0) == _is_lora_model(cfg)
    tok_yaml = OmegaConf.to_yaml(cfg.tokenizer)
    assert _tiny_tokenizer(tok_yaml).pad_id is not None
    loss = build_loss(cfg.loss)

    ds = _tiny_dataset(tok_yaml, OmegaConf.to_yaml(cfg.dataset))
    item = ds[0]
    assert ("chosen_input_ids" in item) == loss.paired, (
        f"{name}: dataset kind does not fit {type(loss).__name__}"
    )
    assert len(ds) >= cfg.batch_size * 2  # at least one global batch with 2 processes
    if cfg.get("eval_dataset") is not None:
        ev = _tiny_dataset(tok_yaml, OmegaConf.to_yaml(cfg.eval_dataset))
        assert "chosen_input_ids" in ev[0]
