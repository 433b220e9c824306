"""Finders: the learning-rate sweep and the batch-size search, on copies of the state."""

import math
import sys

import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.finders import (
    BatchSizeTrial,
    LRFinderResult,
    batch_size_find,
    batch_size_search,
    is_out_of_memory,
    lr_find,
)
from fnlight.optim import Optimizer


def regression(n: int = 256, d: int = 8, batch: int = 32) -> tuple[list, float]:
    """Batches of a noiseless linear regression, and the critical SGD learning rate 2 / lambda_max."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, d, generator=g), torch.randn(d, 1, generator=g)
    hessian = 2 * x.T @ x / n  # of the mean squared error (bias column aside)
    data = [(x[i : i + batch], x[i : i + batch] @ w) for i in range(0, n, batch)]
    return data, 2 / float(torch.linalg.eigvalsh(hessian).max())


def linear_step(lr: float = 0.1):
    torch.manual_seed(0)
    return fl.make_train_step(nn.Linear(8, 1), fl.losses.mse, fl.optim.sgd(lr))


def test_suggestion_lands_below_the_critical_rate_and_trains_well():
    data, critical = regression()
    step = linear_step()
    state = step.init()
    result = lr_find(step, state, data, start=1e-5, end=10.0, num=100)
    assert critical / 30 < result.suggestion < critical
    trained = fl.fold(linear_step(result.suggestion), state, data, epochs=25, progress=False)
    before = fl.evaluate(fl.make_eval_step(fl.losses.mse), state, data)["loss"]
    after = fl.evaluate(fl.make_eval_step(fl.losses.mse), trained, data)["loss"]
    assert after < 1e-3 * before


def test_adamw_on_digits_suggests_a_usual_learning_rate():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    loader = fl.Loader((torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)), batch_size=64, shuffle=True, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    step = fl.make_train_step(model, fl.losses.cross_entropy, fl.optim.adamw(1e-3))
    result = lr_find(step, step.init(), loader, start=1e-6, end=10.0)
    assert 1e-4 <= result.suggestion <= 1e-1 and result.diverged


def test_the_sweep_stops_when_the_smoothed_loss_diverges():
    data, _ = regression()
    step = linear_step()
    result = lr_find(step, step.init(), data, start=1e-4, end=100.0, num=100, diverge=4.0)
    assert result.diverged and len(result.lrs) < 100
    *before, last = result.smoothed
    assert last > 4.0 * min(before) and all(v <= 4.0 * min(before[: i + 1]) for i, v in enumerate(before))
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert ratios == pytest.approx([(100.0 / 1e-4) ** (1 / 99)] * len(ratios))


def test_a_non_finite_loss_stops_the_sweep_even_without_a_divergence_threshold():
    data, _ = regression()
    step = linear_step()  # nonfinite="raise": the finder catches NonFiniteError
    result = lr_find(step, step.init(), data, start=1e-2, end=1e6, num=100, diverge=None)
    assert result.diverged and len(result.lrs) < 100 and math.isnan(result.losses[-1])


def test_a_gentle_sweep_runs_to_the_end_cycling_the_data():
    data, _ = regression()
    step = linear_step()
    result = lr_find(step, step.init(), data[:3], start=1e-6, end=1e-3, num=20)
    assert not result.diverged and len(result.lrs) == len(result.losses) == 20
    assert result.lrs[0] == 1e-6 and result.lrs[-1] == pytest.approx(1e-3)
    short = lr_find(step, step.init(), iter(data[:3]), start=1e-6, end=1e-3, num=20)  # one-shot: stops when exhausted
    assert len(short.lrs) == 3 and short.suggestion is None


def test_the_state_is_untouched():
    data, _ = regression()
    step = fl.make_train_step(
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)), fl.losses.mse, fl.optim.adamw(1e-3)
    )
    state = step.init()
    before = fl.tree_clone(state)
    lr_find(step, state, data, start=1e-5, end=10.0, num=50)
    assert fl.tree_equal(state, before)


def test_each_update_uses_the_swept_learning_rate():
    data, _ = regression()
    step = linear_step()
    state = step.init()
    result = lr_find(step, state, data[:1], start=1e-3, end=1e-1, num=4, diverge=None)
    losses = []
    for lr in result.lrs:  # the same updates by hand: hparams["lr"] set before each
        hparams = {**state.opt_state.hparams, "lr": torch.tensor(lr, dtype=torch.float64)}
        state, metrics = step(state.replace(opt_state=state.opt_state._replace(hparams=hparams)), data[0])
        losses.append(float(metrics["loss"]))
    assert result.lrs == pytest.approx([1e-3, 1e-3 * 100 ** (1 / 3), 1e-3 * 100 ** (2 / 3), 1e-1])
    assert result.losses == losses and float(state.opt_state.hparams["lr"]) == result.lrs[-1]


def test_under_accumulation_each_update_is_one_point_at_one_learning_rate():
    data, _ = regression()
    step = fl.with_grad_accum(linear_step(), every=2)
    result = lr_find(step, step.init(), data[:4], start=1e-3, end=1e-1, num=4, diverge=None)
    assert len(result.lrs) == 4
    core = linear_step()
    state = core.init()
    for i, lr in enumerate(result.lrs):  # by hand: the K micro-batches of an update at its learning rate
        hparams = {**state.opt_state.hparams, "lr": torch.tensor(lr, dtype=torch.float64)}
        state = state.replace(opt_state=state.opt_state._replace(hparams=hparams))
        window = [data[(2 * i) % 4], data[(2 * i + 1) % 4]]
        losses = [float(core(state, b)[1]["loss"]) for b in window]
        x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
        state, _ = core(state, (x, y))  # equal micro-batches: the update of their mean loss
        assert result.losses[i] == pytest.approx(sum(losses) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"data ended before the first update \(1 batches; with_grad_accum"):
        lr_find(step, step.init(), iter(data[:1]), num=4)


def test_a_negative_loss_does_not_read_as_diverging():
    data, _ = regression()
    step = linear_step()
    shifted = fl.make_train_step(step.core._model, lambda m, b: fl.losses.mse(m, b) - 100.0, fl.optim.sgd(0.1))
    plain = lr_find(step, step.init(), data, start=1e-4, end=100.0, num=100)
    moved = lr_find(shifted, shifted.init(), data, start=1e-4, end=100.0, num=100)
    assert plain.diverged and moved.diverged and 10 < len(moved.lrs) == len(plain.lrs)
    assert moved.suggestion == plain.suggestion


def test_plot_writes_a_png(tmp_path):
    data, _ = regression()
    step = linear_step()
    result = lr_find(step, step.init(), data, start=1e-5, end=10.0, num=60)
    path = result.plot(tmp_path / "lr.png")
    raw = path.read_bytes()
    assert path == tmp_path / "lr.png" and raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": 0.0}, r"start must be a positive finite float, got 0.0"),
        ({"end": math.inf}, r"end must be a positive finite float, got inf"),
        ({"start": 1.0, "end": 0.1}, r"expected start < end, got start=1.0, end=0.1"),
        ({"num": 1}, r"num must be an int >= 2, got 1"),
        ({"skip_start": -1}, r"skip_start must be an int >= 0, got -1"),
        ({"smooth": 1.0}, r"smooth must be in \[0, 1\), got 1.0"),
        ({"diverge": 1.0}, r"diverge must be a float > 1 or None, got 1.0"),
    ],
)
def test_lr_find_option_errors(kwargs, match):
    step = linear_step()
    with pytest.raises(ValueError, match=match):
        lr_find(step, step.init(), regression()[0], **kwargs)


def test_lr_find_errors():
    data, _ = regression()
    step = linear_step()
    with pytest.raises(TypeError, match="lr_find: expected a fnlight.TrainState, got dict"):
        lr_find(step, {}, data)
    with pytest.raises(TypeError, match="lr_find: step must be callable"):
        lr_find(None, step.init(), data)
    with pytest.raises(ValueError, match="lr_find: data gave no batch"):
        lr_find(step, step.init(), [])
    with pytest.raises(TypeError, match=r"lr_find: step is an eval step \(make_eval_step\), which makes no update"):
        lr_find(fl.make_eval_step(fl.losses.mse), step.init(), data)
    with pytest.raises(TypeError, match=r"data must be an iterable of batches .*, got a function \(fold's epoch"):
        lr_find(step, step.init(), lambda epoch: data)
    with pytest.raises(TypeError, match=r"lr_find: data must be an iterable of batches .*, got NoneType"):
        lr_find(step, step.init(), None)
    scheduled = fl.make_train_step(nn.Linear(8, 1), fl.losses.mse, fl.optim.sgd(fl.optim.cosine(0.1, 100)))
    with pytest.raises(ValueError, match=r"learning rate is a schedule, which sets hparams\['lr'\] at every update"):
        lr_find(scheduled, scheduled.init(), data)
    plain = Optimizer(init=lambda params: (), apply=lambda params, grads, state, *, inplace: (params, state))
    custom = fl.make_train_step(nn.Linear(8, 1), fl.losses.mse, plain)
    with pytest.raises(ValueError, match=r"the optimizer state \(tuple\) holds no hparams\['lr'\] to sweep"):
        lr_find(custom, custom.init(), data)
    from fnlight.ensemble import make_ensemble_step

    ensemble = make_ensemble_step(nn.Linear(8, 1), fl.losses.mse, k=2, optimizer="sgd", lr=0.1)
    with pytest.raises(ValueError, match=r"the step's loss must be a scalar, got shape \[2\]"):
        lr_find(ensemble, ensemble.init(seeds=0), data)


# --------------------------------------------------------------------------- batch size


@pytest.mark.parametrize("wrapper", ["with_checkpointing", "with_tracking"])
@pytest.mark.parametrize("finder", ["lr_find", "batch_size_find"])
def test_a_step_that_would_save_or_log_the_trials_is_refused(tmp_path, wrapper, finder):
    # with_checkpointing(resume=True) saved the sweep's states in the run directory: a restarted run resumed from
    # lr_find's diverged state at update 50
    core = linear_step()
    inner = fl.with_grad_accum(core, every=2)
    if wrapper == "with_checkpointing":
        step = fl.with_checkpointing(inner, directory=tmp_path, every=1, resume=True)
        effect = "save the trial states as the run's checkpoints"
    else:
        step = fl.with_tracking(inner, trackers=[fl.tracking.CSVTracker(tmp_path)], every=1)
        effect = "log the trial updates to the run"
    state = step.init()
    data, _ = regression()
    with pytest.raises(ValueError, match=rf"{finder}: the step is wrapped by {wrapper}, which would {effect}"):
        if finder == "lr_find":
            lr_find(step, state, data, num=5)
        else:
            batch_size_find(step, state, lambda n: (torch.randn(n, 8), torch.randn(n, 1)), max_size=8)
    assert not any(tmp_path.glob("*.ckpt")) and int(step.init().step) == 0  # nothing saved, nothing to resume


def test_search_grows_by_powers_of_two_then_bisects():
    result = batch_size_search(lambda n: n <= 37)
    assert result.batch_size == 37
    assert [(t.size, t.fits) for t in result.trials] == [
        (1, True), (2, True), (4, True), (8, True), (16, True), (32, True), (64, False),
        (48, False), (40, False), (36, True), (38, False), (37, True),
    ]  # fmt: skip
    assert batch_size_search(lambda n: n <= 64, start=3).batch_size == 64


def test_search_stops_at_max_size():
    result = batch_size_search(lambda n: True, start=5, max_size=100)
    assert result.batch_size == 100 and [t.size for t in result.trials] == [5, 10, 20, 40, 80, 100]
    assert batch_size_search(lambda n: True, start=7, max_size=7).batch_size == 7


def test_search_errors():
    with pytest.raises(ValueError, match=r"batch_size_search: the first batch size, 8, does not fit \(fits\(\) returned False\)"):
        batch_size_search(lambda n: n < 4, start=8)
    with pytest.raises(TypeError, match=r"fits\(1\) must return a bool, got 1"):
        batch_size_search(lambda n: 1)
    with pytest.raises(TypeError, match="fits must be callable"):
        batch_size_search(3)
    with pytest.raises(ValueError, match="expected start <= max_size, got start=9, max_size=8"):
        batch_size_search(lambda n: True, start=9, max_size=8)
    with pytest.raises(ValueError, match="max_size must be a positive int, got 0"):
        batch_size_search(lambda n: True, max_size=0)


def mlp_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return fl.make_train_step(model, fl.losses.cross_entropy, fl.optim.adamw(1e-3))


def make_batch(n: int):
    return torch.randn(n, 16), torch.randint(0, 4, (n,))


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
        ),
        MemoryError(),
    ],
    ids=["cuda", "cpu-allocator", "python"],
)
def test_find_stops_at_out_of_memory(error):
    step = mlp_step()

    def fake(state, batch):  # runs out of memory above 50 samples
        if batch[0].shape[0] > 50:
            raise error
        return step(state, batch)

    state = step.init()
    before = fl.tree_clone(state)
    result = batch_size_find(fake, state, make_batch, max_size=1000, steps=2)
    assert result.batch_size == 50
    assert [t.size for t in result.trials if not t.fits] == [64, 56, 52, 51]
    assert all(t.reason.startswith("out of memory") for t in result.trials if not t.fits)
    assert fl.tree_equal(state, before)


def test_out_of_memory_while_building_the_batch_counts_too():
    def make(n):
        if n > 20:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return make_batch(n)

    step = mlp_step()
    assert batch_size_find(step, step.init(), make).batch_size == 20


def test_other_errors_propagate():
    step = mlp_step()

    def broken(state, batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        batch_size_find(broken, step.init(), make_batch)


def test_budget_on_cpu_counts_the_bytes_saved_for_backward():
    step = mlp_step()
    state = step.init()
    budget = 40_000
    result = batch_size_find(step, state, make_batch, max_size=4096, memory_budget=budget)
    by_size = {t.size: t for t in result.trials}
    n = result.batch_size
    assert by_size[n].fits and by_size[n].bytes <= budget
    assert not by_size[n + 1].fits and by_size[n + 1].bytes > budget and by_size[n + 1].reason.startswith("over budget")
    # activations only (parameters excluded): the measure grows linearly with the batch size
    per_sample = by_size[2].bytes - by_size[1].bytes
    assert by_size[64].bytes - by_size[32].bytes == 32 * per_sample
    assert by_size[1].bytes - per_sample < per_sample  # little that does not grow with the batch
    # float32 input (16), ReLU output (32, also the second layer's input: one storage), log-softmax (4); int64 target
    assert per_sample == 4 * (16 + 32 + 4) + 8


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("out of memory")) and not is_out_of_memory(RuntimeError("bad shape"))
    assert BatchSizeTrial(4, True, "fits").bytes is None


def test_find_errors():
    step = mlp_step()
    state = step.init()
    with pytest.raises(TypeError, match="batch_size_find: expected a fnlight.TrainState, got int"):
        batch_size_find(step, 0, make_batch)
    with pytest.raises(TypeError, match="batch_size_find: step must be callable"):
        batch_size_find(None, state, make_batch)
    with pytest.raises(TypeError, match="make_batch must be callable batch_size -> batch"):
        batch_size_find(step, state, 32)
    with pytest.raises(TypeError, match=r"batch_size_find: step is an eval step \(make_eval_step\), which makes no update"):
        batch_size_find(fl.make_eval_step(fl.losses.cross_entropy), state, make_batch)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        batch_size_find(step, state, make_batch, steps=0)
    with pytest.raises(ValueError, match="memory_budget must be a positive int, got -1"):
        batch_size_find(step, state, make_batch, memory_budget=-1)
    with pytest.raises(ValueError, match=r"the first batch size, 4, does not fit \(over budget: \d+ > 10 bytes\)"):
        batch_size_find(step, state, make_batch, start=4, memory_budget=10)


def test_a_trial_makes_its_updates_under_accumulation():
    step = fl.with_grad_accum(mlp_step(), every=3)
    updates = []

    def counted(state, batch):
        state, metrics = step(state, batch)
        updates.append(int(state.step))
        return state, metrics

    result = batch_size_find(counted, step.init(), make_batch, max_size=4, steps=2)
    assert result.batch_size == 4 and [t.size for t in result.trials] == [1, 2, 4]
    assert updates == [0, 0, 1, 1, 1, 2] * 3  # per trial: two updates of three calls each


def test_plot_without_matplotlib_names_the_package(tmp_path, monkeypatch):
    result = LRFinderResult(lrs=[1e-3, 1e-2], losses=[1.0, 0.5], smoothed=[1.0, 0.75], suggestion=None, diverged=False)
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure"):  # imported or not: ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"LRFinderResult\.plot needs matplotlib: pip install 'fnlight\[plot\]'"):
        result.plot(tmp_path / "lr.png")
    assert not (tmp_path / "lr.png").exists()


def test_the_suggestion_leaves_out_the_non_finite_losses_that_end_a_sweep():
    data, critical = regression()
    result = lr_find(linear_step(), linear_step().init(), data, start=1e-3, end=1e6, skip_end=0, diverge=None)
    assert result.diverged and not math.isfinite(result.smoothed[-1])  # the sweep ends on a NaN/inf loss
    finite = [(lr, v) for lr, v in zip(result.lrs, result.smoothed) if math.isfinite(v)][10:]  # skip_start=10
    window = torch.tensor([v for _, v in finite], dtype=torch.float64)
    assert result.suggestion == finite[int(torch.argmin(torch.gradient(window)[0]))][0]
    assert result.suggestion < critical
