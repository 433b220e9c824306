"""Process groups: initialise from torchrun or SLURM variables; a no-op for one process."""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import sys
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "dist_info", "init_distributed"]


class DistInfo(NamedTuple):
    """Where this process stands: its rank, the world size and its rank on the node."""

    rank: int
    world_size: int
    local_rank: int


def dist_info() -> DistInfo:
    """The current process group's rank and size (``(0, 1, 0)`` when not distributed).

    >>> import fnlight as fl
    >>> fl.dist_info()  # one process, no process group
    DistInfo(rank=0, world_size=1, local_rank=0)
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank())
    return DistInfo(0, 1, 0)


def _local_rank() -> int:
    """This process's rank on its node: torchrun's ``LOCAL_RANK``, else SLURM's ``SLURM_LOCALID``, else 0."""
    env = os.environ
    return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))


def _from_environment() -> tuple[int, int, int] | None:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


_MAX_TIMEOUT = 1e9


def init_distributed(*, backend: str | None = None, timeout: float = 300.0) -> DistInfo:
    """Initialise the default process group from torchrun or SLURM variables; a no-op for one process.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; under
    SLURM (``srun``) ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` are used and ``MASTER_ADDR``/
    ``MASTER_PORT`` must be exported by the job script. The backend is NCCL when CUDA is available,
    else gloo; under NCCL, gloo carries the collectives on CPU tensors (metrics' sums, checkpoint
    agreement), which NCCL cannot. ``timeout`` (seconds) bounds every collective: a rank that
    died makes the others fail with an error after it instead of hanging.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (choose as above).
        timeout: seconds before a collective that cannot complete raises (finite, at most 1e9).

    Returns:
        This process's :class:`DistInfo` (``(0, 1, 0)`` when no launcher variables are set).

    Raises:
        ValueError: a timeout not in (0, 1e9], an unknown backend, or ``"nccl"`` for a rank without its CUDA
            device (none visible, or fewer than the ranks on the node).

    >>> init_distributed()  # a single process: nothing to do
    DistInfo(rank=0, world_size=1, local_rank=0)
    """
    # at most 1e9 s (about 31 years): torch keeps timeouts as integers (an infinity or 1e20 raised OverflowError
    # from datetime/torch only once launched; 8e13 made the store's connection time out at once)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= _MAX_TIMEOUT:
        raise ValueError(
            "init_distributed: timeout must be a positive number of seconds, at most 1e9 (about 31 years; torch "
            f"needs a finite bound), got {timeout!r}"
        )
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"init_distributed: backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if dist.is_initialized():
        return dist_info()
    found = _from_environment()
    if found is None or found[1] == 1:
        return DistInfo(0, 1, 0)
    rank, world_size, local_rank = found
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= devices:  # (torch.cuda.set_device failed with an AttributeError without CUDA)
            raise ValueError(
                f"init_distributed: backend 'nccl' needs a CUDA device for each rank of a node, got local rank "
                f"{local_rank} with {devices} CUDA device{'s' if devices != 1 else ''} "
                f"{'visible' if devices else '(torch.cuda.is_available() is False)'}; use backend='gloo' (or None, "
                "which picks gloo without CUDA), or start at most as many ranks per node as there are devices"
            )
        torch.cuda.set_device(local_rank)
    delta = datetime.timedelta(seconds=timeout)
    devices = "cpu:gloo,cuda:nccl" if backend == "nccl" else backend  # NCCL takes CUDA tensors only
    dist.init_process_group(devices, rank=rank, world_size=world_size, timeout=delta, store=_attempt_store(world_size, delta))
    atexit.register(_destroy)  # tear the group down before interpreter exit (gloo aborts otherwise)
    _watch_uncaught()
    return DistInfo(rank, world_size, local_rank)


_failing = False  # an uncaught exception is ending this process


def _watch_uncaught() -> None:
    """Note an uncaught exception (Python calls ``sys.excepthook`` before the ``atexit`` hooks)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        global _failing
        _failing = True
        previous(kind, value, tb)

    sys.excepthook = hook


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart attempt; else ``None`` (torch's env:// store).

    torchrun keeps its store across restarts, and the process group's keys (each rank's
    address) carry no attempt number: a restarted rank can read the address of a rank of the
    failed attempt and fail to connect. The prefix keeps each attempt's keys apart.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/fnlight/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def _destroy() -> None:
    if not dist.is_initialized():
        return
    if not _failing:  # a failing rank leaves at once: closing its connections fails its peers now, not at the timeout
        try:  # leave together: a rank tearing gloo down while its peer still uses it can abort the process
            dist.barrier()
        except RuntimeError:  # a peer already failed or left: nothing to wait for
            pass
    dist.destroy_process_group()
    # Free the groups now, while the interpreter runs: a group still referenced (fnlight's device
    # meshes for with_fsdp, DTensors in a cycle) was otherwise destroyed among C++'s static
    # objects after Python had finished, and gloo then aborted with 'terminate called without an
    # active exception' (examples/ddp.py --fsdp resuming, 2 ranks, CPU under load: 5 of 24 runs
    # before, 0 of 32 after).
    fsdp = sys.modules.get("fnlight.distributed._fsdp")
    if fsdp is not None:
        fsdp.release_meshes()
    gc.collect()
