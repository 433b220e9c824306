"""Adam and AdamW on torch's fused kernels (``torch._fused_adam_`` / ``torch._fused_adamw_``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import Optimizer, ScalarOrSchedule, check_hparam, check_lr, hparam, resolve_lr
from ._masks import MaskFn, split_by_mask

__all__ = ["AdamState", "adam", "adamw"]


class AdamState(NamedTuple):
    """State of :func:`adam` / :func:`adamw`: update count, first and second moments, hyperparameters."""

    count: Tensor
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]
    nu_max: dict[str, Tensor]
    hparams: dict[str, Tensor]


def group_indices(tensors: list[Tensor], subset: list[int]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Split ``subset`` of ``tensors`` by (device, dtype), as fused kernels require."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in subset:
        t = tensors[i]
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def clone_all(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` (the pure path: never update the caller's tensors)."""
    return [t.clone() for t in tensors]


def _make(kind: str, learning_rate: ScalarOrSchedule, b1: float, b2: float, eps: float,
          weight_decay: float, amsgrad: bool, mask: MaskFn | None) -> Optimizer:
    where = f"fnlight.optim.{kind}"
    learning_rate = check_lr(learning_rate, where=where)
    b1 = check_hparam("b1", b1, where=where, high=1.0)
    b2 = check_hparam("b2", b2, where=where, high=1.0)
    eps = check_hparam("eps", eps, where=where)
    weight_decay = check_hparam("weight_decay", weight_decay, where=where)
    if not isinstance(amsgrad, bool):
        raise TypeError(f"{where}: amsgrad must be a bool, got {amsgrad!r}")
    if mask is not None and not callable(mask):
        raise TypeError(f"{where}: mask must be a callable (name, param) -> bool or None, got {mask!r}")
    kernel = torch._fused_adamw_ if kind == "adamw" else torch._fused_adam_

    def init(params: dict[str, Tensor]) -> AdamState:
        zeros = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}
        return AdamState(
            count=torch.zeros((), dtype=torch.int64),
            mu=zeros,
            nu={n: torch.zeros_like(p) for n, p in params.items()},
            nu_max={n: torch.zeros_like(p) for n, p in params.items()} if amsgrad else {},
            hparams={"lr": hparam(0.0 if callable(learning_rate) else learning_rate), "b1": hparam(b1),
                     "b2": hparam(b2), "eps": hparam(eps), "weight_decay": hparam(weight_decay)},
        )

    def apply(params: dict[str, Tensor], grads: dict[str, Tensor], state: AdamState, *,
              inplace: bool) -> tuple[dict[str, Tensor], AdamState]:
        names = list(params)
        ps, gs = list(params.values()), [grads[n] for n in names]
        mu, nu = [state.mu[n] for n in names], [state.nu[n] for n in names]
        vmax = [state.nu_max[n] for n in names] if amsgrad else []
        if not inplace:
            ps, mu, nu, vmax = clone_all(ps), clone_all(mu), clone_all(nu), clone_all(vmax)
        lr, hp = resolve_lr(learning_rate, state.count, state.hparams)
        count = state.count + 1
        step_value = float(count)
        decay, no_decay = split_by_mask(names, ps, mask)
        opts = dict(lr=lr, beta1=float(hp["b1"]), beta2=float(hp["b2"]), eps=float(hp["eps"]),
                    amsgrad=amsgrad, maximize=False)
        wd = float(hp["weight_decay"])
        for subset, group_wd in ((decay, wd), (no_decay, 0.0)):
            for (device, _), idx in group_indices(ps, subset).items():
                steps = [torch.tensor(step_value, dtype=torch.float32, device=device)] * len(idx)
                kernel([ps[i] for i in idx], [gs[i] for i in idx], [mu[i] for i in idx], [nu[i] for i in idx],
                       [vmax[i] for i in idx] if amsgrad else [], steps, weight_decay=group_wd, **opts)
        new_state = AdamState(count, dict(zip(names, mu)), dict(zip(names, nu)),
                              dict(zip(names, vmax)) if amsgrad else {}, hp)
        return dict(zip(names, ps)), new_state

    return Optimizer(init, apply)


def adam(learning_rate: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, mask: MaskFn | None = None) -> Optimizer:
    """Adam (L2 weight decay added to the gradient), matching ``torch.optim.Adam``.

    Args:
        learning_rate: a float, or a schedule of the update count.
        b1, b2: exponential decay rates of the first and second moments.
        eps: added to the denominator.
        weight_decay: L2 penalty coefficient.
        amsgrad: keep the running maximum of the second moment.
        mask: ``(name, param) -> bool``; parameters where it is false get no weight decay.

    Raises:
        ValueError, TypeError: an option is out of range or of the wrong type.

    >>> import fnlight as fl
    >>> opt = fl.optim.adam(1e-3, b1=0.9)
    """
    return _make("adam", learning_rate, b1, b2, eps, weight_decay, amsgrad, mask)


def adamw(learning_rate: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2, amsgrad: bool = False, mask: MaskFn | None = None) -> Optimizer:
    """AdamW (decoupled weight decay), matching ``torch.optim.AdamW``.

    Args:
        learning_rate: a float, or a schedule of the update count.
        b1, b2: exponential decay rates of the first and second moments.
        eps: added to the denominator.
        weight_decay: decoupled weight decay coefficient (multiplied by the learning rate).
        amsgrad: keep the running maximum of the second moment.
        mask: ``(name, param) -> bool``; parameters where it is false get no weight decay
            (e.g. :func:`fnlight.optim.decay_mask_no_bias_norm`).

    Raises:
        ValueError, TypeError: an option is out of range or of the wrong type.

    >>> import fnlight as fl
    >>> opt = fl.optim.adamw(3e-4, weight_decay=0.1, mask=fl.optim.decay_mask_no_bias_norm)
    """
    return _make("adamw", learning_rate, b1, b2, eps, weight_decay, amsgrad, mask)
