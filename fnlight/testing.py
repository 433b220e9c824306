"""Assertions for unit-testing your own steps: purity, determinism, finiteness, gradient flow, learning.

Each helper runs a step (``make_train_step(...)``, any ``with_*`` transform of one, or
your own ``(state, batch) -> (state, metrics)`` function) on a state and a batch and
raises ``AssertionError`` with a message that names what failed — the state paths
that changed, the parameters without a gradient, the loss trajectory — so that a
failing test says what to fix. They work under pytest, unittest or a plain script::

    from fnlight.testing import assert_pure, assert_can_overfit

    def test_my_step():
        state = step.init(seed=0)
        assert_pure(step, state, batch)
        assert_can_overfit(step, state, batch, steps=200)
"""

from __future__ import annotations

import cmath
import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import optree
import torch
from torch import Tensor

from ._donation import donating
from ._state import NAMESPACE, TrainState
from ._step import NonFiniteError, Step
from ._tree import tree_clone
from .optim._base import check_hparam
from .transforms._base import layers

__all__ = [
    "assert_all_params_get_grad",
    "assert_can_overfit",
    "assert_deterministic",
    "assert_finite",
    "assert_pure",
    "peak_tensor_bytes",
]

_SHOWN = 10


def _check_args(where: str, step: Any, state: Any) -> None:
    if not callable(step):
        raise TypeError(f"{where}: step must be callable (state, batch) -> (state, metrics), got {step!r}")
    if not isinstance(state, TrainState):
        raise TypeError(f"{where}: state must be a fnlight.TrainState (from step.init()), got {type(state).__name__}")


def _run(where: str, step: Step, state: TrainState, batch: Any) -> tuple[TrainState, Mapping[str, Tensor]]:
    out = step(state, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], TrainState) and isinstance(out[1], Mapping)):
        raise AssertionError(f"{where}: a step must return (TrainState, dict of metrics), got {type(out).__name__}: {out!r:.200}")
    return out


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _same(x: Any, y: Any) -> bool:
    """Bitwise equality of two leaves, where NaN equals NaN."""
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
            return False
        if torch.equal(x, y):
            return True
        if x.is_floating_point() or x.is_complex():
            return bool(((x == y) | (x.isnan() & y.isnan())).all())
        return False
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return False
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)) or x.dtype != y.dtype or x.shape != y.shape:
            return False
        try:
            return bool(np.array_equal(x, y, equal_nan=True))
        except TypeError:  # a dtype without NaN (strings, objects)
            return bool(np.array_equal(x, y))
    try:
        return bool(x == y) or bool(x != x and y != y)
    except Exception:  # an object whose == is not a truth value: the leaf is shared with the copy
        return x is y


def _snapshot(tree: Any) -> Any:
    """:func:`tree_clone`, with numpy arrays copied too (a step may write into a numpy batch)."""
    return optree.tree_map(lambda x: x.copy() if isinstance(x, np.ndarray) else x, tree_clone(tree), namespace=NAMESPACE)


def _differences(a: Any, b: Any, root: str) -> list[str]:
    """The paths (as code, e.g. ``state.params['w']``) at which two trees differ."""
    paths_a, leaves_a, spec_a = optree.tree_flatten_with_accessor(a, namespace=NAMESPACE)
    paths_b, leaves_b, spec_b = optree.tree_flatten_with_accessor(b, namespace=NAMESPACE)
    if spec_a != spec_b:
        names_a = {p.codify(root) for p in paths_a}
        names_b = {p.codify(root) for p in paths_b}
        return sorted(names_a ^ names_b) or [f"{root} (its structure)"]
    return [p.codify(root) for p, x, y in zip(paths_a, leaves_a, leaves_b) if not _same(x, y)]


_ATOMS = (str, bytes, bool, int, float, complex, type(None), torch.dtype, torch.device)


def _inner_tensors(obj: Any, path: str, out: dict[str, Tensor], limit: int = 10_000) -> None:
    """The tensors reachable inside an object optree sees as one leaf (a dataclass, a dict subclass, an object).

    Walked without recursion (a long linked chain is fine), each object once (cycles are fine),
    at most ``limit`` objects.
    """
    seen: set[int] = set()
    stack = [(path, obj)]
    while stack and len(seen) < limit:
        path, obj = stack.pop()
        if isinstance(obj, Tensor):
            out[path] = obj
            continue
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            items: Iterable[tuple[str, Any]] = [(f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        elif isinstance(obj, Mapping):
            items = [(f"[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            items = [(f"[{i}]", v) for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__") and not callable(obj):
            items = [(f".{k}", v) for k, v in vars(obj).items()]
        else:
            continue
        stack.extend((path + suffix, value) for suffix, value in reversed(items))


def _opaque_tensors(tree: Any, root: str) -> dict[str, Tensor]:
    """Path -> tensor for every tensor held inside the non-tensor leaves of ``tree``.

    optree stops at objects it has no rule for (a dataclass batch, a ``dict`` subclass, a
    ``UserDict`` such as a tokenizer's output): ``tree_clone`` shares them, so comparing
    leaves would compare such an object with itself. Their tensors are compared one by one.
    """
    paths, leaves, _ = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    out: dict[str, Tensor] = {}
    for accessor, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            _inner_tensors(leaf, accessor.codify(root), out)
    return out


def _opaque_differences(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[str]:
    """The paths whose tensors changed or went between two :func:`_opaque_tensors` readings.

    A tensor that appeared is not a change: an object may cache what it computes
    (``functools.cached_property``) without altering what it held.
    """
    return sorted(p for p in before if p not in after or not _same(after[p], before[p]))


def _nonfinite(tree: Any, root: str) -> list[str]:
    paths, leaves, _ = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    return [
        p.codify(root)
        for p, t in zip(paths, leaves)
        if (isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()))
        or (isinstance(t, (float, complex)) and not cmath.isfinite(t))  # a Python number, as a step of your own may report
    ]


def _grad_phase(step: Any) -> Any:
    """The layer whose ``grads`` runs the gradient phase (inside accumulation, which only runs whole calls)."""
    target = step
    for layer in layers(step):
        if getattr(layer, "name", None) == "with_grad_accum":
            target = layer.inner
    return target if callable(getattr(target, "grads", None)) else None


def _batch_copy(batch: Any) -> Any:
    """A copy of ``batch`` a step may write into: a deep copy (tensors inside a dataclass or a ``UserDict`` too).

    An object that cannot be deep-copied gets :func:`tree_clone` (its pytree tensors cloned).
    """
    try:
        return copy.deepcopy(batch)
    except Exception:
        return tree_clone(batch)


def assert_pure(step: Step, state: TrainState, batch: Any) -> None:
    """Assert that calling ``step`` modifies neither its input state nor the batch.

    A fnlight step is a pure function: it returns a new state and leaves its input as
    it was (in-place updates happen only inside :func:`fnlight.fold`, which owns its
    states). This calls the step once and compares every leaf of ``state`` and
    ``batch`` bitwise with a copy taken before (NaN equals NaN), including the tensors
    inside objects that are not pytree containers (a dataclass batch, a ``dict``
    subclass, a ``UserDict``).

    Args:
        step: the step under test.
        state: the state to call it on.
        batch: one batch.

    Raises:
        AssertionError: naming every state or batch path that changed, or the step did
            not return ``(TrainState, metrics)``.
        TypeError: ``step`` is not callable or ``state`` is not a :class:`fnlight.TrainState`.

    >>> import torch, fnlight as fl
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.adamw(1e-2))
    >>> assert_pure(step, step.init(), (torch.ones(4, 3), torch.zeros(4, 1)))
    """
    where = "assert_pure"
    _check_args(where, step, state)
    state_before, batch_before = tree_clone(state), _snapshot(batch)
    inner_before = {p: t.clone() for p, t in {**_opaque_tensors(state, "state"), **_opaque_tensors(batch, "batch")}.items()}
    _run(where, step, state, batch)
    changed = _differences(state, state_before, "state") + _differences(batch, batch_before, "batch")
    changed += _opaque_differences(inner_before, {**_opaque_tensors(state, "state"), **_opaque_tensors(batch, "batch")})
    if changed:
        raise AssertionError(
            f"{where}: the step modified its input in place: {_listing(changed)} changed. A step must return new "
            "tensors (p - lr * g, not p.sub_(lr * g)) and leave the state and batch it was given as they were; "
            "only fold() updates states in place."
        )


def assert_deterministic(step: Step, state: TrainState, batch: Any) -> None:
    """Assert that two calls on the same state and batch give bitwise the same state and metrics.

    The global random generators are seeded differently before each call (and restored
    afterwards), so a step that draws randomness outside fnlight's counter-based seeding
    (``torch.rand`` in a custom step, a generator kept in a closure) fails. Dropout in the
    loss function is fine: the step seeds torch's generator from the state's key and
    update count. Each call gets its own copy of ``state`` and of ``batch``, so a step
    that writes into either is reported by :func:`assert_pure`, not here.

    Args:
        step: the step under test.
        state: the state to call it on.
        batch: one batch.

    Raises:
        AssertionError: naming the state paths and metrics that differ between the calls.
        TypeError: ``step`` is not callable or ``state`` is not a :class:`fnlight.TrainState`.

    >>> import torch, fnlight as fl
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    >>> step = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1))
    >>> assert_deterministic(step, step.init(seed=0), (torch.ones(4, 3), torch.zeros(4, 1)))
    """
    where = "assert_deterministic"
    _check_args(where, step, state)
    cuda = sorted({t.device.index or 0 for t in state.params.values() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(1)
        state_a, metrics_a = _run(where, step, tree_clone(state), _batch_copy(batch))
        torch.manual_seed(2)
        state_b, metrics_b = _run(where, step, tree_clone(state), _batch_copy(batch))
    differ = _differences(state_a, state_b, "new_state") + _differences(dict(metrics_a), dict(metrics_b), "metrics")
    if differ:
        raise AssertionError(
            f"{where}: two calls on the same state and batch gave different results at {_listing(differ)}. "
            "Randomness must come from the seed the step sets for the loss function (dropout, torch.rand inside "
            "loss_fn) or from fnlight.derive_seed(state.key, state.step), not from the global generator outside it."
        )


def assert_finite(step: Step, state: TrainState, batch: Any) -> None:
    """Assert that the loss, metrics, gradients and the updated state hold no NaN or infinity.

    When the step has a gradient phase (``step.grads``; inside an accumulation
    transform, its inner step's) it is run first, and the loss, metrics and gradients
    are checked, so a NaN is reported where it appears rather than after the update.
    Under fp16 loss scaling the gradients are scaled and overflow is the scaler's
    business, so only the loss and metrics are checked there. Then the whole step runs
    and its metrics, parameters, buffers and optimizer state are checked.

    Args:
        step: the step under test.
        state: the state to call it on.
        batch: one batch.

    Raises:
        AssertionError: naming the non-finite values (loss, metric names, parameter
            paths), also when the step raised :class:`fnlight.NonFiniteError`.
        TypeError: ``step`` is not callable or ``state`` is not a :class:`fnlight.TrainState`.

    >>> import torch, fnlight as fl
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> assert_finite(step, step.init(), (torch.ones(4, 3), torch.zeros(4, 1)))
    """
    where = "assert_finite"
    _check_args(where, step, state)
    phase = _grad_phase(step)
    if phase is not None:
        g = phase.grads(state, batch)
        bad = _nonfinite(dict(g.metrics), "metrics")  # the loss is metrics['loss']
        if not any(getattr(layer, "scaling", False) for layer in layers(step)):
            bad += [f"gradient of {name!r}" for name, t in g.grads.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise AssertionError(f"{where}: non-finite values in the gradient phase (loss = {float(g.loss)}): {_listing(bad)}")
    try:
        new_state, metrics = _run(where, step, state, batch)
    except NonFiniteError as e:
        raise AssertionError(f"{where}: the step raised NonFiniteError: {e}") from e
    bad = _nonfinite(dict(metrics), "metrics")
    for field in ("params", "buffers", "opt_state"):
        bad += _nonfinite(getattr(new_state, field), f"new_state.{field}")
    if bad:
        raise AssertionError(f"{where}: non-finite values after the step: {_listing(bad)}")


def assert_all_params_get_grad(step: Step, state: TrainState, batch: Any, *, ignore: Iterable[str] = ()) -> None:
    """Assert that every trainable parameter receives a gradient that is not all zeros.

    Runs the step's gradient phase (``step.grads``; inside an accumulation transform,
    its inner step's) on ``batch``. A parameter the loss never uses gets no gradient
    (``None``) and would silently never train; an all-zero gradient points at a dead
    branch (a multiplication by zero, a detached path, a masked-out head).

    Args:
        step: the step under test (``make_train_step(...)`` or a transform of one).
        state: the state to call it on.
        batch: one batch.
        ignore: names of parameters that may go without a gradient on this batch.

    Raises:
        AssertionError: naming every parameter without a gradient or with an all-zero one.
        TypeError: ``step`` has no gradient phase (``grads``), ``state`` is not a
            :class:`fnlight.TrainState`, or ``ignore`` is not a collection of names
            (a single string, ``None``).
        ValueError: a name in ``ignore`` is not a trainable parameter.

    >>> import torch, fnlight as fl
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> assert_all_params_get_grad(step, step.init(), (torch.ones(4, 3), torch.zeros(4, 1)))
    """
    where = "assert_all_params_get_grad"
    _check_args(where, step, state)
    phase = _grad_phase(step)
    if phase is None:
        raise TypeError(
            f"{where}: the step has no gradient phase (step.grads); pass make_train_step(...) or a with_* transform of it, "
            f"got {type(step).__name__}"
        )
    if isinstance(ignore, str):
        raise TypeError(f"{where}: ignore must be a collection of parameter names, got the single string {ignore!r}")
    names = list(ignore) if isinstance(ignore, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{where}: ignore must be a collection of parameter names (str), got {ignore!r}")
    core = getattr(step, "core", None)
    trainable = list(core._trainable) if core is not None else list(state.params)
    skipped = set(names)
    unknown = sorted(skipped - set(trainable))
    if unknown:
        raise ValueError(f"{where}: ignore names {unknown} that are not trainable parameters; the trainable ones are {trainable}")
    g = phase.grads(state, batch)
    missing = [n for n in trainable if n not in skipped and n not in g.grads]
    zero = [n for n in trainable if n not in skipped and n in g.grads and not bool(g.grads[n].any())]
    if missing or zero:
        parts = [f"no gradient (not used by the loss): {_listing([repr(n) for n in missing])}"] if missing else []
        parts += [f"an all-zero gradient: {_listing([repr(n) for n in zero])}"] if zero else []
        raise AssertionError(
            f"{where}: {len(missing) + len(zero)} of {len(trainable)} trainable parameters get no usable gradient "
            f"from this batch: {'; '.join(parts)}. Use them in the forward pass, freeze them (requires_grad_(False)) "
            "before make_train_step, or list them in ignore=."
        )


def assert_can_overfit(
    step: Step,
    state: TrainState,
    batch: Any,
    *,
    steps: int = 100,
    factor: float = 0.1,
    target_loss: float | None = None,
    metric: str = "loss",
) -> None:
    """Assert that repeated steps on one batch drive its loss down: the model can learn at all.

    Calls the step on the same batch up to ``steps`` times (in place, on a copy of
    ``state``, as :func:`fnlight.fold` does) and passes as soon as the reported
    ``metric`` reaches the goal: ``target_loss`` when given, else ``factor`` times the
    first call's value. A model that cannot memorise one batch — a zero learning rate,
    frozen or detached parameters, a loss that ignores the targets — fails with the
    loss trajectory.

    Args:
        step: the step under test.
        state: the state to start from (not modified).
        batch: the batch to overfit.
        steps: the most calls to make (>= 1).
        factor: the goal relative to the first value, in (0, 1).
        target_loss: an absolute goal; when given, ``factor`` is not used.
        metric: the metric to watch (lower is better).

    Raises:
        AssertionError: the goal was not reached within ``steps`` calls, or the metric
            became NaN or infinite (with the first, best and last values), also when the
            step raised :class:`fnlight.NonFiniteError` for it.
        TypeError: ``step`` is not callable, ``state`` is not a :class:`fnlight.TrainState`,
            ``factor``/``target_loss`` is not a number, ``metric`` is not a string, or the
            step reports that metric as neither a tensor nor a number.
        ValueError: ``steps < 1``, ``factor`` outside (0, 1), a non-finite
            ``target_loss``, ``metric`` is not among the step's metrics or not a scalar, or
            its first value is not positive while no ``target_loss`` is given.

    >>> import torch, fnlight as fl
    >>> step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> assert_can_overfit(step, step.init(), (torch.ones(4, 3), torch.ones(4, 1)), steps=50)
    """
    where = "assert_can_overfit"
    _check_args(where, step, state)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: steps must be an int >= 1, got {steps!r}")
    if not isinstance(metric, str):
        raise TypeError(f"{where}: metric must be the name of one of the step's metrics (a str), got {metric!r}")
    factor = check_hparam("factor", factor, where=where, low=0.0, high=1.0, low_inclusive=False)
    if target_loss is not None:
        target_loss = check_hparam("target_loss", target_loss, where=where, low=-math.inf)
    values: list[float] = []
    current = tree_clone(state)
    with donating():  # the copy is ours: update it in place, as fold does
        for _ in range(steps):
            try:
                current, metrics = _run(where, step, current, batch)
            except NonFiniteError as e:  # the step's nonfinite="raise" policy: the metric diverged, as below
                so_far = f" (first value {values[0]:.6g}, last {values[-1]:.6g})" if values else ""
                raise AssertionError(f"{where}: the step raised NonFiniteError at call {len(values) + 1}{so_far}: {e}") from e
            if metric not in metrics:
                raise ValueError(f"{where}: metric {metric!r} is not among the step's metrics {sorted(metrics)}")
            reported = metrics[metric]
            if isinstance(reported, Tensor) and reported.ndim != 0:
                raise ValueError(
                    f"{where}: {metric} must be a scalar, got shape {list(reported.shape)} (an ensemble step "
                    "gives one per replica: test replica_step(i) on replica_state(state, i))"
                )
            if not isinstance(reported, Tensor) and (isinstance(reported, bool) or not isinstance(reported, numbers.Real)):
                raise TypeError(
                    f"{where}: metrics[{metric!r}] must be a 0-d tensor or a number, "
                    f"got {type(reported).__name__}: {reported!r:.100}"
                )
            value = float(reported)
            values.append(value)
            if target_loss is None and len(values) == 1 and math.isfinite(value) and value <= 0:
                raise ValueError(
                    f"{where}: the first {metric} is {value:.6g}; a goal relative to it (factor x the first value) "
                    "needs a positive metric. Pass target_loss=<the value to reach> for a loss that can be 0 or negative "
                    "(a negative log-likelihood, an ELBO)"
                )
            goal = target_loss if target_loss is not None else factor * values[0]
            if not math.isfinite(value):
                raise AssertionError(f"{where}: {metric} became {value} at call {len(values)} (first value {values[0]:.6g})")
            if value <= goal:
                return
    best = min(range(len(values)), key=values.__getitem__)
    aim = f"{target_loss:.6g}" if target_loss is not None else f"{factor:g} x the first value = {goal:.6g}"
    raise AssertionError(
        f"{where}: {metric} did not reach {aim} within {steps} calls on one batch: first {values[0]:.6g}, "
        f"best {values[best]:.6g} (call {best + 1}), last {values[-1]:.6g}. Check the learning rate, frozen or "
        "detached parameters and the loss function, or give more steps."
    )


def peak_tensor_bytes(run: Callable[[], object]) -> int:
    """The most bytes of CPU tensors live at once while ``run()`` runs: the CPU counterpart of ``max_memory_allocated``.

    torch's CPU allocator reports every allocation and free to the profiler while it records
    memory; the running sum of those sizes, in time order, peaks at the answer. Counted: every
    CPU tensor allocated during ``run`` (a model built there, batches, gradients, optimizer
    state, activations, a compiled graph's buffers) until it is freed. Not counted: tensors that
    existed before (nor their frees), GPU tensors (use ``torch.cuda.max_memory_allocated``), and
    memory that does not come from torch's allocator (MKL's scratch space, Python objects).
    Use it to check that a step or a transform keeps no more activations than another.

    >>> import torch
    >>> from fnlight.testing import peak_tensor_bytes
    >>> def two_at_once():
    ...     a = torch.zeros(1024)  # 4 KiB
    ...     b = torch.zeros(2048)  # 8 KiB, while a is alive
    >>> peak_tensor_bytes(two_at_once)
    12288
    """
    if not callable(run):
        raise TypeError(f"peak_tensor_bytes: run must be a callable taking no arguments, got {run!r}")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    sizes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
    return peak
