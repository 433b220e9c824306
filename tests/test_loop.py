"""fold (donation, epochs, max_steps, stop, resume position, observers, progress) and evaluate."""

import io
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnlight as fl
from fnlight.optim import adamw
from tests.conftest import SignalledData, make_batches, make_bn_mlp


def make_step(dropout=0.0):
    return fl.make_train_step(make_bn_mlp(dropout=dropout), fl.losses.cross_entropy, adamw(1e-2))


def test_fold_leaves_input_state_untouched(batches):
    step = make_step()
    state = step.init()
    before = fl.tree_clone(state)
    out = fl.fold(step, state, batches, epochs=2, progress=False)
    assert fl.tree_equal(state, before)
    assert int(out.step) == 16
    step(state, batches[0])  # still usable


def test_fold_equals_direct_step_calls(batches):
    step = make_step(dropout=0.2)
    state = step.init(seed=5)
    direct = state
    for b in batches * 2:
        direct, _ = step(direct, b)
    folded = fl.fold(step, state, batches, epochs=2, progress=False)
    assert fl.tree_equal(folded.params, direct.params)
    assert fl.tree_equal(folded.opt_state, direct.opt_state)
    assert fl.tree_equal(folded.buffers, direct.buffers)


def test_donate_true_consumes_input(batches):
    step = make_step()
    state = step.init()
    fl.fold(step, state, batches, progress=False, donate=True)
    with pytest.raises(fl.DonatedStateError, match="fold: this TrainState was donated"):
        fl.fold(step, state, batches, progress=False)
    with pytest.raises(fl.DonatedStateError, match="train step: this TrainState was donated"):
        step(state, batches[0])


def test_donating_an_init_state_never_writes_into_the_model_or_other_states(batches):
    step = make_step()
    model = step.core._model
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    other = step.init()  # shares the model's tensors too
    out = fl.fold(step, step.init(), batches, progress=False, donate=True)
    assert int(out.step) == 8 and not fl.tree_equal(out.params, other.params)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(t.detach(), before[name]), name
    assert fl.tree_equal(other.params, {n: before[n] for n in other.params})
    assert fl.tree_equal(step.init().buffers, {n: before[n] for n in other.buffers})
    # the returned state owns its tensors: a second donating fold updates them in place, copying nothing
    weights = {n: p.data_ptr() for n, p in out.params.items()}
    again = fl.fold(step, out, batches, epochs=2, progress=False, donate=True)
    assert {n: p.data_ptr() for n, p in again.params.items()} == weights
    # and the donating fold equals the pure one
    pure = fl.fold(step, step.init(), batches, epochs=2, progress=False)
    assert fl.tree_equal(again.params, pure.params) and fl.tree_equal(again.buffers, pure.buffers)


def test_donate_model_trains_the_model_in_place_with_no_copy(batches):
    step = make_step()
    model = step.core._model
    state = step.init()
    weights = {n: p.data_ptr() for n, p in state.params.items()}
    out = fl.fold(step, state, batches, progress=False, donate="model")
    assert {n: p.data_ptr() for n, p in out.params.items()} == weights  # the model's own tensors, trained in place
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), out.params[name]), name
    pure = fl.fold(make_step(), make_step().init(), batches, progress=False)
    assert fl.tree_equal(out.params, pure.params)
    with pytest.raises(ValueError, match=r"fold: donate must be True, False or 'model', got 'yes'"):
        fl.fold(step, step.init(), batches, progress=False, donate="yes")


def test_reusing_an_intermediate_state_raises(batches):
    kept = []
    step = make_step()
    fl.fold(step, step.init(), batches, progress=False, observers=[fl.Observer(lambda s, m: kept.append(s), steps=2)])
    assert len(kept) == 4
    with pytest.raises(fl.DonatedStateError, match="was donated to an in-place update"):
        step(kept[0], batches[0])
    for fn in (fl.to_module, fl.state_dict):
        with pytest.raises(fl.DonatedStateError):
            fn(kept[0])
    with pytest.raises(fl.DonatedStateError, match="evaluate"):
        fl.evaluate(fl.make_eval_step(fl.losses.cross_entropy), kept[0], batches)


def test_tree_equal_refuses_a_donated_state(batches):
    kept = []
    step = make_step()
    final = fl.fold(step, step.init(), batches, progress=False, observers=[fl.Observer(lambda s, m: kept.append(s), steps=2)])
    # kept[0] (update 2) holds the final tensors: it compared equal to the state of update 8
    with pytest.raises(fl.DonatedStateError, match="tree_equal: this TrainState was donated"):
        fl.tree_equal(kept[0], final)
    with pytest.raises(fl.DonatedStateError, match="tree_equal: this TrainState was donated"):
        fl.tree_equal({"states": [final]}, {"states": [kept[0]]})
    assert fl.tree_equal(final, fl.tree_clone(final))


def test_observer_copy_survives(batches):
    copies = []
    step = make_step()
    final = fl.fold(
        step,
        step.init(),
        batches,
        epochs=2,
        progress=False,
        observers=[fl.Observer(lambda s, m: copies.append(fl.tree_clone(s)), steps=8)],
    )
    assert [int(c.step) for c in copies] == [8, 16]
    assert fl.tree_equal(copies[-1].params, final.params)
    assert not fl.tree_equal(copies[0].params, final.params)


def test_max_steps_and_epochs(batches):
    step = make_step()
    state = fl.fold(step, step.init(), batches, max_steps=11, progress=False)
    assert int(state.step) == 11 and int(state.data.epoch) == 1 and int(state.data.batch) == 3
    state = fl.fold(step, step.init(), batches, epochs=3, max_steps=100, progress=False)
    assert int(state.step) == 24 and int(state.data.epoch) == 3 and int(state.data.batch) == 0


@pytest.mark.parametrize("data", ["list", "loader", "function"])
def test_max_steps_reached_by_an_epochs_last_batch_still_ends_the_epoch(data):
    x, y = torch.randn(40, 10, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 3
    train = {
        "list": [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)],
        "loader": fl.Loader((x, y), batch_size=8),
        "function": lambda epoch: [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)],
    }[data]

    step = fl.with_eval(make_step(), data=[(x[:6], y[:6])], loss_fn=fl.losses.cross_entropy, at_epoch_end=True)
    step = fl.with_early_stop(step, monitor="val/loss", patience=5)
    by_epochs = fl.fold(step, step.init(), train, epochs=1, progress=False)
    by_steps = fl.fold(step, step.init(), train, max_steps=5, progress=False)  # 5 batches: the whole epoch
    for state in (by_epochs, by_steps):
        assert (int(state.step), int(state.data.epoch), int(state.data.batch)) == (5, 1, 0)
        assert state.slots["early_stop"].best_step == 5  # evaluated and checked at the epoch's end
    assert all(fl.tree_equal(getattr(by_steps, f), getattr(by_epochs, f)) for f in ("params", "opt_state", "slots"))
    whole = fl.fold(step, step.init(), train, epochs=3, progress=False)
    resumed = fl.fold(step, by_steps, train, epochs=3, progress=False)  # no second check of epoch 0
    assert fl.tree_equal(resumed.slots["early_stop"], whole.slots["early_stop"])
    assert fl.tree_equal(resumed.params, whole.params)


@pytest.mark.parametrize(
    ("data", "given"),
    [
        ([], "list of length 0"),
        (fl.Loader((torch.randn(5, 10), torch.zeros(5, dtype=torch.int64)), batch_size=8, drop_last=True), "Loader of length 0"),
        (lambda epoch: [], "list of length 0"),
    ],
)
@pytest.mark.parametrize("bound", [{"max_steps": 5}, {"epochs": 2}])
def test_data_that_yields_no_batches_is_refused_instead_of_looping_forever(data, given, bound):
    step = make_step()
    with pytest.raises(ValueError, match=rf"fold: the data yielded no batches in epoch 0 \({given}\)"):
        fl.fold(step, step.init(), data, progress=False, **bound)


def test_resume_continues_bitwise_and_mid_epoch(batches):
    step = make_step(dropout=0.3)
    whole = fl.fold(step, step.init(seed=2), batches, epochs=3, progress=False)
    part = fl.fold(step, step.init(seed=2), batches, max_steps=13, progress=False)
    assert (int(part.data.epoch), int(part.data.batch)) == (1, 5)
    resumed = fl.fold(step, part, batches, epochs=3, progress=False)
    assert int(resumed.step) == 24
    assert fl.tree_equal(resumed.params, whole.params)
    assert fl.tree_equal(resumed.opt_state, whole.opt_state)


def test_stop_flag_ends_the_fold(batches):
    inner = make_step()

    def stopping(state, batch):
        state, metrics = inner(state, batch)
        return state.replace(stop=state.step >= 5), metrics

    state = fl.fold(stopping, inner.init(), batches, epochs=10, progress=False)
    assert int(state.step) == 5 and bool(state.stop)
    assert int(fl.fold(stopping, state, batches, epochs=10, progress=False).step) == 5


def test_data_as_function_of_epoch(batches):
    seen = []

    def data(epoch):
        seen.append(epoch)
        return batches[:2]

    step = make_step()
    state = fl.fold(step, step.init(), data, epochs=3, progress=False)
    assert seen == [0, 1, 2] and int(state.step) == 6


def test_one_shot_iterator_allowed_for_single_epoch_only(batches):
    step = make_step()
    assert int(fl.fold(step, step.init(), iter(batches), epochs=1, progress=False).step) == 8
    with pytest.raises(ValueError, match="data is a one-shot iterator"):
        fl.fold(step, step.init(), (b for b in batches), epochs=2, progress=False)


def test_observer_schedules_by_updates_and_at_end(batches):
    calls = []
    step = make_step()
    obs = fl.every(3)(lambda s, m: calls.append((int(s.step), float(m["loss"]))))
    fl.fold(step, step.init(), batches, epochs=1, observers=[obs], progress=False)
    assert [c[0] for c in calls] == [3, 6, 8]
    calls.clear()
    fl.fold(
        step,
        step.init(),
        batches,
        epochs=1,
        observers=[fl.Observer(lambda s, m: calls.append(int(s.step)), steps=4, at_end=False)],
        progress=False,
    )
    assert calls == [4, 8]


def test_observer_by_seconds(batches, monkeypatch):
    import fnlight._loop as loop

    clock = iter(range(1000))
    monkeypatch.setattr(loop.time, "monotonic", lambda: float(next(clock)) * 0.6)
    calls = []
    step = make_step()
    fl.fold(
        step,
        step.init(),
        batches,
        observers=[fl.Observer(lambda s, m: calls.append(int(s.step)), seconds=1.0, at_end=False)],
        progress=False,
    )
    assert calls and calls == sorted(set(calls)) and len(calls) < 8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, "fold: epochs must be a positive int or None, got 0"),
        ({"max_steps": 2.5}, ValueError, "fold: max_steps must be a positive int or None, got 2.5"),
        ({"observers": [print]}, TypeError, "observers must be fnlight.Observer"),
        ({"observers": None}, TypeError, "fold: observers must be a list of fnlight.Observer, got None"),
        ({"progress": "no"}, TypeError, "fold: progress must be a bool or None, got 'no'"),
        ({"summary": 1}, TypeError, "fold: summary must be a bool or None, got 1"),
        ({"handle_signals": None}, TypeError, "fold: handle_signals must be a bool, got None"),
    ],
)
def test_fold_validates_options(batches, kwargs, error, match):
    step = make_step()
    with pytest.raises(error, match=match):
        fl.fold(step, step.init(), batches, **{"progress": False, **kwargs})


def test_fold_rejects_non_state_and_non_callable(batches):
    step = make_step()
    with pytest.raises(TypeError, match="fold: expected a fnlight.TrainState, got dict"):
        fl.fold(step, {}, batches)
    with pytest.raises(TypeError, match="fold: step must be callable"):
        fl.fold(None, step.init(), batches)
    with pytest.raises(TypeError, match=r"fold: data must be an iterable of batches .*, got None"):
        fl.fold(step, step.init(), None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give steps=N"),
        ({"steps": 0}, "steps must be a positive int, got 0"),
        ({"seconds": -1}, "seconds must be a positive number, got -1"),
    ],
)
def test_observer_validates_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fl.Observer(print, **kwargs)
    with pytest.raises(TypeError, match="fn must be callable"):
        fl.Observer(None, steps=1)
    with pytest.raises(TypeError, match="Observer: at_end must be a bool, got 'no'"):
        fl.Observer(print, steps=1, at_end="no")


def test_fold_names_a_step_that_does_not_return_a_state_and_metrics(batches):
    step = make_step()
    with pytest.raises(TypeError, match=r"fold: step is an eval step \(make_eval_step\), which returns metrics"):
        fl.fold(fl.make_eval_step(fl.losses.classification), step.init(), batches, progress=False)
    state = step.init()
    with pytest.raises(TypeError, match=r"fold: step must return \(state, metrics\), .* returned a TrainState$"):
        fl.fold(lambda s, b: s, state, batches, progress=False)
    with pytest.raises(TypeError, match=r"step must return \(state, metrics\), .* returned a tuple of 2 \(NoneType, dict\)"):
        fl.fold(lambda s, b: (None, {}), state, batches, progress=False)
    assert int(fl.fold(step, state, batches, progress=False).step) == len(batches)  # the input state is still usable


def test_every_used_bare_names_the_missing_interval():
    def show(state, metrics):
        pass

    with pytest.raises(TypeError, match=r"every: steps must be a positive int, got the function 'show'; write @fl.every\(N\)"):
        fl.every(show)


def test_progress_bar_draws_on_a_terminal(batches, monkeypatch):
    from rich.console import Console

    import fnlight._progress as progress

    buffer = io.StringIO()
    monkeypatch.setattr(progress, "CONSOLE", Console(file=buffer, force_terminal=True, width=120))
    step = make_step()
    fl.fold(step, step.init(), batches, epochs=2, progress=True)
    out = buffer.getvalue()
    assert "step 16/16" in out and "epoch 2" in out and "loss" in out and "steps/s" in out


@pytest.mark.parametrize(("bounds", "shown"), [({"epochs": 2, "max_steps": 1000}, "step 16/16"), ({"max_steps": 5}, "step 5/5")])
def test_the_progress_total_is_the_nearer_bound(batches, monkeypatch, bounds, shown):
    from rich.console import Console

    import fnlight._progress as progress

    buffer = io.StringIO()
    monkeypatch.setattr(progress, "CONSOLE", Console(file=buffer, force_terminal=True, width=120))
    step = make_step()
    fl.fold(step, step.init(), batches, progress=True, **bounds)
    assert shown in buffer.getvalue() and "/1000" not in buffer.getvalue()


def test_a_donated_state_gives_no_copy_through_replace(batches):
    step = make_step()
    state = step.init()
    fl.fold(step, state, batches, progress=False, donate=True)
    with pytest.raises(fl.DonatedStateError, match=r"TrainState\.replace: this TrainState was donated"):
        state.replace(stop=torch.tensor(False))
    with pytest.raises(fl.DonatedStateError, match="was donated"):
        state.with_slot("x", 1)


def test_progress_is_silent_when_not_a_terminal(batches, capsys):
    step = make_step()
    fl.fold(step, step.init(), batches, progress=None)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_evaluate_is_exact_with_uneven_last_batch():
    step = make_step()
    state = fl.fold(step, step.init(), make_batches(4), progress=False)
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(37, 10, generator=g), torch.randint(0, 3, (37,), generator=g)
    data = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 37, 10)]
    result = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, data)
    module = fl.to_module(state)
    with torch.no_grad():
        logits = module(x)
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).double().mean()), rel=1e-7)
    assert fl.evaluate(fl.make_eval_step(fl.losses.classification), state, []) == {}


def test_evaluate_takes_the_batch_size_from_the_first_tensor_as_written_in_a_dict_batch():
    step = make_step()
    state = step.init()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(37, 10, generator=g), torch.randint(0, 3, (37,), generator=g)
    weights = torch.tensor([1.0, 2.0, 0.5])  # sorted keys would put this first: a "batch size" of 3

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"], weight=batch["w"], reduction="sum") / len(batch["x"])

    data = [{"x": x[i : i + 10], "y": y[i : i + 10], "w": weights} for i in range(0, 37, 10)]
    result = fl.evaluate(fl.make_eval_step(loss_fn), state, data)
    with torch.no_grad():
        expected = F.cross_entropy(fl.to_module(state)(x), y, weight=weights, reduction="sum") / 37
    assert result["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_evaluate_needs_a_batch_size():
    step = make_step()
    with pytest.raises(TypeError, match="cannot infer the batch size"):
        fl.evaluate(lambda s, b: {"loss": torch.tensor(1.0)}, step.init(), [{"n": 3}])
    assert fl.evaluate(
        lambda s, b: {"loss": torch.tensor(float(b["n"]))}, step.init(), [{"n": 3}, {"n": 1}], batch_size_fn=lambda b: b["n"]
    ) == {"loss": pytest.approx(2.5)}


def test_donating_a_direct_calls_result_leaves_the_calls_input_where_it_was(batches):
    step = make_step()
    s0 = step.init()
    s1, _ = step(s0, batches[0])  # shares its data position with s0
    fl.fold(step, s1, batches, epochs=2, progress=False, donate=True)
    assert (int(s0.data.epoch), int(s0.data.batch)) == (0, 0)
    assert int(fl.fold(step, s0, batches, epochs=2, progress=False).step) == 16


def test_donation_protects_what_init_lent_even_after_the_model_changes_and_for_parameter_subclasses(batches):
    class Tagged(nn.Parameter):
        pass

    step = make_step()
    model = step.core._model
    model[0].weight = Tagged(model[0].weight.detach().clone())
    step = fl.make_train_step(model, fl.losses.cross_entropy, adamw(1e-2))
    a, b = step.init(), step.init()
    kept = fl.tree_clone(b)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # the model lets go
    fl.fold(step, a, batches, progress=False, donate=True)
    assert fl.tree_equal(b, kept)


def test_a_donated_state_cannot_be_copied_or_saved(batches, tmp_path):
    step = make_step()
    state = step.init()
    fl.fold(step, state, batches, progress=False, donate=True)
    with pytest.raises(fl.DonatedStateError, match="tree_clone: this TrainState was donated"):
        fl.tree_clone(state)
    with pytest.raises(fl.DonatedStateError, match="checkpoint.save: this TrainState was donated"):
        fl.checkpoint.save(tmp_path / "x.ckpt", state)
    accum = fl.with_grad_accum(make_step(), every=2)
    start = accum.init()
    fl.fold(accum, start, batches[:3], progress=False, donate=True)
    with pytest.raises(fl.DonatedStateError, match="with_grad_accum flush: this TrainState was donated"):
        accum.flush(start)


# ---------------------------------------------------------------- resume at an epoch's end under max_steps


def _four_batches() -> list:
    return [(torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), torch.randint(0, 2, (8,))) for i in range(4)]


def _eval_stack(directory, val):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    step = fl.make_train_step(model, fl.losses.classification, fl.optim.sgd(0.1))
    step = fl.with_eval(step, data=val, loss_fn=fl.losses.classification, at_epoch_end=True)
    step = fl.with_early_stop(step, monitor="val/loss", patience=3)  # its record shows whether the epoch end ran
    return fl.with_checkpointing(step, directory=directory, every=4)


def test_a_fold_resumed_where_max_steps_met_the_epochs_last_batch_ends_that_epoch(tmp_path):
    data, val = _four_batches(), [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    step = _eval_stack(tmp_path / "a", val)
    uninterrupted = fl.fold(step, step.init(seed=0), data, epochs=3, max_steps=4, progress=False)

    class Killed(BaseException):  # stands in for a SIGKILL during the epoch-end evaluation
        pass

    def killer(state, batch):
        raise Killed

    step = _eval_stack(tmp_path / "b", val)
    step.inner.inner.eval_step = killer
    with pytest.raises(Killed):  # the checkpoint of update 4 is written inside the step, before the epoch end
        fl.fold(step, step.init(seed=0), data, epochs=3, max_steps=4, progress=False)
    step = _eval_stack(tmp_path / "b", val)  # the same script again
    resumed = step.init(seed=0)
    assert (int(resumed.step), int(resumed.data.epoch), int(resumed.data.batch)) == (4, 0, 4)
    resumed = fl.fold(step, resumed, data, epochs=3, max_steps=4, progress=False)
    assert (int(resumed.data.epoch), int(resumed.data.batch)) == (1, 0)
    assert float(resumed.slots["early_stop"].best) == float(uninterrupted.slots["early_stop"].best) < float("inf")
    drop = lambda s: s.replace(slots={k: v for k, v in s.slots.items() if k != "checkpointing"})  # paths differ
    assert fl.tree_equal(drop(resumed), drop(uninterrupted))


def test_a_signal_during_the_epoch_end_that_max_steps_runs_preempts_and_saves(tmp_path):
    class Val:  # validation data whose iteration receives the SIGTERM (from SLURM, say)
        def __len__(self):
            return 1

        def __iter__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            yield torch.randn(8, 4), torch.randint(0, 2, (8,))

    step = _eval_stack(tmp_path, Val())
    with pytest.raises(fl.Preempted, match=r"SIGTERM received; stopped after update 4 \(epoch index 1, 0 batches into") as info:
        fl.fold(step, step.init(seed=0), _four_batches(), epochs=2, max_steps=4, progress=False)
    assert int(info.value.state.step) == 4 and int(info.value.state.data.epoch) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000000004.ckpt"]


def test_a_flush_update_carries_the_last_micro_batchs_metrics_when_the_fold_saw_it(tmp_path):
    class Data:
        def __init__(self, sigint_at=None):
            self.sigint_at = sigint_at

        def __len__(self):
            return 5

        def __iter__(self):
            for i in range(5):
                if i + 1 == self.sigint_at:
                    os.kill(os.getpid(), signal.SIGINT)
                g = torch.Generator().manual_seed(i)
                yield torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        return fl.with_grad_accum(fl.make_train_step(model, fl.losses.classification, fl.optim.sgd(0.1)), every=3)

    def observer(log):
        return fl.every(1, at_end=False)(lambda s, m: log.append((int(s.step), sorted(m))))

    full: list = []
    step = build()
    fl.fold(step, step.init(seed=0), Data(), epochs=1, observers=[observer(full)], progress=False)
    step = build()
    with pytest.raises(fl.Preempted) as info:
        fl.fold(step, step.init(seed=0), Data(sigint_at=5), epochs=1, progress=False)
    fl.checkpoint.save(tmp_path / "p.ckpt", info.value.state)
    step = build()
    resumed: list = []
    restored = fl.checkpoint.restore(tmp_path / "p.ckpt", step.init(seed=0))
    fl.fold(step, restored, Data(), epochs=1, observers=[observer(resumed)], progress=False)
    # the epoch-end window's update carries the last micro-batch's metrics too, which a fold resumed after that
    # micro-batch never saw (documented in transforms.md); the states are the same
    assert full == [(1, ["accuracy", "loss"]), (2, ["accuracy", "loss"])]
    assert resumed == [(2, ["loss"])]


def test_tree_equal_compares_skeletons_by_structure():
    step = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    a, b = step.init(), step.init()
    assert a.skeleton is not b.skeleton and fl.tree_equal(a, b)
    other = fl.make_train_step(nn.Sequential(nn.Linear(2, 1)), fl.losses.mse, fl.optim.sgd(0.1)).init()
    assert not fl.tree_equal(a, other)
    wider = fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1)).init()
    assert not fl.tree_equal(a, wider)


def test_max_steps_mid_epoch_over_data_without_a_length():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(10):
                yield torch.randn(4, generator=g), torch.randn(1, generator=g)

    data = torch.utils.data.DataLoader(Stream(), batch_size=2)  # len(data) raises TypeError
    step = fl.make_train_step(nn.Linear(4, 1), fl.losses.mse, fl.optim.sgd(0.1))
    state = fl.fold(step, step.init(), data, max_steps=3, progress=False)
    assert int(state.step) == 3 and int(state.data.batch) == 3


def test_the_progress_bar_draws_on_stderr_and_leaves_stdout_to_the_program(capsys):
    step = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    fl.fold(step, step.init(), [(torch.zeros(3, 2), torch.zeros(3, 1))] * 5, progress=True, summary=False)
    out, err = capsys.readouterr()
    assert out == "" and "step 5/5" in err


def test_a_data_parallel_folds_ranks_stop_on_the_signal_they_agreed_on_not_their_own():
    """The fold's signal watch under with_ddp/with_fsdp on several ranks (the 2-rank runs: test_distributed.py)."""
    from fnlight import _signals

    cpu = torch.device("cpu")
    assert float(_signals.signal_flag(cpu)) == 0.0  # no fold watching: nothing to share
    with _signals.SignalWatch(True, agree=True) as watch:
        assert watch.stop is None and float(_signals.signal_flag(cpu)) == 0.0
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.received == signal.SIGINT and watch.stop is None  # not before the ranks agree
        assert float(_signals.signal_flag(cpu)) == 1.0
        _signals.agree(torch.zeros(1))
        assert watch.stop is None
        _signals.agree(torch.full((1,), 0.5))  # the all-reduced mean of the ranks' flags
        assert watch.stop == signal.SIGINT
    with _signals.SignalWatch(True, agree=True) as watch:
        _signals.agree(torch.full((1,), 0.5))  # another rank's signal
        assert watch.received is None and watch.stop == signal.SIGTERM
    with _signals.SignalWatch(True) as watch:  # one process: its own signal, at once
        _signals.agree(torch.ones(1))
        assert watch.stop is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.stop == signal.SIGTERM
    assert float(_signals.signal_flag(cpu)) == 0.0  # the watch is gone with its block


def test_a_data_parallel_watch_that_handles_no_signals_follows_the_agreement_and_inner_watches_do_nothing():
    from fnlight import _signals

    previous = signal.getsignal(signal.SIGTERM)
    with _signals.SignalWatch(False, agree=True) as watch:  # fold(handle_signals=False) on one rank
        assert signal.getsignal(signal.SIGTERM) is previous  # no handler of its own
        _signals.agree(torch.full((1,), 0.5))
        assert watch.stop == signal.SIGTERM
    with _signals.SignalWatch(True) as outer:
        with _signals.SignalWatch(True) as inner:  # a fold inside a fold (an observer's probe, say)
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner.stop is None and outer.received == signal.SIGTERM
            inner.settle()  # inert: no collective
        assert outer.stop == signal.SIGTERM


def test_a_signal_inside_a_nested_fold_stops_the_outer_fold_with_its_checkpoint(tmp_path):
    probe = fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, fl.optim.sgd(0.1))
    signalled = SignalledData(make_batches(3, 8), at=1, signum=signal.SIGTERM)

    @fl.every(2, at_end=False)
    def fit_probe(state, metrics):
        inner = fl.fold(probe, probe.init(), signalled, progress=False)  # finishes: the signal is the outer fold's
        assert int(inner.step) == 3

    step = fl.with_checkpointing(
        fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, fl.optim.sgd(0.1)), directory=tmp_path, every=100
    )
    with pytest.raises(fl.Preempted, match=r"SIGTERM received; stopped after update 2 .* saved .*step-000000002\.ckpt"):
        fl.fold(step, step.init(), make_batches(6, 8), observers=[fit_probe], progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the late read is for accelerators")
def test_ranks_read_an_accelerators_agreed_signal_one_update_late():
    from fnlight import _signals

    with _signals.SignalWatch(True, agree=True) as watch:
        _signals.agree(torch.ones(1, device="cuda"))
        assert watch.stop is None  # copied to the host without waiting; read at the next update
        _signals.agree(torch.zeros(1, device="cuda"))
        assert watch.stop == signal.SIGTERM


class _SignalOnIteration:
    """Validation data whose iteration receives a SIGTERM (from SLURM, say): the fold is at an epoch end."""

    def __len__(self):
        return 1

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        yield torch.randn(8, 4), torch.randint(0, 2, (8,))


def test_a_signal_during_an_epoch_end_preempts_naming_the_update_and_the_checkpoint(tmp_path):
    step = _eval_stack(tmp_path, _SignalOnIteration())
    with pytest.raises(
        fl.Preempted,
        match=r"SIGTERM received; stopped after update 4 \(epoch index 1, 0 batches into it\).* saved .*step-000000004\.ckpt",
    ):
        fl.fold(step, step.init(seed=0), _four_batches(), epochs=2, progress=False)


def test_a_signal_during_the_epoch_end_a_resumed_fold_runs_at_max_steps_preempts(tmp_path):
    data, val = _four_batches(), [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]

    class Killed(BaseException):  # stands in for a SIGKILL during the epoch-end evaluation
        pass

    def killer(state, batch):
        raise Killed

    step = _eval_stack(tmp_path, val)
    step.inner.inner.eval_step = killer
    with pytest.raises(Killed):  # the checkpoint of update 4 is written inside the step, before the epoch end
        fl.fold(step, step.init(seed=0), data, epochs=3, max_steps=4, progress=False)
    step = _eval_stack(tmp_path, _SignalOnIteration())  # the same script again, preempted at the resumed epoch end
    with pytest.raises(fl.Preempted, match=r"SIGTERM received; stopped after update 4 \(epoch index 1, 0 batches into it\)"):
        fl.fold(step, step.init(seed=0), data, epochs=3, max_steps=4, progress=False)


def test_a_state_without_a_transforms_slot_is_refused_by_name(batches):
    core = make_step()
    step = fl.with_ema(fl.with_grad_accum(core, every=2), decay=0.9)
    with pytest.raises(ValueError, match=r"fold: the state has no 'ema' slot, where with_ema keeps its record \(it has none\)"):
        fl.fold(step, core.init(), batches, progress=False)
    state = core.init()
    for layer in (step, step.inner):  # the documented way to adopt a state
        state = state.with_slot(layer.slot, layer.init_slot(state))
    fl.fold(step, state, batches, progress=False)
