"""Gradient clipping as pure gradient transformations, on torch's multi-tensor kernels."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._base import GradientTransformation, check_hparam
from ._kernels import group_indices

__all__ = ["ClipState", "clip_by_global_norm", "clip_by_value", "global_norm"]

Grads = dict[str, Tensor]


class ClipState(NamedTuple):
    """State of :func:`clip_by_global_norm` and :func:`clip_by_value`.

    Fields:
        norm: 0-d tensor, the global 2-norm of the gradients of the last update *before*
            clipping (0 before the first update), for reporting as a metric. It is
            float64 when a parameter is float64, else float32, on the first parameter's device.
    """

    norm: Tensor


def global_norm(grads: Grads) -> Tensor:
    """The 2-norm of all tensors of ``grads`` seen as one vector, as ``torch.nn.utils.get_total_norm``.

    Per-tensor norms come from ``torch._foreach_norm`` per (device, dtype) group; the
    result is on the device of the first tensor (a 0-d CPU ``tensor(0.)`` when empty).

    Args:
        grads: tensors by name.

    Returns:
        A 0-d tensor; no host synchronisation happens.

    >>> import torch
    >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(5.)
    """
    tensors = list(grads.values())
    if not tensors:
        return torch.tensor(0.0)
    first_device = tensors[0].device
    norms: list[Tensor] = []
    for idx in group_indices(tensors, range(len(tensors))).values():
        norms.extend(torch._foreach_norm([tensors[i] for i in idx], 2.0))
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), 2.0)
    # Sharded gradients (with_fsdp) give a replicated DTensor: the global value as a plain tensor.
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def _init(params: Grads) -> ClipState:
    tensors = list(params.values())
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return ClipState(norm=torch.zeros((), dtype=dtype, device=tensors[0].device if tensors else "cpu"))


def _record(state: ClipState, norm: Tensor) -> ClipState:
    return ClipState(norm=norm.to(device=state.norm.device, dtype=state.norm.dtype))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``.

    The same math as ``torch.nn.utils.clip_grad_norm_``: the coefficient
    ``min(max_norm / (norm + 1e-6), 1)`` is computed as a tensor and always applied
    with ``torch._foreach_mul`` (no branch, no host synchronisation). The input
    gradients are never modified; new tensors are returned.

    Args:
        max_norm: the largest global norm let through, > 0.

    Returns:
        A :class:`GradientTransformation` whose state is a :class:`ClipState` holding the
        pre-clip norm. Put it before an optimizer with :func:`fnlight.optim.chain`.

    Raises:
        TypeError: ``max_norm`` is not a float.
        ValueError: ``max_norm`` is not a finite positive number.

    >>> import torch, fnlight as fl
    >>> clip = fl.optim.clip_by_global_norm(1.0)
    >>> grads = {"w": torch.tensor([3.0, 4.0])}
    >>> clipped, state = clip.update(grads, clip.init(grads), grads)
    >>> clipped["w"], state.norm
    (tensor([0.6000, 0.8000]), tensor(5.))
    """
    max_norm = check_hparam("max_norm", max_norm, where="fnlight.optim.clip_by_global_norm", low_inclusive=False)

    def update(grads: Grads, state: ClipState, params: Grads | None = None) -> tuple[Grads, ClipState]:
        del params
        names, tensors = list(grads), list(grads.values())
        if not tensors:
            return {}, _record(state, torch.tensor(0.0))
        total = global_norm(grads)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for (device, _), idx in group_indices(tensors, range(len(tensors))).items():
            for i, t in zip(idx, torch._foreach_mul([tensors[i] for i in idx], coef.to(device)), strict=True):
                out[i] = t
        return dict(zip(names, out, strict=True)), _record(state, total)

    return GradientTransformation(_init, update)


def clip_by_value(max_delta: float) -> GradientTransformation:
    """Clamp every gradient element to ``[-max_delta, max_delta]``.

    The same math as ``torch.nn.utils.clip_grad_value_`` (``torch._foreach_clamp_min``
    then ``torch._foreach_clamp_max``), but pure: new tensors are returned. The state
    records the pre-clip global norm like :func:`clip_by_global_norm`, so either
    transform can report it.

    Args:
        max_delta: the largest absolute gradient value let through, > 0.

    Returns:
        A :class:`GradientTransformation` whose state is a :class:`ClipState`.

    Raises:
        TypeError: ``max_delta`` is not a float.
        ValueError: ``max_delta`` is not a finite positive number.

    >>> import torch, fnlight as fl
    >>> clip = fl.optim.clip_by_value(0.5)
    >>> grads = {"w": torch.tensor([-2.0, 0.25, 1.0])}
    >>> clip.update(grads, clip.init(grads), grads)[0]["w"]
    tensor([-0.5000,  0.2500,  0.5000])
    """
    max_delta = check_hparam("max_delta", max_delta, where="fnlight.optim.clip_by_value", low_inclusive=False)

    def update(grads: Grads, state: ClipState, params: Grads | None = None) -> tuple[Grads, ClipState]:
        del params
        names, tensors = list(grads), list(grads.values())
        if not tensors:
            return {}, _record(state, torch.tensor(0.0))
        total = global_norm(grads)
        out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for idx in group_indices(tensors, range(len(tensors))).values():
            clamped = torch._foreach_clamp_min([tensors[i] for i in idx], -max_delta)
            torch._foreach_clamp_max_(clamped, max_delta)
            for i, t in zip(idx, clamped, strict=True):
                out[i] = t
        return dict(zip(names, out, strict=True)), _record(state, total)

    return GradientTransformation(_init, update)
