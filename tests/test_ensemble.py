"""Ensembles: every replica trains as an independent run would; stacking is exact; errors are clear."""

import optree
import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.ensemble import (
    ensemble_size,
    make_ensemble_step,
    replica_state,
    stack_states,
    unstack_states,
)

K = 4
SEEDS = [3, 1, 4, 1]
LRS = [1e-3, 3e-3, 1e-2, 3e-2]


def build(seed: int | None = None, *, bn: bool = False, dropout: float = 0.0) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(10, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers)


def batches(n: int = 6, size: int = 12, seed: int = 0, lead: tuple[int, ...] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*lead, size, 10, generator=g), torch.randint(0, 3, (*lead, size), generator=g)) for _ in range(n)]


def same(a, b) -> bool:
    """Bitwise-equal states (``tree_equal`` also compares skeletons by identity; each ``init`` makes its own)."""
    return fl.tree_equal(a, b.replace(skeleton=a.skeleton))


def max_diff(a, b) -> float:
    la, ta = optree.tree_flatten(a, namespace="fnlight")
    lb, tb = optree.tree_flatten(b, namespace="fnlight")
    assert ta == tb
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(la, lb) if x.numel()), default=0.0)


OPTIMIZERS = {
    "adamw": ({"weight_decay": [0.0, 0.01, 0.1, 0.3]}, lambda lr, i: fl.optim.adamw(lr, weight_decay=[0.0, 0.01, 0.1, 0.3][i])),
    "adam": ({"weight_decay": 0.05, "amsgrad": True}, lambda lr, i: fl.optim.adam(lr, weight_decay=0.05, amsgrad=True)),
    "sgd": (
        {"momentum": [0.5, 0.9, 0.9, 0.99], "nesterov": True, "weight_decay": 1e-3},
        lambda lr, i: fl.optim.sgd(lr, momentum=[0.5, 0.9, 0.9, 0.99][i], nesterov=True, weight_decay=1e-3),
    ),
    "sgd-plain": ({}, lambda lr, i: fl.optim.sgd(lr)),
    "adamw-mask": (
        {"mask": fl.optim.decay_mask_no_bias_norm},
        lambda lr, i: fl.optim.adamw(lr, mask=fl.optim.decay_mask_no_bias_norm),
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_replica_equals_an_independent_fnlight_run(name):
    options, single = OPTIMIZERS[name]
    kind = name.split("-")[0]
    data = batches()
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, optimizer=kind, lr=LRS, options=options)
    final = fl.fold(step, step.init(seeds=SEEDS), data, epochs=2, progress=False)
    assert int(final.step) == 12 and ensemble_size(final) == K
    for i, seed in enumerate(SEEDS):
        alone = fl.make_train_step(build(seed), fl.losses.cross_entropy, single(LRS[i], i))
        ref = fl.fold(alone, alone.init(seed=seed), data, epochs=2, progress=False)
        got = replica_state(final, i)
        assert max_diff(got.params, ref.params) < 1e-6
        assert max_diff(got.opt_state, ref.opt_state) < 1e-6
        assert int(got.step) == int(ref.step) and int(got.key) == seed


def test_adamw_replicas_equal_hand_written_torch_loops():
    data = batches()
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, lr=LRS, options={"weight_decay": 0.1})
    state = step.init(seeds=SEEDS)
    for x, y in data:
        state, metrics = step(state, (x, y))
    for i, seed in enumerate(SEEDS):
        model = build(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=LRS[i], weight_decay=0.1)
        losses = []
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        got = replica_state(state, i)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got.params[n], p.detach(), atol=1e-6, rtol=0)
        assert metrics["loss"][i].item() == pytest.approx(losses[-1], abs=1e-6)


def test_reinit_draws_what_building_after_manual_seed_draws():
    state = make_ensemble_step(build(0), fl.losses.mse, k=K, lr=0.1).init(seeds=SEEDS)
    for i, seed in enumerate(SEEDS):
        expected = {n: p.detach() for n, p in build(seed).named_parameters()}
        assert fl.tree_equal(replica_state(state, i).params, expected)


def test_without_reinit_every_replica_starts_from_the_model_and_the_model_is_untouched():
    model = build(5)
    before = fl.tree_clone(dict(model.state_dict()))
    state = make_ensemble_step(model, fl.losses.mse, k=3, lr=0.1).init(seeds=[0, 1, 2], reinit=False)
    for replica in unstack_states(state):
        assert fl.tree_equal(replica.params, {n: p.detach() for n, p in model.named_parameters()})
    make_ensemble_step(model, fl.losses.mse, k=3, lr=0.1).init(seeds=[0, 1, 2])  # reinit works on a copy
    assert fl.tree_equal(dict(model.state_dict()), before)


def test_per_replica_batches_train_each_replica_on_its_own_data():
    data = batches(lead=(K,))
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, lr=LRS, per_replica_batch=True)
    final = fl.fold(step, step.init(seeds=SEEDS), data, progress=False)
    for i, seed in enumerate(SEEDS):
        alone = fl.make_train_step(build(seed), fl.losses.cross_entropy, fl.optim.adamw(LRS[i]))
        ref = fl.fold(alone, alone.init(seed=seed), [(x[i], y[i]) for x, y in data], progress=False)
        assert max_diff(replica_state(final, i).params, ref.params) < 1e-6


def test_batchnorm_in_train_mode_is_supported_and_running_statistics_match():
    data = batches()
    step = make_ensemble_step(build(bn=True), fl.losses.cross_entropy, k=K, optimizer="sgd", lr=LRS, options={"momentum": 0.9})
    final = fl.fold(step, step.init(seeds=SEEDS), data, progress=False)
    for i, seed in enumerate(SEEDS):
        alone = fl.make_train_step(build(seed, bn=True), fl.losses.cross_entropy, fl.optim.sgd(LRS[i], momentum=0.9))
        ref = fl.fold(alone, alone.init(seed=seed), data, progress=False)
        got = replica_state(final, i)
        assert max_diff(got.params, ref.params) < 1e-6
        assert max_diff(got.buffers, ref.buffers) < 1e-6
        assert int(got.buffers["1.num_batches_tracked"]) == len(data)


def test_batchnorm_with_a_cumulative_average_momentum_none_trains_as_independent_runs():
    def cumulative(seed):
        model = build(seed, bn=True)
        model[1].momentum = None  # running statistics as the plain mean over the batches so far
        return model

    data = batches()
    step = make_ensemble_step(cumulative(None), fl.losses.cross_entropy, k=K, optimizer="sgd", lr=LRS)
    final = fl.fold(step, step.init(seeds=SEEDS), data, progress=False)
    assert final.skeleton[1].momentum is None  # put back after each call
    for i, seed in enumerate(SEEDS):
        alone = fl.make_train_step(cumulative(seed), fl.losses.cross_entropy, fl.optim.sgd(LRS[i]))
        ref = fl.fold(alone, alone.init(seed=seed), data, progress=False)
        got = replica_state(final, i)
        assert max_diff(got.params, ref.params) < 1e-6
        assert max_diff(got.buffers, ref.buffers) < 1e-6
    alone = step.replica_step(0)
    ahead, _ = alone(alone.init(seed=1), data[0])
    uneven = stack_states([alone.init(seed=0), ahead.replace(step=torch.zeros((), dtype=torch.int64))])
    with pytest.raises(ValueError, match=r"BatchNorm '1' has momentum=None .* tracked different numbers of batches \[0, 1\]"):
        make_ensemble_step(cumulative(None), fl.losses.cross_entropy, k=2, optimizer="sgd")(uneven, data[0])


def test_a_call_is_pure_and_the_fold_gives_bitwise_the_same_state():
    data = batches(n=3)
    step = make_ensemble_step(build(bn=True), fl.losses.classification, k=K, lr=LRS)
    start = step.init(seeds=SEEDS)
    copy = fl.tree_clone(start)
    state = start
    for batch in data:
        state, metrics = step(state, batch)
    assert fl.tree_equal(start, copy)
    assert sorted(metrics) == ["accuracy", "loss"] and metrics["accuracy"].shape == (K,)
    folded = fl.fold(step, start, data, progress=False)
    assert int(folded.data.epoch) == 1 and same(folded.replace(data=state.data), state)


def test_a_replica_is_an_ordinary_state_to_continue_evaluate_export_and_checkpoint(tmp_path):
    data = batches()
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, lr=LRS)
    state = fl.fold(step, step.init(seeds=SEEDS), data[:3], progress=False)
    replica = replica_state(state, 2)
    continued = fl.fold(step.replica_step(2), replica, data[3:], epochs=2, progress=False)  # epoch 1 of the fold
    alone = fl.make_train_step(build(SEEDS[2]), fl.losses.cross_entropy, fl.optim.adamw(LRS[2]))
    ref = fl.fold(alone, alone.init(seed=SEEDS[2]), data, progress=False)
    assert max_diff(continued.params, ref.params) < 1e-6
    x, y = data[0]
    module = fl.to_module(replica)
    assert fl.evaluate(fl.make_eval_step(fl.losses.cross_entropy), replica, [(x, y)])["loss"] == pytest.approx(
        nn.functional.cross_entropy(module(x), y).item(), abs=1e-6
    )
    fl.checkpoint.save(tmp_path / "replica.ckpt", replica)
    assert same(fl.checkpoint.restore(tmp_path / "replica.ckpt", alone.init(seed=0)), replica)
    fl.checkpoint.save(tmp_path / "ensemble.ckpt", state)  # the stacked state is a state too
    assert same(fl.checkpoint.restore(tmp_path / "ensemble.ckpt", step.init(seeds=[0] * K)), state)


def test_stack_unstack_round_trips_exactly():
    step = fl.make_train_step(build(bn=True), fl.losses.cross_entropy, fl.optim.sgd(0.1, momentum=0.9))
    states = [fl.fold(step, step.init(seed=s), batches(n=2, seed=s), progress=False) for s in range(3)]
    stacked = stack_states(states)
    assert stacked.params["0.weight"].shape == (3, 16, 10) and stacked.opt_state.hparams["lr"].shape == (3,)
    for a, b in zip(unstack_states(stacked), states):
        assert same(a, b) and a.skeleton is stacked.skeleton
    assert fl.tree_equal(stack_states(unstack_states(stacked)), stacked)
    assert same(replica_state(stacked, -1), states[-1])
    unstack_states(stacked)[0].params["0.weight"].add_(1)  # copies: the stacked state is unaffected
    assert same(stack_states(states), stacked)


def test_dropout_replicas_draw_their_own_masks_reproducibly():
    data = batches(n=2)
    different = make_ensemble_step(build(dropout=0.5), fl.losses.cross_entropy, k=2, lr=1e-2)
    start = different.init(seeds=7)  # identical replicas: only the masks can tell them apart
    a = fl.fold(different, start, data, progress=False)
    assert fl.tree_equal(a, fl.fold(different, start, data, progress=False))
    assert not torch.equal(a.params["0.weight"][0], a.params["0.weight"][1])
    same = make_ensemble_step(build(dropout=0.5), fl.losses.cross_entropy, k=2, lr=1e-2, randomness="same")
    b = fl.fold(same, start, data, progress=False)
    assert torch.equal(b.params["0.weight"][0], b.params["0.weight"][1])
    strict = make_ensemble_step(build(dropout=0.5), fl.losses.cross_entropy, k=2, lr=1e-2, randomness="error")
    with pytest.raises(RuntimeError, match="randomness"):
        strict(start, data[0])


def poisoned(step, replica: int):
    state = step.init(seeds=SEEDS)
    weight = state.params["0.weight"].clone()
    weight[replica] = float("nan")
    return state.replace(params={**state.params, "0.weight": weight})


def test_nonfinite_raise_names_the_replicas():
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, lr=LRS)
    with pytest.raises(fl.NonFiniteError, match=r"replica\(s\) 2 \(lr 0.01, loss nan\)"):
        step(poisoned(step, 2), batches(n=1)[0])


def test_nonfinite_skip_leaves_only_the_bad_replica_unchanged():
    step = make_ensemble_step(build(bn=True), fl.losses.cross_entropy, k=K, lr=LRS, nonfinite="skip")
    buffers = []
    for donate in (False, True):
        state = poisoned(step, 1)
        before = fl.tree_clone(state)
        if donate:
            new = fl.fold(step, state, batches(n=1), progress=False, donate=True)
        else:
            new, metrics = step(state, batches(n=1)[0])
            assert metrics["skipped"].tolist() == [0.0, 1.0, 0.0, 0.0]
        assert fl.tree_equal(replica_state(new, 1).opt_state, replica_state(before, 1).opt_state)
        assert torch.equal(new.params["3.bias"][1], before.params["3.bias"][1])
        assert not torch.equal(new.params["3.bias"][0], before.params["3.bias"][0])
        assert new.opt_state.count.tolist() == [1, 0, 1, 1]
        buffers.append(new.buffers)
    # the fold and a call agree: every replica's forward moved its statistics (NaN for the poisoned one), as in torch
    torch.testing.assert_close(buffers[0], buffers[1], rtol=0, atol=0, equal_nan=True)


def test_sgd_momentum_starts_per_replica_after_a_skipped_first_update():
    # replica 1 skips update 0, so at update 1 its momentum buffer starts (copy of the gradient)
    # while the others' accumulate: the per-replica first-step path of the vectorised SGD (with dampening,
    # starting a buffer from zeros would give (1 - dampening) * g instead of g).
    data = batches(n=2)
    step = make_ensemble_step(
        build(),
        fl.losses.cross_entropy,
        k=K,
        optimizer="sgd",
        lr=LRS,
        options={"momentum": 0.9, "dampening": 0.5},
        nonfinite="skip",
    )
    clean = step.init(seeds=SEEDS)
    state, _ = step(poisoned(step, 1), data[0])
    weight = state.params["0.weight"].clone()
    weight[1] = clean.params["0.weight"][1]  # replica 1 back to its initial (finite) weights
    state = state.replace(params={**state.params, "0.weight": weight})
    state, _ = step(state, data[1])
    assert state.opt_state.count.tolist() == [2, 1, 2, 2]
    for i, seed in enumerate(SEEDS):
        alone = fl.make_train_step(build(seed), fl.losses.cross_entropy, fl.optim.sgd(LRS[i], momentum=0.9, dampening=0.5))
        ref = fl.fold(alone, alone.init(seed=seed), data[1:] if i == 1 else data, progress=False)
        assert max_diff(replica_state(state, i).params, ref.params) < 1e-6
        assert max_diff(replica_state(state, i).opt_state.momentum_buffer, ref.opt_state.momentum_buffer) < 1e-6


def test_nonfinite_ignore_trains_on():
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, lr=LRS, nonfinite="ignore")
    new, metrics = step(poisoned(step, 0), batches(n=1)[0])
    assert torch.isnan(metrics["loss"][0]) and bool(torch.isfinite(metrics["loss"][1:]).all()) and int(new.step) == 1


@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
def test_replica_step_continues_a_replica_under_the_ensembles_nonfinite_policy(nonfinite):
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, lr=LRS, nonfinite=nonfinite)
    state = step.init(seeds=SEEDS)
    x, y = batches(n=1)[0]
    bad = (torch.full_like(x, float("nan")), y)
    ensemble, _ = step(state, bad)  # every replica skips (or ignores) the non-finite loss ...
    alone, metrics = step.replica_step(1)(replica_state(state, 1), bad)  # ... and the replica alone does the same
    assert fl.tree_equal(alone.params, replica_state(ensemble, 1).params)
    assert int(alone.opt_state.count) == int(ensemble.opt_state.count[1]) == (0 if nonfinite == "skip" else 1)
    assert ("skipped" in metrics) == (nonfinite == "skip")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, r"k must be a positive int \(the number of replicas\), got 0"),
        ({"k": 4, "lr": [0.1, 0.2, 0.3]}, ValueError, r"lr has 3 values, expected k=4"),
        ({"k": 2, "lr": torch.ones(2, 2)}, ValueError, r"lr must be a float or 2 floats .* shape \[2, 2\]"),
        ({"k": 2, "optimizer": "lion"}, ValueError, r"optimizer must be one of \('adamw', 'adam', 'sgd'\), got 'lion'"),
        ({"k": 2, "optimizer": fl.optim.adamw(0.1)}, TypeError, r"optimizer must be the name of one of .*, got Optimizer;"),
        ({"k": 2, "options": {"beta1": 0.9}}, TypeError, r"unknown option\(s\) \['beta1'\] for optimizer 'adamw'"),
        ({"k": 2, "options": [("b1", 0.9)]}, TypeError, r"options must be a mapping"),
        ({"k": 2, "lr": fl.optim.cosine(0.1, 10)}, TypeError, r"lr must be a float or 2 floats .* got the schedule"),
        ({"k": 2, "lr": [0.1, fl.optim.linear(0.0, 0.1, 5)]}, TypeError, r"lr must be a float or 2 floats .* got the schedule"),
        (
            {"k": 2, "options": {"amsgrad": [True, False]}},
            TypeError,
            r"amsgrad is structural and must be the same for every replica",
        ),
        (
            {"k": 2, "options": {"b1": [0.9, 1.5]}},
            ValueError,
            r"replica 1: fnlight.optim.adamw: b1 must be in \[0.0, 1.0\), got 1.5",
        ),
        ({"k": 2, "lr": [0.1, -1.0]}, ValueError, r"replica 1: fnlight.optim.adamw: learning_rate must be"),
        (
            {"k": 2, "optimizer": "sgd", "options": {"momentum": [0.0, 0.9]}},
            ValueError,
            r"momentum must be > 0 for every replica or 0 for every replica",
        ),
        ({"k": 2, "per_replica_batch": 1}, TypeError, r"per_replica_batch must be a bool, got 1"),
        ({"k": 2, "randomness": "shared"}, ValueError, r"randomness must be one of \('different', 'same', 'error'\)"),
        ({"k": 2, "nonfinite": "stop"}, ValueError, r"nonfinite must be one of \('raise', 'skip', 'ignore'\)"),
    ],
)
def test_build_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_ensemble_step(build(), fl.losses.mse, **kwargs)


def test_model_and_loss_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        make_ensemble_step(build, fl.losses.mse, k=2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        make_ensemble_step(build(), "mse", k=2)
    frozen = build().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        make_ensemble_step(frozen, fl.losses.mse, k=2)


def test_init_errors():
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K)
    with pytest.raises(ValueError, match=r"got 3 seeds, expected k=4 \(one per replica\)"):
        step.init(seeds=[0, 1, 2])
    with pytest.raises(TypeError, match=r"seeds must be an int or a sequence of 4 ints, got \[0, 1, 2, 3.0\]"):
        step.init(seeds=[0, 1, 2, 3.0])
    with pytest.raises(TypeError, match=r"EnsembleStep.init: reinit must be a bool, got 0"):
        step.init(seeds=0, reinit=0)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(10, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.inner(x) * self.scale

    custom = make_ensemble_step(Scaled(), fl.losses.cross_entropy, k=2)
    with pytest.raises(ValueError, match=r"cannot re-draw parameter 'scale': its module \(Scaled\) has no reset_parameters\(\)"):
        custom.init(seeds=[0, 1])
    assert custom.init(seeds=[0, 1], reinit=False).params["scale"].shape == (2, 3)
    with pytest.raises(IndexError, match=r"replica_step: index 4 is out of range for an ensemble of 4 replicas"):
        step.replica_step(4)
    with pytest.raises(TypeError, match=r"replica_step: index must be an int, got '1'"):
        step.replica_step("1")


def test_step_errors():
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K)
    x, y = batches(n=1)[0]
    three = make_ensemble_step(build(), fl.losses.cross_entropy, k=3).init(seeds=[0, 1, 2])
    with pytest.raises(ValueError, match=r"built for k=4 replicas, got a state of 3 \(key shape \[3\]\)"):
        step(three, (x, y))
    single = fl.make_train_step(build(), fl.losses.cross_entropy, fl.optim.adamw(1e-3)).init()
    with pytest.raises(ValueError, match=r"expected a stacked ensemble state \(key of shape \[K\]\), .* key has shape \[\]"):
        step(single, (x, y))
    with pytest.raises(TypeError, match="expected a fnlight.TrainState as first argument, got dict"):
        step({}, (x, y))
    sgd_state = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, optimizer="sgd").init(seeds=0)
    with pytest.raises(TypeError, match="uses optimizer 'adamw' and needs an opt_state of type AdamState, got SgdState"):
        step(sgd_state, (x, y))
    amsgrad = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, options={"amsgrad": True})
    with pytest.raises(ValueError, match=r"built with nu_max \(amsgrad\) but the state has none"):
        amsgrad(step.init(seeds=0), (x, y))
    per = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, per_replica_batch=True)
    with pytest.raises(ValueError, match=r"batch leaf 0 has shape \[12, 10\]; expected tensors with a leading dimension of k=4"):
        per(per.init(seeds=0), (x, y))
    state = step.init(seeds=0)
    with pytest.raises(ValueError, match="does not depend on any trainable parameter"):
        make_ensemble_step(build(), lambda model, batch: batch[0].sum(), k=K)(state, (x, y))


def test_a_loss_that_reads_values_fails_under_vmap_with_a_note():
    def reads(model, batch):
        loss = fl.losses.cross_entropy(model, batch)
        return loss * 0 if loss.item() > 100 else loss

    step = make_ensemble_step(build(), reads, k=2)
    with pytest.raises(RuntimeError, match=r"vmap: It looks like you're calling \.item\(\)") as info:
        step(step.init(seeds=0), batches(n=1)[0])
    assert "ran under torch.func.vmap over 2 replicas" in "\n".join(info.value.__notes__)


def test_a_donated_ensemble_state_cannot_be_reused():
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=2)
    state = step.init(seeds=0)
    fl.fold(step, state, batches(n=1), progress=False, donate=True)
    with pytest.raises(fl.DonatedStateError, match="donated"):
        step(state, batches(n=1)[0])


def test_stack_states_errors():
    step = fl.make_train_step(build(), fl.losses.cross_entropy, fl.optim.adamw(1e-3))
    a, b = step.init(seed=0), step.init(seed=1)
    with pytest.raises(TypeError, match="expected a non-empty sequence of fnlight.TrainState"):
        stack_states([])
    with pytest.raises(TypeError, match="expected a non-empty sequence of fnlight.TrainState"):
        stack_states(a)
    with pytest.raises(TypeError, match=r"states\[1\]: expected a fnlight.TrainState, got dict"):
        stack_states([a, {}])
    later, _ = step(b, batches(n=1)[0])
    with pytest.raises(
        ValueError, match=r"states\[1\].step is 1, states\[0\].step is 0; the replicas of an ensemble advance together"
    ):
        stack_states([a, later])
    sgd = fl.make_train_step(build(), fl.losses.cross_entropy, fl.optim.sgd(0.1)).init()
    with pytest.raises(ValueError, match=r"states\[1\] has a different structure from states\[0\]"):
        stack_states([a, sgd])
    wide = fl.make_train_step(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(16, 3)), fl.losses.mse, fl.optim.adamw(1e-3))
    with pytest.raises(
        ValueError,
        match=r"states\[1\].params\['0.bias'\] is Tensor\[8\] float32 on cpu, states\[0\].params\['0.bias'\] is Tensor\[16\]",
    ):
        stack_states([a, wide.init()])
    with pytest.raises(
        ValueError, match=r"states\[1\].slots\['note'\] is 2, states\[0\].slots\['note'\] is 1; non-tensor leaves must be equal"
    ):
        stack_states([a.with_slot("note", 1), b.with_slot("note", 2)])


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)), r"module '1' is a Tanh, in states\[0\] a ReLU"),
        (
            nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)),
            r"module '1''s inplace is True, in states\[0\] False",
        ),
    ],
)
def test_stack_states_refuses_states_of_another_model(other, match):
    # the stacked state keeps states[0]'s skeleton: a Tanh replica stacked after a ReLU one would train and export as ReLU
    a = fl.make_train_step(build(), fl.losses.cross_entropy, fl.optim.adamw(1e-3)).init(seed=0)
    b = fl.make_train_step(other, fl.losses.cross_entropy, fl.optim.adamw(1e-3)).init(seed=1)
    with pytest.raises(ValueError, match=r"stack_states: states\[1\] is a state of another model than states\[0\] \(" + match):
        stack_states([a, b])
    same_model = fl.make_train_step(build(), fl.losses.cross_entropy, fl.optim.adamw(1e-3)).init(seed=1)
    assert stack_states([a, same_model]).params["0.weight"].shape == (2, 16, 10)  # another skeleton of the same model


def test_unstacking_errors():
    single = fl.make_train_step(build(), fl.losses.mse, fl.optim.sgd(0.1)).init()
    for fn in (unstack_states, ensemble_size, lambda s: replica_state(s, 0)):
        with pytest.raises(ValueError, match=r"expected a stacked ensemble state"):
            fn(single)
    stacked = stack_states([single, single])
    with pytest.raises(IndexError, match="index 2 is out of range for an ensemble of 2 replicas"):
        replica_state(stacked, 2)
    with pytest.raises(TypeError, match="index must be an int, got 1.0"):
        replica_state(stacked, 1.0)


def test_single_model_functions_refuse_a_stacked_state_by_name():
    step = make_ensemble_step(build(), fl.losses.cross_entropy, k=K, lr=LRS)
    state = step.init(seeds=SEEDS)
    x, y = batches(n=1)[0]
    single = fl.make_train_step(build(), fl.losses.cross_entropy, fl.optim.adamw(1e-3))
    calls = {
        "eval step": lambda: fl.evaluate(fl.make_eval_step(fl.losses.cross_entropy), state, [(x, y)]),
        "apply": lambda: fl.apply(state, x),
        "to_module": lambda: fl.to_module(state),
        "state_dict": lambda: fl.state_dict(state),
        "train step": lambda: single(state, (x, y)),
    }
    for where, call in calls.items():
        with pytest.raises(TypeError, match=rf"{where}: this is a stacked ensemble state of {K} replicas.*replica_state"):
            call()
    assert fl.to_module(replica_state(state, 1))(x).shape == (len(x), 3)  # one replica is one model's state


@pytest.mark.parametrize(
    ("value", "got"), [(0.05, "got 0.05"), (torch.tensor(0.05), r"got a tensor of shape \[\]"), (torch.ones(2), r"shape \[2\]")]
)
def test_an_edited_hyperparameter_must_keep_one_value_per_replica(value, got):
    step = make_ensemble_step(nn.Linear(4, 1), fl.losses.mse, k=3, lr=0.1)
    state = step.init(seeds=0)
    edited = state.replace(opt_state=state.opt_state._replace(hparams={**state.opt_state.hparams, "lr": value}))
    with pytest.raises(ValueError, match=rf"opt_state.hparams\['lr'\] must be a tensor of shape \[3\] .*{got}"):
        step(edited, (torch.randn(8, 4), torch.randn(8, 1)))
