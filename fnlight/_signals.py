"""Preemption: SIGTERM/SIGINT during a fold finish the current step, save, and exit cleanly."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["Preempted", "SignalWatch", "preempt"]


class Preempted(SystemExit):
    """The fold stopped on SIGTERM/SIGINT after finishing a step (and saving, with checkpointing).

    A ``SystemExit`` with code ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), so an
    uncaught one ends the script the way schedulers and ``torchrun`` expect from a signalled
    job; catch it to do otherwise. Attributes: ``signum``, ``state`` (the last state),
    ``path`` (the checkpoint written, or ``None``).
    """

    def __init__(self, message: str, *, signum: int, state: Any, path: Any) -> None:
        super().__init__(128 + signum)
        self.message, self.signum, self.state, self.path = message, signum, state, path

    def __str__(self) -> str:
        return self.message


class SignalWatch:
    """Within the block, SIGTERM and SIGINT are recorded instead of interrupting (main thread only).

    A second SIGINT raises ``KeyboardInterrupt`` at once (press Ctrl-C twice to abort).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> SignalWatch:
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


_local = threading.local()


def preempting() -> bool:
    """Whether the transforms are being finished because the fold was preempted (not at its end)."""
    return getattr(_local, "preempting", False)


def preempt(step: Any, state: Any, signum: int) -> Preempted:
    """Save through the step's checkpointing (if any) and build the exception that ends the fold."""
    _local.preempting = True  # a fold cut short: checks about the whole fold (with_early_stop's) stay quiet
    try:
        save_now = getattr(step, "save_now", None)
        path = save_now(state) if save_now is not None else None  # with_checkpointing finishes its chain first
        finish = getattr(step, "finish", None)
        if path is None and finish is not None:  # as at a fold's normal end: trackers log what is left of their window
            finish(state)
    finally:
        _local.preempting = False
    name = signal.Signals(signum).name
    where = f"update {int(state.step)} (epoch {int(state.data.epoch)}, {int(state.data.batch)} batches into it)"
    if path is not None:
        message = (
            f"fnlight: {name} received; stopped after {where} and saved {path}. "
            "To resume, run the same script again: with_checkpointing(resume=True) restores it in step.init()."
        )
    else:
        message = (
            f"fnlight: {name} received; stopped after {where}. Nothing was saved: wrap the step with "
            "fnlight.with_checkpointing(...) to save on preemption, or catch fnlight.Preempted and use .state."
        )
    print(message, file=sys.stderr, flush=True)
    return Preempted(message, signum=signum, state=state, path=path)
