"""Stochastic gradient descent on torch's fused kernel (``torch._fused_sgd_``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import Optimizer, ScalarOrSchedule, check_hparam, check_lr, check_state, hparam, resolve_lr
from ._kernels import (
    check_bool,
    check_mask,
    check_momentum_switch,
    clone_all,
    half_on_cpu,
    initial_lr,
    merge,
    shard_local,
    weight_decay_groups,
)
from ._masks import MaskFn
from ._traced import copy_back, decayed_flags, resolve_lr_tensor, sgd_math

__all__ = ["SgdState", "sgd"]

HPARAMS = ("lr", "momentum", "dampening", "weight_decay")  # the keys of the state's hparams, as init builds them


class SgdState(NamedTuple):
    """State of :func:`sgd`.

    Fields:
        count: 0-d int64 CPU tensor, the number of updates applied.
        momentum_buffer: momentum buffers by parameter name; ``{}`` when built with ``momentum=0``.
        hparams: ``lr``, ``momentum``, ``dampening``, ``weight_decay`` as 0-d float64 CPU tensors.
    """

    count: Tensor
    momentum_buffer: dict[str, Tensor]
    hparams: dict[str, Tensor]


def sgd(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: MaskFn | None = None,
) -> Optimizer:
    """Stochastic gradient descent with optional momentum, matching ``torch.optim.SGD``.

    Each update runs ``torch._fused_sgd_`` once per (device, dtype) group and
    weight-decay group; results equal ``torch.optim.SGD(..., fused=True)`` bitwise.
    As in torch, the first update copies the gradient into the momentum buffer.

    Whether momentum buffers exist is fixed when the optimizer is built
    (``momentum > 0``); ``hparams["momentum"]`` may later be changed to another
    positive value, not switched to or from zero.

    Args:
        learning_rate: a float, or a schedule of the update count.
        momentum: momentum factor (0 disables momentum and its buffers).
        dampening: dampening of the momentum, in [0, 1].
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty coefficient, added to the gradient.
        mask: ``(name, param) -> bool``; parameters where it is false get no weight decay.

    Returns:
        An :class:`Optimizer` whose state is an :class:`SgdState`.

    Raises:
        ValueError: an option is out of range, or ``nesterov=True`` without momentum or
            with dampening.
        TypeError: an option has the wrong type.

    >>> import torch, fnlight as fl
    >>> opt = fl.optim.sgd(0.5, momentum=0.9)
    >>> params = {"w": torch.ones(2)}
    >>> new, state = opt.apply(params, {"w": torch.ones(2)}, opt.init(params), inplace=False)
    >>> new["w"], state.momentum_buffer["w"]
    (tensor([0.5000, 0.5000]), tensor([1., 1.]))
    """
    where = "fnlight.optim.sgd"
    learning_rate = check_lr(learning_rate, where=where)
    momentum = check_hparam("momentum", momentum, where=where)
    dampening = check_hparam("dampening", dampening, where=where, high=1.0, high_inclusive=True)
    nesterov = check_bool("nesterov", nesterov, where=where)
    weight_decay = check_hparam("weight_decay", weight_decay, where=where)
    mask = check_mask(mask, where=where)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(
            f"{where}: nesterov=True requires momentum > 0 and dampening == 0, "
            f"got momentum={momentum!r}, dampening={dampening!r}; set both or use nesterov=False"
        )
    use_momentum = momentum > 0.0

    def init(params: dict[str, Tensor]) -> SgdState:
        buffers = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}
        return SgdState(
            count=torch.zeros((), dtype=torch.int64),
            momentum_buffer=buffers if use_momentum else {},
            hparams={
                "lr": initial_lr(learning_rate),
                "momentum": hparam(momentum),
                "dampening": hparam(dampening),
                "weight_decay": hparam(weight_decay),
            },
        )

    def check(params: dict[str, Tensor], state: Any, grads: dict[str, Tensor] | None = None) -> None:
        check_state(where, params, state, SgdState, {"momentum_buffer": use_momentum}, grads, HPARAMS)
        check_momentum_switch(state, use_momentum, where=where)

    def apply(
        params: dict[str, Tensor], grads: dict[str, Tensor], state: SgdState, *, inplace: bool
    ) -> tuple[dict[str, Tensor], SgdState]:
        if not inplace and not torch.compiler.is_compiling():  # a direct call (the fold's step checks once: Optimizer)
            check(params, state, grads)
        names = list(params)
        ps, gs = list(params.values()), [grads[n] for n in names]
        bufs = [state.momentum_buffer[n] for n in names] if use_momentum else []
        if torch.compiler.is_compiling():  # traced by torch.compile: tensor math, no Python floats (see _traced)
            lr_t, hp = resolve_lr_tensor(learning_rate, state.count, state.hparams)
            decayed = decayed_flags(names, ps, mask)
            new_ps, new_bufs = sgd_math(ps, gs, bufs, decayed, count=state.count, lr=lr_t, hparams=hp, nesterov=nesterov)
            if inplace:
                new_ps, new_bufs = copy_back(ps, new_ps), copy_back(bufs, new_bufs)
            momentum_state = merge(state.momentum_buffer, names, new_bufs) if use_momentum else {}
            return dict(zip(names, new_ps, strict=True)), SgdState(state.count + 1, momentum_state, hp)
        if not inplace:
            ps, bufs = clone_all(ps), clone_all(bufs)
        lr, hp = resolve_lr(learning_rate, state.count, state.hparams)
        opts = dict(
            lr=lr,
            momentum=float(hp["momentum"]),
            dampening=float(hp["dampening"]),
            nesterov=nesterov,
            maximize=False,
            is_first_step=use_momentum and int(state.count) == 0,
        )
        for group_wd, groups in weight_decay_groups(names, ps, mask, float(hp["weight_decay"])):
            for (device, dtype), idx in groups.items():
                if half_on_cpu(device, dtype):
                    _sgd_in_float32(idx, ps, gs, bufs, group_wd, hp, state.count, lr, nesterov)
                    continue
                torch._fused_sgd_(
                    shard_local([ps[i] for i in idx]),
                    shard_local([gs[i] for i in idx]),
                    shard_local([bufs[i] for i in idx]) if use_momentum else [],
                    weight_decay=group_wd,
                    **opts,
                )
        new_bufs = merge(state.momentum_buffer, names, bufs) if use_momentum else {}
        return dict(zip(names, ps, strict=True)), SgdState(state.count + 1, new_bufs, hp)

    return Optimizer(init, apply, check)


def _sgd_in_float32(
    idx: list[int],
    ps: list[Tensor],
    gs: list[Tensor],
    bufs: list[Tensor],
    weight_decay: float,
    hp: dict[str, Tensor],
    count: Tensor,
    lr: float,
    nesterov: bool,
) -> None:
    """SGD on the half-precision CPU tensors ``idx``, in place, computed in float32 (see :func:`half_on_cpu`)."""
    sub = [ps[i] for i in idx]
    hparams = {**hp, "weight_decay": torch.tensor(weight_decay, dtype=torch.float64)}
    new_ps, new_bufs = sgd_math(
        sub,
        [gs[i] for i in idx],
        [bufs[i] for i in idx] if bufs else [],
        [True] * len(idx),
        count=count,
        lr=torch.tensor(lr, dtype=torch.float64),
        hparams=hparams,
        nesterov=nesterov,
    )
    copy_back(sub, new_ps)
    if bufs:
        copy_back([bufs[i] for i in idx], new_bufs)
