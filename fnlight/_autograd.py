"""The backward pass of a step, without the Python argument handling of ``torch.autograd``'s entry points.

``torch.autograd.grad`` and ``torch.autograd.backward`` check and normalise their arguments
in Python (tensor-like tests, ``_make_grads``, tuple conversions) before calling the engine
through ``torch.autograd.graph._engine_run_backward``: ~10-35 us per call on this project's
CPU, about a sixth of a small model's forward and backward. A step always passes one 0-d
loss and a tuple of plain leaf tensors, so it can call that function directly, as both
entry points do, keeping what it adds (debug-logging hooks, the context that compiled
autograd reads in device threads). Where anything could need the entry points' extra
handling (a tensor subclass or mode with ``__torch_function__``, code being traced by
``torch.compile``, a torch without ``_engine_run_backward``) the public functions are used.

A loss weight is passed as the gradient of the loss (``full_like(loss, weight)``) rather
than multiplied into the loss: the same gradients bit for bit as ``(loss * weight)``'s
(autograd's ``MulBackward`` computes ``ones * weight`` in the loss's dtype), without the
multiplication and its backward node.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._donation import storage_ptr

__all__ = ["run_backward", "writable_grads"]

_engine_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)
_has_torch_function = torch._C._has_torch_function


def run_backward(
    loss: Tensor, leaves: Sequence[Tensor], *, weight: float = 1.0, accumulate: bool = False
) -> tuple[Tensor | None, ...]:
    """The gradients of ``weight * loss`` with respect to ``leaves``.

    ``accumulate=False`` returns them as ``torch.autograd.grad(..., allow_unused=True)``
    does (``None`` for a leaf the loss does not reach). ``accumulate=True`` adds them into
    the leaves' ``.grad`` as ``torch.autograd.backward(..., inputs=leaves)`` does and
    returns ``()``.
    """
    seed = torch.ones_like(loss) if weight == 1.0 else torch.full_like(loss, weight)
    leaves = tuple(leaves)
    if _engine_run_backward is None or _has_torch_function((loss, *leaves)) or torch.compiler.is_compiling():
        if accumulate:
            torch.autograd.backward(loss, grad_tensors=seed, inputs=leaves)
            return ()
        return torch.autograd.grad(loss, leaves, grad_outputs=seed, allow_unused=True)
    out = _engine_run_backward((loss,), (seed,), False, False, leaves, allow_unreachable=True, accumulate_grad=accumulate)
    return () if accumulate else out


def writable_grads(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """``grads`` with every gradient that cannot be written in place replaced by a dense copy.

    Autograd may return a gradient as an expanded view (stride 0: the gradient of
    ``p.sum()``), which an in-place update refuses ("more than one element of the written-to
    tensor refers to a single memory location"), or one tensor as the gradient of two
    parameters (``x * (a + b)``), which an in-place update would change twice. Transforms
    that accumulate into gradients or unscale them in place take them through this first, as
    ``AccumulateGrad`` gives each ``.grad`` its own dense tensor. The same dict comes back
    when nothing needs copying.

    >>> g = {"w": torch.ones(1).expand(3), "b": torch.ones(2)}
    >>> out = writable_grads(g)
    >>> out["w"].stride(), out["b"] is g["b"]
    ((1,), True)
    """
    seen: set[int] = set()
    copy = []
    for n, g in grads.items():
        # autograd hands the same tensor to two leaves (the gradient of `x * (a + b)`): written in place,
        # the second would take the first's additions too
        ptr = storage_ptr(g)  # (a DTensor's local shard)
        if (0 in g.stride() and g.numel() > 1) or (ptr and ptr in seen):
            copy.append(n)
        seen.add(ptr)
    if not copy:
        return grads
    return {**grads, **{n: grads[n].clone(memory_format=torch.contiguous_format) for n in copy}}
