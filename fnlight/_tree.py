"""Tree helpers over fnlight states (optree, ``fnlight`` namespace)."""

from __future__ import annotations

from typing import Any, TypeVar

import optree
from torch import Tensor

from ._state import NAMESPACE

__all__ = ["tree_clone", "tree_equal"]

T = TypeVar("T")


def tree_clone(tree: T) -> T:
    """A copy of ``tree`` whose tensor leaves are cloned (other leaves are shared).

    >>> import torch
    >>> a = {"w": torch.ones(2)}
    >>> b = tree_clone(a)
    >>> _ = b["w"].add_(1)
    >>> float(a["w"][0]), float(b["w"][0])
    (1.0, 2.0)
    """
    return optree.tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, tree, namespace=NAMESPACE)


def tree_equal(a: Any, b: Any) -> bool:
    """Whether two trees have the same structure and bitwise-equal leaves (``torch.equal``).

    >>> import torch
    >>> tree_equal({"w": torch.ones(2)}, {"w": torch.ones(2)})
    True
    """
    la, ta = optree.tree_flatten(a, namespace=NAMESPACE)
    lb, tb = optree.tree_flatten(b, namespace=NAMESPACE)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not x.detach().cpu().equal(y.detach().cpu()):
                return False
        elif isinstance(x, Tensor) or isinstance(y, Tensor) or x != y:
            return False
    return True
