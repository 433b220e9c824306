"""Pure steps: ``(state, batch) -> (state, metrics)`` built from a model, a loss and an optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ._autograd import run_backward
from ._bind import bind, bound, full_tensors, make_skeleton, reassigned, unbind
from ._donation import check_live, is_donating, lend, updated
from ._ranks import rank
from ._rng import cuda_devices, eval_seed, evaluated_alone, restore_generators, seed_generators, step_seed
from ._state import TrainState
from .optim._base import Optimizer
from .optim._clip import ClipState

__all__ = [
    "NONFINITE_POLICIES",
    "EvalStep",
    "GradContext",
    "Gradients",
    "LossFn",
    "NonFiniteError",
    "Step",
    "TrainStep",
    "describe_batch",
    "make_eval_step",
    "make_train_step",
]

Metrics = dict[str, Tensor]
_set_grad_enabled = torch._C._set_grad_enabled


class Gradients(NamedTuple):
    """What the gradient phase of a train step produces."""

    loss: Tensor
    grads: dict[str, Tensor]
    buffers: dict[str, Tensor]
    metrics: dict[str, Tensor]


class GradContext(NamedTuple):
    """How a transform asks the gradient phase to run (passed down the transform chain).

    Fields:
        micro: index of the micro-batch within the current update; it is mixed into the
            dropout seed, so micro-batches of one update draw different masks.
        loss_scale: multiply the loss by this before ``autograd.grad`` (fp16 loss scaling);
            the returned gradients are then scaled by it too.
        autocast: run the forward pass and loss under ``torch.autocast`` to this dtype.
        loss_weight: multiply the loss by this Python float before ``autograd.grad``
            (accumulation pre-weights micro-batches, as a hand-written loop divides by K).
        rank: this process's rank under data parallelism; mixed into the dropout seed (rank 0
            draws what a single process draws).
        accumulate: gradient buffers (one per trainable parameter, owned by the caller) that
            backward adds into in place, as ``.backward()`` accumulates into ``.grad``; the
            returned gradients are these buffers. ``None``: fresh gradient tensors.
        gather: maps the parameters (by name; the trainable ones are autograd leaves) to the
            tensors bound into the module for this call, differentiably: sharded data
            parallelism materialises full parameters here, so gradients flow back to the
            shards. ``None``: the parameters themselves.
    """

    micro: int = 0
    loss_scale: Tensor | None = None
    autocast: torch.dtype | None = None
    loss_weight: float = 1.0
    accumulate: dict[str, Tensor] | None = None
    rank: int = 0
    gather: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite and the step's policy is ``"raise"``."""


NONFINITE_POLICIES = ("raise", "skip", "stop", "ignore")
NO_CONTEXT = GradContext()


class LossFn(Protocol):
    """``loss_fn(model, batch) -> loss`` or ``(loss, {name: 0-d tensor})``."""

    def __call__(self, model: nn.Module, batch: Any) -> Tensor | tuple[Tensor, Mapping[str, Tensor]]: ...


@runtime_checkable
class Step(Protocol):
    """A pure training step that also knows how to build the state it needs."""

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]: ...

    def init(self, **options: Any) -> TrainState: ...


def describe_batch(batch: Any) -> str:
    """A short structural description of a batch, e.g. ``(Tensor[64, 784] float32, Tensor[64] int64)``."""
    if isinstance(batch, Tensor):
        return f"Tensor{list(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(describe_batch(b) for b in batch[:8]) + (", ..." if len(batch) > 8 else "")
        return f"({inner})" if isinstance(batch, tuple) else f"[{inner}]"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v)}" for k, v in list(batch.items())[:8]) + "}"
    return type(batch).__name__


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def update_metrics(opt_state: Any) -> Metrics:
    """Metrics an optimizer state exposes after an update: ``grad_norm`` (pre-clip) when it clips."""
    parts = opt_state if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields") else (opt_state,)
    for part in parts:
        if isinstance(part, ClipState):
            return {"grad_norm": part.norm}
    return {}


def _split_output(out: Any, loss_fn: Any) -> tuple[Tensor, dict[str, Tensor]]:
    aux: Mapping[str, Tensor] = {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        out, aux = out
    if not isinstance(out, Tensor) or out.ndim != 0 or not out.is_floating_point():
        got = describe_batch(out) if isinstance(out, (Tensor, tuple, list)) else repr(out)
        raise TypeError(
            f"loss_fn {_name(loss_fn)!r} must return a 0-d floating-point loss tensor or (loss, dict of 0-d tensors); got {got}"
        )
    if "loss" in aux:
        raise ValueError(
            f"loss_fn {_name(loss_fn)!r}: auxiliary metric 'loss' clashes with the step's own 'loss' (the returned "
            "loss, which the nonfinite policy, loss scaling and early stopping read); rename it, e.g. 'recon_loss'"
        )
    metrics = {"loss": out.detach()}
    for k, v in aux.items():
        if not isinstance(v, Tensor) or v.ndim != 0:
            raise TypeError(
                f"loss_fn {_name(loss_fn)!r}: auxiliary metric {k!r} must be a 0-d tensor (no .item() inside a step), got {v!r}"
            )
        metrics[k] = v.detach()
    return out, metrics


def _call_loss(loss_fn: Callable[..., Any], model: nn.Module, batch: Any, phase: str, state: TrainState) -> Any:
    try:
        return loss_fn(model, batch)
    except Exception as e:
        where = f"train step {int(state.step)}" if phase == "train" else f"eval step at update {int(state.step)}"
        e.add_note(f"fnlight: {where}: loss_fn {_name(loss_fn)!r} raised on a batch {describe_batch(batch)}")
        raise


def _check_state(state: Any, where: str, *, stacked: bool = False) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"{where}: expected a fnlight.TrainState as first argument, got {type(state).__name__}")
    check_live(state, where)
    if state.skeleton is None:
        raise ValueError(f"{where}: this TrainState has no module skeleton; build it with step.init()")
    if not stacked:
        check_single(state, where)


def check_single(state: TrainState, where: str) -> None:
    """Refuse a stacked ensemble state where one model's state is expected."""
    if isinstance(state.key, Tensor) and state.key.ndim:
        raise TypeError(
            f"{where}: this is a stacked ensemble state of {state.key.shape[0]} replicas, not one model's state; take one "
            "with fnlight.ensemble.replica_state(state, i) (or unstack_states), or use the ensemble step"
        )


def _set_mode(skeleton: nn.Module, training: bool) -> None:
    if skeleton.training != training:
        skeleton.train(training)


class TrainStep:
    """The core training step: forward and loss, ``autograd.grad``, one optimizer update.

    Build it with :func:`make_train_step`. Calling it is pure: the input state is never
    modified. Inside :func:`fnlight.fold`, which owns its states, the parameters,
    buffers and optimizer state are updated in place. A step runs in two phases that
    transforms can drive separately: :meth:`grads` and :meth:`update`.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, optimizer: Optimizer, *, nonfinite: str = "raise", check_grads: bool = False
    ) -> None:
        self._model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.nonfinite = nonfinite
        self.check_grads = check_grads
        self._trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        self._trainable_names = frozenset(self._trainable)
        self._devices = tuple({p.device for p in model.parameters() if p.device.type == "cuda"})
        # the optimizer's check of a state against the parameters (None: an optimizer without one), and the
        # (params, opt_state) objects of the last state this step produced, which need no check again
        self._check_opt = getattr(optimizer, "check", None)
        self._produced: tuple[int, int] = (0, 0)

    @property
    def core(self) -> TrainStep:
        """The innermost step of a transform chain (here: this step itself)."""
        return self

    def init(self, *, seed: int = 0) -> TrainState:
        """Build the initial state from the model's current tensors (not copied) and ``seed``.

        The model itself is left untouched; the state holds its tensors and a data-free
        skeleton of its structure.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"TrainStep.init: seed must be an int, got {seed!r}")
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"TrainStep.init: seed must fit in int64 (the state's key), in [-2**63, 2**63), got {seed!r}")
        trainable = tuple(n for n, p in self._model.named_parameters() if p.requires_grad)
        if trainable != self._trainable:
            gone, new = sorted(set(self._trainable) - set(trainable)), sorted(set(trainable) - set(self._trainable))
            raise ValueError(
                "TrainStep.init: the model's trainable parameters changed after make_train_step, which fixed them "
                f"(no longer trainable or gone: {gone}; new: {new}); freeze or replace modules first, then build the step"
            )
        params = {n: p.detach() for n, p in self._model.named_parameters()}
        buffers = {n: b.detach() for n, b in self._model.named_buffers()}
        lend([*params.values(), *buffers.values()])  # the model's tensors: a donating fold copies them before writing
        return TrainState(
            step=torch.zeros((), dtype=torch.int64),
            params=params,
            buffers=buffers,
            opt_state=self.init_opt_state(params),
            key=torch.tensor(seed, dtype=torch.int64),
            skeleton=make_skeleton(self._model),
        )

    def init_opt_state(self, params: Mapping[str, Tensor]) -> Any:
        """The optimizer state for ``params`` (the trainable ones are picked by name)."""
        return self.optimizer.init({n: params[n] for n in self._trainable})

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        """The gradient phase: forward, loss and ``autograd.grad``; no update.

        Returns the loss, the gradients of the trainable parameters that received one,
        the buffers after the forward pass (BatchNorm statistics), and the metrics.
        Transforms that act between backward and update (accumulation, loss scaling,
        gradient synchronisation) call this and :meth:`update` separately; ``ctx`` says
        how to run (micro-batch index, loss scale, autocast dtype).
        """
        _check_state(state, "train step")
        params = state.params
        try:
            leaves = {n: params[n].detach().requires_grad_() for n in self._trainable}
        except KeyError:
            missing = [n for n in self._trainable if n not in params]
            raise ValueError(
                f"train step: the state has no parameter {missing[0]!r} (of {len(missing)} missing) that this step trains; "
                f"the state's parameters are {sorted(params)[:8]}: was it built by another step's init()?"
            ) from None
        buffers = state.buffers if is_donating() else {k: b.clone() for k, b in state.buffers.items()}
        skeleton = state.skeleton
        _set_mode(skeleton, True)
        seed = step_seed(int(state.key), int(state.step), ctx.micro, ctx.rank)
        # Backward runs while the tensors are bound: activation checkpointing recomputes forwards then.
        grad_was_enabled = torch.is_grad_enabled()
        _set_grad_enabled(True)  # what torch.set_grad_enabled does, without building its context-manager object
        if ctx.gather is None:  # one dict on the hot path
            tensors = {**params, **leaves, **buffers}
        else:
            tensors = {**ctx.gather({**params, **leaves}), **buffers}
        saved_slots = bind(skeleton, tensors)
        saved_rng = seed_generators(seed, self._devices)
        try:
            if ctx.autocast is None:
                out = _call_loss(self.loss_fn, skeleton, batch, "train", state)
            else:
                with torch.autocast(_device_type(params), dtype=ctx.autocast):
                    out = _call_loss(self.loss_fn, skeleton, batch, "train", state)
            loss, metrics = _split_output(out, self.loss_fn)
            if not loss.requires_grad:
                raise ValueError(
                    f"loss_fn {_name(self.loss_fn)!r} returned a loss that does not depend on any trainable "
                    "parameter (no gradient can flow); did it call the model it was given?"
                )
            target, weight = loss, ctx.loss_weight  # the weight goes in as the loss's gradient (_autograd.py)
            if ctx.loss_scale is not None:
                target, weight = (loss if weight == 1.0 else loss * weight).float() * ctx.loss_scale, 1.0
            if ctx.accumulate is None:
                grads = run_backward(target, tuple(leaves.values()), weight=weight)
            else:  # accumulate in place while each gradient is hot (AccumulateGrad), as .backward() does
                try:
                    for name, leaf in leaves.items():
                        leaf.grad = ctx.accumulate[name]
                except KeyError:
                    missing = [n for n in leaves if n not in ctx.accumulate]
                    raise ValueError(
                        f"train step: GradContext.accumulate must hold a gradient buffer for every trainable parameter "
                        f"({len(leaves)}), but has none for {missing[:8]}{' ...' if len(missing) > 8 else ''}; give one "
                        "per name (zeros to start a window), or accumulate=None for fresh gradients"
                    ) from None
                run_backward(target, tuple(leaves.values()), weight=weight, accumulate=True)
                grads = [leaf.grad for leaf in leaves.values()]
            moved = reassigned(skeleton, buffers) if buffers else None  # `self.count = self.count + 1` in forward
        finally:
            restore_generators(saved_rng)
            unbind(saved_slots)
            _set_grad_enabled(grad_was_enabled)
        if moved:  # under donate="model" written into the model's own tensors, as a torch loop's reassignment lands there
            buffers = updated(buffers, moved)
        return Gradients(metrics["loss"], {n: g for n, g in zip(leaves, grads) if g is not None}, buffers, metrics)

    def update(self, state: TrainState, g: Gradients) -> tuple[TrainState, Metrics]:
        """The update phase: check finiteness, apply ``g.grads`` with the optimizer, count one update.

        Parameters absent from ``g.grads`` are left as they are (as ``torch.optim`` skips
        parameters whose gradient is ``None``). Returns the new state and the metrics the
        update produced (``grad_norm`` when the optimizer clips; ``skipped`` under the
        ``"skip"``/``"stop"`` policies).

        Raises:
            TypeError: ``g`` is not a :class:`Gradients`.
            ValueError: ``g.grads`` names a frozen parameter or no parameter of the state.
            NonFiniteError: a non-finite loss (or gradient, with ``check_grads``) under ``nonfinite="raise"``.
        """
        return self._update(state, g, self.optimizer.apply)

    def _update(
        self, state: TrainState, g: Gradients, apply: Callable[..., tuple[dict[str, Tensor], Any]]
    ) -> tuple[TrainState, Metrics]:
        """:meth:`update` with ``apply`` in place of the optimizer's (``with_compile`` passes a compiled one)."""
        if not isinstance(g, Gradients):
            raise TypeError(
                f"train step update(state, g): g must be a fnlight.Gradients (what grads(state, batch) returns; change it "
                f"with g._replace(grads=...)), got {type(g).__name__}"
            )
        if not g.grads.keys() <= self._trainable_names:  # one C-level set comparison per update
            self._refuse_grads(g.grads, state)
        metrics: Metrics = {}
        if self.nonfinite != "ignore":
            bad = self._nonfinite(g)
            if self.nonfinite != "raise":
                metrics["skipped"] = torch.scalar_tensor(float(bool(bad)))
            if bad:
                if self.nonfinite == "raise":
                    raise NonFiniteError(_nonfinite_message(state, g))
                # as torch (and a skipped fp16 update): the forward pass moved the buffers (BatchNorm statistics),
                # in place inside the fold or in g.buffers' copies when called directly; either way they stay
                kept = state.replace(buffers=dict(g.buffers))
                return (kept.replace(stop=torch.tensor(True)) if self.nonfinite == "stop" else kept), metrics
        inplace = is_donating()
        params = state.params
        subset = {n: params[n] for n in g.grads}
        compiling = torch.compiler.is_compiling()  # traced by with_compile: no Python bookkeeping in the graph
        if self._check_opt is not None and not compiling and (id(params), id(state.opt_state)) != self._produced:
            self._check_opt(subset, state.opt_state)  # a state this step did not produce (a fold's first, an edited one)
        new_params, opt_state = apply(subset, dict(g.grads), state.opt_state, inplace=inplace)
        new_state = state.replace(
            step=state.step + 1,
            params=params if inplace and len(subset) == len(self._trainable) else {**params, **new_params},
            buffers=dict(g.buffers),
            opt_state=opt_state,
        )
        metrics.update(update_metrics(opt_state))
        if not compiling:
            self._produced = (id(new_state.params), id(new_state.opt_state))
        return new_state, metrics

    def _refuse_grads(self, grads: Mapping[str, Tensor], state: TrainState) -> None:
        """Gradients for names this step does not train: a frozen parameter (which must stay as it is) or no parameter."""
        frozen = sorted(n for n in grads if n not in self._trainable_names and n in state.params)
        unknown = sorted(n for n in grads if n not in state.params)
        parts = [f"frozen parameters (requires_grad=False: carried, never updated) {frozen}"] if frozen else []
        parts += [f"names that are no parameter of the state {unknown}"] if unknown else []
        raise ValueError(
            f"train step update at update {int(state.step)}: g.grads holds gradients for {' and for '.join(parts)}; "
            f"the step trains {list(self._trainable)[:8]}{' ...' if len(self._trainable) > 8 else ''} (give gradients for those)"
        )

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """Nothing is pending in the core step: returns ``state`` unchanged."""
        return state, {}

    def finish(self, state: TrainState) -> None:
        """Called by the fold when it ends; the core step has nothing to finish."""

    def updates_per(self, batches: int) -> int:
        """Optimizer updates this step makes from ``batches`` calls (one each)."""
        return batches

    def __repr__(self) -> str:
        return f"TrainStep({_name(self.loss_fn)}, {type(self._model).__name__})"

    def _nonfinite(self, g: Gradients) -> bool:
        # A read of the scalar: ~0.2 us on the CPU (an isfinite op costs ~20 us); a sync on a GPU.
        if not math.isfinite(g.loss.item()):
            return True
        if self.check_grads and g.grads:
            grads = list(g.grads.values())
            if bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
                return False
            # a norm also overflows for finite values above ~1.8e19 (float32): look at the elements themselves
            return not all(bool(torch.isfinite(t).all()) for t in grads)
        return False

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        g = self.grads(state, batch)
        new_state, metrics = self.update(state, g)
        return new_state, {**g.metrics, **metrics} if metrics else g.metrics


def _device_type(params: Mapping[str, Tensor]) -> str:
    return next(iter(params.values())).device.type if params else "cpu"


def _nonfinite_message(state: TrainState, g: Gradients) -> str:
    bad = [n for n, t in g.grads.items() if not bool(torch.isfinite(t).all())]
    shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    return (
        f"non-finite values at update {int(state.step)} (epoch index {int(state.data.epoch)}, "
        f"{int(state.data.batch)} batches into it): "
        f"loss = {float(g.loss)}; gradients with NaN/inf: {shown or 'none'}. "
        "Lower the learning rate, clip gradients, check the data; or pass nonfinite='skip' or 'stop' to make_train_step."
    )


class EvalStep:
    """A pure evaluation step: ``(state, batch) -> metrics`` in eval mode, without gradients."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        _check_state(state, "eval step")
        skeleton = state.skeleton
        # every module's mode is put back afterwards, as fl.apply does: a submodule the user set apart in train
        # mode (a frozen BatchNorm) must stay so for the train steps after an evaluation, which switch the
        # skeleton to train mode only where it is not already (a whole-tree .train() would unfreeze it)
        modes = [(m, m.training) for m in skeleton.modules()] if skeleton.training else None
        _set_mode(skeleton, False)
        buffers = {k: b.clone() for k, b in state.buffers.items()}  # a module may write a buffer in eval mode too
        # random draws (a sampled loss, noise) come from a seed of the state's key and update, as a train step's
        # do, and the caller's generators are put back; inside fnlight.evaluate, from that batch's seed
        saved = None
        if evaluated_alone():
            saved = seed_generators(eval_seed(int(state.key), int(state.step), 0, rank()), cuda_devices(state.params), apart=True)
        try:
            with torch.no_grad(), bound(skeleton, {**full_tensors(state.params), **buffers}):
                out = _call_loss(self.loss_fn, skeleton, batch, "eval", state)
        finally:
            if saved is not None:
                restore_generators(saved)
            if modes is not None:
                for m, was in modes:
                    m.training = was
        return _split_output(out, self.loss_fn)[1]


def make_train_step(
    model: nn.Module, loss_fn: LossFn, optimizer: Optimizer, *, nonfinite: str = "raise", check_grads: bool = False
) -> TrainStep:
    """Build a pure training step from a model, a loss function and an optimizer.

    Args:
        model: the ``nn.Module`` whose parameters are trained. Parameters with
            ``requires_grad=False`` are carried in the state but never updated. Which
            parameters train is fixed here: freeze or replace modules before building the
            step (``init()`` refuses a model whose trainable parameters changed since).
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, aux_metrics)``; see
            :mod:`fnlight.losses` for ready-made ones.
        optimizer: an :class:`fnlight.optim.Optimizer` (``adamw(...)``, ``chain(...)``...).
        nonfinite: what to do when the loss (or, with ``check_grads``, a gradient) is NaN
            or infinite: ``"raise"`` a :class:`NonFiniteError` naming the update and the
            offending tensors; ``"skip"`` the update (parameters, optimizer state and
            step count unchanged; buffers keep what the forward pass did, as in torch;
            metric ``skipped``); ``"stop"`` skip it and set ``state.stop`` so the fold
            ends; or ``"ignore"``.
        check_grads: also check every gradient (one multi-tensor norm per update, about
            a third of an AdamW update's cost). Without it a non-finite gradient behind a
            finite loss is caught only by clipping's norm (``grad_norm`` metric).

    Returns:
        A :class:`TrainStep`: call ``step.init(seed=...)`` for the initial state and
        ``step(state, batch)`` for ``(new_state, metrics)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``loss_fn`` is not callable or
            ``optimizer`` is not an ``Optimizer``.
        ValueError: ``nonfinite`` is not one of the policies, or nothing is trainable.

    >>> import torch, fnlight as fl
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> state = step.init(seed=0)
    >>> state, metrics = step(state, (torch.ones(4, 3), torch.zeros(4, 1)))
    >>> int(state.step), sorted(metrics)
    (1, ['loss'])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_train_step: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"make_train_step: loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"make_train_step: optimizer must be a fnlight.optim.Optimizer (e.g. fnlight.optim.adamw(1e-3)), "
            f"got {type(optimizer).__name__}; torch.optim optimizers are not functional"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("make_train_step: the model has no parameter with requires_grad=True; nothing to train")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"make_train_step: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if not isinstance(check_grads, bool):
        raise TypeError(f"make_train_step: check_grads must be a bool, got {check_grads!r}")
    return TrainStep(model, loss_fn, optimizer, nonfinite=nonfinite, check_grads=check_grads)


def make_eval_step(loss_fn: LossFn) -> EvalStep:
    """Build a pure evaluation step ``(state, batch) -> metrics`` (eval mode, no gradients).

    It runs the module skeleton held by the state, so the same eval step works for any
    state built by a train step over that module. Every module's train/eval mode is put back
    after the call, so a submodule set apart in eval mode (a frozen BatchNorm) stays so for the
    train steps that follow. Random draws come from a seed of the state's key and update
    count (per batch inside :func:`fnlight.evaluate`), and the caller's generators are put back.

    Raises:
        TypeError: ``loss_fn`` is not callable.

    >>> import torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> sorted(fl.make_eval_step(fl.losses.mse)(state, (torch.ones(2, 3), torch.zeros(2, 1))))
    ['loss']
    """
    if not callable(loss_fn):
        raise TypeError(f"make_eval_step: loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    return EvalStep(loss_fn)
