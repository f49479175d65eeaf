"""The recipe's step checkpoints: one object saves, resumes and writes ``final``.

Like torchtitan's ``CheckpointManager``: the recipe hands :class:`StepCheckpointer` its model,
optimizer and recipe state, and asks

* :meth:`StepCheckpointer.start` ``(cfg, ...)``: a fresh run (refuses another run's
  ``output_dir``) or a resumed one (the newest complete checkpoint, verified on every rank,
  of a run with this config's settings and global batch) -> :class:`ResumePoint` or ``None``;
* :meth:`StepCheckpointer.policy_weights`: the weights the policy starts from (the base, or
  the resumed step's weights / adapters);
* :meth:`StepCheckpointer.save` ``(step, state, reason)``: an atomic, checksummed step
  checkpoint (LoRA: the adapter only, except ``final``);
* :meth:`StepCheckpointer.final` ``(step, state)``: this run's final weights (the last
  periodic save if it is at this step, else a final save) and the ``final`` link.

All identity checks live here and in :mod:`~torchtune_prefopt.training.checkpoints`; the file
layout is that module's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.hf_checkpoint import HFCheckpoint
from torchtune_prefopt.training import checkpoints as ckpt
from torchtune_prefopt.training.distributed import any_rank

__all__ = ["ResumePoint", "StepCheckpointer"]


@dataclass
class ResumePoint:
    """A verified step checkpoint a run continues, and its ``recipe_state.pt``."""

    path: Path
    state: Dict[str, Any]


class StepCheckpointer:
    """Step checkpoints of one run in ``<output_dir>/checkpoints`` (see the module docstring).

    Args:
        output_dir: the run's directory.
        hf: the base checkpoint (its model type and HF conversion write the step folders).
        rank, world_size, device: this process.
        keep_last_n: delete all but the newest n step checkpoints after each save.
        lora: the LoRA settings of a LoRA model (adapter files are written), else ``None``.
        log: a logger (rank 0 logs).
    """

    def __init__(
        self,
        output_dir: Path,
        hf: HFCheckpoint,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        keep_last_n: Optional[int],
        lora: Optional[Dict[str, Any]],
        log: Any,
    ):
        self.output_dir, self.hf = Path(output_dir), hf
        self.rank, self.world_size, self.device = rank, world_size, device
        self.keep_last_n, self.lora, self.log = keep_last_n, lora, log
        self.identity: Optional[ckpt.RunIdentity] = None
        self.resumed: Optional[ResumePoint] = None
        self._replace_previous: List[Path] = []
        self._model: Optional[torch.nn.Module] = None
        self._optimizer: Any = None
        self._adapter_keys: set = set()

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ start / resume
    def start(
        self,
        cfg: Any,
        *,
        resume: bool,
        overwrite: bool,
        global_batch: int,
        accumulation: int,
        effective: Optional[Dict[str, Any]] = None,
    ) -> Optional[ResumePoint]:
        """Decide between a fresh and a resumed run (before any weights load); every rank
        ends up with the same run id. ``effective``: identity values the run uses instead of
        the config's (see :func:`~torchtune_prefopt.training.recipe_config.identity_digests`)."""
        self.identity = ckpt.RunIdentity.new(cfg, effective)
        if not resume:
            self._replace_previous = ckpt.check_fresh_output_dir(self.output_dir, overwrite)
        else:
            path = ckpt.latest_checkpoint(self.output_dir)
            if path is None:
                self._log(
                    f"resume_from_checkpoint=True but no complete checkpoint in {self.output_dir}; starting fresh"
                )
            else:
                manifest = ckpt.verify_checkpoint_collective(path, self.rank, self.world_size)
                self.identity = (
                    ckpt.check_resumable(path, manifest, cfg, effective) or self.identity
                )
                state = ckpt.load_recipe_state(path)
                _check_same_global_batch(state, global_batch, accumulation)
                self.resumed = ResumePoint(path, state)
                self._log(f"Resuming from {path} (run {self.identity.run_id})")
        ids = [self.identity.run_id]
        dist.broadcast_object_list(ids, src=0)  # one run id on every rank (a new one is random)
        self.identity.run_id = ids[0]
        return self.resumed

    def policy_weights(
        self,
        base_sd: Dict[str, torch.Tensor],
        init_adapters: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]],
    ) -> Tuple[Dict[str, torch.Tensor], Any]:
        """``(state dict, source)`` the policy starts from: full fine-tuning resumes from the
        step's weights; LoRA is the base plus the step's adapters, or ``init_adapters(base)``
        for a fresh run."""
        if self.resumed is not None and self.lora is None:
            reader = self.hf.reader(self.resumed.path, self.output_dir)
            return reader.load(), self.resumed.path
        sd = dict(base_sd)
        if self.lora is not None:
            if self.resumed is not None:
                sd.update(ckpt.load_adapter_weights(self.resumed.path))
            else:
                sd.update(init_adapters(sd))
        return sd, self.hf.checkpoint_dir

    def attach(self, model: torch.nn.Module, optimizer: Any) -> None:
        """The model and optimizer whose state :meth:`save` writes."""
        from torchtune.modules.peft import get_adapter_params

        self._model, self._optimizer = model, optimizer
        self._adapter_keys = set(get_adapter_params(model)) if self.lora is not None else set()

    def clear_previous_run(self) -> None:
        """``overwrite_output_dir=true``: delete the previous run's files, once set-up has
        passed every check (rank 0)."""
        if self.is_rank_zero and self._replace_previous:
            ckpt.remove_previous_run(self._replace_previous)
            self.log.info(
                f"overwrite_output_dir: removed {', '.join(str(p) for p in self._replace_previous)}"
            )

    # ------------------------------------------------------------------ save
    def _gather_adapter_state(self) -> Dict[str, torch.Tensor]:
        """Full LoRA adapter tensors on rank 0, without gathering the frozen base weights."""
        out = {}
        for name, value in self._model.state_dict().items():
            if name not in self._adapter_keys:
                continue
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            if self.is_rank_zero:
                out[name] = value.detach().cpu()
        return out

    def _to_write(self, full_sd: Dict[str, torch.Tensor], adapter_only: bool) -> Dict[str, Any]:
        from torchtune import training
        from torchtune.modules.peft import get_adapter_state_dict

        from torchtune_prefopt.training.lora import adapter_config, merged_lora_state_dict

        if self.lora is None:
            return {training.MODEL_KEY: full_sd}
        out = {training.ADAPTER_KEY: full_sd, training.ADAPTER_CONFIG: adapter_config(self.lora)}
        if not adapter_only:
            out[training.MODEL_KEY] = merged_lora_state_dict(full_sd, self.lora)
            out[training.ADAPTER_KEY] = get_adapter_state_dict(full_sd)
        return out

    def save(self, step: int, state: Dict[str, Any], reason: str) -> Optional[Path]:
        """Gather weights and optimizer state to rank 0 and write an atomic step checkpoint
        (collective). ``state``: the recipe's resumable state (data position, RNG,
        scheduler). LoRA: intermediate checkpoints hold the adapter only (the base is the
        frozen input checkpoint, so a 70B run never gathers 140 GB on rank 0 just to resume);
        the final one also holds the merged weights, loadable as a plain HF model.

        Raises:
            FloatingPointError: the weights contain non-finite values (nothing is written).
        """
        from torchtune import training

        start = time.perf_counter()
        adapter_only = self.lora is not None and reason != "final"
        if adapter_only:
            full_sd = self._gather_adapter_state()
        else:
            full_sd = training.gather_cpu_state_dict(
                self._model, self.is_rank_zero, device=self.device
            )
        opt_sd = training.get_full_optimizer_state_dict(
            self._model, self._optimizer, self.is_rank_zero, device=self.device
        )
        finite = True
        if self.is_rank_zero:
            finite = all(
                torch.isfinite(v).all().item() for v in full_sd.values() if v.is_floating_point()
            )
        if any_rank(not finite, self.device):
            raise FloatingPointError(
                f"step {step}: the weights contain non-finite values; refusing to write a checkpoint"
            )
        path = None
        if self.is_rank_zero:
            tmp = ckpt.begin_checkpoint(self.output_dir, step)
            self.hf.write(self._to_write(full_sd, adapter_only), tmp, adapter_only=adapter_only)
            ckpt.save_recipe_state(tmp, {**state, "optimizer": opt_sd})
            path = ckpt.commit_checkpoint(
                tmp,
                step,
                extra={
                    "reason": reason,
                    "model_weights": not adapter_only,
                    "run": self.identity.to_json(),
                },
            )
            ckpt.prune_checkpoints(self.output_dir, self.keep_last_n)
            self.log.info(
                f"Saved checkpoint {path} ({reason}) in {time.perf_counter() - start:.1f}s"
            )
        dist.barrier()
        return path

    def final(self, step: int, state: Callable[[], Dict[str, Any]]) -> Optional[Path]:
        """This run's final weights: its checkpoint at ``step`` if it already holds full
        weights (a periodic save at the last step), else a final save (``state()`` is only
        called then; collective). Rank 0 points ``<output_dir>/final`` at it and returns it."""
        last = ckpt.latest_checkpoint(self.output_dir)
        manifest = ckpt.read_manifest(last) if last is not None else {}
        run = ckpt.RunIdentity.of(manifest)
        has_final = (
            last is not None
            and last.name == ckpt.step_dirname(step)
            and manifest.get("model_weights", True)
            and run is not None
            and run.run_id == self.identity.run_id
        )
        final = last if has_final else self.save(step, state(), reason="final")
        if not self.is_rank_zero:
            return None
        link = ckpt.link_final(self.output_dir, final)
        self.log.info(f"Final checkpoint: {link} -> {final}")
        return final

    def _log(self, msg: str) -> None:
        if self.is_rank_zero:
            self.log.info(msg)


def _check_same_global_batch(state: Dict[str, Any], global_batch: int, accumulation: int) -> None:
    """A checkpoint resumes exactly only with the same global micro-batch and accumulation."""
    gb_then = state["batch_size"] * state["world_size"]
    if gb_then != global_batch or state["gradient_accumulation_steps"] != accumulation:
        raise PrefOptUserError(
            f"resume: the checkpoint was trained with a global micro-batch of {gb_then} and "
            f"gradient_accumulation_steps {state['gradient_accumulation_steps']}; this run has "
            f"{global_batch} and {accumulation}: keep batch_size x world_size and accumulation the same to resume exactly"
        )
