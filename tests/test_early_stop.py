"""with_early_stop: each check case of REFERENCE.md, restore_best, resume mid-patience, with_eval, purity, errors."""

import math
import signal
import tempfile
import warnings

import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.optim import sgd
from fnlight.transforms._early_stop import EarlyStopState, with_early_stop
from fnlight.transforms._eval import with_eval
from tests.conftest import SignalledData, make_batches

NAN, INF = math.nan, math.inf
ONE = [(torch.zeros(1, 2), torch.zeros(1, 1))]  # a validation set of one sample: means are the values themselves


def train_batches(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def scripted(values, *, every=1, lr=0.0, **options):
    """Early stopping on ``val/score``, which at the k-th evaluation (update k * every) is ``values[k - 1]``.

    The score is a function of the state (its update count), as an evaluation is.
    """
    torch.manual_seed(0)
    core = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(lr))

    def score(state, batch):
        return {"score": torch.tensor(values[int(state.step) // every - 1], dtype=torch.float64)}

    return with_early_stop(with_eval(core, data=ONE, eval_step=score, every=every), monitor="val/score", **options)


def stop_point(step, batches=20):
    state = fl.fold(step, step.init(), train_batches(batches), progress=False)
    return int(state.step), state.slots["early_stop"]


def test_initial_record():
    rec = scripted([1.0]).init().slots["early_stop"]
    assert isinstance(rec, EarlyStopState)
    assert rec.best.dtype == torch.float64 and rec.best.ndim == 0 and float(rec.best) == INF
    assert (rec.best_step, rec.wait, rec.reason, rec.best_params) == (-1, 0, "", None)
    assert float(scripted([1.0], mode="max").init().slots["early_stop"].best) == -INF


def test_patience_counts_checks_not_calls_or_epochs():
    step = scripted([1.0] * 20, every=3, patience=2)  # checks at updates 3 (best), 6 (wait 1), 9 (wait 2: stop)
    state = fl.fold(step, step.init(), train_batches(4), epochs=5, progress=False)
    rec = state.slots["early_stop"]
    assert int(state.step) == 9 and bool(state.stop) and int(state.data.epoch) == 2
    assert (rec.best_step, rec.wait, rec.reason, float(rec.best)) == (3, 2, "patience", 1.0)


def test_wait_resets_on_improvement():
    n, rec = stop_point(scripted([5.0, 6.0, 4.0, 6.0, 6.0, 6.0], patience=3))
    assert n == 6 and (rec.best_step, rec.wait, rec.reason, float(rec.best)) == (3, 3, "patience", 4.0)


def test_min_delta_equal_to_best_minus_delta_is_not_an_improvement():
    n, rec = stop_point(scripted([1.0, 0.9, 0.8], patience=1, min_delta=0.1))  # 0.9 == 1.0 - 0.1 exactly
    assert n == 2 and rec.reason == "patience" and float(rec.best) == 1.0
    n, rec = stop_point(scripted([1.0, 0.89, 0.8, 0.75], patience=1, min_delta=0.1))  # 0.8 > 0.89 - 0.1
    assert n == 3 and rec.best_step == 2 and float(rec.best) == 0.89
    n, rec = stop_point(scripted([1.0, 1.0, 1.0], patience=2))  # min_delta=0: equal is no improvement either
    assert n == 3 and rec.best_step == 1


def test_mode_max():
    n, rec = stop_point(scripted([0.5, 0.6, 0.6, 0.55], mode="max", patience=2))
    assert n == 4 and (rec.best_step, float(rec.best), rec.reason) == (2, 0.6, "patience")
    n, rec = stop_point(scripted([0.5, 0.6, 0.7, 0.75, 0.7, 0.7], mode="max", patience=2, min_delta=0.1))
    assert n == 5 and (rec.best_step, float(rec.best)) == (3, 0.7)  # 0.6 == 0.5 + 0.1 is no improvement, 0.75 < 0.8 neither


def test_stopping_threshold():
    n, rec = stop_point(scripted([1.0, 0.5, 0.2, 0.1], stopping_threshold=0.2, patience=10))  # reached: <=
    assert n == 3 and rec.reason == "stopping_threshold"
    assert (rec.best_step, float(rec.best), rec.wait) == (3, 0.2, 0)  # the record is updated on every check
    n, rec = stop_point(scripted([0.1, 0.5, 0.9], mode="max", stopping_threshold=0.9, patience=10))
    assert n == 3 and rec.reason == "stopping_threshold"


def test_divergence_threshold():
    n, rec = stop_point(scripted([1.0, 5.0, 5.5, 0.1], divergence_threshold=5.0, patience=10))  # beyond: strictly
    assert n == 3 and rec.reason == "divergence" and rec.wait == 2 and float(rec.best) == 1.0
    n, rec = stop_point(scripted([0.9, 0.5, 0.4], mode="max", divergence_threshold=0.5, patience=10))
    assert n == 3 and rec.reason == "divergence"


def test_non_finite():
    n, rec = stop_point(scripted([1.0, NAN, 0.5], patience=10))
    assert n == 2 and rec.reason == "non_finite" and rec.wait == 1 and float(rec.best) == 1.0
    n, rec = stop_point(scripted([1.0, -INF], patience=10))  # not recorded as a best either
    assert n == 2 and rec.reason == "non_finite" and float(rec.best) == 1.0 and rec.best_step == 1
    n, rec = stop_point(scripted([1.0, INF], divergence_threshold=5.0))  # non-finite before divergence
    assert n == 2 and rec.reason == "non_finite"


def test_without_check_finite_nan_is_no_improvement():
    n, rec = stop_point(scripted([1.0, NAN, 0.5, NAN, NAN], patience=2, check_finite=False))
    assert n == 5 and (rec.reason, rec.best_step, float(rec.best)) == ("patience", 3, 0.5)
    n, rec = stop_point(scripted([1.0, INF], divergence_threshold=5.0, check_finite=False))
    assert n == 2 and rec.reason == "divergence"
    n, _ = stop_point(scripted([NAN] * 3, patience=3, check_finite=False))
    assert n == 3
    n, rec = stop_point(scripted([1.0, -INF, -INF], patience=2, check_finite=False))
    assert n == 3 and rec.reason == "patience" and float(rec.best) == 1.0


def test_min_updates_defers_stopping_but_not_the_record():
    step = scripted([1.0] * 10, patience=1, min_updates=4)
    n, rec = stop_point(step)
    assert n == 4 and rec.reason == "patience" and rec.wait == 3  # waits at checks 2 and 3 were counted, not acted on
    n, rec = stop_point(scripted([1.0, 1.0, 1.0, 0.5, 0.5], patience=1, min_updates=4))
    assert n == 5 and rec.best_step == 4  # the first check at min_updates improved: no stop there
    n, rec = stop_point(scripted([1.0, NAN, 0.5, 0.4, 0.3, NAN], patience=9, min_updates=3))
    assert n == 6 and rec.reason == "non_finite"  # the NaN at update 2 came too early to stop


def test_metrics_on_check_steps():
    step = scripted([3.0, 2.0, 2.5, 2.5], every=2, patience=5)
    state = step.init()
    for i, b in enumerate(train_batches(8)):
        state, metrics = step(state, b)
        if (i + 1) % 2:
            assert not any(k.startswith("early_stop/") for k in metrics)
        else:
            assert metrics["early_stop/wait"].ndim == 0 and metrics["early_stop/best"].dtype == torch.float64
    assert int(metrics["early_stop/wait"]) == 2 and float(metrics["early_stop/best"]) == 2.0


def test_monitoring_the_training_loss():
    step = with_early_stop(fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.0)), monitor="loss", patience=2)
    state = fl.fold(step, step.init(), [ONE[0]] * 10, progress=False)  # constant loss
    assert int(state.step) == 3 and state.slots["early_stop"].reason == "patience"


def test_restore_best_restores_the_best_params_bitwise():
    values = [3.0, 1.0, 2.0, 2.0, 2.0]
    batches = train_batches(10)
    reference = scripted(values, lr=0.1)
    after_two = reference.init()
    for b in batches[:2]:
        after_two, _ = reference(after_two, b)
    step = scripted(values, lr=0.1, patience=2, restore_best=True)
    folded = fl.fold(step, step.init(), batches, progress=False)
    rec = folded.slots["early_stop"]
    assert int(folded.step) == 4 and rec.best_step == 2 and rec.reason == "patience"
    for name, p in after_two.params.items():
        assert torch.equal(folded.params[name], p) and torch.equal(rec.best_params[name], p)
        assert folded.params[name].data_ptr() != rec.best_params[name].data_ptr()  # a copy, not an alias
    pure = step.init()
    for b in batches[:4]:
        pure, _ = step(pure, b)
    for field in ("step", "params", "opt_state", "slots", "stop"):
        assert fl.tree_equal(getattr(pure, field), getattr(folded, field)), field
    plain = scripted(values, lr=0.1, patience=2)
    without = fl.fold(plain, plain.init(), batches, progress=False)
    assert not torch.equal(without.params["weight"], after_two.params["weight"])


def test_restore_best_without_any_improvement_keeps_the_params():
    step = scripted([NAN, NAN], lr=0.1, restore_best=True)
    state = fl.fold(step, step.init(), train_batches(4), progress=False)
    assert int(state.step) == 1 and state.slots["early_stop"].best_step == -1
    assert not torch.equal(state.params["weight"], step.init().params["weight"])  # not the initial copy


def test_a_direct_call_never_modifies_its_input():
    step = scripted([3.0, 1.0, 2.0, 2.0], lr=0.1, patience=1, restore_best=True)
    state = step.init()
    for b in train_batches(2):
        state, _ = step(state, b)
    before = fl.tree_clone(state)
    stopped, _ = step(state, train_batches(3)[2])  # stops and restores
    assert bool(stopped.stop) and stopped.slots["early_stop"].reason == "patience"
    for field in ("step", "params", "slots", "stop"):
        assert fl.tree_equal(getattr(state, field), getattr(before, field)), field


@pytest.mark.parametrize("via", ["checkpoint", "state"])
def test_resume_mid_patience_stops_where_an_uninterrupted_run_stops(via):
    values = [3.0, 2.0, 2.5, 2.5, 2.5, 2.5, 2.5]
    batches = train_batches(12)
    step = scripted(values, lr=0.05, patience=4, restore_best=True)
    uninterrupted = fl.fold(step, step.init(), batches, progress=False)
    assert int(uninterrupted.step) == 6

    part = fl.fold(step, step.init(), batches, max_steps=4, progress=False)
    assert part.slots["early_stop"].wait == 2 and not bool(part.stop)
    if via == "checkpoint":
        with tempfile.TemporaryDirectory() as d:
            fl.checkpoint.save(f"{d}/mid.ckpt", part)
            part = fl.checkpoint.restore(f"{d}/mid.ckpt", step.init())
    resumed = fl.fold(step, part, batches, progress=False)
    assert int(resumed.step) == 6 and bool(resumed.stop)
    for field in ("step", "params", "opt_state", "slots", "data", "stop"):
        assert fl.tree_equal(getattr(resumed, field), getattr(uninterrupted, field)), field


def classifier_run(**early):
    """Training labels that disagree with the validation labels: the validation loss turns up."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    y = (x @ w).argmax(-1)
    train = [(x[i : i + 16], (y[i : i + 16] + 1) % 3) for i in range(0, 160, 16)]
    val = [(x[160:210], y[160:210]), (x[210:], y[210:])]  # 50 + 30: uneven
    torch.manual_seed(0)
    core = fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, sgd(0.5))
    return core, train, val


def test_early_stop_on_val_loss_from_with_eval_ends_the_fold_at_the_expected_update():
    core, train, val = classifier_run()
    every, patience = 2, 2
    # The reference: the same core step, evaluated by hand every 2 updates, early stopping in plain Python.
    state, best, wait, expected = core.init(), INF, 0, None
    evaluate = fl.make_eval_step(fl.losses.classification)
    for _ in range(5):
        for b in train:
            state, _ = core(state, b)
            if int(state.step) % every == 0:
                loss = fl.evaluate(evaluate, state, val)["loss"]
                best, wait = (loss, 0) if loss < best else (best, wait + 1)
                if wait >= patience:
                    expected = int(state.step)
                    break
        if expected:
            break
    assert expected is not None and expected > 2 * every
    step = with_early_stop(
        with_eval(core, data=val, loss_fn=fl.losses.classification, every=every), monitor="val/loss", patience=patience
    )
    folded = fl.fold(step, step.init(), train, epochs=5, progress=False)
    assert int(folded.step) == expected and folded.slots["early_stop"].reason == "patience"
    assert float(folded.slots["early_stop"].best) == best
    assert fl.tree_equal(folded.params, state.params)


def test_at_epoch_end_checks_once_per_epoch():
    core, train, val = classifier_run()
    step = with_early_stop(
        with_eval(core, data=val, loss_fn=fl.losses.classification, at_epoch_end=True), monitor="val/loss", patience=1
    )
    state = fl.fold(step, step.init(), train, epochs=20, progress=False)
    rec = state.slots["early_stop"]
    assert bool(state.stop) and rec.reason == "patience"
    assert int(state.step) == len(train) * int(state.data.epoch) and rec.best_step % len(train) == 0


def test_warns_when_the_monitor_never_appears():
    step = with_early_stop(fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1)), monitor="val/loss")
    with pytest.warns(RuntimeWarning, match=r"monitor='val/loss' never appeared.*\['loss'\]"):
        fl.fold(step, step.init(), train_batches(3), progress=False)


def test_a_resumed_fold_too_short_to_evaluate_does_not_warn():
    core_step, train, val = classifier_run()
    step = with_early_stop(with_eval(core_step, data=val, loss_fn=fl.losses.classification, every=4), monitor="val/loss")
    state = fl.fold(step, step.init(), train, max_steps=4, progress=False)  # one check, at update 4
    assert state.slots["early_stop"].best_step == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = fl.fold(step, state, train, max_steps=6, progress=False)  # updates 5-6: no evaluation in this fold
    assert int(state.step) == 6


def core():
    return fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1))


BAD = [
    (dict(monitor=None), TypeError, "monitor must be a metric name"),
    (dict(monitor=""), TypeError, "monitor must be a metric name"),
    (dict(mode="minimum"), ValueError, "mode must be 'min' or 'max'"),
    (dict(patience=0), ValueError, "patience must be an int >= 1"),
    (dict(patience=2.0), ValueError, "patience must be an int >= 1"),
    (dict(patience=True), ValueError, "patience must be an int >= 1"),
    (dict(min_delta=-0.1), ValueError, "min_delta must be >= 0"),
    (dict(min_delta="0.1"), TypeError, "min_delta must be a number"),
    (dict(min_delta=NAN), ValueError, "min_delta must be finite"),
    (dict(min_delta=10**400), ValueError, "min_delta must be finite, got 1000"),
    (dict(stopping_threshold="low"), TypeError, "stopping_threshold must be a number or None"),
    (dict(stopping_threshold=-INF), ValueError, "stopping_threshold must be finite"),
    (dict(divergence_threshold=NAN), ValueError, "divergence_threshold must be finite"),
    (dict(divergence_threshold=True), TypeError, "divergence_threshold must be a number or None"),
    (dict(stopping_threshold=2.0, divergence_threshold=1.0), ValueError, "stopping_threshold must be below"),
    (dict(mode="max", stopping_threshold=1.0, divergence_threshold=1.0), ValueError, "stopping_threshold must be above"),
    (dict(check_finite=1), TypeError, "check_finite must be a bool"),
    (dict(restore_best="yes"), TypeError, "restore_best must be a bool"),
    (dict(min_updates=-1), ValueError, "min_updates must be an int >= 0"),
    (dict(min_updates=1.5), ValueError, "min_updates must be an int >= 0"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD, ids=[f"{i}-{next(iter(o))}" for i, (o, _, _) in enumerate(BAD)])
def test_bad_options_are_rejected_at_build_time(options, error, match):
    options = {"monitor": "loss", **options}
    with pytest.raises(error, match=match):
        with_early_stop(core(), **options)


def test_not_a_step_and_wrong_order_are_rejected():
    with pytest.raises(TypeError, match="expected a train step"):
        with_early_stop(nn.Linear(2, 1), monitor="loss")
    with pytest.raises(ValueError, match="cannot wrap a step already wrapped by with_checkpointing"):
        with tempfile.TemporaryDirectory() as d:
            with_early_stop(fl.with_checkpointing(core(), directory=d, every=1), monitor="loss")
    with pytest.raises(ValueError, match="already wrapped by with_early_stop"):
        with_early_stop(with_early_stop(core(), monitor="loss"), monitor="loss")


def test_a_preempted_fold_does_not_warn_about_its_monitor():
    core_step, train, val = classifier_run()
    evaluated = with_eval(core_step, data=val, loss_fn=fl.losses.classification, at_epoch_end=True)
    step = with_early_stop(evaluated, monitor="val/loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(fl.Preempted):  # SIGTERM while the third batch is fetched, before any evaluation
            fl.fold(step, step.init(), SignalledData(train, at=2, signum=signal.SIGTERM), progress=False)


def test_under_streaming_accumulation_only_the_updates_are_checked():
    """A micro-batch's loss inside a window is no check: patience counts updates, and no window is cut short."""
    torch.manual_seed(0)
    core = fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, fl.optim.sgd(0.1))
    step = fl.with_early_stop(fl.with_grad_accum(core, every=3), monitor="loss", patience=2, min_delta=100.0)
    state = fl.fold(step, step.init(), make_batches(30, 8), progress=False)
    record = state.slots["early_stop"]
    assert (int(state.step), int(state.data.batch)) == (3, 9)  # checks at updates 1, 2, 3: whole windows
    assert (record.reason, record.best_step, record.wait) == ("patience", 1, 2)


@pytest.mark.parametrize("bad", [torch.ones(2), "high"], ids=["vector", "str"])
def test_a_monitored_metric_that_is_not_one_number_is_named(bad):
    # a monitor of several elements failed with a bare "ValueError: only one element tensors can be converted to
    # Python scalars", naming neither with_early_stop nor the metric
    class WithMetric(fl.Transform):
        name = "with_metric"

        def __call__(self, state, batch):
            new_state, metrics = self.inner(state, batch)
            return new_state, {**metrics, "mine": bad}

    core = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1))
    step = with_early_stop(WithMetric(core), monitor="mine")
    got = r"a tensor of shape \(2,\)" if isinstance(bad, torch.Tensor) else "str 'high'"
    with pytest.raises(TypeError, match=rf"with_early_stop: the monitored metric 'mine' must be a 0-d tensor .*, got {got}"):
        fl.fold(step, step.init(), train_batches(3), progress=False)
