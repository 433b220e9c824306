"""Back to torch: modules and ``state_dict``s from a state, and a state from a ``state_dict``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._bind import bound, full_tensors, materialize, state_dict_names
from ._donation import check_live
from ._state import TrainState
from ._step import check_single

__all__ = ["apply", "copy_into_module_", "load_state_dict", "state_dict", "to_module"]


def _require_skeleton(state: TrainState, where: str, *, stacked: bool = False) -> nn.Module:
    if not isinstance(state, TrainState):
        raise TypeError(f"{where}: expected a fnlight.TrainState, got {type(state).__name__}")
    check_live(state, where)
    if state.skeleton is None:
        raise ValueError(f"{where}: this TrainState has no module skeleton; build it with step.init()")
    if not stacked:
        check_single(state, where)
    return state.skeleton


def to_module(state: TrainState) -> nn.Module:
    """A new ``nn.Module`` holding copies of the state's parameters and buffers, in eval mode.

    Use it for inference, export, or to hand the trained model to other libraries.

    >>> import torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> fl.to_module(state)(torch.zeros(1, 2)).shape
    torch.Size([1, 1])
    """
    module = materialize(_require_skeleton(state, "to_module"), full_tensors(state.params), state.buffers)
    return module.eval()


def apply(state: TrainState, *args: Any, training: bool = False, **kwargs: Any) -> Any:
    """Run the model on ``args`` with the state's parameters (not copied) and buffers (copied) bound.

    The module skeleton is called with the state's tensors bound in place of its own, in eval
    mode (``training=False``, the default) or train mode. Gradients flow as usual: through the
    inputs (e.g. a GAN generator's loss through a discriminator held in another state) and to
    the state's tensors only if they require grad (a state's tensors do not). Pure: the
    buffers are cloned first, so BatchNorm statistics (or any buffer a forward writes)
    updated by the call are discarded and ``state`` is never modified. Every module's train/eval
    mode is put back afterwards: a teacher that shares the student's skeleton
    (``fl.averaged(state)``, ``fl.tree_clone(state)``) can be applied inside the student's
    loss. Dropout in train mode draws from torch's global generator (inside a step, fnlight
    seeds it per call; here you choose).

    Args:
        state: a state with a module skeleton (from ``step.init()``).
        *args: positional inputs of the model's ``forward``.
        training: call the model in train mode (BatchNorm batch statistics, dropout active).
        **kwargs: keyword inputs of the model's ``forward``.

    Returns:
        Whatever the model's ``forward`` returns.

    >>> import torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> fl.apply(state, torch.zeros(3, 2)).shape
    torch.Size([3, 1])
    """
    if not isinstance(training, bool):
        raise TypeError(f"apply: training must be a bool, got {training!r}")
    skeleton = _require_skeleton(state, "apply")
    buffers = {k: b.clone() for k, b in state.buffers.items()}  # a forward may write buffers, in eval mode too
    # The skeleton may be the one a train step is running right now (a teacher from averaged(state) or
    # tree_clone(state) called inside the loss): every module's mode is put back afterwards.
    modes = [(m, m.training) for m in skeleton.modules()]
    if skeleton.training != training:  # as the steps do: a submodule the user set apart (a frozen BatchNorm) stays so
        skeleton.train(training)
    try:
        with bound(skeleton, {**full_tensors(state.params), **buffers}):
            return skeleton(*args, **kwargs)
    finally:
        for m, was in modes:
            if m.training != was:
                m.training = was


def state_dict(state: TrainState) -> dict[str, Tensor]:
    """The state's parameters and buffers as a plain ``state_dict`` (copies, by qualified name).

    The keys are those of the module's own ``state_dict()``: a tied weight appears under each
    of its names (a copy each, as safetensors requires), non-persistent buffers do not.

    >>> import torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> sorted(fl.state_dict(state))
    ['bias', 'weight']
    """
    skeleton = _require_skeleton(state, "state_dict")
    merged = {**full_tensors(state.params), **state.buffers}
    # every key the module's own state_dict has: a tied weight under each of its names (a copy each, as
    # safetensors wants no shared storage), non-persistent buffers left out
    return {key: merged[name].detach().clone() for key, name in state_dict_names(skeleton).items() if name in merged}


def copy_into_module_(state: TrainState, module: nn.Module) -> nn.Module:
    """Copy the state's parameters and buffers into ``module`` in place (strict) and return it.

    Raises:
        TypeError: ``state`` is not a ``TrainState`` or ``module`` is not an ``nn.Module``.
        RuntimeError: the module's structure differs from the state's (torch's
            ``load_state_dict`` message lists the keys).

    >>> import torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)).init(seed=0)
    >>> target = torch.nn.Linear(2, 1)
    >>> fl.copy_into_module_(state, target) is target, torch.equal(target.weight, state.params["weight"])
    (True, True)
    """
    _require_skeleton(state, "copy_into_module_")
    if not isinstance(module, nn.Module):
        raise TypeError(f"copy_into_module_: module must be a torch.nn.Module, got {type(module).__name__}")
    module.load_state_dict(state_dict(state), strict=True)
    return module


def load_state_dict(state: TrainState, source: Mapping[str, Tensor], *, strict: bool = True) -> TrainState:
    """A new state whose parameters and buffers are copied from ``source`` (e.g. pretrained weights).

    Values are cast to each leaf's dtype and device. The optimizer state, step and
    everything else are kept from ``state``: the result shares those tensors with it, so
    ``fl.tree_clone`` it before handing it to ``fold(..., donate=True)`` if ``state`` is
    used again.

    Args:
        state: the state to start from (not modified).
        source: a ``state_dict`` by qualified name: the module's ``state_dict()`` keys, so a
            tied weight under each of its names (the value under the name the state holds
            it by wins; with ``strict=False`` any one of them will do) and no
            non-persistent buffers (those keep the state's values).
        strict: fail on missing or unexpected keys (shape mismatches always fail).

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped keys.

    >>> import torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> new = fl.load_state_dict(state, torch.nn.Linear(2, 1).state_dict())
    >>> new.params["weight"].shape
    torch.Size([1, 2])
    """
    skeleton = _require_skeleton(state, "load_state_dict")
    if not isinstance(strict, bool):
        raise TypeError(f"load_state_dict: strict must be a bool, got {strict!r}")
    if not isinstance(source, Mapping):
        raise TypeError(f"load_state_dict: source must be a mapping name -> tensor, got {type(source).__name__}")
    targets = {**state.params, **state.buffers}
    names = {key: name for key, name in state_dict_names(skeleton).items() if name in targets}  # the module's keys
    missing = sorted(set(names) - set(source))
    unexpected = sorted(set(source) - set(names))
    shaped = sorted(
        f"{k}: expected {list(targets[names[k]].shape)}, " + (f"got {list(v.shape)}" if isinstance(v, Tensor) else f"got {v!r}")
        for k, v in source.items()
        if k in names and (not isinstance(v, Tensor) or v.shape != targets[names[k]].shape)
    )
    if shaped or (strict and (missing or unexpected)):
        parts = [
            f"missing {missing}" if missing else "",
            f"unexpected {unexpected}" if unexpected else "",
            f"mis-shaped {shaped}" if shaped else "",
        ]
        raise ValueError("load_state_dict: the state_dict does not fit the state: " + "; ".join(p for p in parts if p))

    chosen: dict[str, Tensor] = {}  # canonical name -> its value: under that name, else under an alias (tied)
    for key in sorted((k for k in names if k in source), key=lambda k: k != names[k]):
        chosen.setdefault(names[key], source[key])

    def take(name: str, old: Tensor) -> Tensor:
        if name not in chosen:
            return old
        with torch.no_grad():
            return chosen[name].detach().to(device=old.device, dtype=old.dtype, copy=True)

    return state.replace(
        params={k: take(k, v) for k, v in state.params.items()},
        buffers={k: take(k, v) for k, v in state.buffers.items()},
    )


def save_safetensors(state: TrainState, path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None) -> None:
    """Write the state's parameters and buffers as a ``.safetensors`` file (needs ``safetensors``).

    The file is the plain ``state_dict`` of the model — what other libraries load — not a
    training checkpoint (for that, see :mod:`fnlight.checkpoint`).

    Raises:
        ImportError: ``safetensors`` is not installed (``pip install safetensors``).
        TypeError: ``state`` is not a state with a module skeleton, ``path`` is not a str or
            ``os.PathLike``, or ``metadata`` is not a dict of str to str.
        FileNotFoundError, IsADirectoryError: ``path``'s directory is missing, or ``path`` is a
            directory.

    >>> import tempfile, torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     fl.save_safetensors(state, f"{d}/model.safetensors")
    """
    where = "save_safetensors"
    _require_skeleton(state, where)
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{where}: path must name a file, got the directory {os.fspath(path)!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{where}: the directory {directory!r} of path does not exist; create it first")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError(f"{where}: metadata must be None or a dict of str to str (safetensors' header), got {metadata!r}")
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("save_safetensors needs the safetensors package: pip install safetensors") from e
    tensors = {k: v.contiguous() for k, v in state_dict(state).items()}
    save_file(tensors, os.fspath(path), metadata=metadata)
