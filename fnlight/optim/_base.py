"""The optimizer interface: optax-style pairs of pure functions over torch's own kernels."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "GradientTransformation",
    "Optimizer",
    "ScalarOrSchedule",
    "Schedule",
    "chain",
    "check_hparam",
    "hparam",
    "resolve_lr",
]

Params = dict[str, Tensor]


class Schedule(Protocol):
    """A pure function of the optimizer-update count (0-d tensor) returning a 0-d float tensor."""

    def __call__(self, count: Tensor) -> Tensor: ...


ScalarOrSchedule = float | Schedule


class GradientTransformation(NamedTuple):
    """A pure gradient-to-gradient transformation (clipping, scaling...).

    ``init(params) -> state`` and ``update(grads, state, params) -> (grads, state)``.
    ``update`` never mutates its arguments.
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]


class Optimizer(NamedTuple):
    """A terminal optimizer: ``init(params) -> state`` and
    ``apply(params, grads, state, *, inplace) -> (params, state)``.

    With ``inplace=False`` (a direct call) the inputs are left untouched and new
    tensors are returned. With ``inplace=True`` (inside :func:`fnlight.fold`, which
    owns its states) the parameters and the optimizer state are updated in place by
    torch's fused or multi-tensor kernels and returned.

    ``check(params, state)``, optional, raises when ``state`` cannot be applied to
    ``params`` (another optimizer's state, a missing entry, another shape). The built-in
    optimizers run it on every direct call; a train step runs it when it is given a state
    it did not produce itself (the first update of a fold, a state edited in between), not
    on every update of a fold: torch's fused kernels do not check shapes, and a parameter
    and its moments of different sizes would make them read and write out of bounds.
    """

    init: Callable[[Params], Any]
    apply: Callable[..., tuple[Params, Any]]
    check: Callable[[Params, Any], None] | None = None


def check_state(
    where: str,
    params: Mapping[str, Tensor],
    state: Any,
    expected: type,
    fields: Mapping[str, bool],
    grads: Mapping[str, Tensor] | None = None,
    hparams: Sequence[str] = (),
) -> None:
    """Raise unless ``state`` is an ``expected`` whose per-parameter ``fields`` fit ``params``.

    ``fields`` maps each per-parameter field of the state to whether these options use it
    (an unused one must be empty, as ``init`` built it). ``grads``, when given, must have
    every parameter's shape too. ``state.hparams`` must hold each of ``hparams`` (a replaced
    dict that dropped one failed in the update with a bare ``KeyError``). One comparison of
    shapes per tensor.
    """
    if type(state) is not expected:
        raise TypeError(
            f"{where}: the optimizer state must be the {expected.__name__} that {where}'s init builds, "
            f"got {type(state).__name__}; build the state with the optimizer the step applies (step.init())"
        )
    missing = [name for name in hparams if name not in state.hparams]
    if missing:
        raise ValueError(
            f"{where}: state.hparams has no {missing[0]!r} (it holds {sorted(state.hparams)}, expected {list(hparams)}); "
            "to change one, keep the others: hparams={**state.hparams, 'lr': ...}"
        )
    per_parameter = []
    for field, used in fields.items():
        entries = getattr(state, field)
        if used:
            per_parameter.append((f"state.{field}", entries))
        elif entries:
            raise ValueError(
                f"{where}: state.{field} must be empty with these options, got entries for {sorted(entries)[:3]}: "
                f"the state was built by the same optimizer with other options"
            )
    if grads is not None:
        per_parameter.append(("grads", grads))
    for what, entries in per_parameter:
        state_entry = what != "grads"
        for name, p in params.items():
            t = entries.get(name)
            if t is None:
                why = (
                    ": the state was built for other parameters, or by the same optimizer with other options"
                    if state_entry
                    else f" (grads: {sorted(entries)[:5]})"
                )
                raise ValueError(f"{where}: {what} has no entry for parameter {name!r}{why}")
            if t.shape != p.shape:
                why = ": the state was built for other parameters" if state_entry else ""
                raise ValueError(f"{where}: {what}[{name!r}] has shape {tuple(t.shape)}, the parameter has {tuple(p.shape)}{why}")


def hparam(value: float) -> Tensor:
    """A hyperparameter as a 0-d float64 tensor on the CPU (read without a device sync)."""
    return torch.tensor(float(value), dtype=torch.float64)


def check_hparam(
    name: str,
    value: Any,
    *,
    where: str,
    low: float = 0.0,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
) -> float:
    """Validate a float hyperparameter at build time and return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a float, got {value!r} of type {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond any float
        v = math.inf
    ok_low = v >= low if low_inclusive else v > low
    ok_high = True if high is None else (v <= high if high_inclusive else v < high)
    if not (math.isfinite(v) and ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "inf)" if high is None else (f"{high}]" if high_inclusive else f"{high})")
        raise ValueError(f"{where}: {name} must be in {lo}{low}, {hi}, got {value!r}")
    return v


def check_lr(learning_rate: Any, *, where: str) -> ScalarOrSchedule:
    """Validate a learning rate (a non-negative float or a schedule) at build time."""
    if callable(learning_rate):
        return learning_rate
    return check_hparam("learning_rate", learning_rate, where=where)


def scheduled(learning_rate: Schedule, count: Tensor) -> Tensor:
    """A schedule's learning rate after ``count`` updates as a 0-d float64 tensor (a float returned is accepted).

    >>> scheduled(lambda c: 0.1 * 0.5 ** int(c), torch.tensor(2))
    tensor(0.0250, dtype=torch.float64)
    """
    value = learning_rate(count)
    if isinstance(value, Tensor):
        if value.numel() != 1:  # float() of it failed in the update with torch's message naming no schedule
            raise TypeError(
                f"learning-rate schedule {getattr(learning_rate, '__qualname__', learning_rate)!r} must return a 0-d tensor "
                f"or a float, got a tensor of shape {list(value.shape)} for the update after {int(count)} updates"
            )
        return value.to(torch.float64).reshape(())  # hparams["lr"] is 0-d, as documented, even for a shape-(1,) value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"learning-rate schedule {getattr(learning_rate, '__qualname__', learning_rate)!r} must return a 0-d tensor "
            f"or a float, got {type(value).__name__}: {value!r} for the update after {int(count)} updates"
        )
    return torch.tensor(float(value), dtype=torch.float64)


def resolve_lr(learning_rate: ScalarOrSchedule, count: Tensor, hparams: Mapping[str, Tensor]) -> tuple[float, dict[str, Tensor]]:
    """The learning rate for the update after ``count`` updates, and the hparams to store."""
    if callable(learning_rate):
        lr_t = scheduled(learning_rate, count)
        lr = float(lr_t)
        if not (math.isfinite(lr) and lr >= 0.0):  # checked before the update: the state is left as it was
            raise ValueError(
                f"learning-rate schedule {getattr(learning_rate, '__qualname__', learning_rate)!r} gave {lr!r} "
                f"for the update after {int(count)} updates; a learning rate must be finite and >= 0"
            )
        return lr, {**hparams, "lr": lr_t}
    return float(hparams["lr"]), dict(hparams)


def chain(*parts: GradientTransformation | Optimizer) -> Optimizer:
    """Compose gradient transformations and end with one optimizer.

    The gradients flow through each transformation in order, then the optimizer
    applies them. The state is the tuple of the parts' states.

    >>> import fnlight as fl
    >>> opt = fl.optim.chain(fl.optim.clip_by_global_norm(1.0), fl.optim.adamw(1e-3))
    >>> isinstance(opt, fl.optim.Optimizer)
    True
    """
    if not parts:
        raise ValueError("chain(): expected gradient transformations followed by one Optimizer, got nothing")
    *transforms, last = parts
    if not isinstance(last, Optimizer):
        raise TypeError(f"chain(): the last part must be an Optimizer (e.g. fnlight.optim.adamw(...)), got {type(last).__name__}")
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain(): part {i} must be a GradientTransformation (clip_by_global_norm, ...); "
                f"an Optimizer may only come last, got {type(t).__name__}"
            )

    def init(params: Params) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms) + (last.init(params),)

    def check_tuple(state: Any) -> None:
        if type(state) is not tuple or len(state) != len(parts):
            got = f"a tuple of {len(state)}" if type(state) is tuple else type(state).__name__
            raise TypeError(f"chain(): the state must be the tuple of the {len(parts)} parts' states that init builds, got {got}")

    def check(params: Params, state: Any) -> None:
        check_tuple(state)
        if last.check is not None:
            last.check(params, state[-1])

    def apply(params: Params, grads: Params, state: tuple[Any, ...], *, inplace: bool) -> tuple[Params, tuple[Any, ...]]:
        if not inplace:
            check_tuple(state)  # the optimizer's own apply checks its state on a direct call
        new_states = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        params, s = last.apply(params, grads, state[-1], inplace=inplace)
        return params, (*new_states, s)

    return Optimizer(init, apply, check)
