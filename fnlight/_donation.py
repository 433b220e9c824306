"""Donation: the fold's explicit, checked path for updating a state's buffers in place.

A step called directly is pure. Inside :func:`fnlight.fold` the fold owns every
intermediate state, so it marks the step call as *donating*: the step may then
update tensors of its input state in place and must hand back a state that owns
them. The input state is marked as donated afterwards, and any later use of it
through fnlight raises :class:`DonatedStateError`.

A state from ``TrainStep.init`` holds the model's own tensors (no copy). Those are lent, not
given: the model, and every other state ``init`` made from it, still hold them. ``init``
records them (:func:`lend`), and a donating fold first replaces each tensor that shares
memory with a recorded one by a copy of its own (:func:`unshare_lent`); the state the fold
returns owns everything, and folding it again copies nothing.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import optree
from torch import Tensor

__all__ = ["DonatedStateError", "check_live", "donating", "is_donating", "lend", "mark_donated", "unshare_lent"]

_MARK = "_fnlight_donated"
_local = threading.local()
_lent: dict[int, weakref.ref[Tensor]] = {}  # id -> the tensors init() put into states that a model also holds
T = TypeVar("T")


def lend(tensors: Iterable[Tensor]) -> None:
    """Record ``tensors``, which ``TrainStep.init`` put into a state and its model still holds.

    The tensors themselves are recorded (weakly), not the model: a model that later gets new
    tensors (``load_state_dict(assign=True)``, ``.double()``) still lent the old ones to every
    state made before.
    """
    for t in tensors:
        key = id(t)
        _lent[key] = weakref.ref(t, lambda _, key=key: _lent.pop(key, None))


def storage_ptr(t: Tensor) -> int:
    """Where ``t``'s memory starts (0 for tensors without memory of their own: meta, empty, fake)."""
    local = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
    if local.device.type == "meta":
        return 0
    try:
        return local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # a subclass without storage
        return 0


def unshare_lent(tree: T, namespace: str) -> T:
    """``tree`` with every tensor that shares memory with a tensor :func:`lend` recorded replaced by a copy.

    What a donating fold does to its input before the first in-place update, so that the
    update never writes into a user's ``nn.Module`` or into other states made from it.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> state = {"w": model.weight.detach(), "other": torch.zeros(1)}
    >>> lend([state["w"]])  # what init() does with the tensors it took from the model
    >>> own = unshare_lent(state, "")
    >>> own["w"] is state["w"], torch.equal(own["w"], model.weight), own["other"] is state["other"]
    (False, True, True)
    """
    lent = {ptr for ref in list(_lent.values()) if (t := ref()) is not None and (ptr := storage_ptr(t))}
    if not lent:
        return tree
    copy = lambda x: x.clone() if isinstance(x, Tensor) and storage_ptr(x) in lent else x
    return optree.tree_map(copy, tree, namespace=namespace)


class DonatedStateError(RuntimeError):
    """A state whose buffers were given to an in-place update was used again."""


def is_donating() -> bool:
    """Whether the current step call may update its input state's tensors in place."""
    return bool(getattr(_local, "donating", False))


def donating_model() -> bool:
    """Whether the state's tensors are the model's own (``fold(donate="model")``): a tensor a step
    would replace is written into the old one instead, so the model sees every update."""
    return getattr(_local, "donating", False) == "model"


@contextlib.contextmanager
def donating(enabled: bool | str = True) -> Iterator[None]:
    """Let step calls inside this block update their input state in place (``"model"``: see :func:`donating_model`)."""
    previous = getattr(_local, "donating", False)
    _local.donating = enabled
    try:
        yield
    finally:
        _local.donating = previous


def updated(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """``old`` with ``new``'s tensors in place of its own: as new entries, or, under
    ``fold(donate="model")`` (whose state's tensors are the model's), written into the old
    tensors so the model sees them (see :func:`write_back`)."""
    if not new:
        return old
    return write_back(old, new) if donating_model() else {**old, **new}


def write_back(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """``old`` updated by ``new``: each tensor written into the old one where it fits (same shape, dtype and
    device), else put in its place. For states whose tensors others hold (``donate="model"``).

    A new value that shares memory with one of the old tensors (``self.prev = self.cur``, a
    transpose of a buffer) is copied first, so writing one buffer never changes another's new value.
    """
    owned = {storage_ptr(t) for t in old.values()} - {0}
    staged = {n: v.clone() if storage_ptr(v) in owned else v for n, v in new.items()}
    out = dict(old)
    for name, value in staged.items():
        target = old.get(name)
        if target is not None and (target.shape, target.dtype, target.device) == (value.shape, value.dtype, value.device):
            target.copy_(value)
        else:
            out[name] = value
    return out


def mark_donated(state: Any) -> None:
    """Mark ``state`` as consumed: later use through fnlight raises."""
    object.__setattr__(state, _MARK, True)


def check_live(state: Any, where: str) -> None:
    """Raise :class:`DonatedStateError` if ``state`` was donated to an in-place update."""
    if getattr(state, _MARK, False):
        raise DonatedStateError(
            f"{where}: this TrainState was donated to an in-place update inside fold() and its "
            "tensors now hold a later step's values. Use the state fold() returned (or passed to "
            "your observer at that moment); to keep a copy, call fnlight.tree_clone(state) "
            "inside the observer."
        )
