"""The loop: ``fold`` (a reduce of a step over batches), observers, and ``evaluate``."""

from __future__ import annotations

import itertools
import reprlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._bind import full_tensors
from ._donation import check_live, donating, mark_donated, unshare_lent
from ._progress import Progress
from ._ranks import all_sum, collective, rank, union_of_keys, world_size
from ._rng import cuda_devices, eval_seed, evaluating, generators_kept, held_generators
from ._signals import Preempted, SignalWatch, preempt
from ._state import NAMESPACE, TrainState
from ._step import EvalStep, Step
from ._summary import print_summary
from ._tree import leading_size, sample_count, tree_clone

__all__ = ["Observer", "evaluate", "every", "fold"]

Data = Iterable[Any] | Callable[[int], Iterable[Any]]


class Observer:
    """A callback ``fn(state, metrics)`` that the fold runs every ``steps`` updates and/or ``seconds``.

    The state it receives is valid during the call only: inside the fold the next step
    updates its tensors in place. Clone what you keep (:func:`fnlight.tree_clone`).
    ``at_end`` also runs it once after the last step.
    """

    def __init__(
        self,
        fn: Callable[[TrainState, dict[str, Tensor]], None],
        *,
        steps: int | None = None,
        seconds: float | None = None,
        at_end: bool = True,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"Observer: fn must be callable (state, metrics) -> None, got {fn!r}")
        if steps is None and seconds is None:
            raise ValueError("Observer: give steps=N (optimizer updates) and/or seconds=T")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"Observer: steps must be a positive int, got {steps!r}")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0):
            raise ValueError(f"Observer: seconds must be a positive number, got {seconds!r}")
        if not isinstance(at_end, bool):
            raise TypeError(f"Observer: at_end must be a bool, got {at_end!r}")
        self.fn, self.steps, self.seconds, self.at_end = fn, steps, seconds, at_end
        self._last_step = -1
        self._last_time = 0.0

    def _start(self, step: int) -> None:
        self._last_step = step
        self._last_time = time.monotonic()

    def _maybe(self, state: TrainState, metrics: dict[str, Tensor], step: int) -> None:
        due = self.steps is not None and step // self.steps > self._last_step // self.steps
        if not due and self.seconds is not None:
            due = time.monotonic() - self._last_time >= self.seconds and step != self._last_step
        if due:
            self._last_step, self._last_time = step, time.monotonic()
            self.fn(state, metrics)

    def _end(self, state: TrainState, metrics: dict[str, Tensor], step: int) -> None:
        if self.at_end and metrics and step != self._last_step:
            self._last_step = step
            self.fn(state, metrics)


def every(
    steps: int | None = None, *, seconds: float | None = None, at_end: bool = True
) -> Callable[[Callable[..., None]], Observer]:
    """Decorator form of :class:`Observer`.

    Raises:
        TypeError: used bare (``@fl.every`` instead of ``@fl.every(N)``); the decorated function's
            options are checked as :class:`Observer` checks them.

    >>> import fnlight as fl
    >>> @fl.every(100)
    ... def show(state, metrics):
    ...     print(int(state.step), float(metrics["loss"]))
    >>> isinstance(show, fl.Observer)
    True
    """
    if callable(steps):  # @fl.every without its arguments: the function would be replaced by the decorator
        raise TypeError(
            f"every: steps must be a positive int, got the function {getattr(steps, '__name__', steps)!r}; "
            "write @fl.every(N) or @fl.every(seconds=T), not a bare @fl.every"
        )
    return lambda fn: Observer(fn, steps=steps, seconds=seconds, at_end=at_end)


def _positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"fold: {name} must be a positive int or None, got {value!r}")


def _epoch_iterable(data: Data, epoch: int) -> Iterable[Any]:
    return data(epoch) if callable(data) and not hasattr(data, "__iter__") else data  # type: ignore[operator]


def _total(step: Step, data: Data, epochs: int | None, max_steps: int | None) -> int | None:
    """The updates the fold will make at most, for the progress display: the nearer of the two bounds it knows."""
    by_epochs = None
    if epochs is not None and hasattr(data, "__len__"):
        per_epoch = len(data)  # type: ignore[arg-type]
        updates_per = getattr(step, "updates_per", None)
        by_epochs = epochs * (updates_per(per_epoch) if updates_per else per_epoch)
    if max_steps is None:
        return by_epochs
    return max_steps if by_epochs is None else min(max_steps, by_epochs)


def fold(
    step: Step,
    state: TrainState,
    data: Data,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    observers: Sequence[Observer] = (),
    progress: bool | None = None,
    donate: bool | str = False,
    handle_signals: bool = True,
    summary: bool | None = None,
) -> TrainState:
    """Run ``step`` over ``data``: ``state = step(state, batch)`` for every batch of every epoch.

    The fold owns its intermediate states and updates them in place (donation), so a
    step costs what a hand-written loop costs. The input ``state`` is left untouched
    (the fold works on a copy) unless ``donate=True``, which hands its tensors to the
    fold to save one copy of the state's memory; the donated state cannot be used again.
    A state from ``step.init()`` shares the model's tensors: ``donate=True`` copies those
    once, so the model and other states from ``init()`` stay as they were, while
    ``donate="model"`` gives the model's tensors up as well. The fold then trains them in
    place, as a hand-written torch loop trains ``model``, with no copy at all. The model,
    and any other state made from it, change with the fold (where the state holds the
    model's tensors: ensembles, ``with_amp(mode="true")``, and ``with_ddp``/``with_fsdp`` on
    more than one rank make their own copies in ``init``). A state made from another without a fold shares
    with it every tensor it did not change: a direct step call's result (the parameters and
    optimizer state when the call made no update: inside an accumulation window, a skipped
    update), ``fl.load_state_dict``'s (the optimizer state), ``update_bn``'s, ``replace``'s.
    Donating such a state hands those over too, so copy it first (``fl.tree_clone``) if you
    keep the other.

    Resuming is built in: the fold starts at ``state.data`` (epoch, batch offset) and
    counts ``epochs`` and ``max_steps`` from zero, so a resumed state runs only what is left.

    Args:
        step: a step (``make_train_step(...)`` or a transform of one).
        state: the state to start from.
        data: a :class:`fnlight.Loader` (resumes mid-epoch without replaying batches), a
            re-iterable of batches (a list, a ``DataLoader``...; a resumed epoch skips
            the batches already seen by iterating past them), or a function
            ``epoch -> iterable`` (for per-epoch shuffling).
        epochs: the total number of epochs (default 1 if ``max_steps`` is not given either).
        max_steps: stop once ``state.step`` (optimizer updates) reaches this. When the
            update that reaches it comes from an epoch's last batch (data with a length),
            the epoch still ends as usual: the step's epoch-end work (``flush``: an
            evaluation at epoch end, say) runs and the position moves to the next epoch.
        observers: :class:`Observer` callbacks run every N updates or T seconds.
        progress: show a progress bar; ``None`` shows it when stderr is a terminal.
        donate: ``True`` lets the fold update ``state``'s own tensors; ``"model"`` also
            the model's that ``state`` shares (see above); ``False`` (default) works on a copy.
        summary: print the model summary (:func:`fnlight.print_summary`) first; ``None``
            prints it when the progress bar is shown.
        handle_signals: on SIGTERM or SIGINT (main thread only), finish the current step,
            save through ``with_checkpointing`` if the step has it, and raise
            :class:`fnlight.Preempted` (a ``SystemExit``); a second Ctrl-C aborts at once.
            Under ``with_ddp``/``with_fsdp`` on several ranks, every rank stops after the
            same update when any of them is signalled: the next update's all-reduce
            carries the news (on GPUs it is read one update later, so no update waits),
            and a rank with ``handle_signals=False`` stops with the others. A fold run inside
            another (by an observer, say) leaves signals to the outer fold, which stops after
            its current step.

    Returns:
        The final state. The fold also stops early when ``state.stop`` becomes true.

    Raises:
        ValueError: ``epochs``/``max_steps`` are not positive ints, ``donate`` is not
            ``True``, ``False`` or ``"model"``, ``data`` is a
            one-shot iterator while more than one epoch is asked for, an epoch yields
            no batches (raised when it ends; otherwise a fold bounded by ``max_steps``
            alone would never end), or a resumed ``state.data.batch`` is past the number
            of batches of data with a length.
        TypeError: ``step`` is not callable or is an eval step, or a call of it returns something other
            than ``(state, metrics)``; ``state``, ``data`` or an option of the wrong type.
        DonatedStateError: ``state`` was donated before.

    >>> import torch, fnlight as fl
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> data = [(torch.ones(4, 3), torch.zeros(4, 1))] * 5
    >>> state = fl.fold(step, step.init(), data, epochs=2, progress=False)
    >>> int(state.step), int(state.data.epoch)
    (10, 2)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"fold: expected a fnlight.TrainState, got {type(state).__name__}")
    check_live(state, "fold")
    _check_slots(step, state)
    if not callable(step):
        raise TypeError(f"fold: step must be callable (state, batch) -> (state, metrics), got {step!r}")
    if isinstance(step, EvalStep):
        raise TypeError(
            "fold: step is an eval step (make_eval_step), which returns metrics and makes no update; pass a train step, "
            "make_train_step(model, loss_fn, optimizer), and evaluate with fnlight.evaluate or with_eval"
        )
    _positive("epochs", epochs)
    _positive("max_steps", max_steps)
    flags = (("progress", progress, True), ("summary", summary, True), ("handle_signals", handle_signals, False))
    for flag, value, optional in flags:
        if not isinstance(value, bool) and not (optional and value is None):
            raise TypeError(f"fold: {flag} must be a bool{' or None' if optional else ''}, got {value!r}")
    if isinstance(observers, Observer) or not isinstance(observers, (list, tuple)):
        raise TypeError(f"fold: observers must be a list of fnlight.Observer, got {observers!r}")
    if data is None:
        raise TypeError(
            "fold: data must be an iterable of batches (a list, a DataLoader, a fnlight.Loader) or a function "
            "epoch -> iterable, got None"
        )
    for o in observers:
        if not isinstance(o, Observer):
            raise TypeError(f"fold: observers must be fnlight.Observer (see fnlight.every), got {type(o).__name__}")
    if epochs is None and max_steps is None:
        epochs = 1
    one_shot = isinstance(data, Iterator)
    if one_shot and (epochs is None or epochs > 1):
        raise ValueError(
            "fold: data is a one-shot iterator (e.g. a generator) but more than one epoch may be needed; "
            "pass a re-iterable (list, DataLoader) or a function epoch -> iterable"
        )
    _check_even_shards(data)
    if _data_parallel(step) and world_size() > 1 and hasattr(data, "__len__"):  # a Loader too: each rank may hold other data
        _check_equal_lengths(len(data), getattr(data, "rank", 0), getattr(data, "world_size", 1))  # type: ignore[arg-type]
    if not isinstance(donate, bool) and donate != "model":
        raise ValueError(f"fold: donate must be True, False or 'model', got {donate!r}")
    if donate:
        original = state
        # the data position is shared with the input of the step call that made this state, if any (a step never
        # replaces it): the fold counts batches in it in place, so it takes its own copy of these two scalars
        state = state.replace(data=tree_clone(state.data))
        if donate is True:  # tensors still shared with a model: copied once, here
            state = unshare_lent(state, NAMESPACE)
        mark_donated(original)
    else:
        state = tree_clone(state)

    start = int(state.step)
    bar = Progress(total=_total(step, data, epochs, max_steps), enabled=progress if rank() == 0 else False, start_step=start)
    if summary or (summary is None and bar.enabled):
        print_summary(state, console=bar.console)
    for o in observers:
        o._start(start)
    metrics: dict[str, Tensor] = {}
    epoch = int(state.data.epoch)
    counting = bool(observers) or bar.enabled or max_steps is not None
    try:
        watch = SignalWatch(handle_signals, agree=_data_parallel(step))
        with donating(donate if donate == "model" else True), held_generators(), watch as signals:
            while epochs is None or epoch < epochs:
                if _done(state, max_steps):
                    # Resumed from a checkpoint written by the update that reached max_steps with the epoch's last
                    # batch: the uninterrupted fold ended that epoch before returning, so this one does too.
                    if not state.stop and int(state.data.batch) and _consumed(state, _source(data, epoch)):
                        state, metrics, epoch = _end_epoch(step, state, metrics, observers, bar, epoch)
                        if signals.stop is not None:
                            raise _preempt(step, state, signals)
                    break
                source: Any = _source(data, epoch)
                skip = int(state.data.batch)
                if source is data and hasattr(data, "iter_epoch"):
                    batches = iter(data.iter_epoch(epoch, skip))  # type: ignore[union-attr]
                else:
                    _check_position(source, skip, epoch)
                    batches = iter(source)
                    if skip:
                        batches = itertools.islice(batches, skip, None)
                for batch in batches:
                    state.data.batch.add_(1)  # consumed: a checkpoint written inside the step records it
                    previous = state
                    result = step(state, batch)
                    try:
                        state, metrics = result
                    except (TypeError, ValueError):
                        state = None
                    if not isinstance(state, TrainState):  # (a bare unpacking or attribute error otherwise)
                        raise TypeError(
                            f"fold: step must return (state, metrics), a fnlight.TrainState and a dict of 0-d tensors; "
                            f"{step!r} returned {_short(result) if not isinstance(result, tuple) else _describe_result(result)}"
                        )
                    if state is not previous:
                        mark_donated(previous)
                    if counting:  # the update count is read only when something uses it
                        n = int(state.step)
                        for o in observers:
                            o._maybe(state, metrics, n)
                        if bar.enabled:
                            bar.update(n, epoch, metrics)
                    if signals.stop is not None:
                        raise _preempt(step, state, signals)
                    if _done(state, max_steps):
                        break
                else:
                    if not int(state.data.batch):  # the epoch started at its first batch and took none
                        raise ValueError(
                            f"fold: the data yielded no batches in epoch {epoch} ({_describe(source)}); "
                            "a Loader with drop_last=True and more samples per batch than the dataset has yields none"
                        )
                    state, metrics, epoch = _end_epoch(step, state, metrics, observers, bar, epoch)
                    if signals.stop is not None:
                        raise _preempt(step, state, signals)
                    continue
                if not state.stop and _consumed(state, source):  # max_steps reached with the epoch's last batch
                    state, metrics, epoch = _end_epoch(step, state, metrics, observers, bar, epoch)
                    if signals.stop is not None:
                        raise _preempt(step, state, signals)
                break
            with collective("fold's end (every rank must have taken as many steps)"):
                signals.settle()  # data-parallel ranks: a signal that came after the last update's all-reduce
            if signals.stop is not None:
                raise _preempt(step, state, signals)
        n = int(state.step)
        for o in observers:
            o._end(state, metrics, n)
        bar.update(n, epoch, metrics, force=True)
        finish = getattr(step, "finish", None)
        if finish is not None:
            finish(state)
    except BaseException as error:
        if not isinstance(error, Preempted):  # (a preempted fold finished its transforms as at a normal end)
            _abort(step, error)
        raise
    finally:
        bar.close()
    return state


def _abort(step: Any, error: BaseException) -> None:
    """The fold stops on ``error``: the transforms release what they hold (tracker runs, a checkpoint being written)."""
    abort = getattr(step, "abort", None)
    if abort is None:
        return
    try:
        abort()
    except Exception as e:  # the fold's error is the one to see; this one goes with it
        error.add_note(f"fnlight: stopping the transforms after this error raised too: {type(e).__name__}: {e}")


def _check_even_shards(data: Any) -> None:
    """Ranks training on a :class:`fnlight.Loader` must take as many steps each (their collectives pair up)."""
    world = getattr(data, "world_size", 1)
    if world == 1 or not hasattr(data, "iter_epoch") or data.drop_last:
        return
    counts = {data.batches_on(r) for r in range(world)}
    if len(counts) > 1:
        raise ValueError(
            f"fold: the Loader's {data.num_samples} samples give the {world} ranks {min(counts)} to {max(counts)} "
            "batches per epoch (drop_last=False), but training ranks must take the same number of steps; use drop_last=True for "
            "training (evaluation with fnlight.evaluate handles uneven shares)"
        )


def _check_slots(step: Any, state: TrainState) -> None:
    """Every transform of ``step`` that keeps a record in ``state.slots`` finds it there.

    The chain is walked here rather than with ``transforms._base.layers``: importing the
    transforms package from this module would be circular (``with_eval`` imports ``evaluate``).
    """
    layer = step
    while layer is not None:
        slot = getattr(layer, "slot", None)
        if slot is not None and slot not in state.slots:
            raise ValueError(
                f"fold: the state has no {slot!r} slot, where {layer.name} keeps its record (it has "
                f"{sorted(state.slots) or 'none'}); build the state with this step's init(), or give an existing state "
                f"the slot: state.with_slot({slot!r}, layer.init_slot(state)) with layer the {layer.name} of the step"
            )
        layer = getattr(layer, "inner", None)


def _check_equal_lengths(batches: int, share: int, shares: int) -> None:
    """Data-parallel ranks must take as many steps each, and Loaders split among them must split among
    all of them, a share each: compare the ranks' lengths and shares (``share`` of ``shares``; one all-reduce)."""
    world, here = world_size(), rank()
    found = torch.zeros(3 * world, dtype=torch.float64)
    found[here], found[world + here], found[2 * world + here] = batches, shares, share
    with collective("fold's start (comparing the ranks' numbers of batches)"):
        found = all_sum(found)
    counts, worlds, ranks = (found[i * world : (i + 1) * world].long().tolist() for i in range(3))
    if len(set(counts)) > 1:
        given = ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))
        raise ValueError(
            f"fold: the ranks' data have different numbers of batches per epoch ({given}), but data-parallel "
            "ranks must take the same number of steps (their gradient all-reduces pair up); give every rank as "
            "many batches (fnlight.Loader with drop_last=True splits a dataset evenly)"
        )
    split = [(r, k, w) for r, (k, w) in enumerate(zip(ranks, worlds)) if w > 1]  # Loaders that share out their data
    if split and (any(w != world for *_, w in split) or len({k for _, k, _ in split}) < len(split)):
        given = "; ".join(f"rank {r}: rank={k}, world_size={w}" for r, k, w in split)
        raise ValueError(
            f"fold: the ranks' Loaders do not split the data among the {world} training ranks ({given}), so some "
            f"samples would be trained on twice per update and others never; give each rank's Loader its own rank "
            f"and world_size={world} (the defaults: the process group's)"
        )


def _describe(data: Any) -> str:
    size = f" of length {len(data)}" if hasattr(data, "__len__") else ""
    return f"{type(data).__name__}{size}"


def _source(data: Any, epoch: int) -> Any:
    """What the fold iterates in ``epoch``: a Loader itself (it resumes by position), else the epoch's iterable."""
    return data if hasattr(data, "iter_epoch") else _epoch_iterable(data, epoch)


def _check_position(source: Any, skip: int, epoch: int) -> None:
    """A resumed position within the epoch's batches (known only for data with a length), as a Loader checks it."""
    try:
        size = len(source)
    except TypeError:
        return
    if skip > size:  # islice would skip the whole epoch without a word and the fold would go on to the next
        raise ValueError(
            f"fold: the state's position, state.data.batch = {skip} in epoch {epoch}, is past the data's {size} batches "
            f"per epoch ({_describe(source)}): the state was saved by a run with other data or another batch size"
        )


def _consumed(state: TrainState, source: Any) -> bool:
    """Whether the fold has taken every batch of the epoch (known only for data with a length)."""
    try:
        size = len(source)
    except TypeError:  # no length, or one that raises (a DataLoader over an IterableDataset without __len__)
        return False
    return int(state.data.batch) >= size


def _end_epoch(
    step: Step, state: TrainState, metrics: dict[str, Tensor], observers: Sequence[Observer], bar: Progress, epoch: int
) -> tuple[TrainState, dict[str, Tensor], int]:
    """Flush the step (epoch-end work) and move the state's position to the next epoch's first batch."""
    state, metrics = _flush(step, state, metrics, observers, bar, epoch)
    epoch += 1
    state.data.epoch.fill_(epoch)
    state.data.batch.zero_()
    return state, metrics, epoch


def _flush(
    step: Step, state: TrainState, metrics: dict[str, Tensor], observers: Sequence[Observer], bar: Progress, epoch: int
) -> tuple[TrainState, dict[str, Tensor]]:
    """End of an epoch: let the step apply anything pending (e.g. a short accumulation window)."""
    flush = getattr(step, "flush", None)
    if flush is None:
        return state, metrics
    before = int(state.step)
    previous = state
    state, flushed = flush(state)
    if state is not previous:
        mark_donated(previous)
    n = int(state.step)
    if flushed:  # e.g. an epoch-end evaluation, a short window's update: the epoch's last metrics carry it
        metrics = {**metrics, **flushed}
    if n != before:
        for o in observers:
            o._maybe(state, metrics, n)
        bar.update(n, epoch, metrics)
    return state, metrics


def _data_parallel(step: Any) -> bool:
    """Whether ``step`` averages its gradients over several ranks: then its ranks agree on when to stop on a signal."""
    if world_size() == 1:
        return False
    layer = step
    while layer is not None:
        if getattr(layer, "name", None) in ("with_ddp", "with_fsdp"):
            return True
        layer = getattr(layer, "inner", None)
    return False


def _preempt(step: Any, state: TrainState, signals: SignalWatch) -> Preempted:
    signum = signals.stop
    assert signum is not None
    return preempt(step, state, signum, here=signals.received is not None)


def _done(state: TrainState, max_steps: int | None) -> bool:
    return bool(state.stop) or (max_steps is not None and int(state.step) >= max_steps)


def _short(x: Any) -> str:
    """``x`` for an error message: a state or tensor by its type, anything else by a shortened repr."""
    return f"a {type(x).__name__}" if isinstance(x, (TrainState, Tensor, dict)) else reprlib.repr(x)


def _describe_result(result: tuple[Any, ...]) -> str:
    """A step's wrong result for an error message: the tuple's length and the types in it."""
    return f"a tuple of {len(result)} ({', '.join(type(x).__name__ for x in result[:4])}{', ...' if len(result) > 4 else ''})"


def _batch_size(batch: Any) -> int:
    return leading_size(batch, "evaluate")


def evaluate(
    eval_step: EvalStep | Callable[[TrainState, Any], dict[str, Tensor]],
    state: TrainState,
    data: Iterable[Any],
    *,
    batch_size_fn: Callable[[Any], int] = _batch_size,
) -> dict[str, float]:
    """Mean of each metric of ``eval_step`` over ``data``, weighted by batch size.

    Sums are accumulated on the device in float64 and read once at the end, so the
    result is the exact per-sample mean even when the last batch is smaller. Under
    data parallelism (every rank evaluating its share, e.g. a :class:`fnlight.Loader`
    with ``rank``/``world_size``) the sums and counts are added over the ranks, so every
    rank gets the means over all samples; every rank must call it.

    Args:
        eval_step: ``make_eval_step(loss_fn)`` or any ``(state, batch) -> metrics``.
        state: the state to evaluate (not modified).
        data: an iterable of batches.
        batch_size_fn: the number of samples in a batch (default: leading dimension of
            its first tensor). A batch it gives 0 samples is left out (its metrics, NaN for
            a mean over no targets, count for nothing).

    Returns:
        ``{name: mean}`` as Python floats; ``{}`` when ``data`` is empty.

    Raises:
        TypeError: ``eval_step`` is not an eval step, ``state`` is not a ``TrainState``, a metric
            is not a 0-d tensor, or ``batch_size_fn`` returns something other than a number.
        ValueError: ``batch_size_fn`` returns a negative (or non-finite) number.

    >>> import torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(1, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> data = [(torch.zeros(3, 1), torch.zeros(3, 1)), (torch.zeros(1, 1), torch.zeros(1, 1))]
    >>> sorted(fl.evaluate(fl.make_eval_step(fl.losses.mse), state, data))
    ['loss']
    """
    if isinstance(eval_step, TrainState) or not callable(eval_step):
        raise TypeError(
            "evaluate(eval_step, state, data): eval_step must be make_eval_step(loss_fn) or a (state, batch) -> "
            f"{{name: 0-d tensor}} callable, got {_short(eval_step)}"
        )
    if hasattr(eval_step, "updates_per"):  # a train step (or a transform of one): calling it would train
        raise TypeError(
            f"evaluate: eval_step is a train step ({eval_step!r}), which would train on the evaluation data; "
            "pass make_eval_step(loss_fn) with the same loss_fn"
        )
    if not isinstance(state, TrainState):
        raise TypeError(f"evaluate(eval_step, state, data): state must be a TrainState, got {_short(state)}")
    check_live(state, "evaluate")
    if world_size() > 1:  # sharded parameters (with_fsdp) gathered once: ranks may have different batch counts
        full = full_tensors(state.params)
        if full is not state.params:
            state = state.replace(params=dict(full))
    sums: dict[str, Tensor] = {}
    counts: dict[str, float] = {}  # samples of the batches that reported each metric
    # random draws in an evaluation come from a seed per batch (of the state's key and update, this rank), as a
    # train step's do: the result does not depend on the caller's generators, which are put back afterwards
    # (a stacked ensemble state holds one key per replica: the first one's, for an eval_step of your own that takes them)
    key, update, here = int(state.key.reshape(-1)[0]), int(state.step.reshape(-1)[0]), rank()
    devices = cuda_devices(state.params)
    # iterating the data draws from the global generator too (a DataLoader's workers' base seed, a shuffled one's
    # order, a dataset's augmentations): put back as well, or an evaluation in a fold changed what the training drew next
    with generators_kept(devices):
        for index, batch in enumerate(data):
            n = sample_count(batch_size_fn(batch), batch_size_fn, "evaluate", _short)
            if not n:  # no sample to weigh (every target ignored, say): its metrics (NaN for an empty mean) count for nothing
                continue
            try:
                with evaluating(eval_seed(key, update, index, here), devices):
                    metrics = eval_step(state, batch)
            except Exception as e:
                if not isinstance(eval_step, EvalStep):
                    e.add_note(
                        f"fnlight: evaluate calls eval_step(state, batch) with eval_step={eval_step!r}; to evaluate a "
                        "loss_fn(model, batch), pass fnlight.make_eval_step(loss_fn)"
                    )
                raise
            if not isinstance(metrics, Mapping):
                raise TypeError(
                    f"evaluate: eval_step must return a dict of 0-d tensors, got {_short(metrics)} from {eval_step!r}"
                )
            for k, v in metrics.items():
                if not isinstance(v, Tensor) or v.dim() != 0:
                    got = f"a tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else f"{type(v).__name__}: {_short(v)}"
                    raise TypeError(f"evaluate: metric {k!r} must be a 0-d tensor, got {got} from eval_step={eval_step!r}")
                term = v.detach().to(torch.float64) * n
                sums[k] = sums[k] + term if k in sums else term
                counts[k] = counts.get(k, 0) + n
    if world_size() > 1:  # every rank evaluated its share: the means are over all of them
        keys = union_of_keys(list(sums))
        zero = torch.zeros((), dtype=torch.float64)
        local = [*(sums.get(k, zero).cpu() for k in keys), *(torch.tensor(float(counts.get(k, 0))) for k in keys)]
        totals = all_sum(torch.stack([t.to(torch.float64) for t in local]))
        sums = dict(zip(keys, totals[: len(keys)]))
        counts = {k: c.item() for k, c in zip(keys, totals[len(keys) :])}  # (batch_size_fn may weigh 0.5: not int())
    return {k: float(v) / counts[k] for k, v in sums.items() if counts[k]}
