"""The train step's phases as functions of tensors only, for ``torch.compile`` (see ``with_compile``).

:class:`fnlight.TrainStep` runs its phases with Python bookkeeping around the tensor work:
it reads the step counter and the key as Python ints for the dropout seed, reads the loss
for the finiteness check, and hands the optimizer Python floats. Each of those is a graph
break or a recompilation inside ``torch.compile``. The functions here are the tensor work
alone, built from the core step's pieces (its loss function, trainable names, optimizer and
the state's module skeleton): everything that changes from step to step arrives as a
tensor argument, so one graph serves every step. The Python bookkeeping (seeding the
generator, the finiteness decision, assembling the new state) stays outside, in
:mod:`fnlight.transforms._compile`.

Every function takes ``inplace``: ``True`` inside :func:`fnlight.fold` (donation; the
graph writes the new parameters, moments and buffers into the input tensors), ``False``
for a direct, pure call (new tensors out, inputs untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._bind import bind, reassigned, unbind
from ._step import TrainStep, _name, _split_output

__all__ = ["make_apply_fn", "make_grads_fn", "make_step_fn", "set_leaves", "writable", "written_in_place"]

GradsOut = tuple[Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]

# 0-d CPU tensors of these dtypes enter a dynamo graph with a symbolic scalar value attached
# (fake_tensor's item_memo), and torch 2.13's AOTAutograd then silently drops in-place writes
# into them (float64 measured: the input keeps its value, later reads see the stale one).
# Counters and hyperparameters are such tensors: they are never written in place in a graph.
_SCALAR_DTYPES = (torch.float64, torch.int64, torch.int32, torch.int16, torch.int8)


def writable(t: Tensor) -> bool:
    """Whether a compiled graph may update ``t`` in place (see ``_SCALAR_DTYPES``)."""
    return t.ndim > 0 or t.dtype not in _SCALAR_DTYPES or t.device.type != "cpu"


def _commit(old: Any, new: Any, ok: Tensor | None, *, inplace: bool) -> Any:
    """``new`` (a pytree like ``old``), kept only where ``ok``; written into ``old`` when ``inplace``."""
    old_leaves, old_spec = pytree.tree_flatten(old)
    new_leaves, new_spec = pytree.tree_flatten(new)
    if old_spec != new_spec:
        raise TypeError(f"with_compile: the optimizer changed the structure of its state: {old_spec} -> {new_spec}")
    out = [_settle(o, n, ok, inplace=inplace) for o, n in zip(old_leaves, new_leaves)]
    return pytree.tree_unflatten(out, new_spec)


def _settle(old: Any, new: Any, ok: Tensor | None, *, inplace: bool) -> Any:
    """One leaf of an update: ``new`` kept only where ``ok``; written into ``old`` (then returned) when ``inplace``
    and ``old`` is :func:`writable` — other leaves come back as new tensors, as in the eager step."""
    if new is old or not isinstance(new, Tensor):
        return new
    if ok is not None:
        new = torch.where(ok.to(new.device), new, old)
    if inplace and writable(old):
        old.copy_(new)
        return old
    return new


def _finite(loss: Tensor, grads: Mapping[str, Tensor], check_grads: bool) -> Tensor:
    ok = torch.isfinite(loss)
    if check_grads and grads:
        ok = ok & torch.stack([torch.isfinite(g).all().to(loss.device) for g in grads.values()]).all()
    return ok


def make_grads_fn(core: TrainStep, *, inplace: bool, device_type: str) -> Callable[..., GradsOut]:
    """The gradient phase: ``fn(skeleton, params, buffers, batch, autocast, loss_scale, loss_weight, accumulate)``.

    Forward, loss and ``autograd.grad`` on the skeleton: :meth:`fnlight.TrainStep.grads`
    without its bookkeeping. Returns ``(loss, grads, buffers, metrics)`` like it.
    """

    def grads_fn(
        skeleton: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        batch: Any,
        autocast: torch.dtype | None,
        loss_scale: Tensor | None,
        loss_weight: Tensor | None,
        accumulate: dict[str, Tensor] | None,
    ) -> GradsOut:
        leaves = {n: params[n].detach().requires_grad_() for n in core._trainable}
        bufs = {k: b if inplace and writable(b) else b.clone() for k, b in buffers.items()}
        saved = bind(skeleton, {**params, **leaves, **bufs})
        try:
            if autocast is None:
                out = core.loss_fn(skeleton, batch)
            else:
                with torch.autocast(device_type, dtype=autocast):
                    out = core.loss_fn(skeleton, batch)
            loss, metrics = _split_output(out, core.loss_fn)
            if not loss.requires_grad:
                raise ValueError(
                    f"loss_fn {_name(core.loss_fn)!r} returned a loss that does not depend on any trainable parameter "
                    "(no gradient can flow); did it call the model it was given?"
                )
            target = loss if loss_weight is None else _weighted(loss, loss_weight)
            if loss_scale is not None:
                target = target.float() * loss_scale
            grads = torch.autograd.grad(target, list(leaves.values()), allow_unused=True)
            if bufs:  # `self.count = self.count + 1` in forward: the new tensor is the buffer's value
                bufs.update(reassigned(skeleton, bufs))
        finally:
            unbind(saved)
        fresh = {n: g for n, g in zip(leaves, grads) if g is not None}
        if accumulate is None:
            return metrics["loss"], fresh, bufs, metrics
        # Accumulating into the caller's buffers (with_grad_accum inside the fold): every buffer
        # is returned, as AccumulateGrad leaves a preset .grad in place when no gradient arrives.
        summed = dict(accumulate)
        for n, g in fresh.items():
            summed[n] = summed[n].add_(g) if writable(summed[n]) else summed[n] + g
        return metrics["loss"], {n: summed[n] for n in leaves}, bufs, metrics

    return grads_fn


def make_apply_fn(core: TrainStep, *, inplace: bool) -> Callable[..., tuple[dict[str, Tensor], Any]]:
    """``fn(params, grads, opt_state) -> (params, opt_state)``: the optimizer's update with tensor hyperparameters.

    In place, it returns what :func:`written_in_place` returns: the parameters and optimizer
    state it could not write into its inputs.
    """

    def apply_fn(params: dict[str, Tensor], grads: dict[str, Tensor], opt_state: Any) -> tuple[dict[str, Tensor], Any]:
        new_params, new_opt = core.optimizer.apply(params, grads, opt_state, inplace=False)
        if inplace:
            return written_in_place(params, new_params, opt_state, new_opt, None)
        return _commit(params, new_params, None, inplace=False), _commit(opt_state, new_opt, None, inplace=False)

    return apply_fn


def written_in_place(
    params: dict[str, Tensor], new_params: dict[str, Tensor], opt_state: Any, new_opt: Any, ok: Tensor | None
) -> tuple[dict[str, Tensor], tuple[Any, Any]]:
    """An update written into ``params`` and ``opt_state`` (masked by ``ok``); what could not be, returned.

    Each tensor output of a graph that aliases one of its inputs costs the caller a few µs to
    hand back, so the graph returns only the rest: ``(fresh_params, (paths, leaves))``, the
    parameters that are not :func:`writable` and the optimizer state's new leaves with their
    paths (put back with :func:`set_leaves`); for an optimizer state with other containers
    than dicts, lists and tuples, ``(fresh_params, (None, new_opt_state))``.
    """
    paths: list[Any] = []
    leaves: list[Any] = []
    _changes(params, new_params, ok, (), paths, leaves)
    fresh_params = {path[0]: leaf for path, leaf in zip(paths, leaves)}
    if not (_plain(opt_state) and pytree.tree_structure(opt_state) == pytree.tree_structure(new_opt)):
        return fresh_params, (None, _commit(opt_state, new_opt, ok, inplace=True))
    paths, leaves = [], []
    _changes(opt_state, new_opt, ok, (), paths, leaves)
    return fresh_params, (tuple(paths), tuple(leaves))


def _plain(tree: Any) -> bool:
    """Whether the containers of ``tree`` are dicts, lists, tuples and named tuples only (traced once)."""
    if type(tree) is dict:
        return all(_plain(v) for v in tree.values())
    if type(tree) in (list, tuple) or (isinstance(tree, tuple) and hasattr(type(tree), "_fields")):
        return all(_plain(v) for v in tree)
    return pytree.tree_is_leaf(tree)


def _changes(old: Any, new: Any, ok: Tensor | None, path: tuple[Any, ...], paths: list[Any], leaves: list[Any]) -> None:
    """Write ``new`` into ``old`` where a leaf is writable; collect the other changed leaves with their paths.

    ``old`` and ``new`` are plain trees (see :func:`_plain`) of the same structure. A tensor
    leaf of ``new`` that is not ``old``'s own is masked by ``ok`` (when given), then copied into
    ``old``'s tensor if that one is :func:`writable`, else kept as a new leaf; a non-tensor
    leaf that changed is kept too. Only what is kept leaves the graph: the rest of the new
    tree is the old one, updated in place.
    """
    if isinstance(new, dict):
        for k, v in new.items():
            _changes(old[k], v, ok, (*path, k), paths, leaves)
    elif isinstance(new, (list, tuple)):
        for i, v in enumerate(new):
            _changes(old[i], v, ok, (*path, i), paths, leaves)
    else:
        kept = _settle(old, new, ok, inplace=True)
        if kept is not old:
            paths.append(path)
            leaves.append(kept)


def set_leaves(tree: Any, paths: tuple[tuple[Any, ...], ...], leaves: tuple[Any, ...] | list[Any]) -> Any:
    """``tree`` with the leaf at each path (keys and indices from the root) replaced; untouched branches shared.

    >>> set_leaves({"a": 1, "b": (2, 3)}, (("b", 1),), (4,))
    {'a': 1, 'b': (2, 4)}
    """
    if not paths:
        return tree
    if paths[0] == ():
        return leaves[0]
    groups: dict[Any, tuple[list[Any], list[Any]]] = {}
    for path, leaf in zip(paths, leaves):
        sub = groups.setdefault(path[0], ([], []))
        sub[0].append(path[1:])
        sub[1].append(leaf)
    if isinstance(tree, dict):
        out = dict(tree)
        for k, (ps, ls) in groups.items():
            out[k] = set_leaves(tree[k], tuple(ps), ls)
        return out
    items = list(tree)
    for i, (ps, ls) in groups.items():
        items[i] = set_leaves(tree[i], tuple(ps), ls)
    if isinstance(tree, list):
        return items
    return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)


def _weighted(loss: Tensor, weight: Tensor) -> Tensor:
    """``loss * weight`` for a 0-d float64 ``weight``, rounded as the eager step's ``loss * float(weight)``.

    A Python float meets a float32 (or float64) loss in the loss's dtype, and a half-precision
    loss in float32 with the product rounded back.
    """
    if loss.dtype in (torch.float16, torch.bfloat16):
        return (loss.float() * weight.float()).to(loss.dtype)
    return loss * weight.to(loss.dtype)


def make_step_fn(core: TrainStep, *, inplace: bool, device_type: str) -> Callable[..., tuple[Any, ...]]:
    """The whole step as one function of tensors: forward, backward, finiteness flag and guarded update.

    ``fn(skeleton, params, buffers, opt_state, step, batch, autocast)`` returns
    ``(ok, loss, metrics, new_params, buffers, opt_state, step)``: ``ok`` is the 0-d bool
    finiteness flag (``None`` for ``nonfinite="ignore"``). Inside the fold (``inplace``) a
    non-finite update is masked out in the graph under ``"skip"`` and ``"stop"``
    (``torch.where``, fused into the update loops), so the caller can skip it after reading
    ``ok`` without the parameters having moved; under ``"raise"`` the fold's state is lost
    with the exception anyway, so the update is not masked (one select per element fewer). A
    pure call returns new tensors, which the caller discards.

    In place, the graph returns only what it could not write into its inputs: ``buffers``
    holds only the 0-d scalars that come back as new tensors (see :func:`writable`), and
    ``new_params`` and ``opt_state`` are what :func:`written_in_place` returns.
    """
    guard = core.nonfinite != "ignore"
    masked = inplace and core.nonfinite in ("skip", "stop")
    grads_fn = make_grads_fn(core, inplace=inplace, device_type=device_type)

    def step_fn(
        skeleton: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        opt_state: Any,
        step: Tensor,
        batch: Any,
        autocast: torch.dtype | None,
    ) -> tuple[Any, ...]:
        loss, grads, bufs, metrics = grads_fn(skeleton, params, buffers, batch, autocast, None, None, None)
        ok = _finite(loss, grads, core.check_grads) if guard else None
        subset = {n: params[n] for n in grads}
        new_params, new_opt = core.optimizer.apply(subset, grads, opt_state, inplace=False)
        mask = ok if masked else None
        if not inplace:
            new_params = _commit(subset, new_params, mask, inplace=False)
            new_opt = _commit(opt_state, new_opt, mask, inplace=False)
            return ok, loss, metrics, new_params, bufs, new_opt, step + 1
        fresh_bufs = {k: b for k, b in bufs.items() if b is not buffers[k]}
        fresh_params, opt_out = written_in_place(subset, new_params, opt_state, new_opt, mask)
        return ok, loss, metrics, fresh_params, fresh_bufs, opt_out, step + 1

    return step_fn
