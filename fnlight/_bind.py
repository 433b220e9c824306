"""Binding state tensors into a data-free module skeleton for the duration of one call."""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["bound", "full_tensors", "make_skeleton", "materialize"]

_SLOTS = "_fnlight_slots"


def full_tensors(tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``tensors`` with every sharded ``DTensor`` gathered into a full local tensor (no gradient).

    States trained under :func:`fnlight.with_fsdp` hold sharded parameters; evaluation and
    export need the whole tensors. Returns ``tensors`` itself when nothing is sharded.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # never imported: no DTensor exists
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors.values()):
        return tensors
    return {n: t.full_tensor() if isinstance(t, dtensor) else t for n, t in tensors.items()}


def make_skeleton(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device.

    No tensor data is copied: the skeleton only keeps the structure (submodules,
    hyperparameters, hooks) so that state tensors can be bound into it per call.
    """
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    skeleton = copy.deepcopy(module, memo)
    _slots(skeleton)
    return skeleton


def _slots(skeleton: nn.Module) -> dict[str, list[tuple[dict, str]]]:
    """For each canonical tensor name, every (owner dict, attribute) that holds it (tied weights)."""
    cached = skeleton.__dict__.get(_SLOTS)
    if cached is not None:
        return cached
    canonical: dict[int, str] = {}
    for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers()):
        canonical.setdefault(id(t), name)
    slots: dict[str, list[tuple[dict, str]]] = {}
    seen: set[tuple[int, str]] = set()
    # remove_duplicate=False finds a weight shared between modules under each owner; a module
    # used twice (a siamese encoder) is the same dicts twice, and is recorded once
    for _, mod in skeleton.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is not None and id(t) in canonical and (id(store), attr) not in seen:
                    seen.add((id(store), attr))
                    slots.setdefault(canonical[id(t)], []).append((store, attr))
    skeleton.__dict__[_SLOTS] = slots
    return slots


def state_dict_names(skeleton: nn.Module) -> dict[str, str]:
    """Each key of the skeleton's ``state_dict`` -> the canonical name of the tensor it holds.

    A tied weight appears under every name it has (``head.weight`` and ``embed.weight``), a
    state holds it once under its canonical name (the first, as ``named_parameters()``
    gives it); non-persistent buffers are not keys.
    """
    canonical: dict[int, str] = {}
    for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers()):
        canonical.setdefault(id(t), name)
    known = set(canonical.values())
    names = {}
    for key, t in skeleton.state_dict(keep_vars=True).items():
        name = canonical.get(id(t), key if key in known else None)
        if name is not None:
            names[key] = name
    return names


def bind(skeleton: nn.Module, tensors: Mapping[str, Tensor]) -> list[tuple[dict, str, Tensor]]:
    """Put ``tensors`` (by qualified name) into the skeleton's slots; return what to put back."""
    slots = _slots(skeleton)
    saved: list[tuple[dict, str, Tensor]] = []
    try:
        for name, value in tensors.items():
            for store, attr in slots[name]:
                saved.append((store, attr, store[attr]))
                store[attr] = value
    except BaseException:
        unbind(saved)
        raise
    return saved


def unbind(saved: list[tuple[dict, str, Tensor]]) -> None:
    """Undo :func:`bind` (last binding first, so a slot bound twice gets its first saved value)."""
    for store, attr, old in reversed(saved):
        store[attr] = old


def reassigned(skeleton: nn.Module, bound: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of ``bound`` that the forward replaced in their slots, detached, by name.

    A forward that writes ``self.count = self.count + 1`` (instead of ``self.count.add_(1)``)
    puts a new tensor into the module's ``_buffers``, the slot :func:`bind` filled: that is
    the buffer's new value, as in a torch loop. Call it while the tensors are still bound.

    >>> import torch
    >>> class Counter(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_buffer("calls", torch.zeros(()))
    ...     def forward(self, x):
    ...         self.calls = self.calls + 1
    ...         return x
    >>> skeleton, tensors = make_skeleton(Counter()), {"calls": torch.zeros(())}
    >>> with bound(skeleton, tensors):
    ...     _ = skeleton(torch.ones(1))
    ...     reassigned(skeleton, tensors)
    {'calls': tensor(1.)}
    """
    slots = _slots(skeleton)
    out: dict[str, Tensor] = {}
    for name, value in bound.items():
        for store, attr in slots[name]:
            now = store.get(attr)
            if now is not value and isinstance(now, Tensor):
                out[name] = now.detach()
                break
    return out


@contextlib.contextmanager
def bound(skeleton: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily put ``tensors`` (by qualified name) into the skeleton's slots."""
    saved = bind(skeleton, tensors)
    try:
        yield skeleton
    finally:
        unbind(saved)


def materialize(skeleton: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> nn.Module:
    """A real module with the skeleton's structure holding copies of ``params`` and ``buffers``."""
    memo: dict[int, object] = {}
    for name, p in skeleton.named_parameters():
        memo[id(p)] = nn.Parameter(params[name].detach().clone(), requires_grad=p.requires_grad)
    for name, b in skeleton.named_buffers():
        memo[id(b)] = buffers[name].detach().clone()
    for sub in skeleton.modules():  # a tensor a forward hook left as a plain attribute (spectral_norm's ``weight``)
        for value in sub.__dict__.values():  # holds a step's graph, which cannot be copied; the hook sets it again
            if isinstance(value, Tensor) and value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = None
    module = copy.deepcopy(skeleton, memo)
    module.__dict__.pop(_SLOTS, None)
    for sub in module.modules():  # drop training-only forward wrappers (activation checkpointing)
        if getattr(sub.__dict__.get("forward"), "_fnlight_activation_checkpoint", False):
            del sub.__dict__["forward"]
    return module
