"""with_eval: when it evaluates, exact weighted means against a hand computation, prefix, precision, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnlight as fl
from fnlight.optim import sgd
from fnlight.transforms._early_stop import with_early_stop
from fnlight.transforms._eval import with_eval
from tests.conftest import make_batches


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))


def core():
    return fl.make_train_step(mlp(), fl.losses.classification, sgd(0.1, momentum=0.9))


def val_data(sizes=(7, 7, 3), seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def by_hand(state, data):
    """Loss and accuracy of the trained module (eval mode) over the concatenated validation data."""
    model = fl.to_module(state).eval()
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).double().mean().item()


def run(step, batches):
    """Pure calls; the metrics of each call."""
    state, history = step.init(), []
    for b in batches:
        state, metrics = step(state, b)
        history.append((int(state.step), metrics))
    return state, history


def test_every_n_updates_with_exact_weighted_means():
    val = val_data()
    step = with_eval(core(), data=val, loss_fn=fl.losses.classification, every=3)
    state = step.init()
    evaluated = []
    for b in make_batches(10, batch=8):
        state, metrics = step(state, b)
        if "val/loss" in metrics:
            evaluated.append(int(state.step))
            loss, accuracy = by_hand(state, val)
            assert metrics["val/loss"].dtype == torch.float64 and metrics["val/loss"].ndim == 0
            assert metrics["val/loss"].item() == pytest.approx(loss, rel=1e-6)
            assert metrics["val/accuracy"].item() == pytest.approx(accuracy, abs=1e-7)
            assert "loss" in metrics and "accuracy" in metrics  # the training metrics stay
    assert evaluated == [3, 6, 9]


def test_counts_optimizer_updates_not_calls():
    step = with_eval(fl.with_grad_accum(core(), every=2), data=val_data(), loss_fn=fl.losses.classification, every=2)
    _, history = run(step, make_batches(9, batch=8))
    assert [n for n, m in history if "val/loss" in m] == [2, 4]  # calls 4 and 8


def test_at_epoch_end_evaluates_after_the_inner_flush():
    val = val_data()
    step = with_eval(fl.with_grad_accum(core(), every=4), data=val, loss_fn=fl.losses.classification, at_epoch_end=True)
    state, history = run(step, make_batches(10, batch=8))
    assert not any("val/loss" in m for _, m in history)
    state, metrics = step.flush(state)  # applies the short window of 2, then evaluates
    assert int(state.step) == 3
    loss, accuracy = by_hand(state, val)
    assert metrics["val/loss"].item() == pytest.approx(loss, rel=1e-6)
    assert metrics["val/accuracy"].item() == pytest.approx(accuracy, abs=1e-7)
    reference = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, val)
    assert metrics["val/loss"].item() == reference["loss"]


def test_at_epoch_end_does_not_evaluate_the_same_state_twice():
    step = with_eval(core(), data=val_data(), loss_fn=fl.losses.classification, every=2, at_epoch_end=True)
    state, history = run(step, make_batches(4, batch=8))
    assert [n for n, m in history if "val/loss" in m] == [2, 4]
    _, metrics = step.flush(state)
    assert "val/loss" not in metrics  # update 4 was already evaluated
    state, _ = step(state, make_batches(1, batch=8, seed=7)[0])
    _, metrics = step.flush(state)
    assert "val/loss" in metrics  # update 5 was not


def test_fold_at_epoch_end_feeds_the_flush_metrics():
    seen = []

    class Spy:  # a plain step wrapping the transform: records what each epoch-end flush returns
        def __init__(self, inner):
            self.inner = inner
            self.init = inner.init

        def __call__(self, state, batch):
            return self.inner(state, batch)

        def flush(self, state):
            state, metrics = self.inner.flush(state)
            seen.append((int(state.data.epoch), int(state.step), sorted(metrics)))
            return state, metrics

    step = Spy(with_eval(core(), data=val_data(), loss_fn=fl.losses.classification, at_epoch_end=True))
    fl.fold(step, step.init(), make_batches(3, batch=8), epochs=2, progress=False)
    assert seen == [(0, 3, ["val/accuracy", "val/loss"]), (1, 6, ["val/accuracy", "val/loss"])]


def test_prefix_custom_eval_step_and_batch_size_fn():
    val = [{"x": x, "y": y} for x, y in val_data()]

    def errors(model, batch):
        logits = model(batch["x"])
        return F.cross_entropy(logits, batch["y"]), {"err": 1.0 - (logits.argmax(-1) == batch["y"]).float().mean()}

    step = with_eval(
        core(), data=val, eval_step=fl.make_eval_step(errors), every=1, prefix="test_", batch_size_fn=lambda b: len(b["y"])
    )
    state, metrics = step(step.init(), make_batches(1, batch=8)[0])
    assert sorted(metrics) == ["accuracy", "loss", "test_err", "test_loss"]
    loss, accuracy = by_hand(state, [(b["x"], b["y"]) for b in val])
    assert metrics["test_loss"].item() == pytest.approx(loss, rel=1e-6)
    assert metrics["test_err"].item() == pytest.approx(1 - accuracy, abs=1e-7)


def test_loader_data_equals_the_list():
    val = val_data((7, 7, 3))
    x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    batch = make_batches(1, batch=8)[0]
    a = with_eval(core(), data=val, loss_fn=fl.losses.classification, every=1)
    b = with_eval(core(), data=fl.Loader((x, y), batch_size=7), loss_fn=fl.losses.classification, every=1)
    ma, mb = a(a.init(), batch)[1], b(b.init(), batch)[1]
    assert ma["val/loss"].item() == pytest.approx(mb["val/loss"].item(), rel=1e-7)
    assert ma["val/accuracy"].item() == mb["val/accuracy"].item()


def test_evaluation_leaves_the_state_and_training_unchanged():
    batches = make_batches(6, batch=8)
    plain = core()
    expected = fl.fold(plain, plain.init(), batches, progress=False)
    step = with_eval(core(), data=val_data(), loss_fn=fl.losses.classification, every=1, at_epoch_end=True)
    got = fl.fold(step, step.init(), batches, progress=False)
    for field in ("step", "params", "buffers", "opt_state", "data", "slots", "stop"):
        assert fl.tree_equal(getattr(got, field), getattr(expected, field)), field  # BatchNorm statistics included


def noisy_loss(model, batch):
    """A loss that draws random numbers in eval mode too (a sampled objective, input noise)."""
    x, y = batch
    return F.mse_loss(model(x + torch.randn_like(x)), y)


def test_random_draws_in_an_evaluation_are_seeded_by_the_state_and_leave_the_callers_generator_alone():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    step = fl.make_train_step(model, noisy_loss, sgd(0.1))
    state, eval_step = step.init(seed=1), fl.make_eval_step(noisy_loss)
    batch = (torch.ones(4, 3), torch.zeros(4, 1))

    def untouched(call):
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        out = call()
        return out, torch.equal(torch.rand(3), expected)

    (first, kept), (again, _) = (
        untouched(lambda: fl.evaluate(eval_step, state, [batch, batch])),
        untouched(lambda: fl.evaluate(eval_step, state, [batch, batch])),
    )
    assert kept and first == again  # the same result whatever the caller's generator, which is put back
    one = fl.evaluate(eval_step, state, [batch])
    assert one != first  # each batch draws from its own seed: two equal batches are not the same draw twice
    direct, kept = untouched(lambda: eval_step(state, batch))
    assert kept and torch.equal(direct["loss"], eval_step(state, batch)["loss"])
    assert float(direct["loss"]) == one["loss"]  # a direct call draws as the first batch of an evaluation
    other = fl.evaluate(eval_step, state.replace(key=torch.tensor(2)), [batch])
    assert other != one  # the seed is the state's

    def nested(state, batch):  # an eval function of one's own that runs another evaluation first
        fl.evaluate(eval_step, state, [batch])
        return eval_step(state, batch)

    assert fl.evaluate(nested, state, [batch, batch]) == first  # the outer evaluation's seeds hold after the inner one

    evaluated = fl.with_eval(step, eval_step=eval_step, data=[batch], every=1)
    (_, metrics), kept = untouched(lambda: evaluated(evaluated.init(seed=1), batch))
    assert kept and float(metrics["val/loss"]) == fl.evaluate(eval_step, step(state, batch)[0], [batch])["loss"]


@pytest.mark.parametrize("when", [dict(at_epoch_end=True), dict(every=3), "observer evaluates", "observer calls eval_step"])
def test_an_evaluation_in_a_fold_leaves_a_shuffled_dataloaders_order_alone(when):
    # a DataLoader(shuffle=True) without a generator draws each epoch's order from the global generator, which the
    # fold leaves where the last train step's seeding did; an evaluation's draws (a stream apart) used to be left
    # there instead, so the run shuffled differently from one without with_eval
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(24, 10, generator=g), torch.randint(0, 3, (24,), generator=g))

    eval_step = fl.make_eval_step(noisy_classification)

    def trained(evaluated):
        step, observers = core(), []
        if evaluated and isinstance(when, dict):
            step = with_eval(step, data=val_data(), loss_fn=noisy_classification, **when)
        elif evaluated:
            alone = when == "observer calls eval_step"
            observers = [
                fl.Observer(lambda s, m: eval_step(s, val_data()[0]) if alone else fl.evaluate(eval_step, s, val_data()), steps=3)
            ]
        torch.manual_seed(0)
        loader = DataLoader(dataset, batch_size=8, shuffle=True)
        return fl.fold(step, step.init(seed=0), loader, epochs=3, progress=False, observers=observers)

    plain, evaluated = trained(False), trained(True)
    assert all(torch.equal(plain.params[k], evaluated.params[k]) for k in plain.params)


@pytest.mark.parametrize("shuffle", [False, True])
def test_iterating_a_validation_dataloader_leaves_the_global_generator_alone(shuffle):
    # iter(DataLoader) draws its workers' base seed (and a shuffled one its order) from the global generator: evaluate
    # iterated its data outside the seeded region, so an epoch-end evaluation over a validation DataLoader changed the
    # next epoch's order of a shuffled training DataLoader, and a standalone evaluate advanced the caller's generator
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(24, 10, generator=g), torch.randint(0, 3, (24,), generator=g))
    x, y = (torch.cat(t) for t in zip(*val_data()))
    val = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=shuffle)

    def trained(evaluated):
        step = with_eval(core(), data=val, loss_fn=fl.losses.classification, at_epoch_end=True) if evaluated else core()
        torch.manual_seed(0)
        loader = DataLoader(dataset, batch_size=8, shuffle=True)
        return fl.fold(step, step.init(seed=0), loader, epochs=3, progress=False)

    plain, evaluated = trained(False), trained(True)
    assert all(torch.equal(plain.params[k], evaluated.params[k]) for k in plain.params)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fl.evaluate(fl.make_eval_step(fl.losses.classification), plain, val)
    assert torch.equal(torch.rand(3), expected)


def noisy_classification(model, batch):
    x, y = batch
    return fl.losses.classification(model, (x + 0.1 * torch.randn_like(x), y))


@pytest.mark.parametrize("mode", ["mixed", "true"])
def test_evaluates_in_the_precision_of_an_inner_amp(mode):
    val = val_data()
    step = with_eval(fl.with_amp(core(), dtype="bf16", mode=mode), data=val, loss_fn=fl.losses.classification, every=1)
    state, metrics = step(step.init(), make_batches(1, batch=8)[0])
    eval_step = fl.make_eval_step(fl.losses.classification)
    if mode == "true":
        cast = [(x.to(torch.bfloat16), y) for x, y in val]
        expected = fl.evaluate(eval_step, state, cast)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = fl.evaluate(eval_step, state, val)
    assert metrics["val/loss"].item() == expected["loss"]


BAD = [
    (dict(every=1), ValueError, "exactly one of eval_step"),
    (dict(loss_fn=fl.losses.mse, eval_step=fl.make_eval_step(fl.losses.mse), every=1), ValueError, "exactly one of eval_step"),
    (dict(eval_step="loss", every=1), TypeError, "eval_step must be callable"),
    (dict(loss_fn=3, every=1), TypeError, "loss_fn must be callable"),
    (dict(data=iter(val_data()), loss_fn=fl.losses.mse, every=1), TypeError, "one-shot iterator"),
    (dict(data=(b for b in val_data()), loss_fn=fl.losses.mse, every=1), TypeError, "one-shot iterator"),
    (dict(data=5, loss_fn=fl.losses.mse, every=1), TypeError, "data must be a re-iterable"),
    (dict(data=[], loss_fn=fl.losses.mse, every=1), ValueError, "data is empty"),
    (dict(loss_fn=fl.losses.mse), ValueError, "say when to evaluate"),
    (dict(loss_fn=fl.losses.mse, every=0), ValueError, "every must be an int >= 1"),
    (dict(loss_fn=fl.losses.mse, every=2.0), ValueError, "every must be an int >= 1"),
    (dict(loss_fn=fl.losses.mse, every=True), ValueError, "every must be an int >= 1"),
    (dict(loss_fn=fl.losses.mse, at_epoch_end="yes"), TypeError, "at_epoch_end must be a bool"),
    (dict(loss_fn=fl.losses.mse, every=1, prefix=None), TypeError, "prefix must be a str"),
    (dict(loss_fn=fl.losses.mse, every=1, prefix=""), ValueError, "prefix must not be empty"),
    (dict(loss_fn=fl.losses.mse, every=1, batch_size_fn=8), TypeError, "batch_size_fn must be callable"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD, ids=[m + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_options_are_rejected_at_build_time(options, error, match):
    options = {"data": val_data(), **options}
    with pytest.raises(error, match=match):
        with_eval(core(), **options)


def test_not_a_step_and_wrong_order_are_rejected():
    with pytest.raises(TypeError, match="expected a train step"):
        with_eval(mlp(), data=val_data(), loss_fn=fl.losses.mse, every=1)
    with pytest.raises(ValueError, match="cannot wrap a step already wrapped by with_early_stop"):
        with_eval(with_early_stop(core(), monitor="loss"), data=val_data(), loss_fn=fl.losses.mse, every=1)
    with pytest.raises(ValueError, match="already wrapped by with_eval"):
        step = with_eval(core(), data=val_data(), loss_fn=fl.losses.mse, every=1)
        with_eval(step, data=val_data(), loss_fn=fl.losses.mse, every=1)


def test_epoch_end_evaluation_reaches_the_fold_metrics():
    import torch

    import fnlight as fl
    from fnlight.transforms._eval import with_eval

    torch.manual_seed(0)
    core = fl.make_train_step(torch.nn.Linear(3, 2), fl.losses.cross_entropy, fl.optim.sgd(0.1))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    step = with_eval(core, data=data, loss_fn=fl.losses.cross_entropy, at_epoch_end=True)
    seen = []
    fl.fold(
        step, step.init(), data, epochs=2, progress=False, observers=[fl.Observer(lambda s, m: seen.append(sorted(m)), steps=100)]
    )
    assert seen == [["loss", "val/loss"]]


def test_a_metric_some_batches_report_is_averaged_over_theirs():
    state = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1)).init()
    data = [(torch.zeros(3, 2), torch.zeros(3, 1)), (torch.zeros(8, 2), torch.zeros(8, 1))]

    def eval_step(state, batch):
        first = len(batch[0]) == 3
        return {"a": torch.tensor(2.0 if first else 1.0), **({"b": torch.tensor(4.0)} if first else {})}

    assert fl.evaluate(eval_step, state, data) == {"a": (3 * 2.0 + 8 * 1.0) / 11, "b": 4.0}  # b was 12/11


def test_ignored_targets_weighted_by_the_scored_ones_give_the_concatenated_metric():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    state = fl.make_train_step(model, fl.losses.classification, sgd(0.1)).init()
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randint(0, 3, (40,))
    y[20:38] = -100  # the second batch is mostly padding
    state = state.replace(params={k: v.double() for k, v in state.params.items()})
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    scored = lambda b: int((b[1] != -100).sum())  # the targets the loss and accuracy count
    got = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, batches, batch_size_fn=scored)
    out = torch.func.functional_call(model, state.params, (x,))
    keep = y != -100
    assert got["loss"] == pytest.approx(F.cross_entropy(out, y).item(), abs=1e-12)
    assert got["accuracy"] == pytest.approx((out.argmax(1)[keep] == y[keep]).double().mean().item(), abs=1e-7)  # float32


def test_a_batch_without_scored_targets_is_left_out_not_a_nan():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    state = fl.make_train_step(model, fl.losses.classification, sgd(0.1)).init()
    x, y = torch.randn(30, 8, dtype=torch.float64), torch.randint(0, 3, (30,))
    y[20:] = -100  # the last batch is all padding: its mean loss and accuracy are NaN
    state = state.replace(params={k: v.double() for k, v in state.params.items()})
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    scored = lambda b: int((b[1] != -100).sum())
    got = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, batches, batch_size_fn=scored)
    assert got == fl.evaluate(fl.make_eval_step(fl.losses.classification), state, batches[:2], batch_size_fn=scored)
    out = torch.func.functional_call(model, state.params, (x,))
    assert got["loss"] == pytest.approx(F.cross_entropy(out, y).item(), abs=1e-12)


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        (torch.tensor(3), TypeError, r"number of samples \(an int >= 0\), got a Tensor .*int\(\.\.\.\)"),
        ("3", TypeError, r"number of samples \(an int >= 0\), got '3' from batch_size_fn="),
        (True, TypeError, r"number of samples \(an int >= 0\), got True"),
        (-1, ValueError, r"number of samples \(an int >= 0\), got -1 from batch_size_fn="),
    ],
)
def test_evaluate_checks_what_batch_size_fn_returns(returned, error, match):
    state = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1)).init()
    with pytest.raises(error, match=match):
        data = [(torch.zeros(2, 2), torch.zeros(2, 1))]
        fl.evaluate(fl.make_eval_step(fl.losses.mse), state, data, batch_size_fn=lambda b: returned)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0.5, r"metric 'loss' must be a 0-d tensor, got float: 0\.5 from eval_step="),
        (torch.ones(3), r"got a tensor of shape \(3,\)"),
    ],
)
def test_evaluate_names_a_metric_that_is_not_a_0d_tensor(value, match):
    state = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1)).init()
    with pytest.raises(TypeError, match=match):
        fl.evaluate(lambda s, b: {"loss": value}, state, [(torch.zeros(2, 2), torch.zeros(2, 1))])


def test_an_evaluation_over_data_without_a_length_that_yields_nothing_is_refused_not_silent():
    # emptiness of an iterable-style DataLoader is known only at the first evaluation, which merged no metrics: the
    # run trained on with no val/ metrics and a with_early_stop on val/loss never checked (a warning at the end)
    from torch.utils.data import DataLoader, IterableDataset

    class Empty(IterableDataset):
        def __iter__(self):
            return iter([])

    batch = (torch.randn(4, 10), torch.randint(0, 3, (4,)))
    step = with_eval(core(), data=DataLoader(Empty(), batch_size=2), loss_fn=fl.losses.classification, every=1)
    with pytest.raises(ValueError, match=r"evaluation after update 1 gave no metrics: data \(DataLoader\) yielded no batch"):
        step(step.init(), batch)
    weightless = with_eval(core(), data=val_data(), loss_fn=fl.losses.classification, every=1, batch_size_fn=lambda b: 0)
    with pytest.raises(ValueError, match="batch_size_fn weighed every batch 0 samples"):
        fl.fold(weightless, weightless.init(), [batch], progress=False)


def test_with_eval_refuses_a_train_step_as_eval_step_when_built():
    core = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1))
    with pytest.raises(TypeError, match=r"with_eval: eval_step is a train step \(TrainStep\(mse, Linear\)\), which would train"):
        with_eval(core, data=[(torch.zeros(2, 2), torch.zeros(2, 1))], eval_step=core, every=1)


def test_an_evaluation_keeps_a_submodule_the_user_froze_frozen_for_the_train_steps_after_it():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 3))
        model[1].eval()  # a frozen BatchNorm: its running statistics stay as loaded
        model[2].eval()  # and a dropout switched off
        return fl.make_train_step(model, fl.losses.classification, sgd(0.1))

    data = make_batches(4)
    plain = build()
    without = fl.fold(plain, plain.init(), data, progress=False)
    evaluated = with_eval(build(), data=val_data(), loss_fn=fl.losses.classification, every=1)
    state = fl.fold(evaluated, evaluated.init(), data, progress=False)
    assert fl.tree_equal(state.params, without.params) and fl.tree_equal(state.buffers, without.buffers)
    assert torch.equal(state.buffers["1.running_mean"], torch.zeros(16))  # never updated (was: after the first evaluation)
    modes = [m.training for m in state.skeleton.modules()]
    fl.evaluate(fl.make_eval_step(fl.losses.classification), state, val_data())
    assert [m.training for m in state.skeleton.modules()] == modes == [True, True, False, False, True]
