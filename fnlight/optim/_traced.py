"""The optimizers' arithmetic with tensor hyperparameters, for code traced by ``torch.compile``.

Eagerly, every optimizer reads its hyperparameters and update count as Python floats and
calls one of torch's fused or multi-tensor kernels (``torch._fused_adamw_``...). Inside a
``torch.compile`` trace a Python float read from a tensor is a graph break, and a float
that changes every update (the learning rate of a schedule, Adam's step) would be baked
into the graph and recompile it. So when ``torch.compiler.is_compiling()`` the optimizers
run the functions below instead: the same per-element math as torch's CPU kernels, written
as elementwise tensor expressions of 0-d tensor hyperparameters, which the compiler fuses
into one loop per parameter group. They are functional (new tensors out); the optimizer's
``apply`` copies them back when asked to update in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._base import ScalarOrSchedule, scheduled
from ._masks import MaskFn, split_by_mask

__all__ = [
    "adagrad_math",
    "adam_math",
    "coefficients",
    "copy_back",
    "decayed_flags",
    "opmath",
    "resolve_lr_tensor",
    "rmsprop_math",
    "sgd_math",
]


def resolve_lr_tensor(
    learning_rate: ScalarOrSchedule, count: Tensor, hparams: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The learning rate for the update after ``count`` updates as a 0-d float64 tensor, and the hparams to store."""
    if callable(learning_rate):
        lr = scheduled(learning_rate, count)
        return lr, {**hparams, "lr": lr}
    return hparams["lr"], dict(hparams)


def coefficients(values: Sequence[Tensor]) -> Callable[[Tensor], list[Tensor]]:
    """0-d hyperparameter tensors (computed once per update), cast for each parameter's compute dtype and device.

    ``coefficients(values)(p)`` gives ``values`` for ``p``, stacked into one small tensor per
    (device, dtype) group. Without the stack, inductor inlines the scalar arithmetic (``pow``,
    ``sqrt``, divisions) into every iteration of the elementwise loop over the parameters,
    which measured about 2x slower than torch's fused kernel on CPU; a stacked tensor is
    materialised once and the loops only read it.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}

    def cast_for(like: Tensor) -> list[Tensor]:
        dtype = like.dtype if like.dtype in _OPMATH else torch.float32
        key = (like.device, dtype)
        if key not in groups:
            groups[key] = list(torch.stack([v.to(dtype) for v in values]).to(like.device).unbind())
        return groups[key]

    return cast_for


_OPMATH = (torch.float32, torch.float64)


def opmath(t: Tensor) -> Tensor:
    """``t`` in the dtype torch's fused kernels compute in: float64 stays, every other float type is float32.

    A no-op for float32 and float64 tensors. Half types must be cast explicitly: a 0-d float32
    coefficient does not promote an fp16 tensor, and in fp16 Adam's ``eps`` (1e-8) rounds to
    zero and ``g * g`` underflows. Inductor upcasts half types in its kernels anyway; the
    ``eager`` and ``aot_eager`` backends run these expressions as written.
    """
    return t if t.dtype in _OPMATH else t.float()


def decayed_flags(names: Sequence[str], tensors: Sequence[Tensor], mask: MaskFn | None) -> list[bool]:
    """Whether each tensor gets weight decay under ``mask`` (all of them without one)."""
    decay = set(split_by_mask(names, tensors, mask)[0])
    return [i in decay for i in range(len(names))]


def copy_back(old: Sequence[Tensor], new: Sequence[Tensor]) -> list[Tensor]:
    """Write ``new`` into ``old`` (the in-place path); return ``old``."""
    for o, n in zip(old, new, strict=True):
        o.copy_(n)
    return list(old)


def adam_math(
    ps: Sequence[Tensor],
    gs: Sequence[Tensor],
    mu: Sequence[Tensor],
    nu: Sequence[Tensor],
    vmax: Sequence[Tensor],
    decayed: Sequence[bool],
    *,
    count: Tensor,
    lr: Tensor,
    hparams: dict[str, Tensor],
    decoupled: bool,
    amsgrad: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Adam (``decoupled=False``) or AdamW after ``count`` updates: the math of ``torch._fused_adam(w)_``.

    One difference: the second moment's bias correction multiplies by ``1 / sqrt(1 - b2**t)``
    where torch's kernel divides by its square root. The results differ by about an ulp, and
    the compiled loop has one vector division per element instead of two: on the CPU that
    measured about 20% less time for the update of a 0.7M-parameter MLP, and faster than
    torch's fused kernel.

    Returns new parameters, first moments, second moments and (``amsgrad``) their maxima.
    """
    step = (count + 1).to(torch.float64)
    b1, b2, eps, wd = hparams["b1"], hparams["b2"], hparams["eps"], hparams["weight_decay"]
    step_size = lr / (1 - b1**step)
    inv_bc2_sqrt = 1 / torch.sqrt(1 - b2**step)
    decay = 1 - lr * wd if decoupled else wd
    coefs = coefficients((step_size, inv_bc2_sqrt, 1 - b1, b2, 1 - b2, eps, decay))
    new_p, new_m, new_v, new_vmax = [], [], [], []
    for i, (p0, g, m0, v0) in enumerate(zip(ps, gs, mu, nu, strict=True)):
        p, g, m, v = opmath(p0), opmath(g), opmath(m0), opmath(v0)
        c_step, c_inv_bc2, c_b1, c_b2, c_1mb2, c_eps, c_decay = coefs(p)
        if decayed[i]:
            if decoupled:
                p = p * c_decay
            else:
                g = g + p * c_decay
        m = m + c_b1 * (g - m)  # lerp's formula for weights below 0.5 (1 - b1), as an fma, without lerp's per-element branch
        v = v * c_b2 + c_1mb2 * g * g
        if amsgrad:
            top = torch.maximum(opmath(vmax[i]), v)
            new_vmax.append(top.to(vmax[i].dtype))
            denom = torch.sqrt(top) * c_inv_bc2 + c_eps
        else:
            denom = torch.sqrt(v) * c_inv_bc2 + c_eps
        new_p.append((p - c_step * m / denom).to(p0.dtype))
        new_m.append(m.to(m0.dtype))
        new_v.append(v.to(v0.dtype))
    return new_p, new_m, new_v, new_vmax


def sgd_math(
    ps: Sequence[Tensor],
    gs: Sequence[Tensor],
    bufs: Sequence[Tensor],
    decayed: Sequence[bool],
    *,
    count: Tensor,
    lr: Tensor,
    hparams: dict[str, Tensor],
    nesterov: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """SGD after ``count`` updates (momentum when ``bufs`` is not empty): the math of ``torch._fused_sgd_``."""
    first = count == 0
    coefs = coefficients((lr, hparams["weight_decay"], hparams["momentum"], 1 - hparams["dampening"]))
    new_p, new_b = [], []
    for i, (p0, g) in enumerate(zip(ps, gs, strict=True)):
        p, g = opmath(p0), opmath(g)
        c_lr, c_wd, c_mom, c_damp = coefs(p)
        if decayed[i]:
            g = g + p * c_wd
        if bufs:
            b = torch.where(first.to(p.device), g, opmath(bufs[i]) * c_mom + c_damp * g)
            new_b.append(b.to(bufs[i].dtype))
            g = g + b * c_mom if nesterov else b
        new_p.append((p - c_lr * g).to(p0.dtype))
    return new_p, new_b


def adagrad_math(
    ps: Sequence[Tensor],
    gs: Sequence[Tensor],
    sums: Sequence[Tensor],
    decayed: Sequence[bool],
    *,
    count: Tensor,
    lr: Tensor,
    hparams: dict[str, Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Adagrad after ``count`` updates: the math of ``torch._fused_adagrad_``."""
    clr = lr / (1 + count.to(torch.float64) * hparams["lr_decay"])
    coefs = coefficients((clr, hparams["weight_decay"], hparams["eps"]))
    new_p, new_s = [], []
    for i, (p0, g, s0) in enumerate(zip(ps, gs, sums, strict=True)):
        p, g, s = opmath(p0), opmath(g), opmath(s0)
        c_clr, c_wd, c_eps = coefs(p)
        if decayed[i]:
            g = g + p * c_wd
        s = s + g * g
        new_p.append((p - c_clr * g / (torch.sqrt(s) + c_eps)).to(p0.dtype))
        new_s.append(s.to(s0.dtype))
    return new_p, new_s


def rmsprop_math(
    ps: Sequence[Tensor],
    gs: Sequence[Tensor],
    sq: Sequence[Tensor],
    ga: Sequence[Tensor],
    mb: Sequence[Tensor],
    decayed: Sequence[bool],
    *,
    lr: Tensor,
    hparams: dict[str, Tensor],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """RMSprop: the math of torch's multi-tensor RMSprop. Returns new parameters, ``sq``, ``ga``, ``mb``.

    As that implementation does, it computes in the parameters' dtype (fp16 parameters in fp16).
    """
    alpha = hparams["alpha"]
    coefs = coefficients((lr, alpha, 1 - alpha, hparams["eps"], hparams["weight_decay"], hparams["momentum"]))
    new_p, new_sq, new_ga, new_mb = [], [], [], []
    for i, (p, g, s) in enumerate(zip(ps, gs, sq, strict=True)):
        c_lr, c_alpha, c_1ma, c_eps, c_wd, c_mom = coefs(p)
        if decayed[i]:
            g = g + p * c_wd
        s = s * c_alpha + c_1ma * g * g
        new_sq.append(s)
        if ga:
            a = ga[i] + c_1ma * (g - ga[i])  # lerp with weight 1 - alpha, as above
            new_ga.append(a)
            avg = torch.sqrt(s - a * a) + c_eps
        else:
            avg = torch.sqrt(s) + c_eps
        if mb:
            b = mb[i] * c_mom + g / avg
            new_mb.append(b)
            new_p.append(p - c_lr * b)
        else:
            new_p.append(p - c_lr * g / avg)
    return new_p, new_sq, new_ga, new_mb
