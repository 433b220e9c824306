"""Schedules: pure functions of the optimizer-update count.

A schedule maps the number of updates applied so far (a 0-d integer tensor) to a
0-d float64 tensor. It is computed with tensor operations, never advanced by side
effect, so it resumes exactly and never counts micro-batches or skipped updates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import Schedule, check_hparam

__all__ = [
    "constant",
    "cosine",
    "exponential",
    "join",
    "linear",
    "piecewise_constant",
    "step_decay",
    "warmup",
    "warmup_cosine",
]


def _f(count: Tensor) -> Tensor:
    return count.to(torch.float64)


def _steps(name: str, value: object, where: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        need = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"fnlight.optim.{where}: {name} must be {need}, got {value!r}")
    return value


def _value(name: str, value: object, where: str) -> float:
    return check_hparam(name, value, where=f"fnlight.optim.{where}", low=-math.inf)


def _at(schedule: Schedule, count: Tensor) -> Tensor:
    """``schedule(count)`` as a float64 tensor: a Python number returned (documented as accepted) is kept exactly.

    Without this, ``torch.where`` over two Python floats would make a float32 tensor and round the value.
    Anything else raises here, as :func:`fnlight.optim._base.scheduled` does for an outer schedule: the
    arithmetic of ``join``/``warmup`` would otherwise fail first, with torch's message naming no schedule.
    """
    value = schedule(count)
    if isinstance(value, Tensor):
        return value.to(torch.float64)  # a tensor of several values is reported by scheduled(), on the outer result
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64, device=count.device)
    raise TypeError(
        f"learning-rate schedule {getattr(schedule, '__qualname__', schedule)!r} must return a 0-d tensor "
        f"or a float, got {type(value).__name__}: {value!r} for count {count.tolist()}"
    )


def _schedule(name: str, value: object, where: str) -> Schedule:
    if not callable(value):
        raise TypeError(f"fnlight.optim.{where}: {name} must be a schedule (count -> 0-d tensor), got {value!r}")
    return value


def constant(value: float) -> Schedule:
    """Always ``value``.

    >>> float(constant(0.1)(torch.tensor(7)))
    0.1
    """
    v = _value("value", value, "constant")
    return lambda count: torch.full((), v, dtype=torch.float64, device=count.device)


def linear(init_value: float, end_value: float, transition_steps: int, *, transition_begin: int = 0) -> Schedule:
    """From ``init_value`` to ``end_value`` linearly over ``transition_steps`` updates, then constant.

    The first ``transition_begin`` updates hold ``init_value``.

    >>> s = linear(1.0, 0.0, 4)
    >>> [float(s(torch.tensor(c))) for c in (0, 2, 4, 9)]
    [1.0, 0.5, 0.0, 0.0]
    """
    a, b = _value("init_value", init_value, "linear"), _value("end_value", end_value, "linear")
    n = _steps("transition_steps", transition_steps, "linear")
    begin = _steps("transition_begin", transition_begin, "linear", allow_zero=True)

    def schedule(count: Tensor) -> Tensor:
        frac = ((_f(count) - begin) / n).clamp(0.0, 1.0)
        return a + (b - a) * frac

    return schedule


def cosine(init_value: float, decay_steps: int, *, end_value: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``end_value`` over ``decay_steps`` updates, then constant.

    Matches ``torch.optim.lr_scheduler.CosineAnnealingLR`` (``T_max=decay_steps``,
    ``eta_min=end_value``) for ``exponent=1``.

    >>> s = cosine(1.0, 10)
    >>> [round(float(s(torch.tensor(c))), 6) for c in (0, 5, 10, 20)]
    [1.0, 0.5, 0.0, 0.0]
    """
    a = _value("init_value", init_value, "cosine")
    b = _value("end_value", end_value, "cosine")
    n = _steps("decay_steps", decay_steps, "cosine")
    p = check_hparam("exponent", exponent, where="fnlight.optim.cosine", low=0.0, low_inclusive=False)

    def schedule(count: Tensor) -> Tensor:
        frac = _f(count).clamp(max=n) / n
        return b + (a - b) * (0.5 * (1.0 + torch.cos(math.pi * frac))) ** p

    return schedule


def exponential(
    init_value: float,
    decay_rate: float,
    transition_steps: int = 1,
    *,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init_value * decay_rate ** ((count - transition_begin) / transition_steps)``.

    With ``staircase`` the exponent is floored (decay in discrete jumps); ``end_value``
    bounds the result (a floor when decaying, a ceiling when growing).
    ``exponential(v, gamma)`` matches ``torch.optim.lr_scheduler.ExponentialLR``.

    >>> s = exponential(1.0, 0.5, 2, staircase=True)
    >>> [float(s(torch.tensor(c))) for c in (0, 1, 2, 5)]
    [1.0, 1.0, 0.5, 0.25]
    """
    a = _value("init_value", init_value, "exponential")
    rate = check_hparam("decay_rate", decay_rate, where="fnlight.optim.exponential", low=0.0, low_inclusive=False)
    n = _steps("transition_steps", transition_steps, "exponential")
    begin = _steps("transition_begin", transition_begin, "exponential", allow_zero=True)
    end = None if end_value is None else _value("end_value", end_value, "exponential")

    def schedule(count: Tensor) -> Tensor:
        exponent = (_f(count) - begin).clamp(min=0.0) / n
        if staircase:
            exponent = torch.floor(exponent)
        value = a * torch.pow(torch.scalar_tensor(rate, dtype=torch.float64, device=count.device), exponent)
        if end is not None:
            value = value.clamp(min=end) if rate < 1 else value.clamp(max=end)
        return value

    return schedule


def piecewise_constant(values: Sequence[float], boundaries: Sequence[int]) -> Schedule:
    """``values[i]`` while ``boundaries[i-1] <= count < boundaries[i]``.

    ``len(values)`` must be ``len(boundaries) + 1`` and the boundaries increasing.

    >>> s = piecewise_constant([1.0, 0.1, 0.01], [3, 6])
    >>> [float(s(torch.tensor(c))) for c in (0, 2, 3, 5, 6, 100)]
    [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    """
    where = "piecewise_constant"
    vals = [_value(f"values[{i}]", v, where) for i, v in enumerate(_sequence("values", values, where))]
    bounds = _boundaries(boundaries, "piecewise_constant")
    if len(vals) != len(bounds) + 1:
        raise ValueError(
            f"fnlight.optim.piecewise_constant: expected len(values) == len(boundaries) + 1, "
            f"got {len(vals)} values and {len(bounds)} boundaries"
        )
    table = torch.tensor(vals, dtype=torch.float64)
    edges = torch.tensor(bounds, dtype=torch.int64)

    def schedule(count: Tensor) -> Tensor:
        index = torch.bucketize(count.to(torch.int64).cpu(), edges, right=True)
        # gather, not table[index]: indexing by a 0-d tensor is data-dependent for torch.compile (a graph break)
        return table.gather(0, index.reshape(-1)).reshape(index.shape).to(count.device)

    return schedule


def step_decay(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` updates (``torch.optim.lr_scheduler.StepLR``).

    >>> s = step_decay(1.0, 2, 0.5)
    >>> [float(s(torch.tensor(c))) for c in (0, 1, 2, 4)]
    [1.0, 1.0, 0.5, 0.25]
    """
    where = "step_decay"  # checked under this function's own names before exponential checks them again
    _value("init_value", init_value, where)
    _steps("step_size", step_size, where)
    check_hparam("gamma", gamma, where=f"fnlight.optim.{where}", low=0.0, low_inclusive=False)
    return exponential(init_value, gamma, step_size, staircase=True)


def _sequence(name: str, value: object, where: str) -> Sequence[Any]:
    """``value`` checked to be a list or tuple (a scalar, a dict or a set would be iterated wrongly or not at all)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"fnlight.optim.{where}: {name} must be a list or tuple, got {type(value).__name__} {value!r}")
    return value


def _boundaries(boundaries: Sequence[int], where: str) -> list[int]:
    bounds = [_steps(f"boundaries[{i}]", b, where) for i, b in enumerate(_sequence("boundaries", boundaries, where))]
    if any(b2 <= b1 for b1, b2 in itertools.pairwise(bounds)):
        raise ValueError(f"fnlight.optim.{where}: boundaries must be strictly increasing, got {list(boundaries)!r}")
    return bounds


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, each restarted at count 0.

    >>> s = join([constant(1.0), linear(1.0, 0.0, 2)], [3])
    >>> [float(s(torch.tensor(c))) for c in (0, 2, 3, 4, 5)]
    [1.0, 1.0, 1.0, 0.5, 0.0]
    """
    parts = [_schedule(f"schedules[{i}]", s, "join") for i, s in enumerate(_sequence("schedules", schedules, "join"))]
    bounds = _boundaries(boundaries, "join")
    if len(parts) != len(bounds) + 1:
        raise ValueError(
            f"fnlight.optim.join: expected len(schedules) == len(boundaries) + 1, "
            f"got {len(parts)} schedules and {len(bounds)} boundaries"
        )

    def schedule(count: Tensor) -> Tensor:
        out = _at(parts[0], count)
        for start, part in zip(bounds, parts[1:]):
            out = torch.where(count >= start, _at(part, (count - start).clamp(min=0)), out)
        return out

    return schedule


def warmup(schedule: Schedule, warmup_steps: int, *, init_value: float = 0.0) -> Schedule:
    """Linear warmup from ``init_value`` to ``schedule(0)`` over ``warmup_steps``, then ``schedule``.

    After the warmup, ``schedule`` sees the count from 0 again.

    >>> s = warmup(constant(1.0), 4)
    >>> [float(s(torch.tensor(c))) for c in (0, 2, 4, 10)]
    [0.0, 0.5, 1.0, 1.0]
    """
    inner = _schedule("schedule", schedule, "warmup")
    n = _steps("warmup_steps", warmup_steps, "warmup")
    a = _value("init_value", init_value, "warmup")

    def warmed(count: Tensor) -> Tensor:
        peak = _at(inner, torch.zeros_like(count))
        ramp = a + (peak - a) * (_f(count) / n).clamp(max=1.0)
        return torch.where(count < n, ramp, _at(inner, (count - n).clamp(min=0)))

    return warmed


def warmup_cosine(
    peak_value: float, warmup_steps: int, decay_steps: int, *, init_value: float = 0.0, end_value: float = 0.0
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value`` over ``decay_steps``.

    >>> s = warmup_cosine(1.0, 2, 4)
    >>> [round(float(s(torch.tensor(c))), 6) for c in (0, 1, 2, 4, 6)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    where = "warmup_cosine"  # checked under this function's own names before warmup and cosine check them again
    for name, value in (("peak_value", peak_value), ("init_value", init_value), ("end_value", end_value)):
        _value(name, value, where)
    _steps("warmup_steps", warmup_steps, where)
    _steps("decay_steps", decay_steps, where)
    return warmup(cosine(peak_value, decay_steps, end_value=end_value), warmup_steps, init_value=init_value)
