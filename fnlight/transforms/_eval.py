"""Evaluation inside the training step: a validation pass every N updates and/or at epoch end."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .._loop import _batch_size, evaluate
from .._ranks import world_size
from .._state import TrainState
from .._step import _device_type, make_eval_step
from ._amp import _cast_floating
from ._base import Metrics, Transform, layers

__all__ = ["with_eval"]


class _InPrecision:
    """An eval step run in the precision of the training forward pass (an inner ``with_amp``).

    ``mode="mixed"``: under the same ``torch.autocast``; ``mode="true"``: floating inputs
    cast to the parameters' dtype, as the training step casts them.
    """

    def __init__(self, eval_step: Callable[[TrainState, Any], Metrics], dtype: torch.dtype, mode: str) -> None:
        self.eval_step, self.dtype, self.mode = eval_step, dtype, mode

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        if self.mode == "true":
            return self.eval_step(state, _cast_floating(batch, self.dtype))
        with torch.autocast(_device_type(state.params), dtype=self.dtype):
            return self.eval_step(state, batch)


def _in_precision(eval_step: Callable[[TrainState, Any], Metrics], inner: Any) -> Callable[[TrainState, Any], Metrics]:
    for layer in layers(inner):
        if getattr(layer, "name", None) == "with_amp":
            return _InPrecision(eval_step, layer.dtype, layer.mode)
    return eval_step


class Eval(Transform):
    """See :func:`with_eval`."""

    name = "with_eval"

    def __init__(
        self,
        inner: Any,
        *,
        data: Iterable[Any],
        eval_step: Callable[[TrainState, Any], Metrics],
        every: int | None,
        at_epoch_end: bool,
        prefix: str,
        batch_size_fn: Callable[[Any], int],
    ) -> None:
        super().__init__(inner)
        self.data, self.eval_step = data, _in_precision(eval_step, inner)
        self.every, self.at_epoch_end, self.prefix = every, at_epoch_end, prefix
        self.batch_size_fn = batch_size_fn

    def evaluate(self, state: TrainState) -> Metrics:
        """One evaluation pass over ``data``: ``{prefix + name: 0-d float64 tensor}`` (CPU)."""
        means = evaluate(self.eval_step, state, self.data, batch_size_fn=self.batch_size_fn)
        if not means:  # (the same on every rank: evaluate's means are over all of them)
            raise ValueError(
                f"with_eval: the evaluation after update {int(state.step)} gave no metrics: data "
                f"({type(self.data).__name__}) yielded no batch, or batch_size_fn weighed every batch 0 samples, "
                "or eval_step returned no metric; there is nothing to evaluate on"
            )
        return {self.prefix + k: torch.tensor(v, dtype=torch.float64) for k, v in means.items()}

    def _on_multiple(self, step: int) -> bool:
        return self.every is not None and step > 0 and step % self.every == 0

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        before = int(state.step)
        new_state, metrics = self.inner(state, batch)
        step = int(new_state.step)
        if step != before and self._on_multiple(step):
            metrics = {**metrics, **self.evaluate(new_state)}
        return new_state, metrics

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """The inner flush, then an evaluation if the epoch end (or the flush's update) calls for one.

        A state that was already evaluated right after its update (a multiple of ``every``)
        and is unchanged by the flush is not evaluated again, so a monitor downstream sees
        each evaluation once.
        """
        before = int(state.step)
        new_state, metrics = self.inner.flush(state)
        step = int(new_state.step)
        on_multiple = self._on_multiple(step)
        due = (on_multiple or self.at_epoch_end) if step != before else (self.at_epoch_end and not on_multiple)
        if due:
            metrics = {**metrics, **self.evaluate(new_state)}
        return new_state, metrics

    def __repr__(self) -> str:
        return f"with_eval({self.inner!r}, every={self.every!r}, at_epoch_end={self.at_epoch_end!r})"


def with_eval(
    step: Any,
    *,
    data: Iterable[Any],
    eval_step: Callable[[TrainState, Any], Metrics] | None = None,
    loss_fn: Any = None,
    every: int | None = None,
    at_epoch_end: bool = False,
    prefix: str = "val/",
    batch_size_fn: Callable[[Any], int] = _batch_size,
) -> Eval:
    """Evaluate on held-out data every N optimizer updates and/or at each epoch end.

    After a call whose update brings ``state.step`` to a multiple of ``every``, and/or
    in the epoch-end ``flush`` (after the inner flush, so a short accumulation window is
    applied first), the step runs :func:`fnlight.evaluate` over ``data`` on the new state
    and merges the results into that call's metrics as ``prefix + name`` (``val/loss``,
    ``val/accuracy``), 0-d float64 tensors. The means are exact per-sample means, also
    with an uneven last batch. Evaluation is a pure function of the state: it needs no
    slot and changes nothing in the state (eval mode, no gradients).

    At epoch end, a state already evaluated right after its update (a multiple of
    ``every``) and unchanged by the flush is not evaluated a second time. Evaluation
    runs in the training forward pass's precision: under an inner :func:`with_amp`,
    ``mode="mixed"`` evaluates under the same autocast and ``mode="true"`` casts the
    floating inputs to its dtype.

    Args:
        step: the step to wrap (see docs/transforms.md for the order).
        data: a re-iterable of validation batches (a list, a ``DataLoader``, a
            :class:`fnlight.Loader` — whose ``iter`` serves its epoch-0 order), not a
            one-shot iterator.
        eval_step: ``(state, batch) -> {name: 0-d tensor}``, e.g.
            ``fnlight.make_eval_step(loss_fn)``.
        loss_fn: instead of ``eval_step``: build it with ``make_eval_step(loss_fn)``.
        every: evaluate after every N-th optimizer update (>= 1).
        at_epoch_end: evaluate at the end of every epoch.
        prefix: prepended to the evaluation metrics' names (non-empty, so they cannot
            overwrite the training metrics).
        batch_size_fn: the number of samples in a validation batch (default: leading
            dimension of its first tensor).

    Returns:
        The wrapped step.

    Raises:
        TypeError: ``data`` is not iterable or is a one-shot iterator, ``eval_step``/
            ``loss_fn``/``batch_size_fn`` are not callable, or an option has the wrong type.
        ValueError: not exactly one of ``eval_step``/``loss_fn``, neither ``every`` nor
            ``at_epoch_end``, ``every`` not an int >= 1 (``2.0`` included), an empty
            ``data`` (under data parallelism: a ``Loader`` with no batch on any rank; a
            rank's empty share is evaluated with the others') or ``prefix``, or a wrong
            composition order; at an evaluation, data without a length that turns out
            empty (or whose every batch ``batch_size_fn`` weighs 0): no metrics to report.

    >>> import torch, fnlight as fl
    >>> core = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> val = [(torch.ones(3, 2), torch.zeros(3, 1)), (torch.ones(1, 2), torch.zeros(1, 1))]
    >>> step = with_eval(core, data=val, loss_fn=fl.losses.mse, every=2)
    >>> state, metrics = step(step.init(), (torch.ones(4, 2), torch.zeros(4, 1)))
    >>> sorted(metrics)
    ['loss']
    >>> state, metrics = step(state, (torch.ones(4, 2), torch.zeros(4, 1)))
    >>> sorted(metrics), metrics["val/loss"].dtype
    (['loss', 'val/loss'], torch.float64)
    """
    where = "with_eval"
    if (eval_step is None) == (loss_fn is None):
        raise ValueError(
            f"{where}: give exactly one of eval_step=make_eval_step(loss_fn) or loss_fn=..., "
            f"got eval_step={eval_step!r}, loss_fn={loss_fn!r}"
        )
    if eval_step is not None and not callable(eval_step):
        raise TypeError(f"{where}: eval_step must be callable (state, batch) -> metrics, got {eval_step!r}")
    if hasattr(eval_step, "updates_per"):  # a train step (or a transform of one): evaluating would train
        raise TypeError(
            f"{where}: eval_step is a train step ({eval_step!r}), which would train on the evaluation data; "
            "pass make_eval_step(loss_fn) with the same loss_fn, or loss_fn=..."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    if isinstance(data, Iterator):
        raise TypeError(
            f"{where}: data is a one-shot iterator ({type(data).__name__}); every evaluation iterates it again, "
            "so pass a re-iterable: a list of batches, a DataLoader or a fnlight.Loader"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"{where}: data must be a re-iterable of batches (list, DataLoader, fnlight.Loader), got {data!r}")
    # Under data parallelism one rank's share may be empty while the others' are not (fewer validation samples
    # than ranks): evaluate() pairs such a rank up with the others, so only data empty on every rank is refused
    # (a rank that raised alone here left the others waiting in their collectives until the timeout).
    if hasattr(data, "batches_on") and getattr(data, "world_size", 1) > 1:  # a sharded fnlight.Loader: every rank's
        empty = not any(data.batches_on(r) for r in range(data.world_size))
    elif world_size() > 1:  # this rank's own batches: the others' are not known here
        empty = False
    else:
        try:
            empty = len(data) == 0  # type: ignore[arg-type]
        except TypeError:  # no length (an iterable-style DataLoader): find out at the first evaluation
            empty = False
    if empty:
        raise ValueError(f"{where}: data is empty ({type(data).__name__} of length 0); there is nothing to evaluate on")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"{where}: every must be an int >= 1 (optimizer updates) or None, got {every!r}")
    if not isinstance(at_epoch_end, bool):
        raise TypeError(f"{where}: at_epoch_end must be a bool, got {at_epoch_end!r}")
    if every is None and not at_epoch_end:
        raise ValueError(f"{where}: say when to evaluate: every=N (optimizer updates) and/or at_epoch_end=True")
    if not isinstance(prefix, str):
        raise TypeError(f"{where}: prefix must be a str such as 'val/', got {prefix!r}")
    if not prefix:
        raise ValueError(
            f"{where}: prefix must not be empty (the evaluation's 'loss' would overwrite the training 'loss'); use e.g. 'val/'"
        )
    if not callable(batch_size_fn):
        raise TypeError(f"{where}: batch_size_fn must be callable batch -> int, got {batch_size_fn!r}")
    return Eval(
        step,
        data=data,
        eval_step=eval_step if eval_step is not None else make_eval_step(loss_fn),
        every=every,
        at_epoch_end=at_epoch_end,
        prefix=prefix,
        batch_size_fn=batch_size_fn,
    )
