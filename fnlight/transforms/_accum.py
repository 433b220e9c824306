"""Gradient accumulation: one optimizer update from several micro-batches, weighted exactly."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from .._autograd import writable_grads
from .._donation import check_live, is_donating
from .._state import TrainState
from .._step import NO_CONTEXT, GradContext, Gradients
from .._tree import leading_size
from ._base import CANONICAL_ORDER, Metrics, Transform, layers

__all__ = ["AccumState", "batch_size", "with_grad_accum"]


class AccumState(NamedTuple):
    """The accumulation window of :func:`with_grad_accum` (streaming mode).

    Fields:
        grads: per trainable parameter, the weighted gradient sum of the window so far:
            micro-batch ``i`` contributes ``n_i / (K * n_0)`` times its mean-loss gradient,
            so a full window of equal batches needs no final rescaling. Between windows
            (``count == 0``) the values are the last window's and are overwritten, never read.
        seen: 1-D bool tensor: which trainable parameters received a gradient in the window.
            Written only while the window is not ``complete`` (a complete window has seen
            every parameter, so the common case costs no tensor operation per micro-batch).
        count: micro-batches in the window so far.
        samples: samples in the window so far (the ``n_i`` summed).
        first: ``n_0``, the size of the window's first micro-batch (0 before it).
        loss: the sum of ``n_i * loss_i``: a Python float when the parameters are on the CPU
            (reading a CPU scalar costs a fraction of a tensor ``add_`` and sums in float64),
            else a 0-d float32 tensor on their device (no host sync per micro-batch).
        complete: every micro-batch of the window so far gave every parameter a gradient
            (then later micro-batches accumulate into the buffers in place, and ``seen`` is
            all true whatever its values).
    """

    grads: dict[str, Tensor]
    seen: Tensor
    count: int
    samples: int
    first: int
    loss: Tensor | float
    complete: bool


def window_open(state: Any) -> bool:
    """Whether ``state`` is inside a streaming ``with_grad_accum`` window: its last call made no update.

    >>> import torch, fnlight as fl
    >>> step = fl.with_grad_accum(fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)), every=2)
    >>> state, _ = step(step.init(), (torch.ones(4, 2), torch.zeros(4, 1)))
    >>> window_open(state), window_open(step(state, (torch.ones(4, 2), torch.zeros(4, 1)))[0])
    (True, False)
    """
    slot = state.slots.get("grad_accum")
    return isinstance(slot, AccumState) and int(slot.count) > 0


def streams(step: Any) -> bool:
    """Whether ``step``'s chain accumulates by streaming (``with_grad_accum(every=K)``): calls inside a window make no update."""
    return any(isinstance(t, GradAccum) and t.every is not None for t in layers(step))


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor in ``batch`` (the default sample count)."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) and batch[0].ndim:
        return batch[0].shape[0]  # the common (inputs, targets) case, without a walk
    return leading_size(batch, "with_grad_accum")


def _samples(n: Any, batch_size_fn: Callable[[Any], int]) -> int:
    """``batch_size_fn``'s answer for one micro-batch, checked: an int >= 1 (the weight ``n_i`` and the slot's counts).

    A float or a tensor would turn the window's ``samples`` and ``first`` (ints in ``init``'s
    slot) into another type, which a checkpoint written inside a window then holds and no
    fresh ``init`` fits; 0 would divide by zero, a negative count weight the gradients by it.
    """
    if type(n) is int and n >= 1:  # the common case, without the general checks
        return n
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        hint = "; convert it with int(...)" if isinstance(n, Tensor) else ""
        raise TypeError(
            f"with_grad_accum: batch_size_fn must return a micro-batch's number of samples (an int >= 1), got "
            f"{type(n).__name__} {n!r} from batch_size_fn={batch_size_fn!r}{hint}"
        )
    if n < 1:
        raise ValueError(
            f"with_grad_accum: batch_size_fn must return a micro-batch's number of samples (an int >= 1), got {n!r} "
            f"from batch_size_fn={batch_size_fn!r}: a micro-batch without samples has no mean loss to weight"
        )
    return int(n)


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


def _add(
    acc: dict[str, Tensor] | None, grads: dict[str, Tensor], *, inplace: bool, valid: Collection[str] | None = None
) -> dict[str, Tensor]:
    """``acc + grads`` by name (``grads`` alone when ``acc`` is None: the fresh tensors are taken over).

    ``valid``: the names whose entries in ``acc`` hold this window's sums (default: all of
    ``acc``'s). A gradient for any other name is taken over as it is: the entry it replaces
    is missing or left from an earlier window.
    """
    if acc is None:
        return grads
    valid = acc.keys() if valid is None else valid
    names = [n for n in grads if n in valid]
    added = [grads[n] for n in names]
    if inplace:
        torch._foreach_add_([acc[n] for n in names], added)
        out = acc
    else:
        out = {**acc, **dict(zip(names, torch._foreach_add([acc[n] for n in names], added)))}
    if len(names) < len(grads):
        out = {**out, **{n: g for n, g in grads.items() if n not in valid}}
    return out


def _mean(total: Tensor | float, samples: int, dtype: torch.dtype) -> Tensor:
    """A window's mean metric from its sample-weighted sum (a float summed on the CPU, or a tensor)."""
    if isinstance(total, float):
        return torch.scalar_tensor(total / samples, dtype=dtype)
    return (total / samples).to(dtype)


def _seen(window: AccumState, names: tuple[str, ...], grads: dict[str, Tensor], count: int, *, inplace: bool) -> Tensor:
    """The window's ``seen`` flags once it is incomplete (some micro-batch left a parameter without a gradient)."""
    seen = window.seen if inplace else window.seen.clone()
    if count == 0:
        seen.zero_()
    elif window.complete:  # the flags were not kept while every parameter had a gradient
        seen.fill_(True)
    if len(grads) == len(names):
        seen.fill_(True)
    else:
        seen[[names.index(t) for t in grads]] = True
    return seen


class GradAccum(Transform):
    """See :func:`with_grad_accum`."""

    name = "with_grad_accum"
    _by_phases = True  # its __call__ drives the inner step's phases per micro-batch
    _whole_only = True  # and its gradient phase refuses to run: what wraps it must call it whole

    def __init__(self, inner: Any, *, every: int | None, micro_batches: int | None, batch_size_fn: Callable[[Any], int]) -> None:
        super().__init__(inner)
        self.every = every
        self.micro_batches = micro_batches
        self.batch_size_fn = batch_size_fn
        self.slot = "grad_accum" if every is not None else None  # type: ignore[misc]
        self._names = self.core._trainable
        # A transform of one's own that acts in the gradient phase changes each micro-batch's gradients: backward
        # must not add them into the window's buffers in place (GradContext.accumulate), where it would see and
        # change the window's sum so far instead (and a fold would differ from direct calls)
        self._in_place = not any(
            isinstance(layer, Transform) and layer.name not in CANONICAL_ORDER and type(layer).grads is not Transform.grads
            for layer in layers(inner)
        )

    def init_slot(self, state: TrainState) -> AccumState:
        names = self._names
        device = state.params[names[0]].device
        return AccumState(
            grads={n: torch.zeros_like(state.params[n]) for n in names},
            seen=torch.zeros(len(names), dtype=torch.bool),
            count=0,
            samples=0,
            first=0,
            loss=0.0 if device.type == "cpu" else torch.zeros((), dtype=torch.float32, device=device),
            complete=False,
        )

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        raise TypeError(
            "with_grad_accum is applied by calling the step (or by fold); a transform outside it may only "
            "wrap whole steps (with_eval, with_early_stop, with_checkpointing)"
        )

    def updates_per(self, batches: int) -> int:
        """Updates from ``batches`` calls: one per ``every`` (the last window may be short)."""
        n = self.inner.updates_per(batches)
        return n if self.every is None else -(-n // self.every)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.micro_batches is not None:
            return self._split_call(state, batch)
        return self._stream_call(state, batch)

    def _split_call(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        pieces = _split(batch, self.micro_batches)
        sizes = [_samples(self.batch_size_fn(p), self.batch_size_fn) for p in pieces]
        total = sum(sizes)
        acc: dict[str, Tensor] | None = None
        sums: dict[str, Tensor | float] = {}
        current = state
        complete = len(self._names)
        for i, (piece, n) in enumerate(zip(pieces, sizes)):
            into = acc if self._in_place and acc is not None and len(acc) == complete else None  # this call's own tensors
            g = self.inner.grads(current, piece, GradContext(micro=i, loss_weight=n / total, accumulate=into))
            current = current.replace(buffers=g.buffers)
            acc = g.grads if into is not None else _add(acc, writable_grads(g.grads), inplace=True)
            for k, v in g.metrics.items():  # on the CPU Python floats (a scalar read costs less than a tensor op)
                if v.is_cpu:
                    sums[k] = sums.get(k, 0.0) + float(v) * n
                elif k in sums:  # elsewhere sums owned by this call, in float32 as the loss: no host sync
                    sums[k].add_(v.float(), alpha=n)  # type: ignore[union-attr]
                else:
                    sums[k] = v.float() * n
        metrics = {k: _mean(v, total, g.metrics[k].dtype) for k, v in sums.items()}
        new_state, update_metrics = self.inner.update(state, Gradients(metrics["loss"], acc, g.buffers, metrics))
        return new_state, {**metrics, **update_metrics}

    def _stream_call(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        window: AccumState = state.slots["grad_accum"]
        n = _samples(self.batch_size_fn(batch), self.batch_size_fn)
        count = window.count
        first = window.first if count else n
        inplace = is_donating()
        names = self._names
        # In place inside the fold once every parameter has a buffer from this window.
        into = window.grads if inplace and count and window.complete and self._in_place else None
        g = self.inner.grads(state, batch, GradContext(micro=count, loss_weight=n / (self.every * first), accumulate=into))
        full = len(g.grads) == len(names)
        complete = full and (count == 0 or window.complete)
        if into is not None:
            acc = g.grads
        elif count == 0:  # the window takes these tensors over and later adds into them
            acc = {**window.grads, **writable_grads(g.grads)}
        else:  # buffers of parameters no micro-batch of this window reached yet are stale: replaced, not added to
            valid = None if window.complete else {name for name, s in zip(names, window.seen.tolist()) if s}
            acc = _add(window.grads, writable_grads(g.grads), inplace=inplace, valid=valid)
        seen = window.seen if complete else _seen(window, names, g.grads, count, inplace=inplace)
        if type(window.loss) is float:  # CPU: a scalar read is cheaper than a tensor op
            loss: Tensor | float = (window.loss if count else 0.0) + float(g.loss) * n
        elif inplace:
            loss = window.loss.zero_() if count == 0 else window.loss
            loss.add_(g.loss, alpha=n)
        else:
            loss = (window.loss if count else torch.zeros_like(window.loss)).add(g.loss, alpha=n)
        window = AccumState(acc, seen, count + 1, window.samples + n, first, loss, complete)
        state = state.replace(buffers=g.buffers, slots={**state.slots, "grad_accum": window})
        if window.count < self.every:
            return state, g.metrics  # no update yet: this micro-batch's metrics
        new_state, metrics = self._apply(state, window)
        return new_state, {**g.metrics, **metrics}

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """Apply a partial window (fewer than ``every`` micro-batches) weighted by what it holds."""
        check_live(state, "with_grad_accum flush")
        state, metrics = self.inner.flush(state)
        if self.every is None or state.slots["grad_accum"].count == 0:
            return state, metrics
        new_state, applied = self._apply(state, state.slots["grad_accum"])
        return new_state, {**metrics, **applied}

    def _apply(self, state: TrainState, window: AccumState) -> tuple[TrainState, Metrics]:
        if window.complete:  # every parameter has its gradient in the window
            grads = window.grads
        else:
            grads = {n: window.grads[n] for n, s in zip(self._names, window.seen.tolist()) if s}
        correction = self.every * window.first / window.samples  # 1.0 for a full window of equal batches
        if correction != 1.0 or not is_donating():  # a pure call hands fresh tensors to the update
            grads = dict(zip(grads, torch._foreach_mul(list(grads.values()), correction)))
        loss = _mean(window.loss, window.samples, torch.float32)
        new_state, update_metrics = self.inner.update(state, Gradients(loss, grads, state.buffers, {"loss": loss}))
        kept = grads if grads is window.grads else {**window.grads, **grads}
        done = window._replace(grads=kept, count=0, samples=0, first=0, complete=False)
        new_state = new_state.replace(slots={**new_state.slots, "grad_accum": done})
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
    observers count optimizer updates, not micro-batches. At an update the ``loss`` metric
    is the sample-weighted mean over the whole window; other metrics are the last
    micro-batch's when streaming and window means when splitting. A streaming call that
    makes no update returns its micro-batch's metrics.

    Args:
        step: the step to wrap (see docs/transforms.md for the order).
        every: micro-batches per update in streaming mode (>= 1).
        micro_batches: pieces to split each batch into (>= 1).
        batch_size_fn: the sample count of a batch, an int >= 1 (default: leading dimension
            of its first tensor).

    Returns:
        The wrapped step.

    Raises:
        ValueError: both or neither of ``every``/``micro_batches``, a value below 1, or a
            wrong composition order; when called, ``batch_size_fn`` returns a count below 1
            (an empty micro-batch).
        TypeError: ``step`` is not a train step, or ``batch_size_fn`` is not callable; when
            called, ``batch_size_fn`` returns something other than an int (a tensor, a float).

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
