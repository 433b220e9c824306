"""Gradient accumulation: one optimizer update from several micro-batches, weighted exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from .._donation import is_donating
from .._state import TrainState
from .._step import NO_CONTEXT, GradContext, Gradients
from ._base import Metrics, Transform

__all__ = ["AccumState", "batch_size", "with_grad_accum"]


class AccumState(NamedTuple):
    """The accumulation window of :func:`with_grad_accum` (streaming mode).

    Fields:
        grads: per trainable parameter, the sum over the window of ``n_i * grad_i``.
        seen: 1-D bool tensor: which trainable parameters received a gradient in the window.
        count: 0-d int64, micro-batches in the window so far.
        samples: 0-d float64, samples in the window so far (the ``n_i`` summed).
        loss: 0-d float64 on the parameters' device, the sum of ``n_i * loss_i``.
    """

    grads: dict[str, Tensor]
    seen: Tensor
    count: Tensor
    samples: Tensor
    loss: Tensor


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor in ``batch`` (the default sample count)."""
    for leaf in optree.tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    raise TypeError("with_grad_accum: cannot infer the batch size (no tensor with a leading dimension); pass batch_size_fn")


def _split(batch: Any, k: int) -> list[Any]:
    leaves, spec = optree.tree_flatten(batch)
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, Tensor) and leaf.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"with_grad_accum(micro_batches={k}): every tensor in the batch must share its leading dimension "
            f"to be split, got leading sizes {sorted(sizes)}"
        )
    (n,) = sizes
    if n < k:
        raise ValueError(f"with_grad_accum(micro_batches={k}): a batch of {n} samples cannot be split into {k} micro-batches")
    pieces = [t.tensor_split(k) if isinstance(t, Tensor) and t.ndim > 0 else [t] * k for t in leaves]
    return [optree.tree_unflatten(spec, [p[i] for p in pieces]) for i in range(k)]


class GradAccum(Transform):
    """See :func:`with_grad_accum`."""

    name = "with_grad_accum"

    def __init__(self, inner: Any, *, every: int | None, micro_batches: int | None, batch_size_fn: Callable[[Any], int]) -> None:
        super().__init__(inner)
        self.every = every
        self.micro_batches = micro_batches
        self.batch_size_fn = batch_size_fn
        self.slot = "grad_accum" if every is not None else None  # type: ignore[misc]

    def init_slot(self, state: TrainState) -> AccumState:
        names = self.core._trainable
        return AccumState(
            grads={n: torch.zeros_like(state.params[n]) for n in names},
            seen=torch.zeros(len(names), dtype=torch.bool),
            count=torch.zeros((), dtype=torch.int64),
            samples=torch.zeros((), dtype=torch.float64),
            loss=torch.zeros((), dtype=torch.float64, device=state.params[names[0]].device),
        )

    # -- one micro-batch: weighted gradients and metric sums --------------------------------------
    def _micro(self, state: TrainState, batch: Any, ctx: GradContext, micro: int) -> tuple[Gradients, int]:
        n = self.batch_size_fn(batch)
        return self.inner.grads(state, batch, ctx._replace(micro=micro)), n

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        raise TypeError(
            "with_grad_accum is applied by calling the step (or by fold); a transform outside it may only "
            "wrap whole steps (with_eval, with_early_stop, with_checkpointing)"
        )

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.micro_batches is not None:
            return self._split_call(state, batch)
        return self._stream_call(state, batch)

    def _split_call(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        total, acc, sums, seen = 0, {}, {}, state
        g = None
        for i, piece in enumerate(_split(batch, self.micro_batches)):
            g, n = self._micro(seen, piece, NO_CONTEXT, i)
            seen = seen.replace(buffers=g.buffers)
            total += n
            for name, grad in g.grads.items():
                acc[name] = grad * n if name not in acc else acc[name].add_(grad, alpha=n)
            for k, v in g.metrics.items():
                term = v.to(torch.float64) * n
                sums[k] = term if k not in sums else sums[k] + term
        grads = dict(zip(acc, torch._foreach_div(list(acc.values()), float(total))))
        metrics = {k: (v / total).to(g.metrics[k].dtype) for k, v in sums.items()}
        new_state, update_metrics = self.inner.update(state, Gradients(metrics["loss"], grads, g.buffers, metrics))
        return new_state, {**metrics, **update_metrics}

    def _stream_call(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        window: AccumState = state.slots["grad_accum"]
        micro = int(window.count)
        g, n = self._micro(state, batch, NO_CONTEXT, micro)
        window = self._add(window, g, n)
        state = state.replace(buffers=g.buffers, slots={**state.slots, "grad_accum": window})
        if micro + 1 < self.every:
            return state, {**g.metrics, "loss": (window.loss / window.samples).to(g.loss.dtype)}
        new_state, metrics = self._apply(state, window)
        return new_state, {**g.metrics, **metrics}

    def updates_per(self, batches: int) -> int:
        """Updates from ``batches`` calls: one per ``every`` (the last window may be short)."""
        n = self.inner.updates_per(batches)
        return n if self.every is None else -(-n // self.every)

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """Apply a partial window (fewer than ``every`` micro-batches) weighted by what it holds."""
        state, metrics = self.inner.flush(state)
        if self.every is None or int(state.slots["grad_accum"].count) == 0:
            return state, metrics
        new_state, applied = self._apply(state, state.slots["grad_accum"])
        return new_state, {**metrics, **applied}

    def _add(self, window: AccumState, g: Gradients, n: int) -> AccumState:
        names = list(window.grads)
        if len(g.grads) == len(names):
            touched, grads = names, list(g.grads.values())
        else:
            touched = [name for name in names if name in g.grads]
            grads = [g.grads[name] for name in touched]
        acc = [window.grads[name] for name in touched]
        loss = window.loss + g.loss.to(torch.float64) * n
        if is_donating():
            torch._foreach_add_(acc, grads, alpha=n)
            new_acc = window.grads
            seen = window.seen
        else:
            new_acc = {**window.grads, **dict(zip(touched, torch._foreach_add(acc, grads, alpha=n)))}
            seen = window.seen.clone()
        if len(touched) == len(names):
            seen.fill_(True)
        else:
            seen[[names.index(t) for t in touched]] = True
        return AccumState(new_acc, seen, window.count + 1, window.samples + n, loss)

    def _apply(self, state: TrainState, window: AccumState) -> tuple[TrainState, Metrics]:
        names = [n for n, s in zip(window.grads, window.seen.tolist()) if s]
        total = float(window.samples)
        grads = dict(zip(names, torch._foreach_div([window.grads[n] for n in names], total)))
        loss = (window.loss / total).float()
        new_state, update_metrics = self.inner.update(state, Gradients(loss, grads, state.buffers, {"loss": loss}))
        if is_donating():
            torch._foreach_zero_(list(window.grads.values()))
            for t in (window.seen, window.count, window.samples, window.loss):
                t.zero_()
            fresh = window
        else:
            fresh = self.init_slot(new_state)
        new_state = new_state.replace(slots={**new_state.slots, "grad_accum": fresh})
        return new_state, {"loss": loss, **update_metrics}


def with_grad_accum(
    step: Any, *, every: int | None = None, micro_batches: int | None = None, batch_size_fn: Callable[[Any], int] = batch_size
) -> GradAccum:
    """Accumulate gradients over several micro-batches per optimizer update.

    Two modes (give exactly one):

    - ``every=K`` (streaming): each call takes one micro-batch; the weighted gradient sum
      and a micro-batch counter live in ``state.slots["grad_accum"]``, and every K-th
      call applies one update. At the end of an epoch the fold applies a shorter last
      window, weighted by the samples it actually holds (Lightning scales it by 1/K).
    - ``micro_batches=K`` (splitting): each call splits its batch into K pieces along
      the leading dimension, runs them one after another (peak activation memory of one
      piece) and applies one update.

    Micro-batch gradients are weighted by their sample count ``n_i`` and divided by the
    window's total, so K micro-batches equal one batch of their union — also when the
    sizes are uneven (with a per-sample mean loss). The step counter, schedules and
    observers count optimizer updates, not micro-batches. The ``loss`` metric is the
    sample-weighted mean over the window so far (at an update: the whole window); other
    metrics are the last micro-batch's in streaming mode and window means when splitting.

    Args:
        step: the step to wrap (see docs/transforms.md for the order).
        every: micro-batches per update in streaming mode (>= 1).
        micro_batches: pieces to split each batch into (>= 1).
        batch_size_fn: the sample count of a batch (default: leading dimension of its
            first tensor).

    Returns:
        The wrapped step.

    Raises:
        ValueError: both or neither of ``every``/``micro_batches``, a value below 1, or a
            wrong composition order.
        TypeError: ``step`` is not a train step, or ``batch_size_fn`` is not callable.

    >>> import torch, fnlight as fl
    >>> step = fl.with_grad_accum(fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)), every=2)
    >>> state = step.init()
    >>> batch = (torch.ones(4, 2), torch.zeros(4, 1))
    >>> state, _ = step(state, batch); int(state.step)
    0
    >>> state, _ = step(state, batch); int(state.step)
    1
    """
    if (every is None) == (micro_batches is None):
        raise ValueError(
            f"with_grad_accum: give exactly one of every=K (streaming) or micro_batches=K (splitting), "
            f"got every={every!r}, micro_batches={micro_batches!r}"
        )
    for option, value in (("every", every), ("micro_batches", micro_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"with_grad_accum: {option} must be an int >= 1, got {value!r}")
    if not callable(batch_size_fn):
        raise TypeError(f"with_grad_accum: batch_size_fn must be callable batch -> int, got {batch_size_fn!r}")
    return GradAccum(step, every=every, micro_batches=micro_batches, batch_size_fn=batch_size_fn)
