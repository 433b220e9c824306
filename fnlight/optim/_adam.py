"""Adam and AdamW on torch's fused kernels (``torch._fused_adam_`` / ``torch._fused_adamw_``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import Optimizer, ScalarOrSchedule, check_hparam, check_lr, check_state, hparam, resolve_lr
from ._kernels import check_bool, check_mask, clone_all, initial_lr, merge, weight_decay_groups
from ._masks import MaskFn
from ._traced import adam_math, copy_back, decayed_flags, resolve_lr_tensor

__all__ = ["AdamState", "adam", "adamw"]

HPARAMS = ("lr", "b1", "b2", "eps", "weight_decay")  # the keys of the state's hparams, as init builds them


class AdamState(NamedTuple):
    """State of :func:`adam` / :func:`adamw`.

    Fields:
        count: 0-d int64 CPU tensor, the number of updates applied.
        mu: first moments by parameter name.
        nu: second moments by parameter name.
        nu_max: running maxima of ``nu`` (``amsgrad=True``), else ``{}``.
        hparams: ``lr``, ``b1``, ``b2``, ``eps``, ``weight_decay`` as 0-d float64 CPU tensors.
    """

    count: Tensor
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]
    nu_max: dict[str, Tensor]
    hparams: dict[str, Tensor]


def _make(
    kind: str,
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    mask: MaskFn | None,
) -> Optimizer:
    where = f"fnlight.optim.{kind}"
    learning_rate = check_lr(learning_rate, where=where)
    b1 = check_hparam("b1", b1, where=where, high=1.0)
    b2 = check_hparam("b2", b2, where=where, high=1.0)
    eps = check_hparam("eps", eps, where=where)
    weight_decay = check_hparam("weight_decay", weight_decay, where=where)
    amsgrad = check_bool("amsgrad", amsgrad, where=where)
    mask = check_mask(mask, where=where)
    kernel = torch._fused_adamw_ if kind == "adamw" else torch._fused_adam_

    def init(params: dict[str, Tensor]) -> AdamState:
        zeros = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}
        return AdamState(
            count=torch.zeros((), dtype=torch.int64),
            mu=zeros,
            nu={n: torch.zeros_like(p) for n, p in params.items()},
            nu_max={n: torch.zeros_like(p) for n, p in params.items()} if amsgrad else {},
            hparams={
                "lr": initial_lr(learning_rate),
                "b1": hparam(b1),
                "b2": hparam(b2),
                "eps": hparam(eps),
                "weight_decay": hparam(weight_decay),
            },
        )

    def finish(
        state: AdamState,
        count: Tensor,
        names: list[str],
        ps: list[Tensor],
        mu: list[Tensor],
        nu: list[Tensor],
        vmax: list[Tensor],
        hp: dict,
    ) -> tuple[dict[str, Tensor], AdamState]:
        new_state = AdamState(
            count,
            merge(state.mu, names, mu),
            merge(state.nu, names, nu),
            merge(state.nu_max, names, vmax) if amsgrad else {},
            hp,
        )
        return dict(zip(names, ps, strict=True)), new_state

    def check(params: dict[str, Tensor], state: Any, grads: dict[str, Tensor] | None = None) -> None:
        check_state(where, params, state, AdamState, {"mu": True, "nu": True, "nu_max": amsgrad}, grads, HPARAMS)

    def apply(
        params: dict[str, Tensor], grads: dict[str, Tensor], state: AdamState, *, inplace: bool
    ) -> tuple[dict[str, Tensor], AdamState]:
        if not inplace and not torch.compiler.is_compiling():  # a direct call (the fold's step checks once: Optimizer)
            check(params, state, grads)
        names = list(params)
        ps, gs = list(params.values()), [grads[n] for n in names]
        mu, nu = [state.mu[n] for n in names], [state.nu[n] for n in names]
        vmax = [state.nu_max[n] for n in names] if amsgrad else []
        if torch.compiler.is_compiling():  # traced by torch.compile: tensor math, no Python floats (see _traced)
            lr_t, hp = resolve_lr_tensor(learning_rate, state.count, state.hparams)
            decayed = decayed_flags(names, ps, mask)
            new = adam_math(
                ps, gs, mu, nu, vmax, decayed, count=state.count, lr=lr_t, hparams=hp, decoupled=kind == "adamw", amsgrad=amsgrad
            )
            if inplace:
                new = tuple(copy_back(old, fresh) for old, fresh in zip((ps, mu, nu, vmax), new, strict=True))
            return finish(state, state.count + 1, names, *new, hp)
        if not inplace:
            ps, mu, nu, vmax = clone_all(ps), clone_all(mu), clone_all(nu), clone_all(vmax)
        lr, hp = resolve_lr(learning_rate, state.count, state.hparams)
        count = state.count + 1
        step_value = float(count)
        opts = dict(lr=lr, beta1=float(hp["b1"]), beta2=float(hp["b2"]), eps=float(hp["eps"]), amsgrad=amsgrad, maximize=False)
        wd = float(hp["weight_decay"])
        for group_wd, groups in weight_decay_groups(names, ps, mask, wd):
            for (device, _), idx in groups.items():
                steps = [torch.scalar_tensor(step_value, dtype=torch.float32, device=device)] * len(idx)
                kernel(
                    [ps[i] for i in idx],
                    [gs[i] for i in idx],
                    [mu[i] for i in idx],
                    [nu[i] for i in idx],
                    [vmax[i] for i in idx] if amsgrad else [],
                    steps,
                    weight_decay=group_wd,
                    **opts,
                )
        return finish(state, count, names, ps, mu, nu, vmax, hp)

    return Optimizer(init, apply, check)


def adam(
    learning_rate: ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    mask: MaskFn | None = None,
) -> Optimizer:
    """Adam (L2 weight decay added to the gradient), matching ``torch.optim.Adam``.

    Each update runs ``torch._fused_adam_`` once per (device, dtype) group and
    weight-decay group; results equal ``torch.optim.Adam(..., fused=True)`` bitwise.

    Args:
        learning_rate: a float, or a schedule of the update count.
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the denominator.
        weight_decay: L2 penalty coefficient.
        amsgrad: keep the running maximum of the second moment.
        mask: ``(name, param) -> bool``; parameters where it is false get no weight decay.

    Returns:
        An :class:`Optimizer` whose state is an :class:`AdamState`.

    Raises:
        ValueError: an option is out of range.
        TypeError: an option has the wrong type.

    >>> import torch, fnlight as fl
    >>> opt = fl.optim.adam(0.1)
    >>> params = {"w": torch.ones(2)}
    >>> new, state = opt.apply(params, {"w": torch.ones(2)}, opt.init(params), inplace=False)
    >>> new["w"], int(state.count)
    (tensor([0.9000, 0.9000]), 1)
    """
    return _make("adam", learning_rate, b1, b2, eps, weight_decay, amsgrad, mask)


def adamw(
    learning_rate: ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    mask: MaskFn | None = None,
) -> Optimizer:
    """AdamW (decoupled weight decay), matching ``torch.optim.AdamW``.

    Each update runs ``torch._fused_adamw_`` once per (device, dtype) group and
    weight-decay group; results equal ``torch.optim.AdamW(..., fused=True)`` bitwise.

    Args:
        learning_rate: a float, or a schedule of the update count.
        b1: decay rate of the first moment, in [0, 1).
        b2: decay rate of the second moment, in [0, 1).
        eps: added to the denominator.
        weight_decay: decoupled weight decay coefficient (multiplied by the learning rate).
        amsgrad: keep the running maximum of the second moment.
        mask: ``(name, param) -> bool``; parameters where it is false get no weight decay
            (e.g. :func:`fnlight.optim.decay_mask_no_bias_norm`).

    Returns:
        An :class:`Optimizer` whose state is an :class:`AdamState`.

    Raises:
        ValueError: an option is out of range.
        TypeError: an option has the wrong type.

    >>> import torch, fnlight as fl
    >>> opt = fl.optim.adamw(3e-4, weight_decay=0.1, mask=fl.optim.decay_mask_no_bias_norm)
    >>> sorted(opt.init({"w": torch.zeros(2, 2)}).hparams)
    ['b1', 'b2', 'eps', 'lr', 'weight_decay']
    """
    return _make("adamw", learning_rate, b1, b2, eps, weight_decay, amsgrad, mask)
