# torchtune-prefopt: the preference-optimization recipe.
#
#   tune run prefopt_distributed --config tiny/dpo                       # 1 process
#   tune run --nproc_per_node 2 prefopt_distributed --config tiny/dpo    # FSDP2, 1 node
#   tune run --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d \
#       --rdzv_endpoint $HEAD:29500 prefopt_distributed --config llama3_3/70B_dpo_lora
"""Preference optimization (DPO, IPO, KTO, SimPO, ...) with FSDP2, in one hackable file.

Features:
    - Any loss from :mod:`torchtune_prefopt.losses` (``loss: dpo`` or ``loss._component_``).
      The loss declares what it needs: ``reference_free`` (SimPO: no reference model is
      loaded at all), ``average_logps`` (mean vs summed completion log-probs) and ``paired``
      (KTO trains on unpaired rows with in-batch mismatched KL pairs).
    - One process or many: plain ``tune run`` (no launcher) runs one rank; torchrun's
      arguments give FSDP2 over one node or many (rendezvous). CPU uses gloo, GPUs NCCL.
    - Full fine-tuning (frozen, sharded reference loaded from ``ref_checkpointer``, default
      the policy's own checkpoint) or LoRA (``lora_*`` model builders: the reference is the
      same weights with the adapters disabled, no second copy).
    - Chosen and rejected go through the policy in one forward: padded rows
      (:class:`~torchtune_prefopt.data.PairedBatch`), or with ``packed: true`` the micro-batch's
      sequences side by side without padding, and with ``share_prompt: true`` each prompt
      computed once for both completions (:class:`~torchtune_prefopt.data.PackedBatch`; KTO:
      a row and its KL row share the prompt). Same examples per step, same numbers up to fp32
      rounding. Completion log-probs come from
      :func:`~torchtune_prefopt.modules.decoder_sequence_logprobs`, which never builds the
      ``[batch, seq, vocab]`` logits and always uses an fp32 log-softmax.
    - The reference log-probs come from one :class:`~torchtune_prefopt.reference.ReferenceSource`
      picked at set-up (none, frozen model, LoRA adapters disabled, quantized, precomputed).
    - The data order is a global permutation cut into global micro-batches, each rank takes
      its slice: 1 process and N processes with the same global batch see the same rows.
    - Atomic HF-format checkpoints every ``save_every_n_steps`` and at the end (LoRA:
      adapter and merged weights); ``resume_from_checkpoint=True`` continues from the newest
      complete one exactly (model, optimizer, lr scheduler, data position, RNG).
    - SIGTERM (pre-emption) saves a checkpoint at the next step boundary and exits 0.
    - Non-finite loss or gradient norm: stop (default) or skip the step (``nonfinite: skip``),
      naming the step and the rows; a checkpoint with non-finite weights is never written.
    - Config, data and checkpoint errors are reported as one line before any compute.

Effective batch size = ``batch_size * world_size * gradient_accumulation_steps``.
"""

from __future__ import annotations

import difflib
import math
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torch import nn
from torch.utils.data import DataLoader
from torchtune import config, modules, training, utils
from torchtune.modules.peft import get_adapter_params, get_adapter_state_dict, set_trainable_params
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from torchtune_prefopt._config import parse
from torchtune_prefopt.data import (
    PackingLayout,
    PairedBatch,
    PositionIndexed,
    PreferenceCollator,
    UnpairedBatch,
    is_paired_row,
    kto_balance_warning,
)
from torchtune_prefopt.errors import PrefOptUserError, report_user_errors
from torchtune_prefopt.losses import build_loss, pair_accuracy, pair_rewards
from torchtune_prefopt.reference import (
    DIGEST_MEMO,
    AdaptersDisabled,
    CachedLogps,
    FrozenModel,
    NoReference,
    ReferenceLogpsCache,
    ReferenceSource,
    check_quantization_supported,
    kto_kl_pairs,
    quantize_reference,
    reference_fingerprint,
)
from torchtune_prefopt.training import checkpoints as ckpt
from torchtune_prefopt.training import config_checks as checks
from torchtune_prefopt.training.data_order import GlobalBatchSampler
from torchtune_prefopt.training.distributed import any_rank, init_distributed
from torchtune_prefopt.training.lora import (
    adapter_config,
    lora_init_state,
    lora_settings,
    merged_lora_state_dict,
)
from torchtune_prefopt.training.metrics import StepMetrics

log = utils.get_logger("INFO")

KNOWN_KEYS = {
    "output_dir",
    "model",
    "tokenizer",
    "checkpointer",
    "ref_checkpointer",
    "resume_from_checkpoint",
    "loss",
    "dataset",
    "eval_dataset",
    "eval_every_n_steps",
    "seed",
    "shuffle",
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "max_steps_per_epoch",
    "optimizer",
    "lr_scheduler",
    "clip_grad_norm",
    "device",
    "dtype",
    "compile",
    "packed",
    "share_prompt",
    "enable_activation_checkpointing",
    "fsdp_cpu_offload",
    "fsdp_reshard_after_forward",
    "custom_sharded_layers",
    "reference",
    "logprobs_chunk_size",
    "metric_logger",
    "log_every_n_steps",
    "save_every_n_steps",
    "keep_last_n_checkpoints",
    "nonfinite",
    "recipe_name",
    "overwrite_output_dir",
}
REFERENCE_KEYS = {"quantization", "precompute"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(cfg: DictConfig, local: bool = True) -> None:
    """Check the config before anything is built or written; one-line errors name the key.

    ``local=False`` skips what depends on this machine (device, files, output_dir), e.g. for
    commands written here to run on a cluster.
    """
    checks.check_interpolations(cfg)  # first: reading any key resolves its interpolations
    unknown = sorted(set(cfg.keys()) - KNOWN_KEYS)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PrefOptUserError(f"unknown config key '{key}'{hint}")
    for key in ("output_dir", "model", "tokenizer", "checkpointer", "loss", "dataset", "optimizer"):
        if cfg.get(key) is None:
            raise PrefOptUserError(f"config key '{key}' is required")

    def positive_int(key: str, optional: bool = False) -> None:
        v = cfg.get(key)
        if v is None and optional:
            return
        if not _is_int(v) or v < 1:
            raise PrefOptUserError(f"{key} must be an integer >= 1, got {v!r}")

    positive_int("batch_size")
    positive_int("gradient_accumulation_steps")
    positive_int("epochs")
    positive_int("max_steps_per_epoch", optional=True)
    positive_int("log_every_n_steps", optional=True)
    positive_int("save_every_n_steps", optional=True)
    positive_int("keep_last_n_checkpoints", optional=True)
    positive_int("eval_every_n_steps", optional=True)
    positive_int("logprobs_chunk_size", optional=True)
    seed = cfg.get("seed", 0)
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise PrefOptUserError(f"seed must be an integer >= 0 (or null: random), got {seed!r}")
    for flag in (
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "shuffle",
        "compile",
        "packed",
        "share_prompt",
    ):
        if not isinstance(cfg.get(flag, False), bool):
            raise PrefOptUserError(f"{flag} must be true or false, got {cfg.get(flag)!r}")
    if cfg.get("share_prompt", False) and not cfg.get("packed", False):
        raise PrefOptUserError(
            "share_prompt: true needs packed: true (a shared prompt is a packed layout); "
            "set packed=true or share_prompt=false"
        )
    if cfg.get("nonfinite", "stop") not in ("stop", "skip"):
        raise PrefOptUserError(f"nonfinite must be 'stop' or 'skip', got {cfg.get('nonfinite')!r}")
    if cfg.get("dtype", "fp32") not in ("fp32", "bf16"):
        raise PrefOptUserError(f"dtype must be 'fp32' or 'bf16', got {cfg.get('dtype')!r}")
    clip = cfg.get("clip_grad_norm")
    if clip is not None and not (
        isinstance(clip, (int, float))
        and not isinstance(clip, bool)
        and math.isfinite(clip)
        and clip > 0
    ):
        raise PrefOptUserError(f"clip_grad_norm must be > 0 or null, got {clip!r}")
    ref = cfg.get("reference")
    if ref is not None and not isinstance(ref, DictConfig):
        raise PrefOptUserError(
            f"reference must be a mapping (reference.quantization, reference.precompute), got {ref!r}"
        )
    ref = ref or {}
    bad = sorted(set(ref.keys()) - REFERENCE_KEYS)
    if bad:
        raise PrefOptUserError(
            f"unknown config key 'reference.{bad[0]}' (valid: {sorted(REFERENCE_KEYS)})"
        )
    if not isinstance(ref.get("precompute", False), bool):
        raise PrefOptUserError(
            f"reference.precompute must be true or false, got {ref.get('precompute')!r}"
        )
    device = str(cfg.get("device", "cpu"))
    if not (device == "cpu" or device.startswith("cuda")):
        raise PrefOptUserError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if local and device.startswith("cuda") and not torch.cuda.is_available():
        raise PrefOptUserError("device is 'cuda' but no CUDA device is available (set device=cpu)")
    check_quantization_supported(ref.get("quantization"), device, hardware=local)

    # every component: importable, and its config keys are arguments it takes
    checks.check_component(cfg.model, "model")
    checks.check_lora_settings(cfg.model, "model")
    checks.check_component(cfg.tokenizer, "tokenizer")
    checks.check_component(cfg.checkpointer, "checkpointer")
    if _configured(cfg.get("ref_checkpointer")):
        checks.check_component(cfg.ref_checkpointer, "ref_checkpointer")
    for key in ("dataset", "eval_dataset"):
        node = cfg.get(key)
        if not _configured(node):
            continue
        for i, part in enumerate(node) if isinstance(node, ListConfig) else [(None, node)]:
            checks.check_component(
                part, key if i is None else f"{key}[{i}]", injected={"tokenizer"}
            )
    checks.check_component(cfg.optimizer, "optimizer", positional=1)
    checks.check_optimizer_values(cfg.optimizer)
    if _configured(cfg.get("lr_scheduler")):
        checks.check_component(
            cfg.lr_scheduler,
            "lr_scheduler",
            positional=1,
            injected={"num_training_steps", "last_epoch"},
        )
    if _configured(cfg.get("metric_logger")):
        checks.check_component(cfg.metric_logger, "metric_logger")
        checks.check_metric_logger_installed(cfg.metric_logger)
    if local:
        checks.check_output_dir(cfg.output_dir)
        checks.check_paths_exist(cfg.tokenizer, "tokenizer")
        for key in ("checkpointer", "ref_checkpointer"):
            if _configured(cfg.get(key)):
                checks.check_paths_exist(cfg.get(key), key)


def _configured(node: Any) -> bool:
    """A component is configured unless it is null (``key=null`` on the command line leaves a
    node whose ``_component_`` is null)."""
    if node is None:
        return False
    if isinstance(node, DictConfig) and "_component_" in node and node.get("_component_") is None:
        return False
    return True


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _pairs(x) -> Tuple[Any, Any]:
    """The two halves of a ``[2B]`` batch-layout value: ``(chosen, rejected)``, or KTO's
    ``(rows, KL rows)`` (``None`` stays None)."""
    return (None, None) if x is None else (PairedBatch.first(x), PairedBatch.second(x))


class PrefOptRecipe:
    """DPO-family preference optimization with FSDP2; see the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)
        self.cfg = cfg
        self._device = utils.get_device(device=cfg.get("device", "cpu"))
        self._dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self._device)
        self.world_size, self.rank = init_distributed(self._device)
        self._is_rank_zero = self.rank == 0
        self._output_dir = Path(cfg.output_dir)
        self._output_dir_existed = self._output_dir.exists()
        self.seed = training.set_seed(seed=cfg.get("seed", 0))
        self.batch_size = cfg.batch_size
        self.accum = cfg.gradient_accumulation_steps
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self._chunk_size = cfg.get("logprobs_chunk_size") or 1024
        self._log_every = cfg.get("log_every_n_steps") or 1
        self._save_every = cfg.get("save_every_n_steps")
        self._keep_last = cfg.get("keep_last_n_checkpoints")
        self._eval_every = cfg.get("eval_every_n_steps")
        self._clip = cfg.get("clip_grad_norm")
        self._nonfinite = cfg.get("nonfinite", "stop")
        self._resume = bool(cfg.get("resume_from_checkpoint", False))
        self.global_step = 0
        self._last_metrics: Dict[str, float] = {}
        self._evals: List[tuple] = []
        self.epochs_run = 0
        self._resume_micro = 0
        self._sigterm = False
        # Set in setup(); cleanup() must work (and not mask the real error) if setup fails early.
        self._metric_logger = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        # 1. Everything that can be wrong in the config or the data, before any weights load.
        try:
            self._loss_fn = build_loss(cfg.loss)
        except PrefOptUserError:
            raise
        except (ValueError, TypeError, ImportError) as err:
            raise PrefOptUserError(f"loss: {err}") from err
        self._loss_module = self._loss_fn  # uncompiled: held-out evaluation asks it for rewards
        self._reference_free = bool(getattr(self._loss_fn, "reference_free", False))
        self._paired = bool(getattr(self._loss_fn, "paired", True))
        self._average = bool(getattr(self._loss_fn, "average_logps", False))
        ref_opts = cfg.get("reference") or {}
        model_facts = self._instantiate_meta_model()  # cheap (meta tensors): LoRA? context?
        self._is_lora_model = bool(get_adapter_params(model_facts))
        model_max_seq_len = getattr(model_facts, "max_seq_len", None)
        del model_facts
        ignored = [
            key
            for key, on in (
                ("ref_checkpointer", _configured(cfg.get("ref_checkpointer"))),
                ("reference.quantization", ref_opts.get("quantization") is not None),
                ("reference.precompute", bool(ref_opts.get("precompute", False))),
            )
            if on
        ]
        if self._reference_free and ignored:
            utils.log_rank_zero(
                log,
                f"WARNING: {type(self._loss_fn).__name__} is reference-free: {', '.join(ignored)} "
                "ignored and no reference model is loaded.",
            )
        elif self._is_lora_model and _configured(cfg.get("ref_checkpointer")):
            utils.log_rank_zero(
                log,
                "WARNING: ref_checkpointer is ignored with a LoRA model: the reference is the policy's "
                "own base weights with the adapters disabled (use a full model for another reference)",
            )
        global_batch = self.batch_size * self.world_size
        if not self._paired and global_batch < 2:
            raise PrefOptUserError(
                f"batch_size: {type(self._loss_fn).__name__} builds its KL reference point from "
                "mismatched pairs of the global micro-batch and needs batch_size x processes >= 2, "
                f"got {self.batch_size} x {self.world_size}"
            )
        self._ref_quant = None if self._reference_free else ref_opts.get("quantization")
        self._ref_precompute = bool(ref_opts.get("precompute", False)) and not self._reference_free
        self._tokenizer = config.instantiate(cfg.tokenizer)
        # rows are identified by their position (the data order, errors and the reference cache)
        self._dataset = PositionIndexed(self._build_dataset(cfg.dataset, "dataset"))
        self._check_dataset_kind(self._dataset, "dataset", paired=self._paired)
        self._eval_dataset = None
        if _configured(cfg.get("eval_dataset")):
            self._eval_dataset = PositionIndexed(
                self._build_dataset(cfg.eval_dataset, "eval_dataset")
            )
            self._check_dataset_kind(self._eval_dataset, "eval_dataset", paired=True)
        for key, ds in (("dataset", self._dataset), ("eval_dataset", self._eval_dataset)):
            if ds is not None:
                self._check_fits_context(ds, key, model_max_seq_len)
        if len(self._dataset) < global_batch:
            raise PrefOptUserError(
                f"dataset: {len(self._dataset)} usable rows, fewer than one global batch "
                f"(batch_size {self.batch_size} x {self.world_size} processes)"
            )
        if not self._paired:
            stats = getattr(self._dataset, "stats", {})
            n_d, n_u = stats.get("n_desirable"), stats.get("n_undesirable")
            if n_d is not None and n_u is not None:
                utils.log_rank_zero(log, f"KTO data: {n_d} desirable, {n_u} undesirable rows")
                warning = kto_balance_warning(
                    n_d, n_u, self._loss_fn.desirable_weight, self._loss_fn.undesirable_weight
                )
                if warning:
                    utils.log_rank_zero(log, f"WARNING: {warning}")
        stats = getattr(self._dataset, "stats", None)
        if stats:
            utils.log_rank_zero(log, f"dataset stats: {dict(stats)}")

        # 2. The run's identity: a fresh run never adopts another run's checkpoints; a resumed
        # run continues the newest complete checkpoint of a run with these settings.
        self._identity = ckpt.RunIdentity.new(cfg)
        self._replace_previous: List[Path] = []
        resume_dir, recipe_state = None, None
        if not self._resume:
            self._replace_previous = ckpt.check_fresh_output_dir(
                self._output_dir, bool(cfg.get("overwrite_output_dir", False))
            )
        else:
            resume_dir = ckpt.latest_checkpoint(self._output_dir)
            if resume_dir is None:
                utils.log_rank_zero(
                    log,
                    f"resume_from_checkpoint=True but no complete checkpoint in {self._output_dir}; starting fresh",
                )
            else:
                manifest = ckpt.verify_checkpoint_collective(resume_dir, self.rank, self.world_size)
                self._identity = ckpt.check_resumable(resume_dir, manifest, cfg) or self._identity
                recipe_state = ckpt.load_recipe_state(resume_dir)
                self._check_same_global_batch(recipe_state)
                utils.log_rank_zero(
                    log, f"Resuming from {resume_dir} (run {self._identity.run_id})"
                )
        ids = [self._identity.run_id]
        dist.broadcast_object_list(ids, src=0)  # one run id on every rank (a new one is random)
        self._identity.run_id = ids[0]

        # 3. The base weights.
        self._checkpointer = config.instantiate(cfg.checkpointer)
        if not isinstance(self._checkpointer, training.FullModelHFCheckpointer):
            raise PrefOptUserError(
                "checkpointer: this recipe reads and writes Hugging Face checkpoints; use "
                "torchtune.training.FullModelHFCheckpointer (or a function returning one)"
            )
        base_sd = ckpt.load_model_state_dict(self._checkpointer, "checkpointer")

        # 4. Models: the policy, and where the reference log-probs come from.
        self._model = self._setup_policy(base_sd, resume_dir)
        self._reference = self._setup_reference(base_sd)
        utils.log_rank_zero(log, f"reference model: {self._reference.describe()}")
        del base_sd

        # 5. Optimizer, data order, schedule.
        self._optimizer = config.instantiate(
            cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad]
        )
        self._sampler = GlobalBatchSampler(
            len(self._dataset), global_batch, seed=self.seed, shuffle=cfg.get("shuffle", True)
        )
        self._collate = PreferenceCollator(
            paired=self._paired,
            pad_id=self._tokenizer.pad_id,
            # KTO's KL rows are truncated like the dataset truncated its rows
            max_seq_len=getattr(self._dataset, "max_seq_len", self._tokenizer.max_seq_len),
            rank=self.rank,
            rows_per_rank=self.batch_size,
            packing=self._packing(),
        )
        self._dataloader = self._loader(self._dataset, self._sampler)
        micro_per_epoch = len(self._sampler)
        self._steps_per_epoch = micro_per_epoch // self.accum
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch < 1:
            raise PrefOptUserError(
                f"gradient_accumulation_steps: {micro_per_epoch} micro-batches per epoch cannot fill one "
                f"step of {self.accum} (lower gradient_accumulation_steps or batch_size)"
            )
        self._eval_dataloader = None
        if self._eval_dataset is not None:
            # every held-out row exactly once, whatever the world size: the last global batch
            # may be partial and is split evenly over the ranks (PreferenceCollator.share)
            eval_order = GlobalBatchSampler(
                len(self._eval_dataset),
                global_batch,
                seed=self.seed,
                shuffle=False,
                drop_last=False,
            )
            eval_collate = PreferenceCollator(
                paired=True, pad_id=self._collate.pad_id, rank=self.rank,
                rows_per_rank=self.batch_size, world_size=self.world_size,
                packing=self._collate.packing,
            )  # fmt: skip
            self._eval_dataloader = self._loader(self._eval_dataset, eval_order, eval_collate.share)
        if recipe_state is not None:
            self._load_recipe_state(recipe_state)
        self._eval_reference = self._reference
        if self._ref_precompute:
            self._precompute_reference()
        self._lr_scheduler = None
        if _configured(cfg.get("lr_scheduler")):
            self._lr_scheduler = config.instantiate(
                cfg.lr_scheduler,
                self._optimizer,
                num_training_steps=self.total_epochs * self._steps_per_epoch,
                last_epoch=-1,
            )
            if recipe_state is not None and "lr_scheduler" in recipe_state:
                self._lr_scheduler.load_state_dict(recipe_state["lr_scheduler"])
                # Constructing the scheduler (last_epoch=-1) reset every group's lr to the
                # schedule's step-0 value; load_state_dict does not touch the optimizer, so put
                # back the lr the interrupted run would use for its next step.
                for group, lr in zip(
                    self._optimizer.param_groups, self._lr_scheduler.get_last_lr()
                ):
                    group["lr"] = lr

        if cfg.get("compile", False):
            # Attributes (reference_free, beta, ...) stay reachable through the compiled wrapper.
            self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)

        self._metrics = StepMetrics(self._device)
        self._metric_logger = None
        if self._is_rank_zero and self._replace_previous:
            # overwrite_output_dir=true: only now, when everything before has passed
            ckpt.remove_previous_run(self._replace_previous)
            log.info(
                f"overwrite_output_dir: removed {', '.join(str(p) for p in self._replace_previous)}"
            )
        dist.barrier()
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        dist.barrier()

    def _packing(self) -> Optional[PackingLayout]:
        """``packed``/``share_prompt``: rows as long as the model's context; lengths rounded to
        a multiple of 128 under ``compile`` (a bounded number of shapes), else of 8."""
        if not self.cfg.get("packed", False):
            return None
        return PackingLayout(
            share_prompt=bool(self.cfg.get("share_prompt", False)),
            capacity=int(self._model.max_seq_len),
            multiple_of=128 if self.cfg.get("compile", False) else 8,
        )

    def _build_dataset(self, cfg_ds: Any, key: str):
        try:
            if isinstance(cfg_ds, ListConfig):
                from torchtune.datasets import ConcatDataset

                return ConcatDataset(
                    [config.instantiate(c, tokenizer=self._tokenizer) for c in cfg_ds]
                )
            return config.instantiate(cfg_ds, tokenizer=self._tokenizer)
        except PrefOptUserError:
            raise
        except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
            msg = " ".join(str(err).split())
            raise PrefOptUserError(f"{key}: {msg}") from err

    @staticmethod
    def _check_dataset_kind(ds, key: str, paired: bool) -> None:
        if len(ds) == 0:
            raise PrefOptUserError(f"{key}: no usable rows")
        is_paired = is_paired_row(ds[0])
        if paired and not is_paired:
            raise PrefOptUserError(
                f"{key}: this loss (or evaluation) needs paired chosen/rejected rows, but the dataset yields unpaired rows"
            )
        if not paired and is_paired:
            raise PrefOptUserError(
                f"{key}: KTO trains on unpaired rows; wrap paired data with "
                "torchtune_prefopt.data.unpaired_from_paired (chosen -> desirable, rejected -> undesirable)"
            )

    @staticmethod
    def _check_fits_context(ds, key: str, context: Optional[int]) -> None:
        """Every sequence the model will see fits its context (``model.max_seq_len``): each row,
        and for KTO the KL rows (a prompt with another row's completion)."""
        if not context:
            return
        lengths, prompts, completions = [], [], []
        for i in range(len(ds)):
            item = ds[i]
            if is_paired_row(item):
                lengths.append(max(len(item["chosen_input_ids"]), len(item["rejected_input_ids"])))
            else:
                prompts.append(len(item["prompt_ids"]))
                completions.append(len(item["completion_ids"]))
                lengths.append(prompts[-1] + completions[-1])
        fix = f"set tokenizer.max_seq_len (or the dataset's max_seq_len) to at most {context}"
        for i, n in enumerate(lengths):
            if n > context:
                raise PrefOptUserError(
                    f"{key}: row {i} has {n} tokens, more than the model's context of {context} tokens "
                    f"(the model's max_seq_len); {fix}"
                )
        kl_longest = max(prompts) + max(completions) if prompts else 0
        limit = getattr(ds, "max_seq_len", None)
        if kl_longest > context and (limit is None or limit > context):
            raise PrefOptUserError(
                f"{key}: KTO's KL rows (a prompt with another row's completion) can reach {kl_longest} "
                f"tokens, more than the model's context of {context}; {fix}"
            )

    def _loader(self, dataset, order: GlobalBatchSampler, collate=None) -> DataLoader:
        """Global micro-batches in ``order``, each collated into this rank's batch object
        (``collate``: the training collator by default).

        Own generator: iter(DataLoader) draws a base seed from its generator, which would
        otherwise be the global RNG (one extra draw per epoch or evaluation; a resumed run's
        RNG state would then differ from the uninterrupted run's).
        """
        return DataLoader(
            dataset,
            batch_sampler=order,
            collate_fn=collate or self._collate,
            num_workers=0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    # -- models
    @property
    def _is_lora(self) -> bool:
        return self._lora is not None

    def _instantiate_meta_model(self) -> nn.Module:
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            return config.instantiate(self.cfg.model)

    def _shard(self, model: nn.Module) -> None:
        training.shard_model(
            model=model,
            shard_conditions=[
                partial(
                    training.get_shard_conditions,
                    names_to_match=self.cfg.get("custom_sharded_layers"),
                )
            ],
            cpu_offload=self.cfg.get("fsdp_cpu_offload", False),
            reshard_after_forward=self.cfg.get("fsdp_reshard_after_forward", True),
        )

    def _init_rope(self, model: nn.Module) -> None:
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()

    def _setup_policy(
        self, base_sd: Dict[str, torch.Tensor], resume_dir: Optional[Path]
    ) -> nn.Module:
        cfg = self.cfg
        model = self._instantiate_meta_model()
        adapter_params = get_adapter_params(model)
        self._lora = lora_settings(cfg.model) if adapter_params else None
        if adapter_params:
            set_trainable_params(model, adapter_params)
        self._adapter_keys = set(adapter_params.keys())
        if resume_dir is not None and not adapter_params:
            # Full fine-tuning resumes from the step checkpoint's weights.
            resume_ckpt = training.FullModelHFCheckpointer(
                checkpoint_dir=str(resume_dir),
                checkpoint_files=ckpt.hf_weight_files(resume_dir),
                model_type=self._checkpointer._model_type.name,
                output_dir=str(self._output_dir),
            )
            policy_sd = resume_ckpt.load_checkpoint()[training.MODEL_KEY]
            source = resume_dir
        else:
            policy_sd = dict(base_sd)
            source = getattr(self._checkpointer, "_checkpoint_dir", "checkpointer")
        if adapter_params:
            if resume_dir is not None:
                policy_sd.update(ckpt.load_adapter_weights(resume_dir))
            else:
                policy_sd.update(lora_init_state(model, self.seed, self._dtype, policy_sd))
        ckpt.check_state_dict(model, policy_sd, source, strict_keys=True)

        if cfg.get("compile", False):
            training.compile_model(model, verbose=self._is_rank_zero)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        self._shard(model)
        self._init_rope(model)
        training.load_from_full_model_state_dict(
            model,
            policy_sd,
            self._device,
            strict=True,
            cpu_offload=cfg.get("fsdp_cpu_offload", False),
        )
        training.validate_no_params_on_meta_device(model)
        training.disable_dropout(model)
        return model

    def _setup_reference(self, base_sd: Dict[str, torch.Tensor]) -> ReferenceSource:
        """The strategy for reference log-probs; the only place the recipe looks at which."""
        # the files whose content identifies the reference (for the precompute cache)
        self._ref_files = [
            *self._checkpointer._checkpoint_paths,
            self._checkpointer._checkpoint_dir / "config.json",
        ]
        if self._reference_free:
            return NoReference(type(self._loss_fn).__name__)
        if self._is_lora:
            if self._ref_quant is not None:
                utils.log_rank_zero(
                    log,
                    "WARNING: reference.quantization is ignored with LoRA (the reference is the policy's own base weights)",
                )
                self._ref_quant = None
            return AdaptersDisabled(self._model, self._chunk_size)
        ref_sd, source = base_sd, getattr(self._checkpointer, "_checkpoint_dir", "checkpointer")
        if _configured(self.cfg.get("ref_checkpointer")):
            ref_ckpt = config.instantiate(self.cfg.ref_checkpointer)
            ref_sd = ckpt.load_model_state_dict(ref_ckpt, "ref_checkpointer")
            source = getattr(ref_ckpt, "_checkpoint_dir", "ref_checkpointer")
            self._ref_files = [
                *ref_ckpt._checkpoint_paths,
                ref_ckpt._checkpoint_dir / "config.json",
            ]
        return FrozenModel(
            self._frozen_reference_model(ref_sd, source), str(source), self._chunk_size
        )

    def _frozen_reference_model(self, ref_sd: Dict[str, torch.Tensor], source: Any) -> nn.Module:
        model = self._instantiate_meta_model()
        ckpt.check_state_dict(model, ref_sd, source, strict_keys=True)
        if self._ref_quant is not None:
            # torchao's quantized tensors do not compose with FSDP2: a plain module, replicated
            # on every rank. Weights stay on the CPU until each layer is quantized on the device.
            model.load_state_dict(
                {k: v.to(self._dtype) for k, v in ref_sd.items()}, strict=True, assign=True
            )
            self._init_rope(model)
            report = quantize_reference(model, self._ref_quant, device=self._device)
            training.validate_no_params_on_meta_device(model)
            training.disable_dropout(model)
            utils.log_rank_zero(log, report.summary())
            return model
        if self.cfg.get("compile", False):
            training.compile_model(model, verbose=False)
        self._shard(model)
        self._init_rope(model)
        training.load_from_full_model_state_dict(
            model,
            ref_sd,
            self._device,
            strict=True,
            cpu_offload=self.cfg.get("fsdp_cpu_offload", False),
        )
        training.validate_no_params_on_meta_device(model)
        training.disable_dropout(model)
        for p in model.parameters():
            p.requires_grad = False
        model.eval()
        return model

    def _precompute_reference(self) -> None:
        """``reference.precompute``: the reference log-probs of every training row (and KTO KL
        pair) and every held-out row, computed once (or loaded from a cache whose fingerprint
        matches); the reference model is then freed and training runs without it."""
        live, root = self._reference, self._output_dir / "reference_cache"
        pairs = None
        if not self._paired:
            pairs = kto_kl_pairs(
                self._sampler, self.total_epochs, self._steps_per_epoch * self.accum
            )
        padded = PreferenceCollator(
            paired=self._paired, pad_id=self._collate.pad_id, max_seq_len=self._collate.max_seq_len
        )
        self._reference = self._cached(
            live, self._dataset, root, padded, pairs, "the training rows"
        )
        if self._eval_dataset is not None:
            padded = PreferenceCollator(paired=True, pad_id=self._collate.pad_id)
            self._eval_reference = self._cached(
                live, self._eval_dataset, root / "eval", padded, None, "the held-out rows"
            )
        if live.model is not None:
            live.model = None  # not needed any more: free its memory
            utils.log_rank_zero(
                log,
                "reference model freed: training and evaluation use the cached reference log-probs",
            )

    def _cached(
        self, live: ReferenceSource, dataset, cache_dir: Path, collate, pairs, what: str
    ) -> CachedLogps:
        store = None
        if self._is_rank_zero:  # only rank 0 reads/writes the file: only it needs the fingerprint
            fingerprint = reference_fingerprint(
                self._ref_files,
                dataset,
                self._tokenizer,
                self._tokenizer.max_seq_len,
                extra={
                    "model": self.cfg.model,
                    "dtype": self.cfg.get("dtype", "fp32"),
                    "lora": self._is_lora,
                    "kl_pairs": pairs,
                },
                quantization=self._ref_quant,
                digest_memo=self._output_dir / "reference_cache" / DIGEST_MEMO,
            )
            store = ReferenceLogpsCache(cache_dir, fingerprint)
        return CachedLogps.precompute(
            live,
            dataset,
            store,
            collate_fn=collate,
            batch_size=self.batch_size,
            world_size=self.world_size,
            rank=self.rank,
            device=self._device,
            kl_pairs=pairs,
            what=what,
        )

    # ------------------------------------------------------------------ state
    def _recipe_state(self, epoch: int, micro_in_epoch: int) -> Dict[str, Any]:
        rng = [None] * self.world_size
        dist.all_gather_object(rng, torch.get_rng_state())
        state = {
            "step": self.global_step,
            "epoch": epoch,
            "micro_in_epoch": micro_in_epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.accum,
            "rng_states": rng,
        }
        if self._lr_scheduler is not None:
            state["lr_scheduler"] = self._lr_scheduler.state_dict()
        return state

    def _check_same_global_batch(self, state: Dict[str, Any]) -> None:
        gb_then = state["batch_size"] * state["world_size"]
        gb_now = self.batch_size * self.world_size
        if gb_then != gb_now or state["gradient_accumulation_steps"] != self.accum:
            raise PrefOptUserError(
                f"resume: the checkpoint was trained with a global micro-batch of {gb_then} and "
                f"gradient_accumulation_steps {state['gradient_accumulation_steps']}; this run has "
                f"{gb_now} and {self.accum}: keep batch_size x world_size and accumulation the same to resume exactly"
            )

    def _load_recipe_state(self, state: Dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            utils.log_rank_zero(
                log,
                f"WARNING: using the checkpoint's seed {state['seed']} (config has {self.seed})",
            )
            self.seed = state["seed"]
            self._sampler.seed = self.seed
        self.global_step = state["step"]
        self.epochs_run = state["epoch"]
        self._resume_micro = state["micro_in_epoch"]
        if self._resume_micro >= self._steps_per_epoch * self.accum:
            self.epochs_run += 1
            self._resume_micro = 0
        rng = state["rng_states"]
        if len(rng) == self.world_size:
            torch.set_rng_state(rng[self.rank])
        opt_sd = state.get("optimizer")
        if opt_sd is not None:
            training.load_from_full_optimizer_state_dict(
                self._model, self._optimizer, opt_sd, self._device
            )

    def _gather_adapter_state(self) -> Dict[str, torch.Tensor]:
        """Full LoRA adapter tensors on rank 0, without gathering the frozen base weights."""
        out = {}
        for name, value in self._model.state_dict().items():
            if name not in self._adapter_keys:
                continue
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            if self._is_rank_zero:
                out[name] = value.detach().cpu()
        return out

    def save_checkpoint(self, epoch: int, micro_in_epoch: int, reason: str) -> Optional[Path]:
        """Gather weights and optimizer state to rank 0 and write an atomic step checkpoint.

        LoRA: intermediate checkpoints hold the adapter only (the base is the frozen input
        checkpoint, so a 70B run never gathers 140 GB on rank 0 just to resume); the final
        checkpoint also holds the merged weights, loadable as a plain HF model.
        """
        start = time.perf_counter()
        adapter_only = self._is_lora and reason != "final"
        if adapter_only:
            full_sd = self._gather_adapter_state()
        else:
            full_sd = training.gather_cpu_state_dict(
                self._model, self._is_rank_zero, device=self._device
            )
        opt_sd = training.get_full_optimizer_state_dict(
            self._model, self._optimizer, self._is_rank_zero, device=self._device
        )
        state = self._recipe_state(epoch, micro_in_epoch)
        finite = True
        if self._is_rank_zero:
            finite = all(
                torch.isfinite(v).all().item() for v in full_sd.values() if v.is_floating_point()
            )
        if any_rank(not finite, self._device):
            raise FloatingPointError(
                f"step {self.global_step}: the weights contain non-finite values; refusing to write a checkpoint"
            )
        final_path = None
        if self._is_rank_zero:
            tmp = ckpt.begin_checkpoint(self._output_dir, self.global_step)
            if adapter_only:
                to_write = {
                    training.ADAPTER_KEY: full_sd,
                    training.ADAPTER_CONFIG: adapter_config(self._lora),
                }
            elif self._is_lora:
                to_write = {
                    training.MODEL_KEY: merged_lora_state_dict(full_sd, self._lora),
                    training.ADAPTER_KEY: get_adapter_state_dict(full_sd),
                    training.ADAPTER_CONFIG: adapter_config(self._lora),
                }
            else:
                to_write = {training.MODEL_KEY: full_sd}
            ckpt.write_hf_weights(self._checkpointer, to_write, tmp, adapter_only=adapter_only)
            state["optimizer"] = opt_sd
            ckpt.save_recipe_state(tmp, state)
            final_path = ckpt.commit_checkpoint(
                tmp,
                self.global_step,
                extra={
                    "reason": reason,
                    "model_weights": not adapter_only,
                    "run": self._identity.to_json(),
                },
            )
            ckpt.prune_checkpoints(self._output_dir, self._keep_last)
            log.info(
                f"Saved checkpoint {final_path} ({reason}) in {time.perf_counter() - start:.1f}s"
            )
        dist.barrier()
        return final_path

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self._sigterm = True

    # ------------------------------------------------------------------ compute
    def _loss_form(self, lp) -> Optional[torch.Tensor]:
        """The log-prob form the loss wants (per-token mean or sum); ``None`` stays None."""
        if lp is None:
            return None
        return lp.mean if self._average else lp.sum

    def _paired_step(self, batch: PairedBatch):
        """Loss of ``B`` pairs, and the metric sums ``{name: (sum over pairs, count name)}``."""
        pol = batch.logps(self._model, self._chunk_size)
        ref = self._reference.logps(batch)
        losses, chosen_rewards, rejected_rewards = self._loss_fn(
            *_pairs(self._loss_form(pol)), *_pairs(self._loss_form(ref))
        )
        pol_chosen, pol_rejected = _pairs(pol.sum.detach())
        stats = {
            "rewards/chosen": (chosen_rewards.detach().sum(), "rows"),
            "rewards/rejected": (rejected_rewards.detach().sum(), "rows"),
            "rewards/accuracies": (pair_accuracy(chosen_rewards, rejected_rewards).sum(), "rows"),
            "rewards/margins": ((chosen_rewards - rejected_rewards).detach().sum(), "rows"),
            "logps/chosen": (pol_chosen.sum(), "rows"),
            "logps/rejected": (pol_rejected.sum(), "rows"),
        }
        return losses, stats, {"rows": float(len(batch))}

    def _kto_step(self, batch: UnpairedBatch):
        """Loss of ``B`` unpaired rows (with their KL rows), and the metric sums."""
        # [2B]: the rows, then their KL rows (KTO's reference point is not trained through)
        pol_rows, pol_kl = _pairs(batch.logps(self._model, self._chunk_size))
        ref_rows, ref_kl = _pairs(self._loss_form(self._reference.logps(batch)))
        losses, rewards, kl = self._loss_fn(
            self._loss_form(pol_rows),
            ref_rows,
            batch.is_desirable,
            self._loss_form(pol_kl).detach(),
            ref_kl,
        )
        pol = pol_rows
        d = batch.is_desirable.float()
        stats = {
            "kl": (
                kl.detach().float() * len(batch),
                "rows",
            ),  # z0 is global; weight so the mean is z0
            "rewards/desirable": ((rewards.detach() * d).sum(), "desirable"),
            "rewards/undesirable": ((rewards.detach() * (1 - d)).sum(), "undesirable"),
            "logps/desirable": ((pol.sum.detach() * d).sum(), "desirable"),
            "logps/undesirable": ((pol.sum.detach() * (1 - d)).sum(), "undesirable"),
        }
        counts = {
            "rows": float(len(batch)),
            "desirable": d.sum().item(),
            "undesirable": (1 - d).sum().item(),
        }
        return losses, stats, counts

    def _nonfinite_rows(self, losses: torch.Tensor, index: torch.Tensor) -> List[int]:
        bad_local = index.cpu()[~torch.isfinite(losses.detach().cpu())].tolist()
        gathered: List[List[int]] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, bad_local)
        return sorted(i for part in gathered for i in part)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Held-out preference accuracy of the loss's own implicit reward (paired eval rows),
        through the same DataLoader path, reference source and loss as training."""
        m = StepMetrics(self._device)
        for batch, real in self._eval_dataloader:  # real: this rank's rows (0: a padding copy)
            batch = batch.to(self._device)
            pol = batch.logps(self._model, self._chunk_size)
            ref = self._eval_reference.logps(batch)
            chosen_rewards, rejected_rewards = pair_rewards(
                self._loss_module, *_pairs(self._loss_form(pol)), *_pairs(self._loss_form(ref))
            )
            pol_chosen, pol_rejected = _pairs(pol.sum)
            rows = slice(0, real)
            m.add(
                "eval/rewards/accuracies",
                pair_accuracy(chosen_rewards, rejected_rewards)[rows].sum(),
            )
            m.add("eval/rewards/margins", (chosen_rewards - rejected_rewards)[rows].double().sum())
            m.add("eval/logps/chosen", pol_chosen[rows].double().sum())
            m.add("eval/logps/rejected", pol_rejected[rows].double().sum())
            if ref is not None:
                m.add("eval/reference/accuracies", pair_accuracy(*_pairs(ref.sum))[rows].sum())
            m.count(rows=real)
        means, counts = m.reduce()
        means["eval/rows"] = counts.get("rows", 0.0)
        return means

    def _log(self, metrics: Dict[str, float]) -> None:
        if any(k.startswith("eval/") for k in metrics):
            self._evals.append((self.global_step, dict(metrics)))
        else:
            self._last_metrics = dict(metrics)
        if self._metric_logger is not None:
            self._metric_logger.log_dict(metrics, step=self.global_step)

    def summary(self, final_path: Optional[Path], seconds: float) -> str:
        """End-of-run summary for the terminal (rank 0)."""
        lines = [
            "",
            f"== prefopt_distributed: {type(getattr(self._loss_fn, '_orig_mod', self._loss_fn)).__name__} | {self.world_size} process(es) | "
            f"{self.global_step} steps in {seconds:.0f}s",
        ]
        m = self._last_metrics
        keys = [
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "kl",
            "logps/chosen",
            "logps/rejected",
            "tokens_per_second",
            "peak_memory_gib",
        ]
        shown = [f"{k}={m[k]:.4g}" for k in keys if k in m]
        if shown:
            lines.append("   last step: " + "  ".join(shown))
        if self._evals:
            (s0, e0), (s1, e1) = self._evals[0], self._evals[-1]
            acc = "eval/rewards/accuracies"
            lines.append(
                f"   held-out reward accuracy: {e0.get(acc, float('nan')):.3f} (step {s0}) -> "
                f"{e1.get(acc, float('nan')):.3f} (step {s1}) on {int(e1.get('eval/rows', 0))} rows"
            )
        if final_path is not None:
            lines.append(f"   checkpoint (HF format): {final_path}")
        log_dir = getattr(self._metric_logger, "log_dir", None) or self.cfg.get(
            "metric_logger", {}
        ).get("log_dir")
        if log_dir:
            lines.append(f"   metrics log: {log_dir}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)
        step_bad = False
        t0 = time.perf_counter()
        if self._eval_dataloader is not None and self.global_step == 0:
            self._log(self.evaluate())
            t0 = time.perf_counter()
        pbar = tqdm(
            total=self.total_epochs * self._steps_per_epoch,
            initial=self.global_step,
            disable=not self._is_rank_zero,
        )
        for epoch in range(self.epochs_run, self.total_epochs):
            # Only the first epoch of a resumed run starts mid-way (epochs_run is advanced at the
            # end of every epoch, so comparing epoch with it would skip the next epoch's start too).
            start_micro, self._resume_micro = self._resume_micro, 0
            self._sampler.set_epoch(epoch, start_micro)
            micro = start_micro
            for batch in self._dataloader:
                if micro // self.accum >= self._steps_per_epoch:
                    break
                batch = batch.to(self._device)
                step_fn = self._paired_step if self._paired else self._kto_step
                losses, stats, counts = step_fn(batch)
                if any_rank(not bool(torch.isfinite(losses.detach()).all()), self._device):
                    rows = self._nonfinite_rows(losses, batch.index)
                    msg = f"step {self.global_step + 1}: non-finite loss for dataset rows {rows}"
                    if self._nonfinite == "stop":
                        raise FloatingPointError(msg + " (set nonfinite=skip to skip such steps)")
                    utils.log_rank_zero(log, f"WARNING: {msg}; skipping this step")
                    step_bad = True
                else:
                    (losses.mean() / self.accum).backward()
                    self._metrics.add("loss", losses.detach().double().sum())
                    for name, (total, per) in stats.items():
                        self._metrics.add(name, total, per)
                    self._metrics.count(**counts)
                self._metrics.count(tokens=batch.real_tokens())
                micro += 1
                if micro % self.accum != 0:
                    continue

                # ---- optimizer step
                grad_norm = None
                if not step_bad:
                    # Always measured (the non-finite guard needs it); clipping only if configured
                    # (max_norm=inf scales the gradients by exactly 1.0).
                    max_norm = float(self._clip) if self._clip is not None else math.inf
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self._model.parameters(), max_norm=max_norm
                    )
                    if hasattr(grad_norm, "full_tensor"):
                        grad_norm = grad_norm.full_tensor()
                    if not torch.isfinite(grad_norm):
                        msg = f"step {self.global_step + 1}: non-finite gradient norm ({grad_norm.item()})"
                        if self._nonfinite == "stop":
                            raise FloatingPointError(
                                msg + " (set nonfinite=skip to skip such steps)"
                            )
                        utils.log_rank_zero(log, f"WARNING: {msg}; skipping this step")
                        step_bad = True
                if not step_bad:
                    self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                step_lr = get_lr(self._optimizer)  # the rate this step used (logged below)
                self.global_step += 1
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                pbar.update(1)

                # ---- metrics (means over micro-batches and ranks)
                if self.global_step % self._log_every == 0:
                    metrics, counts = self._metrics.reduce()
                    metrics["lr"] = step_lr
                    if grad_norm is not None:
                        metrics["grad_norm"] = grad_norm.item()
                    metrics["tokens_per_second"] = counts.get("tokens", 0.0) / max(
                        time.perf_counter() - t0, 1e-9
                    )
                    metrics["peak_memory_gib"] = _peak_memory_gib(self._device)
                    if step_bad:
                        metrics["skipped_step"] = 1.0
                    self._log(metrics)
                    if "loss" in metrics:
                        pbar.set_description(
                            f"{epoch + 1}|{self.global_step}|loss {metrics['loss']:.4f}"
                        )
                    t0 = time.perf_counter()
                step_bad = False

                if (
                    self._eval_dataloader is not None
                    and self._eval_every
                    and self.global_step % self._eval_every == 0
                ):
                    self._log(self.evaluate())
                    t0 = time.perf_counter()
                if any_rank(self._sigterm, self._device):
                    path = self.save_checkpoint(epoch, micro, reason="sigterm")
                    utils.log_rank_zero(
                        log,
                        f"SIGTERM: saved {path} at step {self.global_step}; resume with resume_from_checkpoint=True",
                    )
                    pbar.close()
                    raise _Preempted()
                if self._save_every and self.global_step % self._save_every == 0:
                    self.save_checkpoint(epoch, micro, reason="periodic")
            self.epochs_run = epoch + 1
        pbar.close()
        if self._eval_dataloader is not None and not (
            self._eval_every and self.global_step % self._eval_every == 0
        ):
            self._log(self.evaluate())
        # the final weights: this run's checkpoint at this step if it already has full weights
        # (a periodic save at the last step), else a final save
        last = ckpt.latest_checkpoint(self._output_dir)
        manifest = ckpt.read_manifest(last) if last is not None else {}
        run = ckpt.RunIdentity.of(manifest)
        has_final = (
            last is not None
            and last.name == ckpt.step_dirname(self.global_step)
            and manifest.get("model_weights", True)
            and run is not None
            and run.run_id == self._identity.run_id
        )
        final = last if has_final else self.save_checkpoint(self.total_epochs, 0, reason="final")
        if self._is_rank_zero:
            link = ckpt.link_final(self._output_dir, final)
            log.info(f"Final checkpoint: {link} -> {final}")
            self._final_path = final

    def discard_empty_output_dir(self) -> None:
        """Remove ``output_dir`` if this run created it and nothing was written into it."""
        out = self._output_dir
        if self._output_dir_existed or not out.is_dir():
            return
        if any(p.is_file() or p.is_symlink() for p in out.rglob("*")):
            return
        import shutil

        shutil.rmtree(out, ignore_errors=True)

    def cleanup(self, finished: bool = False) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        if dist.is_initialized():
            if finished:
                # leave together: a rank tearing its process group down while another still
                # talks to it can abort in gloo's threads ("terminate called ...")
                dist.barrier()
            dist.destroy_process_group()


class _Preempted(Exception):
    """Raised after the pre-emption checkpoint is written, to exit cleanly."""


def run(cfg: DictConfig) -> None:
    """Set up, train and summarise one run. A config/data error raises
    :class:`PrefOptUserError` (before anything is computed or written); a numeric guard exits 3."""
    recipe = PrefOptRecipe(cfg)
    start = time.perf_counter()
    finished = False
    try:
        recipe.setup()
        recipe.train()
        if recipe._is_rank_zero:
            print(
                recipe.summary(getattr(recipe, "_final_path", None), time.perf_counter() - start),
                flush=True,
            )
        finished = True
    except _Preempted:
        finished = True
    except FloatingPointError as err:
        # A numeric guard stopped the run (every rank decided together): one line, exit 3.
        if recipe._is_rank_zero:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    except PrefOptUserError:
        # a config/data error: no output_dir left behind that this run created and left empty
        recipe.discard_empty_output_dir()
        raise
    finally:
        recipe.cleanup(finished=finished)


@report_user_errors
@parse
def recipe_main(cfg: DictConfig) -> None:
    """``tune run prefopt_distributed --config ...``: :func:`run`; a user error is one
    ``error:`` line and exit status 2."""
    run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
