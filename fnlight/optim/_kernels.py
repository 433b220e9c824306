"""Small helpers shared by the optimizers: kernel grouping, the pure path, state merging, checks."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import scheduled
from ._masks import MaskFn, split_by_mask

__all__ = [
    "check_bool",
    "check_mask",
    "check_momentum_switch",
    "clone_all",
    "group_indices",
    "initial_lr",
    "merge",
    "shard_local",
    "weight_decay_groups",
]


Groups = dict[tuple[torch.device, torch.dtype], list[int]]


def group_indices(tensors: Sequence[Tensor], subset: Sequence[int]) -> Groups:
    """Split ``subset`` of ``tensors`` by (device, dtype), as fused and multi-tensor kernels require.

    >>> import torch
    >>> group_indices([torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.ones(2)], [0, 1, 2])
    {(device(type='cpu'), torch.float32): [0, 2], (device(type='cpu'), torch.float64): [1]}
    """
    groups: Groups = {}
    for i in subset:
        t = tensors[i]
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def shard_local(tensors: list[Tensor]) -> list[Tensor]:
    """Each sharded ``DTensor`` (:func:`fnlight.with_fsdp`) as the shard this rank holds; others as they are.

    For the fused kernels that ``DTensor`` has no rule for (``_fused_sgd_``,
    ``_fused_adagrad_``): their updates are elementwise, and parameters, gradients and
    optimizer state are sharded alike, so each rank updating its own shard in place is the
    whole update. ``to_local()`` shares the shard's memory.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # never imported: no DTensor exists
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def clone_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` (the pure path: never update the caller's tensors).

    >>> import torch
    >>> a = torch.zeros(2)
    >>> _ = clone_all([a])[0].add_(1)
    >>> a
    tensor([0., 0.])
    """
    return [t.clone() for t in tensors]


def merge(old: Mapping[str, Tensor], names: Sequence[str], new: Sequence[Tensor]) -> dict[str, Tensor]:
    """``old`` with the entries of ``names`` replaced by ``new``: a subset update keeps every entry.

    >>> merge({"a": 1, "b": 2}, ["b"], [3])
    {'a': 1, 'b': 3}
    """
    return {**old, **dict(zip(names, new, strict=True))}


def check_bool(name: str, value: Any, *, where: str) -> bool:
    """Validate a boolean option at build time.

    >>> check_bool("nesterov", 1, where="fnlight.optim.sgd")
    Traceback (most recent call last):
    TypeError: fnlight.optim.sgd: nesterov must be a bool (True or False), got 1 of type int
    """
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")
    return value


def check_mask(mask: Any, *, where: str) -> MaskFn | None:
    """Validate a weight-decay mask (``None`` or a callable ``(name, param) -> bool``) at build time.

    >>> check_mask("bias", where="fnlight.optim.sgd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: fnlight.optim.sgd: mask must be None or a callable (name, param) -> bool (...), got 'bias'
    """
    if mask is not None and not callable(mask):
        raise TypeError(
            f"{where}: mask must be None or a callable (name, param) -> bool "
            f"(e.g. fnlight.optim.decay_mask_no_bias_norm), got {mask!r}"
        )
    return mask


def check_momentum_switch(state: Any, use_momentum: bool, *, where: str) -> None:
    """Raise unless ``state.hparams["momentum"]`` is on (> 0) exactly when the optimizer was built with momentum.

    Whether momentum buffers exist is fixed at build time; a momentum set to or from zero in the
    state would make torch's fused SGD fail with an internal error, or RMSprop silently ignore it.

    >>> import torch
    >>> from types import SimpleNamespace
    >>> state = SimpleNamespace(hparams={"momentum": torch.tensor(0.5)})
    >>> check_momentum_switch(state, False, where="fnlight.optim.sgd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: fnlight.optim.sgd: state.hparams['momentum'] is 0.5, but the optimizer was built with momentum == 0 (no ...
    """
    momentum = float(state.hparams["momentum"])
    if (momentum > 0.0) != use_momentum:
        built, fix = (
            ("> 0, which fixes that momentum buffers exist", "set another positive value, or build the optimizer with momentum=0")
            if use_momentum
            else ("== 0 (no momentum buffers)", "build the optimizer with momentum > 0 to change it later")
        )
        raise ValueError(
            f"{where}: state.hparams['momentum'] is {momentum!r}, but the optimizer was built with momentum {built}; {fix}"
        )


def weight_decay_groups(
    names: Sequence[str], tensors: Sequence[Tensor], mask: MaskFn | None, weight_decay: float
) -> list[tuple[float, Groups]]:
    """``[(weight_decay, {(device, dtype): indices})]``: one entry for decayed, one for masked-out tensors.

    >>> import torch
    >>> weight_decay_groups(["w", "b"], [torch.zeros(2, 2), torch.zeros(2)], lambda n, p: p.ndim > 1, 0.1)
    [(0.1, {(device(type='cpu'), torch.float32): [0]}), (0.0, {(device(type='cpu'), torch.float32): [1]})]
    """
    decay, no_decay = split_by_mask(names, tensors, mask)
    return [(wd, group_indices(tensors, subset)) for wd, subset in ((weight_decay, decay), (0.0, no_decay)) if subset]


def half_on_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SGD and Adagrad replace torch's fused kernel by their float32 tensor math for this group.

    torch 2.12-2.13's CPU ``_fused_sgd_`` skips the vectorised part of fp16/bf16 updates and
    writes garbage into their momentum buffers (pytorch/pytorch#191763, fixed by #192545), and
    its CPU ``_fused_adagrad_`` divides in fp16, where ``eps`` (1e-10) is 0, so a zero gradient
    on a zero sum gives NaN. Half-precision CPU parameters ("true" fp16/bf16 mode) therefore
    take the math of :mod:`fnlight.optim._traced`, computed in float32 as the fixed kernels do.

    >>> import torch
    >>> half_on_cpu(torch.device("cpu"), torch.bfloat16), half_on_cpu(torch.device("cpu"), torch.float32)
    (True, False)
    """
    return device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)


def initial_lr(learning_rate: Any) -> Tensor:
    """The ``hparams["lr"]`` an optimizer state starts with: the float, or the schedule at count 0.

    >>> initial_lr(0.5), initial_lr(lambda c: 0.1 * 0.5 ** c.double())
    (tensor(0.5000, dtype=torch.float64), tensor(0.1000, dtype=torch.float64))
    """
    if callable(learning_rate):
        return scheduled(learning_rate, torch.zeros((), dtype=torch.int64)).detach().clone()
    return torch.tensor(float(learning_rate), dtype=torch.float64)
