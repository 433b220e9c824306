"""Fully sharded data parallelism on DTensor: parameters, gradients and optimizer state split across ranks.

Not FSDP2's ``fully_shard``: it hooks ``nn.Module`` parameters, and a pure step binds the
state's tensors into a skeleton per call, so ``fully_shard`` would see none of them (its
gradients come back zero, silently). Here the state itself holds ``DTensor`` shards
(``Shard(0)``: rows split as ``torch.chunk`` splits them); the gradient phase gathers each
parameter with ``full_tensor(grad_placements=[Partial()])``, so backward reduce-scatters the
gradient straight back into a shard. Without ``grad_placements`` the gradient would not be
reduced across ranks at all (again silently): tests/test_fsdp.py checks both traps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._ranks import collective
from .._signals import agree, signal_flag
from .._state import TrainState
from .._step import NO_CONTEXT, GradContext, Gradients
from ..transforms._base import Metrics, Transform, layers
from ._ddp import broadcast_tensors, reached_flags, sync_buffers
from ._group import dist_info

__all__ = ["local_bytes", "with_fsdp"]

_MESHES: dict[tuple[str, int], Any] = {}


def _mesh(device_type: str, world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    key = (device_type, world_size)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, (world_size,))
    return _MESHES[key]


def release_meshes() -> None:
    """Drop the cached device meshes (when the process group is torn down: they reference it)."""
    _MESHES.clear()


def _shard(t: Tensor, mesh: Any) -> Tensor:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    # Rank 0's values are scattered: every rank starts from the same parameters whatever its seed. A 0-d
    # tensor is replicated, and distribute_tensor would broadcast into it in place and keep its storage:
    # it is the model's own tensor (init borrows them), so it gets a copy first.
    if not t.ndim:
        return distribute_tensor(t.detach().clone(), mesh, [Replicate()], src_data_rank=0)
    return distribute_tensor(t.detach(), mesh, [Shard(0)], src_data_rank=0)


def _gather(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    from torch.distributed.tensor import DTensor, Partial

    out = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            # Partial: backward sums the per-rank gradients while sharding them (reduce-scatter).
            t = t.full_tensor(grad_placements=[Partial()]) if t.requires_grad else t.full_tensor()
        out[name] = t
    return out


def local_bytes(tree: Any) -> int:
    """Bytes of tensor data this process holds for ``tree`` (a DTensor counts its local shard).

    >>> import torch
    >>> local_bytes({"w": torch.zeros(4, 2), "step": torch.zeros((), dtype=torch.int64)})
    40
    """
    import optree

    total = 0
    for leaf in optree.tree_leaves(tree, namespace="fnlight"):
        if isinstance(leaf, Tensor):
            local = leaf.to_local() if hasattr(leaf, "to_local") else leaf
            total += local.numel() * local.element_size()
    return total


class FSDP(Transform):
    """See :func:`with_fsdp`."""

    name = "with_fsdp"

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        if any(getattr(layer, "name", None) == "with_ddp" for layer in layers(inner)):
            raise ValueError("with_fsdp: the step is already wrapped by with_ddp; use one of with_ddp or with_fsdp, not both")

    def init(self, **options: Any) -> TrainState:
        """The inner initial state with parameters and optimizer state sharded (buffers broadcast)."""
        state = self.inner.init(**options)
        info = dist_info()
        if info.world_size == 1:
            return state
        device = next(iter(state.params.values())).device.type if state.params else "cpu"
        mesh = _mesh(device, info.world_size)
        with collective("with_fsdp init (scatter of rank 0's parameters)"):
            params = {n: _shard(p, mesh) for n, p in state.params.items()}
            buffers = dict(zip(state.buffers, broadcast_tensors(list(state.buffers.values()))))
        return state.replace(params=params, buffers=buffers, opt_state=self.core.init_opt_state(params))

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        info = dist_info()
        if info.world_size == 1:
            return self.inner.grads(state, batch, ctx)
        # The gathered gradients are summed over ranks: weight each rank's loss by 1/world_size for the mean.
        ctx = ctx._replace(gather=_gather, loss_weight=ctx.loss_weight / info.world_size, rank=info.rank)
        with collective(f"with_fsdp at update {int(state.step)}"):
            return self.inner.grads(state, batch, ctx)

    def update(self, state: TrainState, g: Gradients) -> tuple[TrainState, Metrics]:
        """Average the loss over the ranks (the gradients already are), then update the shards.

        With the loss travels a flag per trainable parameter of whether this rank's loss
        reached it. Gradients are reduce-scattered during backward in the order each rank's
        graph gives, so a parameter that some ranks reach and others do not pairs the ranks'
        collectives wrongly — silently when the shapes happen to match. Such an update raises
        (on every rank) instead of applying wrong gradients. Whether any rank has received
        SIGTERM or SIGINT travels too, so a fold stops every rank after the same update.
        """
        info = dist_info()
        if info.world_size > 1:
            names = self.core._trainable
            device = g.loss.device
            packed = torch.cat([g.loss.detach().float().reshape(1), reached_flags(names, g.grads, device), signal_flag(device)])
            with collective(f"with_fsdp at update {int(state.step)}"):
                dist.all_reduce(packed)
            agree(packed[-1])
            reached = packed[1:-1]
            if bool(((reached > 0) & (reached < info.world_size)).any()):
                raise _uneven_reach(state, names, reached.tolist(), info.world_size)
            g = g._replace(loss=packed[0].div(info.world_size).to(g.loss.dtype))
            new_state, metrics = self.inner.update(state, g)
            new_state = sync_buffers(new_state, f"with_fsdp at update {int(state.step)} (rank 0's buffers)")
            return new_state, {**metrics, "loss": g.loss}  # the mean over the ranks, not this rank's own
        return self.inner.update(state, g)


def _uneven_reach(state: TrainState, names: tuple[str, ...], reached: list[float], world_size: int) -> RuntimeError:
    uneven = [f"{n} ({int(r)} of {world_size} ranks)" for n, r in zip(names, reached) if 0 < r < world_size]
    return RuntimeError(
        f"with_fsdp at update {int(state.step)}: the loss reached these parameters on some ranks only: "
        f"{', '.join(uneven)}. Under with_fsdp each gradient is reduce-scattered during backward, in the order of "
        "each rank's graph, so the ranks' collectives no longer match and this update's gradients are wrong. "
        "Make every rank's loss reach every parameter, or use with_ddp, which averages such parameters "
        "with zeros from the ranks that did not reach them."
    )


def with_fsdp(step: Any) -> FSDP:
    """Fully sharded data parallelism: parameters, gradients and optimizer state split over the ranks.

    ``init`` scatters rank 0's parameters as ``DTensor`` shards (rows split over the ranks as
    ``torch.chunk`` splits them; 0-d parameters are replicated), so the optimizer state built
    from them is sharded too: per rank, parameters + optimizer state take about
    ``1/world_size`` of the memory :func:`with_ddp` needs. Buffers (BatchNorm statistics) are
    broadcast from rank 0 and kept whole on every rank.

    In the gradient phase each parameter is gathered whole for the forward pass and its
    gradient reduce-scattered back into a shard during backward (``full_tensor`` with
    ``grad_placements=[Partial()]``); each rank's loss is weighted by ``1/world_size`` so the
    shards hold the mean gradient, as with :func:`with_ddp`. The optimizer (fused kernels,
    clipping with the global norm) runs on the shards. The loss metric is averaged over the
    ranks. Under :func:`with_grad_accum` gradients are reduce-scattered per micro-batch into
    the sharded accumulation buffers. The full parameters exist while a step runs (as FSDP
    without resharding after forward); what stays sharded between steps is everything held in
    the state. Evaluation, :func:`fnlight.to_module` and export gather the parameters; use
    :func:`fnlight.distributed.save_sharded` / :func:`~fnlight.distributed.restore_sharded`
    (what :func:`fnlight.with_checkpointing` does for sharded states) for checkpoints.

    Every rank's loss must reach the same parameters, as torch's FSDP requires: a parameter
    some ranks reach and others skip misaligns the ranks' reduce-scatters, and the update
    raises ``RuntimeError`` naming it (a parameter no rank reaches is simply not updated;
    under :func:`with_grad_accum` the check sees the window's union of micro-batches).
    :func:`with_ddp` handles models whose ranks use different parts. In a single process it
    does nothing.

    Args:
        step: the step to wrap (after with_amp, before with_grad_accum; docs/transforms.md).

    Returns:
        The wrapped step.

    Raises:
        ValueError: the step is already wrapped by :func:`with_ddp`, or a wrong composition order.
        RuntimeError: at an update, when the loss reached some parameter on some ranks only.

    >>> import torch, fnlight as fl
    >>> step = fl.with_fsdp(fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.adamw(0.1)))
    >>> int(step(step.init(), (torch.ones(4, 2), torch.zeros(4, 1)))[0].step)  # one process: a plain step
    1
    """
    return FSDP(step)
