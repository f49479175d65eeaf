"""The per-loss training runs of a comparison: their commands, configs and matching checks.

Every loss is trained by the ordinary ``prefopt_distributed`` recipe, launched as::

    tune run [--nproc_per_node N] prefopt_distributed --config <base_config> \\
        output_dir=<output_dir>/<run> [~loss.<old arg> ...] loss._component_=<Loss> loss.<arg>=<v> \\
        <compare.overrides> <compare.loss_overrides.<run>>

so each run is also an ordinary job one can launch anywhere (another node, a SLURM array)
and evaluate later with ``compare.skip_training=true``. Everything a loss does not change
(base weights, data, seed, steps, batch, optimizer, schedule) comes from the one base config,
which is what makes the comparison matched. KTO trains on unpaired rows: the base config's
paired dataset is swapped for its unpaired twin (:func:`kto_dataset_overrides`) and the
per-process batch multiplied by ``compare.kto_rows_per_pair`` (2: the same completions per
optimizer step as the paired losses).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "DEFAULT_LOSSES",
    "RunSpec",
    "dotlist",
    "kto_dataset_overrides",
    "loss_label",
    "matched_differences",
    "plan_runs",
    "replace_component",
]

DEFAULT_LOSSES = ("dpo", "ipo", "kto", "simpo")

# paired builder -> unpaired (KTO) twin; builders taking ``unpaired=True`` are handled generically
_KTO_TWINS = {
    "torchtune_prefopt.data.preference_dataset": "torchtune_prefopt.data.unpaired_from_paired",
    "torchtune_prefopt.data._paired.preference_dataset": "torchtune_prefopt.data.unpaired_from_paired",
    "torchtune_prefopt.data.synthetic_preference_dataset": "torchtune_prefopt.data.synthetic_kto_dataset",
    "torchtune_prefopt.data._synthetic.synthetic_preference_dataset": "torchtune_prefopt.data.synthetic_kto_dataset",
}
_UNPAIRED_FLAG = {
    "hh_rlhf_dataset",
    "ultrafeedback_binarized_dataset",
    "stack_exchange_paired_dataset",
}
_UNPAIRED_COMPONENTS = {
    "torchtune_prefopt.data.unpaired_from_paired",
    "torchtune_prefopt.data.synthetic_kto_dataset",
    "torchtune_prefopt.data.kto_dataset",
    "torchtune_prefopt.data.thumbs_dataset",
}


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _value(v: Any) -> str:
    """A value as torchtune/OmegaConf command-line text."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    s = str(v)
    if "=" in s:
        raise PrefOptUserError(f"cannot pass {s!r} on the command line (torchtune overrides cannot contain '=')")
    return s


def dotlist(prefix: str, node: Any) -> List[str]:
    """``{"a": 1, "b": {"c": 2}}`` under ``prefix`` -> ``["prefix.a=1", "prefix.b.c=2"]``."""
    node = _plain(node)
    if isinstance(node, Mapping):
        out = []
        for k, v in node.items():
            out += dotlist(f"{prefix}.{k}", v)
        return out
    return [f"{prefix}={_value(node)}"]


def loss_label(spec: Any) -> str:
    """``DPOLoss(beta=0.1)``-style label of a loss config."""
    spec = _plain(spec)
    if isinstance(spec, str):
        return spec
    spec = dict(spec or {})
    comp = str(spec.pop("_component_", spec.pop("name", "?")))
    args = ", ".join(f"{k}={v}" for k, v in spec.items())
    return f"{comp.rsplit('.', 1)[-1]}({args})"


def _component(node: Any) -> Optional[str]:
    node = _plain(node)
    return node.get("_component_") if isinstance(node, Mapping) else None


def kto_dataset_overrides(dataset_cfg: Any, explicit: Any = None) -> List[str]:
    """Command-line overrides that turn the base config's paired ``dataset`` into KTO rows.

    ``explicit``: ``compare.kto_dataset`` (a full dataset config) wins when given.
    """
    if explicit is not None:
        return replace_component("dataset", dataset_cfg, explicit)
    comp = _component(dataset_cfg)
    if comp is None:
        raise PrefOptUserError(
            "compare: cannot derive KTO's unpaired dataset from a dataset list; set compare.kto_dataset"
        )
    if comp in _UNPAIRED_COMPONENTS:
        return []
    if comp in _KTO_TWINS:
        node = dict(_plain(dataset_cfg))
        node["_component_"] = _KTO_TWINS[comp]
        node.pop("train_on_input", None)  # not an option of the unpaired builders
        return replace_component("dataset", dataset_cfg, node)
    if comp.rsplit(".", 1)[-1] in _UNPAIRED_FLAG:
        return ["dataset.unpaired=true"]
    raise PrefOptUserError(
        f"compare: don't know the unpaired (KTO) form of dataset {comp!r}; set compare.kto_dataset "
        "to a dataset config that yields unpaired rows (e.g. torchtune_prefopt.data.unpaired_from_paired)"
    )


@dataclass
class RunSpec:
    """One loss's training run."""

    name: str
    loss: Any  # loss config (mapping or short name)
    run_dir: Path
    overrides: List[str]
    command: List[str] = field(default_factory=list)

    @property
    def shell(self) -> str:
        return " ".join(shlex.quote(c) for c in self.command)


def replace_component(key: str, base_node: Any, new_node: Any) -> List[str]:
    """Overrides replacing the component config ``key`` (``base_node`` in the base config) by
    ``new_node``: torchtune's command line cannot delete a component, so every base argument
    the new component does not set is removed (``~key.arg``), then the new one is set."""
    base_node, new_node = _plain(base_node), _plain(new_node)
    if isinstance(new_node, str):
        new_node = {"_component_": new_node}
    out = []
    if isinstance(base_node, Mapping):
        out += [f"~{key}.{k}" for k in base_node if k != "_component_" and k not in new_node]
    return out + dotlist(key, new_node)


def _loss_overrides(spec: Any, base_loss: Any) -> List[str]:
    spec = _plain(spec)
    if isinstance(spec, str):
        spec = {"_component_": spec}
    if not isinstance(spec, Mapping) or not (spec.get("_component_") or spec.get("name")):
        raise PrefOptUserError(f"compare.loss_configs: each loss needs a _component_, got {spec!r}")
    spec = dict(spec)
    if "name" in spec and "_component_" not in spec:
        spec["_component_"] = spec.pop("name")
    return replace_component("loss", base_loss, spec)


def plan_runs(
    *,
    base_config: str,
    base_cfg: Any,
    output_dir,
    losses: Sequence[str],
    loss_configs: Mapping[str, Any],
    overrides: Sequence[str] = (),
    loss_overrides: Optional[Mapping[str, Sequence[str]]] = None,
    kto_dataset: Any = None,
    kto_rows_per_pair: int = 2,
    nproc_per_node: int = 1,
    tune: str = "tune",
    build_loss=None,
) -> List[RunSpec]:
    """One :class:`RunSpec` per loss name in ``losses`` (the run directory is ``output_dir/<name>``).

    ``base_cfg`` is the base config merged with ``overrides`` (used to find the dataset and
    batch size for KTO). ``build_loss`` (optional) builds each loss config to decide whether
    it is unpaired and to fail early on bad hyper-parameters.
    """
    if not losses:
        raise PrefOptUserError("compare.losses is empty")
    if len(set(losses)) != len(losses):
        raise PrefOptUserError(f"compare.losses has duplicates: {list(losses)}")
    runs = []
    for name in losses:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise PrefOptUserError(f"compare.losses: {name!r} is not a valid run name")
        if name not in loss_configs:
            raise PrefOptUserError(
                f"compare.losses: no compare.loss_configs.{name} (have {sorted(loss_configs)})"
            )
        spec = loss_configs[name]
        paired = True
        if build_loss is not None:
            try:
                loss_obj = build_loss(_plain(spec))
            except (ValueError, TypeError, ImportError) as e:
                raise PrefOptUserError(f"compare.loss_configs.{name}: {e}") from e
            paired = bool(getattr(loss_obj, "paired", True))
        run_dir = Path(output_dir) / name
        ov = [f"output_dir={run_dir}"] + _loss_overrides(spec, base_cfg.get("loss"))
        if not paired:
            ov += kto_dataset_overrides(base_cfg.get("dataset"), kto_dataset)
            bs = base_cfg.get("batch_size")
            if isinstance(bs, int) and kto_rows_per_pair > 1:
                ov.append(f"batch_size={bs * int(kto_rows_per_pair)}")
        ov += list(overrides)
        ov += list((loss_overrides or {}).get(name, []) or [])
        cmd = [tune, "run"]
        if nproc_per_node and int(nproc_per_node) > 1:
            cmd += ["--nproc_per_node", str(int(nproc_per_node))]
        cmd += ["prefopt_distributed", "--config", str(base_config), *ov]
        runs.append(RunSpec(name=name, loss=_plain(spec), run_dir=run_dir, overrides=ov, command=cmd))
    return runs


# Settings that must agree between runs for the comparison to be matched.
_MATCHED_KEYS = (
    "seed", "epochs", "max_steps_per_epoch", "gradient_accumulation_steps", "optimizer", "lr_scheduler",
    "clip_grad_norm", "model", "checkpointer.checkpoint_dir", "checkpointer.checkpoint_files",
    "tokenizer", "dtype", "shuffle",
)


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def matched_differences(configs: Mapping[str, Mapping[str, Any]], steps: Mapping[str, Optional[int]], rows_per_step: Mapping[str, Optional[float]]) -> List[str]:
    """Human-readable differences between the runs' saved configs (``torchtune_config.yaml``)
    in the settings that make a comparison matched, plus trained steps and completions per step."""
    diffs = []
    names = list(configs)
    if not names:
        return diffs
    for key in _MATCHED_KEYS:
        values = {n: _get(configs[n], key) for n in names}
        if len({repr(v) for v in values.values()}) > 1:
            diffs.append(f"{key} differs: " + ", ".join(f"{n}={values[n]!r}" for n in names))
    if len(set(steps.values())) > 1:
        diffs.append("optimizer steps differ: " + ", ".join(f"{n}={steps[n]}" for n in names))
    if len(set(rows_per_step.values())) > 1:
        diffs.append("completions per optimizer step differ: " + ", ".join(f"{n}={rows_per_step[n]}" for n in names))
    return diffs
