"""with_activation_checkpointing: gradients unchanged, fewer saved activations, selection and errors."""

import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.optim import adamw
from tests.conftest import make_batches


def deep(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(dropout)) for _ in range(6)]
    return nn.Sequential(nn.Linear(10, 32), *blocks, nn.Linear(32, 3))


def saved_bytes(step, state, batch):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(state, batch)
    return total


def test_gradients_and_updates_are_unchanged_with_dropout():
    batches = make_batches(4)
    plain = fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2))
    ckpt = fl.with_activation_checkpointing(
        fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2)), modules=nn.Sequential
    )
    a = fl.fold(plain, plain.init(seed=3), batches, progress=False)
    b = fl.fold(ckpt, ckpt.init(seed=3), batches, progress=False)
    assert fl.tree_equal(a.params, b.params) and fl.tree_equal(a.opt_state, b.opt_state)


def test_saved_activations_drop():
    batch = make_batches(1, batch=256)[0]
    plain = fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2))
    ckpt = fl.with_activation_checkpointing(
        fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2)), modules=[str(i) for i in range(1, 7)]
    )
    before, after = saved_bytes(plain, plain.init(), batch), saved_bytes(ckpt, ckpt.init(), batch)
    assert after < 0.5 * before


@pytest.mark.parametrize(
    "modules",
    [["1", "2"], nn.GELU, (nn.GELU, nn.Dropout), lambda name, m: name in ("1", "1.0")],
)
def test_selection_forms(modules):
    step = fl.with_activation_checkpointing(fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2)), modules=modules)
    state = step.init()
    marked = [n for n, m in state.skeleton.named_modules() if "forward" in m.__dict__]
    assert marked and all(not any(n.startswith(o + ".") for o in marked) for n in marked)
    step(state, make_batches(1)[0])


def test_to_module_drops_the_wrappers():
    step = fl.with_activation_checkpointing(fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2)), modules=["1"])
    state, _ = step(step.init(), make_batches(1)[0])
    module = fl.to_module(state)
    assert all("forward" not in m.__dict__ for m in module.modules())
    x = make_batches(1)[0][0]
    expected = fl.make_eval_step(lambda m, b: (m(b).sum(), {"out": m(b).sum()}))(state, x)["out"]
    assert torch.equal(module(x).sum(), expected)


@pytest.mark.parametrize(
    ("modules", "error", "match"),
    [
        (["9"], ValueError, r"no submodule named \['9'\]"),
        ([""], ValueError, r"no submodule named \[''\]"),
        (nn.LSTM, ValueError, "selects no submodule of Sequential"),
        (3, TypeError, "modules must be a list of submodule names, a module type"),
    ],
)
def test_bad_selection(modules, error, match):
    with pytest.raises(error, match=match):
        fl.with_activation_checkpointing(fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2)), modules=modules)


class Shared(nn.Module):
    """One block registered under two names, applied twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(10, 10), nn.Tanh())
        self.first, self.second, self.head = block, block, nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.second(self.first(x)))


def test_a_shared_block_is_selected_by_any_of_its_names():
    # named_modules lists a shared block once: 'second' was refused as "no submodule named ['second']"
    batch = make_batches(1)[0]
    plain = fl.make_train_step(Shared(), fl.losses.cross_entropy, adamw(1e-2))
    for names in (["second"], ["first", "second"], ["second.0"]):
        step = fl.with_activation_checkpointing(fl.make_train_step(Shared(), fl.losses.cross_entropy, adamw(1e-2)), modules=names)
        state = step.init()
        assert "forward" in (state.skeleton.second if names != ["second.0"] else state.skeleton.second[0]).__dict__
        assert fl.tree_equal(step(state, batch)[0].params, plain(plain.init(), batch)[0].params)
    with pytest.raises(ValueError, match=r"no submodule named \['third'\]; the model has \['first', 'first.0', .*'second'"):
        fl.with_activation_checkpointing(plain, modules=["third"])


def test_order_and_target_are_checked():
    core = fl.make_train_step(deep(), fl.losses.cross_entropy, adamw(1e-2))
    with pytest.raises(ValueError, match="with_activation_checkpointing cannot wrap a step already wrapped by with_amp"):
        fl.with_activation_checkpointing(fl.with_amp(core), modules=["1"])
    with pytest.raises(TypeError, match="with_activation_checkpointing: expected a train step, got function"):
        fl.with_activation_checkpointing(lambda s, b: s, modules=["1"])
    fl.with_amp(fl.with_activation_checkpointing(core, modules=["1"]))


class Block(nn.Module):
    """BatchNorm (in-place running statistics) and a buffer the forward reassigns."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.seen = self.seen + x.shape[0]
        return self.layers(x)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(x))


def test_the_recompute_writes_no_buffer_so_running_statistics_equal_the_unchecked_run():
    """Recomputed in backward, BatchNorm would count every batch twice and move its statistics twice."""

    def run(checkpointed):
        torch.manual_seed(0)
        step = fl.make_train_step(Counting(), fl.losses.classification, adamw(1e-2))
        if checkpointed:
            step = fl.with_activation_checkpointing(step, modules=checkpointed)
        return fl.fold(step, step.init(seed=0), make_batches(4, 8), progress=False)

    expected = run(None)
    assert int(expected.buffers["block.layers.1.num_batches_tracked"]) == 4 and int(expected.buffers["block.seen"]) == 32
    for modules in (["block"], ["block", "head"]):
        got = run(modules)  # (its skeleton has checkpointed forwards: compare the tensors)
        assert fl.tree_equal((got.params, got.buffers, got.opt_state), (expected.params, expected.buffers, expected.opt_state))


class RunningNorm(nn.Module):
    """Normalises with a running mean that its forward updates first, in place."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.register_buffer("mean", torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        with torch.no_grad():
            self.mean.mul_(0.5).add_(0.5 * h.mean(0))
        return torch.tanh(h - self.mean)


def test_the_recompute_reads_the_buffers_as_the_first_run_found_them():
    def build(checkpointed: bool):
        torch.manual_seed(0)
        step = fl.make_train_step(nn.Sequential(RunningNorm(4), nn.Linear(4, 1)), fl.losses.mse, adamw(0.1))
        return fl.with_activation_checkpointing(step, modules=["0"]) if checkpointed else step

    batches = [(torch.randn(16, 4) + 3.0, torch.randn(16, 1)) for _ in range(3)]
    plain, ckpt = build(False), build(True)
    a = fl.fold(plain, plain.init(), batches, progress=False)
    b = fl.fold(ckpt, ckpt.init(), batches, progress=False)
    assert fl.tree_equal(a.params, b.params) and fl.tree_equal(a.buffers, b.buffers)  # was 9.5e-3 apart after one update
