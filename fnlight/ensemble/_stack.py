"""Stacked states: K TrainStates as one, with the replicas on the leading dimension of every tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from .._interop import _require_skeleton
from .._state import NAMESPACE, DataPosition, TrainState
from .._tree import module_difference

__all__ = ["ensemble_size", "replica_state", "stack_states", "unstack_states"]

# Stacked: one entry per replica on dimension 0. Shared: replicas advance together.
STACKED = ("params", "buffers", "opt_state", "key", "slots")
SHARED = ("step", "stop")


def _path(field: str, path: tuple[Any, ...]) -> str:
    return field + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in path)


def _check(state: Any, where: str) -> TrainState:
    _require_skeleton(state, where, stacked=True)  # a live TrainState with a skeleton
    return state


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """Stack K states into one ensemble state: every tensor gets a leading dimension of size K.

    ``params``, ``buffers``, ``opt_state``, ``key`` and ``slots`` are stacked (replica ``i``
    is index ``i`` of each tensor; optimizer hyperparameters become ``[K]`` tensors, so
    replicas may differ in learning rate). ``step``, ``data`` and ``stop`` are shared: the
    replicas of an ensemble advance together, so they must be equal. The skeleton is the
    first state's. Non-tensor leaves must be equal. The tensors are copied.

    Args:
        states: K ≥ 1 states of the same model and optimizer structure (e.g. from
            ``make_train_step(...).init(seed=s)`` for K seeds).

    Returns:
        The stacked state, which :func:`unstack_states` turns back into K states.

    Raises:
        TypeError: ``states`` is not a non-empty sequence of ``TrainState``.
        ValueError: the states differ in structure, in a tensor's shape, dtype or device, in
            a non-tensor leaf, in ``step``/``data``/``stop``, or in their model (a module's class
            or settings, e.g. ``ReLU`` against ``Tanh``); the message names the path.

    >>> import torch, fnlight as fl
    >>> from fnlight.ensemble import stack_states
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> stacked = stack_states([step.init(seed=s) for s in range(4)])
    >>> stacked.params["weight"].shape, stacked.key.tolist(), int(stacked.step)
    (torch.Size([4, 1, 3]), [0, 1, 2, 3], 0)
    """
    where = "stack_states"
    if isinstance(states, TrainState) or not isinstance(states, Sequence) or not states:
        raise TypeError(f"{where}: expected a non-empty sequence of fnlight.TrainState, got {states!r:.80}")
    states = [_check(s, f"{where}: states[{i}]") for i, s in enumerate(states)]
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        for name, a, b in (
            ("step", first.step, s.step),
            ("stop", first.stop, s.stop),
            ("data.epoch", first.data.epoch, s.data.epoch),
            ("data.batch", first.data.batch, s.data.batch),
        ):
            if not torch.equal(a, b):
                raise ValueError(
                    f"{where}: states[{i}].{name} is {b.tolist()}, states[0].{name} is {a.tolist()}; "
                    "the replicas of an ensemble advance together: stack states that are at the same point"
                )
    flat = [optree.tree_flatten_with_path(tuple(getattr(s, f) for f in STACKED), namespace=NAMESPACE) for s in states]
    paths, leaves0, spec = flat[0]
    names = [_path(STACKED[p[0]], p[1:]) for p in paths]
    for i, (paths_i, _, spec_i) in enumerate(flat[1:], 1):
        if spec_i != spec:
            only = sorted({_path(STACKED[p[0]], p[1:]) for p in set(paths_i) ^ set(paths)})
            raise ValueError(
                f"{where}: states[{i}] has a different structure from states[0]"
                + (f" (paths in one only: {only[:6]})" if only else f": {spec_i} vs {spec}")
                + "; stack states of the same model, optimizer and transforms"
            )
    stacked = []
    for j, leaf in enumerate(leaves0):
        column = [f[1][j] for f in flat]
        if isinstance(leaf, Tensor):
            for i, t in enumerate(column):
                if not isinstance(t, Tensor) or (t.shape, t.dtype, t.device) != (leaf.shape, leaf.dtype, leaf.device):
                    raise ValueError(
                        f"{where}: states[{i}].{names[j]} is {_describe(t)}, states[0].{names[j]} is {_describe(leaf)}"
                    )
            stacked.append(torch.stack([t.detach() for t in column]))
        else:
            for i, v in enumerate(column):
                if isinstance(v, Tensor) or v != leaf:
                    raise ValueError(
                        f"{where}: states[{i}].{names[j]} is {v!r}, states[0].{names[j]} is {leaf!r}; "
                        "non-tensor leaves must be equal"
                    )
            stacked.append(leaf)
    for i, s in enumerate(states[1:], 1):  # the replicas share states[0]'s skeleton: it must be the same model
        if s.skeleton is not first.skeleton and (difference := module_difference(first.skeleton, s.skeleton, "states[0]")):
            raise ValueError(
                f"{where}: states[{i}] is a state of another model than states[0] ({difference}); the stacked state keeps "
                "states[0]'s module skeleton for every replica: stack states of one model"
            )
    fields = optree.tree_unflatten(spec, stacked)
    return first.replace(
        **dict(zip(STACKED, fields)),
        step=first.step.clone(),
        stop=first.stop.clone(),
        data=DataPosition(epoch=first.data.epoch.clone(), batch=first.data.batch.clone()),
    )


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"Tensor{list(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"
    return repr(t)


def ensemble_size(state: TrainState) -> int:
    """The number of replicas K of a stacked state (the length of its ``key``).

    Raises:
        ValueError: ``state`` is an ordinary (unstacked) state.

    >>> import torch, fnlight as fl
    >>> from fnlight.ensemble import ensemble_size, stack_states
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> ensemble_size(stack_states([step.init(seed=0), step.init(seed=1)]))
    2
    """
    _check(state, "ensemble_size")
    return _size(state, "ensemble_size")


def _size(state: TrainState, where: str) -> int:
    key = state.key
    if not isinstance(key, Tensor) or key.ndim != 1:
        shape = list(key.shape) if isinstance(key, Tensor) else type(key).__name__
        raise ValueError(
            f"{where}: expected a stacked ensemble state (key of shape [K]), got a state whose key has shape {shape}; "
            "build one with fnlight.ensemble.stack_states or an ensemble step's init"
        )
    return key.shape[0]


def replica_state(state: TrainState, index: int) -> TrainState:
    """Replica ``index`` of a stacked state, as an ordinary ``TrainState`` (copies of its tensors).

    It can be trained further with an ordinary step (see :meth:`EnsembleStep.replica_step`),
    evaluated, exported with :func:`fnlight.to_module` or checkpointed like any state.

    Raises:
        TypeError: ``index`` is not an int.
        ValueError: ``state`` is not stacked.
        IndexError: ``index`` is out of range.

    >>> import torch, fnlight as fl
    >>> from fnlight.ensemble import replica_state, stack_states
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> one = replica_state(stack_states([step.init(seed=0), step.init(seed=7)]), 1)
    >>> int(one.key), one.params["weight"].shape
    (7, torch.Size([1, 3]))
    """
    where = "replica_state"
    _check(state, where)
    k = _size(state, where)
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"{where}: index must be an int, got {index!r}")
    if not -k <= index < k:
        raise IndexError(f"{where}: index {index} is out of range for an ensemble of {k} replicas")
    return _pick(state, index)


def _pick(state: TrainState, index: int) -> TrainState:
    pick = lambda x: x[index].clone() if isinstance(x, Tensor) else x
    return state.replace(
        **{f: optree.tree_map(pick, getattr(state, f), namespace=NAMESPACE) for f in STACKED},
        step=state.step.clone(),
        stop=state.stop.clone(),
        data=DataPosition(epoch=state.data.epoch.clone(), batch=state.data.batch.clone()),
    )


def unstack_states(state: TrainState) -> list[TrainState]:
    """The K replicas of a stacked state as ordinary states (the inverse of :func:`stack_states`).

    Raises:
        ValueError: ``state`` is not stacked.

    >>> import torch, fnlight as fl
    >>> from fnlight.ensemble import stack_states, unstack_states
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> states = [step.init(seed=s) for s in range(3)]
    >>> all(fl.tree_equal(a.params, b.params) for a, b in zip(unstack_states(stack_states(states)), states))
    True
    """
    where = "unstack_states"
    _check(state, where)
    return [_pick(state, i) for i in range(_size(state, where))]
