"""Activation checkpointing: recompute chosen submodules' activations in backward instead of storing them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .._state import TrainState
from ._base import Transform

__all__ = ["ACTIVATION_CHECKPOINT_MARK", "with_activation_checkpointing"]

ACTIVATION_CHECKPOINT_MARK = "_fnlight_activation_checkpoint"

Selector = Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[str, nn.Module], bool]


def _checkpointed(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``module``'s forward under non-reentrant checkpointing, its recompute writing no buffer.

    The recompute in backward runs the forward again: BatchNorm would update its running
    statistics and ``num_batches_tracked`` a second time, and a forward that reassigns a
    buffer would reassign it again. During the recompute every buffer of the submodule is a
    scratch copy of the buffer as the first run found it (a forward that reads a buffer it
    updates computes what it computed the first time), and the buffers as the first run left
    them are put back after it.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if torch.compiler.is_compiling():  # traced (with_compile): the graph writes the buffers once itself
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        calls, found = 0, []

        def once(*a: Any, **k: Any) -> Any:
            nonlocal calls, found
            calls += 1
            if calls == 1:
                found = _buffer_copies(module)  # what the first run reads, for the recompute to read too
                return forward(*a, **k)
            with _scratch_buffers(found):  # the recompute
                return forward(*a, **k)

        return torch.utils.checkpoint.checkpoint(once, *args, use_reentrant=False, **kwargs)

    setattr(run, ACTIVATION_CHECKPOINT_MARK, True)
    return run


def _buffer_copies(module: nn.Module) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each buffer slot of ``module`` and its submodules, with copies of the buffers it holds now."""
    return [
        (m._buffers, {name: None if b is None else b.detach().clone() for name, b in m._buffers.items()})
        for m in module.modules()
        if m._buffers
    ]


@contextlib.contextmanager
def _scratch_buffers(copies: list[tuple[dict[str, Any], dict[str, Any]]]) -> Iterator[None]:
    """The copies (:func:`_buffer_copies`) in their slots for the block; the slots as they were before it, after."""
    saved = [dict(store) for store, _ in copies]
    for store, copied in copies:
        store.update(copied)  # the copies are this recompute's own: it may write into them
    try:
        yield
    finally:
        for (store, _), before in zip(copies, saved, strict=True):
            store.clear()
            store.update(before)


class ActivationCheckpointing(Transform):
    """See :func:`with_activation_checkpointing`."""

    name = "with_activation_checkpointing"

    def __init__(self, inner: Any, *, names: tuple[str, ...]) -> None:
        super().__init__(inner)
        self.names = names

    def init(self, **options: Any) -> TrainState:
        """The inner state, with the chosen submodules of its (private) skeleton checkpointed."""
        state = self.inner.init(**options)
        for name in self.names:
            module = state.skeleton.get_submodule(name)
            if ACTIVATION_CHECKPOINT_MARK not in getattr(module.__dict__.get("forward"), "__dict__", {}):
                module.forward = _checkpointed(module, module.forward)
        return state


def _select(model: nn.Module, modules: Selector) -> tuple[str, ...]:
    where = "with_activation_checkpointing"
    named = dict(model.named_modules())
    if isinstance(modules, type) or (isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules)):
        chosen = [n for n, m in named.items() if n and isinstance(m, modules)]
    elif isinstance(modules, (list, tuple)):
        # a module registered under several names (a shared block) is listed once by named_modules: any of its names
        # selects it, under the name the skeleton's named_modules gives it
        canonical = {id(m): n for n, m in named.items()}
        every = {n: canonical[id(m)] for n, m in model.named_modules(remove_duplicate=False)}
        unknown = [n for n in modules if not isinstance(n, str) or n not in every or not n]
        if unknown:
            raise ValueError(f"{where}: no submodule named {unknown!r}; the model has {sorted(n for n in every if n)[:20]!r}")
        chosen = list(dict.fromkeys(every[n] for n in modules))
    elif callable(modules):
        chosen = [n for n, m in named.items() if n and modules(n, m)]
    else:
        raise TypeError(
            f"{where}: modules must be a list of submodule names, a module type (or tuple of types), or a "
            f"predicate (name, module) -> bool; got {modules!r}"
        )
    if not chosen:
        raise ValueError(f"{where}: modules={modules!r} selects no submodule of {type(model).__name__}")
    nested = [n for n in chosen if any(n.startswith(o + ".") for o in chosen)]
    return tuple(n for n in chosen if n not in nested)


def with_activation_checkpointing(step: Any, *, modules: Selector) -> ActivationCheckpointing:
    """Recompute the activations of chosen submodules during backward instead of storing them.

    Each chosen submodule runs under non-reentrant ``torch.utils.checkpoint``: its
    intermediate activations are freed after the forward pass and recomputed in the
    backward pass, trading compute for memory. Gradients are unchanged (the recompute
    replays the same random state, so dropout masks match), and so are buffers: the
    recompute writes into scratch copies, so BatchNorm's running statistics and
    ``num_batches_tracked`` are updated once per step, as without checkpointing.
    Submodules nested inside a chosen one are covered by it.

    Args:
        step: the step to wrap; this transform goes innermost (docs/transforms.md).
        modules: which submodules: a list of qualified names (``["encoder.layers.0"]``),
            a module type or tuple of types (``nn.TransformerEncoderLayer``), or a predicate
            ``(name, module) -> bool``.

    Returns:
        The wrapped step.

    Raises:
        ValueError: a name that is not a submodule, a selection that matches nothing, or a
            wrong composition order.
        TypeError: ``modules`` of another kind, or ``step`` is not a train step.

    >>> import torch, fnlight as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> step = fl.with_activation_checkpointing(fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1)), modules=["0"])
    >>> state, _ = step(step.init(), (torch.ones(2, 4), torch.zeros(2, 1)))
    """
    inner_core = getattr(step, "core", None)
    model = getattr(inner_core, "_model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"with_activation_checkpointing: expected a train step, got {type(step).__name__}")
    return ActivationCheckpointing(step, names=_select(model, modules))
