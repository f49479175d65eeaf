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
    - SIGTERM (pre-emption) and SIGINT (Ctrl-C) save a checkpoint at the next step boundary
      and exit 0.
    - Non-finite loss or gradient norm: stop (default) or skip the step (``nonfinite: skip``),
      naming the step and the rows; a checkpoint with non-finite weights is never written.
    - Config, data and checkpoint errors are reported as one line before any compute, and so
      is a model that does not fit its tokenizer or checkpoint; every key, its default and its
      check live in one table (:mod:`torchtune_prefopt.training.recipe_config`).
    - One run per ``output_dir`` (a lock held for the run's lifetime); a run's identity is what
      it computes from (rows, tokenizer, weight bytes), not where the files are; a write that
      fails (disk full) is one line and exit 4, with every saved checkpoint intact.

Effective batch size = ``batch_size * world_size * gradient_accumulation_steps``.
"""

from __future__ import annotations

import errno
import inspect
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from torchtune_prefopt._config import parse
from torchtune_prefopt.data import (
    PackingLayout,
    PairedBatch,
    PositionIndexed,
    PreferenceCollator,
    UnpairedBatch,
    build_datasets,
    build_tokenizer,
    check_dataset_kind,
    check_fits_context,
    kto_balance_warning,
)
from torchtune_prefopt.errors import (
    EXIT_WRITE_FAILED,
    PrefOptUserError,
    WriteFailed,
    report_user_errors,
)
from torchtune_prefopt.files import atomic_write_bytes
from torchtune_prefopt.losses import (
    build_loss,
    loss_inputs,
    loss_traits,
    pair_accuracy,
    pair_metrics,
)
from torchtune_prefopt.models.build import (
    ModelPlacement,
    build_model,
    context_length,
    is_lora_model,
    meta_model,
    shards_model,
    vocab_size,
)
from torchtune_prefopt.models.hf_checkpoint import HFCheckpoint
from torchtune_prefopt.modules import SequenceLogProbs
from torchtune_prefopt.modules.router_aux import (
    collect_router_logits,
    keep_router_logits,
    moe_layers,
    router_load_balancing_loss,
)
from torchtune_prefopt.reference import (
    PrecomputeJob,
    ReferenceSource,
    build_reference,
    kto_kl_pairs,
    plan_reference,
    precompute_reference,
)
from torchtune_prefopt.training.checkpoints import content_digests, latest_checkpoint
from torchtune_prefopt.training.data_order import GlobalBatchSampler
from torchtune_prefopt.training.distributed import (
    all_reduce_sum,
    any_rank,
    exit_after,
    init_distributed,
    rank_zero_check,
)
from torchtune_prefopt.training.lora import lora_init_state, lora_settings
from torchtune_prefopt.training.metrics import StepMetrics
from torchtune_prefopt.training.recipe_config import validate_config
from torchtune_prefopt.training.run_lock import OutputDirLock
from torchtune_prefopt.training.step_checkpointer import StepCheckpointer

log = utils.get_logger("INFO")


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _DataOrder(NamedTuple):
    """What :meth:`PrefOptRecipe._setup_data_order` builds."""

    sampler: GlobalBatchSampler
    collate: PreferenceCollator
    loader: DataLoader
    steps_per_epoch: int
    eval_loader: Optional[DataLoader]


class PrefOptRecipe:
    """DPO-family preference optimization with FSDP2; see the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        # every key, with its default, from the one key table (training/recipe_config.py)
        self.settings = settings = validate_config(cfg)
        self.cfg = cfg
        self._device = utils.get_device(device=settings.device)
        self._dtype = training.get_dtype(settings.dtype, device=self._device)
        self.world_size, self.rank = init_distributed(self._device)
        self._is_rank_zero = self.rank == 0
        self._output_dir = Path(cfg.output_dir)
        self._output_dir_existed = self._output_dir.exists()
        self.seed = training.set_seed(seed=settings.seed)
        self.batch_size = settings.batch_size
        self.accum = settings.gradient_accumulation_steps
        self.total_epochs = settings.epochs
        self._chunk_size = settings.logprobs_chunk_size
        self.global_step = 0
        self._last_metrics: Dict[str, float] = {}
        self._evals: List[tuple] = []
        self.epochs_run = 0
        self._resume_micro = 0
        self._stop_signal: Optional[str] = None  # SIGTERM or SIGINT (Ctrl-C), once received
        # the SFT term's normaliser: chosen tokens per pair of the current step's global batch
        self._step_token_mean: Optional[float] = None
        # Set in setup(); cleanup() must work (and not mask the real error) if setup fails early.
        self._metric_logger = None
        self._lock: Optional[OutputDirLock] = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, settings = self.cfg, self.settings
        self._lock = self._setup_lock()  # one run per output_dir, for the run's lifetime
        if self._device.type == "cpu" and settings.dtype == "bf16":
            utils.log_rank_zero(
                log,
                "WARNING: dtype bf16 on a CPU: no fused bf16 kernels, 17-30x slower than fp32 "
                "(SmolLM2-135M LoRA: 10 vs 300 tokens/s); set dtype=fp32 unless you need bf16 numerics",
            )
        # 1. Everything that can be wrong in the config or the data, before any weights load.
        self._loss_module = self._setup_loss(cfg.loss)  # uncompiled: evaluation asks it for rewards
        self._traits = loss_traits(self._loss_module)  # what the loss needs: one frozen object
        self._loss_fn = self._loss_module  # compiled below with compile=true
        model_facts = meta_model(cfg.model, self._dtype)  # cheap (meta tensors): LoRA? context?
        self._lora = lora_settings(cfg.model) if is_lora_model(model_facts) else None
        fits = (context_length(model_facts), vocab_size(model_facts))  # what rows must fit
        self._router_aux = self._setup_router_aux(settings.router_aux_loss_coef, model_facts)
        del model_facts
        self._ref_plan = self._setup_reference_plan(settings, self._loss_module)
        self._tokenizer = build_tokenizer(cfg.tokenizer, fits[1])
        self._dataset = self._setup_dataset(cfg.dataset, "dataset", self._traits.paired, fits)
        self._eval_dataset = None
        if settings.eval_dataset is not None:
            self._eval_dataset = self._setup_dataset(
                settings.eval_dataset, "eval_dataset", True, fits
            )

        # 2. The run's identity: a fresh run never adopts another run's checkpoints; a resumed
        # run continues the newest complete checkpoint of a run with these settings.
        self._checkpointer = HFCheckpoint.from_config(cfg.checkpointer, "checkpointer")
        self._ref_checkpointer = None
        if self._ref_plan.own_checkpoint:
            self._ref_checkpointer = HFCheckpoint.from_config(
                cfg.ref_checkpointer, "ref_checkpointer"
            )
        self._checkpoints = StepCheckpointer(
            self._output_dir,
            self._checkpointer,
            rank=self.rank,
            world_size=self.world_size,
            device=self._device,
            keep_last_n=settings.keep_last_n_checkpoints,
            lora=self._lora,
            log=log,
        )
        resume = self._checkpoints.start(
            cfg,
            resume=settings.resume_from_checkpoint,
            overwrite=settings.overwrite_output_dir,
            global_batch=self.batch_size * self.world_size,
            accumulation=self.accum,
            effective={"reference.quantization": self._ref_plan.quantization},
            content=self._content_identity,
        )

        # 3. Models: the policy, and where the reference log-probs come from.
        base_sd = self._checkpointer.load()
        self._model = self._setup_policy(cfg.model, base_sd)
        if self._router_aux is not None:
            self._moe_layers = keep_router_logits(self._model)
        self._reference, self._ref_files = self._setup_reference(base_sd)
        del base_sd

        # 4. Optimizer, data order, schedule.
        self._optimizer = config.instantiate(
            cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad]
        )
        self._checkpoints.attach(self._model, self._optimizer)
        order = self._setup_data_order(settings)
        self._sampler, self._collate, self._dataloader = order.sampler, order.collate, order.loader
        self._steps_per_epoch, self._eval_dataloader = order.steps_per_epoch, order.eval_loader
        if resume is not None:
            position = self._load_recipe_state(resume.state)
            self.seed, self.global_step, self.epochs_run, self._resume_micro = position
            self._sampler.seed = self.seed  # the checkpoint's data order
        self._eval_reference = self._reference
        if self._ref_plan.precompute:
            self._reference, self._eval_reference = self._setup_precompute()
        self._lr_scheduler = self._setup_lr_scheduler(settings.lr_scheduler, resume)
        if settings.compile:
            # Attributes (reference_free, beta, ...) stay reachable through the compiled wrapper.
            self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)

        # 5. Logging, and only now that every check passed: overwrite_output_dir's deletion.
        self._metrics = StepMetrics(self._device)
        self._checkpoints.clear_previous_run()
        dist.barrier()
        self._metric_logger = self._setup_metric_logger(settings.metric_logger)
        for sig in _STOP_SIGNALS:  # pre-emption and Ctrl-C: a checkpoint, then a clean stop
            signal.signal(sig, self._on_stop_signal)
        dist.barrier()

    def _setup_router_aux(self, coef: float, meta_model) -> Optional[Tuple[float, int]]:
        """``(coef, top_k)`` of the MoE router load-balancing term, or ``None`` when off."""
        if not coef:
            return None
        layers = moe_layers(meta_model)
        if not layers:
            raise PrefOptUserError(
                f"router_aux_loss_coef: {coef} is set, but the model has no Mixture-of-Experts "
                "layer (a router); set it to 0"
            )
        if not self._traits.paired:
            raise PrefOptUserError(
                "router_aux_loss_coef: the router load-balancing term is built for the paired "
                "losses; KTO does not add it yet (set it to 0)"
            )
        return float(coef), int(layers[0].top_k)

    def _setup_lock(self) -> Optional[OutputDirLock]:
        """Rank 0 holds the lock on ``output_dir``; if it cannot, every rank stops together."""
        lock = OutputDirLock(self._output_dir) if self._is_rank_zero else None
        rank_zero_check(lock.acquire if lock is not None else None, self.rank, self.world_size)
        return lock

    def _content_identity(self) -> Dict[str, str]:
        """What the run reads: training rows, tokenizer, base and reference weight bytes."""
        ref = self._ref_checkpointer
        return content_digests(
            dataset=self._dataset,
            tokenizer=self._tokenizer,
            weights=self._checkpointer.content_files(),
            reference=ref.content_files() if ref is not None else None,
        )

    def _setup_loss(self, cfg_loss: Any):
        try:
            loss = build_loss(cfg_loss)
        except PrefOptUserError:
            raise
        except (ValueError, TypeError, ImportError) as err:
            raise PrefOptUserError(f"loss: {err}") from err
        global_batch = self.batch_size * self.world_size
        if not loss_traits(loss).paired and global_batch < 2:
            raise PrefOptUserError(
                f"batch_size: {type(loss).__name__} builds its KL reference point from "
                "mismatched pairs of the global micro-batch and needs batch_size x processes >= 2, "
                f"got {self.batch_size} x {self.world_size}"
            )
        return loss

    def _setup_reference_plan(self, settings, loss):
        plan = plan_reference(
            loss,
            lora=self._lora is not None,
            quantization=settings.reference_quantization,
            precompute=settings.reference_precompute,
            ref_checkpointer=settings.ref_checkpointer is not None,
        )
        for warning in plan.warnings:
            utils.log_rank_zero(log, f"WARNING: {warning}")
        return plan

    def _setup_dataset(self, node: Any, key: str, paired: bool, fits: Tuple[Any, Any]):
        # rows are identified by their position (the data order, errors and the reference cache)
        ds = PositionIndexed(build_datasets(node, key, self._tokenizer))
        check_dataset_kind(ds, key, paired=paired)
        check_fits_context(ds, key, *fits)  # context length and vocabulary
        if key != "dataset":
            return ds
        if len(ds) < self.batch_size * self.world_size:
            raise PrefOptUserError(
                f"dataset: {len(ds)} usable rows, fewer than one global batch "
                f"(batch_size {self.batch_size} x {self.world_size} processes)"
            )
        stats = getattr(ds, "stats", None) or {}
        n_d, n_u = stats.get("n_desirable"), stats.get("n_undesirable")
        if not self._traits.paired and n_d is not None and n_u is not None:
            utils.log_rank_zero(log, f"KTO data: {n_d} desirable, {n_u} undesirable rows")
            warning = kto_balance_warning(
                n_d, n_u, self._loss_module.desirable_weight, self._loss_module.undesirable_weight
            )
            if warning:
                utils.log_rank_zero(log, f"WARNING: {warning}")
        if stats:
            utils.log_rank_zero(log, f"dataset stats: {dict(stats)}")
        return ds

    def _placement(self) -> ModelPlacement:
        settings = self.settings
        return ModelPlacement(
            device=self._device,
            dtype=self._dtype,
            compile=settings.compile,
            activation_checkpointing=settings.enable_activation_checkpointing,
            fsdp_cpu_offload=settings.fsdp_cpu_offload,
            fsdp_reshard_after_forward=settings.fsdp_reshard_after_forward,
            custom_sharded_layers=settings.custom_sharded_layers,
            shard=shards_model(self.world_size, settings.fsdp_cpu_offload),
        )

    def _setup_policy(self, cfg_model: Any, base_sd: Dict[str, torch.Tensor]):
        """The policy from the base weights (or the resumed step's), LoRA adapters initialised
        from the seed (the same on any number of ranks)."""
        sd, source = self._checkpoints.policy_weights(
            base_sd,
            lambda sd: lora_init_state(
                meta_model(cfg_model, self._dtype), self.seed, self._dtype, sd
            ),
        )
        return build_model(
            cfg_model, sd, self._placement(), source=source, trainable=True,
            verbose=self._is_rank_zero, weight_name=self._checkpointer.weight_name,
        )  # fmt: skip

    def _setup_reference(
        self, base_sd: Dict[str, torch.Tensor]
    ) -> Tuple[ReferenceSource, List[Path]]:
        """Where the reference log-probs come from, and the weight files it was built from
        (the precompute cache's fingerprint)."""
        reference, files = build_reference(
            self._ref_plan,
            loss_name=type(self._loss_module).__name__,
            policy=self._model,
            base=self._checkpointer,
            base_sd=base_sd,
            ref_checkpointer=self._ref_checkpointer,
            model_cfg=self.cfg.model,
            placement=self._placement(),
            chunk_size=self._chunk_size,
            log=lambda line: utils.log_rank_zero(log, line),
        )
        utils.log_rank_zero(log, f"reference model: {reference.describe()}")
        return reference, files

    def _setup_data_order(self, settings) -> "_DataOrder":
        """The global data order, the collator of this rank's part, the steps per epoch, and
        the held-out loader (every held-out row exactly once, whatever the world size)."""
        global_batch = self.batch_size * self.world_size
        sampler = GlobalBatchSampler(
            len(self._dataset), global_batch, seed=self.seed, shuffle=settings.shuffle
        )
        packing = None
        if settings.packed:
            # rows as long as the model's context; lengths rounded to a multiple of 128 under
            # compile (a bounded number of shapes), else of 8
            packing = PackingLayout(
                share_prompt=settings.share_prompt,
                capacity=int(self._model.max_seq_len),
                multiple_of=128 if settings.compile else 8,
            )
        collate = PreferenceCollator(
            paired=self._traits.paired,
            pad_id=self._tokenizer.pad_id,
            # KTO's KL rows are truncated like the dataset truncated its rows
            max_seq_len=getattr(self._dataset, "max_seq_len", self._tokenizer.max_seq_len),
            rank=self.rank,
            rows_per_rank=self.batch_size,
            packing=packing,
        )
        loader = self._loader(self._dataset, sampler, collate)
        micro_per_epoch = len(sampler)
        steps_per_epoch = micro_per_epoch // self.accum
        if settings.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
        if steps_per_epoch < 1:
            raise PrefOptUserError(
                f"gradient_accumulation_steps: {micro_per_epoch} micro-batches per epoch cannot fill one "
                f"step of {self.accum} (lower gradient_accumulation_steps or batch_size)"
            )
        eval_loader = None
        if self._eval_dataset is not None:
            # the last global batch may be partial: it is split evenly over the ranks
            # (PreferenceCollator.share)
            order = GlobalBatchSampler(
                len(self._eval_dataset), global_batch, seed=self.seed, shuffle=False,
                drop_last=False,
            )  # fmt: skip
            share = PreferenceCollator(
                paired=True, pad_id=collate.pad_id, rank=self.rank,
                rows_per_rank=self.batch_size, world_size=self.world_size, packing=packing,
            ).share  # fmt: skip
            eval_loader = self._loader(self._eval_dataset, order, share)
        return _DataOrder(sampler, collate, loader, steps_per_epoch, eval_loader)

    def _loader(self, dataset, order: GlobalBatchSampler, collate) -> DataLoader:
        """Global micro-batches in ``order``, each collated into this rank's batch object.

        Own generator: iter(DataLoader) draws a base seed from its generator, which would
        otherwise be the global RNG (one extra draw per epoch or evaluation; a resumed run's
        RNG state would then differ from the uninterrupted run's).
        """
        return DataLoader(
            dataset,
            batch_sampler=order,
            collate_fn=collate,
            num_workers=0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _setup_precompute(self) -> Tuple[ReferenceSource, ReferenceSource]:
        """``reference.precompute``: the reference log-probs of every training row (and KTO KL
        pair) and every held-out row, computed once (or loaded from a cache whose fingerprint
        matches); the reference model is then freed and training runs without it. Returns
        the training and the held-out reference sources."""
        root = self._output_dir / "reference_cache"

        def job(dataset, paired: bool, max_seq_len, kl_pairs, what: str) -> PrecomputeJob:
            # the padded layout, whatever training uses: a cache does not depend on it
            padded = PreferenceCollator(
                paired=paired, pad_id=self._collate.pad_id, max_seq_len=max_seq_len
            )
            return PrecomputeJob(
                dataset, padded, self.batch_size, self.world_size, self.rank, self._device,
                kl_pairs, what,
            )  # fmt: skip

        pairs = None
        if not self._traits.paired:
            pairs = kto_kl_pairs(
                self._sampler, self.total_epochs, self._steps_per_epoch * self.accum
            )
        jobs = {
            "train": (
                job(
                    self._dataset,
                    self._traits.paired,
                    self._collate.max_seq_len,
                    pairs,
                    "the training rows",
                ),
                root,
            )
        }
        if self._eval_dataset is not None:
            jobs["eval"] = (
                job(self._eval_dataset, True, None, None, "the held-out rows"),
                root / "eval",
            )
        sources = precompute_reference(
            self._reference,
            jobs,
            plan=self._ref_plan,
            weight_files=self._ref_files,
            tokenizer=self._tokenizer,
            settings={
                "model": self.cfg.model,
                "dtype": self.settings.dtype,
                "lora": self._lora is not None,
            },  # fmt: skip
            log=lambda line: utils.log_rank_zero(log, line),
        )
        return sources["train"], sources.get("eval", sources["train"])

    def _setup_lr_scheduler(self, node: Any, resume):
        """The schedule over the run's steps. torchtune's schedulers take the step count
        (``num_training_steps``); a torch-native one (``torch.optim.lr_scheduler.*``) is
        given only the arguments it accepts."""
        if node is None:
            return None
        from torchtune_prefopt.training.config_checks import component_target

        passed = {"num_training_steps": self.total_epochs * self._steps_per_epoch, "last_epoch": -1}
        params = inspect.signature(component_target(node, "lr_scheduler")).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            passed = {k: v for k, v in passed.items() if k in params}
        scheduler = config.instantiate(node, self._optimizer, **passed)
        if resume is not None and "lr_scheduler" in resume.state:
            scheduler.load_state_dict(resume.state["lr_scheduler"])
            # Constructing the scheduler (last_epoch=-1) reset every group's lr to the
            # schedule's step-0 value; load_state_dict does not touch the optimizer, so put
            # back the lr the interrupted run would use for its next step.
            for group, lr in zip(self._optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        return scheduler

    def _setup_metric_logger(self, node: Any):
        """Rank 0's metric logger (``metric_logger: null``: none). The run's config is saved
        as ``<output_dir>/torchtune_config.yaml`` either way (torchtune's loggers write it;
        ``prefopt_compare`` reads a run's loss and model from it)."""
        if not self._is_rank_zero:
            return None
        if node is None:
            saved = OmegaConf.to_yaml(self.cfg).encode()
            atomic_write_bytes(self._output_dir / "torchtune_config.yaml", saved)
            return None
        logger = config.instantiate(node)
        logger.log_config(self.cfg)
        return logger

    # ------------------------------------------------------------------ state
    def _recipe_state(self, epoch: int, micro_in_epoch: int) -> Dict[str, Any]:
        """What a resume needs besides weights and optimizer (collective: gathers RNG)."""
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

    def _load_recipe_state(self, state: Dict[str, Any]) -> Tuple[int, int, int, int]:
        """A resumed run: the RNG and optimizer state are loaded; returns where the run
        continues, ``(seed, global step, epoch, micro-batches into that epoch)``."""
        seed = state["seed"]
        if seed != self.seed:
            utils.log_rank_zero(
                log, f"WARNING: using the checkpoint's seed {seed} (config has {self.seed})"
            )
        epoch, micro = state["epoch"], state["micro_in_epoch"]
        if micro >= self._steps_per_epoch * self.accum:
            epoch, micro = epoch + 1, 0
        rng = state["rng_states"]
        if len(rng) == self.world_size:
            torch.set_rng_state(rng[self.rank])
        opt_sd = state.get("optimizer")
        if opt_sd is not None:
            training.load_from_full_optimizer_state_dict(
                self._model, self._optimizer, opt_sd, self._device
            )
        return seed, state["step"], epoch, micro

    def save_checkpoint(self, epoch: int, micro_in_epoch: int, reason: str) -> Optional[Path]:
        """A step checkpoint of the run now (collective)."""
        state = self._recipe_state(epoch, micro_in_epoch)
        return self._checkpoints.save(self.global_step, state, reason)

    def _on_stop_signal(self, signum, frame) -> None:  # noqa: ARG002
        # the first SIGTERM (pre-emption) or SIGINT (Ctrl-C) asks for a checkpoint at the next
        # step boundary; later ones (a scheduler repeating itself, a second Ctrl-C, torchrun
        # forwarding the signal) must not kill the save or the exit after it
        self._stop_signal = signal.Signals(signum).name
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    # ------------------------------------------------------------------ compute
    def _forms(self, logps: Optional[SequenceLogProbs]):
        """The two halves of a ``[2B]`` result in the form the loss takes (mean, sum, or the
        SequenceLogProbs themselves: :func:`~torchtune_prefopt.losses.loss_inputs`)."""
        return loss_inputs(
            self._loss_module, *(logps.halves() if logps is not None else (None, None))
        )

    def _paired_step(self, batch: PairedBatch):
        """Loss of ``B`` pairs, and the metric sums ``{name: (sum over pairs, count name)}``."""
        policy = batch.logps(self._model, self._chunk_size)
        ref = self._reference.logps(batch)
        extra = {}
        if self._step_token_mean is not None:  # the SFT term's global token mean
            extra["chosen_tokens_per_pair"] = self._step_token_mean
        losses, chosen_rewards, rejected_rewards = self._loss_fn(
            *self._forms(policy), *self._forms(ref), **extra
        )
        policy_chosen, policy_rejected = policy.detach().halves()
        stats = {
            "rewards/chosen": (chosen_rewards.detach().sum(), "rows"),
            "rewards/rejected": (rejected_rewards.detach().sum(), "rows"),
            "rewards/accuracies": (pair_accuracy(chosen_rewards, rejected_rewards).sum(), "rows"),
            "rewards/margins": ((chosen_rewards - rejected_rewards).detach().sum(), "rows"),
            "logps/chosen": (policy_chosen.sum.sum(), "rows"),
            "logps/rejected": (policy_rejected.sum.sum(), "rows"),
        }
        for name, term in getattr(self._loss_module, "term_losses", {}).items():
            stats[f"loss/{name}"] = (term.double().sum(), "rows")  # a WeightedSum's terms
        if self._router_aux is not None:  # one value per forward, as TRL adds it
            coef, top_k = self._router_aux
            aux = router_load_balancing_loss(
                collect_router_logits(self._moe_layers), batch.token_weights(), top_k
            )
            losses = losses + coef * aux
            stats["loss/router_aux"] = (aux.detach().double() * len(batch), "rows")
        return losses, stats, {"rows": float(len(batch))}

    def _kto_step(self, batch: UnpairedBatch):
        """Loss of ``B`` unpaired rows (with their KL rows, detached in every layout: KTO's
        reference point is not trained through), and the metric sums."""
        policy = batch.logps(self._model, self._chunk_size)
        policy_rows, policy_kl = self._forms(policy)
        ref_rows, ref_kl = self._forms(self._reference.logps(batch))
        losses, rewards, kl = self._loss_fn(
            policy_rows, ref_rows, batch.is_desirable, policy_kl, ref_kl
        )
        row_logps = policy.halves()[0].sum.detach()
        desirable = batch.is_desirable.float()
        stats = {
            "kl": (kl.detach().float() * len(batch), "rows"),  # z0 is global: the mean is z0
            "rewards/desirable": ((rewards.detach() * desirable).sum(), "desirable"),
            "rewards/undesirable": ((rewards.detach() * (1 - desirable)).sum(), "undesirable"),
            "logps/desirable": ((row_logps * desirable).sum(), "desirable"),
            "logps/undesirable": ((row_logps * (1 - desirable)).sum(), "undesirable"),
        }
        counts = {
            "rows": float(len(batch)),
            "desirable": desirable.sum().item(),
            "undesirable": (1 - desirable).sum().item(),
        }
        return losses, stats, counts

    def _nonfinite_rows(self, losses: torch.Tensor, index: torch.Tensor) -> List[int]:
        bad_local = index.cpu()[~torch.isfinite(losses.detach().cpu())].tolist()
        gathered: List[List[int]] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, bad_local)
        return sorted(i for part in gathered for i in part)

    def _skip_nonfinite(self, msg: str) -> bool:
        """``nonfinite: stop`` raises (exit 3); ``skip`` warns and skips the step (True)."""
        if self.settings.nonfinite == "stop":
            raise FloatingPointError(msg + " (set nonfinite=skip to skip such steps)")
        utils.log_rank_zero(log, f"WARNING: {msg}; skipping this step")
        return True

    def _micro_step(self, batch) -> bool:
        """Forward and backward of one micro-batch; True if its loss is non-finite (skipped)."""
        step_fn = self._paired_step if self._traits.paired else self._kto_step
        losses, stats, counts = step_fn(batch)
        self._metrics.count(tokens=batch.real_tokens())
        if any_rank(not bool(torch.isfinite(losses.detach()).all()), self._device):
            rows = self._nonfinite_rows(losses, batch.index)
            return self._skip_nonfinite(
                f"step {self.global_step + 1}: non-finite loss for dataset rows {rows}"
            )
        (losses.mean() / self.accum).backward()
        self._metrics.add("loss", losses.detach().double().sum())
        for name, (total, per) in stats.items():
            self._metrics.add(name, total, per)
        self._metrics.count(**counts)
        return False

    def _optimizer_step(self, step_bad: bool) -> Tuple[Optional[torch.Tensor], bool]:
        """Clip (the norm is always measured: the non-finite guard needs it; max_norm=inf
        scales by exactly 1.0), step unless the step is bad, zero the gradients, advance the
        schedule. Returns the gradient norm (``None`` for a step skipped before it) and
        whether the step was skipped."""
        grad_norm = None
        if not step_bad:
            clip = self.settings.clip_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self._model.parameters(), max_norm=float(clip) if clip is not None else math.inf
            )
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                step_bad = self._skip_nonfinite(
                    f"step {self.global_step + 1}: non-finite gradient norm ({grad_norm.item()})"
                )
        if not step_bad:
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._step_lr = get_lr(self._optimizer)  # the rate this step used (logged)
        self.global_step += 1
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return grad_norm, step_bad

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """The held-out metrics (:func:`~torchtune_prefopt.losses.pair_metrics`: the loss's own
        implicit-reward accuracy and margins, log-probs, the reference's ranking accuracy) as
        ``eval/<name>``, means over every held-out row, through the same DataLoader path,
        reference source and loss as training."""
        sums = StepMetrics(self._device)
        for batch, real in self._eval_dataloader:  # real: this rank's rows (0: a padding copy)
            batch = batch.to(self._device)
            policy = batch.logps(self._model, self._chunk_size)
            ref = self._eval_reference.logps(batch)
            per_pair = pair_metrics(
                self._loss_module, policy.halves(), ref.halves() if ref is not None else None
            )
            for name, values in per_pair.items():
                sums.add(f"eval/{name}", values[:real].sum())
            sums.count(rows=real)
        means, counts = sums.reduce()
        means["eval/rows"] = counts.get("rows", 0.0)
        return means

    def _log(self, metrics: Dict[str, float]) -> None:
        if any(k.startswith("eval/") for k in metrics):
            self._evals.append((self.global_step, dict(metrics)))
        else:
            self._last_metrics = dict(metrics)
        if self._metric_logger is not None:
            self._metric_logger.log_dict(metrics, step=self.global_step)

    def _log_step(self, grad_norm, step_bad: bool, seconds: float, pbar, epoch: int) -> None:
        """The means over micro-batches and ranks of the last ``log_every_n_steps`` steps."""
        metrics, counts = self._metrics.reduce()
        metrics["lr"] = self._step_lr
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.item()
        metrics["tokens_per_second"] = counts.get("tokens", 0.0) / max(seconds, 1e-9)
        metrics["peak_memory_gib"] = _peak_memory_gib(self._device)
        if step_bad:
            metrics["skipped_step"] = 1.0
        self._log(metrics)
        if "loss" in metrics:
            pbar.set_description(f"{epoch + 1}|{self.global_step}|loss {metrics['loss']:.4f}")

    def summary(self, final_path: Optional[Path], seconds: float) -> str:
        """End-of-run summary for the terminal (rank 0)."""
        lines = [
            "",
            f"== prefopt_distributed: {type(self._loss_module).__name__} | {self.world_size} process(es) | "
            f"{self.global_step} steps in {seconds:.0f}s",
        ]
        last = self._last_metrics
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
        shown = [f"{k}={last[k]:.4g}" for k in keys if k in last]
        if shown:
            lines.append("   last step: " + "  ".join(shown))
        if self._evals:
            (s0, e0), (s1, e1) = self._evals[0], self._evals[-1]
            acc = "eval/rewards/accuracies"
            lines.append(
                f"   held-out reward accuracy: {e0.get(acc, float('nan')):.3f} (step {s0}) -> "
                f"{e1.get(acc, float('nan')):.3f} (step {s1}) on {int(e1.get('eval/rows', 0))} rows"
            )
            # what the accuracy rests on: the margin's size, and what the reference alone does
            context = [f"mean reward margin {e1.get('eval/rewards/margins', float('nan')):.3g}"]
            if "eval/reference/accuracies" in e1:
                context.append(
                    "the reference alone ranks "
                    f"{e1['eval/reference/accuracies']:.3f} of the pairs by log-prob"
                )
            lines.append(
                f"     ({'; '.join(context)}; a margin within float rounding is a tie, 1/2)"
            )
        if final_path is not None:
            lines.append(f"   checkpoint (HF format): {final_path}")
        log_dir = getattr(self._metric_logger, "log_dir", None) or (
            self.settings.metric_logger or {}
        ).get("log_dir")
        if log_dir:
            lines.append(f"   metrics log: {log_dir}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ train
    def train(self) -> Optional[Path]:
        """The training loop; returns the final checkpoint (rank 0; ``None`` elsewhere)."""
        settings = self.settings
        self._optimizer.zero_grad(set_to_none=True)
        evaluating = self._eval_dataloader is not None
        if evaluating and self.global_step == 0:
            self._log(self.evaluate())
        self._t0 = time.perf_counter()  # tokens_per_second: since the last logged step
        # the bar is closed (its line ended) before anything else is printed, also on errors
        with tqdm(
            total=self.total_epochs * self._steps_per_epoch,
            initial=self.global_step,
            disable=not self._is_rank_zero,
        ) as pbar:
            for epoch in range(self.epochs_run, self.total_epochs):
                self._train_epoch(epoch, pbar)
                self.epochs_run = epoch + 1
        if evaluating and not (
            settings.eval_every_n_steps and self.global_step % settings.eval_every_n_steps == 0
        ):
            self._log(self.evaluate())
        return self._checkpoints.final(
            self.global_step, lambda: self._recipe_state(self.total_epochs, 0)
        )

    def _train_epoch(self, epoch: int, pbar) -> None:
        settings = self.settings
        # Only the first epoch of a resumed run starts mid-way (epochs_run is advanced at the
        # end of every epoch, so comparing epoch with it would skip the next epoch's start too).
        start_micro, self._resume_micro = self._resume_micro, 0
        self._sampler.set_epoch(epoch, start_micro)
        micro, step_bad = start_micro, False
        for step_batches in self._step_groups():
            if micro // self.accum >= self._steps_per_epoch:
                break
            self._step_token_mean = self._global_token_mean(step_batches)
            for batch in step_batches:
                step_bad |= self._micro_step(batch)
            micro += len(step_batches)
            if micro % self.accum != 0:
                continue
            grad_norm, step_bad = self._optimizer_step(step_bad)
            pbar.update(1)
            if self.global_step % settings.log_every_n_steps == 0:
                self._log_step(grad_norm, step_bad, time.perf_counter() - self._t0, pbar, epoch)
                self._t0 = time.perf_counter()
            step_bad = False
            if (
                self._eval_dataloader is not None
                and settings.eval_every_n_steps
                and self.global_step % settings.eval_every_n_steps == 0
            ):
                self._log(self.evaluate())
                self._t0 = time.perf_counter()
            if any_rank(self._stop_signal is not None, self._device):
                name = self._stop_signal or "SIGTERM"  # a rank that got none: another did
                path = self.save_checkpoint(epoch, micro, reason=name.lower())
                raise _Preempted(path, name)
            if settings.save_every_n_steps and self.global_step % settings.save_every_n_steps == 0:
                self.save_checkpoint(epoch, micro, reason="periodic")

    def _step_groups(self):
        """The data loader's micro-batches, on the device, one optimizer step's worth at a
        time (a loss with an SFT term needs the whole step's token count first)."""
        group = []
        for batch in self._dataloader:
            group.append(batch.to(self._device))
            if len(group) == self.accum:
                yield group
                group = []
        if group:
            yield group

    def _global_token_mean(self, step_batches) -> Optional[float]:
        """Chosen completion tokens per pair over the step's global batch (every rank and
        micro-batch: one all-reduce), for a loss that ``needs_step_token_mean``; else None."""
        if not (
            self._traits.paired
            and self._traits.sequence_logps
            and self._traits.needs_step_token_mean
        ):
            return None
        tokens = sum(float(b.label_counts()[: len(b)].sum()) for b in step_batches)  # chosen half
        pairs = sum(len(b) for b in step_batches)
        counts = torch.tensor([tokens, pairs], dtype=torch.float64, device=self._device)
        all_reduce_sum(counts)
        return float(counts[0] / counts[1])

    def discard_empty_output_dir(self) -> None:
        """Remove ``output_dir`` if this run created it and nothing was written into it."""
        if self._lock is not None:
            self._lock.release()
        out = self._output_dir
        if self._output_dir_existed or not out.is_dir():
            return
        if any(p.is_file() or p.is_symlink() for p in out.rglob("*")):
            return
        import shutil

        shutil.rmtree(out, ignore_errors=True)

    def close_metric_logger(self) -> None:
        """Flush and close the metric log (a refused write raises ``OSError``)."""
        logger, self._metric_logger = self._metric_logger, None
        if logger is not None:
            logger.close()

    def cleanup(self, finished: bool = False) -> None:
        try:
            self.close_metric_logger()
        except OSError:
            pass  # the run already stopped on this error (reported once, exit 4)
        if self._lock is not None:
            self._lock.release()
        if dist.is_initialized():
            if finished:
                # leave together: a rank tearing its process group down while another still
                # talks to it can abort in gloo's threads ("terminate called ...")
                dist.barrier()
            dist.destroy_process_group()


#: what a refused write looks like: disk full, quota, read-only filesystem
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


#: the signals that stop a run cleanly: pre-emption (SIGTERM) and Ctrl-C (SIGINT)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Preempted(Exception):
    """Raised after the stop checkpoint (``path``) is written, to exit cleanly (status 0)."""

    def __init__(self, path: Optional[Path], signal_name: str = "SIGTERM"):
        super().__init__(str(path))
        self.path, self.signal_name = path, signal_name


def run(cfg: DictConfig) -> None:
    """Set up, train and summarise one run. A config/data error raises
    :class:`PrefOptUserError` (before anything is computed or written); a numeric guard exits 3."""
    recipe = PrefOptRecipe(cfg)
    start = time.perf_counter()
    finished = False
    try:
        recipe.setup()
        final_path = recipe.train()
        if recipe._is_rank_zero:
            print(recipe.summary(final_path, time.perf_counter() - start), flush=True)
        recipe.close_metric_logger()
        finished = True
    except _Preempted as stop:
        utils.log_rank_zero(
            log,
            f"{stop.signal_name}: saved {stop.path} at step {recipe.global_step}; resume with resume_from_checkpoint=True",
        )
        finished = True
    except FloatingPointError as err:
        # A numeric guard stopped the run (every rank decided together): one line, exit 3.
        if recipe._is_rank_zero:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    except WriteFailed as err:
        # disk full / read-only during a save: one line, exit 4, earlier checkpoints intact
        if recipe._is_rank_zero:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_WRITE_FAILED)
    except OSError as err:
        # any other write the disk refused (a metric log line, the reference cache ...)
        if err.errno not in _WRITE_ERRNOS:
            raise
        saved = latest_checkpoint(recipe._output_dir)
        intact = (
            f"the checkpoints saved so far are intact (newest {saved.name}: resume_from_checkpoint=True)"
            if saved is not None
            else "no checkpoint of this run was written yet: free some space and run it again"
        )
        print(
            f"error: writing {err.filename or 'a file'} failed: {err.strerror}; {intact}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_WRITE_FAILED)
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
    exit_after(recipe_main)  # several ranks: no interpreter teardown (see its docstring)
