"""Weight averaging as state: an exponential moving average of the parameters, updated once per optimizer update.

The machinery shared with :func:`fnlight.with_swa` lives here too: which updates are
averaged, the in-place (fold) and pure paths, and :func:`averaged`, which swaps the
averaged weights into a state for evaluation or export.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .._donation import is_donating
from .._state import TrainState
from .._step import Gradients, _check_state
from .._tree import copy_tensors_
from ..optim._base import check_hparam
from ._base import Metrics, Transform

__all__ = ["AVERAGING_SLOTS", "EmaState", "averaged", "with_ema"]

AVERAGING_SLOTS = ("ema", "swa")


class EmaState(NamedTuple):
    """The moving average of :func:`with_ema` (``state.slots["ema"]``).

    Fields:
        params: per trainable parameter, its average (a copy of the initial value until
            the first averaged update).
        buffers: with ``use_buffers``, per floating-point buffer (BatchNorm running
            statistics), its average; else empty.
        count: 0-d int64 tensor (CPU): optimizer updates averaged so far (torch's
            ``AveragedModel.n_averaged``).
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    count: Tensor


class Averaging(Transform):
    """What :func:`with_ema` and :func:`fnlight.with_swa` share: when to average, and the update of the slot.

    After every call (and epoch-end flush) whose inner step made an optimizer update
    that brings ``state.step`` to ``n``, the parameters are averaged if ``n >= start``,
    ``n >= 1`` and ``(n - start) % every == 0``. The first averaged update copies the
    parameters; later ones move the average towards them by :meth:`weight`.
    """

    slot: ClassVar[str]
    state_type: ClassVar[type]

    def __init__(self, inner: Any, *, start: int, every: int, use_buffers: bool) -> None:
        super().__init__(inner)
        self.start, self.every, self.use_buffers = start, every, use_buffers

    def init_slot(self, state: TrainState) -> Any:
        params = {n: state.params[n].detach().clone() for n in self.core._trainable}
        buffers = {n: b.detach().clone() for n, b in state.buffers.items() if b.is_floating_point()} if self.use_buffers else {}
        return self.state_type(params, buffers, torch.zeros((), dtype=torch.int64))

    def weight(self, count: int) -> float:
        """The interpolation weight towards the current parameters after ``count`` averaged updates (>= 1)."""
        raise NotImplementedError

    def due(self, n: int) -> bool:
        """Whether the parameters after optimizer update ``n`` are averaged."""
        return n >= 1 and n >= self.start and (n - self.start) % self.every == 0

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        before = int(state.step)
        new_state, metrics = self.inner(state, batch)
        return self._after(before, new_state), metrics

    def update(self, state: TrainState, g: Gradients) -> tuple[TrainState, Metrics]:
        """The inner update, then the average (when this update is one to average)."""
        before = int(state.step)
        new_state, metrics = self.inner.update(state, g)
        return self._after(before, new_state), metrics

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """The inner flush (e.g. a short accumulation window), then the average if it made a due update."""
        before = int(state.step)
        new_state, metrics = self.inner.flush(state)
        return self._after(before, new_state), metrics

    def _after(self, before: int, state: TrainState) -> TrainState:
        n = int(state.step)
        if n == before or not self.due(n):  # no update (accumulating, skipped) or not one to average
            return state
        return state.replace(slots={**state.slots, self.slot: self.average(state)})

    def average(self, state: TrainState) -> Any:
        """The slot after averaging ``state``'s current parameters (and floating buffers) into it."""
        slot = state.slots[self.slot]
        count = int(slot.count)
        shadow = [*slot.params.values(), *slot.buffers.values()]
        current = [*(state.params[n] for n in slot.params), *(state.buffers[n] for n in slot.buffers)]
        inplace = is_donating()
        k = len(slot.params)
        if count == 0:
            if inplace:
                copy_tensors_(shadow, current)
            else:
                shadow = [t.detach().clone() for t in current]
        else:
            w = self.weight(count)
            # parameters and buffers in separate calls: under with_fsdp the first are DTensors, the second not
            parts = [(lo, hi) for lo, hi in ((0, k), (k, len(shadow))) if hi > lo]
            if inplace:
                for lo, hi in parts:
                    torch._foreach_lerp_(shadow[lo:hi], current[lo:hi], w)
            else:
                shadow = [t for lo, hi in parts for t in torch._foreach_lerp(shadow[lo:hi], current[lo:hi], w)]
        params = slot.params if inplace else dict(zip(slot.params, shadow[:k]))
        buffers = slot.buffers if inplace else dict(zip(slot.buffers, shadow[k:]))
        return self.state_type(params, buffers, slot.count.add_(1) if inplace else slot.count + 1)


class Ema(Averaging):
    """See :func:`with_ema`."""

    name = "with_ema"
    slot = "ema"
    state_type = EmaState

    def __init__(self, inner: Any, *, decay: float, every: int, start: int, warmup: bool, use_buffers: bool) -> None:
        super().__init__(inner, start=start, every=every, use_buffers=use_buffers)
        self.decay, self.warmup = decay, warmup

    def weight(self, count: int) -> float:
        """``1 - decay`` (with ``warmup``: ``1 - min(decay, (1 + count) / (10 + count))``)."""
        decay = min(self.decay, (1 + count) / (10 + count)) if self.warmup else self.decay
        return 1.0 - decay

    def __repr__(self) -> str:
        return f"with_ema({self.inner!r}, decay={self.decay!r}, every={self.every!r}, start={self.start!r})"


def check_schedule(where: str, *, start: Any, every: Any, use_buffers: Any) -> None:
    """Validate the options :func:`with_ema` and :func:`fnlight.with_swa` share."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"{where}: start must be an int >= 0 (an optimizer-update count), got {start!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{where}: every must be an int >= 1 (optimizer updates between averages), got {every!r}")
    if not isinstance(use_buffers, bool):
        raise TypeError(f"{where}: use_buffers must be a bool, got {use_buffers!r}")


def with_ema(step: Any, *, decay: float, every: int = 1, start: int = 0, warmup: bool = False, use_buffers: bool = True) -> Ema:
    """Keep an exponential moving average (EMA) of the parameters in the state.

    After each optimizer update ``n`` with ``n >= start`` and ``(n - start) % every == 0``
    (updates, not micro-batches: under :func:`fnlight.with_grad_accum` the average moves
    once per window; a skipped update moves nothing), the average moves towards the
    current parameters: ``ema = decay * ema + (1 - decay) * params``, one
    ``torch._foreach_lerp_`` in place inside :func:`fnlight.fold`. The first averaged
    update copies the parameters, as ``torch.optim.swa_utils.AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)`` does, and the results are equal to it bitwise.

    The average lives in ``state.slots["ema"]`` (:class:`EmaState`: one copy of the
    trainable parameters, plus the floating buffers with ``use_buffers``), so it is
    checkpointed and resumed with everything else. :func:`averaged` gives a state with
    the averaged weights for evaluation (``fl.evaluate``, ``with_eval(eval_step=...)``)
    or export (``fl.to_module``).

    Args:
        step: the step to wrap (see docs/transforms.md for the order).
        decay: the weight of the old average at each averaged update, in [0, 1].
            The average spans about ``every / (1 - decay)`` updates.
        every: average every this many optimizer updates (>= 1).
        start: the first update to average (>= 0). With ``start=0`` the averaged updates are
            the multiples of ``every`` (``every``, ``2 * every``, ...; every update when
            ``every=1``); with ``start >= 1`` they are ``start``, ``start + every``, ...
        warmup: use ``min(decay, (1 + k) / (10 + k))`` at the ``k``-th averaged update
            after the copy (timm's and TensorFlow's warmup), so the early average is not
            dominated by the first weights.
        use_buffers: also average the floating buffers (BatchNorm running statistics),
            as ``AveragedModel(use_buffers=True)`` and timm do; integer buffers
            (``num_batches_tracked``) take the current value. ``False``: :func:`averaged`
            pairs the averaged parameters with the current buffers (torch's default).

    Returns:
        The wrapped step.

    Raises:
        TypeError: ``decay`` is not a number or a flag is not a bool.
        ValueError: ``decay`` outside [0, 1], ``every < 1``, ``start < 0``, or a wrong
            composition order.

    >>> import torch, fnlight as fl
    >>> core = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> step = with_ema(core, decay=0.9)
    >>> state, _ = step(step.init(), (torch.ones(4, 2), torch.zeros(4, 1)))
    >>> int(state.slots["ema"].count), torch.equal(averaged(state).params["weight"], state.params["weight"])
    (1, True)
    """
    where = "with_ema"
    decay = check_hparam("decay", decay, where=where, low=0.0, high=1.0, high_inclusive=True)
    check_schedule(where, start=start, every=every, use_buffers=use_buffers)
    if not isinstance(warmup, bool):
        raise TypeError(f"{where}: warmup must be a bool, got {warmup!r}")
    return Ema(step, decay=decay, every=every, start=start, warmup=warmup, use_buffers=use_buffers)


def averaged(state: TrainState, which: str | None = None) -> TrainState:
    """A state whose parameters (and averaged buffers) are the weight average of ``state``.

    Use it to evaluate or export the averaged model: ``fl.evaluate(eval_step,
    averaged(state), data)``, ``fl.to_module(averaged(state))``, or
    ``with_eval(..., eval_step=lambda s, b: eval_step(averaged(s), b))``. Everything
    else (optimizer state, step, slots) is ``state``'s. Before the first averaged update
    there is nothing averaged yet and the parameters are ``state``'s own.

    The result shares its tensors with ``state`` (no copy): reading it is free, and
    ``fold`` and the steps never modify their input, but clone it (``fl.tree_clone``)
    before handing it to ``fold(..., donate=True)``.

    Args:
        state: a state built by a step with :func:`with_ema` or :func:`fnlight.with_swa`.
        which: ``"ema"`` or ``"swa"``; may be omitted when the state has only one of them.

    Returns:
        The state with the averaged parameters (and, where averaged, buffers).

    Raises:
        TypeError: ``state`` is not a :class:`fnlight.TrainState`.
        ValueError: ``which`` is not ``"ema"``/``"swa"``, the state has no such slot, or
            it has both and ``which`` is omitted.

    >>> import torch, fnlight as fl
    >>> step = with_ema(fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)), decay=0.5)
    >>> state = step.init()
    >>> averaged(state).params["bias"] is state.params["bias"]  # nothing averaged yet
    True
    """
    _check_state(state, "averaged")
    present = [s for s in AVERAGING_SLOTS if s in state.slots]
    if which is None:
        if len(present) != 1:
            found = "both 'ema' and 'swa'" if present else f"neither (its slots are {sorted(state.slots)})"
            raise ValueError(
                f"averaged: expected a state with one weight average (a step wrapped by with_ema or with_swa), "
                f"this one has {found}; pass which='ema' or which='swa'"
            )
        which = present[0]
    elif which not in AVERAGING_SLOTS:
        raise ValueError(f"averaged: which must be 'ema' or 'swa', got {which!r}")
    elif which not in state.slots:
        wrapper = "with_ema" if which == "ema" else "with_swa"
        raise ValueError(
            f"averaged: the state has no {which!r} slot (its slots are {sorted(state.slots)}); "
            f"build the step with {wrapper}(...) and start from its init()"
        )
    slot = state.slots[which]
    if int(slot.count) == 0:
        return state
    buffers = {**state.buffers, **slot.buffers} if slot.buffers else state.buffers
    return state.replace(params={**state.params, **slot.params}, buffers=buffers)
