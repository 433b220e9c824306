"""Tree helpers over fnlight states (optree, ``fnlight`` namespace)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import optree
import torch
from torch import Tensor, nn

from ._donation import check_live
from ._state import NAMESPACE, TrainState

__all__ = ["copy_tensors_", "tree_clone", "tree_equal"]

T = TypeVar("T")


def copy_tensors_(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for every i: one ``_foreach_copy_`` for plain tensors; one copy each
    for tensor subclasses (``with_fsdp``'s DTensors: torch 2.13 has no sharding rule for ``_foreach_copy_``).

    >>> a, b = [torch.zeros(2)], [torch.ones(2)]
    >>> copy_tensors_(a, b)
    >>> a[0].tolist()
    [1.0, 1.0]
    """
    if all(type(t) is Tensor for t in targets):
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def tree_clone(tree: T) -> T:
    """A copy of ``tree`` whose tensor leaves are cloned (other leaves are shared).

    >>> import torch
    >>> a = {"w": torch.ones(2)}
    >>> b = tree_clone(a)
    >>> _ = b["w"].add_(1)
    >>> float(a["w"][0]), float(b["w"][0])
    (1.0, 2.0)
    """
    check_live(tree, "tree_clone")  # a donated state's tensors hold a later step's values: no copy of that
    return optree.tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, tree, namespace=NAMESPACE)


def tree_equal(a: Any, b: Any) -> bool:
    """Whether two trees have the same structure and equal leaves: ``torch.equal``, with NaN equal to NaN.

    So a state holding a NaN (a skipped fp16 update's statistics, a NaN metric) equals its
    own copy, as "bit for bit" means.

    >>> import torch
    >>> tree_equal({"w": torch.ones(2)}, {"w": torch.ones(2)})
    True
    >>> tree_equal({"w": torch.tensor([float("nan"), 1.0])}, {"w": torch.tensor([float("nan"), 1.0])})
    True

    Two states compare their module skeletons by structure (class, layers, tensor names, shapes
    and dtypes), not by identity: a run resumed in a fresh ``step.init()`` (or another
    process) equals the uninterrupted one.

    Raises:
        DonatedStateError: a state in ``a`` or ``b`` was donated to ``fold`` (its tensors hold a later step's values).
    """
    states_a, states_b = _states(a), _states(b)
    for state in (*states_a, *states_b):  # a donated state's tensors hold a later step's values: no comparison of those
        check_live(state, "tree_equal")
    sa, sb = [x.skeleton for x in states_a], [x.skeleton for x in states_b]
    if len(sa) != len(sb) or not all(x is y or _same_module(x, y) for x, y in zip(sa, sb)):
        return False
    if sa:  # the same structure: b's states take a's skeletons, so the comparison below sees the tensors
        shared = iter(sa)
        b = optree.tree_map(
            lambda x: x.replace(skeleton=next(shared)) if isinstance(x, TrainState) else x,
            b,
            is_leaf=lambda x: isinstance(x, TrainState),
            namespace=NAMESPACE,
        )
    la, ta = optree.tree_flatten(a, namespace=NAMESPACE)
    lb, tb = optree.tree_flatten(b, namespace=NAMESPACE)
    if ta != tb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not _tensor_equal(x.detach().cpu(), y.detach().cpu()):
                return False
        elif isinstance(x, Tensor) or isinstance(y, Tensor) or (x != y and not (x != x and y != y)):
            return False
    return True


def _states(tree: Any) -> list[TrainState]:
    """The states in ``tree``, in order."""
    if isinstance(tree, TrainState):
        return [tree]
    found = optree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, TrainState), namespace=NAMESPACE)
    return [x for x in found if isinstance(x, TrainState)]


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _same_module(a: Any, b: Any) -> bool:
    """Whether two skeletons have the same structure: per module its class and settings (plain attributes),
    and every tensor's name, shape and dtype."""
    if not isinstance(a, nn.Module) or not isinstance(b, nn.Module):
        return a is b
    return module_difference(a, b) is None


def module_difference(a: nn.Module, b: nn.Module, first: str = "the first") -> str | None:
    """Where skeleton ``b`` first differs from ``a`` (``first`` names ``a`` in the answer), or ``None`` if it does not:
    a module's name, class or settings, the number of modules, or a tensor's name, shape or dtype."""
    ma, mb = list(a.named_modules(remove_duplicate=False)), list(b.named_modules(remove_duplicate=False))
    for (na, x), (nb, y) in zip(ma, mb):
        where = f"module {na!r}" if na else "the root module"
        if na != nb:
            return f"module {nb!r} where {first} has {na!r}"
        if type(x) is not type(y):
            return f"{where} is a {type(y).__name__}, in {first} a {type(x).__name__}"
        sx, sy = _settings(x), _settings(y)
        if sx != sy:
            key = next(k for k in sorted({*sx, *sy}) if sx.get(k, "(unset)") != sy.get(k, "(unset)"))
            return f"{where}'s {key} is {sy.get(key, '(unset)')!r}, in {first} {sx.get(key, '(unset)')!r}"
    if len(ma) != len(mb):
        return f"{len(mb)} modules, {first} has {len(ma)}"
    tensors = lambda m: [(n, t.shape, t.dtype) for n, t in (*m.named_parameters(), *m.named_buffers())]
    return None if tensors(a) == tensors(b) else "its parameters or buffers differ in name, shape or dtype"


def _settings(module: Any) -> dict[str, Any]:
    """A module's own attributes that are plain values (``in_features``, ``eps``, ``scale = 2.0``), by name;
    other objects by their type."""
    out = {}
    for key, value in vars(module).items():
        if key in ("_parameters", "_buffers", "_modules", "training") or "hook" in key or key.startswith("_fnlight"):
            continue
        plain = isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value))
        out[key] = value if plain else type(value)
    return out


def _tensor_equal(x: Tensor, y: Tensor) -> bool:
    if x.equal(y):
        return True
    if not (x.is_floating_point() or x.is_complex()):
        return False
    return bool(((x == y) | (x.isnan() & y.isnan())).all())


def sample_count(n: Any, batch_size_fn: Any, where: str, show: Callable[[Any], str]) -> int | float:
    """``batch_size_fn``'s answer for one batch, checked: a finite number >= 0 (``show(n)`` names a wrong one).

    What ``evaluate`` weighs a batch's means by and ``with_tracking`` counts for samples/s:
    a tensor would turn the sums into tensors, and the trackers are sent floats.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        hint = "; convert it with int(...)" if isinstance(n, Tensor) else ""
        raise TypeError(
            f"{where}: batch_size_fn must return a batch's number of samples (an int >= 0), got {show(n)} "
            f"from batch_size_fn={batch_size_fn!r}{hint}"
        )
    if not (math.isfinite(n) and n >= 0):
        raise ValueError(
            f"{where}: batch_size_fn must return a batch's number of samples (an int >= 0), got {n!r} "
            f"from batch_size_fn={batch_size_fn!r}"
        )
    return n


def leading_size(batch: Any, where: str) -> int:
    """The leading dimension of the first tensor in ``batch`` that has one, in the order the batch is written.

    A dict's values are taken in insertion order (``optree`` would sort its keys: for
    ``{"x": ..., "class_weights": ...}`` that is the weights' length, not the batch size).

    >>> import torch
    >>> leading_size({"x": torch.zeros(8, 3), "class_weights": torch.ones(2)}, "here")
    8
    """
    pending = [batch]
    while pending:
        node = pending.pop()
        if isinstance(node, Tensor):
            if node.ndim > 0:
                return node.shape[0]
        elif isinstance(node, Mapping):
            pending.extend(reversed(list(node.values())))
        elif isinstance(node, (list, tuple)):
            pending.extend(reversed(node))
        else:  # another container registered with optree (a dataclass...), or a plain leaf
            leaves = optree.tree_leaves(node)
            if leaves != [node]:
                pending.extend(reversed(leaves))
    raise TypeError(f"{where}: cannot infer the batch size (no tensor with a leading dimension); pass batch_size_fn")
