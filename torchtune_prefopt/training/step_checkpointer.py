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

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from torchtune_prefopt.errors import AlreadyFinished, PrefOptUserError, WriteFailed
from torchtune_prefopt.models.hf_checkpoint import HFCheckpoint, hf_weight_files
from torchtune_prefopt.training import checkpoints as ckpt
from torchtune_prefopt.training.distributed import any_rank, rank_zero_check

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
        content: Optional[Callable[[], Dict[str, str]]] = None,
    ) -> Optional[ResumePoint]:
        """Decide between a fresh and a resumed run (before any weights load); every rank
        ends up with the same run id and identity. ``effective``: identity values the run uses
        instead of the config's (see
        :func:`~torchtune_prefopt.training.recipe_config.identity_digests`); ``content``: the
        content digests (:func:`~torchtune_prefopt.training.checkpoints.content_digests`),
        computed on rank 0 only."""
        digests = [content() if content is not None and self.is_rank_zero else None]
        if self.world_size > 1:
            dist.broadcast_object_list(digests, src=0)
        effective = {**(effective or {}), **(digests[0] or {})}
        self.identity = ckpt.RunIdentity.new(cfg, effective)
        if not resume:
            done = None if overwrite else ckpt.finished_run(self.output_dir, self.identity)
            if done is not None:
                raise AlreadyFinished(
                    f"output_dir {self.output_dir} already holds this run, finished "
                    f"({self.output_dir / 'final'} -> {done}): nothing to do; train again with "
                    "overwrite_output_dir=true or output_dir=<another directory>"
                )
            self._replace_previous = ckpt.check_fresh_output_dir(
                self.output_dir, overwrite, self.identity
            )
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
        """The model and optimizer whose state :meth:`save` writes; then checks, before
        training starts, that ``<output_dir>/checkpoints`` is writable and its filesystem has
        room for one checkpoint (one line, exit 2, otherwise)."""
        from torchtune.modules.peft import get_adapter_params

        self._model, self._optimizer = model, optimizer
        self._adapter_keys = set(get_adapter_params(model)) if self.lora is not None else set()
        rank_zero_check(self._check_room, self.rank, self.world_size)

    def checkpoint_bytes(self) -> int:
        """About how many bytes one checkpoint takes: the weights (LoRA: merged weights and
        the adapter, as the final one holds), the optimizer's per-parameter state, and the
        base folder's other files (config, tokenizer)."""
        weights = sum(t.numel() * t.element_size() for t in self._model.state_dict().values())
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        defaults = getattr(self._optimizer, "defaults", {})
        states = 2 if "betas" in defaults else int(bool(defaults.get("momentum")))
        optimizer = states * sum(p.numel() * p.element_size() for p in trainable)
        weight_names = set(hf_weight_files(self.hf.checkpoint_dir))
        other = sum(
            f.stat().st_size
            for f in self.hf.checkpoint_dir.iterdir()
            if f.is_file() and f.name not in weight_names
        )
        return weights + optimizer + other

    def _check_room(self) -> None:
        root = ckpt.checkpoints_root(self.output_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=root, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise PrefOptUserError(
                f"output_dir: {root} is not writable ({err.strerror}): checkpoints could not be saved"
            ) from None
        need, free = self.checkpoint_bytes(), shutil.disk_usage(root).free
        if free < need:
            raise PrefOptUserError(
                f"output_dir: {root} has {_mib(free)} free, one checkpoint needs about "
                f"{_mib(need)} (weights, optimizer state, config files): free space there or "
                "use output_dir=<a folder on another filesystem>"
            )

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
        # the final checkpoint is what a user ships: weights, config and tokenizer files, and
        # the data position; no optimizer state (a finished run has no step left to take)
        opt_sd = None
        if reason != "final":
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
        path, error = None, [None]
        if self.is_rank_zero:
            try:
                path = self._write(step, full_sd, opt_sd, state, reason, adapter_only)
                self.log.info(
                    f"Saved checkpoint {path} ({reason}) in {time.perf_counter() - start:.1f}s"
                )
            except OSError as err:
                error = [self._write_failed(step, err)]
        if self.world_size > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise WriteFailed(error[0])
        dist.barrier()
        return path

    def _write(self, step, full_sd, opt_sd, state, reason, adapter_only) -> Path:
        """Rank 0: the checkpoint into ``.tmp-step_N``, then renamed into place; then prune."""
        tmp = ckpt.begin_checkpoint(self.output_dir, step)
        self.hf.write(self._to_write(full_sd, adapter_only), tmp, adapter_only=adapter_only)
        ckpt.save_recipe_state(tmp, {**state, **({} if opt_sd is None else {"optimizer": opt_sd})})
        extra = {
            "reason": reason,
            "model_weights": not adapter_only,
            "run": self.identity.to_json(),
        }
        path = ckpt.commit_checkpoint(tmp, step, extra=extra)
        ckpt.prune_checkpoints(self.output_dir, self.keep_last_n)
        return path

    def _write_failed(self, step: int, err: OSError) -> str:
        """Remove the half-written folder; the line says what failed and what is intact."""
        root = ckpt.checkpoints_root(self.output_dir)
        shutil.rmtree(root / f".tmp-{ckpt.step_dirname(step)}", ignore_errors=True)
        try:
            free = _mib(shutil.disk_usage(root).free)
            room = f"{free} free, one checkpoint needs about {_mib(self.checkpoint_bytes())}"
        except OSError:
            room = "free space unknown"
        last = ckpt.latest_checkpoint(self.output_dir)
        kept = (
            f"the previous checkpoint {last} is intact: resume from it with resume_from_checkpoint=True"
            if last is not None
            else "no earlier checkpoint of this run exists"
        )
        where = err.filename or root
        return (
            f"writing the step {step} checkpoint failed: {where}: {err.strerror} ({room}); {kept}"
        )

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
        try:
            link = ckpt.link_final(self.output_dir, final)
        except OSError as err:
            raise WriteFailed(
                f"linking {self.output_dir / 'final'} failed: {err.strerror}; the final checkpoint {final} is complete"
            ) from None
        self.log.info(f"Final checkpoint: {link} -> {final}")
        return final

    def _log(self, msg: str) -> None:
        if self.is_rank_zero:
            self.log.info(msg)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_same_global_batch(state: Dict[str, Any], global_batch: int, accumulation: int) -> None:
    """A checkpoint resumes exactly only with the same global micro-batch and accumulation."""
    gb_then = state["batch_size"] * state["world_size"]
    if gb_then != global_batch or state["gradient_accumulation_steps"] != accumulation:
        raise PrefOptUserError(
            f"resume: the checkpoint was trained with a global micro-batch of {gb_then} and "
            f"gradient_accumulation_steps {state['gradient_accumulation_steps']}; this run has "
            f"{global_batch} and {accumulation}: keep batch_size x world_size and accumulation the same to resume exactly"
        )
