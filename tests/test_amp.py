"""with_amp: bf16/fp16 autocast parity with hand-written loops, loss scaling, skipped steps, true mode."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, linear, sgd
from tests.conftest import make_batches


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def test_bf16_mixed_is_bitwise_equal_to_hand_autocast_loop():
    batches = make_batches(6)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    step = fl.with_amp(fl.make_train_step(mlp(), fl.losses.cross_entropy, adamw(1e-2)), dtype="bf16")
    state = fl.fold(step, step.init(), batches, progress=False)
    for name, p in model.named_parameters():
        assert state.params[name].dtype == torch.float32
        assert torch.equal(state.params[name], p.detach()), name


def test_fp16_mixed_matches_grad_scaler_loop():
    batches = make_batches(6)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    step = fl.with_amp(
        fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1, momentum=0.9)),
        dtype="fp16",
        init_scale=1024.0,
        growth_interval=2,
    )
    state = fl.fold(step, step.init(), batches, progress=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-6, atol=1e-7)
    assert float(state.slots["amp"].scale) == scaler.get_scale() == 8192.0


def overflow_loss(model, batch):
    """Cross-entropy plus ``k`` times the logits' sum: with a large ``k``, a finite loss whose scaled gradient overflows fp16."""
    x, y, k = batch
    out = model(x)
    return F.cross_entropy(out.float(), y) + k * out.float().sum()


def with_k(batches, k=0.0):
    return [(x, y, k) for x, y in batches]


def test_fp16_overflowing_gradients_are_skipped_and_halve_the_scale():
    batches = with_k(make_batches(3))
    step = fl.with_amp(fl.make_train_step(mlp(), overflow_loss, adamw(linear(1e-2, 0.0, 100))), dtype="fp16")
    state, _ = step(step.init(), batches[0])
    x, y, _ = batches[1]
    after, metrics = step(state, (x, y, 1e5))  # loss finite, gradients inf in fp16 once scaled: an overflow
    assert torch.isfinite(metrics["loss"])
    assert float(metrics["skipped"]) == 1.0
    assert float(metrics["loss_scale"]) == float(state.slots["amp"].scale) / 2
    assert fl.tree_equal(after.params, state.params)
    assert fl.tree_equal(after.opt_state, state.opt_state)  # moments, count and schedule value unchanged
    assert int(after.step) == int(state.step) == 1
    proceeded, metrics = step(after, batches[2])
    assert float(metrics["skipped"]) == 0.0 and int(proceeded.step) == 2
    assert float(proceeded.opt_state.hparams["lr"]) == pytest.approx(1e-2 * 0.99)


def test_fp16_scale_grows_after_interval_and_respects_floor():
    step = fl.with_amp(
        fl.make_train_step(mlp(), overflow_loss, sgd(0.01)),
        dtype="fp16",
        init_scale=4.0,
        growth_interval=3,
        min_scale=2.0,
    )
    state = fl.fold(step, step.init(), with_k(make_batches(6)), progress=False)
    assert float(state.slots["amp"].scale) == 16.0
    x, y = make_batches(1)[0]
    for _ in range(4):
        state, metrics = step(state, (x, y, 1e6))
        assert float(metrics["skipped"]) == 1.0
    assert float(metrics["loss_scale"]) == 2.0


def nan_batch(batch):
    x, y = batch
    return (x.clone().fill_(float("nan")), y)


def test_fp16_nonfinite_loss_goes_to_the_nonfinite_policy_and_keeps_the_scale():
    batches = make_batches(2)

    def build(nonfinite):
        core = fl.make_train_step(mlp(), fl.losses.cross_entropy, adamw(1e-2), nonfinite=nonfinite)
        return fl.with_amp(core, dtype="fp16", init_scale=1024.0, growth_interval=2)

    step = build("raise")
    state, _ = step(step.init(), batches[0])
    with pytest.raises(fl.NonFiniteError, match="non-finite values at update 1 .*loss = nan"):
        step(state, nan_batch(batches[1]))
    for policy in ("skip", "stop"):
        step = build(policy)
        state, _ = step(step.init(), batches[0])  # one finite update: the growth count is 1 of 2
        after, metrics = step(state, nan_batch(batches[1]))
        assert float(metrics["skipped"]) == 1.0 and int(after.step) == 1
        assert bool(after.stop) == (policy == "stop")
        assert fl.tree_equal(after.params, state.params) and fl.tree_equal(after.opt_state, state.opt_state)
        assert fl.tree_equal(after.slots["amp"], state.slots["amp"])  # no back-off, and the growth count kept
        assert float(metrics["loss_scale"]) == 1024.0
    # under "ignore" a non-finite loss is skipped as an overflow
    step = build("ignore")
    state, _ = step(step.init(), batches[0])
    after, metrics = step(state, nan_batch(batches[1]))
    assert float(metrics["skipped"]) == 1.0 and float(metrics["loss_scale"]) == 512.0 and int(after.step) == 1


def test_fp16_nonfinite_loss_behind_finite_gradients_is_skipped_under_ignore():
    # a non-finite constant in the loss leaves the gradients finite; "ignore" still skips it as an overflow
    # (was: applied, skipped 0, the scale kept)
    def inf_loss(model, batch):
        return fl.losses.cross_entropy(model, batch) + torch.tensor(float("inf"))

    step = fl.with_amp(fl.make_train_step(mlp(), inf_loss, adamw(1e-2), nonfinite="ignore"), dtype="fp16", init_scale=1024.0)
    state = step.init()
    after, metrics = step(state, make_batches(1)[0])
    assert float(metrics["skipped"]) == 1.0 and float(metrics["loss_scale"]) == 512.0 and int(after.step) == 0
    assert fl.tree_equal(after.params, state.params) and fl.tree_equal(after.opt_state, state.opt_state)


def test_fp16_nonfinite_loss_under_accumulation_reaches_the_policy():
    core = fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1), nonfinite="stop")
    step = fl.with_grad_accum(fl.with_amp(core, dtype="fp16"), every=2)
    batches = make_batches(4)
    state = fl.fold(step, step.init(), [batches[0], batches[1], nan_batch(batches[2]), batches[3]], progress=False)
    assert int(state.step) == 1 and bool(state.stop)


def test_true_bf16_mode_casts_params_and_optimizer_state():
    step = fl.with_amp(fl.make_train_step(mlp(), fl.losses.cross_entropy, adamw(1e-2)), dtype="bf16", mode="true")
    state = step.init()
    assert all(p.dtype == torch.bfloat16 for p in state.params.values())
    assert all(m.dtype == torch.bfloat16 for m in state.opt_state.mu.values())
    new = fl.fold(step, state, make_batches(4), progress=False)
    assert all(p.dtype == torch.bfloat16 for p in new.params.values()) and int(new.step) == 4
    assert not fl.tree_equal(new.params, state.params)


def test_amp_inside_accumulation_and_order_enforced():
    core = fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1))
    step = fl.with_grad_accum(fl.with_amp(core, dtype="fp16"), every=2)
    state = fl.fold(step, step.init(), make_batches(4), progress=False)
    assert int(state.step) == 2 and set(state.slots) == {"amp", "grad_accum"}
    with pytest.raises(ValueError, match="with_amp cannot wrap a step already wrapped by with_grad_accum: apply with_amp first"):
        fl.with_amp(fl.with_grad_accum(core, every=2))


def digits_loss(dtype):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1408, 64)]
    test = [(x[1408:], y[1408:])]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    step = fl.make_train_step(model, fl.losses.cross_entropy, adamw(3e-3))
    if dtype is not None:
        step = fl.with_amp(step, dtype=dtype)
    state = fl.fold(step, step.init(), batches, epochs=4, progress=False)
    return fl.evaluate(fl.make_eval_step(fl.losses.cross_entropy), state, test)["loss"]


def test_bf16_and_fp16_track_fp32_on_digits():
    """Documented tolerance: final test loss within 0.03 (absolute) of fp32 after 4 epochs."""
    reference = digits_loss(None)
    for dtype in ("bf16", "fp16"):
        assert abs(digits_loss(dtype) - reference) < 0.03, dtype


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "fp8"}, "dtype must be 'bf16' or 'fp16' .* got 'fp8'"),
        ({"dtype": torch.float32}, "dtype must be 'bf16' or 'fp16'"),
        ({"mode": "pure"}, "mode must be 'mixed' or 'true', got 'pure'"),
        ({"dtype": ["fp16"]}, r"dtype must be 'bf16' or 'fp16' .* got \['fp16'\]"),
        ({"init_scale": 0}, "init_scale must be a finite number > 0.0 .*, got 0"),
        ({"init_scale": float("inf")}, "init_scale must be a finite number > 0.0 .*, got inf"),
        ({"init_scale": 1e40}, r"init_scale must be a finite number > 0.0 \(a float32: at most 3.403e\+38\), got 1e\+40"),
        ({"growth_factor": 1.0}, "growth_factor must be a finite number > 1.0 .*, got 1.0"),
        ({"growth_factor": float("inf")}, "growth_factor must be a finite number > 1.0 .*, got inf"),
        ({"min_scale": float("nan")}, "min_scale must be a finite number > 0.0 .*, got nan"),
        ({"backoff_factor": 1.5}, r"backoff_factor must be in \(0, 1\), got 1.5"),
        ({"growth_interval": 0}, r"growth_interval must be an int in \[1, 2\*\*31\) \(an int32 count\), got 0"),
        ({"growth_interval": 2**63}, r"growth_interval must be an int in \[1, 2\*\*31\) .*, got 9223372036854775808"),
        (
            {"init_scale": 1e-46, "min_scale": 1e-46},
            r"init_scale must be at least 1.175e-38 \(float32's smallest normal\), got 1e-46",
        ),
        ({"min_scale": 1e9}, r"min_scale \(1000000000.0\) must not exceed init_scale \(65536.0\)"),
    ],
)
def test_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fl.with_amp(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), **kwargs)


def test_amp_twice_or_on_a_non_step_is_rejected():
    amp = fl.with_amp(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)))
    with pytest.raises(ValueError, match="already wrapped by with_amp"):
        fl.with_amp(amp)
    with pytest.raises(TypeError, match="with_amp: expected a train step"):
        fl.with_amp(fl.make_eval_step(fl.losses.cross_entropy))


def test_an_observer_keeps_each_updates_loss_scale():
    kept = []
    step = fl.with_amp(
        fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), dtype="fp16", init_scale=512.0, growth_interval=1
    )
    observer = fl.Observer(lambda s, m: kept.append(m["loss_scale"]), steps=1)
    fl.fold(step, step.init(), make_batches(4), observers=[observer], progress=False)
    assert [float(v) for v in kept] == [1024.0, 2048.0, 4096.0, 8192.0]


def test_true_mode_casts_the_floating_tensors_of_the_batchs_containers_and_passes_other_objects_as_they_are():
    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor

    seen = []

    def loss(model, batch):
        x = batch.x if isinstance(batch, Batch) else batch["x"][0]
        seen.append(x.dtype)
        return (model(x.to(torch.bfloat16)).float() ** 2).mean()

    step = fl.with_amp(fl.make_train_step(nn.Linear(2, 1), loss, fl.optim.sgd(0.1)), mode="true")
    state = step.init()
    step(state, {"x": [torch.ones(3, 2)]})
    step(state, Batch(torch.ones(3, 2)))
    assert seen == [torch.bfloat16, torch.float32]  # docs/transforms.md: a dataclass is not a container optree knows
