"""Mixed precision: autocast (bf16/fp16), fp32 master weights, dynamic fp16 loss scaling in the state."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from .._autograd import writable_grads
from .._donation import is_donating
from .._state import TrainState
from .._step import NO_CONTEXT, GradContext, Gradients
from ._base import Metrics, Transform

__all__ = ["AmpState", "with_amp"]

_FLOAT32_MAX = torch.finfo(torch.float32).max  # the scale is a float32 tensor
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    torch.bfloat16: torch.bfloat16,
    torch.float16: torch.float16,
}


class AmpState(NamedTuple):
    """The dynamic loss scale of :func:`with_amp` (fp16 only).

    Fields:
        scale: 0-d float32, the factor the loss is multiplied by before backward.
        growth_tracker: 0-d int32, consecutive finite updates since the scale last changed.
    """

    scale: Tensor
    growth_tracker: Tensor


def _cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    return optree.tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, tree)


class Amp(Transform):
    """See :func:`with_amp`."""

    name = "with_amp"

    def __init__(
        self,
        inner: Any,
        *,
        dtype: torch.dtype,
        mode: str,
        init_scale: float,
        growth_factor: float,
        backoff_factor: float,
        growth_interval: int,
        min_scale: float,
    ) -> None:
        super().__init__(inner)
        self.dtype, self.mode = dtype, mode
        self.scaling = dtype == torch.float16
        self.init_scale, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.slot = "amp" if self.scaling else None  # type: ignore[misc]

    def init(self, **options: Any) -> TrainState:
        """The inner state (cast to ``dtype`` in ``"true"`` mode) with the loss-scale slot for fp16."""
        state = self.inner.init(**options)
        if self.mode == "true":
            params = _cast_floating(state.params, self.dtype)
            state = state.replace(
                params=params, buffers=_cast_floating(state.buffers, self.dtype), opt_state=self.core.init_opt_state(params)
            )
        return state if self.slot is None else state.with_slot(self.slot, self.init_slot(state))

    def init_slot(self, state: TrainState) -> AmpState:
        device = next(iter(state.params.values())).device
        return AmpState(
            torch.tensor(self.init_scale, dtype=torch.float32, device=device), torch.zeros((), dtype=torch.int32, device=device)
        )

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        if self.mode == "true":
            batch = _cast_floating(batch, self.dtype)
        else:
            ctx = ctx._replace(autocast=self.dtype)
        if self.scaling:
            ctx = ctx._replace(loss_scale=state.slots["amp"].scale)
        return self.inner.grads(state, batch, ctx)

    def update(self, state: TrainState, g: Gradients) -> tuple[TrainState, Metrics]:
        if not self.scaling:
            return self.inner.update(state, g)
        amp: AmpState = state.slots["amp"]
        scale, tracker = (amp.scale, amp.growth_tracker) if is_donating() else (amp.scale.clone(), amp.growth_tracker.clone())
        found_inf = torch.zeros(1, dtype=torch.float32, device=scale.device)
        inv_scale = scale.double().reciprocal().float()
        grads = writable_grads(g.grads)
        if grads is not g.grads:
            g = g._replace(grads=grads)
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for grad in g.grads.values():  # fresh tensors from the gradient phase: unscaled in place
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        for (device, _), grads in groups.items():
            found = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale.to(device))
            found_inf += found.to(found_inf.device)
        bad_loss = (~torch.isfinite(g.loss.detach())).to(found_inf)
        overflow, nonfinite_loss = (bool(x) for x in torch.cat([found_inf, bad_loss.reshape(1)]).tolist())  # one read
        if nonfinite_loss and self.core.nonfinite != "ignore":
            # the loss itself is inf/NaN (the data, the model, an overflow in the forward pass): no loss scale
            # causes or cures that, so make_train_step's nonfinite policy decides (raise, skip or stop) and
            # the scale and its growth count stay as they were
            new_state, metrics = self.inner.update(state, g)
            skipped = metrics.get("skipped", torch.scalar_tensor(1.0))
        else:
            if nonfinite_loss:  # under nonfinite="ignore": skipped as an overflow, also when the gradients are finite
                overflow = True
                found_inf.fill_(1.0)
            if overflow:  # an fp16 overflow in backward: skip the update, back off
                new_state, metrics = state.replace(buffers=dict(g.buffers)), {}
            else:
                new_state, metrics = self.inner.update(state, g)
            torch._amp_update_scale_(scale, tracker, found_inf, self.growth_factor, self.backoff_factor, self.growth_interval)
            scale.clamp_(min=self.min_scale)
            skipped = torch.scalar_tensor(float(overflow))
        new_state = new_state.replace(slots={**new_state.slots, "amp": AmpState(scale, tracker)})
        # a copy: inside a fold the slot's tensor is updated in place by later steps (an observer keeps metrics)
        return new_state, {**metrics, "loss_scale": scale.detach().clone(), "skipped": skipped}


def with_amp(
    step: Any,
    *,
    dtype: str | torch.dtype = "bf16",
    mode: str = "mixed",
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    min_scale: float = 1.0,
) -> Amp:
    """Mixed or low precision: bf16/fp16 compute, with dynamic loss scaling for fp16.

    ``mode="mixed"`` runs the forward pass and loss under ``torch.autocast(dtype)`` and keeps
    fp32 master weights and optimizer state. ``mode="true"`` casts the parameters,
    buffers, optimizer state and floating inputs to ``dtype`` and runs without autocast.

    With fp16 the loss is multiplied by a dynamic scale held in ``state.slots["amp"]``;
    gradients are unscaled before the update (so clipping and checks see true values). An
    update whose gradients hold inf/NaN behind a finite loss (an fp16 overflow in backward)
    is skipped — parameters, optimizer moments, step count and schedule unchanged — and the
    scale is multiplied by ``backoff_factor``; after ``growth_interval`` finite updates in a
    row it is multiplied by ``growth_factor``. A non-finite *loss* is not an overflow that
    the scale could cure: ``make_train_step``'s ``nonfinite`` policy handles it (``"raise"``
    by default; ``"skip"``, ``"stop"``) and the scale stays as it was (under ``"ignore"`` it
    is skipped as an overflow). The metrics carry ``loss_scale`` and ``skipped`` (0.0 or
    1.0). bf16 needs no scaling.

    Args:
        step: the step to wrap (see docs/transforms.md for the order).
        dtype: ``"bf16"`` or ``"fp16"`` (or the torch dtypes).
        mode: ``"mixed"`` or ``"true"``.
        init_scale, growth_factor, backoff_factor, growth_interval, min_scale: the fp16
            loss-scale dynamics (``torch.amp.GradScaler``'s defaults, plus a floor).

    Returns:
        The wrapped step.

    Raises:
        ValueError, TypeError: an unknown dtype or mode, an option out of range, or a wrong
            composition order.

    >>> import torch, fnlight as fl
    >>> core = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> step = fl.with_amp(core, dtype="fp16", init_scale=1024.0)
    >>> state, metrics = step(step.init(), (torch.ones(4, 2), torch.zeros(4, 1)))
    >>> float(metrics["loss_scale"]), float(metrics["skipped"])
    (1024.0, 0.0)
    """
    resolved = _DTYPES.get(dtype) if isinstance(dtype, (str, torch.dtype)) else None  # type: ignore[call-overload]
    if resolved is None:
        raise ValueError(f"with_amp: dtype must be 'bf16' or 'fp16' (or torch.bfloat16/torch.float16), got {dtype!r}")
    if mode not in ("mixed", "true"):
        raise ValueError(f"with_amp: mode must be 'mixed' or 'true', got {mode!r}")
    for name, value, low in (
        ("init_scale", init_scale, 0.0),
        ("min_scale", min_scale, 0.0),
        ("growth_factor", growth_factor, 1.0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= _FLOAT32_MAX:
            raise ValueError(
                f"with_amp: {name} must be a finite number > {low} (a float32: at most {_FLOAT32_MAX:.4g}), got {value!r}"
            )
        if value < _FLOAT32_TINY:
            raise ValueError(f"with_amp: {name} must be at least {_FLOAT32_TINY:.4g} (float32's smallest normal), got {value!r}")
    if isinstance(backoff_factor, bool) or not isinstance(backoff_factor, (int, float)) or not 0 < backoff_factor < 1:
        raise ValueError(f"with_amp: backoff_factor must be in (0, 1), got {backoff_factor!r}")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or not 1 <= growth_interval < 2**31:
        raise ValueError(f"with_amp: growth_interval must be an int in [1, 2**31) (an int32 count), got {growth_interval!r}")
    if min_scale > init_scale:
        raise ValueError(f"with_amp: min_scale ({min_scale!r}) must not exceed init_scale ({init_scale!r})")
    return Amp(
        step,
        dtype=resolved,
        mode=mode,
        init_scale=float(init_scale),
        growth_factor=float(growth_factor),
        backoff_factor=float(backoff_factor),
        growth_interval=growth_interval,
        min_scale=float(min_scale),
    )
