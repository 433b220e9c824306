"""with_grad_accum: equivalence with one large batch, the short last window, counters, resume, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, sgd
from tests.conftest import make_batches
from tests.dist_worker import Heads, heads_loss  # a trunk and two heads, chosen per batch


def mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 3))


def union(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


OPTIMIZERS = {"sgd": lambda: sgd(0.1, momentum=0.9), "adamw": lambda: adamw(1e-2)}


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("mode", ["every", "micro_batches"])
def test_k4_of_8_equals_one_batch_of_32(opt, mode):
    micro = make_batches(16, batch=8)
    big = [union(micro[i : i + 4]) for i in range(0, 16, 4)]
    reference = fl.make_train_step(mlp(), fl.losses.cross_entropy, OPTIMIZERS[opt]())
    expected = fl.fold(reference, reference.init(), big, progress=False)
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, OPTIMIZERS[opt]()), **{mode: 4})
    got = fl.fold(step, step.init(), micro if mode == "every" else big, progress=False)
    assert int(got.step) == int(expected.step) == 4
    assert max_diff(got.params, expected.params) < 1e-6


def hand_accumulation(model, batches, k, lr=0.1):
    """Lightning-style loop with the weighting fixed: loss * n_i / N_window, step every k and at the end."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    windows = [batches[i : i + k] for i in range(0, len(batches), k)]
    for window in windows:
        total = sum(len(x) for x, _ in window)
        for x, y in window:
            (F.cross_entropy(model(x), y) * len(x) / total).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, len(windows)


def test_ten_batch_epoch_with_k4_makes_three_updates_the_last_from_two():
    batches = make_batches(10, batch=8)
    reference, updates = hand_accumulation(mlp(), batches, 4)
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), every=4)
    got = fl.fold(step, step.init(), batches, progress=False)
    assert updates == 3 and int(got.step) == 3
    assert int(got.slots["grad_accum"].count) == 0
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got.params[name], p.detach(), rtol=1e-6, atol=1e-7)
    lightning_style = fl.fold(step, step.init(), batches[:8], progress=False)  # a 1/K-scaled last window differs
    assert max_diff(lightning_style.params, got.params) > 1e-4


def test_uneven_micro_batches_equal_their_union():
    g = torch.Generator().manual_seed(3)
    sizes = [5, 11, 2, 14]
    micro = [(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    reference = fl.make_train_step(mlp(), fl.losses.cross_entropy, adamw(1e-2))
    expected, _ = reference(reference.init(), union(micro))
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, adamw(1e-2)), every=4)
    state = step.init()
    for b in micro:
        state, metrics = step(state, b)
    assert max_diff(state.params, expected.params) < 1e-6
    full_loss = F.cross_entropy(mlp()(union(micro)[0]), union(micro)[1])
    torch.testing.assert_close(metrics["loss"], full_loss, rtol=1e-6, atol=0)


def test_split_mode_handles_uneven_split_and_reports_window_means():
    x, y = union(make_batches(1, batch=30))
    reference = fl.make_train_step(mlp(), fl.losses.classification, adamw(1e-2))
    expected, exp_metrics = reference(reference.init(), (x, y))
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.classification, adamw(1e-2)), micro_batches=4)
    got, metrics = step(step.init(), (x, y))
    assert max_diff(got.params, expected.params) < 1e-6
    torch.testing.assert_close(metrics["loss"], exp_metrics["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(metrics["accuracy"], exp_metrics["accuracy"], rtol=1e-6, atol=0)


def test_step_counter_and_schedule_count_updates_not_micro_batches():
    schedule = fl.optim.linear(1.0, 0.0, 10)
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(schedule)), every=3)
    state = step.init()
    lrs = []
    for i, b in enumerate(make_batches(9, batch=4)):
        state, _ = step(state, b)
        assert int(state.step) == (i + 1) // 3
        lrs.append(float(state.opt_state.hparams["lr"]))
    assert lrs[2::3] == [1.0, 0.9, 0.8]
    assert fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), every=4).updates_per(10) == 3


def test_micro_batches_draw_different_dropout_masks():
    step = fl.with_grad_accum(fl.make_train_step(mlp(dropout=0.5), fl.losses.cross_entropy, sgd(0.1)), every=2)
    b = make_batches(1)[0]
    s1, m1 = step(step.init(), b)
    _, m2 = step(s1, b)
    assert not torch.equal(m1["loss"], 2 * m2["loss"] - m1["loss"])  # second micro-batch loss differs from the first


def test_resume_mid_window_is_bitwise():
    batches = make_batches(10, batch=8)
    step = fl.with_grad_accum(fl.make_train_step(mlp(dropout=0.2), fl.losses.cross_entropy, adamw(1e-2)), every=4)
    whole = fl.fold(step, step.init(seed=1), batches, epochs=2, progress=False)
    part = fl.fold(step, step.init(seed=1), batches, max_steps=4, progress=False)
    assert (int(part.step), int(part.data.epoch), int(part.data.batch)) == (4, 1, 4)
    resumed = fl.fold(step, part, batches, epochs=2, progress=False)
    assert fl.tree_equal(resumed.params, whole.params) and fl.tree_equal(resumed.opt_state, whole.opt_state)
    mid = step.init(seed=1)
    for b in batches[:6]:
        mid, _ = step(mid, b)
    assert int(mid.slots["grad_accum"].count) == 2
    mid = mid.replace(data=fl.DataPosition(epoch=torch.tensor(0), batch=torch.tensor(6)))
    resumed = fl.fold(step, mid, batches, epochs=2, progress=False)
    assert fl.tree_equal(resumed.params, whole.params) and fl.tree_equal(resumed.slots, whole.slots)


def test_pure_and_donated_paths_agree():
    batches = make_batches(6, batch=8)
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, adamw(1e-2)), every=4)
    state = step.init()
    direct = state
    for b in batches:
        direct, _ = step(direct, b)
    assert int(direct.slots["grad_accum"].count) == 2
    folded = fl.fold(step, state, batches, progress=False)  # the fold also flushes the short last window
    flushed, _ = step.flush(direct)
    assert fl.tree_equal(folded.params, flushed.params)
    assert fl.tree_equal(folded.slots, flushed.slots)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "give exactly one of every=K .* got every=None, micro_batches=None"),
        ({"every": 2, "micro_batches": 2}, ValueError, "give exactly one of"),
        ({"every": 0}, ValueError, "every must be an int >= 1, got 0"),
        ({"micro_batches": 1.5}, ValueError, "micro_batches must be an int >= 1, got 1.5"),
        ({"every": 2, "batch_size_fn": 3}, TypeError, "batch_size_fn must be callable"),
    ],
)
def test_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), **kwargs)


def test_errors_at_call_time_name_the_problem():
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), micro_batches=4)
    with pytest.raises(ValueError, match="a batch of 3 samples cannot be split into 4 micro-batches"):
        step(step.init(), (torch.zeros(3, 10), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"must share its leading dimension to be split, got leading sizes \[4, 8\]"):
        step(step.init(), (torch.zeros(8, 10), torch.zeros(4, dtype=torch.long)))
    streaming = fl.with_grad_accum(fl.make_train_step(mlp(), lambda m, b: m(b["x"]).sum(), sgd(0.1)), every=2)
    with pytest.raises(TypeError, match="cannot infer the batch size"):
        streaming(streaming.init(), {"x": 3})
    with pytest.raises(TypeError, match="with_grad_accum is applied by calling the step"):
        streaming.grads(streaming.init(), None)


@pytest.mark.parametrize("mode", [{"every": 2}, {"micro_batches": 2}], ids=["every", "micro_batches"])
@pytest.mark.parametrize(
    ("count", "error", "match"),
    [
        (lambda b: torch.tensor(b[0].shape[0]), TypeError, r"got Tensor tensor\(\d\) from batch_size_fn=.*; convert it with int"),
        (lambda b: b[0].shape[0] / 2, TypeError, r"\(an int >= 1\), got float [\d.]+ from batch_size_fn="),
        (lambda b: True, TypeError, r"\(an int >= 1\), got bool True"),
        (lambda b: 0, ValueError, r"\(an int >= 1\), got 0 from batch_size_fn=.*: a micro-batch without samples"),
        (lambda b: -4, ValueError, r"\(an int >= 1\), got -4 from"),
    ],
    ids=["tensor", "float", "bool", "zero", "negative"],
)
def test_a_batch_size_fn_that_returns_no_sample_count_is_named(mode, count, error, match):
    # streaming, 0 was a bare ZeroDivisionError and -4 weighted the gradients by it; a tensor or a float turned the
    # window's sample counts (ints in init's slot) into tensors or floats, so a checkpoint written inside the window
    # raised CheckpointMismatchError in the next run's init()
    step = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), batch_size_fn=count, **mode)
    with pytest.raises(error, match=match):
        step(step.init(), (torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)))


def test_a_mid_window_checkpoint_with_a_batch_size_fn_of_ones_own_resumes(tmp_path):
    def build():
        inner = fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1))
        counted = fl.with_grad_accum(inner, every=3, batch_size_fn=lambda b: int(b[1].numel()))
        return fl.with_checkpointing(counted, directory=tmp_path, every=10)

    step = build()
    state, _ = step(step.init(), make_batches(1)[0])
    step.save_now(state)
    assert fl.tree_equal(build().init().slots["grad_accum"], state.slots["grad_accum"])


def test_wrong_targets_and_orders_are_rejected():
    with pytest.raises(TypeError, match="with_grad_accum: expected a train step .* got function"):
        fl.with_grad_accum(lambda s, b: (s, {}), every=2)
    once = fl.with_grad_accum(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), every=2)
    with pytest.raises(ValueError, match="already wrapped by with_grad_accum; apply it once"):
        fl.with_grad_accum(once, every=2)


def test_pure_flush_leaves_the_input_window_untouched():
    step = fl.with_grad_accum(fl.with_amp(fl.make_train_step(mlp(), fl.losses.cross_entropy, sgd(0.1)), dtype="fp16"), every=4)
    state = step.init()
    for b in make_batches(2):
        state, _ = step(state, b)
    before = fl.tree_clone(state)
    flushed, _ = step.flush(state)
    assert fl.tree_equal(state, before) and int(flushed.step) == 1


# windows of two micro-batches: complete, then a partial one (the flags start mid-window); no gradient for b
# at all (b skipped, as torch.optim skips a None gradient); partial first (flags from zero), then complete;
# two partial halves that cover everything; complete again
HEADS = [("ab", "a"), ("a", "a"), ("a", "ab"), ("b", "a"), ("ab", "ab")]


def test_windows_whose_micro_batches_reach_different_parameters_match_torch_optim():
    g = torch.Generator().manual_seed(3)
    windows = [
        [(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g), heads) for n, heads in zip((4, 6), pair)]
        for pair in HEADS
    ]
    reference = Heads()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for window in windows:
        total = sum(len(b[0]) for b in window)
        for batch in window:
            (heads_loss(reference, batch) * (len(batch[0]) / total)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    step = fl.with_grad_accum(fl.make_train_step(Heads(), heads_loss, sgd(0.1, momentum=0.9)), every=2)
    batches = [b for w in windows for b in w]
    direct = step.init()  # pure calls first: the donating fold below updates the model's own tensors
    for b in batches:
        direct, _ = step(direct, b)
    folded = fl.fold(step, step.init(), batches, donate=True, progress=False)
    assert max_diff(folded.params, expected) < 1e-6
    assert fl.tree_equal(direct.params, folded.params) and fl.tree_equal(direct.opt_state, folded.opt_state)
    assert int(folded.step) == len(HEADS)


def test_split_pieces_that_reach_different_parameters_match_torch_optim():
    def flagged_loss(model, batch):  # the piece's first flag picks the heads (0: a, 1: b, 2: both)
        x, y, flag = batch
        return heads_loss(model, (x, y, ("a", "b", "ab")[int(flag[0])]))

    g = torch.Generator().manual_seed(4)
    flags = [(0, 1), (1, 2), (0, 0), (2, 0)]  # the second piece reaches a parameter the first did not, etc.
    batches = [
        (torch.randn(10, 10, generator=g), torch.randint(0, 3, (10,), generator=g), torch.tensor([first] * 5 + [second] * 5))
        for first, second in flags
    ]
    reference = Heads()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for batch in batches:
        for piece in zip(*(t.tensor_split(2) for t in batch)):
            (flagged_loss(reference, piece) * 0.5).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step = fl.with_grad_accum(fl.make_train_step(Heads(), flagged_loss, sgd(0.1, momentum=0.9)), micro_batches=2)
    state = fl.fold(step, step.init(), batches, donate=True, progress=False)
    assert max_diff(state.params, {n: p.detach() for n, p in reference.named_parameters()}) < 1e-6


class _Penalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 1)
        self.extra = nn.Parameter(torch.zeros(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _expanded(model, batch):  # the penalty's gradient comes from autograd as an expanded, stride-0 tensor
    x, y = batch
    return F.mse_loss(model(x), y) + 0.01 * model.extra.sum()


def _dense(model, batch):  # the same values, as a dense gradient
    x, y = batch
    return F.mse_loss(model(x), y) + (model.extra * 0.01).sum()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: fl.with_grad_accum(s, every=2),
        lambda s: fl.with_grad_accum(s, micro_batches=2),
        lambda s: fl.with_amp(s, dtype="fp16"),
        lambda s: fl.with_grad_accum(fl.with_amp(s, dtype="fp16"), every=2),
    ],
    ids=["every", "micro_batches", "amp", "amp+every"],
)
@pytest.mark.parametrize("direct", [False, True])
def test_an_expanded_gradient_trains_as_its_dense_equal(wrap, direct):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(4)]
    out = []
    for loss_fn in (_expanded, _dense):
        step = wrap(fl.make_train_step(_Penalised(), loss_fn, fl.optim.adamw(1e-2)))
        state = step.init()
        if direct:
            for batch in data:
                state, _ = step(state, batch)
        else:
            state = fl.fold(step, state, data, progress=False)
        out.append(state.params)
    for name in out[1]:
        assert torch.equal(out[0][name], out[1][name]), name
