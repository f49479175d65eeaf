"""The one owner of ``prefopt_distributed``'s config keys: a table from which everything is
derived.

Each :class:`ConfigKey` says its name, its default, how its value is checked, whether (and
which part of it) belongs to a run's identity, and one line of documentation. From
:data:`RECIPE_KEYS` come

* :func:`validate_config`: the start-up check of a whole config (one ``error:`` line naming
  the key, before anything is built or written);
* :func:`read_settings`: every key with its default filled in (:class:`RecipeSettings`, the
  typed view the recipe reads instead of ``cfg.get(key, default)``);
* :func:`identity_keys` / :func:`identity_digests`: what a run's identity is made of
  (:class:`~torchtune_prefopt.training.checkpoints.RunIdentity`);
* :func:`key_table_markdown`: the key table of docs/ARCHITECTURE.md (a test keeps it equal);
* :func:`unknown_key_error`: the "did you mean" line.

The same machinery serves ``prefopt_compare``'s table
(:data:`torchtune_prefopt.compare.settings.COMPARE_KEYS`): :func:`check_known_keys`,
:func:`check_values`, :func:`read_table` and :func:`table_markdown` take any table of
:class:`ConfigKey` rows, with keys nested to any depth (``compare.heldout.max_rows``).

In the spirit of torchtitan's typed ``Trainer.Config``, but for torchtune's YAML: the config
stays an OmegaConf tree with ``_component_`` nodes, and this table is the schema of its top
level.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.training import config_checks as checks

__all__ = [
    "REQUIRED",
    "check_known_keys",
    "check_values",
    "read_table",
    "table_markdown",
    "ConfigKey",
    "RECIPE_KEYS",
    "RecipeSettings",
    "configured",
    "content_identity_keys",
    "identity_digests",
    "identity_keys",
    "key_table_markdown",
    "known_keys",
    "read_settings",
    "unknown_key_error",
    "validate_config",
]

#: the default of a key that must be given
REQUIRED = object()


def configured(node: Any) -> bool:
    """A component is configured unless it is null (``key=null`` on the command line leaves a
    node whose ``_component_`` is null)."""
    from omegaconf import DictConfig

    if node is None:
        return False
    if isinstance(node, DictConfig) and "_component_" in node and node.get("_component_") is None:
        return False
    return True


def unknown_key_error(key: str, known: Iterable[str], where: str = "") -> PrefOptUserError:
    """``unknown config key '<where><key>' (did you mean '<closest>'?)``."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return PrefOptUserError(f"unknown config key '{where}{key}'{hint}")


# --------------------------------------------------------------------------- value checks
# Each takes (config key, value) and raises one PrefOptUserError line; None means "not set"
# for the optional keys (their default is then used).


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(key: str, v: Any) -> None:
    if not _is_int(v) or v < 1:
        raise PrefOptUserError(f"{key} must be an integer >= 1, got {v!r}")


def optional_positive_int(key: str, v: Any) -> None:
    if v is not None:
        positive_int(key, v)


def _seed(key: str, v: Any) -> None:
    if v is not None and (not _is_int(v) or v < 0):
        raise PrefOptUserError(f"{key} must be an integer >= 0 (or null: random), got {v!r}")


def flag(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise PrefOptUserError(f"{key} must be true or false, got {v!r}")


def choice(*options: str) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if v not in options:
            want = " or ".join(repr(o) for o in options)
            raise PrefOptUserError(f"{key} must be {want}, got {v!r}")

    return check


def _clip(key: str, v: Any) -> None:
    if v is not None and not (_is_number(v) and math.isfinite(v) and v > 0):
        raise PrefOptUserError(f"{key} must be > 0 or null, got {v!r}")


def _non_negative(key: str, v: Any) -> None:
    if not (_is_number(v) and math.isfinite(v) and v >= 0):
        raise PrefOptUserError(f"{key} must be a number >= 0 (0: off), got {v!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _device(key: str, v: Any) -> None:
    device = str(v)
    if not (device == "cpu" or device.startswith("cuda")):
        raise PrefOptUserError(f"{key} must be 'cpu' or 'cuda', got {device!r}")


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class ConfigKey:
    """One top-level key of a ``prefopt_distributed`` config.

    Attributes:
        name: the key (``reference.precompute`` for a key of the ``reference`` mapping).
        default: its value when absent (:data:`REQUIRED`: the key must be given).
        doc: one line for the key table.
        check: ``(key, value)`` -> raises; ``None``: no value check of its own. For a
            component it runs after the signature check, on the configured node.
        component: a ``_component_`` node, checked against its callable's signature:
            ``(positional, injected)``: how many leading positional arguments and which
            keyword arguments the recipe passes. A list of components is allowed where
            ``injected`` has ``tokenizer`` (datasets).
        identity: part of a run's identity (a resume must keep it): ``True`` for the whole
            value, a tuple of the sub-keys that count, or ``"content"``: what the component
            reads, not its config (the dataset's tokenized rows, the tokenizer's behaviour, the
            checkpoint's weight bytes; paths may change freely, see
            :func:`~torchtune_prefopt.training.checkpoints.content_digests`).
        nullable: an explicit ``null`` is a value of its own (``seed: null``: a random
            seed); otherwise ``null`` means the default.
    """

    name: str
    default: Any
    doc: str
    check: Optional[Callable[[str, Any], None]] = None
    component: Optional[Tuple[int, frozenset]] = None
    identity: Any = False
    nullable: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _node_check(check: Callable[[Any, str], None]) -> Callable[[str, Any], None]:
    """A ``config_checks`` check of a component node (``(node, key)``) as a key check."""
    return lambda key, node: check(node, key)


def _component(positional: int = 0, *injected: str) -> Tuple[int, frozenset]:
    return positional, frozenset(injected)


_K = ConfigKey
#: every key, in the order errors are looked for (scalars first, then components)
RECIPE_KEYS: Tuple[ConfigKey, ...] = (
    _K("output_dir", REQUIRED, "where checkpoints, logs and caches go (one run per directory)"),
    _K("batch_size", REQUIRED, "pairs (KTO: rows) per process per micro-batch", positive_int),
    _K("gradient_accumulation_steps", REQUIRED, "micro-batches per optimizer step", positive_int),
    _K("epochs", REQUIRED, "passes over the dataset", positive_int, identity=True),
    _K("max_steps_per_epoch", None, "cap on optimizer steps per epoch", optional_positive_int, identity=True),
    _K("log_every_n_steps", 1, "metrics every n steps", optional_positive_int),
    _K("save_every_n_steps", None, "a step checkpoint every n steps (and always at the end)", optional_positive_int),
    _K("keep_last_n_checkpoints", None, "delete older step checkpoints", optional_positive_int),
    _K("eval_every_n_steps", None, "held-out evaluation every n steps (and at start and end)", optional_positive_int),
    _K("logprobs_chunk_size", 1024, "completion tokens projected onto the vocabulary at once", optional_positive_int),
    _K("seed", 0, "data order, LoRA init and dropout RNG (null: random)", _seed, identity=True, nullable=True),
    _K("resume_from_checkpoint", False, "continue the newest complete checkpoint of output_dir", flag),
    _K("overwrite_output_dir", False, "delete another run's checkpoints in output_dir first", flag),
    _K("shuffle", True, "shuffle the data order each epoch", flag, identity=True),
    _K("compile", False, "torch.compile the decoder layers and the loss", flag),
    _K("packed", False, "sequences side by side without padding", flag),
    _K("share_prompt", False, "with packed: each prompt computed once for both completions", flag),
    _K("nonfinite", "stop", "a non-finite loss or gradient norm: stop or skip the step", choice("stop", "skip")),
    _K("dtype", "fp32", "parameter and compute dtype (log-softmax is always fp32)", choice("fp32", "bf16"), identity=True),
    _K("clip_grad_norm", None, "clip the global gradient norm to this value", _clip, identity=True),
    _K("router_aux_loss_coef", 0.0, "MoE models: loss += coef x the router load-balancing loss (TRL's name and meaning; 0: off)", _non_negative, identity=True),
    _K("reference.quantization", None, "frozen reference in torchao int8 / fp8 / fp8_dynamic", identity=True),
    _K("reference.precompute", False, "reference log-probs computed once and cached; the reference model is freed", flag),
    _K("device", "cpu", "cpu or cuda (one GPU per process under torchrun)", _device),
    _K("enable_activation_checkpointing", False, "recompute decoder layers in backward", flag),
    _K("fsdp_cpu_offload", False, "FSDP2 parameters and gradients on the CPU", flag),
    _K("fsdp_reshard_after_forward", True, "FSDP2: free gathered parameters after forward (one process is not wrapped)", flag),
    _K("custom_sharded_layers", None, "extra module names FSDP2 shards on their own"),
    _K("recipe_name", None, "set by torchtune's launcher"),
    _K("model_dir", None, "a Hugging Face model folder (hf/* configs build model, tokenizer and checkpointer from it)"),
    _K("model", REQUIRED, "a torchtune model builder, or models.hf.hf_decoder for an HF folder (lora_* builders: LoRA)", _node_check(checks.check_lora_settings), component=_component(), identity=True),
    _K("tokenizer", REQUIRED, "a torchtune tokenizer, or models.hf.hf_tokenizer (the folder's chat template); max_seq_len truncates rows", component=_component(), identity="content"),
    _K("checkpointer", REQUIRED, "the base weights: models.hf.hf_checkpointer or torchtune's FullModelHFCheckpointer", component=_component(), identity="content"),
    _K("ref_checkpointer", None, "another checkpoint as the frozen reference (default: the base)", component=_component(), identity="content"),
    _K("dataset", REQUIRED, "a dataset builder, or a list of them (concatenated)", component=_component(0, "tokenizer"), identity="content"),
    _K("eval_dataset", None, "held-out paired rows (reward accuracy, margins)", component=_component(0, "tokenizer")),
    _K("loss", REQUIRED, "a loss name or _component_ (torchtune_prefopt.losses)", identity=True),
    _K("optimizer", REQUIRED, "a torch optimizer (given the trainable parameters)", _node_check(checks.check_optimizer_values), component=_component(1), identity=True),
    _K("lr_scheduler", None, "a torchtune scheduler (given the optimizer and num_training_steps)", component=_component(1, "num_training_steps", "last_epoch"), identity=True),
    _K("metric_logger", None, "a torchtune metric logger (null: none)", _node_check(checks.check_metric_logger_installed), component=_component()),
)  # fmt: skip

_BY_NAME: Dict[str, ConfigKey] = {k.name: k for k in RECIPE_KEYS}


def _sections(keys: Sequence[ConfigKey]) -> Dict[str, Tuple[str, ...]]:
    """``{prefix: its direct sub-keys}`` of the mapping keys of a table (``""``: the top
    level; ``"reference"``: ``precompute``, ``quantization``)."""
    out: Dict[str, Tuple[str, ...]] = {}
    for k in keys:
        parts = k.name.split(".")
        for depth in range(len(parts)):
            prefix, child = ".".join(parts[:depth]), parts[depth]
            if child not in out.setdefault(prefix, ()):
                out[prefix] += (child,)
    return out


def known_keys() -> List[str]:
    """The top-level keys a ``prefopt_distributed`` config may have."""
    return sorted(_sections(RECIPE_KEYS)[""])


def check_known_keys(cfg: Any, keys: Sequence[ConfigKey]) -> None:
    """Every key of ``cfg`` at every level the table describes is one of its rows (the
    children of a key the table does not go into, a component or a free mapping, are not
    checked here): else ``unknown config key '<a.b>' (did you mean '<a.c>'?)``."""
    from omegaconf import DictConfig

    for prefix, children in _sections(keys).items():
        node = _raw(cfg, prefix) if prefix else cfg
        if node is None:
            continue
        if not isinstance(node, DictConfig):
            listed = ", ".join(f"{prefix}.{c}" for c in children)
            raise PrefOptUserError(f"{prefix} must be a mapping ({listed}), got {node!r}")
        bad = sorted(set(node.keys()) - set(children))
        if bad:
            raise unknown_key_error(bad[0], children, f"{prefix}." if prefix else "")


def check_values(cfg: Any, keys: Sequence[ConfigKey]) -> None:
    """Each scalar key's own check on its value (an absent key: its default; an explicit null
    is checked, so a null flag is an error)."""
    for key in keys:
        if key.check is None or key.component is not None:
            continue
        value = _raw(cfg, key.name, _ABSENT)
        key.check(key.name, (None if key.required else key.default) if value is _ABSENT else value)


# --------------------------------------------------------------------------- settings


class RecipeSettings(dict):
    """Every key of a table with its default filled in; nested keys read as
    ``reference_quantization``. Components are the config's nodes (or ``None`` when not
    configured)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_ABSENT = object()


def _raw(cfg: Any, name: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, name, default=default)


def read_table(cfg: Any, keys: Sequence[ConfigKey], strip: str = "") -> RecipeSettings:
    """The config's values with the table's defaults (``None`` values of optional scalars
    fall back to the default as well, unless the key is ``nullable``); names lose the prefix
    ``strip`` and read with ``_`` for ``.``."""
    out = RecipeSettings()
    for key in keys:
        value = _raw(cfg, key.name, _ABSENT)
        if key.component is not None:
            value = value if value is not _ABSENT and configured(value) else None
        elif value is _ABSENT or (value is None and not key.nullable):
            value = None if key.required else key.default
        name = key.name[len(strip) :] if strip and key.name.startswith(strip) else key.name
        out[name.replace(".", "_")] = value
    return out


def read_settings(cfg: Any) -> RecipeSettings:
    """A ``prefopt_distributed`` config's :func:`read_table` (``log_every_n_steps: null``
    logs every step)."""
    return read_table(cfg, RECIPE_KEYS)


# --------------------------------------------------------------------------- identity


def identity_keys() -> Tuple[str, ...]:
    """The names a run's identity digests: config keys (``loss``, ``optimizer``, ...) and the
    content keys (:func:`content_identity_keys`)."""
    out: List[str] = []
    for key in RECIPE_KEYS:
        if key.identity is True or key.identity == "content":
            out.append(key.name)
        elif key.identity:
            out += [f"{key.name}.{sub}" for sub in key.identity]
    return tuple(out)


def content_identity_keys() -> Tuple[str, ...]:
    """The keys whose identity is what they read, not their config (dataset, tokenizer,
    checkpoints)."""
    return tuple(k.name for k in RECIPE_KEYS if k.identity == "content")


def _paths_free(value: Any) -> Any:
    """An identity value with the folders it names replaced by what they hold: a component's
    ``model_dir`` (an HF model folder: ``models.hf.hf_decoder``) counts as the bytes of its
    ``config.json``, which decide the architecture; the same files at another path are the
    same model (the weights' bytes are the checkpointer's content identity)."""
    if not isinstance(value, dict) or not isinstance(value.get("model_dir"), str):
        return value
    config = Path(value["model_dir"]).expanduser() / "config.json"
    if not config.is_file():
        return value
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    return {**value, "model_dir": f"config.json sha256:{digest}"}


def identity_digests(cfg: Any, effective: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """``{key: short sha256 of the resolved value}`` for every :func:`identity_keys` key.
    ``effective``: values the run actually uses instead of the config's (``reference.quantization``
    is ignored with LoRA: the identity holds what the reference plan decided; the content keys'
    digests of what they read, which the recipe computes)."""
    from torchtune_prefopt.plain import to_plain

    out = {}
    for name in identity_keys():
        value = to_plain(effective[name] if name in (effective or {}) else _raw(cfg, name))
        value = _paths_free(value)
        out[name] = hashlib.sha256(
            json.dumps(value, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
    return out


# --------------------------------------------------------------------------- validation


def validate_config(cfg: Any, local: bool = True) -> RecipeSettings:
    """Check a config before anything is built or written; one-line errors name the key.
    Returns its :func:`read_settings`.

    ``local=False`` skips what depends on this machine (device, files, output_dir), e.g. for
    commands written here to run on a cluster.
    """
    import torch
    from omegaconf import ListConfig, OmegaConf

    from torchtune_prefopt.reference.quantize import check_quantization_supported

    for name in cfg.keys():  # a `???` value: say which key to pass, not an interpolation error
        if OmegaConf.is_missing(cfg, name):
            doc = f" ({_BY_NAME[name].doc})" if name in _BY_NAME else ""
            raise PrefOptUserError(f"config key '{name}' is required{doc}: pass {name}=<value>")
    checks.check_interpolations(cfg)  # first: reading any key resolves its interpolations
    check_known_keys(cfg, RECIPE_KEYS)
    for key in RECIPE_KEYS:
        if key.required and key.name not in ("batch_size", "gradient_accumulation_steps", "epochs"):
            if cfg.get(key.name) is None:
                raise PrefOptUserError(f"config key '{key.name}' is required")
    check_values(cfg, RECIPE_KEYS)
    s = read_settings(cfg)
    if s.share_prompt and not s.packed:
        raise PrefOptUserError(
            "share_prompt: true needs packed: true (a shared prompt is a packed layout); "
            "set packed=true or share_prompt=false"
        )
    if local and str(s.device).startswith("cuda") and not torch.cuda.is_available():
        advice = "device=cpu dtype=fp32" if s.dtype == "bf16" else "device=cpu"
        raise PrefOptUserError(
            f"device is 'cuda' but no CUDA device is available (set {advice}"
            + ("; bf16 on a CPU runs 17-30x slower than fp32)" if s.dtype == "bf16" else ")")
        )
    check_quantization_supported(s.reference_quantization, str(s.device), hardware=local)

    # every component: importable, and its config keys are arguments it takes
    for key in RECIPE_KEYS:
        node = cfg.get(key.name) if key.component is not None else None
        if not configured(node):
            continue
        positional, injected = key.component
        parts = enumerate(node) if isinstance(node, ListConfig) else [(None, node)]
        for i, part in parts:
            where = key.name if i is None else f"{key.name}[{i}]"
            checks.check_component(part, where, positional=positional, injected=injected)
        if key.check is not None:
            key.check(key.name, node)
    if local:
        if s.model_dir is not None:
            from torchtune_prefopt.models.hf.spec import read_config_json

            read_config_json(s.model_dir)
        checks.check_output_dir(cfg.output_dir)
        checks.check_paths_exist(cfg.tokenizer, "tokenizer")
        for key in ("checkpointer", "ref_checkpointer"):
            if configured(cfg.get(key)):
                checks.check_paths_exist(cfg.get(key), key)
    return s


# --------------------------------------------------------------------------- docs


def table_markdown(keys: Sequence[ConfigKey], identity: bool = True) -> str:
    """A table's rows as a markdown table, sorted by key (``identity=False``: without the
    identity column)."""

    def default(k: ConfigKey) -> str:
        if k.required:
            return "required"
        return "null" if k.default is None else json.dumps(k.default)

    def ident(k: ConfigKey) -> str:
        if k.identity is True:
            return "yes"
        if k.identity == "content":
            return "its content"
        if k.identity:
            return ", ".join(k.identity)
        return ""

    head = ["key", "default", *(["identity"] if identity else []), "what it is"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k in sorted(keys, key=lambda k: k.name):
        cells = [f"`{k.name}`", default(k), *([ident(k)] if identity else []), k.doc]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def key_table_markdown() -> str:
    """The key table of docs/ARCHITECTURE.md (and the README), derived from the table."""
    return table_markdown(RECIPE_KEYS)


if __name__ == "__main__":
    print(key_table_markdown())
