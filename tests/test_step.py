"""The core train/eval steps: parity with hand-written loops, purity, determinism, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnlight as fl
from fnlight.optim import adamw
from tests.conftest import make_batches, make_bn_mlp


def hand_loop(model, batches, steps, *, seed=None, fused=True, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)
    model.train()
    for k in range(steps):
        x, y = batches[k % len(batches)]
        opt.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(fl.derive_seed(seed, k, 0))
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def run_steps(step, state, batches, steps):
    for k in range(steps):
        state, _ = step(state, batches[k % len(batches)])
    return state


def assert_params_equal(state, module):
    for name, p in module.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
    for name, b in module.named_buffers():
        assert torch.equal(state.buffers[name], b), name


def test_50_steps_bitwise_equal_to_hand_loop_with_batchnorm(batches):
    reference = hand_loop(make_bn_mlp(), batches, 50)
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    assert_params_equal(run_steps(step, step.init(), batches, 50), reference)


def test_fold_bitwise_equal_to_hand_loop(batches):
    reference = hand_loop(make_bn_mlp(), batches, 48)
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    assert_params_equal(fl.fold(step, step.init(), batches, epochs=6, progress=False), reference)


def test_dropout_bitwise_equal_to_hand_loop_with_same_counter_seeds(batches):
    reference = hand_loop(make_bn_mlp(dropout=0.3), batches, 50, seed=7)
    step = fl.make_train_step(make_bn_mlp(dropout=0.3), fl.losses.cross_entropy, adamw(1e-2))
    state = fl.fold(step, step.init(seed=7), batches, max_steps=50, epochs=100, progress=False)
    assert_params_equal(state, reference)


def test_step_leaves_input_state_untouched(batches):
    step = fl.make_train_step(make_bn_mlp(dropout=0.2), fl.losses.cross_entropy, adamw(1e-2))
    state = run_steps(step, step.init(), batches, 2)
    before = fl.tree_clone(state)
    step(state, batches[0])
    assert fl.tree_equal(state, before)


def test_same_inputs_give_identical_outputs(batches):
    step = fl.make_train_step(make_bn_mlp(dropout=0.5), fl.losses.classification, adamw(1e-2))
    state = step.init(seed=3)
    torch.manual_seed(123)
    a, ma = step(state, batches[0])
    torch.rand(5)  # global RNG use in between must not matter
    b, mb = step(state, batches[0])
    assert fl.tree_equal(a, b) and fl.tree_equal(ma, mb)


def test_dropout_depends_on_seed_and_step(batches):
    step = fl.make_train_step(make_bn_mlp(dropout=0.5), fl.losses.cross_entropy, adamw(1e-2))
    _, m1 = step(step.init(seed=1), batches[0])
    _, m2 = step(step.init(seed=2), batches[0])
    assert not torch.equal(m1["loss"], m2["loss"])


def test_step_does_not_touch_global_rng(batches):
    step = fl.make_train_step(make_bn_mlp(dropout=0.5), fl.losses.cross_entropy, adamw(1e-2))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    step(step.init(), batches[0])
    assert torch.equal(torch.rand(3), expected)


def test_init_aliases_model_tensors_and_leaves_model_intact():
    model = make_bn_mlp()
    before = copy.deepcopy(model.state_dict())
    step = fl.make_train_step(model, fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    state, _ = step(state, make_batches(1)[0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert state.skeleton is not model and all(p.is_meta for p in state.skeleton.parameters())
    assert state.step.dtype == torch.int64 and state.step.ndim == 0


def test_batchnorm_stats_come_back_in_state_and_eval_mode_is_explicit(batches):
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    new, _ = step(state, batches[0])
    assert int(new.buffers["1.num_batches_tracked"]) == 1
    assert not torch.equal(new.buffers["1.running_mean"], state.buffers["1.running_mean"])
    evaluated = fl.make_eval_step(fl.losses.cross_entropy)(new, batches[0])
    reference = fl.to_module(new)
    assert torch.equal(evaluated["loss"], F.cross_entropy(reference(batches[0][0]), batches[0][1]))
    assert int(new.buffers["1.num_batches_tracked"]) == 1


def test_frozen_parameters_are_carried_not_updated(batches):
    model = make_bn_mlp()
    model[0].weight.requires_grad_(False)
    step = fl.make_train_step(model, fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    new = run_steps(step, state, batches, 3)
    assert torch.equal(new.params["0.weight"], state.params["0.weight"])
    assert "0.weight" not in new.opt_state.mu
    assert not torch.equal(new.params["3.weight"], state.params["3.weight"])


def test_unused_parameters_are_skipped_like_torch_optim(batches):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.used, self.unused = nn.Linear(10, 3), nn.Linear(10, 3)

        def forward(self, x):
            return self.used(x)

    step = fl.make_train_step(TwoHeads(), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    new = run_steps(step, state, batches, 2)
    assert torch.equal(new.params["unused.weight"], state.params["unused.weight"])
    assert set(new.opt_state.mu) == set(state.opt_state.mu)


def test_tied_weights_share_one_state_entry():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x))

    model = Tied()
    step = fl.make_train_step(model, lambda m, b: F.cross_entropy(m(b), b), adamw(1e-2))
    state = step.init()
    assert list(state.params) == ["emb.weight"]
    new, _ = step(state, torch.tensor([0, 1, 2]))
    reference = copy.deepcopy(model)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    F.cross_entropy(reference(torch.tensor([0, 1, 2])), torch.tensor([0, 1, 2])).backward()
    opt.step()
    assert torch.equal(new.params["emb.weight"], reference.emb.weight.detach())


def test_aux_metrics_are_detached_scalars(batches):
    step = fl.make_train_step(make_bn_mlp(), fl.losses.classification, adamw(1e-2))
    _, metrics = step(step.init(), batches[0])
    assert set(metrics) == {"loss", "accuracy"}
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())


def test_batch_the_loss_cannot_take_names_the_batch(batches):
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    with pytest.raises(RuntimeError) as info:
        step(step.init(), (torch.zeros(4, 7), torch.zeros(4, dtype=torch.long)))
    notes = "\n".join(info.value.__notes__)
    assert "train step 0: loss_fn 'cross_entropy' raised on a batch (Tensor[4, 7] float32, Tensor[4] int64)" in notes


def test_wrong_batch_structure_is_named():
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    with pytest.raises(TypeError, match="expected a batch \\(inputs, targets\\), got dict"):
        step(step.init(), {"x": torch.zeros(2, 10)})


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (lambda m, b: m(b[0]), TypeError, r"must return a 0-d floating-point loss tensor .* got Tensor\[16, 3\] float32"),
        (lambda m, b: 1.0, TypeError, "must return a 0-d floating-point loss tensor .* got 1.0"),
        (lambda m, b: (m(b[0]).sum(), {"acc": 0.5}), TypeError, "auxiliary metric 'acc' must be a 0-d tensor"),
        (lambda m, b: torch.tensor(1.0), ValueError, "does not depend on any trainable parameter"),
    ],
)
def test_bad_loss_outputs(batches, loss_fn, error, match):
    step = fl.make_train_step(make_bn_mlp(), loss_fn, adamw(1e-2))
    with pytest.raises(error, match=match):
        step(step.init(), batches[0])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((nn.Linear, fl.losses.mse, adamw(1e-3)), TypeError, "model must be a torch.nn.Module, got type"),
        (("model", fl.losses.mse, adamw(1e-3)), TypeError, "model must be a torch.nn.Module, got str"),
        ((nn.Linear(2, 1), "mse", adamw(1e-3)), TypeError, "loss_fn must be callable"),
        ((nn.Linear(2, 1), fl.losses.mse, "adamw"), TypeError, "optimizer must be a fnlight.optim.Optimizer"),
        ((nn.ReLU(), fl.losses.mse, adamw(1e-3)), ValueError, "no parameter with requires_grad=True"),
    ],
)
def test_make_train_step_validates_inputs(args, error, match):
    with pytest.raises(error, match=match):
        fl.make_train_step(*args)


def test_torch_optimizer_is_rejected_with_hint():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="torch.optim optimizers are not functional"):
        fl.make_train_step(model, fl.losses.mse, torch.optim.SGD(model.parameters(), lr=0.1))


def test_negative_learning_rate_and_unknown_option_are_rejected():
    with pytest.raises(ValueError, match="fnlight.optim.adamw: learning_rate must be in \\[0.0, inf\\), got -0.1"):
        adamw(-0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'beta1'"):
        adamw(1e-3, beta1=0.9)


def test_step_and_eval_reject_non_states_and_bad_seed():
    step = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, adamw(1e-3))
    with pytest.raises(TypeError, match="expected a fnlight.TrainState as first argument, got dict"):
        step({}, None)
    with pytest.raises(TypeError, match="expected a fnlight.TrainState as first argument, got int"):
        fl.make_eval_step(fl.losses.mse)(3, None)
    with pytest.raises(TypeError, match="seed must be an int, got 1.5"):
        step.init(seed=1.5)
    with pytest.raises(TypeError, match="make_eval_step: loss_fn must be callable"):
        fl.make_eval_step(None)
    with pytest.raises(ValueError, match="has no module skeleton"):
        step(step.init().replace(skeleton=None), None)


def test_eval_step_error_note_mentions_update(batches):
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    with pytest.raises(RuntimeError) as info:
        fl.make_eval_step(fl.losses.cross_entropy)(step.init(), (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)))
    assert "eval step at update 0" in "\n".join(info.value.__notes__)


def test_clipping_reports_the_pre_clip_norm(batches):
    model = make_bn_mlp()
    reference = make_bn_mlp()
    step = fl.make_train_step(model, fl.losses.cross_entropy, fl.optim.chain(fl.optim.clip_by_global_norm(0.1), adamw(1e-2)))
    state, metrics = step(step.init(), batches[0])
    F.cross_entropy(reference(batches[0][0]), batches[0][1]).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    assert torch.equal(metrics["grad_norm"], expected)
    assert int(state.step) == 1


def test_grads_and_update_phases_compose_to_the_step(batches):
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    g = step.grads(state, batches[0])
    assert set(g.grads) == set(state.params) and torch.equal(g.loss, g.metrics["loss"])
    phased, _ = step.update(state, g)
    whole, _ = step(state, batches[0])
    assert fl.tree_equal(phased, whole)


@pytest.mark.parametrize("optimizer", [fl.optim.sgd(0.1), adamw(1e-2)], ids=["sgd", "adamw"])
def test_update_refuses_gradients_for_frozen_or_unknown_parameters(optimizer, batches):
    model = make_bn_mlp()
    model[0].bias.requires_grad_(False)
    step = fl.make_train_step(model, fl.losses.cross_entropy, optimizer)
    state = step.init()
    g = step.grads(state, batches[0])
    frozen = g._replace(grads={**g.grads, "0.bias": torch.ones(32)})  # sgd updated the frozen bias with it
    with pytest.raises(ValueError, match=r"update at update 0: g.grads holds gradients for frozen parameters .* \['0.bias'\]"):
        step.update(state, frozen)
    typo = g._replace(grads={**g.grads, "0.wieght": g.grads["0.weight"]})  # a bare KeyError
    with pytest.raises(ValueError, match=r"gradients for names that are no parameter of the state \['0.wieght'\]"):
        step.update(state, typo)
    with pytest.raises(TypeError, match=r"g must be a fnlight.Gradients .* got tuple"):  # an AttributeError
        step.update(state, tuple(g))
    assert torch.equal(step.update(state, g)[0].params["0.bias"], state.params["0.bias"])


def test_grads_into_buffers_missing_one_names_it(batches):
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, fl.optim.sgd(0.1))
    state = step.init()
    buffers = {n: torch.zeros_like(p) for n, p in state.params.items() if n != "3.bias"}
    with pytest.raises(ValueError, match=r"GradContext.accumulate must hold a gradient buffer .* has none for \['3.bias'\]"):
        step.grads(state, batches[0], fl.GradContext(accumulate=buffers))  # a bare KeyError: '3.bias'
    assert all(not b.any() for b in buffers.values())
    buffers["3.bias"] = torch.zeros_like(state.params["3.bias"])
    into = step.grads(state, batches[0], fl.GradContext(accumulate=buffers))
    fresh = step.grads(state, batches[0])
    assert all(torch.equal(into.grads[n], fresh.grads[n]) and into.grads[n] is buffers[n] for n in buffers)


def nan_on(bad_batch):
    def loss_fn(model, batch):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * float("nan") if batch is bad_batch else loss

    return loss_fn


def test_nonfinite_loss_raises_naming_update_and_tensors(batches):
    step = fl.make_train_step(make_bn_mlp(), nan_on(batches[2]), adamw(1e-2))
    with pytest.raises(
        fl.NonFiniteError,
        match=r"non-finite values at update 2 \(epoch index 0, 3 batches into it\): loss = nan; gradients with NaN/inf: 0.weight",
    ):
        fl.fold(step, step.init(), batches, progress=False)


def test_nonfinite_skip_leaves_params_moments_and_count_and_keeps_the_forwards_buffers(batches):
    step = fl.make_train_step(make_bn_mlp(), nan_on(batches[1]), adamw(1e-2), nonfinite="skip")
    state, m0 = step(step.init(), batches[0])
    skipped, m1 = step(state, batches[1])
    assert float(m0["skipped"]) == 0.0 and float(m1["skipped"]) == 1.0
    assert all(fl.tree_equal(getattr(skipped, f), getattr(state, f)) for f in ("step", "params", "opt_state"))
    module = fl.to_module(state).train()
    module(batches[1][0])  # as torch: the skipped batch's forward pass moved BatchNorm's statistics
    assert fl.tree_equal(skipped.buffers, dict(module.named_buffers()))
    final = fl.fold(step, step.init(), batches, progress=False)
    assert int(final.step) == len(batches) - 1 and not bool(final.stop)
    pure = step.init()
    for batch in batches:
        pure, _ = step(pure, batch)
    assert fl.tree_equal(final.buffers, pure.buffers) and fl.tree_equal(final.params, pure.params)  # the fold = calls


def test_nonfinite_stop_ends_the_fold(batches):
    step = fl.make_train_step(make_bn_mlp(), nan_on(batches[3]), adamw(1e-2), nonfinite="stop")
    final = fl.fold(step, step.init(), batches, epochs=3, progress=False)
    assert int(final.step) == 3 and bool(final.stop)
    assert all(bool(torch.isfinite(p).all()) for p in final.params.values())


def test_check_grads_does_not_mistake_huge_finite_gradients_for_non_finite():
    def loss_fn(model, batch):  # every gradient ~1e19: finite, but their float32 norm overflows
        return model(batch[0]).mean() * 1e19

    step = fl.make_train_step(nn.Linear(8, 1), loss_fn, fl.optim.sgd(1e-30), nonfinite="skip", check_grads=True)
    state, metrics = step(step.init(), (torch.ones(4, 8), None))
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1


def test_nonfinite_gradient_behind_finite_loss_needs_check_grads(batches):
    def loss_fn(model, batch):
        out = model(batch[0])
        return F.cross_entropy(out, batch[1]) + 0.0 * torch.sqrt(out[0, 0] * 0.0)  # d/dx sqrt(0) = inf

    quiet = fl.make_train_step(make_bn_mlp(), loss_fn, fl.optim.sgd(0.1), nonfinite="raise")
    state, _ = quiet(quiet.init(), batches[0])
    assert not all(bool(torch.isfinite(p).all()) for p in state.params.values())
    strict = fl.make_train_step(make_bn_mlp(), loss_fn, fl.optim.sgd(0.1), check_grads=True)
    with pytest.raises(fl.NonFiniteError, match="loss = .*; gradients with NaN/inf: 0.weight, 0.bias"):
        strict(strict.init(), batches[0])


def test_nonfinite_ignore_trains_through(batches):
    step = fl.make_train_step(make_bn_mlp(), nan_on(batches[0]), adamw(1e-2), nonfinite="ignore")
    state, metrics = step(step.init(), batches[0])
    assert "skipped" not in metrics and int(state.step) == 1


def test_nonfinite_options_are_validated():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip', 'stop', 'ignore'\), got 'warn'"):
        fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2), nonfinite="warn")
    with pytest.raises(TypeError, match="check_grads must be a bool, got 1"):
        fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2), check_grads=1)


@pytest.mark.parametrize("layout", ["N,C", "N,C,L", "C"])
def test_classification_accuracy_takes_the_class_dimension_cross_entropy_takes(layout):
    g = torch.Generator().manual_seed(3)
    shape = {"N,C": (12, 5), "N,C,L": (4, 5, 7), "C": (5,)}[layout]
    logits = torch.randn(*shape, generator=g)
    classes = 1 if logits.ndim > 1 else 0
    y = logits.argmax(classes)
    if logits.ndim > 1:
        y = y.clone()
        y.view(-1)[:3] = (y.view(-1)[:3] + 1) % 5  # three wrong
    model = nn.Identity()
    loss, aux = fl.losses.classification(model, (logits, y))
    assert torch.equal(loss, F.cross_entropy(logits, y))
    wrong = 3 if logits.ndim > 1 else 0
    assert float(aux["accuracy"]) == pytest.approx(1 - wrong / y.numel())
    probabilities = F.one_hot(y, 5).movedim(-1, classes).float()  # class probabilities: their argmax is the class
    assert float(fl.losses.classification(model, (logits, probabilities))[1]["accuracy"]) == pytest.approx(1 - wrong / y.numel())


def test_classification_accuracy_leaves_out_ignored_targets_as_the_loss_does():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, -100, -100])  # one right, one wrong, two padding
    loss, aux = fl.losses.classification(nn.Identity(), (logits, y))
    assert torch.equal(loss, F.cross_entropy(logits, y)) and float(aux["accuracy"]) == 0.5


def test_init_refuses_a_model_whose_trainable_parameters_changed_after_the_step_was_built():
    model = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1))
    step = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"changed after make_train_step, .*gone: \['0.weight'\]; new: \[\]"):
        step.init()
    model[0].weight.requires_grad_(True)
    model[1] = nn.Sequential(nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"gone: \['1.bias', '1.weight'\]; new: \['1.1.bias', '1.1.weight'\]"):
        step.init()


def test_a_state_of_another_model_is_refused_by_name():
    step = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    other = fl.make_train_step(nn.Sequential(nn.Linear(2, 1)), fl.losses.mse, fl.optim.sgd(0.1)).init()
    with pytest.raises(ValueError, match=r"the state has no parameter 'weight' \(of 2 missing\) .*\['0.bias', '0.weight'\]"):
        step(other, (torch.ones(3, 2), torch.zeros(3, 1)))


def test_evaluation_and_apply_leave_a_buffer_the_forward_writes_in_eval_mode_alone():
    class Counting(nn.Linear):
        def __init__(self):
            super().__init__(2, 1)
            self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

        def forward(self, x):
            self.seen += len(x)  # whatever the mode
            return super().forward(x)

    state = fl.make_train_step(Counting(), fl.losses.mse, fl.optim.sgd(0.1)).init()
    batch = (torch.ones(3, 2), torch.zeros(3, 1))
    fl.evaluate(fl.make_eval_step(fl.losses.mse), state, [batch, batch])
    fl.apply(state, batch[0])
    assert int(state.buffers["seen"]) == 0


def test_init_refuses_a_seed_outside_int64():
    step = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    assert int(step.init(seed=2**63 - 1).key) == 2**63 - 1 and int(step.init(seed=-(2**63)).key) == -(2**63)
    with pytest.raises(ValueError, match=r"TrainStep.init: seed must fit in int64 .*, got 18446744073709551616"):
        step.init(seed=2**64)
