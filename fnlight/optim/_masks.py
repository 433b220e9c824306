"""Which parameters receive weight decay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

__all__ = ["MaskFn", "decay_mask_no_bias_norm", "split_by_mask"]


class MaskFn(Protocol):
    """``mask(name, param) -> bool``: whether the parameter called ``name`` gets weight decay."""

    def __call__(self, name: str, param: Tensor, /) -> bool: ...


def decay_mask_no_bias_norm(name: str, param: Tensor) -> bool:
    """Default-style mask: decay weight matrices, not biases or 1-D (norm) parameters.

    >>> import torch
    >>> decay_mask_no_bias_norm("fc.weight", torch.zeros(3, 2)), decay_mask_no_bias_norm("fc.bias", torch.zeros(3))
    (True, False)
    """
    return param.ndim >= 2 and not name.endswith("bias")


def split_by_mask(names: Sequence[str], tensors: Sequence[Tensor], mask: MaskFn | None) -> tuple[list[int], list[int]]:
    """Indices of the tensors that get weight decay, and of those that do not."""
    if mask is None:
        return list(range(len(names))), []
    decay, no_decay = [], []
    for i, (n, t) in enumerate(zip(names, tensors)):
        (decay if mask(n, t) else no_decay).append(i)
    return decay, no_decay
