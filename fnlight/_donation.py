"""Donation: the fold's explicit, checked path for updating a state's buffers in place.

A step called directly is pure. Inside :func:`fnlight.fold` the fold owns every
intermediate state, so it marks the step call as *donating*: the step may then
update tensors of its input state in place and must hand back a state that owns
them. The input state is marked as donated afterwards, and any later use of it
through fnlight raises :class:`DonatedStateError`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["DonatedStateError", "check_live", "donating", "is_donating", "mark_donated"]

_MARK = "_fnlight_donated"
_local = threading.local()


class DonatedStateError(RuntimeError):
    """A state whose buffers were given to an in-place update was used again."""


def is_donating() -> bool:
    """Whether the current step call may update its input state's tensors in place."""
    return getattr(_local, "donating", False)


@contextlib.contextmanager
def donating(enabled: bool = True) -> Iterator[None]:
    """Let step calls inside this block update their input state in place."""
    previous = is_donating()
    _local.donating = enabled
    try:
        yield
    finally:
        _local.donating = previous


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
