"""RMSprop on torch's multi-tensor kernels (``torch._foreach_*``), as ``torch.optim.RMSprop(foreach=True)``."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import Optimizer, ScalarOrSchedule, check_hparam, check_lr, check_state, hparam, resolve_lr
from ._kernels import check_bool, check_mask, check_momentum_switch, clone_all, initial_lr, merge, weight_decay_groups
from ._masks import MaskFn
from ._traced import copy_back, decayed_flags, resolve_lr_tensor, rmsprop_math

__all__ = ["RmspropState", "rmsprop"]

HPARAMS = ("lr", "alpha", "eps", "weight_decay", "momentum")  # the keys of the state's hparams, as init builds them


class RmspropState(NamedTuple):
    """State of :func:`rmsprop`.

    Fields:
        count: 0-d int64 CPU tensor, the number of updates applied.
        square_avg: running averages of the squared gradient by parameter name.
        grad_avg: running averages of the gradient (``centered=True``), else ``{}``.
        momentum_buffer: momentum buffers (built with ``momentum > 0``), else ``{}``.
        hparams: ``lr``, ``alpha``, ``eps``, ``weight_decay``, ``momentum`` as 0-d float64 CPU tensors.
    """

    count: Tensor
    square_avg: dict[str, Tensor]
    grad_avg: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]
    hparams: dict[str, Tensor]


def _update(
    ps: list[Tensor],
    gs: list[Tensor],
    sq: list[Tensor],
    ga: list[Tensor],
    mb: list[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
) -> None:
    """One (device, dtype) group, in place on ``ps``/``sq``/``ga``/``mb``; the math of torch's foreach RMSprop."""
    if weight_decay != 0:
        gs = torch._foreach_add(gs, ps, alpha=weight_decay)
    torch._foreach_mul_(sq, alpha)
    torch._foreach_addcmul_(sq, gs, gs, value=1 - alpha)
    if ga:
        torch._foreach_lerp_(ga, gs, 1 - alpha)
        avg = torch._foreach_addcmul(sq, ga, ga, value=-1)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(sq)
    torch._foreach_add_(avg, eps)
    if mb:
        torch._foreach_mul_(mb, momentum)
        torch._foreach_addcdiv_(mb, gs, avg)
        torch._foreach_add_(ps, mb, alpha=-lr)
    else:
        torch._foreach_addcdiv_(ps, gs, avg, value=-lr)


def rmsprop(
    learning_rate: ScalarOrSchedule,
    *,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    mask: MaskFn | None = None,
) -> Optimizer:
    """RMSprop, matching ``torch.optim.RMSprop``.

    Each update runs the ``torch._foreach_*`` sequence of torch's multi-tensor
    RMSprop once per (device, dtype) group and weight-decay group; results equal
    ``torch.optim.RMSprop(..., foreach=True)`` bitwise (torch has no fused RMSprop).

    Whether the gradient average and momentum buffers exist is fixed when the
    optimizer is built (``centered``, ``momentum > 0``); ``hparams["momentum"]`` may
    later be changed to another positive value, not switched to or from zero.

    Args:
        learning_rate: a float, or a schedule of the update count.
        alpha: smoothing constant of the squared-gradient average, in [0, 1].
        eps: added to the denominator.
        weight_decay: L2 penalty coefficient, added to the gradient.
        momentum: momentum factor (0 disables momentum and its buffers).
        centered: normalise by the estimated variance of the gradient.
        mask: ``(name, param) -> bool``; parameters where it is false get no weight decay.

    Returns:
        An :class:`Optimizer` whose state is an :class:`RmspropState`.

    Raises:
        ValueError: an option is out of range.
        TypeError: an option has the wrong type.

    >>> import torch, fnlight as fl
    >>> opt = fl.optim.rmsprop(0.01, centered=True)
    >>> params = {"w": torch.ones(2)}
    >>> new, state = opt.apply(params, {"w": torch.ones(2)}, opt.init(params), inplace=False)
    >>> int(state.count), sorted(state.grad_avg), params["w"]
    (1, ['w'], tensor([1., 1.]))
    """
    where = "fnlight.optim.rmsprop"
    learning_rate = check_lr(learning_rate, where=where)
    alpha = check_hparam("alpha", alpha, where=where, high=1.0, high_inclusive=True)
    eps = check_hparam("eps", eps, where=where)
    weight_decay = check_hparam("weight_decay", weight_decay, where=where)
    momentum = check_hparam("momentum", momentum, where=where)
    centered = check_bool("centered", centered, where=where)
    mask = check_mask(mask, where=where)
    use_momentum = momentum > 0.0

    def init(params: dict[str, Tensor]) -> RmspropState:
        def zeros() -> dict[str, Tensor]:
            return {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}

        return RmspropState(
            count=torch.zeros((), dtype=torch.int64),
            square_avg=zeros(),
            grad_avg=zeros() if centered else {},
            momentum_buffer=zeros() if use_momentum else {},
            hparams={
                "lr": initial_lr(learning_rate),
                "alpha": hparam(alpha),
                "eps": hparam(eps),
                "weight_decay": hparam(weight_decay),
                "momentum": hparam(momentum),
            },
        )

    def finish(
        state: RmspropState, names: list[str], ps: list[Tensor], sq: list[Tensor], ga: list[Tensor], mb: list[Tensor], hp: dict
    ) -> tuple[dict[str, Tensor], RmspropState]:
        new_state = RmspropState(
            state.count + 1,
            merge(state.square_avg, names, sq),
            merge(state.grad_avg, names, ga) if centered else {},
            merge(state.momentum_buffer, names, mb) if use_momentum else {},
            hp,
        )
        return dict(zip(names, ps, strict=True)), new_state

    def check(params: dict[str, Tensor], state: Any, grads: dict[str, Tensor] | None = None) -> None:
        fields = {"square_avg": True, "grad_avg": centered, "momentum_buffer": use_momentum}
        check_state(where, params, state, RmspropState, fields, grads, HPARAMS)
        check_momentum_switch(state, use_momentum, where=where)

    def apply(
        params: dict[str, Tensor], grads: dict[str, Tensor], state: RmspropState, *, inplace: bool
    ) -> tuple[dict[str, Tensor], RmspropState]:
        if not inplace and not torch.compiler.is_compiling():  # a direct call (the fold's step checks once: Optimizer)
            check(params, state, grads)
        names = list(params)
        ps, gs = list(params.values()), [grads[n] for n in names]
        sq = [state.square_avg[n] for n in names]
        ga = [state.grad_avg[n] for n in names] if centered else []
        mb = [state.momentum_buffer[n] for n in names] if use_momentum else []
        if torch.compiler.is_compiling():  # traced by torch.compile: tensor math, no Python floats (see _traced)
            lr_t, hp = resolve_lr_tensor(learning_rate, state.count, state.hparams)
            new = rmsprop_math(ps, gs, sq, ga, mb, decayed_flags(names, ps, mask), lr=lr_t, hparams=hp)
            if inplace:
                new = tuple(copy_back(old, fresh) for old, fresh in zip((ps, sq, ga, mb), new, strict=True))
            return finish(state, names, *new, hp)
        if not inplace:
            ps, sq, ga, mb = clone_all(ps), clone_all(sq), clone_all(ga), clone_all(mb)
        lr, hp = resolve_lr(learning_rate, state.count, state.hparams)
        opts = dict(lr=lr, alpha=float(hp["alpha"]), eps=float(hp["eps"]), momentum=float(hp["momentum"]))
        for group_wd, groups in weight_decay_groups(names, ps, mask, float(hp["weight_decay"])):
            for (_, dtype), idx in groups.items():
                if dtype == torch.float16:
                    _in_float32(idx, ps, gs, sq, ga, mb, group_wd, hp, lr)
                    continue
                _update(
                    [ps[i] for i in idx],
                    [gs[i] for i in idx],
                    [sq[i] for i in idx],
                    [ga[i] for i in idx] if centered else [],
                    [mb[i] for i in idx] if use_momentum else [],
                    weight_decay=group_wd,
                    **opts,
                )
        return finish(state, names, ps, sq, ga, mb, hp)

    return Optimizer(init, apply, check)


def _in_float32(
    idx: list[int],
    ps: list[Tensor],
    gs: list[Tensor],
    sq: list[Tensor],
    ga: list[Tensor],
    mb: list[Tensor],
    weight_decay: float,
    hp: dict[str, Tensor],
    lr: float,
) -> None:
    """RMSprop on the float16 tensors ``idx``, in place, computed in float32 and stored back in float16.

    torch's multi-tensor RMSprop computes in the parameters' dtype, where ``eps`` (1e-8) is 0:
    a zero gradient on a zero average gives 0/0 = NaN, and a gradient whose square underflows
    gives an infinity ("true" fp16 mode). Adam's fused kernel computes in float32 for the
    same reason.
    """
    pick = lambda ts: [ts[i] for i in idx] if ts else []
    sub, sub_sq, sub_ga, sub_mb = pick(ps), pick(sq), pick(ga), pick(mb)
    wide = lambda ts: [t.float() for t in ts]
    hparams = {**hp, "weight_decay": torch.tensor(weight_decay, dtype=torch.float64)}
    new = rmsprop_math(
        wide(sub),
        wide(pick(gs)),
        wide(sub_sq),
        wide(sub_ga),
        wide(sub_mb),
        [True] * len(idx),
        lr=torch.tensor(lr, dtype=torch.float64),
        hparams=hparams,
    )
    for old, fresh in zip((sub, sub_sq, sub_ga, sub_mb), new, strict=True):
        copy_back(old, fresh)
