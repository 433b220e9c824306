"""Several trackers as one: fanned out on a background thread, each isolated from the others' failures."""

from __future__ import annotations

import atexit
import collections
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ._aim import AimTracker
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
from ._files import JSONLTracker

__all__ = ["Trackers", "default_trackers"]

logger = logging.getLogger("fnlight.tracking")

_OPEN: weakref.WeakSet[Trackers] = weakref.WeakSet()


def _close_open_trackers() -> None:
    """At interpreter exit, drain and close every Trackers still open (a forgotten ``close()``)."""
    for trackers in list(_OPEN):
        trackers.close()


class Trackers:
    """Several trackers as one tracker: fanned out, run on a background thread, each failure isolated.

    Every call goes to each tracker in order. With ``background=True`` (the default) the calls
    run on one worker thread, so :meth:`log_scalars` costs the caller a few µs whatever the
    trackers do (aim's ``Run.track`` takes ~0.5 ms per event), and events reach each tracker in
    the order they were logged. Events are handed to the worker in batches, once ``flush_every``
    seconds have passed since the last batch (the worker also takes what waits when it has
    been idle that long), so it wakes twice a second rather than on every update and competes
    less with training for Python's interpreter lock; a tracker with a ``log_batch`` method
    (the built-in ones) gets each batch in one call and writes it at once. :meth:`open` waits for the trackers to
    open (it must return the run id); :meth:`flush` waits until everything logged so far has
    been delivered; :meth:`close` waits until every event has been delivered and every tracker
    closed. The caller waits in :meth:`log_scalars` only when ``max_queue`` batches are pending
    (the trackers are persistently slower than training).

    **Failure isolation.** A tracker that raises (disk full, aim repository locked, a bug) is
    disabled for the rest of the run and reported once with a :class:`TrackerWarning` naming it
    and its error, on the caller's thread at its next call; training and the other trackers
    go on. The next :meth:`open` enables every tracker again. Bad arguments (a negative step,
    a non-numeric value) raise at once on the caller's thread, before anything is queued.

    **One run id.** For a new run the first tracker that opens chooses the id and the others
    open that same id (the file trackers create ``<run_id>.jsonl``), so one id names the run
    everywhere and ``open(run_id)`` continues it in every tracker. An :class:`AimTracker`
    (whose ids are aim's hashes) must therefore come first.

    Trackers is itself a :class:`Tracker`; nested ``Trackers`` are flattened. A ``Trackers``
    still open at interpreter exit is drained and closed. It can be used as a context manager
    (closed on exit).

    Args:
        *trackers: the trackers to feed (any objects with the :class:`Tracker` methods).
        background: run the trackers on a worker thread (``False``: call them inline).
        max_queue: how many messages (batches of events, or other calls) may wait for the
            worker before the caller blocks.
        flush_every: with ``background``, the most seconds an event waits before it is handed
            to the worker (default 0.5).

    Raises:
        TypeError: an argument is not a tracker, or ``flush_every`` is not a number.
        ValueError: an :class:`AimTracker` is not first, ``max_queue < 1``, or ``flush_every``
            is not a finite number above 0.

    >>> import tempfile
    >>> from fnlight.tracking import CSVTracker, JSONLTracker, Trackers, read_scalars
    >>> with tempfile.TemporaryDirectory() as d:
    ...     trackers = Trackers(JSONLTracker(d), CSVTracker(d))
    ...     run_id = trackers.open(hparams={"lr": 0.1})
    ...     for step in range(1, 4):
    ...         trackers.log_scalars(step, {"loss": 1 / step})
    ...     trackers.close()
    ...     read_scalars(f"{d}/{run_id}.jsonl") == read_scalars(f"{d}/{run_id}.csv")
    True
    """

    def __init__(self, *trackers: Tracker, background: bool = True, max_queue: int = 10_000, flush_every: float = 0.5) -> None:
        flat: list[Tracker] = []
        for t in trackers:
            if isinstance(t, Trackers):
                flat.extend(t.trackers)
            elif isinstance(t, Tracker):
                flat.append(t)
            else:
                raise TypeError(
                    f"Trackers takes trackers (objects with open, log_scalars, log_hparams and close methods), "
                    f"got {type(t).__name__}: {t!r}"
                )
        for t in flat[1:]:
            if getattr(t, "_generates_run_ids", False):
                raise ValueError(
                    f"{t!r} must be the first tracker: its run ids are chosen by its backend (aim's run hashes) and "
                    f"cannot be given to it, so it has to choose the run id the other trackers then use; "
                    f"pass it first, e.g. Trackers(aim_tracker, JSONLTracker(dir)), and at most one such tracker"
                )
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"Trackers: max_queue must be an int >= 1, got {max_queue!r}")
        self.flush_every = check_flush_every(flush_every, "Trackers")
        self.trackers: tuple[Tracker, ...] = tuple(flat)
        self.background = bool(background)
        self.max_queue = max_queue
        self._active = [True] * len(flat)
        self._failures: collections.deque[tuple[Tracker, str, BaseException]] = collections.deque()
        self._queue: queue.Queue[tuple[str, tuple[Any, ...], Future[Any] | None]] | None = None
        self._thread: threading.Thread | None = None
        self._run_id = ""
        self._is_open = False
        self._lock = threading.Lock()  # orders the batches and other messages put on the queue
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._last_sent = 0.0

    def __getstate__(self) -> dict[str, Any]:
        if self._is_open:
            raise TypeError(f"{self!r} has an open run and cannot be pickled; close it first")
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.trackers)
        return f"Trackers({inner}{'' if self.background else ', background=False'})"

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def run_id(self) -> str:
        """The id of the open run ("" when none is open, or no tracker could open)."""
        return self._run_id if self._is_open else ""

    def open(self, run_id: str = "", *, hparams: Mapping[str, Any] | None = None) -> str:
        """Open a run in every tracker (waiting for them); return its id.

        Returns:
            The run id: chosen by the first tracker that opens for a new run, else ``run_id``.

        Raises:
            RuntimeError: a run is already open.
        """
        if self._is_open:
            raise RuntimeError(f"{self!r} already has run {self._run_id!r} open: close() it before opening another")
        run_id = check_run_id(run_id, "Trackers.open")
        hparams = None if hparams is None else check_hparams(hparams, "Trackers.open: hparams")
        self._active = [True] * len(self.trackers)
        if self.background:
            self._queue = queue.Queue(self.max_queue)
            self._thread = threading.Thread(target=self._work, name="fnlight-trackers", daemon=True)
            self._thread.start()
        self._run_id = self._call("open", (run_id, hparams), wait=True)
        self._is_open = True
        _OPEN.add(self)
        atexit.unregister(_close_open_trackers)  # re-registered last, so it runs before aim's own exit cleanup
        atexit.register(_close_open_trackers)
        return self._run_id

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Queue (or, without background, deliver) one event: ``scalars`` at ``step``."""
        args = (check_step(step, "Trackers.log_scalars"), check_scalars(scalars, "Trackers.log_scalars"))
        self._require_open()
        if self._queue is None:
            self._call("log_scalars", args, wait=False)
            return
        self._enqueue((args,))
        if self._failures:
            self._report()

    def _log_checked(self, step: int, scalars: dict[str, float]) -> None:
        """:meth:`log_scalars` of an event already checked (an int step, a ``{str: float}`` dict it may keep).

        Its own body rather than a call from :meth:`log_scalars`, so that a tracker's failure is
        reported at the caller's line (the warnings' ``stacklevel``) from both.
        """
        self._require_open()
        if self._queue is None:
            self._call("log_scalars", (step, scalars), wait=False)
            return
        self._enqueue(((step, scalars),))
        if self._failures:
            self._report()

    def log_batch(self, events: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Queue (or, without background, deliver) several events, ``(step, scalars)`` pairs, in order.

        Each tracker gets them in one ``log_batch`` call when it has that method (one write
        for the batch), else one :meth:`log_scalars` call per event.
        """
        events = check_events(events, "Trackers.log_batch")
        self._require_open()
        if self._queue is None:
            self._deliver(events)
        else:
            self._enqueue(events)
        if self._failures:
            self._report()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Queue (or deliver) hyperparameters for every tracker."""
        args = (check_hparams(hparams, "Trackers.log_hparams: hparams"),)
        self._require_open()
        self._call("log_hparams", args, wait=False)

    def flush(self) -> None:
        """Wait until every event logged so far has been delivered to every tracker.

        A no-op without a background worker (events are delivered during the call) or
        without an open run.
        """
        if self._queue is None or not self._is_open:
            return
        self._call("_sync", (), wait=True)

    def close(self) -> None:
        """Deliver every queued event, close every tracker, stop the worker; report failures."""
        if not self._is_open:
            return
        _OPEN.discard(self)
        try:
            self._call("close", (), wait=True)
            if self._thread is not None:
                self._thread.join()
        finally:
            self._is_open, self._queue, self._thread = False, None, None

    def _require_open(self) -> None:
        if not self._is_open:
            raise RuntimeError(f"{self!r} has no open run: call open() first")

    def _call(self, method: str, args: tuple[Any, ...], *, wait: bool) -> Any:
        if self._queue is None:
            result = self._fan_out(method, args)
        else:
            done: Future[Any] | None = Future() if wait else None
            with self._lock:  # after the events logged before it
                self._put_pending()
                self._queue.put((method, args, done))
            result = None if done is None else done.result()
        if self._failures:
            self._report()
        return result

    def _enqueue(self, events: Iterable[tuple[int, dict[str, float]]]) -> None:
        """Add checked events to the next batch; hand it to the worker once ``flush_every`` has passed."""
        with self._lock:
            self._pending.extend(events)
            if time.monotonic() - self._last_sent >= self.flush_every:
                self._put_pending()

    def _put_pending(self) -> None:
        """Hand the waiting events to the worker as one message (the caller holds the lock)."""
        assert self._queue is not None
        if self._pending:
            self._queue.put(("_logs", (self._pending,), None))
            self._pending = []
        self._last_sent = time.monotonic()

    def _work(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            try:
                method, args, done = q.get(timeout=self.flush_every)
            except queue.Empty:  # idle for flush_every: take what waits (nothing older is queued)
                with self._lock:
                    batch, self._pending = self._pending, []
                    if batch:
                        self._last_sent = time.monotonic()
                if batch:
                    self._deliver(batch)
                continue
            if method == "_logs":
                self._deliver(args[0])
                result = None
            else:
                result = None if method == "_sync" else self._fan_out(method, args)
            if done is not None:
                done.set_result(result)
            if method == "close":
                return

    def _fan_out(self, method: str, args: tuple[Any, ...]) -> Any:
        """Call ``method`` on every enabled tracker; never raises (failures are recorded)."""
        if method == "open":
            run_id, hparams = args
            for i, t in enumerate(self.trackers):
                try:
                    opened = t.open(run_id, hparams=hparams)
                except Exception as e:
                    self._fail(i, method, e)
                    continue
                run_id = run_id or opened
            return run_id
        for i, t in enumerate(self.trackers):
            if self._active[i]:
                try:
                    getattr(t, method)(*args)
                except Exception as e:
                    self._fail(i, method, e)
        return None

    def _deliver(self, events: list[tuple[int, dict[str, float]]]) -> None:
        """Give a batch of events to every enabled tracker: ``log_batch`` when it has one; never raises."""
        for i, t in enumerate(self.trackers):
            if not self._active[i]:
                continue
            log_batch = getattr(t, "log_batch", None)
            try:
                if callable(log_batch):
                    log_batch(events)
                else:
                    for step, scalars in events:
                        t.log_scalars(step, scalars)
            except Exception as e:
                self._fail(i, "log_batch" if callable(log_batch) else "log_scalars", e)

    def _fail(self, i: int, method: str, error: Exception) -> None:
        tracker = self.trackers[i]
        self._active[i] = False
        logger.debug("tracker %r failed in %s()", tracker, method, exc_info=error)
        self._failures.append((tracker, method, error))
        if method != "close":
            try:
                tracker.close()
            except Exception:
                pass

    def _report(self) -> None:
        while self._failures:
            tracker, method, error = self._failures.popleft()
            warnings.warn(
                f"tracker {tracker!r} raised in {method}() and is disabled for the rest of this run "
                f"(training and the other trackers go on): {type(error).__name__}: {error}",
                TrackerWarning,
                stacklevel=4,
            )


def default_trackers(directory: str | os.PathLike[str], *, experiment: str | None = None, aim: bool | None = None) -> Trackers:
    """The default trackers: aim (when importable) and JSONL, on a background thread, in one directory.

    The aim repository is ``<directory>/.aim`` (see it with ``aim up --repo <directory>``); the
    JSONL file of a run is ``<directory>/<run_id>.jsonl``, named by the aim run hash when aim is
    used, and its hyperparameters ``<directory>/<run_id>.hparams.json``.

    Args:
        directory: where the runs go (created on the first ``open``).
        experiment: the aim experiment of new runs.
        aim: ``None``: use aim when it can be imported; ``True``: require it; ``False``: JSONL only.

    Returns:
        ``Trackers(AimTracker(directory, experiment=experiment), JSONLTracker(directory))``, or
        ``Trackers(JSONLTracker(directory))`` without aim.

    Raises:
        ImportError: ``aim=True`` and aim cannot be imported.

    >>> default_trackers("runs", aim=False)  # nothing is created before open()
    Trackers(JSONLTracker('runs'))
    """
    if aim not in (None, True, False):
        raise TypeError(f"aim must be None (when importable), True or False, got {aim!r}")
    directory = Path(directory)
    trackers: list[Tracker] = []
    if aim is not False:
        try:
            trackers.append(AimTracker(directory, experiment=experiment))
        except ImportError:
            if aim:
                raise
            logger.info("aim is not installed: tracking to JSONL only (pip install aim for the aim UI)")
    trackers.append(JSONLTracker(directory))
    return Trackers(*trackers)
