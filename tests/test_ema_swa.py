"""with_ema, with_swa, averaged and update_bn: bitwise parity with torch.optim.swa_utils, accumulation, resume, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn
from torch.optim.swa_utils import update_bn as torch_update_bn

import fnlight as fl
from fnlight.optim import adamw
from fnlight.transforms import EmaState, SwaState, averaged, update_bn, with_ema, with_swa
from tests.conftest import make_batches, make_bn_mlp


def core(dropout=0.0, **options):
    return fl.make_train_step(make_bn_mlp(dropout=dropout), fl.losses.cross_entropy, adamw(1e-2), **options)


def hand_loop(batches, averager, due=lambda n: True):
    """torch.optim.AdamW (fused, as fnlight's adamw) and an AveragedModel updated after the due optimizer steps."""
    model = make_bn_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    avg = averager(model)
    model.train()
    for n, (x, y) in enumerate(batches, 1):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if due(n):
            avg.update_parameters(model)
    return model, avg


def run(step, batches, *, in_fold):
    if in_fold:
        return fl.fold(step, step.init(), batches, progress=False)
    state = step.init()
    for b in batches:
        state, _ = step(state, b)
    return state


def assert_module_equal(state, module, *, buffers=True):
    for name, p in module.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
    if buffers:
        for name, b in module.named_buffers():
            if b.is_floating_point():
                assert torch.equal(state.buffers[name], b), name


@pytest.mark.parametrize("in_fold", [False, True], ids=["pure", "fold"])
@pytest.mark.parametrize("use_buffers", [True, False])
def test_ema_equals_averaged_model_with_ema_multi_avg_fn(in_fold, use_buffers):
    batches = make_batches(12, batch=8)
    ema_fn = get_ema_multi_avg_fn(0.9)
    model, reference = hand_loop(batches, lambda m: AveragedModel(m, multi_avg_fn=ema_fn, use_buffers=use_buffers))
    state = run(with_ema(core(), decay=0.9, use_buffers=use_buffers), batches, in_fold=in_fold)
    assert_module_equal(state, model)  # the raw weights train exactly as torch's
    assert int(state.slots["ema"].count) == int(reference.n_averaged) == 12
    assert_module_equal(averaged(state), reference.module)
    assert not torch.equal(averaged(state).params["0.weight"], state.params["0.weight"])


def test_ema_start_every_and_warmup_equal_averaged_model():
    batches = make_batches(12, batch=8)

    def warm(ema, current, n):  # torch's multi_avg_fn protocol (per device and dtype); n: updates averaged so far
        if ema[0].is_floating_point():
            torch._foreach_lerp_(ema, current, 1.0 - min(0.95, (1 + int(n)) / (10 + int(n))))

    _, reference = hand_loop(batches, lambda m: AveragedModel(m, multi_avg_fn=warm, use_buffers=True), lambda n: n >= 3 and n % 2)
    state = run(with_ema(core(), decay=0.95, start=3, every=2, warmup=True), batches, in_fold=True)
    assert int(state.slots["ema"].count) == int(reference.n_averaged) == 5  # updates 3, 5, 7, 9, 11
    assert_module_equal(averaged(state), reference.module, buffers=False)
    for name, b in reference.module.named_buffers():  # averaged at update 11, the slot's last
        if b.is_floating_point():
            assert torch.equal(state.slots["ema"].buffers[name], b), name


@pytest.mark.parametrize("in_fold", [False, True], ids=["pure", "fold"])
def test_swa_equals_averaged_model_with_the_foreach_average(in_fold):
    batches = make_batches(12, batch=8)
    swa_fn = get_swa_multi_avg_fn()  # AveragedModel's default on CUDA; on CPU it divides per tensor (next test)
    _, reference = hand_loop(batches, lambda m: AveragedModel(m, multi_avg_fn=swa_fn), lambda n: n >= 4 and (n - 4) % 3 == 0)
    state = run(with_swa(core(), start=4, every=3), batches, in_fold=in_fold)
    assert int(state.slots["swa"].count) == int(reference.n_averaged) == 3  # updates 4, 7, 10
    assert_module_equal(averaged(state, "swa"), reference.module, buffers=False)
    assert fl.tree_equal(averaged(state).buffers, state.buffers)  # use_buffers=False: the current buffers


@pytest.mark.parametrize(("start", "due"), [(0, (3, 6, 9)), (1, (1, 4, 7, 10))])
def test_start_zero_averages_the_multiples_of_every_and_start_one_the_first_update(start, due):
    batches = make_batches(10, batch=8)
    swa_fn = get_swa_multi_avg_fn()
    _, reference = hand_loop(batches, lambda m: AveragedModel(m, multi_avg_fn=swa_fn), lambda n: n in due)
    state = run(with_swa(core(), start=start, every=3), batches, in_fold=True)
    assert int(state.slots["swa"].count) == int(reference.n_averaged) == len(due)
    assert_module_equal(averaged(state, "swa"), reference.module, buffers=False)


def test_swa_with_buffers_matches_the_default_cpu_average_and_takes_integer_buffers_as_they_are():
    batches = make_batches(6, batch=8)
    _, reference = hand_loop(batches, lambda m: AveragedModel(m, use_buffers=True))  # avg + (p - avg) / (n + 1)
    state = run(with_swa(core(), start=0, use_buffers=True), batches, in_fold=True)
    got = averaged(state)
    for name, t in [*reference.module.named_parameters(), *reference.module.named_buffers()]:
        if t.is_floating_point():
            torch.testing.assert_close(got.params.get(name, got.buffers.get(name)), t.detach(), rtol=1e-6, atol=1e-7)
    assert set(state.slots["swa"].buffers) == {"1.running_mean", "1.running_var"}
    assert int(got.buffers["1.num_batches_tracked"]) == 6


def test_ema_moves_once_per_update_under_accumulation():
    batches = make_batches(10, batch=8)
    inner = fl.with_grad_accum(core(), every=4)
    module = make_bn_mlp()
    reference = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    state = inner.init()
    for b in batches:  # the reference: torch's EMA fed fnlight's weights after each update
        new, _ = inner(state, b)
        if int(new.step) != int(state.step):
            fl.copy_into_module_(new, module)
            reference.update_parameters(module)
        state = new
    state, _ = inner.flush(state)
    fl.copy_into_module_(state, module)
    reference.update_parameters(module)
    step = with_ema(fl.with_grad_accum(core(), every=4), decay=0.8)
    got = fl.fold(step, step.init(), batches, progress=False)
    assert int(got.step) == 3 and int(got.slots["ema"].count) == int(reference.n_averaged) == 3  # windows 4, 4, 2
    assert_module_equal(averaged(got), reference.module)


def test_skipped_updates_are_not_averaged():
    batches = make_batches(4, batch=8)
    bad = (torch.full((8, 10), float("nan")), batches[0][1])
    step = with_ema(core(nonfinite="skip"), decay=0.5)
    state = fl.fold(step, step.init(), [batches[0], bad, batches[1]], progress=False)
    assert int(state.step) == 2 and int(state.slots["ema"].count) == 2


def test_the_update_phase_averages_once():
    step = with_swa(core(), start=1)
    state = step.init()
    batch = make_batches(1)[0]
    new, _ = step.update(state, step.grads(state, batch))
    assert int(new.slots["swa"].count) == 1 and int(state.slots["swa"].count) == 0
    assert torch.equal(averaged(new).params["0.weight"], new.params["0.weight"])


def test_checkpoint_round_trip_and_resume_of_the_averages(tmp_path):
    batches = make_batches(8, batch=8)
    step = with_swa(with_ema(core(dropout=0.2), decay=0.9, warmup=True), start=2)
    whole = fl.fold(step, step.init(seed=3), batches, progress=False)
    part = fl.fold(step, step.init(seed=3), batches, max_steps=5, progress=False)
    fl.checkpoint.save(tmp_path / "s.ckpt", part)
    restored = fl.checkpoint.restore(tmp_path / "s.ckpt", step.init(seed=3))
    assert isinstance(restored.slots["ema"], EmaState) and isinstance(restored.slots["swa"], SwaState)
    assert fl.tree_equal(restored.slots, part.slots)
    resumed = fl.fold(step, restored, batches, progress=False)
    assert fl.tree_equal(resumed.slots, whole.slots)
    assert int(resumed.slots["swa"].count) == 7


def test_averaged_before_any_average_is_the_state_itself():
    step = with_swa(core(), start=5)
    state = fl.fold(step, step.init(), make_batches(3, batch=8), progress=False)
    assert averaged(state) is state


def test_averaged_picks_the_slot():
    step = with_swa(with_ema(core(), decay=0.5), start=1)
    state = fl.fold(step, step.init(), make_batches(3, batch=8), progress=False)
    ema, swa = averaged(state, "ema"), averaged(state, "swa")
    assert torch.equal(ema.params["0.weight"], state.slots["ema"].params["0.weight"])
    assert torch.equal(swa.params["0.weight"], state.slots["swa"].params["0.weight"])
    assert not torch.equal(ema.params["0.weight"], swa.params["0.weight"])
    assert fl.evaluate(fl.make_eval_step(fl.losses.cross_entropy), swa, make_batches(2, batch=8))["loss"] > 0


def test_averaged_errors():
    state = core().init()
    with pytest.raises(TypeError, match="averaged: .*expected a fnlight.TrainState"):
        averaged({"params": {}})
    with pytest.raises(ValueError, match=r"this one has neither \(its slots are \[\]\)"):
        averaged(state)
    with pytest.raises(ValueError, match="which must be 'ema' or 'swa', got 'polyak'"):
        averaged(state, "polyak")
    with pytest.raises(ValueError, match=r"no 'swa' slot .*build the step with with_swa"):
        averaged(with_ema(core(), decay=0.5).init(), "swa")
    with pytest.raises(ValueError, match="has both 'ema' and 'swa'; pass which="):
        averaged(with_swa(with_ema(core(), decay=0.5), start=1).init())


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda s: with_ema(s, decay=1.5), ValueError, r"with_ema: decay must be in \[0.0, 1.0\], got 1.5"),
        (lambda s: with_ema(s, decay="0.9"), TypeError, "with_ema: decay must be a float, got '0.9'"),
        (lambda s: with_ema(s, decay=0.9, every=0), ValueError, "with_ema: every must be an int >= 1 .*got 0"),
        (lambda s: with_ema(s, decay=0.9, start=-1), ValueError, "with_ema: start must be an int >= 0 .*got -1"),
        (lambda s: with_ema(s, decay=0.9, start=True), ValueError, "with_ema: start must be an int >= 0 .*got True"),
        (lambda s: with_ema(s, decay=0.9, warmup=1), TypeError, "with_ema: warmup must be a bool, got 1"),
        (lambda s: with_ema(s, decay=0.9, use_buffers="yes"), TypeError, "with_ema: use_buffers must be a bool, got 'yes'"),
        (lambda s: with_swa(s, start=2.5), ValueError, "with_swa: start must be an int >= 0 .*got 2.5"),
        (lambda s: with_swa(s, start=0, every=-2), ValueError, "with_swa: every must be an int >= 1 .*got -2"),
        (
            lambda s: with_ema(with_swa(s, start=0), decay=0.9),
            ValueError,
            "with_ema cannot wrap a step already wrapped by with_swa",
        ),
        (
            lambda s: with_swa(fl.with_eval(s, data=make_batches(1), loss_fn=fl.losses.cross_entropy, every=1), start=0),
            ValueError,
            "with_swa cannot wrap a step already wrapped by with_eval",
        ),
    ],
)
def test_option_errors(build, error, match):
    with pytest.raises(error, match=match):
        build(core())


def swa_state_with_bn(dropout=0.0):
    step = with_swa(core(dropout=dropout), start=2)
    return fl.fold(step, step.init(seed=4), make_batches(6, batch=8), progress=False)


def test_update_bn_equals_torch_update_bn():
    state = swa_state_with_bn()
    data = make_batches(5, batch=16, seed=7)
    swa = averaged(state)
    before = fl.tree_clone(swa)
    new = update_bn(swa, data)
    assert fl.tree_equal(swa, before)  # pure
    reference = AveragedModel(make_bn_mlp())
    fl.copy_into_module_(swa, reference.module)
    torch_update_bn(data, reference)
    assert_module_equal(new, reference.module)
    assert torch.equal(new.buffers["1.num_batches_tracked"], reference.module[1].num_batches_tracked)
    assert int(new.buffers["1.num_batches_tracked"]) == 5
    assert fl.tree_equal(new.params, swa.params) and new.skeleton.training is state.skeleton.training


def test_update_bn_reestimates_a_batchnorm_set_apart_in_eval_mode_as_torch_and_keeps_its_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[1].eval()  # a frozen BatchNorm: update_bn reset its statistics and, in eval mode, left them 0 and 1
    data = [(torch.randn(16, 4) * 3 + 1, torch.randint(0, 2, (16,))) for _ in range(3)]
    new = update_bn(fl.make_train_step(model, fl.losses.classification, fl.optim.sgd(0.1)).init(), data)
    reference = copy.deepcopy(model)
    torch_update_bn([x for x, _ in data], reference)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(new.buffers[f"1.{name}"], getattr(reference[1], name)), name
    assert [m.training for m in new.skeleton.modules()] == [True, True, False, True]


def test_update_bn_is_deterministic_with_dropout_and_takes_a_forward():
    state = averaged(swa_state_with_bn(dropout=0.5))
    data = make_batches(3, batch=16, seed=7)
    a = update_bn(state, data)
    torch.rand(5)
    assert fl.tree_equal(a.buffers, update_bn(state, data).buffers)
    as_dicts = [{"x": x, "y": y} for x, y in data]
    b = update_bn(state, as_dicts, forward=lambda model, batch: model(batch["x"]))
    assert fl.tree_equal(a.buffers, b.buffers)


class _CountingBnNet(nn.Module):
    """A BatchNorm model whose forward reassigns a buffer (``self.calls = self.calls + 1``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.bn = nn.Linear(10, 3), nn.BatchNorm1d(3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls = self.calls + 1
        return self.bn(self.fc(x))


def test_update_bn_keeps_a_buffer_the_forward_reassigns_as_torch_update_bn():
    data = make_batches(3, batch=8)
    step = fl.make_train_step(_CountingBnNet(), fl.losses.cross_entropy, adamw(1e-2))
    state = fl.fold(step, step.init(), data, progress=False)
    assert float(state.buffers["calls"]) == 3
    new = update_bn(state, data)
    reference = _CountingBnNet()
    fl.copy_into_module_(state, reference)
    torch_update_bn(data, reference)
    assert float(reference.calls) == 6
    assert_module_equal(new, reference)
    assert torch.equal(new.buffers["calls"], reference.calls)
    assert float(state.buffers["calls"]) == 3  # pure


def test_update_bn_without_batchnorm_keeps_the_buffers():
    step = fl.make_train_step(nn.Linear(10, 3), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    assert fl.tree_equal(update_bn(state, make_batches(1)), state)


def test_update_bn_errors():
    state = swa_state_with_bn()
    with pytest.raises(ValueError, match="update_bn: data yielded no batches"):
        update_bn(state, [])
    with pytest.raises(TypeError, match="update_bn: forward must be callable"):
        update_bn(state, make_batches(1), forward="x")
    with pytest.raises(TypeError, match="update_bn: data must be an iterable of batches .*, got NoneType"):
        update_bn(state, None)
    with pytest.raises(TypeError, match="update_bn: expected a fnlight.TrainState"):
        update_bn(copy.copy(state.params), make_batches(1))
