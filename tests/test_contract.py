"""The transform contract: every transform, alone and in every valid pair, passes the same checks.

A new transform joins by adding an entry to TRANSFORMS (innermost-first rank order).
"""

import atexit
import itertools
import shutil
import tempfile

import optree
import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, chain, clip_by_global_norm
from tests.conftest import make_batches


class _Memory:
    """A tracker that records nothing: the contract checks with_tracking's slot and state, not what is logged."""

    def open(self, run_id="", *, hparams=None):
        return run_id or "run"

    def log_scalars(self, step, scalars):
        pass

    def log_hparams(self, hparams):
        pass

    def close(self):
        pass


_DIRECTORIES = tempfile.mkdtemp(prefix="fnlight-contract-")
atexit.register(shutil.rmtree, _DIRECTORIES, ignore_errors=True)


def _tmpdir():
    """A fresh directory for one with_checkpointing (removed when the tests end)."""
    return tempfile.mkdtemp(dir=_DIRECTORIES)


# a check that builds a step twice (or folds twice) over one with_checkpointing directory starts over in it on purpose
pytestmark = pytest.mark.filterwarnings(r"ignore:with_checkpointing\(resume=False\):fnlight.checkpoint.CheckpointWarning")

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
    "compile": ("with_compile", lambda s: fl.with_compile(s, backend="eager", fallback="raise")),
    "ddp": ("with_ddp", lambda s: fl.with_ddp(s)),
    "fsdp": ("with_fsdp", lambda s: fl.with_fsdp(s)),
    "tracking": ("with_tracking", lambda s: fl.with_tracking(s, trackers=[_Memory()], every=2)),
    "checkpointing": ("with_checkpointing", lambda s: fl.with_checkpointing(s, directory=_tmpdir(), every=2, resume=False)),
}


def rank(name):
    return fl.CANONICAL_ORDER.index(TRANSFORMS[name][0])


EXCLUSIVE = {frozenset({"ddp", "fsdp"})}  # one or the other (each refuses the other, tested in test_distributed.py)
# with_compile is paired with what docs/compile.md composes it with (a compiled pair takes ~2 s a check)
COMPILED_WITH = {"accum_every", "accum_split", "amp_bf16", "amp_fp16", "ddp", "checkpointing"}
PAIRS = [
    (a, b)
    for a, b in itertools.permutations(TRANSFORMS, 2)
    if rank(a) < rank(b) and {a, b} not in EXCLUSIVE and ("compile" not in (a, b) or {a, b} - {"compile"} <= COMPILED_WITH)
]
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


@pytest.mark.parametrize("case", CASES[: len(TRANSFORMS) + 1], ids=ids[: len(TRANSFORMS) + 1])  # each alone
def test_a_fold_that_raises_leaves_the_step_as_good_as_new(case, batches):
    def failing():  # the data fails after 4 batches: inside an accumulation window, between evaluations
        yield from batches[:4]
        raise OSError("the data's disk went away")

    step = build(case)
    with pytest.raises(OSError, match="disk went away"):
        fl.fold(step, step.init(seed=3), failing(), progress=False)
    again = fl.fold(step, step.init(seed=3), batches, progress=False)  # the same step object, fixed data
    fresh = build(case)
    new = fl.fold(fresh, fresh.init(seed=3), batches, progress=False)
    for field in ("step", "params", "buffers", "opt_state", "slots"):
        assert fl.tree_equal(getattr(again, field), getattr(new, field)), field


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_init_extends_the_state_with_each_slot(case):
    slots = set(build(case).init().slots)
    expected = {"amp"} & ({"amp"} if "amp_fp16" in case else set())
    expected |= {"grad_accum"} if "accum_every" in case else set()
    expected |= {"early_stop"} if any(n.startswith("early_stop") for n in case) else set()
    expected |= {n for n in ("ema", "swa", "tracking", "checkpointing") if n in case}
    assert slots == expected


@pytest.mark.parametrize("case", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_reversed_order_is_rejected(case):
    inner, outer = case
    if TRANSFORMS[inner][0] == TRANSFORMS[outer][0]:
        pytest.skip("same transform family")
    with pytest.raises(ValueError, match="cannot wrap a step already wrapped by"):
        build((outer, inner))


# ---------------------------------------------------------------- transforms of one's own


class _HalfGrads(fl.Transform):
    """Acts in the update phase: halves the gradients before the optimizer (per update, as clipping)."""

    name = "with_half_grads"

    def update(self, state, g):
        return self.inner.update(state, g._replace(grads={k: v * 0.5 for k, v in g.grads.items()}))


class _CountCalls(fl.Transform):
    """Acts on whole steps: counts the calls in its slot."""

    name = "with_count_calls"
    slot = "calls"

    def init_slot(self, state):
        return torch.zeros((), dtype=torch.int64)

    def __call__(self, state, batch):
        new_state, metrics = self.inner(state, batch)
        return new_state.with_slot(self.slot, state.slots[self.slot] + 1), metrics


def _plain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def _torch_halved(data, every):
    """The hand-written loop: .backward() accumulation over `every` batches, gradients halved, torch.optim.SGD."""
    reference = _plain_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i in range(0, len(data), every):
        opt.zero_grad(set_to_none=True)
        for x, y in data[i : i + every]:
            (torch.nn.functional.cross_entropy(reference(x), y) / every).backward()
        for p in reference.parameters():
            p.grad.mul_(0.5)
        opt.step()
    return dict(reference.named_parameters())


def _run(step, how, data):
    """A fresh state trained on ``data`` by ``fold`` or by direct calls."""
    state = step.init()
    if how == "fold":
        return fl.fold(step, state, data, progress=False)
    for b in data:
        state, _ = step(state, b)
    return state


@pytest.mark.parametrize("how", ["direct", "fold"])
@pytest.mark.parametrize("every", [1, 2])
def test_a_transform_of_ones_own_composes_with_the_built_ins(how, every, batches):
    data = batches[:4]
    step = _HalfGrads(fl.make_train_step(_plain_model(), fl.losses.cross_entropy, fl.optim.sgd(0.1)))
    if every > 1:  # halved once per update, on the window's gradients; the calls counted by a whole-step transform
        step = _CountCalls(fl.with_grad_accum(step, every=every))
    state = _run(step, how, data)
    assert int(state.step) == len(data) // every
    for name, p in _torch_halved(data, every).items():
        if every == 1:
            assert torch.equal(state.params[name], p.detach()), name
        else:  # the window's weighting rounds as docs/transforms.md says
            assert torch.allclose(state.params[name], p.detach(), rtol=0, atol=1e-6), name
    if every > 1:
        assert int(state.slots["calls"]) == len(data)


class _HalfMicroGrads(fl.Transform):
    """Acts in the gradient phase: halves each micro-batch's gradients."""

    name = "with_half_micro_grads"

    def grads(self, state, batch, ctx=fl.GradContext()):  # noqa: B008 (an immutable NamedTuple)
        g = self.inner.grads(state, batch, ctx)
        return g._replace(grads={k: v * 0.5 for k, v in g.grads.items()})


@pytest.mark.parametrize("how", ["direct", "fold"])
@pytest.mark.parametrize("mode", ["every", "micro_batches"])
def test_a_transform_of_ones_own_in_the_gradient_phase_sees_each_micro_batchs_gradients(how, mode, batches):
    # under accumulation, backward added each micro-batch into the window's buffers in place (in a fold; and within a
    # call when splitting), so grads() saw and halved the window's sum so far: the run differed from direct calls and
    # from the halved hand-written loop by up to 0.03
    data = batches[:4]
    step = _HalfMicroGrads(fl.make_train_step(_plain_model(), fl.losses.cross_entropy, fl.optim.sgd(0.1)))
    if mode == "every":
        step, fed = fl.with_grad_accum(step, every=2), data
    else:
        joined = [tuple(torch.cat(t) for t in zip(*data[i : i + 2])) for i in (0, 2)]  # split back into halves
        step, fed = fl.with_grad_accum(step, micro_batches=2), joined
    state = _run(step, how, fed)
    assert int(state.step) == 2
    for name, p in _torch_halved(data, 2).items():
        assert torch.allclose(state.params[name], p.detach(), rtol=0, atol=1e-6), name


def test_a_transform_of_ones_own_is_refused_where_it_would_be_bypassed():
    core = fl.make_train_step(model(), fl.losses.classification, fl.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"with_compile cannot wrap a step already wrapped by with_half_grads: .* would bypass"):
        fl.with_compile(_HalfGrads(core), backend="eager")
    with pytest.raises(ValueError, match=r"with_compile cannot wrap .* by with_half_grads"):
        fl.with_compile(fl.with_activation_checkpointing(_HalfGrads(core), modules=["0"]), backend="eager")
    for outer in (lambda s: fl.with_grad_accum(s, every=2), lambda s: fl.with_amp(s, dtype="bf16"), _HalfGrads):
        with pytest.raises(ValueError, match=r"cannot wrap a step already wrapped by with_count_calls: .* never calls it whole"):
            outer(_CountCalls(core))
    with pytest.raises(ValueError, match=r"with_half_grads cannot wrap a step already wrapped by with_eval: .* never run"):
        _HalfGrads(fl.with_eval(core, data=make_batches(1), loss_fn=fl.losses.classification, every=1))
    with pytest.raises(ValueError, match=r"with_half_grads cannot wrap a step already wrapped by with_grad_accum"):
        _HalfGrads(fl.with_grad_accum(core, every=2))
    with pytest.raises(ValueError, match=r"with_half_grads: the step is already wrapped by with_half_grads; apply it once"):
        _HalfGrads(_HalfGrads(core))
    # the legal places build
    fl.with_compile(core, backend="eager")
    _HalfGrads(fl.with_compile(core, backend="eager"))
    _CountCalls(fl.with_grad_accum(_HalfGrads(core), every=2))
    fl.with_eval(_CountCalls(core), data=make_batches(1), loss_fn=fl.losses.classification, every=1)
    _HalfGrads(fl.with_ema(core, decay=0.9))


def test_a_transform_of_ones_own_with_a_slot_is_refused_outside_with_checkpointing(tmp_path):
    # outside, the checkpoints were written before its slot was updated and a resume restored them into a state
    # without the slot: CheckpointMismatchError 'unexpected in the file: slots.calls' at the second run's init()
    core = fl.make_train_step(model(), fl.losses.classification, fl.optim.sgd(0.1))
    saved = fl.with_checkpointing(core, directory=tmp_path / "outside", every=1)
    with pytest.raises(ValueError, match=r"with_count_calls keeps a slot \('calls'\), so it cannot wrap .* with_checkpointing: "):
        _CountCalls(saved)

    class Logged(fl.Transform):  # without a slot: it may wrap with_checkpointing (and calls it whole)
        name = "with_logged"

        def __call__(self, state, batch):
            new_state, metrics = self.inner(state, batch)
            return new_state, {**metrics, "logged": torch.ones(())}

    with pytest.raises(ValueError, match=r"i.e. with_checkpointing\(with_count_calls\(step, ...\), ...\)"):
        _CountCalls(Logged(saved))
    # inside, the slot is saved after its update and resumed exactly
    data = make_batches(3)

    def run(directory, **fold):
        step = fl.with_checkpointing(_CountCalls(fl.with_grad_accum(core, every=2)), directory=directory, every=1)
        return fl.fold(step, step.init(), data, epochs=2, progress=False, **fold)

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", max_steps=2)
    resumed = run(tmp_path / "split")
    assert int(resumed.slots["calls"]) == int(whole.slots["calls"]) == 6
    assert fl.tree_equal(resumed.params, whole.params)


def test_a_transform_of_ones_own_that_is_incomplete_is_named():
    core = fl.make_train_step(model(), fl.losses.classification, fl.optim.sgd(0.1))

    class Nameless(fl.Transform):
        pass

    class SlotWithoutInit(fl.Transform):
        name, slot = "with_slot_without_init", "mine"

    with pytest.raises(TypeError, match=r"Nameless: a Transform subclass must set the class attribute name .* got None"):
        Nameless(core)
    with pytest.raises(NotImplementedError, match=r"with_slot_without_init: slot = 'mine' .* must define init_slot"):
        SlotWithoutInit(core).init()

    class Taken(_CountCalls):
        name, slot = "with_taken", "ema"

    class Again(_CountCalls):
        name = "with_again"  # the slot "calls", which _CountCalls holds

    with pytest.raises(ValueError, match=r"with_taken: slot 'ema' is with_ema's key in state.slots; .* \(e.g. 'taken'\)"):
        Taken(core)  # it crashed with_ema at the first average ('Tensor' object has no attribute 'count')
    with pytest.raises(ValueError, match=r"with_again: slot 'calls' is with_count_calls's key in state.slots"):
        Again(_CountCalls(core))
    with pytest.raises(TypeError, match=r"with_slot_without_init: slot must be a non-empty string .* got 3"):
        type("Numbered", (SlotWithoutInit,), {"slot": 3})(core)


class _Bare:
    """A step-like wrapper of one's own, not a Transform, without flush/finish/updates_per."""

    def __init__(self, inner):
        self.inner = inner

    core = property(lambda self: self.inner.core)

    def init(self, **options):
        return self.inner.init(**options)

    def grads(self, state, batch, ctx=None):
        return self.inner.grads(state, batch, ctx or fl.GradContext())

    def update(self, state, g):
        return self.inner.update(state, g)

    def __call__(self, state, batch):
        return self.inner(state, batch)


def test_a_bare_step_like_wrapper_is_named_when_built():
    core = fl.make_train_step(model(), fl.losses.classification, fl.optim.sgd(0.1))
    with pytest.raises(TypeError, match=r"with_ema: the step to wrap, a _Bare, has no flush, finish, updates_per"):
        fl.with_ema(_Bare(core), decay=0.9)
    _Bare.flush = lambda self, state: self.inner.flush(state)
    _Bare.finish = lambda self, state: self.inner.finish(state)
    _Bare.updates_per = lambda self, n: self.inner.updates_per(n)
    try:
        with pytest.raises(ValueError, match=r"with_compile cannot wrap a step already wrapped by _Bare: .* would bypass _Bare"):
            fl.with_compile(_Bare(core), backend="eager")
        step = fl.with_ema(_Bare(core), decay=0.9)
        assert int(fl.fold(step, step.init(), make_batches(3), progress=False).step) == 3
    finally:
        del _Bare.flush, _Bare.finish, _Bare.updates_per
