"""Feeding experiment trackers: windowed means on the device, one host read per logging event."""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._ranks import all_sum, rank, union_of_keys, world_size
from .._state import TrainState
from .._tree import sample_count
from ..tracking._base import check_hparams, check_scalars
from ._accum import batch_size as default_batch_size
from ._accum import streams, window_open
from ._base import Metrics, Transform, layers
from ._eval import Eval

__all__ = ["TrackingState", "current_lr", "with_tracking"]


class TrackingState(NamedTuple):
    """The slot of :func:`with_tracking`: each tracker's run id ("" until its first event).

    Checkpointed with the rest of the state, so a resumed run logs into the same runs.
    """

    run_ids: tuple[str, ...]


def _lr_hparams(node: Any) -> Mapping[str, Any] | None:
    """``node.hparams`` if it holds a learning rate (``"lr"``), else None."""
    hparams = getattr(node, "hparams", None)
    return hparams if isinstance(hparams, Mapping) and "lr" in hparams else None


def _lr_path(opt_state: Any) -> tuple[int, ...] | None:
    """Where in an optimizer state (tuple indices) the last node with ``hparams["lr"]`` is; None if nowhere."""
    found: list[tuple[int, ...]] = []

    def visit(node: Any, path: tuple[int, ...]) -> None:
        if _lr_hparams(node) is not None:
            found.append(path)
        elif isinstance(node, tuple):
            for i, child in enumerate(node):
                visit(child, (*path, i))

    visit(opt_state, ())
    return found[-1] if found else None


def _hparams_at(opt_state: Any, path: tuple[int, ...]) -> Mapping[str, Any] | None:
    """The ``hparams`` holding ``"lr"`` at ``path`` in ``opt_state`` (tuple indices), or None if there is none."""
    node = opt_state
    for i in path:
        if not isinstance(node, tuple) or i >= len(node):
            return None
        node = node[i]
    return _lr_hparams(node)


def current_lr(opt_state: Any) -> float | None:
    """The learning rate an optimizer state last used (its ``hparams["lr"]``), if it has one.

    ``with_tracking`` logs it as ``lr``. The optimizer's state inside a ``chain`` is found too;
    an optimizer state without ``hparams["lr"]`` gives ``None``.

    >>> import torch, fnlight as fl
    >>> from fnlight.optim import adamw, chain, clip_by_global_norm, warmup_cosine
    >>> optimizer = chain(clip_by_global_norm(1.0), adamw(warmup_cosine(1e-2, 10, 90)))
    >>> state = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, optimizer).init()
    >>> fl.current_lr(state.opt_state)  # the warmup's value at update count 0
    0.0
    >>> fl.current_lr({"not": "an optimizer state"}) is None
    True
    """
    path = _lr_path(opt_state)
    hparams = None if path is None else _hparams_at(opt_state, path)
    return None if hparams is None else float(hparams["lr"])


class _Window:
    """Sums of 0-d metrics since the last logging event, kept on their devices (no host sync).

    Each metric is summed in its own dtype, at least float32 (a float32 ``add_`` costs about
    a third of one into float64 here): a float32 window mean is off by at most
    ``calls * 6e-8`` relative to the exact one, far below what a tracker's plot shows.
    """

    __slots__ = ("calls", "counts", "keys", "samples", "started", "sums", "updates")

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()
        self.sums: list[Tensor] = []
        self.calls = 0  # calls that added ``keys`` (all of them while ``counts`` is None)
        self.counts: dict[str, int] | None = None  # per-key counts, once the keys varied in the window
        self.restart()

    def restart(self) -> None:
        """Start the next window's samples and updates, its clock unset (the metrics restart at each read).

        The clock starts when the next step does (:meth:`Tracking.__call__`), so the time between
        folds, or before the first, is not counted as training time. Within a fold each logging
        event restarts the clock itself (:meth:`Tracking._emit`).
        """
        self.samples = 0
        self.updates = 0
        self.started: float | None = None

    def add(self, metrics: Metrics, samples: int, *, last: bool = False) -> None:
        """Add one call's metrics; ``last``: the window is read before the next step runs."""
        self.samples += samples
        keys = tuple(metrics)
        if keys == self.keys and self.counts is None:  # the common case: the same metrics as before
            for total, v in zip(self.sums, metrics.values()):
                total.add_(v.detach() if v.requires_grad else v)
            self.calls += 1
        elif not self.keys:  # the window's first call
            # read before the next step (every=1): the tensors as they are; else copies to add into
            try:
                self.sums = (
                    [v.detach() if v.requires_grad else v for v in metrics.values()]
                    if last
                    else [_copy(v) for v in metrics.values()]
                )
            except (AttributeError, TypeError, ValueError, RuntimeError):  # a metric that is not a tensor
                _check_metrics(metrics)
                raise
            self.keys, self.calls = keys, 1
        else:  # metrics that come and go (val/ on evaluation steps) are averaged over their own count
            _check_metrics(metrics)
            counts = self.counts if self.counts is not None else dict.fromkeys(self.keys, self.calls)
            current = dict(zip(self.keys, self.sums))
            for k, v in metrics.items():
                current[k] = current[k].add_(v.detach()) if k in current else _copy(v)
                counts[k] = counts.get(k, 0) + 1
            self.keys, self.sums, self.counts = tuple(current), list(current.values()), counts

    def read(self) -> dict[str, float]:
        """Means since the last read (one host transfer for all of them), then reset.

        Under data parallelism the sums, counts and samples are added over the ranks (one
        all-reduce per logging event, after a small one that checks the ranks have the same
        metric names), so the means are over every rank's batches.
        """
        keys, sums, calls, counts = self.keys, self.sums, self.calls, self.counts
        self.keys, self.sums, self.calls, self.counts = (), [], 0, None
        if any(s.dim() for s in sums):  # not a 0-d metric (a sum keeps its metric's shape): refused at the first event
            _check_metrics(dict(zip(keys, sums)))
        if counts is None and all(s.is_cpu for s in sums) and world_size() == 1:  # the common case, in one pass
            return {k: float(s) / calls for k, s in zip(keys, sums)}
        if counts is None:
            counts = dict.fromkeys(keys, calls)
        if world_size() > 1:
            names = _names_on_every_rank(keys)  # one order everywhere; a name some ranks lack is summed with 0 there
            mine = dict(zip(keys, sums))
            totals = all_sum(
                torch.tensor(
                    [
                        *(float(mine[k]) if k in mine else 0.0 for k in names),
                        *(float(counts.get(k, 0)) for k in names),
                        float(self.samples),
                    ],
                    dtype=torch.float64,
                )
            ).tolist()
            n = len(names)
            self.samples = int(totals[-1])
            means = {k: totals[i] / totals[n + i] for i, k in enumerate(names)}
            return {k: means[k] for k in (*keys, *names)}  # this rank's order first, as in one process
        if all(s.is_cpu for s in sums):  # reading a CPU scalar is no transfer
            return {k: float(s) / counts[k] for k, s in zip(keys, sums)}
        values = torch.stack([s.to(torch.float64).cpu() for s in sums]).tolist()
        return {k: v / counts[k] for k, v in zip(keys, values)}


def _names_on_every_rank(keys: tuple[str, ...]) -> list[str]:
    """The metric names of a logging window, the same list in the same order on every rank.

    The ranks' sorted names are compared by a checksum (one small all-reduce); only when they
    differ (metrics that depend on a rank's batches) are the names themselves gathered. Summed
    as they were, names in another order on some rank were added to the wrong ones, and
    another number of names aborted the job in the backend.
    """
    names = sorted(keys)
    marks = torch.zeros(world_size(), dtype=torch.float64)
    marks[rank()] = zlib.crc32("\0".join(names).encode())
    if len(set(all_sum(marks).tolist())) == 1:
        return names
    return union_of_keys(names)


def _check_metrics(metrics: Metrics) -> None:
    """Raise a ``TypeError`` naming the first metric that is not a 0-d tensor (after another error reading them)."""
    for name, value in metrics.items():
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"{type(value).__name__} {value!r}"
            raise TypeError(
                f"with_tracking: the step's metric {name!r} must be a 0-d tensor (a step returns (state, {{name: 0-d "
                f"tensor}})), got {got}; a transform of one's own returns e.g. torch.tensor(value) as a metric"
            )


def _typed(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _copy(v: Tensor) -> Tensor:
    """A running sum started from ``v``: its own tensor, in ``v``'s dtype or float32 if narrower."""
    return v.detach().to(torch.promote_types(v.dtype, torch.float32), copy=True)


class Tracking(Transform):
    """See :func:`with_tracking`."""

    name = "with_tracking"
    slot = "tracking"

    def __init__(
        self,
        inner: Any,
        *,
        trackers: tuple[Any, ...],
        every: int,
        hparams: dict[str, Any] | None,
        batch_size_fn: Any,
        close_on_finish: bool,
    ) -> None:
        super().__init__(inner)
        self.trackers, self.every, self.hparams, self.batch_size_fn = trackers, every, hparams, batch_size_fn
        self.close_on_finish = close_on_finish
        self._window = _Window()
        self._open: list[bool] = [False] * len(trackers)
        self._all_open = not trackers
        self._run_ids: tuple[str, ...] | None = None  # the ids of the open runs (rank 0), written into every state
        # streaming accumulation: a call that ends no window returns a micro-batch's metrics, and the call that
        # ends it the window's (its loss the window's mean): only the latter go into the logged means
        self._windowed = streams(inner)
        # an evaluation the fold's epoch-end flush runs is logged at once, at the update it follows
        self._eval_prefixes = tuple({t.prefix for t in layers(inner) if isinstance(t, Eval)})
        self._lr_kind: Any = None
        self._lr_at: tuple[int, ...] | None = None
        # the metrics of the last call inside an open window: an epoch-end flush that applies that window's update
        # reports them under its own (its loss), as the fold does for its observers
        self._open_metrics: Metrics = {}
        self._alone = True  # one process (no data parallelism): set when a fold's first step runs
        self._checked_names: frozenset[str] | None = None  # the last set of scalar names checked (see _send)
        self._slots: Any = None  # the last state's slots whose run ids were checked (see _record_run_ids)
        # fnlight's queueing trackers take a checked event as it is: no second check and copy per update
        self._logs = tuple(getattr(t, "_log_checked", None) or t.log_scalars for t in trackers)

    def init_slot(self, state: TrainState) -> TrackingState:
        return TrackingState(("",) * len(self.trackers))

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        before = int(state.step)
        window = self._window
        if window.started is None:  # the first step since the trackers last logged at a fold's end
            window.started = time.perf_counter()
            self._alone = world_size() == 1  # read once per fold: the process group does not change inside one
        new_state, metrics = self.inner(state, batch)
        if new_state.slots is not self._slots:  # else the slots checked last time: the run ids are in them
            new_state = self._record_run_ids(new_state)
        try:
            samples = self.batch_size_fn(batch)
        except TypeError:
            if self.batch_size_fn is not default_batch_size:  # the user's function failed: theirs to see
                raise
            samples = 0  # a batch whose size the default cannot tell: no samples/s
        if type(samples) is not int or samples < 0:
            samples = sample_count(samples, self.batch_size_fn, "with_tracking", _typed)
        step = int(new_state.step)
        if (
            step != before
            and self._alone
            and not window.keys
            and step % self.every == 0
            and not (self._windowed and window_open(new_state))
        ):
            # The common case, a logging event whose window is this call alone (every=1): its means are the
            # metrics themselves, read here, and logged in this one function instead of the window's add, read
            # and restart, _emit and _send (the general forms of what follows): right after a step, every
            # further Python call or attribute costs µs of cache misses (docs/tracking.md, "Cost").
            self._open_metrics = {}  # an update: no accumulation window is open
            scalars = {}
            try:
                for name, value in metrics.items():
                    if not value.is_cpu:  # a device's metrics are read in one transfer by the window instead
                        break
                    scalars[name] = float(value)
                else:
                    now = time.perf_counter()
                    elapsed = max(now - window.started, 1e-9)
                    updates = window.updates + step - before
                    scalars["throughput/steps_per_s"] = updates / elapsed
                    if samples or window.samples:
                        scalars["throughput/samples_per_s"] = (window.samples + samples) / elapsed
                    hparams = getattr(new_state.opt_state, "hparams", None) if self._lr_at == () else None
                    if type(hparams) is dict and "lr" in hparams:  # where _lr found it last time, at the root
                        scalars["lr"] = float(hparams["lr"])
                    elif (lr := self._lr(new_state.opt_state)) is not None:
                        scalars["lr"] = lr
                    scalars["epoch"] = float(int(new_state.data.epoch))
                    window.samples, window.updates, window.started = 0, 0, now  # the next window starts
                    if scalars.keys() != self._checked_names:  # the values are floats made here; the names the step's
                        _check_metrics(metrics)  # 0-d, as the window's read checks: not only once metrics come and go
                        check_scalars(scalars, "with_tracking")
                        self._checked_names = frozenset(scalars)
                    for log in self._logs:
                        log(step, scalars)
                    return new_state, metrics
            except (AttributeError, TypeError, ValueError, RuntimeError):  # a metric that is not a 0-d tensor
                _check_metrics(metrics)
                raise
        return self._observe(new_state, metrics, before, samples, step), metrics

    def _record_run_ids(self, state: TrainState) -> TrainState:
        """Open the runs at the first step, so their ids are in every later state; put them in a state from before."""
        if not self._all_open:
            state = self._open_runs(state)
        elif self._run_ids is not None and state.slots[self.slot].run_ids != self._run_ids:
            state = state.with_slot(self.slot, TrackingState(self._run_ids))
        if self._all_open:  # (on rank 0 the ids are in these slots now; other ranks record none)
            self._slots = state.slots
        return state

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        before = int(state.step)
        pending = self._windowed and window_open(state)  # a short accumulation window, which the flush applies or skips
        new_state, metrics = self.inner.flush(state)
        if int(new_state.step) == before and not pending:
            evaluated = metrics  # epoch-end work without an update is an evaluation's
        else:  # the epoch's short accumulation window was applied (or skipped): its metrics go into the window
            prefixes = self._eval_prefixes
            evaluated = {k: v for k, v in metrics.items() if k.startswith(prefixes)} if prefixes else {}
            update = {**self._open_metrics, **{k: v for k, v in metrics.items() if k not in evaluated}}
            new_state = self._observe(new_state, update, before, 0)
        if evaluated:  # logged now, at the update it describes
            new_state = self._send(new_state, int(new_state.step), {k: float(v) for k, v in evaluated.items()})
        return new_state, metrics

    def finish(self, state: TrainState) -> None:
        """Log what is left of the window and close the trackers (a later call reopens the same runs)."""
        try:
            if self._window.updates:
                self._emit(state, at_end=True)
            self._window.restart()
            if self.close_on_finish:
                self.close()
        finally:  # a tracker failing here must not keep the inner chain from finishing
            self.inner.finish(state)

    def abort(self) -> None:
        """The fold stopped on an error: close the runs (what was logged is kept), then abort the inner chain.

        The window gathered since the last logging event is dropped, and the next step opens
        runs from its state's run ids: a fresh state (``step.init()``) starts new runs
        instead of joining the failed one; a state that holds its run ids continues them.
        """
        self._window = _Window()
        self._open_metrics = {}
        try:
            self.close()  # (the next step reopens the runs and records the ids they give)
        finally:
            super().abort()

    def close(self) -> None:
        """Close every open tracker run (the next logging event reopens them with the state's run ids).

        Every tracker is closed even if one's ``close`` raises; the first such error is raised after.
        """
        failure: Exception | None = None
        for i, tracker in enumerate(self.trackers):
            if self._open[i]:
                self._open[i] = False
                try:
                    tracker.close()
                except Exception as e:  # re-raised below, once the others are closed
                    failure = failure or e
        self._all_open = not self.trackers
        self._slots = None  # the next step reopens the runs
        if failure is not None:
            raise failure

    def _observe(self, state: TrainState, metrics: Metrics, before: int, samples: int, step: int | None = None) -> TrainState:
        if step is None:
            step = int(state.step)
        if self._windowed and window_open(state):  # a micro-batch inside an accumulation window
            self._window.samples += samples
            self._open_metrics = metrics
            return state
        self._open_metrics = {}
        window = self._window
        window.add(metrics, samples, last=step != before and step % self.every == 0)
        if step == before:
            return state
        window.updates += step - before
        if step % self.every:
            return state
        return self._emit(state, step)

    def _emit(
        self, state: TrainState, step: int | None = None, scalars: dict[str, float] | None = None, *, at_end: bool = False
    ) -> TrainState:
        """Log the window's means (or ``scalars``, the means already read) with throughput, ``lr`` and ``epoch``."""
        window = self._window
        if scalars is None:
            scalars = window.read()
        now = time.perf_counter()
        if window.started is not None and window.updates:
            elapsed = max(now - window.started, 1e-9)
            scalars["throughput/steps_per_s"] = window.updates / elapsed
            if window.samples:
                scalars["throughput/samples_per_s"] = window.samples / elapsed
        opt_state = state.opt_state
        hparams = getattr(opt_state, "hparams", None) if self._lr_at == () else None
        if type(hparams) is dict and "lr" in hparams:  # where _lr found it last time, at the root: read it directly
            scalars["lr"] = float(hparams["lr"])
        elif (lr := self._lr(opt_state)) is not None:
            scalars["lr"] = lr
        epoch = int(state.data.epoch)
        if at_end and epoch and not int(state.data.batch):  # the fold has moved past the epoch of these updates
            epoch -= 1
        scalars["epoch"] = float(epoch)
        window.samples, window.updates, window.started = 0, 0, now  # the next window starts (restart, inline)
        return self._send(state, int(state.step) if step is None else step, scalars)

    def _send(self, state: TrainState, step: int, scalars: dict[str, float]) -> TrainState:
        """Log ``scalars`` at ``step`` to every tracker, opening their runs first if needed."""
        if not self._alone and rank() != 0:  # rank 0 writes for everyone (the means are over all ranks)
            return state
        if not self._all_open:
            state = self._open_runs(state)
        if scalars.keys() != self._checked_names:  # the values are floats made here; the names are the step's
            check_scalars(scalars, "with_tracking")
            self._checked_names = frozenset(scalars)
        for log in self._logs:
            log(step, scalars)
        return state

    def _open_runs(self, state: TrainState) -> TrainState:
        """Open the trackers' runs (rank 0 only) with the state's run ids; record the ids they give in the state."""
        if rank() != 0:  # rank 0 writes for everyone
            self._all_open = True
            return state
        run_ids = list(state.slots[self.slot].run_ids)
        for i, tracker in enumerate(self.trackers):
            if not self._open[i]:
                run_ids[i] = tracker.open(run_ids[i], hparams=self.hparams)
                self._open[i] = True
        self._all_open = True
        self._run_ids = tuple(run_ids)
        if self._run_ids != state.slots[self.slot].run_ids:
            state = state.with_slot(self.slot, TrackingState(self._run_ids))
        return state

    def _lr(self, opt_state: Any) -> float | None:
        """:func:`current_lr`, following the path found in the first state with this structure."""
        kind = type(opt_state), len(opt_state) if isinstance(opt_state, tuple) else -1
        if kind != self._lr_kind:
            self._lr_kind, self._lr_at = kind, _lr_path(opt_state)
        if self._lr_at is None:
            return None
        hparams = _hparams_at(opt_state, self._lr_at)
        if hparams is None:  # another structure of the same type: look again
            self._lr_kind = None
            return current_lr(opt_state)
        return float(hparams["lr"])


def with_tracking(
    step: Any,
    *,
    trackers: Sequence[Any],
    every: int = 50,
    hparams: Mapping[str, Any] | None = None,
    batch_size_fn: Any = default_batch_size,
    close_on_finish: bool = True,
) -> Tracking:
    """Log the step's metrics to experiment trackers every N optimizer updates.

    Each call adds its metrics to a window kept on the device (no host sync); every
    ``every`` updates the window's means are read in one transfer and sent to each
    tracker, with ``lr`` (from the optimizer state), ``epoch``, and throughput
    (``throughput/steps_per_s``, ``throughput/samples_per_s``). The step recorded is the
    optimizer-update count. Metrics that appear only on some steps (``val/...`` from
    :func:`with_eval`) are averaged over the steps that had them; an epoch-end evaluation
    is logged at once, at the update it follows. Under streaming accumulation a window
    averages the metrics of its updates (the calls that end an accumulation window), not
    of its micro-batches. Throughput is timed from a fold's first step. At the end of a
    fold the rest of the window is logged and the trackers are closed.

    Each tracker's run id is kept in ``state.slots["tracking"]``: a run resumed from a
    checkpoint reopens the same tracker runs. Trackers: see :mod:`fnlight.tracking`
    (aim on an embedded repository, CSV/JSONL files; slow trackers run off the training
    thread there).

    Args:
        step: the step to wrap (after with_early_stop, before with_checkpointing).
        trackers: objects with ``open(run_id, *, hparams) -> run_id``, ``log_scalars(step,
            scalars)``, ``log_hparams(hparams)`` and ``close()``.
        every: log every N optimizer updates.
        hparams: hyperparameters recorded when each run opens (checked now: dicts with
            str keys, lists, and None/bool/int/float/str values).
        batch_size_fn: samples in a batch, for ``throughput/samples_per_s``.
        close_on_finish: close the tracker runs when a fold ends (``False`` keeps them open
            across folds — several folds of one run — until ``step.close()``).

    Returns:
        The wrapped step.

    Raises:
        ValueError, TypeError: bad options or a wrong composition order; when called,
            ``batch_size_fn`` returning something other than a number >= 0 (a tensor, a
            negative count).

    >>> import tempfile, torch, fnlight as fl
    >>> from fnlight.tracking import JSONLTracker, read_scalars
    >>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(4)]
    >>> step = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> with tempfile.TemporaryDirectory() as log_dir:
    ...     tracked = fl.with_tracking(step, trackers=[JSONLTracker(log_dir)], every=2)
    ...     state = fl.fold(tracked, tracked.init(), data, progress=False)
    ...     curves = read_scalars(f"{log_dir}/{state.slots['tracking'].run_ids[0]}.jsonl")
    >>> [s for s, _ in curves["loss"]]  # optimizer-update counts
    [2, 4]
    """
    where = "with_tracking"
    if isinstance(trackers, (str, bytes)) or not isinstance(trackers, Sequence):
        raise TypeError(f"{where}: trackers must be a list of trackers (e.g. [AimTracker(...)]), got {trackers!r}")
    trackers = tuple(trackers)
    for t in trackers:
        if not all(callable(getattr(t, m, None)) for m in ("open", "log_scalars", "close")):
            raise TypeError(f"{where}: each tracker needs open(), log_scalars() and close(); got {type(t).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{where}: every must be an int >= 1, got {every!r}")
    if hparams is not None:
        hparams = check_hparams(hparams, f"{where}: hparams")  # what every tracker can record, checked now
    if not callable(batch_size_fn):
        raise TypeError(f"{where}: batch_size_fn must be callable batch -> number of samples, got {batch_size_fn!r}")
    if not isinstance(close_on_finish, bool):
        raise TypeError(f"{where}: close_on_finish must be a bool, got {close_on_finish!r}")
    return Tracking(
        step,
        trackers=trackers,
        every=every,
        hparams=hparams or None,
        batch_size_fn=batch_size_fn,
        close_on_finish=close_on_finish,
    )
