"""Trackers in a separate process: the training process appends each event to a list, and no GIL time."""

from __future__ import annotations

import atexit
import collections
import multiprocessing
import multiprocessing.connection
import queue
import signal
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from ._base import (
    Tracker,
    TrackerWarning,
    check_events,
    check_flush_every,
    check_hparams,
    check_run_id,
    check_scalars,
    check_step,
)
from ._trackers import Trackers

__all__ = ["ProcessTrackers"]

_LIVE: weakref.WeakSet[ProcessTrackers] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for trackers in list(_LIVE):
        trackers.shutdown()


def _serve(trackers: tuple[Tracker, ...], events: Any, replies: Any) -> None:
    """The tracking process: apply events in order; answer ``open`` and ``close``.

    It ignores SIGINT and SIGTERM: Ctrl-C in a terminal, or a scheduler's SIGTERM, goes to the
    whole process group, and the training process, which owns this one, answers it by saving a
    checkpoint and closing its trackers, which needs this process alive to deliver the events
    still queued. It ends when told to, or on its own when the training process is gone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # TrackerWarning reports go to this process's stderr
        inline = Trackers(*trackers, background=False)
        while True:
            try:
                kind, args = events.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():  # the owner was killed: nobody will say shutdown
                    inline.close()
                    return
                continue
            try:
                if kind == "open":
                    replies.send(("ok", inline.open(args[0], hparams=args[1])))
                elif kind == "logs":
                    inline.log_batch(args[0])
                elif kind == "hparams":
                    inline.log_hparams(args[0])
                elif kind == "close":
                    inline.close()
                    replies.send(("ok", None))
                elif kind == "flush":
                    replies.send(("ok", None))
                elif kind == "shutdown":
                    inline.close()
                    return
            except Exception as e:  # reported to the caller at its next open/close
                if kind in ("open", "close"):
                    replies.send(("error", f"{type(e).__name__}: {e}"))


class ProcessTrackers:
    """Several trackers fed from a separate process: logging costs the training loop a list append.

    :class:`Trackers` runs trackers on a thread, which still competes with training for
    Python's interpreter lock: aim's ``Run.track`` is Python work (~0.5 ms per 7-scalar
    event here), so logging every update slowed a 0.7 ms step by 10-13 %. Here the trackers
    run in a child process (started on the first :meth:`open`, with the ``spawn`` method so
    no lock or thread of the training process is inherited). Events are sent in batches: the
    caller appends each event to a queue and returns (no lock, no clock), and a helper thread
    sends what waits to the child (one pickle, one queue put) every ``flush_every`` seconds,
    so no event waits much longer than that, even when training stalls, and the training
    thread never pickles or sends an event. A message to every
    process on every update cost the loop 2-6 % of its step time on a 2-vCPU machine; one
    every half second costs nothing measurable. Events keep their order, also relative to
    :meth:`log_hparams`, :meth:`open` and :meth:`close` (which send what is pending first).
    The caller is never blocked by a tracker. Failure isolation is :class:`Trackers`' (in
    the child). The trackers are pickled into the child when it starts, so they must be
    picklable before they are opened (the bundled ones are).

    :meth:`close` ends the run but keeps the process for the next :meth:`open` (a fold closes
    its trackers when it ends); :meth:`shutdown` ends the process, as interpreter exit does.

    The child is started with the ``spawn`` method, which imports the main script again:
    a script that trains at import time must keep its training code under
    ``if __name__ == "__main__":`` (Python's multiprocessing rule; otherwise :meth:`open`
    raises a ``RuntimeError`` saying so).

    The child ignores SIGINT and SIGTERM (Ctrl-C, or a scheduler's SIGTERM, reaches every
    process of the group): the training process decides when it ends, so an interrupted run
    still closes with every event delivered; the child also ends when the training process is gone.

    Costs: starting the child (importing torch, fnlight and the trackers' libraries) takes
    about as long as importing them here, and its memory is that of a second Python process
    with those libraries.

    Args:
        *trackers: the trackers to run in the child process.
        flush_every: the most seconds an event waits in this process before it is sent to
            the child (``> 0``; default 0.5). ``0`` is not allowed: use :class:`Trackers` for
            a tracker that must see each event at once.

    Raises:
        TypeError: a tracker is not a :class:`Tracker`, or ``flush_every`` is not a number.
        ValueError: ``flush_every`` is not a finite number above 0.

    >>> import tempfile
    >>> from fnlight.tracking import JSONLTracker, ProcessTrackers, read_scalars
    >>> with tempfile.TemporaryDirectory() as d:
    ...     trackers = ProcessTrackers(JSONLTracker(d))
    ...     run_id = trackers.open()
    ...     trackers.log_scalars(1, {"loss": 0.5})
    ...     trackers.shutdown()
    ...     read_scalars(f"{d}/{run_id}.jsonl")
    {'loss': [(1, 0.5)]}
    """

    def __init__(self, *trackers: Tracker, flush_every: float = 0.5) -> None:
        self.flush_every = check_flush_every(flush_every, "ProcessTrackers")
        self.trackers = Trackers(*trackers, background=False).trackers  # validates and flattens
        self._process: multiprocessing.process.BaseProcess | None = None
        self._events: Any = None
        self._replies: Any = None
        self._run_id = ""
        self._opened = False  # the child's trackers were asked to open (even if every one of them failed to)
        self._lock = threading.Lock()
        # events waiting to be sent: appended by the caller without a lock (a deque's append and popleft are atomic),
        # taken by the flusher thread, or by a message that must follow them, under the lock
        self._pending: collections.deque[tuple[int, dict[str, float]]] = collections.deque()
        self._flusher: threading.Thread | None = None
        self._stopping = threading.Event()
        self._exitcode: int | None = None  # the exit code of a tracking process that died while in use
        self._told = False  # that death was reported (once, on the caller's thread)

    def __repr__(self) -> str:
        return f"ProcessTrackers({', '.join(repr(t) for t in self.trackers)})"

    @property
    def run_id(self) -> str:
        """The id of the open run ("" when none is open)."""
        return self._run_id

    def _start(self) -> None:
        self._stop_flusher()  # the flusher of a process that died
        context = multiprocessing.get_context("spawn")
        self._events = context.Queue()
        self._replies, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve, args=(self.trackers, self._events, child_end), name="fnlight-trackers", daemon=True
        )
        self._process.start()
        child_end.close()
        self._pending.clear()  # events for a process that died are not replayed into a new run
        self._exitcode, self._told = None, False
        self._stopping.clear()
        self._flusher = threading.Thread(target=self._flush_periodically, name="fnlight-trackers-flush", daemon=True)
        self._flusher.start()
        _LIVE.add(self)

    def _stop_flusher(self) -> None:
        self._stopping.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None

    def _flush_periodically(self) -> None:
        """Send what waits every ``flush_every`` seconds: the only sender of events between other messages."""
        while not self._stopping.wait(self.flush_every):
            with self._lock:
                if self._lost():
                    return
                self._send_pending()

    def _lost(self) -> bool:
        """Whether the tracking process died (killed, out of memory, crashed); the first time, drops what waits."""
        process = self._process
        if process is None or process.is_alive():
            return False
        if self._exitcode is None:
            self._exitcode = process.exitcode if process.exitcode is not None else -1
        self._pending.clear()  # also an event the caller appended as the death was found
        return True

    def _tell(self) -> None:
        """Report a dead tracking process once, on the caller's thread."""
        if self._exitcode is None or self._told:
            return
        self._told = True
        warnings.warn(
            f"ProcessTrackers: the tracking process ended unexpectedly (exit code {self._exitcode}); the events "
            f"logged since are dropped, and training goes on. open() starts a new tracking process",
            TrackerWarning,
            stacklevel=4,
        )

    def _send_pending(self) -> None:
        """Put the waiting events on the queue as one batch (the caller holds the lock)."""
        pending = self._pending
        if pending:  # only holders of the lock take events, so these stay for popleft; later ones wait
            self._events.put(("logs", ([pending.popleft() for _ in range(len(pending))],)))

    def _send(self, kind: str, args: tuple[Any, ...]) -> None:
        """Put one message on the queue after the events before it."""
        with self._lock:
            self._send_pending()
            self._events.put((kind, args))

    def _ask(self, kind: str, args: tuple[Any, ...]) -> Any:
        self._send(kind, args)
        try:
            status, value = self._replies.recv()
        except EOFError:
            self._process = None
            raise RuntimeError(
                f"ProcessTrackers.{kind}: the tracking process exited (its error is on stderr above). A common cause: "
                "the script starts training at import time; the tracking process is started with the 'spawn' method, "
                'which imports the main script again, so put the training code under `if __name__ == "__main__":`'
            ) from None
        if status == "error":
            warnings.warn(f"ProcessTrackers: {kind} failed in the tracking process: {value}", TrackerWarning, stacklevel=3)
            return None
        return value

    def open(self, run_id: str = "", *, hparams: Mapping[str, Any] | None = None) -> str:
        """Start the tracking process if needed and open a run in every tracker; return its id.

        Raises:
            RuntimeError: a run is already open (close it first).
        """
        if self._opened and self._process is not None and self._process.is_alive():  # (a dead one took its run along)
            raise RuntimeError(f"{self!r} already has run {self._run_id!r} open: close() it before opening another")
        run_id = check_run_id(run_id, "ProcessTrackers.open")
        hparams = None if hparams is None else check_hparams(hparams, "ProcessTrackers.open: hparams")
        if self._process is None or not self._process.is_alive():
            self._start()
        self._opened = True
        self._run_id = self._ask("open", (run_id, hparams)) or run_id
        return self._run_id

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Add one event to the next batch for the trackers (returns at once)."""
        self._log_checked(check_step(step, "ProcessTrackers.log_scalars"), check_scalars(scalars, "ProcessTrackers.log_scalars"))

    def _log_checked(self, step: int, scalars: dict[str, float]) -> None:
        """:meth:`log_scalars` of an event already checked (an int step, a ``{str: float}`` dict it may keep).

        ``with_tracking`` calls it on every logging event, right after a step, where each further
        Python call costs µs of cache misses: so it only appends the event (no lock, no clock) for
        the flusher thread to send.
        """
        if self._process is None or not self._opened:  # never opened, or closed: the child would drop it unsaid
            raise RuntimeError("ProcessTrackers.log_scalars: call open() first (no run is open)")
        if self._exitcode is None:
            self._pending.append((step, scalars))
        else:
            self._tell()

    def log_batch(self, events: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Add several events, ``(step, scalars)`` pairs in order, to the next batch (returns at once)."""
        if self._process is None or not self._opened:  # never opened, or closed: the child would drop it unsaid
            raise RuntimeError("ProcessTrackers.log_batch: call open() first (no run is open)")
        self._enqueue(check_events(events, "ProcessTrackers.log_batch"))

    def _enqueue(self, events: Iterable[tuple[int, dict[str, float]]]) -> None:
        """Add checked events to the next batch, which the flusher thread sends."""
        if self._exitcode is None:
            self._pending.extend(events)
        else:
            self._tell()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Queue hyperparameters for the trackers (after the events logged before)."""
        if self._process is None or not self._opened:  # never opened, or closed: the child would drop it unsaid
            raise RuntimeError("ProcessTrackers.log_hparams: call open() first (no run is open)")
        self._send("hparams", (check_hparams(hparams, "ProcessTrackers.log_hparams: hparams"),))

    def flush(self) -> None:
        """Send the waiting events and wait until the child has delivered everything logged so far.

        A no-op before :meth:`open` or after the tracking process ended (reported once by a
        :class:`TrackerWarning` when it died).
        """
        if self._process is not None and self._process.is_alive():
            self._ask("flush", ())
        elif self._lost():
            self._tell()

    def close(self) -> None:
        """Deliver everything queued and close the trackers' run; the process stays for the next :meth:`open`."""
        if self._process is not None and self._process.is_alive() and self._opened:
            self._ask("close", ())
        elif self._lost():
            self._tell()
        self._run_id, self._opened = "", False

    def shutdown(self) -> None:
        """Close the run and end the tracking process (also done when the interpreter exits)."""
        self.close()
        if self._process is None:
            return
        self._stop_flusher()
        if self._process.is_alive():
            self._send("shutdown", ())
        self._process.join(timeout=60)
        if self._process.is_alive():  # stuck in a tracker: it ignores SIGTERM, so end it for good
            self._process.kill()
            self._process.join()
        self._events.close()
        self._process = None
