"""with_tracking: windowed means, lr and throughput, one event per N updates, run ids in the state."""

import signal

import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, linear
from tests.conftest import SignalledData, make_batches


class Recorder:
    """A tracker that keeps everything in memory."""

    def __init__(self):
        self.events, self.opened, self.closed, self.hparams = [], [], 0, None

    def open(self, run_id="", *, hparams=None):
        self.opened.append(run_id)
        self.hparams = hparams
        return run_id or "run-1"

    def log_scalars(self, step, scalars):
        self.events.append((step, dict(scalars)))

    def log_hparams(self, hparams):
        self.hparams = hparams

    def close(self):
        self.closed += 1


def build(tracker, every=2, accum=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    step = fl.make_train_step(model, fl.losses.classification, adamw(linear(1e-2, 0.0, 100)))
    if accum:
        step = fl.with_grad_accum(step, every=accum)
    return fl.with_tracking(step, trackers=[tracker], every=every, hparams={"lr": 1e-2})


def test_logs_window_means_every_n_updates_with_lr_and_throughput():
    tracker = Recorder()
    step = build(tracker, every=2)
    batches = make_batches(5)
    direct = fl.make_train_step(build(Recorder()).core._model, fl.losses.classification, adamw(linear(1e-2, 0.0, 100)))
    losses, state = [], direct.init()
    for b in batches:
        state, m = direct(state, b)
        losses.append(float(m["loss"]))
    final = fl.fold(step, step.init(), batches, progress=False)
    assert [s for s, _ in tracker.events] == [2, 4, 5]
    first = tracker.events[0][1]
    assert first["loss"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-6)
    assert first["lr"] == pytest.approx(1e-2 * 0.99)
    assert first["throughput/steps_per_s"] > 0 and first["throughput/samples_per_s"] > 0
    assert {"accuracy", "epoch"} <= set(first)
    assert tracker.opened == [""] and tracker.closed == 1 and tracker.hparams == {"lr": 1e-2}
    assert final.slots["tracking"].run_ids == ("run-1",)


@pytest.mark.parametrize("every", [1, 3])
def test_logged_values_are_the_metrics_of_their_update_even_if_a_tensor_changes_later(every):
    """every=1 reads the step's own metric tensors (no copy); every>1 copies them into the window."""
    counter = torch.zeros(())

    class Counting:
        core = None

        def __init__(self, inner):
            self.inner, self.core = inner, inner.core

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, state, batch):
            state, metrics = self.inner(state, batch)
            counter.add_(1.0)  # the same tensor, changed in place after every update
            return state, {**metrics, "count": counter}

    tracker = Recorder()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    core = fl.make_train_step(model, fl.losses.classification, adamw(1e-2))
    step = fl.with_tracking(Counting(core), trackers=[tracker], every=every)
    fl.fold(step, step.init(), make_batches(6), progress=False)
    counts = [e["count"] for _, e in tracker.events]
    assert counts == ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0] if every == 1 else [2.0, 5.0])  # means of 1-3 and 4-6


def test_steps_are_optimizer_updates_under_accumulation():
    tracker = Recorder()
    step = build(tracker, every=1, accum=2)
    fl.fold(step, step.init(), make_batches(6), progress=False)
    assert [s for s, _ in tracker.events] == [1, 2, 3]


def test_a_resumed_state_reopens_the_same_run():
    tracker = Recorder()
    step = build(tracker, every=2)
    state = fl.fold(step, step.init(), make_batches(4), progress=False)
    again = Recorder()
    fl.fold(build(again, every=2), state, make_batches(4), epochs=2, progress=False)
    assert again.opened == ["run-1"]
    assert [s for s, _ in again.events] == [6, 8]


def failing(batches, at):
    """The batches, with the data raising when the fold asks for batch ``at``."""
    yield from batches[:at]
    raise OSError("the data's disk went away")


def test_a_fold_that_raises_closes_the_runs_and_a_fresh_state_then_starts_a_new_run():
    tracker = Recorder()
    step = build(tracker, every=2)
    with pytest.raises(OSError, match="disk went away"):
        fl.fold(step, step.init(), failing(make_batches(6), 5), progress=False)
    assert tracker.closed == 1 and [s for s, _ in tracker.events] == [2, 4]  # logged before the error, kept; 5 dropped
    state = fl.fold(step, step.init(), make_batches(2), progress=False)  # fixed and run again, on the same step
    assert tracker.opened == ["", ""] and [s for s, _ in tracker.events][2:] == [2]  # a new run, not the failed one's
    again = fl.fold(step, state, make_batches(2), epochs=2, progress=False)  # a state with its run id continues it
    assert tracker.opened == ["", "", "run-1"] and int(again.step) == 4


def test_a_fold_that_raises_lets_an_async_checkpoint_land_and_notes_a_failing_abort(tmp_path):
    class Failing(Recorder):
        def close(self):
            super().close()
            raise RuntimeError("aim repository locked")

    tracker = Failing()
    core = build(tracker, every=1)
    step = fl.with_checkpointing(core, directory=tmp_path, every=2, async_write=True)
    with pytest.raises(OSError, match="disk went away") as caught:
        fl.fold(step, step.init(), failing(make_batches(6), 4), progress=False)
    assert tracker.closed == 1 and any("aim repository locked" in note for note in caught.value.__notes__)
    assert step._writer is None and (tmp_path / "step-000000004.ckpt").exists()  # the write of update 4 landed
    restored = fl.checkpoint.restore(tmp_path / "step-000000004.ckpt", step.init())
    assert int(restored.step) == 4


@pytest.mark.parametrize("every", [1, 2])
def test_a_step_reopens_the_runs_a_fold_or_close_closed_before_it_logs(every):
    # the run ids are checked only when the state's slots change: a fold that closed the runs must not leave the next
    # fold, on the same slots, logging into a closed tracker
    class Strict(Recorder):
        is_open = False

        def open(self, run_id="", *, hparams=None):
            self.is_open = True
            return super().open(run_id, hparams=hparams)

        def log_scalars(self, step, scalars):
            assert self.is_open, "logged into a closed run"
            super().log_scalars(step, scalars)

        def close(self):
            self.is_open = False
            super().close()

    tracker = Strict()
    step = build(tracker, every=every)
    state = fl.fold(step, step.init(), make_batches(4), progress=False)
    state = fl.fold(step, state, make_batches(4), epochs=2, progress=False)
    for batch in make_batches(2):  # direct calls hand the same slots from step to step, and across the close
        state, _ = step(state, batch)
        step.close()
    assert tracker.opened == ["", "run-1", "run-1", "run-1"] and tracker.closed == 4
    assert [s for s, _ in tracker.events] == list(range(every, 11, every))
    assert state.slots["tracking"].run_ids == ("run-1",)


def test_metrics_that_come_and_go_are_averaged_over_their_own_steps():
    from fnlight.transforms._tracking import _Window

    window = _Window()
    window.add({"loss": torch.tensor(1.0)}, 4)
    window.add({"loss": torch.tensor(3.0), "val/loss": torch.tensor(5.0, dtype=torch.float64)}, 4)
    window.add({"loss": torch.tensor(5.0)}, 4)
    assert window.read() == {"loss": 3.0, "val/loss": 5.0}
    assert window.read() == {}


def test_window_sums_each_metric_in_its_own_dtype_at_least_float32():
    from fnlight.transforms._tracking import _Window

    window = _Window()
    values = [0.1, 0.2, 0.7, 1 / 3]
    for v in values:
        window.add({"half": torch.tensor(v, dtype=torch.bfloat16), "double": torch.tensor(v, dtype=torch.float64)}, 1)
    assert [t.dtype for t in window.sums] == [torch.float32, torch.float64]
    means = window.read()
    assert means["double"] == sum(values) / 4  # float64 metrics: summed in float64, as a hand-written loop would
    assert means["half"] == pytest.approx(sum(float(torch.tensor(v, dtype=torch.bfloat16)) for v in values) / 4, rel=1e-7)


def test_a_window_of_one_call_does_not_keep_tensors_that_a_later_step_writes_in_place():
    from fnlight.transforms._tracking import _Window

    norm = torch.tensor(2.0)  # like ClipState.norm, which a donating fold overwrites at the next update
    window = _Window()
    window.add({"grad_norm": norm}, 1)
    norm.fill_(5.0)
    window.add({"grad_norm": norm}, 1)
    assert window.read() == {"grad_norm": 3.5}


def test_the_lr_is_looked_up_again_when_the_optimizer_state_changes():
    tracking = build(Recorder())
    adam_only = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, adamw(0.5)).init().opt_state
    chained = (
        fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, fl.optim.chain(fl.optim.clip_by_global_norm(1.0), adamw(0.25)))
        .init()
        .opt_state
    )
    assert tracking._lr(chained) == 0.25 and tracking._lr(adam_only) == 0.5 and tracking._lr(chained) == 0.25
    assert tracking._lr(()) is None and tracking._lr((adam_only,)) == 0.5
    assert tracking._lr((adam_only.count,)) is None  # same type and length, no lr where it was: looked up again


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"trackers": [object()]}, TypeError, "each tracker needs open\\(\\), log_scalars\\(\\) and close\\(\\); got object"),
        ({"trackers": [], "every": 0}, ValueError, "every must be an int >= 1, got 0"),
        ({"trackers": [], "hparams": [1]}, TypeError, r"with_tracking: hparams must be a mapping of str -> value, got list"),
        (
            {"trackers": [], "hparams": {"dtype": torch.float32}},
            TypeError,
            r"with_tracking: hparams\['dtype'\] is a dtype \(torch.float32\): hyperparameters must be None, bool",
        ),
        ({"trackers": [], "hparams": {"lr": float("nan")}}, ValueError, r"hparams\['lr'\] is nan: .* must be finite"),
        ({"trackers": None}, TypeError, r"with_tracking: trackers must be a list of trackers .*, got None"),
        ({"trackers": Recorder()}, TypeError, r"with_tracking: trackers must be a list of trackers .*, got <"),
        ({"trackers": [], "batch_size_fn": 3}, TypeError, r"batch_size_fn must be callable batch -> number of samples, got 3"),
        ({"trackers": [], "close_on_finish": "never"}, TypeError, r"close_on_finish must be a bool, got 'never'"),
    ],
)
def test_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        fl.with_tracking(fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, adamw(1e-2)), **kwargs)


def test_current_lr_finds_the_optimizer_lr():
    opt = fl.optim.chain(fl.optim.clip_by_global_norm(1.0), adamw(0.25))
    state = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, opt).init()
    assert fl.current_lr(state.opt_state) == 0.25
    assert fl.current_lr(()) is None


def test_under_streaming_accumulation_a_window_averages_its_updates_not_its_micro_batches():
    tracker = Recorder()
    step = build(tracker, every=2, accum=2)
    batches = make_batches(8)
    per_update, state = [], step.init()
    for b in batches:  # the loss an update reports is its accumulation window's mean
        state, m = step.inner(state, b)
        if int(state.slots["grad_accum"].count) == 0:
            per_update.append(float(m["loss"]))
    fl.fold(step, step.init(), batches, progress=False)
    assert [s for s, _ in tracker.events] == [2, 4]
    for (_, scalars), pair in zip(tracker.events, (per_update[:2], per_update[2:]), strict=True):
        assert scalars["loss"] == pytest.approx(sum(pair) / 2, rel=1e-6)
        assert scalars["throughput/samples_per_s"] > 0


def test_an_epoch_end_evaluation_is_logged_at_the_update_it_follows():
    tracker = Recorder()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    core = fl.make_train_step(model, fl.losses.classification, adamw(1e-2))
    evaluated = fl.with_eval(core, data=make_batches(2, seed=5), loss_fn=fl.losses.classification, at_epoch_end=True)
    step = fl.with_tracking(evaluated, trackers=[tracker], every=3)
    state = fl.fold(step, step.init(), make_batches(4), epochs=2, progress=False)
    val = [(s, scalars["val/loss"]) for s, scalars in tracker.events if "val/loss" in scalars]
    assert [s for s, _ in val] == [4, 8]
    expected = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, make_batches(2, seed=5))["loss"]
    assert val[-1][1] == pytest.approx(expected)
    assert [s for s, scalars in tracker.events if "loss" in scalars] == [3, 6, 8]


def test_throughput_counts_the_folds_time_not_the_time_before_it_and_the_last_window_keeps_its_epoch(monkeypatch):
    import fnlight.transforms._tracking as tracking

    clock = [0.0]
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: clock[0])
    tracker = Recorder()
    step = build(tracker, every=4)

    class Ticking:  # one second per step
        def __init__(self, data):
            self.data = data

        def __iter__(self):
            for b in self.data:
                clock[0] += 1.0
                yield b

        def __len__(self):
            return len(self.data)

    state = step.init()
    clock[0] = 1000.0  # a long pause (a restore, an evaluation, a notebook) before the fold
    state = fl.fold(step, state, Ticking(make_batches(6)), progress=False)
    clock[0] += 500.0  # and between folds
    fl.fold(step, state, Ticking(make_batches(6)), epochs=2, progress=False)
    first, partial, second = tracker.events[0][1], tracker.events[1][1], tracker.events[2][1]
    assert first["throughput/steps_per_s"] == pytest.approx(4 / 3)  # started at the first step: 3 ticks later, 4 updates
    assert second["throughput/steps_per_s"] == pytest.approx(2 / 1)
    assert [s for s, _ in tracker.events] == [4, 6, 8, 12]
    assert partial["epoch"] == 0.0  # updates 5 and 6 were epoch 0's, though the fold has moved to epoch 1


def test_an_epoch_end_evaluation_after_a_short_accumulation_window_is_logged_at_that_update():
    tracker = Recorder()
    step = fl.with_grad_accum(build(Recorder()).inner, every=3)  # 5 batches: updates after 3 and, at the epoch's end, 5
    step = fl.with_eval(step, data=make_batches(2, seed=5), loss_fn=fl.losses.classification, at_epoch_end=True)
    step = fl.with_tracking(step, trackers=[tracker], every=4)
    fl.fold(step, step.init(), make_batches(5), epochs=2, progress=False)
    assert [s for s, scalars in tracker.events if "val/loss" in scalars] == [2, 4]
    assert all("val/loss" not in scalars for s, scalars in tracker.events if "loss" in scalars)  # not averaged in


def test_the_run_id_reaches_the_state_even_when_the_first_event_is_the_folds_last():
    tracker = Recorder()
    step = build(tracker, every=5)
    state = fl.fold(step, step.init(), make_batches(3), progress=False)  # 3 updates: logged only at the end
    assert state.slots["tracking"].run_ids == ("run-1",)
    fl.fold(step, state, make_batches(3), epochs=2, progress=False)
    assert tracker.opened == ["", "run-1"]  # the second fold continues the same run


def test_a_state_from_before_the_runs_opened_gets_their_ids_and_calls_stay_deterministic():
    tracker = Recorder()
    step = build(tracker, every=1)
    state = step.init()
    a, _ = step(state, make_batches(1)[0])
    b, _ = step(state, make_batches(1)[0])  # the runs are open now; the input state has no id
    assert a.slots["tracking"].run_ids == b.slots["tracking"].run_ids == ("run-1",)
    assert fl.tree_equal(a, b)
    later = fl.fold(step, state, make_batches(2), progress=False)
    assert later.slots["tracking"].run_ids == ("run-1",)


def test_a_failing_batch_size_fn_of_the_users_is_not_hidden():
    def broken(batch):
        raise TypeError("my bug")

    step = fl.with_tracking(
        fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, adamw(1e-2)), trackers=[Recorder()], batch_size_fn=broken
    )
    with pytest.raises(TypeError, match="my bug"):
        step(step.init(), make_batches(1)[0])


@pytest.mark.parametrize(
    ("count", "error", "match"),
    [
        (lambda b: torch.tensor(4), TypeError, r"got Tensor tensor\(4\) from batch_size_fn=.*; convert it with int"),
        (lambda b: "4", TypeError, r"\(an int >= 0\), got str '4' from batch_size_fn="),
        (lambda b: -4, ValueError, r"\(an int >= 0\), got -4 from batch_size_fn="),
        (lambda b: float("nan"), ValueError, r"\(an int >= 0\), got nan from"),
    ],
    ids=["tensor", "str", "negative", "nan"],
)
@pytest.mark.parametrize("every", [1, 2])
def test_a_batch_size_fn_that_returns_no_sample_count_is_named(count, error, match, every):
    # a tensor was sent to the trackers as throughput/samples_per_s (they take floats), a negative count logged a
    # negative throughput, a str was a bare "unsupported operand type(s) for +=: 'int' and 'str'"
    step = fl.with_tracking(
        fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, adamw(1e-2)),
        trackers=[Recorder()],
        every=every,
        batch_size_fn=count,
    )
    with pytest.raises(error, match=match):
        step(step.init(), make_batches(1)[0])
    ok = fl.with_tracking(step.inner, trackers=[Recorder()], every=every, batch_size_fn=lambda b: 2.5)
    ok(ok.init(), make_batches(1)[0])  # a weight of one's own, not a count, is a number too


@pytest.mark.parametrize("last", [True, False], ids=["in the epoch-end flush", "inside the epoch"])
def test_a_skipped_update_of_a_short_window_goes_into_the_window_as_any_skipped_update(last):
    # skipped in the epoch-end flush, its metrics were logged at once as if an evaluation's, a second 'loss' (NaN) at
    # the update before it: (1, loss 0.35), (1, loss nan, skipped 1); skipped inside the epoch, they went into the window
    tracker = Recorder()
    core = fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1), nonfinite="skip")
    good, bad = (torch.ones(4, 3), torch.zeros(4, 1)), (torch.full((4, 3), float("nan")), torch.zeros(4, 1))
    step = fl.with_tracking(fl.with_grad_accum(core, every=3), trackers=[tracker], every=1)
    state = fl.fold(step, step.init(), [good, good, good, bad] if last else [good, bad, good, good], epochs=2, progress=False)
    assert int(state.step) == 2
    assert [s for s, _ in tracker.events] == [1, 2]  # one event per update, none for the skipped one
    skipped = [float(e["skipped"]) for _, e in tracker.events]
    assert skipped == ([0.0, 0.5] if last else [0.5, 0.5])  # the skipped update is in the window of the next one


def test_a_preempted_fold_without_checkpointing_still_logs_the_last_window():
    tracker = Recorder()
    step = build(tracker, every=3)
    with pytest.raises(fl.Preempted):  # SIGINT while the fourth batch is fetched
        fl.fold(step, step.init(), SignalledData(make_batches(6), at=3, signum=signal.SIGINT), progress=False)
    assert [s for s, _ in tracker.events] == [3, 4] and tracker.closed == 1


def test_the_short_window_an_epoch_end_applies_is_logged_with_the_metrics_observers_see():
    tracker, seen = Recorder(), {}
    step = build(tracker, every=1, accum=3)  # 7 batches: windows of 3, 3 and a short one of 1 in the flush

    def observe(state, metrics):
        seen[int(state.step)] = sorted(metrics)

    fl.fold(step, step.init(), make_batches(7), epochs=2, observers=[fl.Observer(observe, steps=1)], progress=False)
    logged = {s: sorted(k for k in scalars if k in ("loss", "accuracy")) for s, scalars in tracker.events}
    assert logged == {s: ["accuracy", "loss"] for s in range(1, 7)}  # updates 3 and 6 had only the loss
    assert all(seen[s] == ["accuracy", "loss"] for s in range(1, 7))


def test_every_update_logs_the_updates_own_metrics_exactly_and_times_each_update(monkeypatch):
    """Logging every update reads the step's metrics directly (no window): the values are the step's own floats."""
    import fnlight.transforms._tracking as tracking

    clock = [0.0]
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: clock[0])

    class Ticking:  # one second per step
        def __iter__(self):
            for b in make_batches(5):
                clock[0] += 1.0
                yield b

        def __len__(self):
            return 5

    tracker = Recorder()
    step = build(tracker, every=1)
    direct = fl.make_train_step(build(Recorder()).core._model, fl.losses.classification, adamw(linear(1e-2, 0.0, 100)))
    expected, state = [], direct.init()
    for b in make_batches(5):
        state, m = direct(state, b)
        expected.append({**{k: float(v) for k, v in m.items()}, "lr": float(state.opt_state.hparams["lr"])})
    fl.fold(step, step.init(), Ticking(), progress=False)
    assert [s for s, _ in tracker.events] == [1, 2, 3, 4, 5]
    for (_, logged), want in zip(tracker.events, expected, strict=True):
        assert {k: logged[k] for k in want} == want  # loss, accuracy and lr: equal, not approximately
        assert logged["epoch"] == 0.0
    for _, logged in tracker.events[1:]:  # the clock restarts at each event: one update per second
        assert logged["throughput/steps_per_s"] == 1.0 and logged["throughput/samples_per_s"] == 16.0


def test_metric_names_are_checked_whenever_a_new_set_of_names_appears():
    calls = [0]

    def loss_fn(model, batch):
        loss, aux = fl.losses.classification(model, batch)
        calls[0] += 1
        return loss, ({**aux, 3: loss.detach()} if calls[0] == 3 else aux)  # a bad name at the third update

    tracker = Recorder()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    step = fl.with_tracking(fl.make_train_step(model, loss_fn, adamw(1e-2)), trackers=[tracker], every=1)
    with pytest.raises(TypeError, match="with_tracking: scalar names must be non-empty str, got 3"):
        fl.fold(step, step.init(), make_batches(5), progress=False)
    assert [s for s, _ in tracker.events] == [1, 2]


@pytest.mark.parametrize("kind", ["ProcessTrackers", "Trackers"])
def test_fnlights_queueing_trackers_get_the_same_events_as_a_tracker_called_directly(tmp_path, kind):
    from fnlight.tracking import JSONLTracker, ProcessTrackers, Trackers, read_scalars

    direct = Recorder()
    fl.fold(build(direct, every=1), build(Recorder(), every=1).init(), make_batches(6), progress=False)
    queued = (ProcessTrackers if kind == "ProcessTrackers" else Trackers)(JSONLTracker(tmp_path))
    step = build(queued, every=1)
    state = fl.fold(step, step.init(), make_batches(6), progress=False)
    if kind == "ProcessTrackers":
        queued.shutdown()
    logged = read_scalars(tmp_path / f"{state.slots['tracking'].run_ids[0]}.jsonl")
    assert [s for s, _ in logged["loss"]] == [1, 2, 3, 4, 5, 6]
    for name in ("loss", "accuracy", "lr", "epoch"):
        assert logged[name] == [(s, e[name]) for s, e in direct.events], name


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("bad", [1.5, torch.ones(2), torch.ones(1)], ids=["float", "vector", "one-element"])
def test_a_metric_that_is_not_a_0d_tensor_is_named(every, bad):
    # a transform of one's own that returned a Python float as a metric crashed the logging with
    # AttributeError: 'float' object has no attribute 'is_cpu' (every=1) or 'detach' (every=2);
    # a metric of shape (1,) was logged until the first window whose metrics varied (an evaluation's, maybe hours
    # into the run), which then refused it: it is refused at the first logging event now
    class WithMetric(fl.Transform):
        name = "with_metric"

        def __call__(self, state, batch):
            new_state, metrics = self.inner(state, batch)
            return new_state, {**metrics, "mine": bad}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    core = fl.make_train_step(model, fl.losses.classification, adamw(1e-2))
    step = fl.with_tracking(WithMetric(core), trackers=[Recorder()], every=every)
    got = "float 1.5" if isinstance(bad, float) else rf"a tensor of shape \({bad.numel()},\)"
    with pytest.raises(TypeError, match=rf"with_tracking: the step's metric 'mine' must be a 0-d tensor .*, got {got}"):
        fl.fold(step, step.init(), make_batches(3), progress=False)


def test_a_tracker_failing_to_close_leaves_the_others_closed_and_the_chain_finished():
    class Failing(Recorder):
        def close(self):
            super().close()
            raise RuntimeError("disk full")

    failing, other = Failing(), Recorder()
    torch.manual_seed(0)
    core = fl.make_train_step(nn.Sequential(nn.Linear(10, 3)), fl.losses.classification, adamw(1e-2))
    inner = fl.with_early_stop(core, monitor="val/loss")  # its finish warns: the monitor never appeared
    step = fl.with_tracking(inner, trackers=[failing, other], every=1)
    with pytest.warns(RuntimeWarning, match="never appeared"), pytest.raises(RuntimeError, match="disk full"):
        fl.fold(step, step.init(), make_batches(2), progress=False)
    assert failing.closed == 1 and other.closed == 1  # the second tracker was closed too
