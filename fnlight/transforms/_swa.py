"""Stochastic weight averaging: an equal-weight running average of the parameters, and BatchNorm statistics for it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._bind import bound, reassigned
from .._rng import cuda_devices, derive_seed, restore_generators, seed_generators
from .._state import TrainState
from .._step import _check_state
from ._ema import Averaging, check_schedule

__all__ = ["SwaState", "update_bn", "with_swa"]

# Mixed into the seed of update_bn's forward passes, so its dropout masks differ from the training step's.
_UPDATE_BN_STREAM = 0x5B4E


class SwaState(NamedTuple):
    """The running average of :func:`with_swa` (``state.slots["swa"]``).

    Fields:
        params: per trainable parameter, the mean of its values after the averaged
            updates (a copy of the initial value until the first one).
        buffers: with ``use_buffers``, the same mean per floating-point buffer; else empty.
        count: 0-d int64 tensor (CPU): updates averaged so far (torch's ``n_averaged``).
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    count: Tensor


class Swa(Averaging):
    """See :func:`with_swa`."""

    name = "with_swa"
    slot = "swa"
    state_type = SwaState

    def weight(self, count: int) -> float:
        """``1 / (count + 1)``: the average of ``count + 1`` equally weighted parameter values."""
        return 1.0 / (count + 1)

    def __repr__(self) -> str:
        return f"with_swa({self.inner!r}, start={self.start!r}, every={self.every!r})"


def with_swa(step: Any, *, start: int, every: int = 1, use_buffers: bool = False) -> Swa:
    """Stochastic weight averaging (SWA): the equal-weight mean of the parameters from update ``start`` on.

    After each optimizer update ``n`` with ``n >= start`` and ``(n - start) % every == 0``
    (updates, not micro-batches; a skipped update is not averaged) the parameters join
    the running mean ``avg += (params - avg) / (k + 1)`` (``k`` values averaged so far;
    the first one is copied), one ``torch._foreach_lerp_`` in place inside
    :func:`fnlight.fold` — bitwise what ``torch.optim.swa_utils.AveragedModel`` computes
    with ``get_swa_multi_avg_fn()``, its default on CUDA (on the CPU its default divides
    tensor by tensor, which agrees to float rounding). The mean lives in
    ``state.slots["swa"]`` (:class:`SwaState`), so it is checkpointed and resumed with
    everything else.

    The averaged weights need their own BatchNorm statistics: after training, take
    :func:`fnlight.averaged` and recompute them with :func:`update_bn` (one pass over
    the training data), as the SWA recipe does. The SWA learning-rate schedule
    (``SWALR``: anneal to a constant ``swa_lr``) is an ordinary schedule, e.g.
    ``join([cosine(lr, start, end_value=swa_lr), constant(swa_lr)], [start])``; see
    docs/transforms.md.

    Args:
        step: the step to wrap (see docs/transforms.md for the order).
        start: the first optimizer update whose parameters are averaged (>= 0). With
            ``start=0`` the averaged updates are the multiples of ``every`` (every update
            when ``every=1``); with ``start >= 1`` they are ``start``, ``start + every``, ...
        every: average every this many updates (>= 1), e.g. once per epoch's worth.
        use_buffers: also average the floating buffers (``AveragedModel(use_buffers=True)``);
            integer buffers take the current value. The default leaves the buffers to
            :func:`update_bn`.

    Returns:
        The wrapped step.

    Raises:
        TypeError: ``use_buffers`` is not a bool.
        ValueError: ``start < 0``, ``every < 1``, or a wrong composition order.

    >>> import torch, fnlight as fl
    >>> core = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> step = with_swa(core, start=2)
    >>> state = fl.fold(step, step.init(), [(torch.ones(4, 2), torch.zeros(4, 1))] * 4, progress=False)
    >>> int(state.slots["swa"].count)  # updates 2, 3 and 4
    3
    """
    check_schedule("with_swa", start=start, every=every, use_buffers=use_buffers)
    return Swa(step, start=start, every=every, use_buffers=use_buffers)


def _first_input(model: nn.Module, batch: Any) -> Any:
    return model(batch[0] if isinstance(batch, (list, tuple)) else batch)


def _reset_statistics(skeleton: nn.Module, buffers: dict[str, Tensor]) -> list[nn.modules.batchnorm._BatchNorm]:
    """Reset the running statistics of every BatchNorm in ``buffers`` (fresh tensors); return the layers."""
    layers = []
    for prefix, module in skeleton.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            dot = f"{prefix}." if prefix else ""
            buffers[dot + "running_mean"] = torch.zeros_like(buffers[dot + "running_mean"])
            buffers[dot + "running_var"] = torch.ones_like(buffers[dot + "running_var"])
            buffers[dot + "num_batches_tracked"] = torch.zeros_like(buffers[dot + "num_batches_tracked"])
            layers.append(module)
    return layers


def update_bn(state: TrainState, data: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] = _first_input) -> TrainState:
    """Recompute the BatchNorm running statistics of ``state``'s weights with one pass over ``data``.

    The functional ``torch.optim.swa_utils.update_bn``: every BatchNorm's running mean
    and variance are reset and re-estimated as the plain average over all batches
    (momentum ``None``), with every module in train mode (as torch's, a BatchNorm you set
    apart in eval mode is re-estimated too; each module's mode is put back after the pass)
    and without gradients. Other
    buffers change as one train-mode forward pass per batch changes them. Randomness
    (dropout) is drawn from a seed derived from the state's key and step, so the result
    is deterministic. The usual call is on the averaged weights::

        swa_state = fl.update_bn(fl.averaged(state, "swa"), train_data)

    Args:
        state: the state whose parameters are used (not modified).
        data: an iterable of batches, typically the training data.
        forward: ``forward(model, batch)`` runs the model on a batch; the default
            calls ``model(batch[0])`` for a tuple or list batch and ``model(batch)``
            otherwise, as torch's ``update_bn`` does.

    Returns:
        A new state with the recomputed buffers (everything else is ``state``'s). A model
        without BatchNorm gets its buffers back unchanged, without a pass over ``data``.

    Raises:
        TypeError: ``state`` is not a :class:`fnlight.TrainState`, ``data`` is not iterable or
            ``forward`` is not callable.
        ValueError: ``data`` holds no batch (the statistics would stay reset).

    >>> import torch, fnlight as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> state = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> new = update_bn(state, [(torch.randn(8, 2), torch.zeros(8, 3))])
    >>> int(new.buffers["1.num_batches_tracked"]), int(state.buffers["1.num_batches_tracked"])
    (1, 0)
    """
    _check_state(state, "update_bn")
    if not callable(forward):
        raise TypeError(f"update_bn: forward must be callable (model, batch) -> output, got {forward!r}")
    if not hasattr(data, "__iter__") and not hasattr(data, "__getitem__"):  # checked without starting an iteration
        raise TypeError(
            f"update_bn: data must be an iterable of batches (a list, a DataLoader or a fnlight.Loader), "
            f"got {type(data).__name__}"
        )
    skeleton = state.skeleton
    buffers = {k: b.clone() for k, b in state.buffers.items()}
    layers = _reset_statistics(skeleton, buffers)
    if not layers:
        return state.replace()
    momenta = [m.momentum for m in layers]
    modes = [(m, m.training) for m in skeleton.modules()]  # each module's own, put back after the pass
    devices = cuda_devices(state.params)
    saved_rng = seed_generators(derive_seed(int(state.key), int(state.step), _UPDATE_BN_STREAM), devices)
    batches = 0
    try:
        for m in layers:
            m.momentum = None  # a cumulative average over the pass
        skeleton.train()  # every module, as torch's update_bn: a BatchNorm set apart in eval mode is re-estimated too
        with torch.no_grad(), bound(skeleton, {**state.params, **buffers}):
            for batch in data:
                forward(skeleton, batch)
                batches += 1
            moved = reassigned(skeleton, buffers)  # `self.count = self.count + 1`: the new value, as in a torch loop
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
        restore_generators(saved_rng)
    if not batches:
        raise ValueError(
            "update_bn: data yielded no batches, so the BatchNorm statistics cannot be estimated; "
            "pass the training data (a list, a DataLoader or a fnlight.Loader)"
        )
    return state.replace(buffers={**buffers, **moved})
