"""The transform contract: every transform, alone and in every valid pair, passes the same checks.

A new transform joins by adding an entry to TRANSFORMS (innermost-first rank order).
"""

import itertools

import optree
import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, chain, clip_by_global_norm
from tests.conftest import make_batches

# name -> (rank in CANONICAL_ORDER, wrap(step) -> step)
TRANSFORMS = {
    "activation_checkpointing": ("with_activation_checkpointing", lambda s: fl.with_activation_checkpointing(s, modules=["0"])),
    "amp_bf16": ("with_amp", lambda s: fl.with_amp(s, dtype="bf16")),
    "amp_fp16": ("with_amp", lambda s: fl.with_amp(s, dtype="fp16", init_scale=256.0, growth_interval=2)),
    "amp_true_bf16": ("with_amp", lambda s: fl.with_amp(s, dtype="bf16", mode="true")),
    "accum_every": ("with_grad_accum", lambda s: fl.with_grad_accum(s, every=3)),
    "accum_split": ("with_grad_accum", lambda s: fl.with_grad_accum(s, micro_batches=2)),
    "ema": ("with_ema", lambda s: fl.with_ema(s, decay=0.9, warmup=True)),
    "swa": ("with_swa", lambda s: fl.with_swa(s, start=2, every=2)),
    "eval": (
        "with_eval",
        lambda s: fl.with_eval(s, data=make_batches(3, batch=5, seed=9), loss_fn=fl.losses.classification, every=2),
    ),
    "early_stop": ("with_early_stop", lambda s: fl.with_early_stop(s, monitor="loss", patience=100)),
    "early_stop_restore": ("with_early_stop", lambda s: fl.with_early_stop(s, monitor="loss", patience=100, restore_best=True)),
}


def rank(name):
    return fl.CANONICAL_ORDER.index(TRANSFORMS[name][0])


PAIRS = [(a, b) for a, b in itertools.permutations(TRANSFORMS, 2) if rank(a) < rank(b)]
CASES = [("core",), *[(n,) for n in TRANSFORMS], *PAIRS]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(0.2)), nn.Linear(16, 3))


def build(case, nonfinite="raise"):
    optimizer = chain(clip_by_global_norm(1.0), adamw(1e-2))
    step = fl.make_train_step(model(), fl.losses.classification, optimizer, nonfinite=nonfinite)
    for name in case:
        if name != "core":
            step = TRANSFORMS[name][1](step)
    return step


def structure(state):
    """Paths, dtypes, shapes and devices of every leaf (the module skeleton is static, not compared)."""
    paths, leaves, _ = optree.tree_flatten_with_path(state, namespace="fnlight")
    return [(p, (t.dtype, tuple(t.shape), t.device) if isinstance(t, torch.Tensor) else type(t)) for p, t in zip(paths, leaves)]


ids = ["+".join(c) for c in CASES]


@pytest.fixture(scope="module")
def batches():
    return make_batches(7, batch=8)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_input_state_is_untouched(case, batches):
    step = build(case)
    state = step(step.init(seed=1), batches[0])[0]
    before = fl.tree_clone(state)
    step(state, batches[1])
    assert fl.tree_equal(state, before)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_structure_and_dtypes_are_stable(case, batches):
    step = build(case)
    state = step.init(seed=1)
    expected = structure(state)
    for b in batches:
        state, metrics = step(state, b)
        assert structure(state) == expected
        assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())
    assert structure(fl.fold(step, step.init(seed=1), batches, progress=False)) == expected


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_deterministic(case, batches):
    step = build(case)
    state = step.init(seed=2)
    a = step(state, batches[0])
    torch.rand(3)
    b = step(state, batches[0])
    assert fl.tree_equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_checkpoint_ready_leaves(case):
    step = build(case)
    paths, leaves, _ = optree.tree_flatten_with_path(step.init(), namespace="fnlight")
    for path, leaf in zip(paths, leaves):
        assert isinstance(leaf, (torch.Tensor, int, float, bool, str)) or leaf is None, path


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_fold_in_place_equals_pure_calls(case, batches):
    step = build(case)
    state = step.init(seed=3)
    pure = state
    for b in batches:
        pure, _ = step(pure, b)
    pure, _ = step.flush(pure)
    folded = fl.fold(step, state, batches, progress=False)
    for field in ("step", "params", "buffers", "opt_state", "slots"):
        assert fl.tree_equal(getattr(folded, field), getattr(pure, field)), field


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_init_extends_the_state_with_each_slot(case):
    slots = set(build(case).init().slots)
    expected = {"amp"} & ({"amp"} if "amp_fp16" in case else set())
    expected |= {"grad_accum"} if "accum_every" in case else set()
    expected |= {"early_stop"} if any(n.startswith("early_stop") for n in case) else set()
    expected |= {n for n in ("ema", "swa") if n in case}
    assert slots == expected


@pytest.mark.parametrize("case", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_reversed_order_is_rejected(case):
    inner, outer = case
    if TRANSFORMS[inner][0] == TRANSFORMS[outer][0]:
        pytest.skip("same transform family")
    with pytest.raises(ValueError, match="cannot wrap a step already wrapped by"):
        build((outer, inner))
