"""Model summary: counts per module, trainable vs frozen, sizes, tied weights, the printed table."""

import io

import pytest
import torch
from rich.console import Console
from torch import nn

import fnlight as fl


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), nn.ReLU(), nn.Linear(8, 2))
    m[0][0].weight.requires_grad_(False)
    return m


def test_counts_per_module_and_totals():
    s = fl.summary(model())
    assert [(r.name, r.kind, r.trainable, r.frozen) for r in s.rows] == [
        ("0", "Sequential", 8 + 16, 32),
        ("1", "ReLU", 0, 0),
        ("2", "Linear", 18, 0),
    ]
    assert (s.total.trainable, s.total.frozen, s.total.params) == (42, 32, 74)
    assert s.total.mib == pytest.approx(74 * 4 / 2**20)
    assert s.buffers_mib == pytest.approx((8 + 8) * 4 / 2**20 + 8 / 2**20)


def test_depth_and_state_and_dtypes():
    s = fl.summary(model(), depth=2)
    assert [r.name for r in s.rows] == ["0", "0.0", "0.1", "1", "2"]
    step = fl.with_amp(fl.make_train_step(model(), fl.losses.cross_entropy, fl.optim.sgd(0.1)), dtype="bf16", mode="true")
    from_state = fl.summary(step.init())
    assert from_state.total.params == 74 and from_state.total.frozen == 32
    assert from_state.total.mib == pytest.approx(74 * 2 / 2**20)


def test_tied_weights_count_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert fl.summary(nn.Sequential(emb, head)).total.params == 40


def test_a_module_shared_by_two_names_is_a_row_under_each():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # the third row was missing: named_modules skips a module seen before
    for source in (model, fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1)).init()):
        s = fl.summary(source)
        assert [(r.name, r.kind, r.params) for r in s.rows] == [("0", "Linear", 20), ("1", "ReLU", 0), ("2", "Linear", 20)]
        assert s.total.params == 20  # the total counts it once


def test_a_module_holding_a_tied_weight_shows_it_as_the_state_holds_it():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # the state holds it once, as "0.weight"
    step = fl.with_amp(fl.make_train_step(nn.Sequential(emb, head), fl.losses.mse, fl.optim.sgd(0.1)), dtype="bf16", mode="true")
    for source in (nn.Sequential(emb, head), step.init()):
        rows = {r.name: r for r in fl.summary(source).rows}
        assert (rows["1"].params, rows["1"].trainable, rows["1"].frozen) == (40, 40, 0)
    rows = {r.name: r for r in fl.summary(step.init()).rows}
    assert rows["0"].mib == rows["1"].mib == 40 * 2 / 2**20  # the state's bf16 tensor, not the skeleton's fp32 one


def test_printed_table_and_fold_prints_it_with_progress(monkeypatch):
    buffer = io.StringIO()
    fl.print_summary(model(), console=Console(file=buffer, width=120))
    assert "model summary" in buffer.getvalue() and "74" in buffer.getvalue()
    import fnlight._progress as progress

    buffer = io.StringIO()
    monkeypatch.setattr(progress, "CONSOLE", Console(file=buffer, force_terminal=True, width=120))
    step = fl.make_train_step(model(), fl.losses.cross_entropy, fl.optim.sgd(0.1))
    fl.fold(step, step.init(), [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))], progress=True)
    assert "model summary" in buffer.getvalue()
    assert "Sequential" in str(fl.summary(model()))


def test_bad_inputs():
    with pytest.raises(TypeError, match="expected an nn.Module or a TrainState, got int"):
        fl.summary(3)
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        fl.summary(model(), depth=0)
    with pytest.raises(TypeError, match="depth must be an int >= 1, got str '2'"):
        fl.summary(model(), depth="2")
    with pytest.raises(TypeError, match="print_summary: console must be a rich.console.Console or None, got StringIO"):
        fl.print_summary(model(), console=io.StringIO())


def test_a_stacked_ensemble_state_says_its_counts_cover_every_replica():
    from fnlight.ensemble import make_ensemble_step

    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    step = make_ensemble_step(model, fl.losses.cross_entropy, k=4, lr=0.1)
    s = fl.summary(step.init(seeds=0))
    single = fl.summary(model)
    assert s.total.kind == "Sequential x4 replicas" and s.rows[0].kind == "Linear x4 replicas"
    assert s.total.params == 4 * single.total.params and s.rows[0].params == 4 * single.rows[0].params


def test_a_state_without_a_skeleton_is_refused():
    state = fl.make_train_step(model(), fl.losses.mse, fl.optim.sgd(0.1)).init()
    with pytest.raises(TypeError, match=r"summary: expected an nn.Module or a TrainState with a module skeleton .* without one"):
        fl.summary(state.replace(skeleton=None))
