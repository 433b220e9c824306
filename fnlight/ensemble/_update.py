"""The vectorised optimizer update: one set of multi-tensor ops updates all K replicas at once.

Every tensor of a stacked state has the replicas on its leading dimension, and every
hyperparameter in ``opt_state.hparams`` is a ``[K]`` float64 tensor, so replicas may differ in
learning rate, weight decay, betas... torch's fused kernels take one scalar learning rate per
call (a ``[K]`` tensor is refused: "a Tensor with 3 elements cannot be converted to Scalar"),
so the update is written with ``torch._foreach_*`` ops whose per-replica scalars broadcast as
``[K, 1, ..., 1]`` views. The arithmetic follows torch's CPU fused kernels operation by
operation (scalars computed in float64, then cast), and the states it produces are the stacks
of ``fnlight.optim.adamw/adam/sgd`` states, so a replica continues under those optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import optim
from ..optim._adam import AdamState
from ..optim._base import Optimizer
from ..optim._masks import MaskFn
from ..optim._sgd import SgdState

__all__ = ["KINDS", "EnsembleOptimizer"]

KINDS = ("adamw", "adam", "sgd")
_PER_REPLICA = {"adamw": ("b1", "b2", "eps", "weight_decay"), "sgd": ("momentum", "dampening", "weight_decay")}
_SHARED = {"adamw": ("amsgrad", "mask"), "sgd": ("nesterov", "mask")}
_STATE = {"adamw": AdamState, "adam": AdamState, "sgd": SgdState}


def _family(kind: str) -> str:
    return "sgd" if kind == "sgd" else "adamw"


def _values(name: str, value: Any, k: int, where: str) -> list[Any]:
    """One value per replica: a scalar is repeated, a sequence (or 1-D tensor) must have ``k`` entries."""
    if isinstance(value, Tensor):
        if value.ndim > 1:
            raise ValueError(
                f"{where}: {name} must be a float or {k} floats (one per replica), got a tensor of shape {list(value.shape)}"
            )
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * k
    if len(value) != k:
        raise ValueError(f"{where}: {name} has {len(value)} values, expected k={k} (one per replica) or a single float")
    return list(value)


class EnsembleOptimizer:
    """AdamW, Adam or SGD for K stacked replicas, each with its own hyperparameters.

    Built from the same options as ``fnlight.optim.<kind>``; a float option may instead be a
    sequence of K values (one per replica). Replica ``i`` is exactly ``builder(i)``, an
    ordinary fnlight optimizer, which also validates the values.
    """

    def __init__(self, kind: str, k: int, lr: Any, options: Mapping[str, Any], *, where: str) -> None:
        if not isinstance(kind, str):
            raise TypeError(
                f"{where}: optimizer must be the name of one of {KINDS}, got {type(kind).__name__}; the ensemble builds "
                "each replica's fnlight.optim optimizer from that name, lr and options (e.g. optimizer='adamw', lr=[...], "
                "options={'weight_decay': 0.01})"
            )
        if kind not in KINDS:
            raise ValueError(f"{where}: optimizer must be one of {KINDS}, got {kind!r}")
        family = _family(kind)
        known = _PER_REPLICA[family] + _SHARED[family]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {unknown} for optimizer {kind!r}; expected some of {sorted(known)}")
        schedules = [lr] if callable(lr) else [v for v in lr if callable(v)] if isinstance(lr, (list, tuple)) else []
        if schedules:
            raise TypeError(
                f"{where}: lr must be a float or {k} floats (one per replica), got the schedule {schedules[0]!r}; "
                "ensembles keep per-replica learning rates in opt_state.hparams['lr'] (shape [K]): replace it between steps"
            )
        for name in _SHARED[family]:
            if name in options and isinstance(options[name], (list, tuple, Tensor)):
                raise TypeError(f"{where}: {name} is structural and must be the same for every replica, got {options[name]!r}")
        lrs = _values("lr", lr, k, where)
        per = {n: _values(n, options[n], k, where) for n in _PER_REPLICA[family] if n in options}
        self.kind, self.k = kind, k
        self.options = [
            {**{n: options[n] for n in _SHARED[family] if n in options}, **{n: v[i] for n, v in per.items()}} for i in range(k)
        ]
        self.lrs = lrs
        self.builders: list[Optimizer] = []
        for i in range(k):
            try:
                self.builders.append(getattr(optim, kind)(lrs[i], **self.options[i]))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: replica {i}: {e}") from None
        self.mask: MaskFn | None = options.get("mask")
        self.amsgrad = bool(options.get("amsgrad", False))
        self.nesterov = bool(options.get("nesterov", False))
        momenta = per.get("momentum", [0.0] * k)
        if kind == "sgd" and len({float(m) > 0 for m in momenta}) > 1:
            raise ValueError(
                f"{where}: momentum must be > 0 for every replica or 0 for every replica (momentum buffers exist "
                f"for the whole ensemble or not at all), got {momenta!r}"
            )
        self.use_momentum = kind == "sgd" and float(momenta[0]) > 0

    def builder(self, index: int) -> Optimizer:
        """The ordinary fnlight optimizer of replica ``index`` (its own learning rate and options)."""
        return self.builders[index]

    def check_state(self, opt_state: Any, where: str) -> None:
        """Raise if ``opt_state`` is not the stacked state of this optimizer (type and structure)."""
        expected = _STATE[self.kind]
        if type(opt_state) is not expected:
            raise TypeError(
                f"{where}: the ensemble step uses optimizer {self.kind!r} and needs an opt_state of type {expected.__name__}, "
                f"got {type(opt_state).__name__}; stack states built with fnlight.optim.{self.kind} (no chain)"
            )
        for name, value in opt_state.hparams.items():
            if not isinstance(value, Tensor) or value.shape != (self.k,):
                got = f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else repr(value)
                raise ValueError(
                    f"{where}: opt_state.hparams[{name!r}] must be a tensor of shape [{self.k}] (one value per replica), "
                    f"got {got}; to change it, put e.g. torch.full(({self.k},), value, dtype=torch.float64) there"
                )
        has = bool(opt_state.nu_max) if expected is AdamState else bool(opt_state.momentum_buffer)
        wants = self.amsgrad if expected is AdamState else self.use_momentum
        if has != wants:
            what = "nu_max (amsgrad)" if expected is AdamState else "momentum buffers"
            raise ValueError(
                f"{where}: the ensemble step was built {'with' if wants else 'without'} {what} but the state has "
                f"{'them' if has else 'none'}; build the step with the options the states were built with"
            )

    def apply(
        self, params: dict[str, Tensor], grads: dict[str, Tensor], state: Any, *, inplace: bool
    ) -> tuple[dict[str, Tensor], Any]:
        """Update every replica of ``params`` with ``grads``; in place on ``params`` and ``state`` if ``inplace``."""
        names = list(params)
        ps, gs = list(params.values()), [grads[n] for n in names]
        if not inplace:
            ps = [p.clone() for p in ps]
        decayed = [i for i, n in enumerate(names) if self.mask is None or self.mask(n, params[n][0])]
        if self.kind == "sgd":
            return dict(zip(names, ps)), self._sgd(names, ps, gs, decayed, state, inplace)
        return dict(zip(names, ps)), self._adam(names, ps, gs, decayed, state, inplace)

    def _adam(
        self, names: list[str], ps: list[Tensor], gs: list[Tensor], decayed: list[int], state: AdamState, inplace: bool
    ) -> AdamState:
        hp = state.hparams
        mu, nu = [state.mu[n] for n in names], [state.nu[n] for n in names]
        vmax = [state.nu_max[n] for n in names] if self.amsgrad else []
        if not inplace:
            mu, nu, vmax = [t.clone() for t in mu], [t.clone() for t in nu], [t.clone() for t in vmax]
        # The per-replica scalars in float64, as the fused kernels compute them from double arguments.
        t = [c + 1 for c in state.count.tolist()]
        lr, wd, b1, b2 = (hp[n].tolist() for n in ("lr", "weight_decay", "b1", "b2"))
        c = _PerReplica(
            ps,
            decay=[1 - a * w for a, w in zip(lr, wd)] if self.kind == "adamw" else wd,
            one_minus_b1=[1 - b for b in b1],
            one_minus_b2=[1 - b for b in b2],
            b2=b2,
            bias_correction2_sqrt=[math.sqrt(1 - b**s) for b, s in zip(b2, t)],
            eps=hp["eps"].tolist(),
            step_size=[a / (1 - b**s) for a, b, s in zip(lr, b1, t)],
        )
        if decayed and any(wd):
            sub = [ps[i] for i in decayed]
            if self.kind == "adamw":  # decoupled: p *= 1 - lr * wd
                torch._foreach_mul_(sub, [c.decay[i] for i in decayed])
            else:  # L2: g += p * wd
                products = torch._foreach_mul(sub, [c.decay[i] for i in decayed])
                gs = list(gs)
                for j, i in enumerate(decayed):
                    gs[i] = gs[i] + products[j]
        torch._foreach_lerp_(mu, gs, c.one_minus_b1)
        squares = torch._foreach_mul(gs, c.one_minus_b2)
        torch._foreach_mul_(squares, gs)
        torch._foreach_mul_(nu, c.b2)
        torch._foreach_add_(nu, squares)
        if self.amsgrad:
            torch._foreach_maximum_(vmax, nu)
        denom = torch._foreach_sqrt(vmax if self.amsgrad else nu)
        torch._foreach_div_(denom, c.bias_correction2_sqrt)
        torch._foreach_add_(denom, c.eps)
        step = torch._foreach_mul(mu, c.step_size)
        torch._foreach_div_(step, denom)
        torch._foreach_sub_(ps, step)
        merged = lambda old, new: {**old, **dict(zip(names, new))}
        return AdamState(
            state.count + 1,
            merged(state.mu, mu),
            merged(state.nu, nu),
            merged(state.nu_max, vmax) if self.amsgrad else {},
            dict(hp),
        )

    def _sgd(
        self, names: list[str], ps: list[Tensor], gs: list[Tensor], decayed: list[int], state: SgdState, inplace: bool
    ) -> SgdState:
        hp = state.hparams
        lr, wd, momentum, dampening = (hp[n].tolist() for n in ("lr", "weight_decay", "momentum", "dampening"))
        c = _PerReplica(ps, wd=wd, momentum=momentum, one_minus_dampening=[1 - d for d in dampening], minus_lr=[-a for a in lr])
        if decayed and any(wd):  # g += p * wd
            products = torch._foreach_mul([ps[i] for i in decayed], [c.wd[i] for i in decayed])
            gs = list(gs)
            for j, i in enumerate(decayed):
                gs[i] = gs[i] + products[j]
        bufs: list[Tensor] = []
        if self.use_momentum:
            bufs = [state.momentum_buffer[n] for n in names]
            if not inplace:
                bufs = [b.clone() for b in bufs]
            first = [c == 0 for c in state.count.tolist()]
            if not all(first):  # buf = buf * momentum + g * (1 - dampening)
                torch._foreach_mul_(bufs, c.momentum)
                torch._foreach_add_(bufs, torch._foreach_mul(gs, c.one_minus_dampening))
            if any(first):  # the first update copies the gradient (as torch's kernels do)
                first = torch.tensor(first, device=bufs[0].device)
                for b, g in zip(bufs, gs):
                    b[first] = g[first]
            gs = torch._foreach_add(gs, torch._foreach_mul(bufs, c.momentum)) if self.nesterov else bufs
        torch._foreach_add_(ps, torch._foreach_mul(gs, c.minus_lr))  # p += g * -lr
        new_bufs = {**state.momentum_buffer, **dict(zip(names, bufs))} if self.use_momentum else {}
        return SgdState(state.count + 1, new_bufs, dict(hp))


class _PerReplica:
    """Per-replica values (K floats each), cast once, as ``[K, 1, ..., 1]`` views matching each tensor.

    ``c.name[i]`` broadcasts against ``tensors[i]``; ``c.name`` is the list for all of them.
    """

    def __init__(self, tensors: Sequence[Tensor], **values: list[float]) -> None:
        table = torch.tensor(list(values.values()), dtype=torch.float64)  # [J, K]
        cast: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        rows: dict[tuple[torch.dtype, torch.device, int], tuple[Tensor, ...]] = {}
        keys = [(t.dtype, t.device, t.ndim) for t in tensors]
        for key in dict.fromkeys(keys):
            dtype, device, ndim = key
            if (dtype, device) not in cast:
                cast[dtype, device] = table.to(dtype=dtype, device=device)
            rows[key] = cast[dtype, device].view(len(values), -1, *([1] * (ndim - 1))).unbind(0)
        for j, name in enumerate(values):
            setattr(self, name, [rows[key][j] for key in keys])
