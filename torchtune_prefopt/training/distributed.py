"""One process or many: the same FSDP2 code path.

torchtune's own DPO recipe refuses to run without torchrun and hard-codes an NCCL backend
string. Here a plain ``python``/``tune run`` invocation starts a one-rank process group
(FSDP2 with a single rank is a no-op shard), and torchrun-launched processes (one node or
multi-node rendezvous) join the group torchrun describes through its environment variables.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any, Callable, List, NoReturn, Optional

import torch
import torch.distributed as dist

from torchtune_prefopt.errors import PrefOptUserError

#: Variables torchrun/torchelastic set for its workers: a process that launches its own jobs
#: (prefopt_compare, the tests) must not pass them on.
LAUNCHER_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
)  # fmt: skip


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set the standard env variables."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def backend_for(device: torch.device) -> str:
    """``cuda:nccl,cpu:gloo`` on GPUs (CPU collectives still work), ``gloo`` on CPU."""
    if device.type == "cuda":
        return "cuda:nccl,cpu:gloo"
    return "gloo"


def init_distributed(device: torch.device, timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise the default process group; returns ``(world_size, rank)``.

    Without a launcher a single-rank group is created on an in-memory store, so nothing
    listens on a port.
    """
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    timeout = timedelta(minutes=timeout_minutes)
    if launched_by_torchrun():
        dist.init_process_group(backend=backend_for(device), timeout=timeout)
    else:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(
            backend=backend_for(device),
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    return dist.get_world_size(), dist.get_rank()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op when not distributed); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rank_zero_check(check: Optional[Callable[[], None]], rank: int, world_size: int) -> None:
    """Run ``check`` on rank 0 (other ranks pass ``None`` or anything); if it raises a
    :class:`~torchtune_prefopt.errors.PrefOptUserError`, every rank raises the same one-line
    error, together (collective when ``world_size > 1``)."""
    error: List[Optional[str]] = [None]
    if rank == 0 and check is not None:
        try:
            check()
        except PrefOptUserError as err:
            error = [str(err)]
    if world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise PrefOptUserError(error[0])


def exit_after(main: Callable[[], Any]) -> NoReturn:
    """Run a recipe's ``main`` and exit with its status (``sys.exit`` semantics).

    A rank launched by torchrun with others that finished its run (status 0, the process
    group destroyed by the recipe's ``cleanup``: a barrier, then ``destroy_process_group``)
    leaves with ``os._exit(0)`` after flushing stdout, stderr and the logging handlers. The
    interpreter's own teardown is where such a rank could still abort ("terminate called
    without an active exception", exit -6, about once in 25 two-process CPU runs on a loaded
    machine, after the final checkpoint and the summary): objects of gloo's C++ threads that
    hold tensors are destroyed while the interpreter finalizes (PyTorch's c10d discussion,
    pytorch#179291). By then every file of the run is written and closed, so nothing is lost
    by skipping that teardown. Every other exit (one process, an error status) is the usual
    one: torchrun stops the other ranks when one fails, and a rank that failed faster than
    usual would cut off the one that prints the error line.
    """
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    several_ranks = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several_ranks and code in (None, 0) and not dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)
