"""The learning-rate finder: an exponential sweep of the learning rate over a few hundred updates."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._donation import check_live, donating
from .._state import TrainState
from .._step import EvalStep, NonFiniteError, Step
from .._tree import tree_clone
from ..transforms._accum import window_open
from ..transforms._base import layers

__all__ = ["LRFinderResult", "lr_find"]


@dataclasses.dataclass(frozen=True)
class LRFinderResult:
    """What :func:`lr_find` measured.

    Fields:
        lrs: the learning rate of each update tried, in order.
        losses: the training loss of each update (the loss of the batch *before* the update
            with that learning rate, as the step reports it).
        smoothed: the exponentially smoothed, bias-corrected losses.
        suggestion: the learning rate at the steepest descent of ``smoothed``, over its finite
            values (``None`` when fewer than two remain after skipping the first and last ones).
        diverged: whether the sweep stopped early because the loss diverged.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    diverged: bool

    def plot(self, path: str | os.PathLike[str], *, title: str = "learning-rate finder") -> Path:
        """Save the smoothed (and raw) loss against the learning rate as a PNG; return the path.

        Uses matplotlib's Agg canvas directly (no display, no pyplot global state).

        Raises:
            ImportError: matplotlib is not installed (``pip install fnlight[plot]``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("LRFinderResult.plot needs matplotlib: pip install 'fnlight[plot]' (or matplotlib)") from e
        fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, color="0.75", linewidth=1, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", linewidth=2, label="smoothed loss")
        if self.suggestion is not None:
            i = self.lrs.index(self.suggestion)
            ax.plot(
                [self.suggestion], [self.smoothed[i]], "o", color="C3", markersize=8, label=f"suggestion {self.suggestion:.2g}"
            )
        finite = [v for v in (*self.losses, *self.smoothed) if math.isfinite(v)]
        if finite and math.isfinite(self.smoothed[0]):  # keep the divergence from flattening the interesting part
            low, high = min(finite), min(max(finite), 1.5 * self.smoothed[0])
            if high > low:
                ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title(title + (" (stopped: diverged)" if self.diverged else ""))
        ax.grid(True, alpha=0.3)
        ax.legend()
        out = Path(path)
        fig.savefig(out, format="png")
        return out


def _set_lr(node: Any, lr: float) -> tuple[Any, int]:
    """``node`` with every ``hparams["lr"]`` set to ``lr``, and how many were set."""
    hparams = getattr(node, "hparams", None)
    if isinstance(hparams, Mapping) and "lr" in hparams and hasattr(node, "_replace"):
        old = hparams["lr"]
        return node._replace(hparams={**hparams, "lr": torch.full_like(old, lr)}), 1
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        parts = [_set_lr(child, lr) for child in node]
        return tuple(p for p, _ in parts), sum(n for _, n in parts)
    return node, 0


def _lrs_in(node: Any) -> list[Tensor]:
    hparams = getattr(node, "hparams", None)
    if isinstance(hparams, Mapping) and "lr" in hparams:
        return [hparams["lr"]]
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        return [t for child in node for t in _lrs_in(child)]
    return []


def _batches(data: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``data``, cycled when it is re-iterable (a list, a DataLoader, a Loader)."""
    one_shot = isinstance(data, Iterator)
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if one_shot or empty:
            return


def _suggest(lrs: list[float], smoothed: list[float], skip_start: int, skip_end: int) -> float | None:
    """The learning rate where the smoothed loss falls fastest (per step of the log-spaced sweep)."""
    end = len(smoothed) - skip_end
    kept = [(lr, v) for lr, v in zip(lrs[skip_start:end], smoothed[skip_start:end], strict=True) if math.isfinite(v)]
    if len(kept) < 2:  # the updates that diverged (a non-finite loss ends the sweep) are left out, as Lightning does
        return None
    window = torch.tensor([v for _, v in kept], dtype=torch.float64)
    return kept[int(torch.argmin(torch.gradient(window)[0]))][0]


# Transforms whose work outlives the call: a finder's trial updates would be saved or logged as the run's.
_SIDE_EFFECTS = {
    "with_checkpointing": "save the trial states as the run's checkpoints (a resumed run would start from one of them)",
    "with_tracking": "log the trial updates to the run",
}


def check_no_side_effects(step: Any, where: str) -> None:
    """Raise if ``step``'s chain holds a transform that would save or log a finder's trial updates."""
    for layer in layers(step):
        name = getattr(layer, "name", None)
        if name in _SIDE_EFFECTS:
            raise ValueError(
                f"{where}: the step is wrapped by {name}, which would {_SIDE_EFFECTS[name]}; pass the step inside it "
                "(the chain without with_checkpointing and with_tracking, e.g. the core step or with_grad_accum(core, ...)) "
                "and wrap that for the run"
            )


def _positive_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"lr_find: {name} must be an int >= {low}, got {value!r}")
    return value


def lr_find(
    step: Step,
    state: TrainState,
    data: Iterable[Any],
    *,
    start: float = 1e-7,
    end: float = 10.0,
    num: int = 100,
    smooth: float = 0.98,
    diverge: float | None = 4.0,
    skip_start: int = 10,
    skip_end: int = 1,
) -> LRFinderResult:
    """Sweep the learning rate exponentially from ``start`` to ``end`` and suggest one.

    Runs up to ``num`` updates of ``step`` on a copy of ``state`` (the state passed in is
    never modified), the ``i``-th with learning rate ``start * (end / start) ** (i / (num - 1))``,
    and records each update's loss. Under streaming ``with_grad_accum(every=K)`` an update
    takes K batches, all at its learning rate, and its loss is the window's mean loss. The learning rate
    is set the way fnlight optimizers read it: every ``hparams["lr"]`` in ``state.opt_state``
    (the state is data) is replaced before each call. The loss is smoothed with an
    exponential moving average (bias-corrected, factor ``smooth``); the sweep stops early
    when the smoothed loss exceeds the best seen so far by more than ``diverge - 1`` times
    the best's magnitude (``diverge`` times the best, for a positive loss: Lightning's rule,
    which reads any negative loss as diverging), or when the loss is not finite. The suggestion
    is the learning rate where the smoothed loss falls fastest (the minimum of its gradient
    over the sweep's steps), ignoring the first ``skip_start`` and last ``skip_end`` updates
    — the rule of PyTorch Lightning's ``lr_find().suggestion()``.

    Args:
        step: a train step (or transform chain) whose optimizer takes a constant learning
            rate, without checkpointing or tracking transforms (refused: they would save or
            log the sweep).
        state: the state to start from (e.g. ``step.init(seed=0)``); left untouched.
        data: batches (cycled when re-iterable and shorter than the sweep).
        start, end: the first and last learning rates (``0 < start < end``).
        num: the number of updates (learning rates) in the sweep.
        smooth: the smoothing factor of the moving average, in [0, 1).
        diverge: stop when the smoothed loss exceeds this multiple (> 1) of the best smoothed
            loss (for a negative best, the best plus ``diverge - 1`` times its magnitude);
            ``None`` runs the whole sweep (a non-finite loss still stops it).
        skip_start, skip_end: updates left out at each end when suggesting.

    Returns:
        An :class:`LRFinderResult`; ``result.plot("lr.png")`` draws it.

    Raises:
        TypeError: ``state`` is not a ``TrainState``, ``step`` is not callable or is an eval step, or
            ``data`` is not iterable.
        ValueError: the step is wrapped by ``with_checkpointing`` or ``with_tracking`` (the sweep
            would be saved or logged as the run's); an option is out of range; the optimizer state holds no ``hparams["lr"]``;
            the optimizer's learning rate is a schedule (it would overwrite the sweep's);
            ``data`` is empty or ends before the first update; the step's loss is not a scalar.

    >>> import torch, fnlight as fl
    >>> from fnlight.finders import lr_find
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x = torch.randn(64, 4)
    >>> data = [(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))]
    >>> step = fl.make_train_step(torch.nn.Linear(4, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> result = lr_find(step, step.init(), data, start=1e-4, end=10.0, num=60)
    >>> result.diverged, 1e-3 < result.suggestion < 1.0
    (True, True)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"lr_find: expected a fnlight.TrainState, got {type(state).__name__}")
    check_live(state, "lr_find")
    if not callable(step):
        raise TypeError(f"lr_find: step must be callable (state, batch) -> (state, metrics), got {step!r}")
    if isinstance(step, EvalStep):
        raise TypeError("lr_find: step is an eval step (make_eval_step), which makes no update; pass the train step")
    check_no_side_effects(step, "lr_find")
    if not (isinstance(data, Iterable) or hasattr(data, "__getitem__")):
        given = "a function (fold's epoch -> iterable form; pass data(0))" if callable(data) else type(data).__name__
        raise TypeError(f"lr_find: data must be an iterable of batches (a list, a DataLoader, a fnlight.Loader), got {given}")
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"lr_find: {name} must be a positive finite float, got {value!r}")
    if not start < end:
        raise ValueError(f"lr_find: expected start < end, got start={start!r}, end={end!r}")
    num = _positive_int("num", num, low=2)
    skip_start = _positive_int("skip_start", skip_start, low=0)
    skip_end = _positive_int("skip_end", skip_end, low=0)
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not 0 <= smooth < 1:
        raise ValueError(f"lr_find: smooth must be in [0, 1), got {smooth!r}")
    if diverge is not None and (isinstance(diverge, bool) or not isinstance(diverge, (int, float)) or not diverge > 1):
        raise ValueError(f"lr_find: diverge must be a float > 1 or None, got {diverge!r}")
    if _set_lr(state.opt_state, start)[1] == 0:
        raise ValueError(
            f"lr_find: the optimizer state ({type(state.opt_state).__name__}) holds no hparams['lr'] to sweep; "
            "use a fnlight.optim optimizer (or a chain ending in one)"
        )
    work = tree_clone(state)  # the sweep updates this copy in place; the caller's state is never touched
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    batches = _batches(data)
    with donating():
        for i in range(num):
            lr = start * (end / start) ** (i / (num - 1))
            window: list[float] | None = []  # the losses of the calls making this update (one without accumulation)
            batch = None
            while window is not None:
                batch = next(batches, None)
                if batch is None:
                    break
                opt_state, _ = _set_lr(work.opt_state, lr)
                try:
                    work, metrics = step(work.replace(opt_state=opt_state), batch)
                except NonFiniteError:
                    window = None
                    break
                loss_t = metrics["loss"]
                if loss_t.ndim != 0:
                    raise ValueError(f"lr_find: the step's loss must be a scalar, got shape {list(loss_t.shape)} (an ensemble?)")
                window.append(float(loss_t))
                if not window_open(work):  # the update was made (or skipped): this learning rate is done
                    break
            if window is None:
                lrs.append(lr)
                losses.append(math.nan)
                smoothed.append(math.nan)
                diverged = True
                break
            if batch is None:  # the data ended before this learning rate's update
                if i == 0:
                    raise ValueError(
                        "lr_find: data gave no batch" if not window else
                        f"lr_find: data ended before the first update ({len(window)} batches; with_grad_accum(every=K) "
                        "takes K batches per update)"
                    )  # fmt: skip
                break
            if any(bool((t != lr).any()) for t in _lrs_in(work.opt_state)):
                raise ValueError(
                    "lr_find: the optimizer's learning rate is a schedule, which sets hparams['lr'] at every update and "
                    "would overwrite the sweep's; build the step with a constant learning rate (a float) for the search"
                )
            loss = window[-1]  # the update's metrics: with_grad_accum reports the window's mean loss there
            avg = smooth * avg + (1 - smooth) * loss
            value = avg / (1 - smooth ** (i + 1))
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(value)
            # diverge * best for a positive best; measured from the best by its magnitude, so that a negative
            # loss (a log-likelihood) does not read as diverging at once
            if not math.isfinite(value) or (diverge is not None and i > 0 and value - best > (diverge - 1) * abs(best)):
                diverged = True
                break
            best = min(best, value)
    return LRFinderResult(lrs, losses, smoothed, _suggest(lrs, smoothed, skip_start, skip_end), diverged)
