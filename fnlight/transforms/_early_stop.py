"""Early stopping as state: best value, wait count and reason live in the TrainState, so they survive resume."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._donation import is_donating
from .._ranks import all_sum, world_size
from .._signals import preempting
from .._state import TrainState
from .._tree import copy_tensors_
from ._accum import streams, window_open
from ._base import Metrics, Transform

__all__ = ["EarlyStopState", "with_early_stop"]


class EarlyStopState(NamedTuple):
    """The record of :func:`with_early_stop` (``state.slots["early_stop"]``).

    Fields:
        best: 0-d float64 tensor (CPU), the best monitored value so far (+inf for
            ``mode="min"``, -inf for ``"max"`` before the first improvement).
        best_step: ``state.step`` at the check that set ``best`` (-1 before any).
        wait: checks since the last improvement.
        reason: why the run stopped: ``""`` while running, else ``"non_finite"``,
            ``"stopping_threshold"``, ``"divergence"`` or ``"patience"``.
        best_params: with ``restore_best``, a copy of the trainable parameters at the
            best check (one extra copy of the parameters' memory); else ``None``.
    """

    best: Tensor
    best_step: int
    wait: int
    reason: str
    best_params: dict[str, Tensor] | None


class EarlyStop(Transform):
    """See :func:`with_early_stop`."""

    name = "with_early_stop"
    slot = "early_stop"

    def __init__(
        self,
        inner: Any,
        *,
        monitor: str,
        mode: str,
        patience: int,
        min_delta: float,
        stopping_threshold: float | None,
        divergence_threshold: float | None,
        check_finite: bool,
        min_updates: int,
        restore_best: bool,
    ) -> None:
        super().__init__(inner)
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, float(min_delta)
        self.stopping_threshold = None if stopping_threshold is None else float(stopping_threshold)
        self.divergence_threshold = None if divergence_threshold is None else float(divergence_threshold)
        self.check_finite, self.min_updates, self.restore_best = check_finite, min_updates, restore_best
        self._sign = 1.0 if mode == "min" else -1.0  # compare sign * value: smaller is better
        # streaming accumulation: a call inside a window returns one micro-batch's metrics and makes no
        # update; only the call that ends the window (its loss the window's mean) is checked
        self._windowed = streams(inner)
        self._seen: set[str] = set()  # metric names seen since the last fold ended (for the warning in finish)

    def init_slot(self, state: TrainState) -> EarlyStopState:
        best = torch.tensor(math.inf * self._sign, dtype=torch.float64)
        copy = {n: state.params[n].detach().clone() for n in self.core._trainable} if self.restore_best else None
        return EarlyStopState(best=best, best_step=-1, wait=0, reason="", best_params=copy)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        new_state, metrics = self.inner(state, batch)
        if self._windowed and window_open(new_state):  # a micro-batch inside a window: no update
            return new_state, metrics
        return self._maybe_check(new_state, metrics)

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """The inner flush, then a check if its metrics hold ``monitor`` (e.g. an epoch-end evaluation)."""
        new_state, metrics = self.inner.flush(state)
        return self._maybe_check(new_state, metrics)

    def finish(self, state: TrainState) -> None:
        """Warn when a whole fold ran without ``monitor`` ever appearing in the metrics (a misspelt name?)."""
        seen, self._seen = self._seen, set()
        checked = state.slots["early_stop"].best_step >= 0 if "early_stop" in state.slots else False
        # a resumed fold too short to evaluate, or one cut short by a signal, is fine
        if seen and self.monitor not in seen and not checked and not preempting():
            warnings.warn(
                f"with_early_stop: monitor={self.monitor!r} never appeared in the step's metrics during this fold, "
                f"so early stopping never checked; the metrics were {sorted(seen)}",
                RuntimeWarning,
                stacklevel=2,
            )
        self.inner.finish(state)

    def _maybe_check(self, state: TrainState, metrics: Metrics) -> tuple[TrainState, Metrics]:
        if self.monitor not in metrics:
            if self.monitor not in self._seen:
                self._seen.update(metrics)
            return state, metrics
        self._seen.add(self.monitor)
        raw = metrics[self.monitor]
        try:
            value = float(raw)
        except (TypeError, ValueError, RuntimeError) as e:  # (a bare "only one element tensors can be converted")
            got = f"a tensor of shape {tuple(raw.shape)}" if isinstance(raw, Tensor) else f"{type(raw).__name__} {raw!r}"
            raise TypeError(
                f"with_early_stop: the monitored metric {self.monitor!r} must be a 0-d tensor (one number to compare), "
                f"got {got} ({e})"
            ) from None
        if world_size() > 1:  # every rank decides on the mean over ranks, so all stop at the same update
            value = float(all_sum(torch.tensor([value], dtype=torch.float64))[0]) / world_size()
        return self.check(state, value, metrics)

    def check(self, state: TrainState, value: float, metrics: Metrics | None = None) -> tuple[TrainState, Metrics]:
        """One check of ``value`` against the record in ``state``; returns the new state and metrics.

        The reason is the first of: non-finite, stopping threshold reached, divergence
        threshold passed, patience exhausted. The record (best, wait) is updated on every
        check. Nothing stops before ``min_updates`` optimizer updates.
        """
        rec: EarlyStopState = state.slots[self.slot]
        step = int(state.step)
        s = self._sign
        best = float(rec.best)
        improved = math.isfinite(value) and s * value < s * best - self.min_delta  # never NaN or +-inf
        if self.check_finite and not math.isfinite(value):
            reason = "non_finite"
        elif self.stopping_threshold is not None and s * value <= s * self.stopping_threshold:
            reason = "stopping_threshold"
        elif self.divergence_threshold is not None and s * value > s * self.divergence_threshold:
            reason = "divergence"
        elif not improved and rec.wait + 1 >= self.patience:
            reason = "patience"
        else:
            reason = ""
        stop = bool(reason) and step >= self.min_updates
        inplace = is_donating()
        best_params = rec.best_params
        if improved:
            if inplace:
                rec.best.fill_(value)
                best_t = rec.best
            else:
                best_t = torch.tensor(value, dtype=torch.float64)
            if self.restore_best:
                current = {n: state.params[n] for n in best_params}
                if inplace:
                    copy_tensors_(list(best_params.values()), list(current.values()))
                else:
                    best_params = {n: p.detach().clone() for n, p in current.items()}
            rec = EarlyStopState(best_t, step, 0, rec.reason, best_params)
        else:
            rec = rec._replace(wait=rec.wait + 1)
        if stop:
            rec = rec._replace(reason=reason)
            state = state.replace(stop=torch.tensor(True))
            if self.restore_best and rec.best_step >= 0:
                state = state.replace(params=self._restored(state.params, best_params, inplace=inplace))
        state = state.replace(slots={**state.slots, self.slot: rec})
        extra = {"early_stop/wait": torch.tensor(rec.wait, dtype=torch.int64), "early_stop/best": rec.best.clone()}
        return state, {**(metrics or {}), **extra}

    @staticmethod
    def _restored(params: dict[str, Tensor], best: dict[str, Tensor], *, inplace: bool) -> dict[str, Tensor]:
        # Copies, never aliases: later in-place updates of the parameters must not reach the record.
        if inplace:
            copy_tensors_([params[n] for n in best], list(best.values()))
            return params
        return {**params, **{n: b.clone() for n, b in best.items()}}

    def __repr__(self) -> str:
        return f"with_early_stop({self.inner!r}, monitor={self.monitor!r}, mode={self.mode!r}, patience={self.patience})"


def _number(where: str, name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a number{' or None' if optional else ''}, got {value!r}")
    if (isinstance(value, int) and not -(2**1023) < value < 2**1023) or not math.isfinite(value):  # an int beyond any float
        raise ValueError(f"{where}: {name} must be finite, got {value!r}")


def with_early_stop(
    step: Any,
    *,
    monitor: str,
    mode: str = "min",
    patience: int = 3,
    min_delta: float = 0.0,
    stopping_threshold: float | None = None,
    divergence_threshold: float | None = None,
    check_finite: bool = True,
    min_updates: int = 0,
    restore_best: bool = False,
) -> EarlyStop:
    """Stop the fold when a monitored metric stops improving, reaches a goal, diverges or turns NaN.

    A *check* happens on every call (and epoch-end flush) whose metrics contain
    ``monitor`` — e.g. ``"val/loss"`` from an inner :func:`with_eval`, or the training
    ``"loss"`` — so ``patience`` counts checks, not epochs. Under a streaming
    :func:`with_grad_accum` only the calls that end a window (an update) are checked, with
    the window's mean loss. Each check, in this order:

    1. ``check_finite`` and the value is NaN/inf: stop, reason ``"non_finite"``;
    2. the value reached ``stopping_threshold`` (``<=`` for ``"min"``, ``>=`` for
       ``"max"``): stop, reason ``"stopping_threshold"``;
    3. the value is beyond ``divergence_threshold`` (strictly): stop, reason ``"divergence"``;
    4. improvement: the value is strictly better than ``best - min_delta`` (``"min"``) or
       ``best + min_delta`` (``"max"``); a value equal to it is *not* an improvement.
       An improvement records the new best (and, with ``restore_best``, a copy of the
       trainable parameters) and resets ``wait``; otherwise ``wait += 1`` and the run
       stops once ``wait >= patience`` (reason ``"patience"``). A non-finite value is
       never an improvement: with ``check_finite=False`` a NaN simply counts against
       the patience.

    The record (best, wait) is updated at every check, whichever condition decides.
    Before ``min_updates`` optimizer updates no check stops the run, but checks still
    update the record, so the first check at or after ``min_updates`` stops if the
    patience is already used up. Stopping sets ``state.stop`` (the fold ends after this
    call) and, with ``restore_best``, puts the best parameters back (the optimizer state
    is left as it is). The record lives in ``state.slots["early_stop"]``
    (:class:`EarlyStopState`), so a checkpointed run resumes mid-patience. Check steps
    add the metrics ``early_stop/wait`` and ``early_stop/best``.

    The parameters recorded by ``restore_best`` are those of the state the check ran
    on, i.e. after that call's update: they match a ``with_eval`` metric (computed on
    that state) exactly, while a training-batch ``loss`` was measured before the update.

    Args:
        step: the step to wrap (see docs/transforms.md for the order).
        monitor: the metric to watch, e.g. ``"val/loss"``.
        mode: ``"min"`` or ``"max"``: which values are better.
        patience: checks without improvement before stopping (>= 1).
        min_delta: how much better than the best a value must be to count (>= 0).
        stopping_threshold: stop as soon as the value reaches this.
        divergence_threshold: stop as soon as the value is worse than this.
        check_finite: stop on a NaN or infinite value.
        min_updates: no stop before this many optimizer updates (>= 0).
        restore_best: keep a copy of the parameters at the best check and restore it when
            stopping (memory: one copy of the trainable parameters).

    Returns:
        The wrapped step.

    Raises:
        TypeError: an option of the wrong type.
        ValueError: an option out of range (``patience`` and ``min_updates`` that are
            not ints, ``1.5`` say, included), thresholds in the wrong order for ``mode``,
            or a wrong composition order.

    >>> import torch, fnlight as fl
    >>> core = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.0))
    >>> step = with_early_stop(core, monitor="loss", patience=2)
    >>> state = fl.fold(step, step.init(), [(torch.ones(4, 2), torch.zeros(4, 1))] * 10, progress=False)
    >>> int(state.step), bool(state.stop), state.slots["early_stop"].reason
    (3, True, 'patience')
    """
    where = "with_early_stop"
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"{where}: monitor must be a metric name (non-empty str) such as 'val/loss', got {monitor!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"{where}: mode must be 'min' or 'max', got {mode!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"{where}: patience must be an int >= 1 (checks without improvement), got {patience!r}")
    _number(where, "min_delta", min_delta)
    if min_delta < 0:
        raise ValueError(f"{where}: min_delta must be >= 0 (the direction comes from mode={mode!r}), got {min_delta!r}")
    _number(where, "stopping_threshold", stopping_threshold, optional=True)
    _number(where, "divergence_threshold", divergence_threshold, optional=True)
    if stopping_threshold is not None and divergence_threshold is not None:
        better = stopping_threshold < divergence_threshold if mode == "min" else stopping_threshold > divergence_threshold
        if not better:
            raise ValueError(
                f"{where}: with mode={mode!r} stopping_threshold must be {'below' if mode == 'min' else 'above'} "
                f"divergence_threshold, got stopping_threshold={stopping_threshold!r}, "
                f"divergence_threshold={divergence_threshold!r}"
            )
    for name, flag in (("check_finite", check_finite), ("restore_best", restore_best)):
        if not isinstance(flag, bool):
            raise TypeError(f"{where}: {name} must be a bool, got {flag!r}")
    if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 0:
        raise ValueError(f"{where}: min_updates must be an int >= 0 (optimizer updates), got {min_updates!r}")
    return EarlyStop(
        step,
        monitor=monitor,
        mode=mode,
        patience=patience,
        min_delta=min_delta,
        stopping_threshold=stopping_threshold,
        divergence_threshold=divergence_threshold,
        check_finite=check_finite,
        min_updates=min_updates,
        restore_best=restore_best,
    )
