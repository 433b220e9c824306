"""Adagrad on torch's fused kernel (``torch._fused_adagrad_``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import Optimizer, ScalarOrSchedule, check_hparam, check_lr, check_state, hparam, resolve_lr
from ._kernels import check_mask, clone_all, half_on_cpu, initial_lr, merge, shard_local, weight_decay_groups
from ._masks import MaskFn
from ._traced import adagrad_math, copy_back, decayed_flags, resolve_lr_tensor

__all__ = ["AdagradState", "adagrad"]

HPARAMS = ("lr", "lr_decay", "weight_decay", "eps")  # the keys of the state's hparams, as init builds them


class AdagradState(NamedTuple):
    """State of :func:`adagrad`.

    Fields:
        count: 0-d int64 CPU tensor, the number of updates applied.
        sum_of_squares: accumulated squared gradients by parameter name (torch's ``"sum"``).
        hparams: ``lr``, ``lr_decay``, ``weight_decay``, ``eps`` as 0-d float64 CPU tensors.
    """

    count: Tensor
    sum_of_squares: dict[str, Tensor]
    hparams: dict[str, Tensor]


def adagrad(
    learning_rate: ScalarOrSchedule,
    *,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    mask: MaskFn | None = None,
) -> Optimizer:
    """Adagrad, matching ``torch.optim.Adagrad``.

    Each update runs ``torch._fused_adagrad_`` once per (device, dtype) group and
    weight-decay group; results equal ``torch.optim.Adagrad(..., fused=True)`` bitwise.
    The step the kernel sees (for ``lr_decay``) is the optimizer's update count.

    Args:
        learning_rate: a float, or a schedule of the update count.
        lr_decay: the step size is ``lr / (1 + (step - 1) * lr_decay)``.
        weight_decay: L2 penalty coefficient, added to the gradient.
        initial_accumulator_value: starting value of the squared-gradient sums (used by
            ``init`` only).
        eps: added to the denominator.
        mask: ``(name, param) -> bool``; parameters where it is false get no weight decay.

    Returns:
        An :class:`Optimizer` whose state is an :class:`AdagradState`.

    Raises:
        ValueError: an option is out of range.
        TypeError: an option has the wrong type.

    >>> import torch, fnlight as fl
    >>> opt = fl.optim.adagrad(0.5)
    >>> params = {"w": torch.ones(2)}
    >>> new, state = opt.apply(params, {"w": torch.ones(2)}, opt.init(params), inplace=False)
    >>> new["w"], state.sum_of_squares["w"]
    (tensor([0.5000, 0.5000]), tensor([1., 1.]))
    """
    where = "fnlight.optim.adagrad"
    learning_rate = check_lr(learning_rate, where=where)
    lr_decay = check_hparam("lr_decay", lr_decay, where=where)
    weight_decay = check_hparam("weight_decay", weight_decay, where=where)
    initial_accumulator_value = check_hparam("initial_accumulator_value", initial_accumulator_value, where=where)
    eps = check_hparam("eps", eps, where=where)
    mask = check_mask(mask, where=where)

    def init(params: dict[str, Tensor]) -> AdagradState:
        sums = {n: torch.full_like(p, initial_accumulator_value, memory_format=torch.preserve_format) for n, p in params.items()}
        return AdagradState(
            count=torch.zeros((), dtype=torch.int64),
            sum_of_squares=sums,
            hparams={
                "lr": initial_lr(learning_rate),
                "lr_decay": hparam(lr_decay),
                "weight_decay": hparam(weight_decay),
                "eps": hparam(eps),
            },
        )

    def check(params: dict[str, Tensor], state: Any, grads: dict[str, Tensor] | None = None) -> None:
        check_state(where, params, state, AdagradState, {"sum_of_squares": True}, grads, HPARAMS)

    def apply(
        params: dict[str, Tensor], grads: dict[str, Tensor], state: AdagradState, *, inplace: bool
    ) -> tuple[dict[str, Tensor], AdagradState]:
        if not inplace and not torch.compiler.is_compiling():  # a direct call (the fold's step checks once: Optimizer)
            check(params, state, grads)
        names = list(params)
        ps, gs = list(params.values()), [grads[n] for n in names]
        sums = [state.sum_of_squares[n] for n in names]
        if torch.compiler.is_compiling():  # traced by torch.compile: tensor math, no Python floats (see _traced)
            lr_t, hp = resolve_lr_tensor(learning_rate, state.count, state.hparams)
            new_ps, new_sums = adagrad_math(ps, gs, sums, decayed_flags(names, ps, mask), count=state.count, lr=lr_t, hparams=hp)
            if inplace:
                new_ps, new_sums = copy_back(ps, new_ps), copy_back(sums, new_sums)
            new_state = AdagradState(state.count + 1, merge(state.sum_of_squares, names, new_sums), hp)
            return dict(zip(names, new_ps, strict=True)), new_state
        if not inplace:
            ps, sums = clone_all(ps), clone_all(sums)
        lr, hp = resolve_lr(learning_rate, state.count, state.hparams)
        count = state.count + 1
        step_value = float(count)
        opts = dict(lr=lr, lr_decay=float(hp["lr_decay"]), eps=float(hp["eps"]), maximize=False)
        for group_wd, groups in weight_decay_groups(names, ps, mask, float(hp["weight_decay"])):
            for (device, dtype), idx in groups.items():
                if half_on_cpu(device, dtype):
                    _adagrad_in_float32(idx, ps, gs, sums, group_wd, hp, state.count, lr)
                    continue
                steps = [torch.scalar_tensor(step_value, dtype=torch.float32, device=device)] * len(idx)
                torch._fused_adagrad_(
                    shard_local([ps[i] for i in idx]),
                    shard_local([gs[i] for i in idx]),
                    shard_local([sums[i] for i in idx]),
                    steps,
                    weight_decay=group_wd,
                    **opts,
                )
        return dict(zip(names, ps, strict=True)), AdagradState(count, merge(state.sum_of_squares, names, sums), hp)

    return Optimizer(init, apply, check)


def _adagrad_in_float32(
    idx: list[int],
    ps: list[Tensor],
    gs: list[Tensor],
    sums: list[Tensor],
    weight_decay: float,
    hp: dict[str, Tensor],
    count: Tensor,
    lr: float,
) -> None:
    """Adagrad on the half-precision CPU tensors ``idx``, in place, computed in float32 (see :func:`half_on_cpu`)."""
    sub, sub_sums = [ps[i] for i in idx], [sums[i] for i in idx]
    hparams = {**hp, "weight_decay": torch.tensor(weight_decay, dtype=torch.float64)}
    lr_t = torch.tensor(lr, dtype=torch.float64)
    new_ps, new_sums = adagrad_math(sub, [gs[i] for i in idx], sub_sums, [True] * len(idx), count=count, lr=lr_t, hparams=hparams)
    copy_back(sub, new_ps)
    copy_back(sub_sums, new_sums)
