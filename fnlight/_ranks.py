"""Cross-rank reductions for metrics (a no-op in one process); kept apart from ``fnlight.distributed`` to import early."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_sum", "collective", "rank", "union_of_keys", "world_size"]


def world_size() -> int:
    """The default process group's size (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_sum(values: Tensor) -> Tensor:
    """``values`` (a 1-D float64 CPU tensor) summed over every rank; returned as is in one process.

    Every rank must call it with the same length, at the same point of the run.
    """
    if world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out


def union_of_keys(keys: list[str]) -> list[str]:
    """The sorted union of ``keys`` over every rank (a rank that saw no batch still takes part)."""
    if world_size() == 1:
        return sorted(keys)
    gathered: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(keys))
    return sorted({k for part in gathered for k in (part or [])})


@contextlib.contextmanager
def collective(where: str) -> Iterator[None]:
    """Name the likely cause when a collective fails: another rank died, raised or stalled past the timeout."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError and the backends' own errors are RuntimeErrors
        e.add_note(
            f"fnlight: {where}: a collective failed on rank {rank()} of {world_size()}. Another rank has most likely "
            "died or raised (see its log above), or stalled past the timeout of init_distributed(timeout=...). "
            "Restarting the job (e.g. torchrun --max-restarts) resumes from the last checkpoint under with_checkpointing."
        )
        raise
