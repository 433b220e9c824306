"""The step's hot-path helpers: the direct backward call, the cached step seed, and fold-held generators."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import fnlight as fl
from fnlight import _autograd
from fnlight._autograd import run_backward
from fnlight._rng import derive_seed, held_generators, restore_generators, seed_generators, step_seed
from fnlight.optim import adamw
from tests.conftest import make_batches, make_bn_mlp


def _graph(weight_unused: bool = True):
    torch.manual_seed(0)
    w1 = torch.randn(8, 5).requires_grad_()
    w2 = torch.randn(3, 8).requires_grad_()
    unused = torch.randn(4).requires_grad_()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    loss = F.cross_entropy(torch.tanh(x @ w1.T) @ w2.T, y)
    return loss, (w1, w2, unused) if weight_unused else (w1, w2)


@pytest.mark.parametrize("weight", [1.0, 0.25, 7 / 64])
def test_grads_equal_autograd_grad_of_the_weighted_loss(weight):
    loss, leaves = _graph()
    got = run_backward(loss, leaves, weight=weight)
    loss, leaves = _graph()
    want = torch.autograd.grad(loss * weight if weight != 1.0 else loss, leaves, allow_unused=True)
    assert got[2] is None and want[2] is None
    for a, b in zip(got[:2], want[:2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight", [1.0, 0.25, 3 / 7])
def test_accumulate_adds_into_grad_as_backward_does(weight):
    results = []
    for fast in (True, False):
        loss, leaves = _graph()
        for leaf in leaves:
            leaf.grad = torch.ones_like(leaf)
        if fast:
            assert run_backward(loss, leaves, weight=weight, accumulate=True) == ()
        else:
            (loss * weight).backward(inputs=list(leaves))
        results.append([leaf.grad for leaf in leaves])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(results[0][2], torch.ones(4))  # a leaf the loss does not reach keeps its .grad


class _Counting(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_torch_function_mode_gets_the_public_entry_points():
    """Under a mode (or a tensor subclass) the public functions run, so the override sees them."""
    loss, leaves = _graph(weight_unused=False)
    with _Counting() as mode:
        got = run_backward(loss, leaves, weight=0.5)
    assert "grad" in mode.seen
    loss, leaves = _graph(weight_unused=False)
    for a, b in zip(got, torch.autograd.grad(loss * 0.5, leaves), strict=True):
        assert torch.equal(a, b)


def test_without_the_engine_function_the_public_entry_points_are_used(monkeypatch):
    monkeypatch.setattr(_autograd, "_engine_run_backward", None)
    loss, leaves = _graph()
    got = run_backward(loss, leaves, weight=0.25)
    loss, leaves = _graph()
    want = torch.autograd.grad(loss * 0.25, leaves, allow_unused=True)
    assert got[2] is None and all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
    loss, leaves = _graph(weight_unused=False)
    assert run_backward(loss, leaves, accumulate=True) == () and all(leaf.grad is not None for leaf in leaves)


@pytest.mark.parametrize("seed, step, micro, rank", [(0, 0, 0, 0), (7, 3, 1, 0), (2**40, 12345, 3, 2), (-1, 5, 0, 1)])
def test_step_seed_is_derive_seed(seed, step, micro, rank):
    want = derive_seed(seed, step, micro, *((rank,) if rank else ()))
    assert step_seed(seed, step, micro, rank) == want
    assert step_seed(seed, step, micro, rank) == want  # from the cache


def test_held_generators_restore_the_callers_state_once_at_the_end():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with held_generators():
        saved = seed_generators(123)
        inside = torch.rand(2)
        restore_generators(saved)
        assert torch.equal(torch.rand(2), _draws(123, 4)[2:])  # not restored per call: the seeded stream goes on
        restore_generators(seed_generators(456))
    assert torch.equal(inside, _draws(123, 2))
    assert torch.equal(torch.rand(3), expected)


def _draws(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_held_generators_restore_on_an_exception():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="boom"), held_generators():
        seed_generators(9)
        raise RuntimeError("boom")
    assert torch.equal(torch.rand(3), expected)


def test_nested_seeding_inside_a_held_step_saves_and_restores():
    """A region seeded inside a step's own seeded region (e.g. a transform's) puts the step's stream back."""
    with held_generators():
        outer = seed_generators(1)
        first = torch.rand(2)
        restore_generators(seed_generators(2))  # nested: saved and restored as usual
        after = torch.rand(2)
        restore_generators(outer)
    assert torch.equal(torch.cat([first, after]), _draws(1, 4))


def test_fold_restores_the_global_generator_and_matches_direct_calls():
    batches = make_batches(3)
    step = fl.make_train_step(make_bn_mlp(dropout=0.5), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init(seed=4)
    direct = state
    for b in batches:
        direct, _ = step(direct, b)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    folded = fl.fold(step, state, batches, progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert fl.tree_equal(folded.params, direct.params)


def test_a_module_drawing_in_forward_is_seeded_per_micro_batch_in_the_fold():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 3)

        def forward(self, x):
            return self.lin(x + torch.randn_like(x))

    batches = make_batches(4)
    step = fl.make_train_step(Noisy(), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init(seed=2)
    direct = state
    for b in batches:
        direct, _ = step(direct, b)
    torch.rand(7)  # whatever the global stream did before the fold does not matter
    assert fl.tree_equal(fl.fold(step, state, batches, progress=False).params, direct.params)


def test_plain_tensors_skip_the_public_entry_points(monkeypatch):
    """The fast path is taken for plain tensors (the public functions are not called)."""

    def refuse(*args, **kwargs):
        raise AssertionError("public entry point called")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    loss, leaves = _graph(weight_unused=False)
    assert len(run_backward(loss, leaves, weight=0.5)) == 2
    step = fl.with_grad_accum(fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2)), every=2)
    state = fl.fold(step, step.init(), make_batches(4), progress=False)
    assert int(state.step) == 2
