"""TrainState: the one immutable pytree that holds everything that changes during training."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from optree import dataclasses as odc
from torch import Tensor, nn

from ._donation import check_live

__all__ = ["NAMESPACE", "DataPosition", "TrainState"]

NAMESPACE = "fnlight"


def _scalar(value: int | bool, dtype: torch.dtype = torch.int64) -> Tensor:
    return torch.tensor(value, dtype=dtype)


@odc.dataclass(frozen=True, namespace=NAMESPACE)
class DataPosition:
    """Where the fold is in the data: the epoch and the batch offset within it (0-d int64)."""

    epoch: Tensor = odc.field(default_factory=lambda: _scalar(0))
    batch: Tensor = odc.field(default_factory=lambda: _scalar(0))


@odc.dataclass(frozen=True, namespace=NAMESPACE)
class TrainState:
    """Everything that changes during training, as one immutable pytree.

    Leaves are tensors (or plain Python scalars inside transform slots). The module
    skeleton is a static field: it holds no data (its tensors live on the ``meta``
    device) and is shared by every state derived from the same ``init``.

    Fields:
        step: 0-d int64 tensor, the number of optimizer updates applied so far.
        params: trainable and frozen parameters by qualified name.
        buffers: module buffers (BatchNorm running statistics...) by qualified name.
        opt_state: the optimizer's state pytree.
        key: 0-d int64 tensor, the seed from which all randomness is derived.
        data: the fold's position in the data (epoch, batch offset).
        slots: one named entry per transform that needs state.
        stop: 0-d bool tensor; ``fold`` stops when it is true.
        skeleton: the module structure (static, on the meta device).

    Use :meth:`replace` to derive a new state; states are never mutated by a step
    called directly. Example:

    >>> import torch, fnlight as fl
    >>> step = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> state = step.init(seed=0)
    >>> int(state.step), sorted(state.params)
    (0, ['bias', 'weight'])
    """

    step: Tensor
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    opt_state: Any
    key: Tensor
    data: DataPosition = odc.field(default_factory=DataPosition)
    slots: dict[str, Any] = odc.field(default_factory=dict)
    stop: Tensor = odc.field(default_factory=lambda: _scalar(False, torch.bool))
    skeleton: nn.Module | None = odc.field(default=None, pytree_node=False, repr=False, compare=False)

    def replace(self, **changes: Any) -> TrainState:
        """Return a copy of this state with ``changes`` applied (the original is unchanged)."""
        if not changes.keys() <= _FIELD_NAMES:
            raise TypeError(
                f"TrainState.replace() got unknown field(s) {sorted(set(changes) - _FIELD_NAMES)}; "
                f"expected some of {sorted(_FIELD_NAMES)}"
            )
        if len(self.__dict__) > _FIELDS:  # a mark beside the fields: a donated state gives no copy (one len())
            check_live(self, "TrainState.replace")
        # Field by field: dataclasses.replace re-runs __init__, ~5x slower on the step's hot path.
        new = object.__new__(TrainState)
        fields = new.__dict__
        for name in _FIELD_ORDER:
            fields[name] = changes[name] if name in changes else self.__dict__[name]
        return new

    def with_slot(self, name: str, value: Any) -> TrainState:
        """Return a copy with transform slot ``name`` set to ``value``.

        Raises:
            TypeError: ``name`` is not a non-empty string (a transform whose ``slot`` is ``None``,
                such as ``with_amp`` in bfloat16, keeps no slot).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"TrainState.with_slot: name must be a non-empty string (the slot's key in state.slots), got {name!r}; "
                "a transform whose slot is None (e.g. with_amp in bfloat16) keeps no slot: give the state none"
            )
        return self.replace(slots={**self.slots, name: value})


_FIELD_ORDER = tuple(f.name for f in dataclasses.fields(TrainState))
_FIELD_NAMES = frozenset(_FIELD_ORDER)
_FIELDS = len(_FIELD_ORDER)
_DYNAMIC = tuple(f.name for f in dataclasses.fields(TrainState) if f.name != "skeleton")


def _flatten(state: TrainState) -> tuple[list[Any], Any]:
    return [getattr(state, name) for name in _DYNAMIC], state.skeleton


def _unflatten(values: Any, skeleton: Any) -> TrainState:
    return TrainState(**dict(zip(_DYNAMIC, values)), skeleton=skeleton)


def _flatten_with_keys(state: TrainState) -> tuple[list[tuple[Any, Any]], Any]:
    return [(torch_pytree.GetAttrKey(n), getattr(state, n)) for n in _DYNAMIC], state.skeleton


torch_pytree.register_pytree_node(
    TrainState,
    _flatten,
    _unflatten,
    serialized_type_name="fnlight.TrainState",
    flatten_with_keys_fn=_flatten_with_keys,
)
torch_pytree.register_dataclass(DataPosition, serialized_type_name="fnlight.DataPosition")
