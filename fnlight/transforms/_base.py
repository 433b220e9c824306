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


# What a step that transforms wrap provides (TrainStep and every Transform do).
_STEP_METHODS = ("init", "grads", "update", "flush", "finish", "updates_per")


def _drives_phases(transform: Transform) -> bool:
    """Whether ``transform`` runs the step inside it by its phases (``grads``, then ``update``), never calling it whole:
    what ``Transform.__call__`` does (a class that says otherwise sets ``_by_phases``)."""
    declared = type(transform)._by_phases
    return declared if declared is not None else type(transform).__call__ is Transform.__call__


def _whole_steps_only(layer: Any) -> bool:
    """Whether ``layer`` does its work only when the step is called whole (its ``grads`` and ``update`` pass
    through): ``with_eval``, ``with_early_stop``, ``with_tracking``, ``with_checkpointing``, a transform of one's own
    that overrides ``__call__`` alone (a class that says otherwise sets ``_whole_only``)."""
    if not isinstance(layer, Transform):
        return False
    cls = type(layer)
    if cls._whole_only is not None:
        return cls._whole_only
    return cls.__call__ is not Transform.__call__ and cls.grads is Transform.grads and cls.update is Transform.update


class Transform:
    """Base class of the ``with_*`` transforms.

    A transform wraps an inner step and is itself a step: ``init`` extends the inner
    state with this transform's slot (if it has one), ``grads``/``update`` pass through
    unless the transform acts in that phase, and ``__call__`` runs both phases.
    Subclasses set ``name`` (their ``with_*`` function), ``slot`` (their key in
    ``state.slots``, or ``None``; then define ``init_slot``; one of your own may not take a
    built-in transform's or an inner transform's slot) and override what they change.

    Composition order has a meaning and is enforced when the transform is built:
    see ``CANONICAL_ORDER`` and docs/transforms.md. A transform of your own (a ``name``
    not in ``CANONICAL_ORDER``) has no rank: it may wrap any step once, and be wrapped by
    any transform, except where its work would be bypassed or its slot left out of the
    checkpoints (each raises ``ValueError``):

    - ``with_compile`` compiles the core step's phases and runs nothing between them, so
      only ``with_activation_checkpointing`` may sit inside it;
    - a transform that acts in the phases (one that keeps ``Transform.__call__``, and
      ``with_activation_checkpointing``, ``with_amp``, ``with_ddp``, ``with_fsdp``,
      ``with_grad_accum``) never calls the step inside it whole, so it may not wrap one
      that does its work only in ``__call__`` (``with_grad_accum``, ``with_eval``,
      ``with_early_stop``, ``with_tracking``, ``with_checkpointing``, or one of yours
      that overrides ``__call__`` but neither ``grads`` nor ``update``);
    - one of yours that keeps a slot may not wrap ``with_checkpointing``, which writes the
      state before your transform updates its slot and resumes into a state without it.
    """

    name: ClassVar[str]
    slot: ClassVar[str | None] = None
    # how the order checks see this class when its methods alone do not tell (None: derived from what it overrides):
    # it calls the step inside it by phases only, even with a __call__ of its own; it works only on whole steps
    _by_phases: ClassVar[bool | None] = None
    _whole_only: ClassVar[bool | None] = None

    def __init__(self, inner: Any) -> None:
        name = getattr(type(self), "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{type(self).__name__}: a Transform subclass must set the class attribute name to a non-empty string "
                f"(its with_* function's name, e.g. name = 'with_grad_noise'), got {name!r}"
            )
        if not all(hasattr(inner, a) for a in ("init", "grads", "update")) or not callable(inner):
            raise TypeError(
                f"{name}: expected a train step (make_train_step(...) or a with_* transform of one), got {type(inner).__name__}"
            )
        missing = [a for a in _STEP_METHODS if not callable(getattr(inner, a, None))]
        if missing:  # the fold calls them at an epoch's end and at its own (a crash there would lose the epoch's work)
            raise TypeError(
                f"{name}: the step to wrap, a {type(inner).__name__}, has no {', '.join(missing)}: a step that transforms "
                f"wrap has all of {', '.join(_STEP_METHODS)} (subclass fnlight.Transform, which passes each to the step "
                "inside it)"
            )
        ranked = name in CANONICAL_ORDER
        slot = getattr(self, "slot", None)
        if not ranked and slot is not None:  # one of one's own: a slot of its own (the built-ins' names are theirs)
            if not isinstance(slot, str) or not slot:
                raise TypeError(f"{name}: slot must be a non-empty string (its key in state.slots) or None, got {slot!r}")
            taken = {n.removeprefix("with_"): n for n in CANONICAL_ORDER}
            for layer in layers(inner):
                if (other_slot := getattr(layer, "slot", None)) is not None:
                    taken[other_slot] = getattr(layer, "name", type(layer).__name__)
            if slot in taken:
                raise ValueError(
                    f"{name}: slot {slot!r} is {taken[slot]}'s key in state.slots; give {name} a slot name of its own "
                    f"(e.g. {name.removeprefix('with_')!r})"
                )
            if any(getattr(layer, "name", None) == "with_checkpointing" for layer in layers(inner)):
                raise ValueError(
                    f"{name} keeps a slot ({slot!r}), so it cannot wrap a step already wrapped by with_checkpointing: "
                    f"the checkpoints are written inside {name}, before it updates its slot, and a resume restores "
                    f"them into a state built without that slot. Apply {name} first, i.e. "
                    f"with_checkpointing({name}(step, ...), ...)"
                )
        mine = CANONICAL_ORDER.index(name) if ranked else -1
        by_phases = _drives_phases(self)
        for layer in layers(inner):
            other = getattr(layer, "name", None)
            if other == name:
                raise ValueError(f"{name}: the step is already wrapped by {name}; apply it once")
            if ranked and other in CANONICAL_ORDER and CANONICAL_ORDER.index(other) > mine:
                raise ValueError(
                    f"{name} cannot wrap a step already wrapped by {other}: apply {name} first, "
                    f"i.e. {other}({name}(step, ...), ...). The order, innermost first, is: " + " -> ".join(CANONICAL_ORDER)
                )
            if isinstance(layer, TrainStep):
                continue
            shown = other if isinstance(other, str) else type(layer).__name__
            if name == "with_compile" and other != "with_activation_checkpointing":
                raise ValueError(
                    f"with_compile cannot wrap a step already wrapped by {shown}: with_compile compiles the core "
                    "step's phases from its loss function, module and optimizer, so it would bypass "
                    f"{shown}; only with_activation_checkpointing may sit inside it. Apply {shown} outside "
                    f"with_compile, i.e. {shown}(with_compile(step, ...), ...)"
                )
            if by_phases and _whole_steps_only(layer):
                raise ValueError(
                    f"{name} cannot wrap a step already wrapped by {shown}: {name} drives the step inside it by its "
                    f"phases (grads, then update) and never calls it whole, while {shown} does its work when the step "
                    f"is called whole, so it would never run. Apply {name} first, i.e. {shown}({name}(step, ...), ...)"
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
        raise NotImplementedError(
            f"{self.name}: slot = {self.slot!r} names a slot in state.slots, so the transform must define "
            "init_slot(self, state) returning that slot's initial value"
        )

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

    def abort(self) -> None:
        """Called by the fold when a step or the data raised: release what the transform holds (tracker runs, a
        checkpoint being written) without more work on the state, which the error may have left half-updated."""
        abort = getattr(self.inner, "abort", None)
        if abort is not None:
            abort()

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
