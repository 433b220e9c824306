"""The ensemble step: K replicas trained in one vectorised step with ``torch.func.vmap``."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn

from .._bind import bind, make_skeleton, reassigned, unbind
from .._donation import is_donating, updated
from .._rng import derive_seed, restore_generators, seed_generators
from .._state import TrainState
from .._step import (
    LossFn,
    NonFiniteError,
    TrainStep,
    _check_state,
    _name,
    _set_mode,
    _split_output,
    describe_batch,
    make_train_step,
)
from ._stack import _size, stack_states
from ._update import EnsembleOptimizer

__all__ = ["NONFINITE", "RANDOMNESS", "EnsembleStep", "make_ensemble_step"]

Metrics = dict[str, Tensor]
RANDOMNESS = ("different", "same", "error")
NONFINITE = ("raise", "skip", "ignore")


class EnsembleStep:
    """K replicas of one model trained together: ``(stacked state, batch) -> (stacked state, metrics)``.

    Build it with :func:`make_ensemble_step`. The forward pass of all replicas is one
    ``torch.func.vmap`` call, their gradients one ``torch.autograd.grad``, and the update one
    vectorised optimizer call; each metric is a ``[K]`` tensor (one value per replica). Calling it is pure;
    inside :func:`fnlight.fold` (``progress=False``) the stacked tensors are updated in place.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: EnsembleOptimizer,
        *,
        per_replica_batch: bool,
        randomness: str,
        nonfinite: str,
    ) -> None:
        self._model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.k = optimizer.k
        self.per_replica_batch = per_replica_batch
        self.randomness = randomness
        self.nonfinite = nonfinite
        self._trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        self._frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
        self._devices = tuple({p.device for p in model.parameters() if p.device.type == "cuda"})
        self._cached: tuple[nn.Module, Any] | None = None  # (skeleton, vmapped loss) of the last call
        self._cumulative: list[tuple[str, nn.Module]] = []  # the cached skeleton's BatchNorms with momentum=None
        self._keys: tuple[int, ...] = ()
        self._keys_seed = 0

    @property
    def core(self) -> EnsembleStep:
        """The innermost step (this step itself: ensembles take no transforms)."""
        return self

    def init(self, *, seeds: int | Sequence[int], reinit: bool = True) -> TrainState:
        """The stacked initial state of the K replicas.

        Replica ``i`` is the state ``replica_step(i).init(seed=seeds[i])`` would give for a
        model built after ``torch.manual_seed(seeds[i])``: with ``reinit``, its parameters are
        re-drawn by calling every module's ``reset_parameters()`` in module order under
        ``torch.manual_seed(seeds[i])`` (for models made of ``nn.Linear``, convolutions,
        embeddings and norms this equals building the model after that seed). Without
        ``reinit``, every replica starts from the model's current weights. ``seeds[i]`` is
        also replica ``i``'s ``key``. The model itself is left untouched.

        Args:
            seeds: one seed per replica, or one int for all (same initial weights).
            reinit: re-draw the parameters per seed (else copy the model's).

        Raises:
            TypeError: ``seeds`` is not an int or a sequence of ints, or ``reinit`` is not a bool.
            ValueError: ``len(seeds) != k``, or ``reinit`` with a parameter whose module has
                no ``reset_parameters()`` (pass ``reinit=False`` or stack your own states).
        """
        where = "EnsembleStep.init"
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds] * self.k
        if not isinstance(seeds, Sequence) or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise TypeError(f"{where}: seeds must be an int or a sequence of {self.k} ints, got {seeds!r}")
        if len(seeds) != self.k:
            raise ValueError(f"{where}: got {len(seeds)} seeds, expected k={self.k} (one per replica)")
        if not isinstance(reinit, bool):
            raise TypeError(f"{where}: reinit must be a bool, got {reinit!r}")
        source = copy.deepcopy(self._model) if reinit else self._model
        if reinit:
            _check_resettable(source, where)
        skeleton = make_skeleton(self._model)
        states = []
        for i, seed in enumerate(seeds):
            if reinit:
                with torch.random.fork_rng(devices=list(self._devices)):
                    torch.manual_seed(seed)
                    with torch.no_grad():
                        for module in source.modules():
                            if callable(getattr(module, "reset_parameters", None)):
                                module.reset_parameters()
            # Copies when re-drawing: the next seed's reset_parameters() writes into the same tensors.
            params = {n: p.detach().clone() if reinit else p.detach() for n, p in source.named_parameters()}
            buffers = {n: b.detach().clone() if reinit else b.detach() for n, b in source.named_buffers()}
            opt_state = self.optimizer.builder(i).init({n: params[n] for n in self._trainable})
            key = torch.tensor(seed, dtype=torch.int64)
            states.append(TrainState(step=torch.zeros((), dtype=torch.int64), params=params, buffers=buffers,
                                     opt_state=opt_state, key=key, skeleton=skeleton))  # fmt: skip
        return stack_states(states)

    def replica_step(self, index: int) -> TrainStep:
        """An ordinary train step with replica ``index``'s optimizer, to continue one replica alone.

        ``replica_step(i)(replica_state(state, i), batch)`` updates replica ``i`` as this
        ensemble step does (to float rounding: batched matmuls may round differently), with
        this step's ``nonfinite`` policy (a non-finite loss is skipped, raised or ignored alike).

        Raises:
            TypeError: ``index`` is not an int.
            IndexError: ``index`` is out of range.
        """
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"EnsembleStep.replica_step: index must be an int, got {index!r}")
        if not -self.k <= index < self.k:
            raise IndexError(f"EnsembleStep.replica_step: index {index} is out of range for an ensemble of {self.k} replicas")
        return make_train_step(self._model, self.loss_fn, self.optimizer.builder(index), nonfinite=self.nonfinite)

    def updates_per(self, batches: int) -> int:
        """Optimizer updates this step makes from ``batches`` calls (one each)."""
        return batches

    def __repr__(self) -> str:
        return f"EnsembleStep({_name(self.loss_fn)}, {type(self._model).__name__}, k={self.k}, {self.optimizer.kind})"

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        """One update of every replica: ``(stacked state, batch) -> (stacked state, {name: [K] tensor})``.

        Raises:
            ValueError: the state is not stacked, has another number of replicas, or another
                optimizer structure; a per-replica batch without the leading ``k``; a loss
                that does not depend on the parameters.
            TypeError: the state's optimizer state is not this step's kind.
            NonFiniteError: a replica's loss is not finite (``nonfinite="raise"``).
        """
        where = "ensemble step"
        _check_state(state, where, stacked=True)
        k = _size(state, where)
        if k != self.k:
            raise ValueError(f"{where}: the step was built for k={self.k} replicas, got a state of {k} (key shape [{k}])")
        self.optimizer.check_state(state.opt_state, where)
        if self.per_replica_batch:
            self._check_batch(batch)
        donate = is_donating()
        params = state.params
        buffers = state.buffers if donate else {n: b.clone() for n, b in state.buffers.items()}
        leaves = {n: params[n].detach().requires_grad_() for n in self._trainable}
        rest = {**{n: params[n] for n in self._frozen}, **buffers}
        skeleton = state.skeleton
        _set_mode(skeleton, True)
        keys = tuple(state.key.tolist())
        if keys != self._keys:  # the replicas' keys mixed once: dropout seeds depend on every key and the step
            self._keys, self._keys_seed = keys, derive_seed(*keys)
        grad_was_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        forward = self._forward(skeleton)
        self._set_cumulative_momenta(rest, where)
        saved_rng = seed_generators(derive_seed(self._keys_seed, int(state.step)), self._devices)
        try:
            loss, metrics, moved = forward(leaves, rest, batch)
        except Exception as e:
            e.add_note(
                f"fnlight: {where} {int(state.step)}: loss_fn {_name(self.loss_fn)!r} ran under torch.func.vmap over {k} "
                f"replicas on a batch {describe_batch(batch)}; reading values (.item(), data-dependent control flow) or "
                "updating unbatched tensors in place is not supported there"
            )
            raise
        finally:
            restore_generators(saved_rng)
            torch.set_grad_enabled(grad_was_enabled)
            for _, module in self._cumulative:
                module.momentum = None
        if not loss.requires_grad:
            raise ValueError(
                f"loss_fn {_name(self.loss_fn)!r} returned a loss that does not depend on any trainable "
                "parameter (no gradient can flow); did it call the model it was given?"
            )
        # One autograd.grad of the summed losses gives each replica its own gradient: replica i's loss
        # depends on row i of each parameter alone.
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
        loss = loss.detach()
        # As torch.optim (and make_train_step): a parameter without a gradient is not updated.
        grads = {n: g for n, g in zip(leaves, grads) if g is not None}
        trainable = {n: params[n] for n in grads}
        bad = None
        if self.nonfinite != "ignore" and not math.isfinite(float(loss.sum())):  # one read; the mask only when needed
            finite = torch.isfinite(loss)
            if not bool(finite.all()):
                bad = ~finite
                if self.nonfinite == "raise":
                    raise NonFiniteError(self._nonfinite_message(state, loss))
        new_params, opt_state = self.optimizer.apply(trainable, grads, state.opt_state, inplace=donate and bad is None)
        if bad is not None:  # "skip": the replicas with a non-finite loss keep their parameters and optimizer state
            # (their buffers keep what the forward pass did, as make_train_step's and torch's skipped updates)
            keep = lambda new, old: torch.where(bad.view(-1, *[1] * (new.ndim - 1)).to(new.device), old, new)
            new_params = {n: keep(t, params[n]) for n, t in new_params.items()}
            opt_state = optree.tree_map(keep, opt_state, state.opt_state, namespace="fnlight")
        if self.nonfinite == "skip":
            metrics["skipped"] = torch.zeros(k) if bad is None else bad.float()
        if moved:  # buffers the forward reassigned (`self.count = self.count + 1`)
            buffers = updated(buffers, moved)
        new_state = state.replace(step=state.step + 1, params={**params, **new_params}, buffers=buffers, opt_state=opt_state)
        return new_state, metrics

    def _forward(self, skeleton: nn.Module) -> Any:
        """``vmap`` of the loss over the replicas, bound into ``skeleton`` (built once per skeleton).

        Only the forward pass is batched: ``vmap(grad_and_value(...))`` adds a transform level
        whose wrapping costs more than the backward of a small model.
        """
        if self._cached is not None and self._cached[0] is skeleton:
            return self._cached[1]
        loss_fn = self.loss_fn
        buffer_names = tuple(name for name, _ in skeleton.named_buffers())

        def replica_loss(
            leaves: dict[str, Tensor], rest: dict[str, Tensor], batch: Any
        ) -> tuple[Tensor, Metrics, dict[str, Tensor]]:
            saved = bind(skeleton, {**rest, **leaves})
            try:
                loss, metrics = _split_output(loss_fn(skeleton, batch), loss_fn)
                return loss, metrics, reassigned(skeleton, {n: rest[n] for n in buffer_names if n in rest})
            finally:
                unbind(saved)

        in_dims = (0, 0, 0 if self.per_replica_batch else None)
        forward = torch.func.vmap(replica_loss, in_dims=in_dims, randomness=self.randomness)
        self._cached = (skeleton, forward)
        self._cumulative = [
            (f"{name}." if name else "", m)
            for name, m in skeleton.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None
        ]
        return forward

    def _set_cumulative_momenta(self, rest: dict[str, Tensor], where: str) -> None:
        """Give each BatchNorm with ``momentum=None`` the factor its cumulative average uses at this batch.

        Such a layer computes ``1 / float(num_batches_tracked)`` in its forward, a read of a value that
        ``vmap`` refuses. The replicas advance together, so their counts are equal: the factor
        ``1 / (count + 1)`` is set as the layer's momentum for this call (the same float the layer
        would compute) and ``None`` is put back after it.
        """
        factors = []
        for prefix, _ in self._cumulative:
            counts = rest[prefix + "num_batches_tracked"]
            first = int(counts[0])
            if not bool((counts == first).all()):
                raise ValueError(
                    f"{where}: BatchNorm {prefix[:-1] or '(root)'!r} has momentum=None (a cumulative average, which "
                    f"depends on num_batches_tracked) but its replicas have tracked different numbers of batches "
                    f"{counts.tolist()}; stack states whose BatchNorms have seen as many batches, or set a momentum"
                )
            factors.append(1.0 / float(first + 1))
        for (_, module), factor in zip(self._cumulative, factors):
            module.momentum = factor

    def _check_batch(self, batch: Any) -> None:
        for i, leaf in enumerate(optree.tree_leaves(batch)):
            if not isinstance(leaf, Tensor) or leaf.ndim == 0 or leaf.shape[0] != self.k:
                got = f"shape {list(leaf.shape)}" if isinstance(leaf, Tensor) else f"a {type(leaf).__name__}"
                raise ValueError(
                    f"ensemble step (per_replica_batch=True): batch leaf {i} has {got}; expected tensors with a leading "
                    f"dimension of k={self.k} (one batch per replica), in a batch {describe_batch(batch)}"
                )

    def _nonfinite_message(self, state: TrainState, loss: Tensor) -> str:
        values = loss.tolist()
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        lrs = state.opt_state.hparams["lr"].tolist()
        shown = ", ".join(f"{i} (lr {lrs[i]:.3g}, loss {values[i]})" for i in bad[:10])
        return (
            f"non-finite loss at update {int(state.step)} in replica(s) {shown}; lower their learning rates, "
            "or pass nonfinite='skip' (those replicas skip the update) or 'ignore' to make_ensemble_step"
        )


def _check_resettable(model: nn.Module, where: str) -> None:
    for module_name, module in model.named_modules():
        if callable(getattr(module, "reset_parameters", None)):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p is not None:
                full = f"{module_name}.{name}" if module_name else name
                raise ValueError(
                    f"{where}: cannot re-draw parameter {full!r}: its module ({type(module).__name__}) has no "
                    "reset_parameters(); pass reinit=False (every replica starts from the model's weights) or build "
                    "the replicas yourself and combine them with fnlight.ensemble.stack_states"
                )


def make_ensemble_step(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    k: int,
    optimizer: str = "adamw",
    lr: float | Sequence[float] = 1e-3,
    options: Mapping[str, Any] | None = None,
    per_replica_batch: bool = False,
    randomness: str = "different",
    nonfinite: str = "raise",
) -> EnsembleStep:
    """Build a step that trains K replicas of ``model`` at once, vectorised with ``torch.func.vmap``.

    Replica ``i`` trains as ``make_train_step(model, loss_fn, fnlight.optim.<optimizer>(lr[i], **options_i))``
    would (to float rounding), where ``options_i`` takes entry ``i`` of each per-replica option.
    Use it for seed ensembles and hyperparameter sweeps of small models, where one vectorised
    step costs far less than K separate ones. Combine replicas with :func:`stack_states` and
    take them apart with :func:`unstack_states` / :func:`replica_state`.

    Args:
        model: the module; its structure and (with ``init(reinit=False)``) its weights.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, aux_metrics)``, as for
            :func:`fnlight.make_train_step`; it runs under ``vmap``, once per replica.
        k: the number of replicas.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (the update is vectorised over replicas;
            a state built with that ``fnlight.optim`` optimizer stacks into this step's state).
        lr: the learning rate, or one per replica.
        options: keyword options of ``fnlight.optim.<optimizer>`` (``weight_decay``, ``b1``,
            ``momentum``, ``mask``...); a float option may be a sequence of ``k`` values.
            Structural options (``amsgrad``, ``nesterov``, ``mask``) are shared.
        per_replica_batch: every tensor of the batch has a leading dimension ``k`` and
            replica ``i`` trains on index ``i`` (else all replicas see the same batch).
        randomness: ``vmap``'s randomness: ``"different"`` (each replica draws its own
            dropout masks; reproducible from the keys and the step, but not the draws of a
            single-model run), ``"same"`` (one draw shared by all), ``"error"``.
        nonfinite: a non-finite loss in any replica: ``"raise"`` a
            :class:`fnlight.NonFiniteError` naming the replicas; ``"skip"`` the update for those
            replicas only (metric ``skipped``, shape ``[k]``); ``"ignore"``.

    Returns:
        An :class:`EnsembleStep`: ``step.init(seeds=...)`` builds the stacked state.

    Raises:
        TypeError: a wrong type (model, loss_fn, an optimizer that is not a name, an unknown option, a
            schedule as ``lr``).
        ValueError: ``k < 1``, an option with the wrong number of values or out of range
            (naming the replica), or a bad ``randomness``/``nonfinite``.

    >>> import torch, fnlight as fl
    >>> from fnlight.ensemble import make_ensemble_step, unstack_states
    >>> step = make_ensemble_step(torch.nn.Linear(3, 1), fl.losses.mse, k=4, optimizer="sgd", lr=[0.01, 0.03, 0.1, 0.3])
    >>> state = step.init(seeds=0)
    >>> state, metrics = step(state, (torch.ones(8, 3), torch.zeros(8, 1)))
    >>> metrics["loss"].shape, state.opt_state.hparams["lr"].tolist()
    (torch.Size([4]), [0.01, 0.03, 0.1, 0.3])
    """
    where = "make_ensemble_step"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{where}: the model has no parameter with requires_grad=True; nothing to train")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: k must be a positive int (the number of replicas), got {k!r}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"{where}: options must be a mapping of fnlight.optim.{optimizer} options, got {options!r}")
    if not isinstance(per_replica_batch, bool):
        raise TypeError(f"{where}: per_replica_batch must be a bool, got {per_replica_batch!r}")
    if randomness not in RANDOMNESS:
        raise ValueError(f"{where}: randomness must be one of {RANDOMNESS}, got {randomness!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    opt = EnsembleOptimizer(optimizer, k, lr, options or {}, where=where)
    return EnsembleStep(model, loss_fn, opt, per_replica_batch=per_replica_batch, randomness=randomness, nonfinite=nonfinite)
