"""Data parallelism: identical initial state on every rank, gradients averaged once per optimizer update."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .._donation import is_donating
from .._ranks import collective
from .._signals import agree, signal_flag
from .._state import TrainState
from .._step import NO_CONTEXT, GradContext, Gradients
from ..transforms._base import Metrics, Transform, layers
from ._group import dist_info

__all__ = ["broadcast_tensors", "reached_flags", "sync_buffers", "with_ddp"]


def _buckets(tensors: list[Tensor], limit: int) -> list[list[int]]:
    """Indices grouped into buckets of at most ``limit`` bytes, one (device, dtype) per bucket."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size, key = 0, None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if current and (size + nbytes > limit or (t.device, t.dtype) != key):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
        key = (t.device, t.dtype)
    if current:
        buckets.append(current)
    return buckets


def _all_reduce_mean(tensors: list[Tensor], limit: int, world_size: int) -> list[Tensor]:
    out: list[Tensor] = list(tensors)
    for bucket in _buckets(tensors, limit):
        flat = _flatten_dense_tensors([tensors[i] for i in bucket])
        dist.all_reduce(flat)
        flat.div_(world_size)
        for i, t in zip(bucket, _unflatten_dense_tensors(flat, [tensors[i] for i in bucket])):
            out[i] = t
    return out


def reached_flags(names: tuple[str, ...], grads: dict[str, Tensor], device: torch.device) -> Tensor:
    """1.0 for each of ``names`` that has a gradient in ``grads``, else 0.0 (float32, to reduce with the loss)."""
    if len(grads) == len(names):
        return torch.ones(len(names), device=device)
    return torch.tensor([float(n in grads) for n in names], device=device)


def broadcast_tensors(tensors: list[Tensor], limit: int = 25 * 2**20) -> list[Tensor]:
    """Copies of rank 0's ``tensors`` on every rank, broadcast in flat buckets of at most ``limit`` bytes."""
    synced = [t.detach().clone() for t in tensors]
    for bucket in _buckets(synced, limit):
        flat = _flatten_dense_tensors([synced[i] for i in bucket])
        dist.broadcast(flat, src=0)
        for i, t in zip(bucket, _unflatten_dense_tensors(flat, [synced[i] for i in bucket])):
            synced[i] = t
    return synced


def sync_buffers(state: TrainState, where: str, limit: int = 25 * 2**20) -> TrainState:
    """Rank 0's buffers on every rank, after an update (as ``DistributedDataParallel``'s
    ``broadcast_buffers``): BatchNorm statistics would otherwise drift apart, each rank's moved
    by its own batches, and a checkpoint (rank 0's) or an evaluation would depend on the rank.
    """
    if not state.buffers:
        return state
    with collective(where):
        synced = broadcast_tensors(list(state.buffers.values()), limit)
    if is_donating():  # the fold owns these tensors: keep them, with rank 0's values
        for own, value in zip(state.buffers.values(), synced):
            own.copy_(value)
        return state
    return state.replace(buffers=dict(zip(state.buffers, synced)))


class DDP(Transform):
    """See :func:`with_ddp`."""

    name = "with_ddp"

    def __init__(self, inner: Any, *, bucket_bytes: int) -> None:
        if any(getattr(layer, "name", None) == "with_fsdp" for layer in layers(inner)):
            raise ValueError("with_ddp: the step is already wrapped by with_fsdp; use one of with_ddp or with_fsdp, not both")
        super().__init__(inner)
        self.bucket_bytes = bucket_bytes

    def init(self, **options: Any) -> TrainState:
        """The inner initial state, with parameters and buffers broadcast from rank 0 (identical everywhere)."""
        state = self.inner.init(**options)
        info = dist_info()
        if info.world_size == 1:
            return state
        with collective("with_ddp init (broadcast of rank 0's parameters)"):
            synced = broadcast_tensors([*state.params.values(), *state.buffers.values()], self.bucket_bytes)
        n = len(state.params)
        params = dict(zip(state.params, synced[:n]))
        return state.replace(
            params=params, buffers=dict(zip(state.buffers, synced[n:])), opt_state=self.core.init_opt_state(params)
        )

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        rank = dist_info().rank
        return self.inner.grads(state, batch, ctx._replace(rank=rank) if rank else ctx)

    def update(self, state: TrainState, g: Gradients) -> tuple[TrainState, Metrics]:
        """Average the gradients (and the loss) over the ranks, then update: once per optimizer update.

        Every rank reduces every trainable parameter, in one order, so a parameter that this
        rank's batches did not reach (a head or an expert used on some ranks only) takes part
        with zeros, as in ``DistributedDataParallel(find_unused_parameters=True)``; one that no
        rank reached is left out of the update (as ``torch.optim`` skips a ``None`` gradient).
        A per-parameter flag of who had a gradient travels in the last bucket; only a rank
        that lacked some gradient reads it. So does whether any rank has received SIGTERM or
        SIGINT, on which a fold stops every rank after the same update.
        """
        info = dist_info()
        if info.world_size > 1:
            names = self.core._trainable
            grads = [g.grads[n] if n in g.grads else torch.zeros_like(state.params[n]) for n in names]
            flags = reached_flags(names, g.grads, g.loss.device)
            with collective(f"with_ddp at update {int(state.step)}"):
                reduced = _all_reduce_mean(
                    [*grads, g.loss.detach().float().reshape(1), flags, signal_flag(g.loss.device)],
                    self.bucket_bytes,
                    info.world_size,
                )
            agree(reduced[-1])
            if len(g.grads) == len(names):
                averaged = dict(zip(names, reduced[:-3]))
            else:  # parameters no rank reached get no update
                averaged = {n: t for n, t, had in zip(names, reduced[:-3], reduced[-2].tolist()) if had > 0}
            g = g._replace(grads=averaged, loss=reduced[-3].reshape(()).to(g.loss.dtype))
            new_state, metrics = self.inner.update(state, g)
            new_state = sync_buffers(new_state, f"with_ddp at update {int(state.step)} (rank 0's buffers)", self.bucket_bytes)
            return new_state, {**metrics, "loss": g.loss}  # the mean over the ranks, not this rank's own
        return self.inner.update(state, g)


def with_ddp(step: Any, *, bucket_mb: float = 25.0) -> DDP:
    """Data parallelism: every rank trains on its shard; gradients are averaged before each update.

    ``init`` broadcasts rank 0's parameters and buffers, so every rank starts identical
    whatever its seed. In the update phase the gradients (and the loss, so the metric and
    the finiteness check agree on every rank) are flattened into buckets of ``bucket_mb``
    and averaged with one ``all_reduce`` per bucket. Because :func:`with_grad_accum` wraps
    this transform and calls the update once per window, gradients are synchronised only
    at accumulation boundaries (DDP's ``no_sync`` for free). Dropout draws differ by rank
    (the rank is part of the seed). A parameter that some ranks' batches leave without a
    gradient is averaged with zeros from those ranks (``find_unused_parameters=True``); one
    that no rank reached is not updated. In a single process it does nothing.

    Args:
        step: the step to wrap (after with_amp, before with_grad_accum; docs/transforms.md).
        bucket_mb: the size of the all-reduce buckets.

    Returns:
        The wrapped step.

    Raises:
        ValueError: ``bucket_mb`` not positive, or a wrong composition order.

    >>> import torch, fnlight as fl
    >>> step = fl.with_ddp(fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)))
    >>> int(step(step.init(), (torch.ones(4, 2), torch.zeros(4, 1)))[0].step)  # one process: a plain step
    1
    """
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not 0 < bucket_mb < math.inf:
        raise ValueError(f"with_ddp: bucket_mb must be a positive finite number, got {bucket_mb!r}")
    return DDP(step, bucket_bytes=int(bucket_mb * 2**20))
