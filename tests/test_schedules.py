"""Schedules: values at boundaries, parity with torch.optim.lr_scheduler, and build-time errors."""

import math

import pytest
import torch

import fnlight as fl
from fnlight.optim import _schedules as sch


def values(schedule, counts):
    return [float(schedule(torch.tensor(c))) for c in counts]


def torch_lrs(make_scheduler, n):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_constant_any_count():
    assert values(sch.constant(0.3), [0, 1, 10**9]) == [0.3, 0.3, 0.3]


def test_linear_boundaries_and_begin():
    s = sch.linear(1.0, 3.0, 4, transition_begin=2)
    assert values(s, [0, 2, 3, 4, 6, 7, 100]) == [1.0, 1.0, 1.5, 2.0, 3.0, 3.0, 3.0]


def test_linear_matches_torch_linear_lr():
    ours = values(sch.linear(0.25, 1.0, 8), range(12))
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.25, 1.0, total_iters=8), 12)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_cosine_matches_torch_cosine_annealing():
    ours = values(sch.cosine(1.0, 10, end_value=0.1), range(11))
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.1), 11)
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_cosine_holds_end_value_after_decay():
    assert values(sch.cosine(2.0, 5, end_value=0.5), [5, 6, 1000]) == [0.5, 0.5, 0.5]


def test_exponential_matches_torch_and_bounds():
    ours = values(sch.exponential(1.0, 0.9), range(10))
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9), 10)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert values(sch.exponential(1.0, 0.5, end_value=0.3), [0, 1, 2, 50]) == [1.0, 0.5, 0.3, 0.3]
    assert values(sch.exponential(1.0, 2.0, end_value=3.0), [0, 1, 2, 50]) == [1.0, 2.0, 3.0, 3.0]


def test_exponential_begin_and_staircase():
    s = sch.exponential(1.0, 0.5, 3, transition_begin=2, staircase=True)
    assert values(s, [0, 2, 4, 5, 8, 11]) == [1.0, 1.0, 1.0, 0.5, 0.25, 0.125]


def test_step_decay_matches_torch_step_lr():
    ours = values(sch.step_decay(1.0, 3, 0.5), range(10))
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), 10)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_piecewise_constant_boundaries_are_half_open():
    s = sch.piecewise_constant([3.0, 2.0, 1.0], [2, 5])
    assert values(s, [0, 1, 2, 4, 5, 9]) == [3.0, 3.0, 2.0, 2.0, 1.0, 1.0]


def test_join_restarts_each_schedule_at_zero():
    s = sch.join([sch.linear(0.0, 1.0, 2), sch.cosine(1.0, 4), sch.constant(0.5)], [2, 6])
    assert values(s, [0, 1, 2, 4, 5, 6, 40]) == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 3 / 4)), 0.5, 0.5]
    )


def test_warmup_then_schedule():
    s = sch.warmup(sch.exponential(2.0, 0.5), 4, init_value=1.0)
    assert values(s, [0, 1, 2, 3, 4, 5, 6]) == [1.0, 1.25, 1.5, 1.75, 2.0, 1.0, 0.5]


def test_warmup_cosine_peak_and_end():
    s = sch.warmup_cosine(3e-4, 10, 90, end_value=3e-5)
    assert float(s(torch.tensor(0))) == 0.0
    assert float(s(torch.tensor(10))) == pytest.approx(3e-4)
    assert float(s(torch.tensor(100))) == pytest.approx(3e-5)
    assert float(s(torch.tensor(5))) == pytest.approx(1.5e-4)


def test_schedules_return_float64_scalars_and_are_pure():
    count = torch.tensor(3)
    for s in [
        sch.constant(1.0),
        sch.linear(1.0, 0.0, 5),
        sch.cosine(1.0, 5),
        sch.exponential(1.0, 0.9),
        sch.piecewise_constant([1.0, 0.5], [2]),
        sch.warmup_cosine(1.0, 2, 5),
    ]:
        out = s(count)
        assert out.dtype == torch.float64 and out.ndim == 0
        assert torch.equal(s(count), out)
        assert int(count) == 3


def test_join_and_warmup_keep_the_python_floats_their_schedules_return_exactly():
    # a schedule may return a Python float (docs/optim.md); join must not round it to float32 via torch.where
    s = sch.join([lambda c: 0.1, lambda c: 0.01], [3])
    assert s(torch.tensor(0)).dtype == torch.float64
    assert values(s, [0, 2, 3, 7]) == [0.1, 0.1, 0.01, 0.01]
    w = sch.warmup(lambda c: 0.1 * 0.5 ** int(c), 2)
    assert values(w, [0, 1, 2, 3]) == [0.0, 0.05, 0.1, 0.05]
    step = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(s))
    state, _ = step(step.init(), (torch.ones(4, 2), torch.zeros(4, 1)))
    assert float(state.opt_state.hparams["lr"]) == 0.1


@pytest.mark.parametrize(
    "build",
    [
        lambda bad: sch.join([sch.constant(1.0), bad], [3]),
        lambda bad: sch.join([bad, sch.constant(1.0)], [3]),
        lambda bad: sch.warmup(bad, 3),
    ],
)
def test_join_and_warmup_name_an_inner_schedule_that_returns_no_number(build):
    # the inner value went on to torch.where / arithmetic, which failed with torch's message naming no schedule
    opt = fl.optim.sgd(build(lambda c: "x"))
    with pytest.raises(TypeError, match=r"schedule '.*<lambda>' must return a 0-d tensor or a float, got str: 'x' for count 0"):
        opt.init({"w": torch.ones(2)})


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: sch.constant("a"), TypeError, "constant: value must be a float, got 'a'"),
        (lambda: sch.constant(float("nan")), ValueError, "constant: value must be in"),
        (lambda: sch.linear(1.0, 0.0, 0), ValueError, "linear: transition_steps must be a positive int, got 0"),
        (lambda: sch.linear(1.0, 0.0, 3, transition_begin=-1), ValueError, "transition_begin must be a non-negative int"),
        (lambda: sch.cosine(1.0, 2.5), ValueError, "cosine: decay_steps must be a positive int, got 2.5"),
        (lambda: sch.cosine(1.0, 10, exponent=0.0), ValueError, r"cosine: exponent must be in \(0.0, inf\)"),
        (lambda: sch.exponential(1.0, 0.0), ValueError, r"exponential: decay_rate must be in \(0.0, inf\), got 0.0"),
        (lambda: sch.piecewise_constant([1.0], [3]), ValueError, "expected len\\(values\\) == len\\(boundaries\\) \\+ 1"),
        (lambda: sch.piecewise_constant([1.0, 2.0, 3.0], [5, 5]), ValueError, "boundaries must be strictly increasing"),
        (lambda: sch.join([sch.constant(1.0)], [2]), ValueError, "expected len\\(schedules\\) == len\\(boundaries\\) \\+ 1"),
        (lambda: sch.join([sch.constant(1.0), 1.0], [2]), TypeError, r"join: schedules\[1\] must be a schedule .*got 1.0"),
        (lambda: sch.warmup(sch.constant(1.0), 0), ValueError, "warmup: warmup_steps must be a positive int, got 0"),
        (lambda: sch.warmup(0.1, 3), TypeError, "warmup: schedule must be a schedule"),
    ],
)
def test_bad_options_raise_at_build_time(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: fl.optim.step_decay(1.0, 10, gamma=0.0), r"fnlight.optim.step_decay: gamma must be in \(0.0, inf\), got 0.0"),
        (lambda: fl.optim.step_decay(1.0, step_size=0), "fnlight.optim.step_decay: step_size must be a positive int, got 0"),
        (lambda: fl.optim.warmup_cosine(1.0, 0, 100), "fnlight.optim.warmup_cosine: warmup_steps must be a positive int, got 0"),
        (lambda: fl.optim.piecewise_constant([1.0, "x"], [3]), r"piecewise_constant: values\[1\] must be a float, got 'x'"),
        (lambda: fl.optim.join([fl.optim.constant(1.0)] * 3, [4, 0]), r"join: boundaries\[1\] must be a positive int, got 0"),
        (lambda: fl.optim.piecewise_constant(0.1, [3]), "piecewise_constant: values must be a list or tuple, got float 0.1"),
        (lambda: fl.optim.piecewise_constant([1.0, 0.1], {3: 0.1}), "boundaries must be a list or tuple, got dict"),
        (lambda: fl.optim.join(fl.optim.constant(1.0), [3]), "join: schedules must be a list or tuple, got function"),
    ],
)
def test_errors_name_the_function_and_option_the_user_called(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_piecewise_constant_takes_a_vector_of_counts():
    s = fl.optim.piecewise_constant([1.0, 0.1, 0.01], [3, 6])
    assert s(torch.arange(8)).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01])
