"""fnlight.optim against torch.optim: parity, purity, masks, clipping, schedules and every raise."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fnlight as fl
from fnlight import optim

STEPS = 100
Params = dict[str, Tensor]


def make_params(dtype: torch.dtype = torch.float32) -> Params:
    """A small MLP's parameters (weights, biases, a LayerNorm), detached."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads_at(params: Params, step: int, scale: float = 1.0) -> Params:
    """Fixed random gradients for ``step`` (the same on every call)."""
    g = torch.Generator().manual_seed(1000 + step)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


# (id, fnlight builder, fnlight options, torch class, torch options, options for the bitwise reference)
CASES: list[tuple[str, Callable[..., optim.Optimizer], dict[str, Any], type, dict[str, Any], dict[str, Any]]] = [
    ("sgd", optim.sgd, {}, torch.optim.SGD, {}, {"fused": True}),
    ("sgd-momentum", optim.sgd, {"momentum": 0.9}, torch.optim.SGD, {"momentum": 0.9}, {"fused": True}),
    (
        "sgd-nesterov",
        optim.sgd,
        {"momentum": 0.9, "nesterov": True},
        torch.optim.SGD,
        {"momentum": 0.9, "nesterov": True},
        {"fused": True},
    ),
    (
        "sgd-dampening",
        optim.sgd,
        {"momentum": 0.8, "dampening": 0.3},
        torch.optim.SGD,
        {"momentum": 0.8, "dampening": 0.3},
        {"fused": True},
    ),
    (
        "sgd-weight_decay",
        optim.sgd,
        {"momentum": 0.9, "weight_decay": 0.05},
        torch.optim.SGD,
        {"momentum": 0.9, "weight_decay": 0.05},
        {"fused": True},
    ),
    ("adam", optim.adam, {}, torch.optim.Adam, {}, {"fused": True}),
    ("adam-weight_decay", optim.adam, {"weight_decay": 0.05}, torch.optim.Adam, {"weight_decay": 0.05}, {"fused": True}),
    (
        "adam-amsgrad",
        optim.adam,
        {"amsgrad": True, "b1": 0.8, "b2": 0.99},
        torch.optim.Adam,
        {"amsgrad": True, "betas": (0.8, 0.99)},
        {"fused": True},
    ),
    ("adamw", optim.adamw, {}, torch.optim.AdamW, {}, {"fused": True}),
    (
        "adamw-amsgrad",
        optim.adamw,
        {"amsgrad": True, "weight_decay": 0.1},
        torch.optim.AdamW,
        {"amsgrad": True, "weight_decay": 0.1},
        {"fused": True},
    ),
    ("rmsprop", optim.rmsprop, {}, torch.optim.RMSprop, {}, {"foreach": True}),
    (
        "rmsprop-centered",
        optim.rmsprop,
        {"centered": True, "alpha": 0.9},
        torch.optim.RMSprop,
        {"centered": True, "alpha": 0.9},
        {"foreach": True},
    ),
    (
        "rmsprop-momentum",
        optim.rmsprop,
        {"momentum": 0.9, "centered": True},
        torch.optim.RMSprop,
        {"momentum": 0.9, "centered": True},
        {"foreach": True},
    ),
    (
        "rmsprop-weight_decay",
        optim.rmsprop,
        {"weight_decay": 0.05, "eps": 1e-6},
        torch.optim.RMSprop,
        {"weight_decay": 0.05, "eps": 1e-6},
        {"foreach": True},
    ),
    ("adagrad", optim.adagrad, {}, torch.optim.Adagrad, {}, {"fused": True}),
    ("adagrad-lr_decay", optim.adagrad, {"lr_decay": 0.01}, torch.optim.Adagrad, {"lr_decay": 0.01}, {"fused": True}),
    ("adagrad-weight_decay", optim.adagrad, {"weight_decay": 0.05}, torch.optim.Adagrad, {"weight_decay": 0.05}, {"fused": True}),
    (
        "adagrad-initial_accumulator_value",
        optim.adagrad,
        {"initial_accumulator_value": 0.5},
        torch.optim.Adagrad,
        {"initial_accumulator_value": 0.5},
        {"fused": True},
    ),
]
LR = {"sgd": 0.05, "adam": 1e-2, "adamw": 1e-2, "rmsprop": 1e-3, "adagrad": 0.05}
IDS = [c[0] for c in CASES]


def lr_of(case_id: str) -> float:
    return LR[case_id.split("-")[0]]


def run_fnlight(
    opt: optim.Optimizer,
    params: Params,
    *,
    inplace: bool,
    steps: int = STEPS,
    grad_fn: Callable[[Params, int], Params] = grads_at,
) -> tuple[Params, Any]:
    params = {n: p.clone() for n, p in params.items()}
    state = opt.init(params)
    for k in range(steps):
        params, state = opt.apply(params, grad_fn(params, k), state, inplace=inplace)
    return params, state


def run_torch(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    params: Params,
    *,
    steps: int = STEPS,
    grad_fn: Callable[[Params, int], Params] = grads_at,
    before_step: Callable[[list[nn.Parameter]], None] | None = None,
) -> Params:
    ps = {n: nn.Parameter(p.clone()) for n, p in params.items()}
    opt = make(list(ps.values()))
    for k in range(steps):
        for n, g in grad_fn(params, k).items():
            ps[n].grad = g
        if before_step is not None:
            before_step(list(ps.values()))
        opt.step()
    return {n: p.detach() for n, p in ps.items()}


def leaves(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree)


def assert_trees_equal(a: Any, b: Any) -> None:
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("case_id", "build", "fl_kw", "torch_cls", "torch_kw", "exact_kw"), CASES, ids=IDS)
def test_parity_with_torch_optim(case_id, build, fl_kw, torch_cls, torch_kw, exact_kw):
    params, lr = make_params(), lr_of(case_id)
    ours, state = run_fnlight(build(lr, **fl_kw), params, inplace=True)
    reference = run_torch(lambda ps: torch_cls(ps, lr=lr, **torch_kw), params)
    exact = run_torch(lambda ps: torch_cls(ps, lr=lr, **torch_kw, **exact_kw), params)
    for n in params:
        torch.testing.assert_close(ours[n], reference[n], rtol=1e-6, atol=1e-7)
        assert torch.equal(ours[n], exact[n]), f"{case_id}: {n} differs from torch.optim with {exact_kw}"
        assert not torch.equal(ours[n], params[n])
    assert int(state.count) == STEPS
    assert float(state.hparams["lr"]) == lr


@pytest.mark.parametrize(("case_id", "build", "fl_kw"), [c[:3] for c in CASES], ids=IDS)
def test_inplace_and_pure_paths_agree_bitwise(case_id, build, fl_kw):
    params = make_params()
    opt = build(lr_of(case_id), **fl_kw)
    p_in, s_in = run_fnlight(opt, params, inplace=True, steps=10)
    p_pure, s_pure = run_fnlight(opt, params, inplace=False, steps=10)
    assert_trees_equal(p_in, p_pure)
    assert_trees_equal(s_in, s_pure)


@pytest.mark.parametrize(("case_id", "build", "fl_kw"), [c[:3] for c in CASES], ids=IDS)
def test_pure_path_leaves_inputs_untouched(case_id, build, fl_kw):
    opt = build(lr_of(case_id), **fl_kw)
    params, state = run_fnlight(opt, make_params(), inplace=True, steps=3)
    grads = grads_at(params, 3)
    saved = optree.tree_map(torch.clone, (params, state, grads))
    new_params, new_state = opt.apply(params, grads, state, inplace=False)
    assert_trees_equal((params, state, grads), saved)
    assert optree.tree_structure(new_state) == optree.tree_structure(state)
    for n in params:
        assert new_params[n].data_ptr() != params[n].data_ptr()
        assert not torch.equal(new_params[n], params[n])
    assert int(new_state.count) == int(state.count) + 1


@pytest.mark.parametrize(("case_id", "build", "fl_kw"), [c[:3] for c in CASES], ids=IDS)
def test_inplace_path_updates_the_given_tensors(case_id, build, fl_kw):
    opt = build(lr_of(case_id), **fl_kw)
    params = make_params()
    state = opt.init(params)
    new_params, new_state = opt.apply(params, grads_at(params, 0), state, inplace=True)
    assert all(new_params[n] is params[n] for n in params)
    assert optree.tree_structure(new_state) == optree.tree_structure(state)
    assert [(t.dtype, t.device) for t in leaves(new_state)] == [(t.dtype, t.device) for t in leaves(state)]


@pytest.mark.parametrize(("case_id", "build", "fl_kw"), [c[:3] for c in CASES], ids=IDS)
def test_subset_update_keeps_every_state_entry(case_id, build, fl_kw):
    opt = build(lr_of(case_id), **fl_kw)
    params = make_params()
    state = opt.init(params)
    full, _ = opt.apply(params, grads_at(params, 0), state, inplace=False)
    subset = {"0.weight": params["0.weight"], "3.bias": params["3.bias"]}
    grads = {n: g for n, g in grads_at(params, 0).items() if n in subset}
    new, new_state = opt.apply(subset, grads, state, inplace=False)
    assert sorted(new) == sorted(subset)
    assert optree.tree_structure(new_state) == optree.tree_structure(state)
    for n in subset:
        assert torch.equal(new[n], full[n])
    for field in new_state._fields:
        old, kept = getattr(state, field), getattr(new_state, field)
        if isinstance(old, dict) and field != "hparams":
            assert list(kept) == list(old)
            for n in set(old) - set(subset):
                assert kept[n] is old[n]


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("build", "fl_kw", "torch_cls", "torch_kw"),
    [
        (optim.adamw, {"weight_decay": 0.1}, torch.optim.AdamW, {"weight_decay": 0.1, "fused": True}),
        (optim.adam, {"weight_decay": 0.1}, torch.optim.Adam, {"weight_decay": 0.1, "fused": True}),
        (
            optim.sgd,
            {"weight_decay": 0.1, "momentum": 0.9},
            torch.optim.SGD,
            {"weight_decay": 0.1, "momentum": 0.9, "fused": True},
        ),
        (optim.rmsprop, {"weight_decay": 0.1}, torch.optim.RMSprop, {"weight_decay": 0.1, "foreach": True}),
        (optim.adagrad, {"weight_decay": 0.1}, torch.optim.Adagrad, {"weight_decay": 0.1, "fused": True}),
    ],
    ids=["adamw", "adam", "sgd", "rmsprop", "adagrad"],
)
def test_decay_mask_equals_two_param_groups(build, fl_kw, torch_cls, torch_kw):
    params, lr = make_params(), 1e-2
    ours, _ = run_fnlight(build(lr, mask=optim.decay_mask_no_bias_norm, **fl_kw), params, inplace=True)
    decay = [n for n, p in params.items() if optim.decay_mask_no_bias_norm(n, p)]
    assert decay == ["0.weight", "3.weight"]

    def make(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        by_name = dict(zip(params, ps, strict=True))
        groups = [
            {"params": [by_name[n] for n in params if n in decay]},
            {"params": [by_name[n] for n in params if n not in decay], "weight_decay": 0.0},
        ]
        return torch_cls(groups, lr=lr, **torch_kw)

    reference = run_torch(make, params)
    unmasked, _ = run_fnlight(build(lr, **fl_kw), params, inplace=True)
    for n in params:
        assert torch.equal(ours[n], reference[n]), n
    assert not torch.equal(ours["0.bias"], unmasked["0.bias"])


# ----------------------------------------------------------------------------- clipping


def varying_grads(params: Params, step: int) -> Params:
    """Gradients whose global norm is sometimes far above, sometimes below, the clip threshold."""
    return grads_at(params, step, scale=[0.01, 1.0, 5.0][step % 3])


def test_chain_clip_by_global_norm_then_sgd_equals_clip_grad_norm():
    params, max_norm = make_params(), 2.0
    opt = optim.chain(optim.clip_by_global_norm(max_norm), optim.sgd(0.05, momentum=0.9))
    ours, (clip_state, sgd_state) = run_fnlight(opt, params, inplace=True, grad_fn=varying_grads)
    norms: list[Tensor] = []
    reference = run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
        params,
        grad_fn=varying_grads,
        before_step=lambda ps: norms.append(nn.utils.clip_grad_norm_(ps, max_norm)),
    )
    for n in params:
        assert torch.equal(ours[n], reference[n]), n
    assert isinstance(clip_state, optim.ClipState) and isinstance(sgd_state, optim.SgdState)
    assert torch.equal(clip_state.norm, norms[-1])
    assert min(norms) < max_norm < max(norms)


def test_clip_by_value_equals_clip_grad_value():
    params = make_params()
    opt = optim.chain(optim.clip_by_value(0.5), optim.adam(1e-2))
    ours, (clip_state, _) = run_fnlight(opt, params, inplace=False, grad_fn=varying_grads)
    reference = run_torch(
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        params,
        grad_fn=varying_grads,
        before_step=lambda ps: nn.utils.clip_grad_value_(ps, 0.5),
    )
    for n in params:
        assert torch.equal(ours[n], reference[n]), n
    last = varying_grads(params, STEPS - 1)
    assert torch.equal(clip_state.norm, nn.utils.get_total_norm(list(last.values())))


@pytest.mark.parametrize("transform", [optim.clip_by_global_norm(0.1), optim.clip_by_value(0.1)], ids=["global_norm", "value"])
def test_clip_is_pure_and_keeps_structure(transform):
    grads = grads_at(make_params(), 0)
    saved = optree.tree_map(torch.clone, grads)
    state = transform.init(grads)
    out, new_state = transform.update(grads, state, grads)
    assert_trees_equal(grads, saved)
    assert list(out) == list(grads)
    assert all(out[n].data_ptr() != grads[n].data_ptr() and out[n].dtype == grads[n].dtype for n in grads)
    assert optree.tree_structure(new_state) == optree.tree_structure(state)
    assert new_state.norm.dtype == state.norm.dtype == torch.float32 and float(state.norm) == 0.0
    empty, empty_state = transform.update({}, new_state, {})
    assert empty == {} and float(empty_state.norm) == 0.0


def test_clip_state_norm_is_float64_for_float64_params():
    grads = grads_at(make_params(torch.float64), 0)
    clip = optim.clip_by_global_norm(1.0)
    _, state = clip.update(grads, clip.init(grads), grads)
    assert state.norm.dtype == torch.float64
    assert torch.equal(state.norm, nn.utils.get_total_norm(list(grads.values())))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=20), st.floats(1e-3, 1e3))
def test_clip_by_global_norm_bounds_the_norm(values, max_norm):
    grads = {"w": torch.tensor(values, dtype=torch.float32)}
    clip = optim.clip_by_global_norm(max_norm)
    out, state = clip.update(grads, clip.init(grads), grads)
    assert float(optim.global_norm(out)) <= max_norm * (1 + 1e-5) + 1e-6
    if float(state.norm) * (1 + 1e-4) + 1e-6 <= max_norm:  # clearly below: float32 rounding cannot bite
        assert torch.equal(out["w"], grads["w"])


# ----------------------------------------------------------------------------- schedules and hparams


@pytest.mark.parametrize(
    ("build", "torch_make"),
    [
        (lambda lr: optim.sgd(lr, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        (lambda lr: optim.adam(lr), lambda ps: torch.optim.Adam(ps, lr=0.1)),
        (lambda lr: optim.rmsprop(lr), lambda ps: torch.optim.RMSprop(ps, lr=0.1)),
        (lambda lr: optim.adagrad(lr), lambda ps: torch.optim.Adagrad(ps, lr=0.1)),
    ],
    ids=["sgd", "adam", "rmsprop", "adagrad"],
)
def test_schedule_is_honoured_and_stored(build, torch_make):
    def schedule(count: Tensor) -> Tensor:
        return 0.1 * 0.9 ** count.double()

    params, opt = make_params(), build(schedule)
    assert float(opt.init(params).hparams["lr"]) == pytest.approx(0.1)
    ours, state = run_fnlight(opt, params, inplace=True)
    ps = {n: nn.Parameter(p.clone()) for n, p in params.items()}
    reference_opt = torch_make(list(ps.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(reference_opt, lambda epoch: 0.9**epoch)
    used: list[float] = []
    for k in range(STEPS):
        for n, g in grads_at(params, k).items():
            ps[n].grad = g
        used.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        scheduler.step()
    for n in params:
        torch.testing.assert_close(ours[n], ps[n].detach(), rtol=1e-6, atol=1e-7)
    assert state.hparams["lr"].dtype == torch.float64 and state.hparams["lr"].ndim == 0
    assert float(state.hparams["lr"]) == pytest.approx(used[-1], rel=1e-12)
    assert float(state.hparams["lr"]) == pytest.approx(0.1 * 0.9 ** (STEPS - 1), rel=1e-12)


def test_changing_a_hyperparameter_through_the_state():
    opt = optim.sgd(0.1, momentum=0.9)
    params = make_params()
    state = opt.init(params)
    frozen = state._replace(hparams={**state.hparams, "lr": torch.tensor(0.0, dtype=torch.float64)})
    new, new_state = opt.apply(params, grads_at(params, 0), frozen, inplace=False)
    assert_trees_equal(new, params)
    assert float(new_state.hparams["lr"]) == 0.0
    train = fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, opt)
    ts = train.init(seed=0)
    half = torch.tensor(0.5, dtype=torch.float64)
    ts = ts.replace(opt_state=ts.opt_state._replace(hparams={**ts.opt_state.hparams, "momentum": half}))
    ts2, _ = train(ts, (torch.ones(4, 3), torch.zeros(4, 1)))
    assert float(ts2.opt_state.hparams["momentum"]) == 0.5 and int(ts2.opt_state.count) == 1


@pytest.mark.parametrize(
    "opt",
    [
        optim.sgd(0.1),
        optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, mask=optim.decay_mask_no_bias_norm)),
        optim.chain(optim.clip_by_value(1.0), optim.rmsprop(1e-2, momentum=0.5)),
        optim.adagrad(0.1),
    ],
    ids=["sgd", "clip-adamw", "clip-rmsprop", "adagrad"],
)
def test_train_step_with_each_optimizer_is_pure(opt):
    step = fl.make_train_step(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), fl.losses.mse, opt)
    state = step.init(seed=0)
    saved = optree.tree_map(torch.clone, (state.params, state.opt_state))
    batch = (torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 1))
    new, metrics = step(state, batch)
    assert_trees_equal((state.params, state.opt_state), saved)
    assert optree.tree_structure(new.opt_state) == optree.tree_structure(state.opt_state)
    assert math.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: optim.sgd(-0.1), ValueError, r"fnlight\.optim\.sgd: learning_rate must be in \[0\.0, inf\), got -0\.1"),
        (lambda: optim.sgd("0.1"), TypeError, r"fnlight\.optim\.sgd: learning_rate must be a float, got '0\.1'"),
        (lambda: optim.sgd(True), TypeError, r"learning_rate must be a float, got True"),
        (lambda: optim.sgd(0.1, momentum=-0.5), ValueError, r"sgd: momentum must be in \[0\.0, inf\), got -0\.5"),
        (lambda: optim.sgd(0.1, momentum=0.9, dampening=1.5), ValueError, r"sgd: dampening must be in \[0\.0, 1\.0\]"),
        (lambda: optim.sgd(0.1, weight_decay=-1.0), ValueError, r"sgd: weight_decay must be in"),
        (
            lambda: optim.sgd(0.1, nesterov=True),
            ValueError,
            r"sgd: nesterov=True requires momentum > 0 and dampening == 0, got momentum=0\.0, dampening=0\.0",
        ),
        (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, r"got momentum=0\.9, dampening=0\.1"),
        (lambda: optim.sgd(0.1, nesterov=1), TypeError, r"sgd: nesterov must be a bool \(True or False\), got 1"),
        (lambda: optim.sgd(0.1, mask="bias"), TypeError, r"sgd: mask must be None or a callable .*got 'bias'"),
        (lambda: optim.adam(1e-3, b1=1.0), ValueError, r"fnlight\.optim\.adam: b1 must be in \[0\.0, 1\.0\), got 1\.0"),
        (lambda: optim.adam(1e-3, b2=-0.1), ValueError, r"adam: b2 must be in \[0\.0, 1\.0\), got -0\.1"),
        (lambda: optim.adam(1e-3, eps=float("nan")), ValueError, r"adam: eps must be in .*got nan"),
        (lambda: optim.adamw(1e-3, amsgrad="yes"), TypeError, r"adamw: amsgrad must be a bool .*got 'yes'"),
        (lambda: optim.adamw(1e-3, weight_decay=-0.1), ValueError, r"adamw: weight_decay must be in"),
        (lambda: optim.adamw(1e-3, mask=3), TypeError, r"adamw: mask must be None or a callable .*got 3"),
        (lambda: optim.rmsprop(-1e-3), ValueError, r"fnlight\.optim\.rmsprop: learning_rate must be in"),
        (lambda: optim.rmsprop(1e-3, alpha=1.5), ValueError, r"rmsprop: alpha must be in \[0\.0, 1\.0\], got 1\.5"),
        (lambda: optim.rmsprop(1e-3, eps=-1e-8), ValueError, r"rmsprop: eps must be in"),
        (lambda: optim.rmsprop(1e-3, momentum=-0.9), ValueError, r"rmsprop: momentum must be in"),
        (lambda: optim.rmsprop(1e-3, weight_decay=-0.9), ValueError, r"rmsprop: weight_decay must be in"),
        (lambda: optim.rmsprop(1e-3, centered=None), TypeError, r"rmsprop: centered must be a bool .*got None"),
        (lambda: optim.rmsprop(1e-3, mask=[]), TypeError, r"rmsprop: mask must be None or a callable"),
        (lambda: optim.adagrad(-1.0), ValueError, r"fnlight\.optim\.adagrad: learning_rate must be in"),
        (lambda: optim.adagrad(0.1, lr_decay=-1.0), ValueError, r"adagrad: lr_decay must be in .*got -1\.0"),
        (lambda: optim.adagrad(0.1, weight_decay=-1.0), ValueError, r"adagrad: weight_decay must be in"),
        (
            lambda: optim.adagrad(0.1, initial_accumulator_value=-1.0),
            ValueError,
            r"adagrad: initial_accumulator_value must be in \[0\.0, inf\), got -1\.0",
        ),
        (lambda: optim.adagrad(0.1, eps=-1.0), ValueError, r"adagrad: eps must be in"),
        (lambda: optim.adagrad(0.1, lr_decay="0"), TypeError, r"adagrad: lr_decay must be a float, got '0'"),
        (lambda: optim.adagrad(0.1, mask=0.5), TypeError, r"adagrad: mask must be None or a callable"),
        (
            lambda: optim.clip_by_global_norm(0.0),
            ValueError,
            r"fnlight\.optim\.clip_by_global_norm: max_norm must be in \(0\.0, inf\), got 0\.0",
        ),
        (lambda: optim.clip_by_global_norm(float("inf")), ValueError, r"max_norm must be in \(0\.0, inf\), got inf"),
        (lambda: optim.clip_by_global_norm("1"), TypeError, r"clip_by_global_norm: max_norm must be a float, got '1'"),
        (lambda: optim.clip_by_value(-1.0), ValueError, r"fnlight\.optim\.clip_by_value: max_delta must be in \(0\.0"),
        (lambda: optim.clip_by_value(None), TypeError, r"clip_by_value: max_delta must be a float, got None"),
        (lambda: optim.chain(), ValueError, r"chain\(\): expected gradient transformations followed by one Optimizer"),
        (
            lambda: optim.chain(optim.sgd(0.1), optim.adam(0.1)),
            TypeError,
            r"chain\(\): part 0 must be a GradientTransformation .*an Optimizer may only come last, got Optimizer",
        ),
        (
            lambda: optim.chain(optim.sgd(0.1), optim.clip_by_value(1.0)),
            TypeError,
            r"chain\(\): the last part must be an Optimizer .*got GradientTransformation",
        ),
    ],
)
def test_invalid_options_raise_at_build_time(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_public_names_are_exported_and_documented():
    from pathlib import Path

    assert optim.__all__ == sorted(optim.__all__)
    doc = (Path(__file__).parent.parent / "docs" / "optim.md").read_text()
    for name in optim.__all__:
        assert getattr(optim, name).__doc__, name
        assert f"`{name}`" in doc or f"`{name}(" in doc, f"{name} is not documented in docs/optim.md"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sgd_and_adagrad_on_cpu_compute_in_float32(dtype):
    """Not torch's CPU fused kernels, which skip vectorised fp16/bf16 SGD updates (pytorch#191763) and
    divide Adagrad's update in fp16 (eps rounds to 0: NaN where gradient and sum are 0)."""
    w = torch.linspace(-1, 1, 1000).to(dtype)
    grads = []
    for i in range(3):
        g = torch.linspace(-2, 3, 1000).to(dtype) * (i + 1)
        g[::7] = 0
        grads.append(g)
    lr, mom, wd, decay, eps = 0.05, 0.9, 0.01, 0.01, 1e-10
    # hand-written float32 arithmetic, rounded to the dtype after each update
    p, buf = w.clone(), None
    for g in grads:
        d = g.float() + wd * p.float()
        b32 = d if buf is None else buf.float() * mom + d
        buf = b32.to(dtype)
        p = (p.float() - lr * (d + mom * b32)).to(dtype)
    expected_sgd = p
    p, s = w.clone(), torch.zeros_like(w)
    for count, g in enumerate(grads):
        g32 = g.float()
        s32 = s.float() + g32 * g32
        s = s32.to(dtype)
        p = (p.float() - lr / (1 + count * decay) * g32 / (s32.sqrt() + eps)).to(dtype)
    expected_adagrad = p
    for opt, expected in (
        (optim.sgd(lr, momentum=mom, nesterov=True, weight_decay=wd), expected_sgd),
        (optim.adagrad(lr, lr_decay=decay, eps=eps), expected_adagrad),
    ):
        params = {"w": w.clone()}
        state = opt.init(params)
        for g in grads:
            params, state = opt.apply(params, {"w": g.clone()}, state, inplace=False)
        assert params["w"].dtype == dtype and bool(params["w"].isfinite().all())
        torch.testing.assert_close(params["w"], expected, rtol=0, atol=0)


def test_a_schedule_giving_a_negative_or_nonfinite_learning_rate_raises_before_the_update():
    cases = ((optim.constant(-0.1), 0, "-0.1"), (optim.linear(1e-3, -1e-3, 2), 2, "-0.001"), (lambda c: c * math.nan, 3, "nan"))
    for schedule, count, got in cases:
        opt = optim.sgd(schedule)
        params = make_params()
        state = opt.init(params)._replace(count=torch.tensor(count))
        before = {n: p.clone() for n, p in params.items()}
        with pytest.raises(ValueError, match=rf"learning-rate schedule .* gave {got} for the update after {count} updates"):
            opt.apply(params, params, state, inplace=True)
        assert fl.tree_equal(params, before)


def test_an_int_too_large_for_a_float_is_refused_with_the_option_named():
    with pytest.raises(ValueError, match=r"fnlight.optim.adamw: weight_decay must be in \[0.0, inf\), got 1000"):
        optim.adamw(1e-3, weight_decay=10**400)


def test_rmsprop_on_float16_parameters_computes_in_float32():
    """torch's multi-tensor RMSprop divides in fp16, where eps (1e-8) is 0: NaN where gradient and average are 0."""
    w = torch.linspace(-1, 1, 64).to(torch.float16)
    grads = [torch.linspace(-2, 3, 64).to(torch.float16) * (i + 1) for i in range(3)]
    for g in grads:
        g[::5] = 0
    lr, alpha, eps, mom = 0.01, 0.9, 1e-8, 0.5
    p, sq, mb = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    for g in grads:  # hand-written float32 arithmetic, rounded to float16 after each update
        g32 = g.float()
        sq32 = sq.float() * alpha + (1 - alpha) * g32 * g32
        mb32 = mb.float() * mom + g32 / (sq32.sqrt() + eps)
        p, sq, mb = (p.float() - lr * mb32).half(), sq32.half(), mb32.half()
    opt = optim.rmsprop(lr, alpha=alpha, eps=eps, momentum=mom)
    params = {"w": w.clone()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.apply(params, {"w": g.clone()}, state, inplace=False)
    assert params["w"].dtype == torch.float16 and bool(params["w"].isfinite().all())
    torch.testing.assert_close(params["w"], p, rtol=0, atol=1e-3)
    torch.testing.assert_close(state.square_avg["w"], sq, rtol=0, atol=0)


def test_a_schedule_may_return_a_float_and_must_return_a_number():
    opt = optim.sgd(lambda c: 0.1 * 0.5 ** int(c))
    params, state = {"w": torch.ones(2)}, opt.init({"w": torch.ones(2)})
    for _ in range(2):
        params, state = opt.apply(params, {"w": torch.ones(2)}, state, inplace=False)
    expected = torch.ones(2).add_(torch.ones(2), alpha=-0.1).add_(torch.ones(2), alpha=-0.05)
    assert torch.equal(params["w"], expected) and float(state.hparams["lr"]) == 0.05
    with pytest.raises(TypeError, match=r"schedule '.*<lambda>' must return a 0-d tensor or a float, got str: 'x'"):
        optim.adam(lambda c: "x").init(params)


OPTIMIZERS_AND_FIELDS = [
    (lambda: optim.sgd(0.1, momentum=0.9), "momentum_buffer"),
    (lambda: optim.adam(0.1, amsgrad=True), "nu_max"),
    (lambda: optim.adamw(0.1), "mu"),
    (lambda: optim.rmsprop(0.1, centered=True, momentum=0.5), "grad_avg"),
    (lambda: optim.adagrad(0.1), "sum_of_squares"),
]


@pytest.mark.parametrize(("make", "field"), OPTIMIZERS_AND_FIELDS)
def test_apply_refuses_state_and_gradients_that_do_not_fit_the_parameters(make, field):
    # torch's fused kernels do not check sizes: a smaller state or gradient was read and written out of bounds
    opt = make()
    params = {"w": torch.zeros(100, 3)}
    small = opt.init({"w": torch.zeros(2, 3)})
    where = r"fnlight\.optim\.\w+"
    with pytest.raises(ValueError, match=rf"{where}: state\.\w+\['w'\] has shape \(2, 3\), the parameter has \(100, 3\)"):
        opt.apply(params, {"w": torch.zeros(100, 3)}, small, inplace=False)
    state = opt.init(params)
    with pytest.raises(ValueError, match=rf"{where}: grads\['w'\] has shape \(3, 100\), the parameter has \(100, 3\)"):
        opt.apply(params, {"w": torch.zeros(3, 100)}, state, inplace=False)
    with pytest.raises(ValueError, match=rf"{where}: grads has no entry for parameter 'w'"):
        opt.apply(params, {"v": torch.zeros(100, 3)}, state, inplace=False)
    with pytest.raises(ValueError, match=rf"{where}: state\.{field} has no entry for parameter 'w'"):
        opt.apply(params, {"w": torch.zeros(100, 3)}, state._replace(**{field: {}}), inplace=False)


def test_apply_refuses_another_optimizers_state_or_other_options():
    params, grads = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    with pytest.raises(TypeError, match=r"fnlight\.optim\.adamw: the optimizer state must be the AdamState .* got SgdState"):
        optim.adamw(0.1).apply(params, grads, optim.sgd(0.1).init(params), inplace=False)
    with pytest.raises(ValueError, match=r"fnlight\.optim\.sgd: state\.momentum_buffer must be empty with these options"):
        optim.sgd(0.1).apply(params, grads, optim.sgd(0.1, momentum=0.9).init(params), inplace=False)
    with pytest.raises(ValueError, match=r"fnlight\.optim\.adam: state\.nu_max has no entry for parameter 'w'"):
        optim.adam(0.1, amsgrad=True).apply(params, grads, optim.adam(0.1).init(params), inplace=False)
    chained = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
    with pytest.raises(TypeError, match=r"chain\(\): the state must be the tuple of the 2 parts' states .* got SgdState"):
        chained.apply(params, grads, optim.sgd(0.1).init(params), inplace=False)
    with pytest.raises(TypeError, match=r"got a tuple of 1"):
        chained.check(params, (optim.sgd(0.1).init(params),))


def test_a_train_step_checks_a_state_it_did_not_produce_also_inside_a_fold():
    torch.manual_seed(0)
    step = fl.make_train_step(nn.Linear(4, 2), fl.losses.mse, optim.sgd(0.1, momentum=0.9))
    state = step.init()
    batches = [(torch.randn(8, 4), torch.randn(8, 2))] * 3
    wider = fl.make_train_step(nn.Linear(4, 64), fl.losses.mse, optim.sgd(0.1, momentum=0.9)).init()
    edited = state.replace(opt_state=wider.opt_state)  # momentum buffers (64, 4) for a (2, 4) parameter
    match = r"fnlight\.optim\.sgd: state\.momentum_buffer\['weight'\] has shape \(64, 4\), the parameter has \(2, 4\)"
    with pytest.raises(ValueError, match=match):
        fl.fold(step, edited, batches, progress=False)  # in place: the fold's first update is checked
    with pytest.raises(ValueError, match=match):
        step(edited, batches[0])
    calls = []
    check = step._check_opt
    step._check_opt = lambda *a: (calls.append(1), check(*a))
    fl.fold(step, state, batches, progress=False)
    assert calls == [1]  # the fold's later updates apply states the step produced: not checked again


@pytest.mark.parametrize("build", [optim.sgd, optim.rmsprop])
@pytest.mark.parametrize(("built", "edited"), [(0.0, 0.9), (0.9, 0.0)])
def test_momentum_switched_on_or_off_through_the_state_is_refused(build, built, edited):
    # torch's fused SGD failed with an internal error; RMSprop silently ignored a momentum switched on
    params = {"w": torch.ones(3)}
    opt = build(0.1, momentum=built)
    state = opt.init(params)
    state = state._replace(hparams={**state.hparams, "momentum": torch.tensor(edited, dtype=torch.float64)})
    match = (
        rf"fnlight\.optim\.{build.__name__}: state\.hparams\['momentum'\] is {edited}, but the optimizer was built with momentum"
    )
    with pytest.raises(ValueError, match=match):
        opt.apply(params, {"w": torch.ones(3)}, state, inplace=False)
    step = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, opt)
    fresh = step.init()
    edited_state = fresh.replace(
        opt_state=fresh.opt_state._replace(
            hparams={**fresh.opt_state.hparams, "momentum": torch.tensor(edited, dtype=torch.float64)}
        )
    )
    with pytest.raises(ValueError, match=match):
        fl.fold(step, edited_state, [(torch.ones(4, 2), torch.zeros(4, 1))], progress=False)
    changed = state._replace(hparams={**state.hparams, "momentum": torch.tensor(0.5 if built else 0.0, dtype=torch.float64)})
    opt.apply(params, {"w": torch.ones(3)}, changed, inplace=False)  # another positive value (or zero kept) is fine


def test_a_schedule_returning_several_values_is_named_and_one_value_is_stored_0d():
    # a (3,) tensor failed in the update with torch's "only one element tensors can be converted to Python scalars"
    params = {"w": torch.ones(2)}
    for schedule in (lambda c: torch.full((3,), 0.1), optim.warmup(lambda c: torch.full((3,), 0.1), 2)):
        opt = optim.sgd(schedule)
        with pytest.raises(TypeError, match=r"schedule '.*' must return a 0-d tensor or a float, got a tensor of shape \[3\]"):
            opt.apply(params, params, opt.init(params), inplace=False)
    opt = optim.sgd(lambda c: torch.full((1,), 0.5))
    state = opt.init(params)
    new, state = opt.apply(params, params, state, inplace=False)
    assert state.hparams["lr"].shape == () and torch.equal(new["w"], torch.full((2,), 0.5))


@pytest.mark.parametrize(
    ("build", "missing"), [(optim.sgd, "momentum"), (optim.adam, "b1"), (optim.rmsprop, "alpha"), (optim.adagrad, "lr_decay")]
)
def test_hparams_replaced_without_the_other_entries_are_refused(build, missing):
    # hparams={"lr": ...} (the other entries dropped) failed in the update with a bare KeyError
    params = {"w": torch.ones(2)}
    opt = build(0.1)
    state = opt.init(params)
    dropped = state._replace(hparams={"lr": torch.tensor(0.01, dtype=torch.float64)})
    match = rf"fnlight\.optim\.{build.__name__}: state\.hparams has no '{missing}' \(it holds \['lr'\], expected \['lr', "
    with pytest.raises(ValueError, match=match):
        opt.apply(params, params, dropped, inplace=False)
    step = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, opt)
    fresh = step.init()
    with pytest.raises(ValueError, match=match):
        step(
            fresh.replace(opt_state=fresh.opt_state._replace(hparams={"lr": torch.tensor(0.01, dtype=torch.float64)})),
            (torch.ones(4, 2), torch.zeros(4, 1)),
        )
