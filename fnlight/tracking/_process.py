"""Trackers in a separate process: the training process pays a queue put per event, and no GIL time."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from ._base import Tracker, TrackerWarning, check_hparams, check_run_id, check_scalars, check_step
from ._trackers import Trackers

__all__ = ["ProcessTrackers"]

_LIVE: weakref.WeakSet[ProcessTrackers] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for trackers in list(_LIVE):
        trackers.shutdown()


def _serve(trackers: tuple[Tracker, ...], events: Any, replies: Any) -> None:
    """The tracking process: apply events in order; answer ``open`` and ``close``."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # TrackerWarning reports go to this process's stderr
        inline = Trackers(*trackers, background=False)
        while True:
            kind, args = events.get()
            try:
                if kind == "open":
                    replies.send(("ok", inline.open(args[0], hparams=args[1])))
                elif kind == "log":
                    inline.log_scalars(*args)
                elif kind == "hparams":
                    inline.log_hparams(args[0])
                elif kind == "close":
                    inline.close()
                    replies.send(("ok", None))
                elif kind == "shutdown":
                    inline.close()
                    return
            except Exception as e:  # reported to the caller at its next open/close
                if kind in ("open", "close"):
                    replies.send(("error", f"{type(e).__name__}: {e}"))


class ProcessTrackers:
    """Several trackers fed from a separate process: logging costs the training loop a queue put.

    :class:`Trackers` runs trackers on a thread, which still competes with training for
    Python's interpreter lock: aim's ``Run.track`` is Python work (~0.6 ms per 6-scalar
    event here), so logging every update slowed a 0.7 ms step by 10-13 %. Here the trackers
    run in a child process (started on the first :meth:`open`, with the ``spawn`` method so
    no lock or thread of the training process is inherited); the caller pickles each event
    onto a queue (a few µs) and is never blocked by a tracker. Failure isolation is
    :class:`Trackers`' (in the child). The trackers are pickled into the child when it
    starts, so they must be picklable before they are opened (the bundled ones are).

    :meth:`close` ends the run but keeps the process for the next :meth:`open` (a fold closes
    its trackers when it ends); :meth:`shutdown` ends the process, as interpreter exit does.

    The child is started with the ``spawn`` method, which imports the main script again:
    a script that trains at import time must keep its training code under
    ``if __name__ == "__main__":`` (Python's multiprocessing rule; otherwise :meth:`open`
    raises a ``RuntimeError`` saying so).

    Costs: starting the child (importing torch, fnlight and the trackers' libraries) takes
    about as long as importing them here, and its memory is that of a second Python process
    with those libraries.

    Args:
        *trackers: the trackers to run in the child process.

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

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = Trackers(*trackers, background=False).trackers  # validates and flattens
        self._process: multiprocessing.process.BaseProcess | None = None
        self._events: Any = None
        self._replies: Any = None
        self._run_id = ""

    def __repr__(self) -> str:
        return f"ProcessTrackers({', '.join(repr(t) for t in self.trackers)})"

    @property
    def run_id(self) -> str:
        """The id of the open run ("" when none is open)."""
        return self._run_id

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._events = context.Queue()
        self._replies, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve, args=(self.trackers, self._events, child_end), name="fnlight-trackers", daemon=True
        )
        self._process.start()
        child_end.close()
        _LIVE.add(self)

    def _ask(self, kind: str, args: tuple[Any, ...]) -> Any:
        self._events.put((kind, args))
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
        """Start the tracking process if needed and open a run in every tracker; return its id."""
        run_id = check_run_id(run_id)
        hparams = None if hparams is None else check_hparams(hparams)
        if self._process is None or not self._process.is_alive():
            self._start()
        self._run_id = self._ask("open", (run_id, hparams)) or run_id
        return self._run_id

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Queue one event for the trackers (returns at once)."""
        if self._process is None:
            raise RuntimeError("ProcessTrackers.log_scalars: call open() first")
        self._events.put(("log", (check_step(step), check_scalars(scalars))))

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Queue hyperparameters for the trackers."""
        if self._process is None:
            raise RuntimeError("ProcessTrackers.log_hparams: call open() first")
        self._events.put(("hparams", (check_hparams(hparams),)))

    def close(self) -> None:
        """Deliver everything queued and close the trackers' run; the process stays for the next :meth:`open`."""
        if self._process is not None and self._process.is_alive() and self._run_id:
            self._ask("close", ())
        self._run_id = ""

    def shutdown(self) -> None:
        """Close the run and end the tracking process (also done when the interpreter exits)."""
        self.close()
        if self._process is None:
            return
        if self._process.is_alive():
            self._events.put(("shutdown", ()))
        self._process.join(timeout=60)
        self._events.close()
        self._process = None
