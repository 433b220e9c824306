"""with_compile: one graph, no recompilation, equal to the eager step, composition, fallback, every raise.

Most tests compile with the "eager" or "aot_eager" backends (dynamo's tracing and graph
counting, AOTAutograd's functionalisation of the in-place update), which take well under a
second; one test runs inductor on a small model.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import optree
import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight._traced_step import make_apply_fn, make_step_fn, set_leaves
from fnlight.optim import adagrad, adam, adamw, chain, clip_by_global_norm, rmsprop, sgd, warmup_cosine
from fnlight.optim._adam import AdamState
from fnlight.testing import peak_tensor_bytes
from fnlight.transforms import CompileError, CompileFallbackWarning, _compile, with_compile
from fnlight.transforms._base import CANONICAL_ORDER
from tests.conftest import make_batches, make_bn_mlp

TOL = {"rtol": 1e-5, "atol": 1e-6}


def mlp(seed: int = 0, dropout: float = 0.0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    mid: list[nn.Module] = [nn.BatchNorm1d(16)] if bn else []
    # no bias before BatchNorm: its true gradient is zero, and Adam would amplify rounding noise there
    return nn.Sequential(nn.Linear(10, 16, bias=not bn), *mid, nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def schedule_opt():
    return chain(clip_by_global_norm(1.0), adamw(warmup_cosine(1e-2, 3, 20), weight_decay=0.1))


OPTIMIZERS = {
    "clip+adamw(warmup_cosine)": schedule_opt,
    "adam amsgrad": lambda: adam(1e-2, weight_decay=0.01, amsgrad=True),
    "sgd nesterov": lambda: sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adagrad": lambda: adagrad(0.05, lr_decay=0.01),
    "rmsprop centered": lambda: rmsprop(0.01, centered=True, momentum=0.5),
}


def build(opt=schedule_opt, *, model=None, nonfinite="raise", **options):
    core = fl.make_train_step(model if model is not None else mlp(), fl.losses.classification, opt(), nonfinite=nonfinite)
    return core, with_compile(core, **{"backend": "aot_eager", **options})


def close(a, b, **tol) -> None:
    la, lb = optree.tree_leaves(a, namespace="fnlight"), optree.tree_leaves(b, namespace="fnlight")
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, **(tol or TOL))
        else:
            assert x == y


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ------------------------------------------------------------------ one graph, no recompilation, equal to eager


def test_one_graph_and_no_recompilation_as_step_and_lr_change():
    data = make_batches(4, batch=8)
    _, step = build()
    before = graphs()
    state = fl.fold(step, step.init(seed=0), data, epochs=3, progress=False)
    lrs = []
    state = fl.fold(
        step, state, data, epochs=5, observers=[fl.every(1)(lambda s, m: lrs.append(float(s.opt_state[-1].hparams["lr"])))]
    )
    assert int(state.step) == 20 and len(set(lrs)) == 8  # the schedule moved at every update
    assert step.graphs == {"step": 1, "grads": 0, "update": 0} and graphs() - before == 1
    assert step.eager_reason is None


SCHEDULES = {
    "constant": lambda: fl.optim.constant(1e-2),
    "linear": lambda: fl.optim.linear(1e-2, 1e-3, 5),
    "cosine": lambda: fl.optim.cosine(1e-2, 6),
    "exponential": lambda: fl.optim.exponential(1e-2, 0.7, end_value=1e-3),
    "piecewise_constant": lambda: fl.optim.piecewise_constant([1e-2, 5e-3, 1e-3], [2, 4]),
    "step_decay": lambda: fl.optim.step_decay(1e-2, 2),
    "join": lambda: fl.optim.join([fl.optim.constant(1e-2), fl.optim.linear(1e-2, 0.0, 4)], [3]),
    "warmup": lambda: fl.optim.warmup(fl.optim.cosine(1e-2, 4), 2),
    "warmup_cosine": lambda: warmup_cosine(1e-2, 2, 4),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_stays_in_one_graph_and_moves_the_lr(name):
    data = make_batches(6, batch=8)
    core, step = build(lambda: adamw(SCHEDULES[name]()), backend="eager", fallback="raise")
    lrs: list[float] = []
    observe = fl.every(1)(lambda s, m: lrs.append(float(s.opt_state.hparams["lr"])))
    got = fl.fold(step, step.init(seed=0), data, observers=[observe], progress=False)
    assert step.graphs == {"step": 1, "grads": 0, "update": 0} and step.eager_reason is None
    assert len(set(lrs)) > 1 or name == "constant"
    close(got, fl.fold(core, core.init(seed=0), data, progress=False))


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_fold_equals_the_eager_step(opt):
    data = make_batches(5, batch=8)
    backend = "aot_eager" if opt == "clip+adamw(warmup_cosine)" else "eager"  # AOTAutograd's in-place handling once
    core, step = build(OPTIMIZERS[opt], model=mlp(dropout=0.3, bn=True), backend=backend)
    expected = fl.fold(core, core.init(seed=3), data, epochs=2, progress=False)
    got = fl.fold(step, step.init(seed=3), data, epochs=2, progress=False)
    close(got, expected)
    assert step.graphs["step"] == 1


def test_pure_calls_equal_the_eager_step_and_leave_the_input_untouched():
    data = make_batches(3, batch=8)
    core, step = build(model=mlp(dropout=0.3, bn=True))
    state, expected = step.init(seed=1), core.init(seed=1)
    for batch in data:
        before = fl.tree_clone(state)
        new, metrics = step(state, batch)
        assert fl.tree_equal(state, before)  # pure: nothing written in place
        expected, expected_metrics = core(expected, batch)
        close(new, expected)
        assert sorted(metrics) == sorted(expected_metrics) == ["accuracy", "grad_norm", "loss"]
        state = new
    again, _ = step(step.init(seed=1), data[0])
    close(again, step(step.init(seed=1), data[0])[0], rtol=0, atol=0)  # deterministic
    assert step.graphs["step"] == 1  # pure calls: their own graph (the fold's updates in place)


def test_donation_equals_pure_calls_and_keeps_the_structure():
    data = make_batches(4, batch=8)
    _, step = build(model=mlp(bn=True))
    pure = step.init(seed=2)
    for batch in data:
        pure, _ = step(pure, batch)
    initial = step.init(seed=2)
    folded = fl.fold(step, initial, data, progress=False)
    close(folded.params, pure.params, rtol=0, atol=0)
    close(folded.opt_state, pure.opt_state, rtol=0, atol=0)
    paths = optree.tree_flatten_with_path(initial, namespace="fnlight")
    assert [(p, t.dtype, t.shape) for p, t in zip(paths[0], paths[1])] == [
        (p, t.dtype, t.shape) for p, t in zip(*optree.tree_flatten_with_path(folded, namespace="fnlight")[:2])
    ]


def test_in_place_graph_returns_only_what_it_could_not_write_in_place():
    data = make_batches(3, batch=8)
    core, step = build(model=mlp(bn=True))
    state = fl.fold(step, step.init(seed=0), data[:1], progress=False)
    body = make_step_fn(core, inplace=True, device_type="cpu")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        ok, _, _, params, buffers, (paths, leaves), count = torch.compile(body, backend="aot_eager", fullgraph=True)(
            state.skeleton, state.params, state.buffers, state.opt_state, state.step, data[1], None
        )
    # the float32 parameters, moments and running statistics were written into the state's tensors;
    # the 0-d int64 counters (update count, BatchNorm's batch count) and the schedule's learning rate are new
    assert params == {} and list(buffers) == ["1.num_batches_tracked"]
    fields = AdamState._fields  # state.opt_state: (ClipState, AdamState)
    assert set(paths) == {(1, fields.index("count")), (1, fields.index("hparams"), "lr")} and all(t.ndim == 0 for t in leaves)
    assert int(count) == 2 and bool(ok)


def test_in_place_update_phase_writes_into_the_state_and_returns_the_rest():
    core, _ = build(lambda: adamw(warmup_cosine(1e-2, 3, 20)))  # lr from a schedule: a new 0-d tensor per update
    state = core.init(seed=0)
    grads = {n: torch.full_like(p, 0.5) for n, p in state.params.items()}
    expected_params, expected_opt = core.optimizer.apply(state.params, grads, state.opt_state, inplace=False)
    apply = torch.compile(make_apply_fn(core, inplace=True), backend="aot_eager", fullgraph=True)
    before = dict(state.params)
    fresh, (paths, leaves) = apply(state.params, grads, state.opt_state)
    assert fresh == {} and set(paths) == {(AdamState._fields.index("count"),), (AdamState._fields.index("hparams"), "lr")}
    close(state.params, expected_params)  # written into the given tensors
    assert all(state.params[n] is before[n] for n in before)
    close(set_leaves(state.opt_state, paths, leaves), expected_opt)


def test_set_leaves_replaces_only_the_given_paths_and_shares_the_rest():
    moments = {"w": torch.zeros(2)}
    tree = (AdamState(torch.tensor(1), moments, {"x": [1, 2]}, {}, {"lr": 0.1}), [3, 4])
    out = set_leaves(tree, ((0, 0), (0, 2, "x", 1), (1, 0)), (torch.tensor(2), 5, 6))
    assert type(out[0]) is AdamState and int(out[0].count) == 2 and out[0].nu == {"x": [1, 5]} and out[1] == [6, 4]
    assert out[0].mu is moments and out[0].hparams is tree[0].hparams  # untouched branches are the same objects
    assert tree[0].nu == {"x": [1, 2]} and tree[1] == [3, 4]  # the given tree is left as it was
    assert set_leaves(tree, (), ()) is tree and set_leaves(tree, ((),), ("whole",)) == "whole"


def test_in_place_fold_with_an_optimizer_state_in_other_containers_equals_eager():
    def ordered(inner):  # an optimizer whose state is an OrderedDict: the graph returns the whole new state
        def apply(params, grads, state, *, inplace):
            params, inner_state = inner.apply(params, grads, state["inner"], inplace=inplace)
            return params, OrderedDict(inner=inner_state)

        return fl.optim.Optimizer(lambda params: OrderedDict(inner=inner.init(params)), apply)

    data = make_batches(4, batch=8)
    core, step = build(lambda: ordered(adamw(1e-2)), backend="eager")
    got = fl.fold(step, step.init(seed=0), data, epochs=2, progress=False)
    close(got, fl.fold(core, core.init(seed=0), data, epochs=2, progress=False))
    assert type(got.opt_state) is OrderedDict and int(got.opt_state["inner"].count) == 8


def test_in_place_fold_with_a_float64_scalar_parameter_equals_eager():
    class Tempered(nn.Module):  # a 0-d float64 parameter is not updated in place in the graph (see writable)
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()
            self.temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

        def forward(self, x):
            return self.body(x) * self.temperature

    data = make_batches(4, batch=8)
    core, step = build(lambda: adamw(1e-2), model=Tempered())
    got = fl.fold(step, step.init(seed=0), data, epochs=2, progress=False)
    close(got, fl.fold(core, core.init(seed=0), data, epochs=2, progress=False))
    assert got.params["temperature"].dtype == torch.float64 and float(got.params["temperature"]) != 1.5


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own import
def test_inductor_matches_eager_with_dropout_and_a_schedule():
    data = make_batches(3, batch=8)
    core, step = build(model=mlp(dropout=0.3), backend="inductor")
    expected = fl.fold(core, core.init(seed=0), data, epochs=2, progress=False)
    got = fl.fold(step, step.init(seed=0), data, epochs=2, progress=False)
    close(got, expected)  # eager_random=True: the same dropout masks as the eager step
    assert step.graphs == {"step": 1, "grads": 0, "update": 0}


def test_a_short_last_batch_compiles_one_more_graph_once():
    data = [*make_batches(3, batch=8), *make_batches(1, batch=5, seed=7)]
    core, step = build()
    state = fl.fold(step, step.init(), data, epochs=3, progress=False)
    assert step.graphs["step"] == 2  # batch 8 and batch 5 (dynamic=False), then none
    close(state, fl.fold(core, core.init(), data, epochs=3, progress=False))


def test_unused_parameters_are_left_as_they_are():
    class Partly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.used, self.unused = nn.Linear(10, 3), nn.Linear(10, 3)

        def forward(self, x):
            return self.used(x)

    data = make_batches(3, batch=8)
    core, step = build(model=Partly())
    got = fl.fold(step, step.init(), data, progress=False)
    close(got, fl.fold(core, core.init(), data, progress=False))
    torch.testing.assert_close(got.params["unused.weight"], step.init().params["unused.weight"], rtol=0, atol=0)


def test_many_compiled_steps_in_one_process_each_keep_their_own_graph():
    data = make_batches(2, batch=8)
    for i in range(9):  # more than dynamo's recompile limit (8): every step has its own cache
        _, step = build(lambda i=i: sgd(0.1 * (i + 1)), model=nn.Linear(10, 3), backend="eager")
        fl.fold(step, step.init(), data, progress=False)
        assert step.graphs["step"] == 1 and step.eager_reason is None


# ------------------------------------------------------------------ guards

Entry = namedtuple("Entry", "name is_global guard_type")  # what torch.compile hands a guard_filter_fn (the fields used)
_LOSS_SCALE = 1.0  # a global of the user's module (this one), read by scaled_mse


def scaled_mse(model, batch):
    x, y = batch
    return _LOSS_SCALE * ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize(
    ("name", "is_global", "kind", "kept"),
    [
        ("G['torch'].sqrt", True, "BUILTIN_MATCH", False),  # a global of fnlight's step module
        ("G['torch'].float32", True, "CONSTANT_MATCH", False),
        ("G['__builtins_dict___0']['len']", True, "BUILTIN_MATCH", False),
        ("G['__import_fnlight_dot__bind']._SLOTS", True, "CONSTANT_MATCH", False),
        ("G['__import_torch_dot_nn_dot_modules_dot_linear'].F.linear", True, "BUILTIN_MATCH", False),
        ("G['__import_torch_dot_nn_dot_functional'].torch.backends.cudnn.enabled", True, "CONSTANT_MATCH", True),
        ("G['__import_tests_dot_test_compile']._LOSS_SCALE", True, "CONSTANT_MATCH", True),
        ("G['__import_tests_dot_test_compile'].F", True, "MODULE_MATCH", True),
        ("G['__import_torchvision_dot_ops'].nms", True, "BUILTIN_MATCH", True),  # not torch itself
        ("G['helper']", True, "CLOSURE_MATCH", True),  # not a name of fnlight's step module
        ("G['___unnamed_scope_1_c0']", True, "TYPE_MATCH", True),
        ("L['params']['0.weight']", False, "TENSOR_MATCH", True),
        ("L['grads_fn'].__closure__[0].cell_contents.loss_fn.__code__", False, "ID_MATCH", True),
    ],
)
def test_the_guard_filter_drops_only_guards_on_library_internals(name, is_global, kind, kept):
    keep = _compile._library_guard_filter({"torch": torch, "bind": None})
    assert keep([Entry(name, is_global, kind)]) == [kept]


def test_a_global_of_the_users_module_is_still_guarded():
    global _LOSS_SCALE
    torch.manual_seed(0)
    core = fl.make_train_step(nn.Linear(10, 3), scaled_mse, sgd(0.1))
    step = with_compile(core, backend="eager")
    state, batch = step.init(), (torch.ones(4, 10), torch.zeros(4, 3))
    _, before = step(state, batch)
    _LOSS_SCALE = 2.0
    try:
        _, after = step(state, batch)
    finally:
        _LOSS_SCALE = 1.0
    torch.testing.assert_close(after["loss"], 2 * before["loss"])
    assert step.graphs["step"] == 2  # the changed global was seen: a second graph


def test_every_compiled_phase_gets_the_guard_filter(monkeypatch):
    made = []

    def recording(own):
        made.append(own["__name__"])
        return lambda entries: [True] * len(entries)

    monkeypatch.setattr(_compile, "_library_guard_filter", recording)
    _, compiled = build(lambda: sgd(0.1), backend="eager")
    step = fl.with_grad_accum(compiled, every=2)
    fl.fold(step, step.init(), make_batches(4, batch=8), progress=False)
    assert made == ["fnlight._traced_step"] * 2  # the gradient and the update phases


def test_guard_filters_combine_keeping_what_both_keep():
    ours, theirs = (lambda e: [True, True, False]), (lambda e: [True, False, True])
    assert _compile._combined(ours, theirs)([1, 2, 3]) == [True, False, False]
    assert _compile._combined(ours, None) is ours


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own import
def test_a_guard_filter_in_options_is_applied_and_the_options_are_left_as_given():
    seen = []

    def keep_all(entries):
        seen.append(len(entries))
        return [True] * len(entries)

    options = {"guard_filter_fn": keep_all}
    torch.manual_seed(0)
    step = with_compile(fl.make_train_step(nn.Linear(10, 3), fl.losses.mse, sgd(0.1)), options=options)
    fl.fold(step, step.init(), [(torch.ones(4, 10), torch.zeros(4, 3))] * 2, progress=False)
    assert seen and options == {"guard_filter_fn": keep_all} and step.graphs["step"] == 1


# ------------------------------------------------------------------ non-finite losses


@pytest.mark.parametrize("donate", [False, True])
def test_nonfinite_skip_and_stop_leave_the_update_out(donate):
    data = make_batches(3, batch=8)
    bad = (torch.full((8, 10), float("nan")), data[0][1])
    for policy in ("skip", "stop"):
        _, step = build(nonfinite=policy, backend="eager", model=make_bn_mlp())
        state = fl.fold(step, step.init(), data[:2], progress=False)
        if donate:
            after = fl.fold(step, state, [bad], epochs=2, progress=False)
        else:
            after, metrics = step(state, bad)
            assert float(metrics["skipped"]) == 1.0
        close(after.params, state.params, rtol=0, atol=0)
        close(after.opt_state, state.opt_state, rtol=0, atol=0)
        assert int(after.step) == 2 and bool(after.stop) == (policy == "stop")
        moved = int(after.buffers["1.num_batches_tracked"]) - int(state.buffers["1.num_batches_tracked"])
        assert moved == 1  # the skipped batch's forward moved BatchNorm's statistics, as eager's and torch's


def test_nonfinite_raise_in_the_fold_leaves_the_given_state_untouched():
    _, step = build(backend="eager")
    state = step.init()
    before = fl.tree_clone(state)
    bad = (torch.full((8, 10), float("nan")), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(fl.NonFiniteError, match="non-finite values at update 1 "):
        fl.fold(step, state, [make_batches(1, batch=8)[0], bad], progress=False)
    assert fl.tree_equal(state, before)


def test_nonfinite_raise_names_the_update():
    _, step = build(backend="eager")
    state = step.init()
    bad = (torch.full((8, 10), float("inf")), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(fl.NonFiniteError, match=r"non-finite values at update 0 .*run this batch without with_compile"):
        step(state, bad)


# ------------------------------------------------------------------ composition


def test_canonical_order_puts_compile_right_after_activation_checkpointing():
    assert CANONICAL_ORDER[:3] == ("with_activation_checkpointing", "with_compile", "with_amp")
    core = fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1))
    with pytest.raises(ValueError, match="with_compile cannot wrap a step already wrapped by with_amp"):
        with_compile(fl.with_amp(core), backend="eager")


@pytest.mark.parametrize(
    ("name", "wrap", "expected_graphs"),
    [
        ("accum every=2", lambda s: fl.with_grad_accum(s, every=2), {"step": 0, "grads": 2, "update": 1}),
        ("accum micro_batches=2", lambda s: fl.with_grad_accum(s, micro_batches=2), {"step": 0, "grads": 2, "update": 1}),
        ("amp bf16", lambda s: fl.with_amp(s, dtype="bf16"), {"step": 0, "grads": 1, "update": 1}),
        (
            "amp fp16",
            lambda s: fl.with_amp(s, dtype="fp16", init_scale=256.0, growth_interval=2),
            {"step": 0, "grads": 1, "update": 1},
        ),
        ("ddp, one process", fl.with_ddp, {"step": 0, "grads": 1, "update": 1}),
        ("ddp + accum", lambda s: fl.with_grad_accum(fl.with_ddp(s), every=3), {"step": 0, "grads": 2, "update": 1}),
        ("activation checkpointing inside", None, {"step": 1, "grads": 0, "update": 0}),
    ],
)
def test_composes_and_equals_the_eager_composition(name, wrap, expected_graphs):
    data = make_batches(5, batch=8)

    def make(compiled: bool):
        step = fl.make_train_step(mlp(dropout=0.2), fl.losses.classification, schedule_opt())
        if wrap is None:
            step = fl.with_activation_checkpointing(step, modules=["0"])
        if compiled:
            step = with_compile(step, backend="aot_eager")
        return step if wrap is None else wrap(step)

    eager, compiled = make(False), make(True)
    expected = fl.fold(eager, eager.init(seed=4), data, epochs=2, progress=False)
    got = fl.fold(compiled, compiled.init(seed=4), data, epochs=2, progress=False)
    tol = {"rtol": 2e-2, "atol": 2e-3} if name.startswith("amp") else TOL  # aot_eager rounds each low-precision op
    close(got, expected, **tol)
    inner = compiled if wrap is None else compiled.inner if name != "ddp + accum" else compiled.inner.inner
    assert inner.graphs == expected_graphs
    got = fl.fold(compiled, got, data, epochs=3, progress=False)  # and none more in the next epoch
    assert inner.graphs == expected_graphs


@pytest.mark.parametrize(
    "wrap", [lambda s: fl.with_grad_accum(s, every=2), lambda s: fl.with_amp(s, dtype="bf16")], ids=["accum", "amp bf16"]
)
def test_grad_norm_metrics_of_the_update_phase_are_not_overwritten_by_later_updates(wrap):
    """Inside the fold the update graph writes each norm into the state's tensor: the metrics keep copies, as eagerly."""
    data = make_batches(6, batch=8)

    def norms(compiled: bool) -> list[torch.Tensor]:
        core = fl.make_train_step(mlp(), fl.losses.classification, schedule_opt())
        step = wrap(with_compile(core, backend="aot_eager") if compiled else core)
        kept: list[torch.Tensor] = []
        fl.fold(step, step.init(), data, observers=[fl.every(1)(lambda s, m: kept.append(m["grad_norm"]))], progress=False)
        return kept

    expected, got = norms(False), norms(True)
    assert len(got) == len(expected) >= 3 and len({float(n) for n in got}) == len(got)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), **TOL)


def test_activation_checkpointing_over_batchnorm_compiles_with_aot_eager():
    """Its in-place num_batches_tracked breaks backend="eager"'s backward (documented in compile.md), not aot_eager."""

    def make(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 3))
        step = fl.with_activation_checkpointing(fl.make_train_step(model, fl.losses.classification, sgd(0.05)), modules=["0"])
        return with_compile(step, backend="aot_eager", fallback="raise") if compiled else step

    data = make_batches(4, batch=8)
    eager, compiled = make(False), make(True)
    expected = fl.fold(eager, eager.init(seed=0), data, progress=False)
    got = fl.fold(compiled, compiled.init(seed=0), data, progress=False)
    close(got, expected, **TOL)
    assert int(got.buffers["0.1.num_batches_tracked"]) == 4 and compiled.graphs["step"] == 1


@pytest.mark.parametrize("opt", ["adamw", "adam amsgrad", "sgd nesterov", "adagrad"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_true_half_precision_optimizer_math_computes_in_float32(opt, dtype):
    """The traced update upcasts half tensors as torch's fused kernels do: in fp16 Adam's eps is 0 and g*g underflows.

    Eagerly, SGD and Adagrad on half CPU tensors take the same float32 math instead of torch's
    fused kernels (broken for them in torch 2.13), so eager and compiled agree exactly.
    """
    make_opt = {"adamw": lambda: adamw(1e-2, weight_decay=0.1), **OPTIMIZERS}[opt]
    data = make_batches(3, batch=8)

    def run(compiled: bool):
        core = fl.make_train_step(mlp(), fl.losses.classification, make_opt())
        inner = with_compile(core, backend="aot_eager") if compiled else core
        step = fl.with_amp(inner, dtype=dtype, mode="true", **({"init_scale": 16.0} if dtype == "fp16" else {}))
        return fl.fold(step, step.init(), data, progress=False)

    eager, got = run(False), run(True)
    assert int(got.step) == int(eager.step) == 3
    for name, p in got.params.items():
        assert p.dtype == eager.params[name].dtype and bool(p.isfinite().all()), name
        torch.testing.assert_close(p, eager.params[name], rtol=0, atol=0)  # eager computes in float32 too


def test_pure_accumulation_equals_the_eager_composition():
    data = make_batches(4, batch=8)
    eager = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.classification, schedule_opt()), every=2)
    compiled = fl.with_grad_accum(
        with_compile(fl.make_train_step(mlp(), fl.losses.classification, schedule_opt()), backend="eager"), every=2
    )
    a, b = eager.init(), compiled.init()
    for batch in data:
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
    close(b, a)


def test_uneven_micro_batches_compile_once_per_shape_not_per_weight():
    g = torch.Generator().manual_seed(0)
    sizes = [6, 6, 4, 6, 8, 6, 6, 6, 6, 6, 8, 4, 8, 4, 6, 4, 4, 8, 6, 8, 8, 8, 4, 6]  # three shapes, many weights
    data = [(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    eager = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.classification, schedule_opt()), every=3)
    inner = with_compile(fl.make_train_step(mlp(), fl.losses.classification, schedule_opt()), backend="eager", fallback="raise")
    compiled = fl.with_grad_accum(inner, every=3)
    got = fl.fold(compiled, compiled.init(), data, epochs=2, progress=False)
    assert inner.eager_reason is None and inner.graphs["grads"] == 6  # 3 shapes x (first micro-batch, accumulating)
    expected = fl.fold(eager, eager.init(), data, epochs=2, progress=False)
    assert int(got.step) == int(expected.step) == 16
    close(got.params, expected.params)  # (the window's running loss, a float, differs in the last digits)


def test_a_micro_batch_weight_of_exactly_one_compiles_no_graph_of_its_own():
    g = torch.Generator().manual_seed(0)
    sizes = [4, 8, 4, 4, 8, 8, 8, 4, 4, 6]  # every=2: an 8 after a 4 weighs 8 / (2 * 4) = 1.0
    data = [(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    eager = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.classification, schedule_opt()), every=2)
    inner = with_compile(fl.make_train_step(mlp(), fl.losses.classification, schedule_opt()), backend="eager", fallback="raise")
    compiled = fl.with_grad_accum(inner, every=2)
    got = fl.fold(compiled, compiled.init(), data, progress=False)
    assert inner.graphs["grads"] == 5  # 4 and 8 first and accumulating, 6 accumulating
    close(got.params, fl.fold(eager, eager.init(), data, progress=False).params)


def test_sharded_parameters_are_refused_in_the_gradient_phase():
    _, step = build(backend="eager")
    gather = fl.GradContext(gather=lambda params: params)
    with pytest.raises(TypeError, match=r"gather sharded parameters \(with_fsdp\)"):
        step.grads(step.init(), make_batches(1)[0], gather)


# ------------------------------------------------------------------ fallback


class Branchy(nn.Module):
    """Python control flow on a tensor value: not one graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        out = self.fc(x)
        return out * 2 if out.sum().item() > 0 else out


def test_fallback_warn_names_the_model_and_the_reason_then_runs_eagerly():
    data = make_batches(3, batch=8)
    core, step = build(model=Branchy(), backend="eager")
    with pytest.warns(
        CompileFallbackWarning, match=r"could not compile the step of Branchy \(loss_fn 'classification'\).*Reason: "
    ):
        got = fl.fold(step, step.init(), data, progress=False)
    assert "item" in step.eager_reason or "data-dependent" in step.eager_reason
    close(got, fl.fold(core, core.init(), data, progress=False), rtol=0, atol=0)
    fl.fold(step, got, data, epochs=2, progress=False)  # eager from now on: no second warning (warnings are errors here)


def test_fallback_raise():
    _, step = build(model=Branchy(), backend="eager", fallback="raise")
    with pytest.raises(CompileError, match=r"could not compile the step of Branchy .*fullgraph=True: .*fallback='warn'"):
        step(step.init(), make_batches(1)[0])


def test_fallback_eager_is_silent():
    core, step = build(model=Branchy(), backend="eager", fallback="eager")
    state, _ = step(step.init(), make_batches(1)[0])
    close(state, core(core.init(), make_batches(1)[0])[0], rtol=0, atol=0)
    assert step.eager_reason is not None


def test_a_backend_failure_falls_back_with_its_message():
    def broken(gm, example_inputs):
        raise RuntimeError("backend exploded")

    _, step = build(backend=broken)
    with pytest.warns(CompileFallbackWarning, match="backend exploded"):
        step(step.init(), make_batches(1)[0])


def test_an_error_of_the_model_itself_is_raised_as_eager_raises_it():
    core = fl.make_train_step(nn.Linear(7, 3), fl.losses.classification, sgd(0.1))  # the batches have 10 features
    step = with_compile(core, backend="eager")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        step(step.init(), make_batches(1)[0])
    assert any("could not compile the step of Linear" in note for note in info.value.__notes__)


def test_fallback_raise_raises_an_error_of_the_step_itself_as_eager_raises_it():
    """A batch of the wrong shape or a state of another optimizer is no compile failure, under fallback="raise" too."""
    core = fl.make_train_step(nn.Linear(7, 3), fl.losses.classification, sgd(0.1))  # the batches have 10 features
    step = with_compile(core, backend="eager", fallback="raise")
    state = step.init()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        step(state, make_batches(1)[0])
    assert not isinstance(info.value, CompileError)
    assert any("could not compile the step of Linear" in note for note in info.value.__notes__)
    other = fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1)).init()
    _, step = build(lambda: adamw(1e-2), backend="eager", fallback="raise")
    with pytest.raises(TypeError, match="the optimizer state must be the AdamState"):
        step(other, make_batches(1)[0])
    step = fl.with_grad_accum(with_compile(core, backend="eager", fallback="raise"), every=2)  # the gradient phase
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        fl.fold(step, step.init(), make_batches(2), progress=False)
    assert not isinstance(info.value, CompileError)


def test_graph_breaks_are_reported_once_with_fullgraph_false():
    core, step = build(model=Branchy(), backend="eager", fullgraph=False)
    data = make_batches(3, batch=8)
    with pytest.warns(CompileFallbackWarning, match="compiled with graph breaks"):
        got = fl.fold(step, step.init(), data, progress=False)
    close(got, fl.fold(core, core.init(), data, progress=False))


# ------------------------------------------------------------------ options


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.fc(x)


def test_graph_breaks_reported_are_the_steps_own_not_earlier_ones_of_the_process():
    """dynamo's counter of graph breaks is the process's: another step's breaks are not this one's reasons."""
    _, earlier = build(model=Branchy(), backend="eager", fullgraph=False, fallback="eager")
    earlier(earlier.init(), make_batches(1)[0])
    _, step = build(model=Broken(), backend="eager", fullgraph=False)
    with pytest.warns(CompileFallbackWarning, match=r"step of Broken .*graph_break") as record:
        step(step.init(), make_batches(1)[0])
    assert not any("item()" in str(w.message) for w in record)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"backend": "no-such-backend"}, ValueError, "backend must be a torch.compile backend"),
        ({"backend": 3}, TypeError, "backend must be a string or a callable backend, got 3"),
        ({"mode": "fastest"}, ValueError, r"mode must be None or one of \["),
        ({"mode": 1}, TypeError, "mode must be a string or None, got 1"),
        ({"mode": "max-autotune", "backend": "eager"}, ValueError, "mode and options are inductor settings"),
        ({"options": {"cpp_wrapper": True}, "backend": "aot_eager"}, ValueError, "mode and options are inductor settings"),
        ({"options": ["cpp_wrapper"]}, TypeError, "options must be a mapping of inductor options or None"),
        ({"fullgraph": 1}, TypeError, "fullgraph must be a bool, got 1"),
        ({"eager_random": None}, TypeError, "eager_random must be a bool, got None"),
        ({"dynamic": "yes"}, TypeError, "dynamic must be a bool or None, got 'yes'"),
        ({"fallback": "ignore"}, ValueError, r"fallback must be one of \('warn', 'raise', 'eager'\), got 'ignore'"),
        ({"options": {"guard_filter_fn": "all"}}, TypeError, "options' guard_filter_fn must be callable"),
        (
            {"options": {"fallback_randomm": True}},
            ValueError,
            r"unknown inductor option 'fallback_randomm' \(did you mean 'fallback_random'\?\)",
        ),
        ({"options": {"fallback_random": "yes"}}, TypeError, "inductor option 'fallback_random' must be a bool, got 'yes'"),
    ],
)
def test_options_are_validated_when_built(options, error, match):
    core = fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1))
    with pytest.raises(error, match=match):
        with_compile(core, **options)


def test_torch_compiles_own_options_pass_the_check():
    core = fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1))
    with_compile(core, options={"use_aoti": False, "cpp.simdlen": None, "trace.enabled": False})


def test_the_recompile_limit_is_named_with_its_remedies():
    data = [(torch.randn(n, 10), torch.randint(0, 3, (n,))) for n in range(2, 12)]  # ten batch shapes
    step = with_compile(fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1)), backend="eager", fallback="raise")
    with pytest.raises(CompileError, match=r"recompile limit was reached: the step was compiled for 8 .*dynamic=None"):
        fl.fold(step, step.init(), data, progress=False)


def test_a_step_with_graph_breaks_past_the_recompile_limit_says_it_runs_eagerly():
    """Under fullgraph=False dynamo skips the step at its limit without raising: with_compile notices and says so."""
    data = [(torch.randn(n, 10), torch.randint(0, 3, (n,))) for n in range(2, 12)]  # ten batch shapes
    build = lambda fallback: with_compile(
        fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1)), backend="eager", fullgraph=False, fallback=fallback
    )
    step = build("warn")
    with pytest.warns(CompileFallbackWarning, match=r"runs eagerly from now on .*recompile limit was reached.*dynamic=None"):
        state = fl.fold(step, step.init(), data, progress=False)
    assert step.eager_reason.startswith("dynamo's recompile limit was reached") and step.graphs["step"] == 8
    eager = fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1))
    expected = fl.fold(eager, eager.init(), data, progress=False)
    assert all(torch.allclose(state.params[n], expected.params[n], atol=1e-6) for n in expected.params)
    torch._dynamo.reset()
    step = build("raise")
    with pytest.raises(CompileError, match=r"runs eagerly from now on \(fullgraph=False\): dynamo's recompile limit"):
        fl.fold(step, step.init(), data, progress=False)


def test_not_a_train_step():
    with pytest.raises(TypeError, match="with_compile: expected a train step"):
        with_compile(lambda state, batch: (state, {}), backend="eager")


class Scaled(nn.Module):
    """0-d float64 parameter, a 0-d int64 buffer written in place, a buffer reassigned in forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 1)
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls.add_(1)
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
        return self.fc(x - self.mean) * self.scale.float()


@pytest.mark.parametrize("accum", [None, 2])
@pytest.mark.parametrize("compiled", [False, True])
def test_donate_model_trains_every_tensor_of_the_model(compiled, accum):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(4)]
    model = Scaled()
    core = fl.make_train_step(model, fl.losses.mse, sgd(0.1))
    step = with_compile(core, backend="aot_eager", fallback="raise") if compiled else core
    if accum:
        step = fl.with_grad_accum(step, every=accum)
    state = fl.fold(step, step.init(), data, donate="model", progress=False)
    assert int(model.calls) == int(state.buffers["calls"]) == 4
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        held = state.params.get(name, state.buffers.get(name))
        assert torch.equal(t.detach(), held), name
    assert float(model.scale.detach()) != 1.0 and bool(model.mean.abs().sum() > 0)


# ------------------------------------------------------------------ fnlight's post-grad pass: a buffer less per 3-d Linear+ReLU


def _aten_graph(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args)


def _ff(x, w1, w2):
    h = torch.nn.functional.linear(x, w1)  # addmm on the 2-d view, then viewed as 3-d
    a = torch.relu(h)
    return torch.nn.functional.linear(a, w2), a <= 0  # the next layer reads a 2-d view of a; ReLU's backward reads a


def test_sink_views_applies_the_activation_before_the_reshape_bitwise():
    from fnlight.transforms._compile_passes import sink_views

    args = (torch.randn(4, 5, 6), torch.randn(7, 6), torch.randn(3, 7))
    gm = _aten_graph(_ff, *args)
    relu = [n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default]
    assert len(relu) == 1 and relu[0].args[0].target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
    expected = gm(*args)
    sink_views(gm.graph)
    gm.recompile()
    (moved,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default]
    assert moved.args[0].target is torch.ops.aten.mm.default and moved.meta["val"].shape == (20, 7)  # on the 2-d matmul
    assert any(u.target is torch.ops.aten.mm.default for u in moved.users)  # the next matmul reads it directly
    got = gm(*args)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, w: torch.relu(torch.nn.functional.linear(x, w)) * 2,  # nothing reshapes the result back
        lambda x, w: (torch.relu(torch.nn.functional.linear(x, w)).transpose(0, 1).reshape(20, 7),),  # not a plain reshape
        lambda x, w: (torch.add(torch.nn.functional.linear(x, w), x[..., :1]).reshape(20, 7),),  # two tensor inputs
    ],
    ids=["no reshape back", "transposed", "two inputs"],
)
def test_sink_views_leaves_other_graphs_alone(fn):
    from fnlight.transforms._compile_passes import sink_views

    args = (torch.randn(4, 5, 6), torch.randn(7, 6))
    gm = _aten_graph(fn, *args)
    before = [(n.target, n.args) for n in gm.graph.nodes]
    sink_views(gm.graph)
    assert [(n.target, n.args) for n in gm.graph.nodes] == before


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own import
def test_a_compiled_feed_forward_keeps_no_more_tensor_memory_than_eager(monkeypatch):
    class FeedForward(nn.Module):  # two transformer feed-forward blocks: Linear on 3-d input, ReLU, Linear
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.up1, self.down1 = nn.Linear(16, 256), nn.Linear(256, 16)
            self.up2, self.down2 = nn.Linear(16, 256), nn.Linear(256, 4)

        def forward(self, x):
            return self.down2(torch.relu(self.up2(self.down1(torch.relu(self.up1(x))))))

    data = [(torch.randn(8, 32, 16, generator=torch.Generator().manual_seed(i)), torch.randn(8, 32, 4)) for i in range(2)]
    peaks, states = {}, {}
    for name in ("eager", "without the pass", "compiled"):
        core = fl.make_train_step(FeedForward(), fl.losses.mse, adamw(1e-2))
        if name == "without the pass":  # inductor left alone: what it keeps (another uuid: not a cached graph with the pass)
            monkeypatch.setattr("fnlight.transforms._compile_passes.SinkViews.__call__", lambda self, graph: None)
            monkeypatch.setattr("fnlight.transforms._compile_passes.SinkViews.uuid", lambda self: b"no pass")
        step = core if name == "eager" else with_compile(core, fallback="raise")
        state = fl.fold(step, step.init(), data[:1], progress=False)  # compiles outside the measurement

        def more(name=name, step=step, state=state):
            states[name] = fl.fold(step, state, data[1:], epochs=2, progress=False)

        peaks[name] = peak_tensor_bytes(more)
        monkeypatch.undo()
    close(states["compiled"], states["eager"])
    activation = 8 * 32 * 256 * 4  # one [8, 32, 256] float32 tensor
    assert peaks["compiled"] + activation <= peaks["without the pass"]  # inductor alone keeps a pre-activation too
    assert peaks["compiled"] <= peaks["eager"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own import
def test_a_post_grad_pass_in_options_runs_after_fnlights():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from fnlight.transforms._compile_passes import SinkViews

    class Count(CustomGraphPass):  # (inductor's cache may skip the passes: what is checked is what it is handed)
        def __call__(self, graph):
            graph.owning_module.meta["nodes"] = sum(1 for n in graph.nodes if n.op == "call_function")

        def uuid(self):
            return b"test: count the nodes"

    options = {"post_grad_custom_post_pass": Count()}
    torch.manual_seed(0)
    step = with_compile(fl.make_train_step(nn.Linear(10, 3), fl.losses.mse, sgd(0.1)), options=options)
    passes = step.options["post_grad_custom_post_pass"]
    assert [type(p) for p in passes] == [SinkViews, Count]  # fnlight's first, then the user's
    fl.fold(step, step.init(), [(torch.ones(4, 10), torch.zeros(4, 3))] * 2, progress=False)
    assert options == {"post_grad_custom_post_pass": passes[1]} and step.graphs["step"] == 1
