"""What a transform is: a step that wraps a step, adds one concern, and knows its place in the order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from torch import Tensor

from .._state import TrainState
from .._step import NO_CONTEXT, GradContext, Gradients, TrainStep

__all__ = ["CANONICAL_ORDER", "Transform", "layers", "merge_metrics"]

Metrics = dict[str, Tensor]

# Innermost first. A transform may only wrap steps whose transforms come earlier here.
CANONICAL_ORDER = (
    "with_activation_checkpointing",
    "with_compile",
    "with_amp",
    "with_ddp",
    "with_fsdp",
    "with_grad_accum",
    "with_ema",
    "with_swa",
    "with_eval",
    "with_early_stop",
    "with_tracking",
    "with_checkpointing",
)


def layers(step: Any) -> Iterator[Any]:
    """The chain of a step, outermost first, ending with the core :class:`TrainStep`."""
    while step is not None:
        yield step
        step = getattr(step, "inner", None)


def merge_metrics(first: Metrics, second: Metrics) -> Metrics:
    """``first`` updated with ``second`` (no copy when ``second`` is empty)."""
    return {**first, **second} if second else first


class Transform:
    """Base class of the ``with_*`` transforms.

    A transform wraps an inner step and is itself a step: ``init`` extends the inner
    state with this transform's slot (if it has one), ``grads``/``update`` pass through
    unless the transform acts in that phase, and ``__call__`` runs both phases.
    Subclasses set ``name`` (their ``with_*`` function), ``slot`` (their key in
    ``state.slots``, or ``None``) and override what they change.

    Composition order has a meaning and is enforced when the transform is built:
    see ``CANONICAL_ORDER`` and docs/transforms.md.
    """

    name: ClassVar[str]
    slot: ClassVar[str | None] = None

    def __init__(self, inner: Any) -> None:
        if not all(hasattr(inner, a) for a in ("init", "grads", "update")) or not callable(inner):
            raise TypeError(
                f"{self.name}: expected a train step (make_train_step(...) or a with_* transform of one), "
                f"got {type(inner).__name__}"
            )
        mine = CANONICAL_ORDER.index(self.name)
        for layer in layers(inner):
            other = getattr(layer, "name", None)
            if other == self.name:
                raise ValueError(f"{self.name}: the step is already wrapped by {self.name}; apply it once")
            if other in CANONICAL_ORDER and CANONICAL_ORDER.index(other) > mine:
                raise ValueError(
                    f"{self.name} cannot wrap a step already wrapped by {other}: apply {self.name} first, "
                    f"i.e. {other}({self.name}(step, ...), ...). The order, innermost first, is: " + " -> ".join(CANONICAL_ORDER)
                )
        self.inner = inner

    @property
    def core(self) -> TrainStep:
        """The innermost :class:`TrainStep` of the chain."""
        return self.inner.core

    def init(self, **options: Any) -> TrainState:
        """The inner step's initial state, extended with this transform's slot."""
        state = self.inner.init(**options)
        return state if self.slot is None else state.with_slot(self.slot, self.init_slot(state))

    def init_slot(self, state: TrainState) -> Any:
        """This transform's initial slot value, given the inner initial state."""
        raise NotImplementedError

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        """The gradient phase (passes through unless the transform acts here)."""
        return self.inner.grads(state, batch, ctx)

    def update(self, state: TrainState, g: Gradients) -> tuple[TrainState, Metrics]:
        """The update phase (passes through unless the transform acts here)."""
        return self.inner.update(state, g)

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """Apply anything pending at the end of an epoch (the fold calls this)."""
        return self.inner.flush(state)

    def finish(self, state: TrainState) -> None:
        """Called by the fold when it ends (e.g. to wait for background writes)."""
        self.inner.finish(state)

    def save_now(self, state: TrainState) -> Any:
        """Write a checkpoint now, if a ``with_checkpointing`` is in the chain (else ``None``)."""
        return self.inner.save_now(state) if hasattr(self.inner, "save_now") else None

    def updates_per(self, batches: int) -> int:
        """Optimizer updates made from ``batches`` calls (with an epoch-end flush)."""
        return self.inner.updates_per(batches)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        g = self.grads(state, batch)
        new_state, metrics = self.update(state, g)
        return new_state, merge_metrics(g.metrics, metrics)

    def __repr__(self) -> str:
        return f"{self.name}({self.inner!r})"
