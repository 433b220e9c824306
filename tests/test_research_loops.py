"""Research-loop patterns against hand-written torch: teachers inside a loss, buffers a forward
reassigns, a module used twice, auxiliary metrics, and evaluate's argument checks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnlight as fl
from fnlight.ensemble import make_ensemble_step
from fnlight.transforms import with_compile


class RunningNorm(nn.Module):
    """Updates its buffers by reassignment in forward, as research code often does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
            self.calls = self.calls + 1
        return self.lin(x - self.mean)


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def _torch_reference(model: nn.Module, batches: list) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("how", ["direct", "fold", "compiled"])
def test_buffers_reassigned_in_forward_are_kept_as_torch_keeps_them(how):
    torch.manual_seed(0)
    model = RunningNorm()
    reference = _torch_reference(copy.deepcopy(model), _batches(3))
    step = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1))
    if how == "compiled":
        step = with_compile(step, backend="eager", fallback="raise")
    state = step.init()
    if how == "fold":
        state = fl.fold(step, state, _batches(3), progress=False)
    else:
        for batch in _batches(3):
            state, _ = step(state, batch)
    assert int(state.buffers["calls"]) == 3 and state.buffers["calls"].dtype == torch.long
    # the compiled step's traced SGD rounds differently from torch.optim's kernel (docs/compile.md)
    same = torch.equal if how != "compiled" else lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)
    assert same(state.buffers["mean"], reference.mean)
    for name, p in reference.named_parameters():
        assert same(state.params[name], p.detach()), name


def test_buffers_reassigned_in_forward_leave_the_input_state_untouched():
    step = fl.make_train_step(RunningNorm(), fl.losses.mse, fl.optim.sgd(0.1))
    state = step.init()
    new, _ = step(state, _batches(1)[0])
    assert int(state.buffers["calls"]) == 0 and int(new.buffers["calls"]) == 1
    assert not new.buffers["mean"].requires_grad


def test_ensemble_keeps_buffers_reassigned_in_forward():
    torch.manual_seed(0)
    step = make_ensemble_step(RunningNorm(), fl.losses.mse, k=2, optimizer="sgd", lr=0.1)
    state = step.init(seeds=[0, 1])
    for batch in _batches(2):
        state, _ = step(state, batch)
    assert state.buffers["calls"].tolist() == [2, 2]
    x0, x1 = _batches(2)[0][0], _batches(2)[1][0]
    expected = 0.9 * (0.1 * x0.mean(0)) + 0.1 * x1.mean(0)
    assert torch.allclose(state.buffers["mean"], expected.expand(2, 4))


class Siamese(nn.Module):
    """One encoder object used twice (shared weights by module, not by parameter)."""

    def __init__(self) -> None:
        super().__init__()
        enc = nn.Linear(4, 8)
        self.left, self.right = enc, enc
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.left(x) - self.right(x.flip(0)))


def test_a_module_used_twice_leaves_the_skeleton_on_meta():
    step = fl.make_train_step(Siamese(), fl.losses.mse, fl.optim.sgd(0.1))
    state = step.init()
    new, _ = step(state, _batches(1)[0])
    for tensor in (*new.skeleton.parameters(), *new.skeleton.buffers()):
        assert tensor.device.type == "meta"
    assert new.skeleton.left._parameters["weight"].device.type == "meta"


def test_a_module_used_twice_compiles_and_matches_torch():
    torch.manual_seed(0)
    model = Siamese()
    reference = _torch_reference(copy.deepcopy(model), _batches(2))
    step = with_compile(fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1)), backend="eager", fallback="raise")
    state = step.init()
    for batch in _batches(2):
        state, _ = step(state, batch)
    for name, p in reference.named_parameters():
        assert torch.allclose(state.params[name], p.detach(), atol=1e-6), name


def _mean_teacher(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, teacher = batch
    with torch.no_grad():
        target = fl.apply(teacher, x).softmax(-1)
    return F.cross_entropy(model(x), target), {"student_training": torch.tensor(float(model.training))}


def test_apply_inside_a_loss_keeps_the_student_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    step = fl.with_ema(fl.make_train_step(model, _mean_teacher, fl.optim.sgd(0.1)), decay=0.99)
    state = step.init()
    x = torch.randn(16, 4)
    new, metrics = step(state, (x, fl.averaged(state)))
    assert float(metrics["student_training"]) == 1.0
    assert not torch.equal(new.buffers["1.running_mean"], state.buffers["1.running_mean"])  # batch statistics ran


def test_apply_puts_back_every_modules_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    state = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1)).init()
    state.skeleton.train()
    state.skeleton[1].eval()  # a mixed mode, as a user may set
    fl.apply(state, torch.zeros(1, 2))
    assert state.skeleton.training and state.skeleton[0].training and not state.skeleton[1].training
    fl.apply(state, torch.zeros(1, 2), training=True)
    assert not state.skeleton[1].training


def test_an_auxiliary_metric_named_loss_is_refused():
    def vae_like(model, batch):
        x, y = batch
        recon = F.mse_loss(model(x), y)
        return recon + recon * float("inf"), {"loss": recon}

    step = fl.make_train_step(nn.Linear(4, 1), vae_like, fl.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"loss_fn '.*vae_like': auxiliary metric 'loss' clashes with the step's own 'loss'"):
        step(step.init(), _batches(1)[0])


def test_evaluate_names_a_wrong_first_argument():
    step = fl.make_train_step(nn.Linear(4, 1), fl.losses.mse, fl.optim.sgd(0.1))
    state, data = step.init(), _batches(1)
    with pytest.raises(TypeError, match=r"evaluate: eval_step is a train step \(TrainStep\(mse, Linear\)\), which would train"):
        fl.evaluate(step, state, data)
    with pytest.raises(TypeError, match=r"eval_step must be make_eval_step\(loss_fn\) or .* got a TrainState"):
        fl.evaluate(state, fl.make_eval_step(fl.losses.mse), data)
    with pytest.raises(TypeError, match=r"state must be a TrainState, got 3"):
        fl.evaluate(fl.make_eval_step(fl.losses.mse), 3, data)
    with pytest.raises(TypeError, match=r"eval_step must return a dict of 0-d tensors, got 3"):
        fl.evaluate(lambda s, b: 3, state, data)
    with pytest.raises(TypeError) as info:
        fl.evaluate(fl.losses.mse, state, data)  # a loss_fn(model, batch) where an eval step belongs
    assert any("pass fnlight.make_eval_step(loss_fn)" in note for note in info.value.__notes__)


class Shifting(nn.Module):
    """Buffers that trade places in forward: `prev` takes `cur`'s tensor, `cur` a new one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("cur", torch.zeros(2))
        self.register_buffer("prev", torch.zeros(2))
        self.register_buffer("rot", torch.arange(4.0).reshape(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.prev = self.cur
        self.cur = x.mean(0).detach()
        self.rot = self.rot.t()  # a view of the old buffer
        return self.lin(x)


@pytest.mark.parametrize("how", ["direct", "fold", "model", "compiled-model"])
def test_buffers_that_trade_places_end_as_in_torch(how):
    data = [(torch.full((4, 2), 1.0), torch.zeros(4, 1)), (torch.full((4, 2), 2.0), torch.zeros(4, 1))]
    reference = _torch_reference(Shifting(), data)
    model = Shifting()
    step = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1))
    if how == "compiled-model":
        step = with_compile(step, backend="aot_eager", fallback="raise")
    if how == "direct":
        state = step.init()
        for batch in data:
            state, _ = step(state, batch)
    else:
        state = fl.fold(step, step.init(), data, donate="model" if "model" in how else False, progress=False)
    for name in ("cur", "prev", "rot"):
        assert torch.equal(state.buffers[name], getattr(reference, name)), name
        if "model" in how:
            assert torch.equal(getattr(model, name), getattr(reference, name)), name


def test_apply_in_train_mode_keeps_a_submodule_the_user_set_to_eval():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()
    model[1].eval()  # a frozen BatchNorm
    state = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1)).init()
    x = torch.randn(5, 3)
    assert torch.equal(fl.apply(state, x, training=True), model(x))
    assert not state.skeleton[1].training


def test_tree_equal_sees_module_settings_and_nested_states():
    class Scaled(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.lin, self.scale = nn.Linear(2, 1), scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale

    def state(scale: float) -> fl.TrainState:
        torch.manual_seed(0)
        return fl.make_train_step(Scaled(scale), fl.losses.mse, fl.optim.sgd(0.1)).init()

    assert fl.tree_equal(state(1.0), state(1.0)) and fl.tree_equal({"s": [state(1.0)]}, {"s": [state(1.0)]})
    assert not fl.tree_equal(state(1.0), state(100.0))
    assert not fl.tree_equal({"s": state(1.0)}, {"s": state(100.0)})


class _Summed(nn.Module):
    def __init__(self, aliased: bool) -> None:
        super().__init__()
        self.aliased = aliased
        self.a, self.b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # aliased: autograd gives a and b one gradient tensor
        return x * (self.a + self.b) if self.aliased else x * self.a + x * self.b


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: fl.with_grad_accum(s, every=2),
        lambda s: fl.with_grad_accum(s, micro_batches=2),
        lambda s: fl.with_amp(s, dtype="fp16"),
    ],
    ids=["every", "micro_batches", "amp"],
)
def test_one_gradient_tensor_for_two_parameters_is_not_counted_twice(wrap):
    data = [torch.ones(4, 3), torch.full((4, 3), 2.0)]
    out = []
    for aliased in (True, False):
        step = wrap(fl.make_train_step(_Summed(aliased), lambda m, x: m(x).mean(), fl.optim.sgd(1.0)))
        out.append(fl.fold(step, step.init(), data, progress=False).params)
    for name in ("a", "b"):
        assert torch.equal(out[0][name], out[1][name]), name


def test_a_fold_per_phase_bounded_by_max_steps_trains_every_turn_as_direct_calls_do():
    """docs/concepts.md: a custom loop's per-phase fold; a bare fold([batch]) trains the first turn only."""
    step = fl.make_train_step(RunningNorm(), fl.losses.mse, fl.optim.sgd(0.1))
    direct = bare = phased = step.init()
    for batch in _batches(3):
        direct, _ = step(direct, batch)
        bare = fl.fold(step, bare, [batch], progress=False)
        phased = fl.fold(step, phased, [batch], max_steps=int(phased.step) + 1, donate=True, progress=False)
    assert int(bare.step) == 1 and int(phased.step) == 3
    for field in ("params", "buffers", "opt_state"):
        assert fl.tree_equal(getattr(phased, field), getattr(direct, field)), field
