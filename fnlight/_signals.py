"""Preemption: SIGTERM/SIGINT during a fold finish the current step, save, and exit cleanly.

Under data parallelism (``with_ddp``/``with_fsdp`` on several ranks) the ranks agree on when to
stop: each update's all-reduce carries one more number, whether this rank has received a
signal, and every rank stops after the update whose sum says one has (on CPU tensors) or after
the update that follows it (on accelerators, where the sum is read one update late so that no
update waits for the device). A signal to one rank, or to all of them a few steps apart, ends
every rank at the same update, with one checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from ._ranks import all_sum

__all__ = ["Preempted", "SignalWatch", "agree", "preempt", "signal_flag"]


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
    ``agree=True`` (a data-parallel fold): :attr:`stop` is the signal every rank knows of
    (see :func:`agree`), not the one this rank received; such a watch follows the ranks'
    agreement even when it handles no signals itself (``enabled=False``), so that every rank
    stops together. A watch entered inside another one (a fold run by an observer or an
    evaluation of a fold) does nothing: signals go to the outer fold, which stops after its
    current step.
    """

    def __init__(self, enabled: bool, *, agree: bool = False) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.agreeing = agree
        self.received: int | None = None  # the signal this process received
        self.agreed = False  # some rank had received one before an update's all-reduce
        self._late: tuple[Tensor, Any] | None = None  # an accelerator's sum, read at the next update
        self._previous: dict[int, Any] = {}
        self._entered = False  # this watch is the thread's (not inside another one)

    @property
    def stop(self) -> int | None:
        """The signal to stop on now, or ``None``: this process's, or in agreement every rank's."""
        if not self.agreeing:
            return self.received
        if not self.agreed:
            return None
        return self.received if self.received is not None else signal.SIGTERM

    def settle(self) -> None:
        """At a data-parallel fold's end: agree once more (one all-reduce), on signals no update carried.

        A signal that reached a rank after the last update's all-reduce (during the last
        epoch-end evaluation, the last observer, a final checkpoint write) would otherwise
        be lost on every rank. Every rank of a data-parallel fold ends its loop at the same
        point, so this collective always pairs up.
        """
        if not (self.agreeing and self._entered):
            return
        total = all_sum(torch.tensor([float(self.received is not None)], dtype=torch.float64))
        self.agreed = self.agreed or float(total[0]) > 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> SignalWatch:
        if getattr(_local, "watch", None) is not None:  # inside a watching fold: that one handles signals
            self.enabled = self.agreeing = False
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        if self.enabled or self.agreeing:
            _local.watch, self._entered = self, True
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._entered:
            _local.watch, self._entered = None, False


_local = threading.local()


def signal_flag(device: torch.device) -> Tensor:
    """A 1-element float32 tensor to add to an update's all-reduce: 1 if this rank has received a signal.

    Every rank adds it to the same all-reduce, whether or not a fold watches for signals, so
    the collectives keep their shapes; :func:`agree` reads the sum.
    """
    watch = getattr(_local, "watch", None)
    return torch.full((1,), float(watch is not None and watch.received is not None), device=device)


def agree(total: Tensor) -> None:
    """Note the all-reduced :func:`signal_flag`: above 0, every rank stops after this update (see the module).

    On an accelerator the sum is copied to the host without waiting and read at the next
    update, one update late on every rank alike.
    """
    watch = getattr(_local, "watch", None)
    if watch is None or not watch.agreeing:
        return
    if total.device.type == "cpu":
        watch.agreed = watch.agreed or float(total) > 0
        return
    if watch._late is not None:
        host, done = watch._late
        done.synchronize()
        watch.agreed = watch.agreed or float(host) > 0
    host = total.detach().to("cpu", non_blocking=True)
    done = torch.Event(total.device)
    done.record()
    watch._late = (host, done)


def preempting() -> bool:
    """Whether the transforms are being finished because the fold was preempted (not at its end)."""
    return getattr(_local, "preempting", False)


def preempt(step: Any, state: Any, signum: int, *, here: bool = True) -> Preempted:
    """Save through the step's checkpointing (if any) and build the exception that ends the fold.

    ``here=False``: another rank received the signal (the ranks agreed to stop, see the module).
    """
    _local.preempting = True  # a fold cut short: checks about the whole fold (with_early_stop's) stay quiet
    try:
        save_now = getattr(step, "save_now", None)
        path = save_now(state) if save_now is not None else None
        finish = getattr(step, "finish", None)
        if finish is not None:  # as at a fold's normal end: trackers log what is left of their window
            finish(state)
    finally:
        _local.preempting = False
    name = f"{signal.Signals(signum).name} received" if here else "another rank received SIGTERM or SIGINT"
    where = f"update {int(state.step)} (epoch index {int(state.data.epoch)}, {int(state.data.batch)} batches into it)"
    if path is not None:
        message = (
            f"fnlight: {name}; stopped after {where} and saved {path}. "
            "To resume, run the same script again: with_checkpointing(resume=True) restores it in step.init()."
        )
    else:
        message = (
            f"fnlight: {name}; stopped after {where}. Nothing was saved: wrap the step with "
            "fnlight.with_checkpointing(...) to save on preemption, or catch fnlight.Preempted and use .state."
        )
    print(message, file=sys.stderr, flush=True)
    return Preempted(message, signum=signum, state=state, path=path)
