"""fnlight.testing: each assertion passes on a sound step and fails, naming the culprit, on a broken one."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, sgd
from fnlight.testing import (
    assert_all_params_get_grad,
    assert_can_overfit,
    assert_deterministic,
    assert_finite,
    assert_pure,
    peak_tensor_bytes,
)
from tests.conftest import make_batches, make_bn_mlp

BATCH = make_batches(1, batch=16)[0]


def good(**options):
    return fl.make_train_step(make_bn_mlp(dropout=0.3), fl.losses.cross_entropy, adamw(1e-2), **options)


def chained():
    return fl.transforms.with_ema(fl.with_grad_accum(good(), every=2), decay=0.9)


@pytest.mark.parametrize("build", [good, chained], ids=["core", "ema+accum"])
def test_a_sound_step_passes_everything(build):
    step = build()
    state = step.init(seed=0)
    assert_pure(step, state, BATCH)
    assert_deterministic(step, state, BATCH)
    assert_finite(step, state, BATCH)
    assert_all_params_get_grad(step, state, BATCH)
    before = fl.tree_clone(state)
    assert_can_overfit(step, state, BATCH, steps=200)
    assert fl.tree_equal(state, before)


def clamping_loss(model, batch):
    with torch.no_grad():
        model[0].weight.clamp_(-0.01, 0.01)  # WGAN-style clipping in place: writes into the input state
    return fl.losses.cross_entropy(model, batch)


def centring_loss(model, batch):
    x, y = batch
    x.sub_(x.mean())  # normalises the caller's batch in place
    return F.cross_entropy(model(x), y)


def test_assert_pure_names_the_state_paths_changed_in_place():
    step = fl.make_train_step(make_bn_mlp(), clamping_loss, adamw(1e-2))
    with pytest.raises(AssertionError, match=r"modified its input in place: state.params\['0.weight'\] changed"):
        assert_pure(step, step.init(), BATCH)


def test_assert_pure_names_the_batch_paths_changed_in_place():
    step = fl.make_train_step(make_bn_mlp(), centring_loss, adamw(1e-2))
    batch = tuple(t.clone() for t in BATCH)
    with pytest.raises(AssertionError, match=r"modified its input in place: batch\[0\] changed"):
        assert_pure(step, step.init(), batch)


@pytest.mark.parametrize("kind", ["dataclass", "dict subclass", "UserDict"])
def test_assert_pure_looks_inside_batches_that_are_not_pytree_containers(kind):
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        y: torch.Tensor

    class DictBatch(dict):
        pass

    x, y = (t.clone() for t in BATCH)
    batch = {"dataclass": lambda: Batch(x, y), "dict subclass": lambda: DictBatch(x=x, y=y)}.get(
        kind, lambda: collections.UserDict(x=x, y=y)
    )()
    get = (lambda b: b.x) if kind == "dataclass" else (lambda b: b["x"])
    fields = (lambda b: (get(b), b.y)) if kind == "dataclass" else (lambda b: (get(b), b["y"]))
    sound = fl.make_train_step(make_bn_mlp(), lambda m, b: fl.losses.cross_entropy(m, fields(b)), adamw(1e-2))
    assert_pure(sound, sound.init(), batch)

    def scaling_loss(model, b):
        get(b).mul_(2.0)
        return fl.losses.cross_entropy(model, fields(b))

    step = fl.make_train_step(make_bn_mlp(), scaling_loss, adamw(1e-2))
    where = "batch.x" if kind == "dataclass" else r"batch\['x'\]"
    with pytest.raises(AssertionError, match=rf"modified its input in place: {where} changed"):
        assert_pure(step, step.init(), batch)


def test_assert_pure_compares_numpy_batches():
    def numpy_loss(model, batch, scale=1.0):
        x, y = batch
        x *= scale  # in place on the caller's array when scale != 1
        return fl.losses.cross_entropy(model, (torch.from_numpy(x), torch.from_numpy(y)))

    batch = (BATCH[0].numpy().copy(), BATCH[1].numpy().copy())
    step = fl.make_train_step(make_bn_mlp(), numpy_loss, adamw(1e-2))
    assert_pure(step, step.init(), batch)  # was: ValueError: the truth value of an array ... is ambiguous
    writing = fl.make_train_step(make_bn_mlp(), lambda m, b: numpy_loss(m, b, scale=2.0), adamw(1e-2))
    with pytest.raises(AssertionError, match=r"modified its input in place: batch\[0\] changed"):
        assert_pure(writing, writing.init(), batch)


def test_a_step_must_return_a_state_and_metrics():
    step = good()
    with pytest.raises(AssertionError, match=r"assert_pure: a step must return \(TrainState, dict of metrics\), got TrainState"):
        assert_pure(lambda s, b: step(s, b)[0], step.init(), BATCH)


def test_assert_deterministic_catches_randomness_outside_the_step_seed():
    step = good()

    def noisy(state, batch):
        new, metrics = step(state, batch)
        w = new.params["4.weight"]
        return new.replace(params={**new.params, "4.weight": w + 1e-3 * torch.rand_like(w)}), metrics

    with pytest.raises(AssertionError, match=r"different results at new_state.params\['4.weight'\]\. Randomness must come"):
        assert_deterministic(noisy, step.init(), BATCH)


def test_assert_deterministic_leaves_a_step_that_writes_into_its_batch_to_assert_pure():
    # each call gets its own copy of the batch: an in-place normalisation is impurity, not randomness
    step = fl.make_train_step(make_bn_mlp(), centring_loss, adamw(1e-2))
    batch = (BATCH[0] + 3.0, BATCH[1])
    before = fl.tree_clone(batch)
    assert_deterministic(step, step.init(), batch)
    assert fl.tree_equal(batch, before)
    with pytest.raises(AssertionError, match=r"modified its input in place: batch\[0\] changed"):
        assert_pure(step, step.init(), batch)


def nan_loss(model, batch):
    return fl.losses.cross_entropy(model, batch) * float("nan")


def test_assert_finite_reports_a_nan_loss_in_the_gradient_phase():
    step = fl.make_train_step(make_bn_mlp(), nan_loss, adamw(1e-2))
    with pytest.raises(
        AssertionError, match=r"non-finite values in the gradient phase \(loss = nan\): metrics\['loss'\], gradient of"
    ):
        assert_finite(step, step.init(), BATCH)


def test_assert_finite_turns_a_nonfinite_error_into_an_assertion():
    step = fl.make_train_step(make_bn_mlp(), nan_loss, adamw(1e-2))
    with pytest.raises(AssertionError, match="assert_finite: the step raised NonFiniteError: non-finite values at update 0"):
        assert_finite(lambda s, b: step(s, b), step.init(), BATCH)


def test_assert_finite_names_nonfinite_parameters_after_the_step():
    step = good()

    def poisoning(state, batch):
        new, metrics = step(state, batch)
        return new.replace(params={**new.params, "0.bias": new.params["0.bias"] / 0.0}), metrics

    with pytest.raises(AssertionError, match=r"non-finite values after the step: new_state.params\['0.bias'\]"):
        assert_finite(poisoning, step.init(), BATCH)


def test_assert_finite_checks_metrics_reported_as_python_numbers():
    step = good()

    def reporting_floats(state, batch):
        new, _ = step(state, batch)
        return new, {"loss": float("nan"), "ok": 1.0}  # was: passed

    with pytest.raises(AssertionError, match=r"non-finite values after the step: metrics\['loss'\]$"):
        assert_finite(reporting_floats, step.init(), BATCH)


class PartlyUsed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(10, 3)
        self.gate = nn.Parameter(torch.ones(3))
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x) + 0.0 * self.gate


def test_assert_all_params_get_grad_names_missing_and_zero_gradients():
    step = fl.make_train_step(PartlyUsed(), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    expected = (
        r"3 of 5 trainable parameters get no usable gradient from this batch: "
        r"no gradient \(not used by the loss\): 'unused.weight', 'unused.bias'; an all-zero gradient: 'gate'\."
    )
    with pytest.raises(AssertionError, match=expected):
        assert_all_params_get_grad(step, state, BATCH)
    assert_all_params_get_grad(step, state, BATCH, ignore=["gate", "unused.weight", "unused.bias"])
    accumulating = fl.with_grad_accum(step, micro_batches=2)
    with pytest.raises(AssertionError, match="3 of 5 trainable parameters"):
        assert_all_params_get_grad(accumulating, accumulating.init(), BATCH)


def test_assert_all_params_get_grad_argument_errors():
    step = fl.make_train_step(PartlyUsed(), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    with pytest.raises(ValueError, match=r"ignore names \['gates'\] that are not trainable parameters; the trainable ones are"):
        assert_all_params_get_grad(step, state, BATCH, ignore=["gates"])
    with pytest.raises(TypeError, match="ignore must be a collection of parameter names, got the single string 'gate'"):
        assert_all_params_get_grad(step, state, BATCH, ignore="gate")
    with pytest.raises(TypeError, match=r"the step has no gradient phase \(step.grads\).*got function"):
        assert_all_params_get_grad(lambda s, b: step(s, b), state, BATCH)
    for ignore in (None, [["gate"]], [0]):  # were: 'NoneType' object is not iterable, unhashable type: 'list', a ValueError
        with pytest.raises(TypeError, match=r"ignore must be a collection of parameter names \(str\), got "):
            assert_all_params_get_grad(step, state, BATCH, ignore=ignore)


def test_assert_can_overfit_fails_when_nothing_learns():
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, sgd(0.0))
    with pytest.raises(
        AssertionError, match=r"loss did not reach 0.1 x the first value = .* within 20 calls on one batch: first"
    ):
        assert_can_overfit(step, step.init(), BATCH, steps=20)
    with pytest.raises(AssertionError, match=r"loss did not reach 0.001 within 5 calls"):
        assert_can_overfit(step, step.init(), BATCH, steps=5, target_loss=1e-3)


def doubled_loss(model, batch):
    loss = fl.losses.cross_entropy(model, batch)
    return loss, {"twice": 2 * loss.detach()}


def test_assert_can_overfit_reaches_an_absolute_target_and_watches_any_metric():
    step = fl.make_train_step(make_bn_mlp(), doubled_loss, adamw(3e-2))
    assert_can_overfit(step, step.init(), BATCH, steps=100, target_loss=0.05)
    assert_can_overfit(step, step.init(), BATCH, steps=100, target_loss=0.1, metric="twice")
    with pytest.raises(AssertionError, match=r"twice did not reach 0.001 within 2 calls on one batch"):
        assert_can_overfit(step, step.init(), BATCH, steps=2, target_loss=1e-3, metric="twice")


def test_assert_can_overfit_needs_an_absolute_goal_for_a_loss_that_is_not_positive():
    step = fl.make_train_step(make_bn_mlp(), lambda m, b: fl.losses.cross_entropy(m, b) - 10.0, sgd(0.0))
    with pytest.raises(ValueError, match=r"the first loss is -\d.*needs a positive metric\. Pass target_loss="):
        assert_can_overfit(step, step.init(), BATCH)
    with pytest.raises(AssertionError, match=r"loss did not reach -11 within 5 calls"):  # lr 0 still fails
        assert_can_overfit(step, step.init(), BATCH, steps=5, target_loss=-11.0)


def test_assert_can_overfit_reads_a_metric_reported_as_a_number():
    # a step of your own may report Python numbers, as fold accepts (was: AttributeError: 'float' object has no attribute 'ndim')
    step = good()

    def plain_numbers(state, batch):
        new, metrics = step(state, batch)
        return new, {"loss": float(metrics["loss"]), "note": "text"}

    assert_can_overfit(plain_numbers, step.init(seed=0), BATCH, steps=200)
    with pytest.raises(TypeError, match=r"metrics\['note'\] must be a 0-d tensor or a number, got str: 'text'"):
        assert_can_overfit(plain_numbers, step.init(seed=0), BATCH, metric="note")


def test_assert_can_overfit_fails_on_a_nonfinite_loss():
    step = fl.make_train_step(make_bn_mlp(), nan_loss, adamw(1e-2), nonfinite="ignore")
    with pytest.raises(AssertionError, match="assert_can_overfit: loss became nan at call 1"):
        assert_can_overfit(step, step.init(), BATCH)


def test_assert_can_overfit_fails_with_an_assertion_when_the_step_raises_for_a_diverging_loss():
    # the default nonfinite="raise" (was: NonFiniteError escaped, where the docs promise an AssertionError)
    torch.manual_seed(0)
    step = fl.make_train_step(nn.Linear(10, 1), fl.losses.mse, sgd(1e3))
    batch = (BATCH[0], BATCH[1].float()[:, None])
    with pytest.raises(AssertionError, match=r"the step raised NonFiniteError at call \d+ \(first value .*loss = inf"):
        assert_can_overfit(step, step.init(), batch)
    nan_step = fl.make_train_step(make_bn_mlp(), nan_loss, adamw(1e-2))
    with pytest.raises(AssertionError, match=r"assert_can_overfit: the step raised NonFiniteError at call 1: non-finite values"):
        assert_can_overfit(nan_step, nan_step.init(), BATCH)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"steps": 0}, ValueError, "assert_can_overfit: steps must be an int >= 1, got 0"),
        ({"factor": 1.5}, ValueError, r"assert_can_overfit: factor must be in \(0.0, 1.0\), got 1.5"),
        ({"target_loss": float("inf")}, ValueError, r"assert_can_overfit: target_loss must be in \[-inf, inf\), got inf"),
        ({"target_loss": "low"}, TypeError, "assert_can_overfit: target_loss must be a float, got 'low'"),
        ({"metric": "acc"}, ValueError, r"metric 'acc' is not among the step's metrics \['loss'\]"),
        ({"metric": ["loss"]}, TypeError, r"metric must be the name of one of the step's metrics \(a str\), got \['loss'\]"),
    ],
)
def test_assert_can_overfit_option_errors(options, error, match):
    step = good()
    with pytest.raises(error, match=match):
        assert_can_overfit(step, step.init(), BATCH, **options)


@pytest.mark.parametrize(
    "check", [assert_pure, assert_deterministic, assert_finite, assert_all_params_get_grad, assert_can_overfit]
)
def test_argument_errors(check):
    step = good()
    with pytest.raises(TypeError, match=f"{check.__name__}: step must be callable"):
        check("step", step.init(), BATCH)
    with pytest.raises(
        TypeError, match=rf"{check.__name__}: state must be a fnlight.TrainState \(from step.init\(\)\), got dict"
    ):
        check(step, {}, BATCH)


def test_assert_pure_ignores_what_a_batch_object_caches_and_walks_long_chains():
    import functools

    class Batch:
        def __init__(self, x, y, depth=0):
            self.x, self.y = x, y
            self.history = None
            for _ in range(depth):  # a long linked chain: no recursion limit
                self.history = {"previous": self.history, "note": torch.zeros(1)}

        @functools.cached_property
        def scaled(self):
            return self.x * 2.0

    step = fl.make_train_step(make_bn_mlp(), lambda m, b: fl.losses.cross_entropy(m, (b.scaled / 2.0, b.y)), adamw(1e-2))
    x, y = (t.clone() for t in BATCH)
    assert_pure(step, step.init(), Batch(x, y, depth=3000))  # the cached tensor is new, nothing changed


def test_assert_can_overfit_refuses_a_metric_with_one_value_per_replica():
    step = fl.ensemble.make_ensemble_step(nn.Linear(4, 1), fl.losses.mse, k=2, lr=0.1)
    batch = (torch.randn(8, 4), torch.randn(8, 1))
    with pytest.raises(ValueError, match=r"assert_can_overfit: loss must be a scalar, got shape \[2\] \(an ensemble step"):
        assert_can_overfit(step, step.init(seeds=0), batch, steps=2)


def test_peak_tensor_bytes_counts_what_is_live_at_once():
    before = torch.ones(2**18)  # allocated before the measurement: neither its memory nor its free counts
    mib = 2**20 // 4  # float32 elements in one MiB

    def run() -> None:
        nonlocal before
        a = torch.zeros(mib)
        b = torch.zeros(2 * mib)  # peak: 3 MiB live
        del a, b
        before = None
        c = torch.zeros(2 * mib)  # 2 MiB: below the peak
        del c

    assert peak_tensor_bytes(run) == 3 * 2**20


def test_peak_tensor_bytes_needs_a_callable():
    with pytest.raises(TypeError, match=r"peak_tensor_bytes: run must be a callable taking no arguments, got 3"):
        peak_tensor_bytes(3)
