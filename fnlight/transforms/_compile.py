"""Whole-step compilation: forward, backward and optimizer update as one ``torch.compile`` graph."""

from __future__ import annotations

import difflib
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch._dynamo
from torch import Tensor

from .._donation import donating, donating_model, is_donating, updated
from .._rng import restore_generators, seed_generators, step_seed
from .._state import TrainState
from .._step import (
    NO_CONTEXT,
    GradContext,
    Gradients,
    NonFiniteError,
    _check_state,
    _name,
    _set_grad_enabled,
    _set_mode,
    update_metrics,
)
from .._traced_step import make_apply_fn, make_grads_fn, make_step_fn, set_leaves
from ._base import Metrics, Transform

__all__ = ["FALLBACKS", "CompileError", "CompileFallbackWarning", "with_compile"]

FALLBACKS = ("warn", "raise", "eager")
_KINDS = ("step", "grads", "update")
_FIXES = "Make the model traceable (no .item(), no Python branches on tensor values), pass fullgraph=False to accept graph breaks"
T = TypeVar("T")


class CompileFallbackWarning(UserWarning):
    """``with_compile(fallback="warn")`` could not compile the step (or compiled it with graph breaks)."""


class CompileError(RuntimeError):
    """``with_compile(fallback="raise")`` could not compile the step as one graph."""


# What a failed compile raises: dynamo's errors, and hitting the recompile limit under fullgraph=True.
_COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def _own_code(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` with a code object of its own.

    Dynamo keeps its compiled graphs (and counts recompilations against its limit of 8) per
    code object. The step bodies are closures made by the same factory, so without a copy of
    the code every with_compile step built in a process would share one cache: the ninth
    step would hit the limit, and one step's guards would be checked on every other's call.
    """
    code = fn.__code__.replace()  # an equal but distinct code object
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)  # type: ignore[return-value]


_GLOBAL_ROOT = re.compile(r"G\['([^']*)'\]")
# Guards that only check an object's identity (a function, class or module is still the same object).
_IDENTITY_GUARDS = frozenset({"ID_MATCH", "MODULE_MATCH", "CLOSURE_MATCH", "BUILTIN_MATCH", "CLASS_MATCH", "FUNCTION_MATCH"})


def _global_owner(root: str, own: Mapping[str, Any]) -> str:
    """Whose module global dynamo's source ``G['root']`` is: "fnlight", "torch", "builtins" or "user".

    ``own`` is the globals of the traced step body (fnlight's ``_traced_step``): a bare name found
    there is one of them. Modules that inlined code read their globals from appear as
    ``__import_<module, dots spelled _dot_>``. Anything unrecognised counts as the user's.
    """
    if root.startswith("__builtins_dict___"):
        return "builtins"
    if root.startswith("__import_"):
        name = root.removeprefix("__import_").replace("_dot_", ".")
        top = name.partition(".")[0]
        return top if top in ("fnlight", "torch") and name in sys.modules else "user"
    return "fnlight" if not root.startswith("__") and root in own else "user"


def _library_guard_filter(own: Mapping[str, Any]) -> Callable[[list[Any]], list[bool]]:
    """A ``guard_filter_fn`` for ``torch.compile`` that drops dynamo's guards on library internals.

    Dropped: every guard on a global of fnlight's own modules or on a builtin, and the identity
    guards (is this still the same function / class / module?) on torch's module globals — the
    checks that would only fail if someone rebound fnlight, torch or Python internals after the
    first call. Kept: guards on tensors, on the structure and values of the step's arguments,
    on the step's own objects (loss function, optimizer settings), on torch's global values
    (flags such as ``torch.backends.cudnn.enabled``) and on every global of the user's modules.
    """

    def keep(entries: list[Any]) -> list[bool]:
        out = []
        for entry in entries:
            match = _GLOBAL_ROOT.match(entry.name) if entry.is_global else None
            owner = _global_owner(match.group(1), own) if match else "user"
            dropped = owner in ("fnlight", "builtins") or (owner == "torch" and entry.guard_type in _IDENTITY_GUARDS)
            out.append(not dropped)
        return out

    return keep


def _combined(ours: Callable[[list[Any]], list[bool]], theirs: Any) -> Callable[[list[Any]], list[bool]]:
    """A guard is kept when both filters keep it (the user's ``guard_filter_fn`` from ``options``)."""
    if theirs is None:
        return ours
    return lambda entries: [a and bool(b) for a, b in zip(ours(entries), theirs(entries), strict=True)]


def _limit_reason() -> tuple[str, str]:
    """Why a step reached dynamo's recompile limit, and the remedies."""
    limit = torch._dynamo.config.recompile_limit
    reason = (
        f"dynamo's recompile limit was reached: the step was compiled for {limit} different kinds of input "
        f"(batch shapes, dtypes), the most torch keeps per step (torch._dynamo.config.recompile_limit = {limit})"
    )
    fixes = (
        "Give the step few batch shapes (pad or bucket variable-length batches; drop_last=True), pass "
        "dynamic=None to compile shape-generic graphs from the second shape on, or raise "
        "torch._dynamo.config.recompile_limit"
    )
    return reason, fixes


def _limit_hits() -> int:
    """How often dynamo has skipped a frame at its recompile limit (which ``fullgraph=False`` does without raising)."""
    found = torch._dynamo.utils.counters["unimplemented"]
    return sum(n for reason, n in found.items() if reason.startswith("Dynamo recompile limit")) if found else 0


def _recompile_limit(error: BaseException) -> bool:
    """Whether ``error`` is dynamo giving up after ``recompile_limit`` graphs of one step."""
    return isinstance(error, torch._dynamo.exc.FailOnRecompileLimitHit) or "recompile limit" in str(error).lower()


def _reason(error: BaseException) -> str:
    """A one-paragraph reason from a ``torch._dynamo`` error: what failed, why, and where in the user's code."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    parts = [lines[0] if lines else type(error).__name__]
    parts += [ln for ln in lines[1:4] if ln.startswith("Explanation:") or re.match(r"\w+(Error|Exception|Warning): ", ln)]
    if "from user code:" in lines:
        frames = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
        if frames:
            where = lines[frames[-1]]
            code = lines[frames[-1] + 1] if frames[-1] + 1 < len(lines) else ""
            parts.append(f"at {where}: {code}" if code and not code.startswith(("File ", "Set ")) else f"at {where}")
    return " ".join(parts)


class Compiled(Transform):
    """See :func:`with_compile`."""

    name = "with_compile"
    _by_phases = True  # its __call__ runs the core's compiled phases, never the inner step whole

    def __init__(
        self,
        inner: Any,
        *,
        backend: str | Callable[..., Any],
        options: dict[str, Any] | None,
        fullgraph: bool,
        dynamic: bool | None,
        fallback: str,
    ) -> None:
        super().__init__(inner)
        self.backend, self.options, self.fullgraph, self.dynamic, self.fallback = backend, options, fullgraph, dynamic, fallback
        self.graphs: dict[str, int] = dict.fromkeys(_KINDS, 0)
        self.eager_reason: str | None = None
        self._fns: dict[tuple[str, bool], Callable[..., Any]] = {}
        self._breaks_reported = False

    # ------------------------------------------------------------------ compiled callables

    def _compiled(self, kind: str, inplace: bool) -> Callable[..., Any]:
        fn = self._fns.get((kind, inplace))
        if fn is None:
            core = self.core
            device = next(iter(core._model.parameters())).device.type
            if kind == "step":
                body = make_step_fn(core, inplace=inplace, device_type=device)
            elif kind == "grads":
                body = make_grads_fn(core, inplace=inplace, device_type=device)
            else:
                body = make_apply_fn(core, inplace=inplace)
            options = dict(self.options or {})  # torch.compile pops guard_filter_fn out of the dict it is given
            options["guard_filter_fn"] = _combined(_library_guard_filter(body.__globals__), options.get("guard_filter_fn"))
            fn = torch.compile(
                _own_code(body), backend=self.backend, fullgraph=self.fullgraph, dynamic=self.dynamic, options=options
            )
            self._fns[(kind, inplace)] = fn
        return fn

    def _call(self, kind: str, inplace: bool, args: tuple[Any, ...], seed: int | None) -> Any:
        """Run a compiled phase with the eager step's surroundings: seeded generator, grad mode, graph counting."""
        fn = self._fns.get((kind, inplace)) or self._compiled(kind, inplace)
        stats = torch._dynamo.utils.counters["stats"]
        before = stats["unique_graphs"]
        breaks = None if self.fullgraph else dict(torch._dynamo.utils.counters["graph_break"])
        hits = None if self.fullgraph else _limit_hits()
        saved_rng = None if seed is None else seed_generators(seed, self.core._devices)
        grad_was_enabled = torch.is_grad_enabled()
        config = torch._dynamo.config
        traced_autograd = config.trace_autograd_ops
        _set_grad_enabled(True)
        config.trace_autograd_ops = True  # autograd.grad inside the graph instead of a graph break
        try:
            return fn(*args)
        finally:
            config.trace_autograd_ops = traced_autograd
            _set_grad_enabled(grad_was_enabled)
            if saved_rng is not None:
                restore_generators(saved_rng)
            compiled = stats["unique_graphs"] - before
            if compiled:
                self.graphs[kind] += compiled
                if breaks is not None:
                    self._report_breaks(breaks)
            if hits is not None and _limit_hits() > hits:  # dynamo ran this call eagerly, and will from now on
                self._limit_reached()

    def _limit_reached(self) -> None:
        """Under ``fullgraph=False`` dynamo skips a step past its recompile limit silently: say so, as a failed compile would."""
        reason, fixes = _limit_reason()
        where = f"with_compile: the step of {self._model_name()} runs eagerly from now on"
        if self.fallback == "raise":
            raise CompileError(f"{where} (fullgraph=False): {reason}. {fixes}, or fallback='warn' to run it eagerly.")
        self.eager_reason = reason
        if self.fallback == "warn":
            warnings.warn(f"{where} (fallback='warn'). Reason: {reason}. {fixes}.", CompileFallbackWarning, stacklevel=4)

    def _report_breaks(self, before: dict[str, int]) -> None:
        """Warn once about the graph breaks of this call (dynamo's counter is the process's: other functions' are older)."""
        if self._breaks_reported or self.fallback != "warn":
            return
        counter = torch._dynamo.utils.counters["graph_break"]
        new = [r for r, n in counter.items() if n > before.get(r, 0)]
        if not new:
            return
        self._breaks_reported = True
        reasons = "; ".join(dict.fromkeys(r.strip().splitlines()[0] for r in new))
        warnings.warn(
            f"with_compile: the step of {self._model_name()} compiled with graph breaks (fullgraph=False), so parts of "
            f"it run eagerly between graphs: {reasons}. Pass fullgraph=True to fall back to eager with the exact "
            "reason instead, or fallback='eager' to silence this.",
            CompileFallbackWarning,
            stacklevel=4,
        )

    def _model_name(self) -> str:
        core = self.core
        return f"{type(core._model).__name__} (loss_fn {_name(core.loss_fn)!r})"

    def _fall_back(self, error: BaseException, eager: Callable[[], T], pure: Callable[[], Any]) -> T:
        """The step could not be compiled: raise, or run it eagerly (now and from now on).

        ``pure`` is the same eager work without writing into anything it is given: under
        ``fallback="raise"`` it tells an error of the step itself (a batch of the wrong shape,
        a state built by another optimizer), which is raised as eager raises it, from a compile failure.
        """
        reason, fixes = _limit_reason() if _recompile_limit(error) else (_reason(error), _FIXES)
        where = f"with_compile: could not compile the step of {self._model_name()}"
        if self.fallback == "raise":
            with donating(False):
                self._eagerly(pure, where, reason)
            raise CompileError(
                f"{where} with backend={self.backend!r}, fullgraph={self.fullgraph}: {reason}. "
                f"{fixes}, or fallback='warn' to run it eagerly."
            ) from error
        result = self._eagerly(eager, where, reason)
        self.eager_reason = reason
        if self.fallback == "warn":
            warnings.warn(
                f"{where}; running it eagerly from now on (fallback='warn'). Reason: {reason}. "
                f"{fixes}, or fallback='eager' to silence this.",
                CompileFallbackWarning,
                stacklevel=3,
            )
        return result

    @staticmethod
    def _eagerly(eager: Callable[[], T], where: str, reason: str) -> T:
        try:
            return eager()
        except Exception as eager_error:  # the step fails eagerly too: that error is the one to see
            eager_error.add_note(f"{where} either: {reason}")
            raise

    @staticmethod
    def _seed(state: TrainState, ctx: GradContext) -> int:
        return step_seed(int(state.key), int(state.step), ctx.micro, ctx.rank)

    # ------------------------------------------------------------------ the step's phases

    def grads(self, state: TrainState, batch: Any, ctx: GradContext = NO_CONTEXT) -> Gradients:
        """The gradient phase as one compiled graph (for transforms that drive the phases themselves)."""
        if self.eager_reason is not None:
            return self.inner.grads(state, batch, ctx)
        if ctx.gather is not None:
            raise TypeError(
                "with_compile: the gradient phase was asked to gather sharded parameters (with_fsdp), which the "
                "compiled step does not support; use with_ddp, or drop with_compile under with_fsdp"
            )
        _check_state(state, "train step")
        _set_mode(state.skeleton, True)
        inplace = is_donating()
        # a tensor, not a float: dynamo would guard on the float's value and compile a graph per micro-batch weight;
        # and a tensor for every later micro-batch, even one whose weight happens to be 1.0 (n = K * n0)
        weight = None if ctx.loss_weight == 1.0 and not ctx.micro else torch.tensor(ctx.loss_weight, dtype=torch.float64)
        args = (state.skeleton, state.params, state.buffers, batch, ctx.autocast, ctx.loss_scale, weight, ctx.accumulate)
        try:
            loss, grads, buffers, metrics = self._call("grads", inplace, args, self._seed(state, ctx))
        except _COMPILE_ERRORS as e:
            return self._fall_back(
                e,
                lambda: self.inner.grads(state, batch, ctx),
                lambda: self.inner.grads(state, batch, ctx._replace(accumulate=None)),
            )
        if inplace and donating_model():  # 0-d scalars came back as new tensors: the model's are the old ones
            old = state.buffers
            buffers = updated(old, {k: b for k, b in buffers.items() if b is not old[k]})
        return Gradients(loss, grads, buffers, metrics)

    def update(self, state: TrainState, g: Gradients) -> tuple[TrainState, Metrics]:
        """The update phase: the core step's update with the optimizer's arithmetic compiled."""
        if self.eager_reason is not None:
            return self.inner.update(state, g)
        new_state, metrics = self.core._update(state, g, self._apply)
        if metrics and is_donating():  # in place, the graph writes the next update's values into these tensors
            exposed = update_metrics(new_state.opt_state)
            if any(k in metrics for k in exposed):  # the metrics keep copies, as __call__'s do
                metrics = {k: v.clone() if k in exposed else v for k, v in metrics.items()}
        return new_state, metrics

    def _apply(self, params: dict[str, Tensor], grads: dict[str, Tensor], opt_state: Any, *, inplace: bool) -> Any:
        try:
            new_params, new_opt = self._call("update", inplace, (params, grads, opt_state), None)
        except _COMPILE_ERRORS as e:
            optimizer = self.core.optimizer
            return self._fall_back(
                e,
                lambda: optimizer.apply(params, grads, opt_state, inplace=inplace),
                lambda: optimizer.apply(params, grads, opt_state, inplace=False),
            )
        if not inplace:
            return new_params, new_opt
        # the graph wrote into the given tensors and returned the rest (see written_in_place); the core's
        # update keeps the parameter dict when updating in place, so the 0-d scalars are written back here
        for name, new in new_params.items():
            params[name].copy_(new)
        paths, leaves = new_opt
        return params, (leaves if paths is None else set_leaves(opt_state, paths, leaves))

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        # Right after the previous step's graph has streamed its tensors through the caches, every Python call
        # here costs µs of cache misses (docs/compile.md): the common path is written out, with few calls.
        if self.eager_reason is not None:
            return self.inner(state, batch)
        _check_state(state, "train step")
        skeleton = state.skeleton
        if not skeleton.training:
            skeleton.train(True)
        inplace = is_donating()
        args = (skeleton, state.params, state.buffers, state.opt_state, state.step, batch, None)
        try:
            ok, loss, metrics, new_params, buffers, opt_state, step = self._call(
                "step", inplace, args, step_seed(int(state.key), int(state.step), 0)
            )
        except _COMPILE_ERRORS as e:
            return self._fall_back(e, lambda: self.inner(state, batch), lambda: self.inner(state, batch))
        core = self.core
        extra: Metrics = {}
        if inplace:  # the graph wrote into the state's tensors and returned only the rest (see make_step_fn)
            paths, leaves = opt_state
            opt_state = leaves if paths is None else set_leaves(state.opt_state, paths, leaves)
            # (under donate="model" written into the model's own tensors)
            buffers = updated(state.buffers, buffers) if buffers else state.buffers
            new_params = updated(state.params, new_params) if new_params else state.params
        else:
            new_params = {**state.params, **new_params}
        if ok is not None:
            bad = not bool(ok)  # one read of a flag, as the eager step reads its loss
            if core.nonfinite != "raise":
                extra["skipped"] = torch.scalar_tensor(float(bad))
            if bad:  # the update was masked out in the graph (in place) or is dropped here (pure)
                if core.nonfinite == "raise":
                    raise NonFiniteError(_nonfinite_message(state, loss))
                kept = state.replace(buffers=dict(buffers))  # as eager: the forward moved the buffers
                return (kept.replace(stop=torch.tensor(True)) if core.nonfinite == "stop" else kept), {**metrics, **extra}
        new_state = state.replace(step=step, params=new_params, buffers=dict(buffers), opt_state=opt_state)
        exposed = update_metrics(opt_state)
        if exposed:  # in place, the graph writes the next update's values into these tensors: the metrics keep copies
            extra.update({k: v.clone() for k, v in exposed.items()} if inplace else exposed)
        return new_state, {**metrics, **extra} if extra else metrics


def _nonfinite_message(state: TrainState, loss: Tensor) -> str:
    return (
        f"non-finite values at update {int(state.step)} (epoch index {int(state.data.epoch)}, "
        f"{int(state.data.batch)} batches into it): loss = {float(loss)}; the compiled step keeps its gradients "
        "inside the graph, so run this batch without with_compile to see which are non-finite. "
        "Lower the learning rate, clip gradients, check the data; or pass nonfinite='skip' or 'stop' to make_train_step."
    )


def _check_inductor_options(options: Mapping[str, Any], where: str) -> None:
    """Refuse unknown inductor options and values of the wrong type now, as ``torch.compile`` would at the first call."""
    from torch._inductor import config

    known = config.get_config_copy()
    for key, value in options.items():
        if key in ("guard_filter_fn", "use_aoti"):  # torch.compile's own options, not inductor's
            continue
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in known:
            near = difflib.get_close_matches(str(name), list(known), n=3)
            hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
            raise ValueError(f"{where}: unknown inductor option {key!r}{hint}; torch._inductor.list_options() lists them")
        kind = config.get_type(name)
        if isinstance(kind, type) and typing.get_origin(kind) is None and not isinstance(value, kind):
            raise TypeError(f"{where}: inductor option {key!r} must be a {kind.__name__}, got {value!r}")


def _inductor_options(mode: str | None, options: Mapping[str, Any] | None, eager_random: bool, step: Any) -> dict[str, Any]:
    modes = torch._inductor.list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(f"with_compile: mode must be None or one of {sorted(modes)}, got {mode!r}")
    model = getattr(getattr(step, "core", None), "_model", None)
    on_cpu = model is None or all(p.device.type == "cpu" for p in model.parameters())
    # On CPU the C++ wrapper replaces inductor's Python wrapper (hundreds of Python lines per call):
    # measured 0.84x instead of 0.92x the hand-written loop on the MLP (docs/compile.md).
    defaults = {"fallback_random": eager_random, **({"cpp_wrapper": True} if on_cpu else {})}
    resolved = {**defaults, **(modes[mode] if mode else {}), **(options or {})}
    from ._compile_passes import SinkViews  # imports torch._inductor: only now, for an inductor step

    theirs = resolved.get("post_grad_custom_post_pass")
    theirs = () if theirs is None else tuple(theirs) if isinstance(theirs, (list, tuple)) else (theirs,)
    resolved["post_grad_custom_post_pass"] = (SinkViews(), *theirs)  # fnlight's pass first, then the user's
    return resolved


def with_compile(
    step: Any,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
    fullgraph: bool = True,
    dynamic: bool | None = False,
    fallback: str = "warn",
    eager_random: bool = True,
) -> Compiled:
    """Compile the whole train step (forward, backward, optimizer update) with ``torch.compile``.

    Called directly or by :func:`fnlight.fold`, the step runs as **one graph**: forward,
    ``autograd.grad``, the finiteness flag and the optimizer update (clipping included).
    Everything that changes between steps is a tensor argument of that graph — parameters,
    moments, the update count, the learning rate a schedule computes, the batch — so it
    compiles once and never recompiles as the step counter or the learning rate move. The
    optimizers switch to tensor arithmetic while traced (``torch.compiler.is_compiling()``).
    Inside the fold the graph updates the state in place (donation); a direct call is pure.

    Transforms that act between the phases (``with_amp``, ``with_ddp``, ``with_grad_accum``)
    wrap it and call the gradient and update phases separately: each phase is then its own
    graph (two to three graphs in all, compiled once), and their eager work — loss-scale
    bookkeeping, all-reduce, accumulation counters — runs between the graphs.

    Before each call dynamo checks its guards. Those on library internals are left out:
    whether fnlight's, torch's or Python's own functions, classes and modules are still the
    same objects (about 2-4% of a small MLP's compiled step on this project's CPU). Guards on
    tensors, on the structure of the state and the batch, on the step's own objects and on
    every global of your modules stay: changing a global your loss reads still recompiles.

    Dropout is seeded as in the eager step, from ``(key, step, micro-batch, rank)``, outside
    the graph. ``eager_random=True`` (the default, inductor's ``fallback_random``) draws
    with torch's eager random ops, so a compiled step draws the same masks as the eager one.

    Args:
        step: a train step, or one wrapped by ``with_activation_checkpointing`` only
            (with_compile goes second in the canonical order).
        backend: a ``torch.compile`` backend: ``"inductor"`` (the speed), ``"aot_eager"`` or
            ``"eager"`` (fast to compile: tests and debugging), or a callable backend.
        mode: inductor's mode (``"max-autotune"``...); inductor only.
        options: inductor options, merged over the mode's and over fnlight's defaults:
            ``fallback_random=eager_random`` and, for a model on the CPU,
            ``cpp_wrapper=True`` (inductor's C++ wrapper instead of its Python one: less
            per-call overhead, a few more seconds of compiling); inductor only. A
            ``guard_filter_fn`` here is applied as well as fnlight's: a guard stays when both keep it.
            A ``post_grad_custom_post_pass`` runs after fnlight's own post-grad pass, which
            applies an activation before the reshape a 3-d ``nn.Linear`` adds (one buffer
            less per such layer; docs/compile.md, "Memory").
        fullgraph: require the whole step to be one graph. A model that cannot be traced
            whole (``.item()``, Python branches on tensor values) then falls back as
            ``fallback`` says, with the reason. ``False`` accepts graph breaks (parts of the
            step run eagerly between graphs; warned about once under ``fallback="warn"``).
        dynamic: ``False`` compiles for the batch shapes seen (a short last batch compiles
            one more graph); ``None`` lets torch make shapes dynamic after a change.
        fallback: when the step cannot be compiled: ``"warn"`` (a
            :class:`CompileFallbackWarning` naming the model and the reason, then eager from
            then on), ``"raise"`` (:class:`CompileError`), or ``"eager"`` (silently eager). A
            step that also fails eagerly raises its eager error (under ``"raise"`` too: a pure
            eager run, which keeps nothing, tells the two apart).
        eager_random: random ops use torch's eager generator (inductor's
            ``fallback_random``); ``False`` lets inductor generate them inside its fused
            kernels (faster with dropout, still seeded per step, but other masks).

    Returns:
        The wrapped step. ``step.graphs`` counts the graphs compiled so far per entry point
        (``"step"``, ``"grads"``, ``"update"``); ``step.eager_reason`` is why it runs
        eagerly, or ``None``.

    Raises:
        TypeError: ``step`` is not a train step, or an option has the wrong type.
        ValueError: an unknown backend, mode or fallback; ``mode``/``options`` with a
            backend other than inductor; or a wrong composition order.

    >>> import torch, fnlight as fl
    >>> from fnlight.transforms import with_compile
    >>> core = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.adamw(1e-2))
    >>> step = with_compile(core, backend="eager")  # "inductor" (the default) for speed
    >>> state = fl.fold(step, step.init(), [(torch.ones(4, 3), torch.zeros(4, 1))] * 3, progress=False)
    >>> int(state.step), step.graphs["step"]
    (3, 1)
    """
    where = "with_compile"
    if isinstance(backend, str):
        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(
                f"{where}: backend must be a torch.compile backend ({', '.join(sorted(known))}) or a callable, got {backend!r}"
            )
    elif not callable(backend):
        raise TypeError(f"{where}: backend must be a string or a callable backend, got {backend!r}")
    if mode is not None and not isinstance(mode, str):
        raise TypeError(f"{where}: mode must be a string or None, got {mode!r}")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"{where}: options must be a mapping of inductor options or None, got {options!r}")
    if options and "guard_filter_fn" in options and not callable(got := options["guard_filter_fn"]):
        raise TypeError(f"{where}: options' guard_filter_fn must be callable (guard entries -> list of bool), got {got!r}")
    if (mode is not None or options) and backend != "inductor":
        raise ValueError(
            f"{where}: mode and options are inductor settings; got mode={mode!r}, options={options!r} with backend={backend!r}"
        )
    if options:
        _check_inductor_options(options, where)
    for flag, value in (("fullgraph", fullgraph), ("eager_random", eager_random)):
        if not isinstance(value, bool):
            raise TypeError(f"{where}: {flag} must be a bool, got {value!r}")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise TypeError(f"{where}: dynamic must be a bool or None, got {dynamic!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"{where}: fallback must be one of {FALLBACKS}, got {fallback!r}")
    resolved = _inductor_options(mode, options, eager_random, step) if backend == "inductor" else None
    return Compiled(step, backend=backend, options=resolved, fullgraph=fullgraph, dynamic=dynamic, fallback=fallback)
