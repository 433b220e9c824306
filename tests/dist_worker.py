"""Data-parallel runs for tests/test_distributed.py; launch with torchrun --nproc_per_node 2.

Usage: ``torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR PHASE``. Every run trains on the
global batches of ``global_batches()``, each rank taking its half; rank 0 writes what the tests
compare into OUT_DIR. One launch runs many scenarios: starting ranks costs seconds.

Phases:
- ``train``: with_ddp and with_fsdp, each without and with accumulation (K=2), 20 updates;
  an explicit ``save_now`` inside an accumulation window under each;
  with_ddp and with_fsdp where some parameters get a gradient on one rank only, or on none;
  the FSDP trap
  (gathering without ``grad_placements``); per-rank state bytes; an FSDP run that saves
  sharded checkpoints at updates 10 and 20; and the 1 -> 2 reshard of a single-process
  checkpoint (``OUT_DIR/single.ckpt``, written by the test first).
- ``preempt``: SIGTERM to one rank, or to both at different micro-batches (see :func:`preempt`).
- ``preempt_edges``: signals after the last update, inside nested folds, to a rank handling none
  of its own; a resumed checkpoint that fits one rank only (see :func:`preempt_edges`).
- ``resume``: restore ``OUT_DIR/back.ckpt`` (the 2 -> 1 reshard of update 10, written by the
  test) on 2 FSDP ranks and train the last 10 updates.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

import fnlight as fl
from fnlight.distributed import _fsdp

UPDATES = 20


def model(width=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, 3))


def optimizer():
    return fl.optim.chain(fl.optim.clip_by_global_norm(1.0), fl.optim.adamw(1e-2))


def global_batches(n=UPDATES, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 10, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def local_batches(rank, accum, world=2):
    """This rank's half of every global batch, as ``accum`` micro-batches each."""
    data = []
    for x, y in global_batches():
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        xs, ys = x[share], y[share]
        data += [(xs[i::accum], ys[i::accum]) for i in range(accum)]
    return data


def build(mode, rank, accum=1, width=32):
    step = fl.make_train_step(local_model(rank, width), fl.losses.cross_entropy, optimizer())
    step = fl.with_ddp(step) if mode == "ddp" else fl.with_fsdp(step)
    return fl.with_grad_accum(step, every=accum) if accum > 1 else step


class Heads(nn.Module):
    """A trunk and two heads; a batch's third element names the heads its loss uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x, heads):
        h = torch.tanh(self.trunk(x))
        return sum(getattr(self, name)(h) for name in heads)


def heads_loss(model, batch):
    x, y, heads = batch
    return torch.nn.functional.cross_entropy(model(x, heads), y)


# per update, the heads each rank's loss uses: b on rank 1 only; b on no rank (not updated); a on rank 1 only
HEADS = [("a", "ab"), ("a", "a"), ("b", "ab")]


def heads_batches(rank):
    """Per update, this rank's half of an 8-sample global batch, with the heads it uses."""
    g = torch.Generator().manual_seed(5)
    data = []
    for pair in HEADS:
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)
        data.append((x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4], pair[rank]))
    return data


def heads_optimizer():
    return fl.optim.sgd(0.1, momentum=0.9)


OTHER_OPTIMIZERS = {
    "sgd": lambda: fl.optim.sgd(0.1, momentum=0.9, weight_decay=1e-3),
    "adagrad": lambda: fl.optim.adagrad(0.1, weight_decay=1e-3),
    "rmsprop": lambda: fl.optim.rmsprop(1e-3, momentum=0.9),
    "clip_by_value": lambda: fl.optim.chain(fl.optim.clip_by_value(0.05), fl.optim.adam(1e-2)),
}


def local_model(rank, width=32):
    """A different local init on every rank (rank 0's must win, broadcast or scattered by the transform)."""
    torch.manual_seed(100 + rank)
    local = nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, 3))
    if rank == 0:
        local.load_state_dict(model(width).state_dict())
    return local


class Scaled(nn.Module):
    """A linear layer times a 0-d parameter (CLIP's logit scale), different on every rank before init."""

    def __init__(self, rank):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.0 + rank))

    def forward(self, x):
        return self.lin(x) * self.scale


def write_every_ranks(path, value):
    """Gather ``value`` from every rank; rank 0 writes the list (by rank) as JSON. Every rank must call it."""
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, value)
    if torch.distributed.get_rank() == 0:
        path.write_text(json.dumps(everyone))


def save_params(path, state):
    """Rank 0 writes the whole parameters (gathered from the shards); every rank must call it."""
    params = fl.state_dict(state)
    if torch.distributed.get_rank() == 0:
        fl.checkpoint.save(path, params)


def train(out: Path, rank: int) -> None:
    for mode in ("ddp", "fsdp"):
        for accum in (1, 2):
            step = build(mode, rank, accum)
            state = fl.fold(step, step.init(), local_batches(rank, accum), progress=False)
            assert int(state.step) == UPDATES, int(state.step)
            save_params(out / f"{mode}-{accum}.ckpt", state)

    # The trap: full_tensor() without grad_placements leaves each rank with its own gradient.
    original = _fsdp._gather
    _fsdp._gather = lambda tensors: {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in tensors.items()}
    try:
        step = build("fsdp", rank)
        save_params(out / "trap.ckpt", fl.fold(step, step.init(), local_batches(rank, 1), progress=False))
    finally:
        _fsdp._gather = original

    metrics(out, rank)

    # Tracked metrics whose names differ by rank (one on rank 1 only, the others in another order): averaged by
    # name (the job aborted in gloo on the different lengths; in another order only, they were summed crosswise).
    def keyed_loss(model, batch):
        values = {"a": 1.0, "b": 2.0} if rank == 0 else {"only1": 5.0, "b": 20.0, "a": 10.0}
        return fl.losses.cross_entropy(model, batch), {k: torch.tensor(v) for k, v in values.items()}

    step = fl.with_ddp(fl.make_train_step(local_model(rank), keyed_loss, optimizer()))
    step = fl.with_tracking(step, trackers=[fl.tracking.JSONLTracker(out / f"track-keys-{rank}")], every=2)
    fl.fold(step, step.init(), local_batches(rank, 1)[:4], progress=False)

    # Parameters some ranks' batches do not reach (DistributedDataParallel's find_unused_parameters).
    step = fl.with_ddp(fl.make_train_step(Heads(), heads_loss, heads_optimizer()))
    save_params(out / "heads.ckpt", fl.fold(step, step.init(), heads_batches(rank), progress=False))
    # The other optimizers on shards: SGD and Adagrad (their fused kernels have no DTensor rule: local shards),
    # RMSprop (multi-tensor kernels), value clipping.
    for name, opt in OTHER_OPTIMIZERS.items():
        step = fl.with_fsdp(fl.make_train_step(local_model(rank), fl.losses.cross_entropy, opt()))
        save_params(out / f"fsdp-{name}.ckpt", fl.fold(step, step.init(), local_batches(rank, 1), progress=False))

    # with_fsdp: a head no rank uses is skipped; a head used on some ranks only is refused (here the shapes
    # match, so the ranks' reduce-scatters pair a's gradient with b's without any error from the backend).
    step = fl.with_fsdp(fl.make_train_step(Heads(), heads_loss, heads_optimizer()))
    only_a = [(x, y, "a") for x, y, _ in heads_batches(rank)]
    save_params(out / "heads-fsdp.ckpt", fl.fold(step, step.init(), only_a, progress=False))
    try:
        fl.fold(step, step.init(), [(x, y, "ab"[rank]) for x, y, _ in heads_batches(rank)], progress=False)
        message = ""
    except RuntimeError as e:
        message = str(e)
    if rank == 0:
        (out / "fsdp-uneven.txt").write_text(message)

    # A 0-d parameter is replicated under FSDP: init and a donating fold must leave the model's own tensor
    # (rank 1's differs from rank 0's) and another init() state alone.
    scaled = Scaled(rank)
    before = float(scaled.scale)
    step = fl.with_fsdp(fl.make_train_step(scaled, fl.losses.mse, fl.optim.sgd(0.1)))
    state, kept = step.init(), step.init()
    fl.fold(step, state, [(torch.ones(4, 3), torch.zeros(4, 2))] * 3, donate=True, progress=False)
    untouched = [float(scaled.scale) == before, float(kept.params["scale"].full_tensor()) == 1.0]
    write_every_ranks(out / "fsdp-scalar.json", untouched)

    # A direct call's loss metric is the mean over the ranks (each rank holds half of the global batch).
    losses = {}
    for mode in ("ddp", "fsdp"):
        step = build(mode, rank)
        _, step_metrics = step(step.init(), local_batches(rank, 1)[0])
        losses[mode] = float(step_metrics["loss"])
    write_every_ranks(out / "losses.json", losses)

    # Plain lists of different lengths on the ranks: refused at the fold's start on every rank (under with_ddp
    # gloo aborted rank 0 at the first mismatched all-reduce; under with_fsdp the ranks stalled to the timeout).
    refused = {}
    for mode in ("ddp", "fsdp"):
        step = build(mode, rank)
        try:
            fl.fold(step, step.init(), local_batches(rank, 1)[: 4 + rank], progress=False)
            refused[mode] = ""
        except ValueError as e:
            refused[mode] = str(e)
    write_every_ranks(out / "uneven-lists.json", refused)
    # Loaders over each rank's own data (world_size=1), of different lengths: refused alike (under with_ddp rank 0
    # read the mismatched all-reduce as another rank's SIGTERM and rank 1 timed out; under with_fsdp both stalled).
    refused = {}
    for mode in ("ddp", "fsdp"):
        step = build(mode, rank)
        x, y = global_batches(1, size=16 + 4 * rank)[0]
        try:
            fl.fold(step, step.init(), fl.Loader((x, y), batch_size=4, rank=0, world_size=1), progress=False)
            refused[mode] = ""
        except ValueError as e:
            refused[mode] = str(e)
    write_every_ranks(out / "uneven-loaders.json", refused)
    # Loaders that do not split the data among the training ranks (a rank hard-coded, another world_size): refused,
    # where each update trained on one share twice (or on half the data) without a word.
    refused = {}
    for name, share in {"same-rank": dict(rank=0, world_size=2), "world-size": dict(rank=rank, world_size=4)}.items():
        step = build("ddp", rank)
        x, y = global_batches(1, size=32)[0]
        try:
            fl.fold(step, step.init(), fl.Loader((x, y), batch_size=4, drop_last=True, **share), progress=False)
            refused[name] = ""
        except ValueError as e:
            refused[name] = str(e)
    write_every_ranks(out / "unsplit-loaders.json", refused)

    # An explicit save_now inside an accumulation window (3 micro-batches per update, saved after 7): refused under
    # with_ddp (each rank's partial gradients differ, a checkpoint holds rank 0's); under with_fsdp the window's
    # buffers are sharded and reduce-scattered per micro-batch, so the resumed run ends bit-identical.
    midwindow = {}
    data = local_batches(rank, 3)
    for mode in ("ddp", "fsdp"):

        def build_saving(mode=mode):
            step = fl.make_train_step(local_model(rank), fl.losses.cross_entropy, optimizer())
            step = fl.with_ddp(step) if mode == "ddp" else fl.with_fsdp(step)
            return fl.with_checkpointing(fl.with_grad_accum(step, every=3), directory=out / f"midwindow-{mode}", every=1000)

        step = build_saving()
        state = step.init()
        for batch in data[:7]:
            state, _ = step(state, batch)
        try:
            step.save_now(state)
        except ValueError as e:
            midwindow[mode] = str(e)
            continue
        resumed = build_saving().init()
        for batch in data[7:]:
            resumed, _ = step(resumed, batch)
        for batch in data[7:]:
            state, _ = step(state, batch)
        midwindow[mode] = [int(resumed.slots["checkpointing"].resumed_from.endswith("step-000000002.ckpt"))] + [
            bool(torch.equal(a.full_tensor(), b.full_tensor())) for a, b in zip(resumed.params.values(), state.params.values())
        ]
    write_every_ranks(out / "midwindow.json", midwindow)

    # with_eval over a validation Loader of one sample: rank 1's share is empty. It raised 'data is empty' on rank 1
    # alone, at build time, and rank 0 waited in its first collective until the timeout.
    evaluated = {}
    x, y = global_batches(1, size=1)[0]
    for mode in ("ddp", "fsdp"):
        val = fl.Loader((x, y), batch_size=4)  # rank and world_size: the process group's
        step = fl.with_eval(build(mode, rank), data=val, loss_fn=fl.losses.cross_entropy, every=1)
        _, step_metrics = step(step.init(), local_batches(rank, 1)[0])
        evaluated[mode] = [len(val), float(step_metrics["val/loss"])]
    write_every_ranks(out / "one-sample-eval.json", evaluated)

    # Per-rank bytes of parameters + optimizer state.
    sizes = {}
    for mode in ("ddp", "fsdp"):
        state = build(mode, rank, width=512).init()
        sizes[mode] = fl.distributed.local_bytes((state.params, state.opt_state))
    write_every_ranks(out / "bytes.json", sizes)

    # Sharded checkpoints at updates 10 and 20 of an uninterrupted FSDP run.
    step = fl.with_checkpointing(build("fsdp", rank), directory=out / "sharded", every=10, keep_last=2)
    state = fl.fold(step, step.init(), local_batches(rank, 1), progress=False)
    save_params(out / "uninterrupted.ckpt", state)

    # 1 -> 2: a single-process checkpoint restored into 2 FSDP ranks, saved sharded again.
    state = fl.distributed.restore_sharded(out / "single.ckpt", build("fsdp", rank).init())
    fl.distributed.save_sharded(out / "single-on-2", state)


def eval_batches():
    """Uneven shares: rank 0 gets 3 batches (sizes 5, 7, 2), rank 1 gets 2 (sizes 4, 1)."""
    g = torch.Generator().manual_seed(2)
    sizes = [(5, 7, 2), (4, 1)]
    return [[(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in share] for share in sizes]


def metrics(out: Path, rank: int) -> None:
    """Evaluation over every rank's share; tracking that logs the mean over ranks from rank 0 only."""
    step = build("ddp", rank)
    state = step.init()
    result = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, eval_batches()[rank])
    # fractional weights (a number of samples as batch_size_fn may give it): rank 0 weighs 0.5, rank 1 weighs 1.0
    weighted = fl.evaluate(
        lambda s, b: {"m": torch.tensor(float(rank + 1))}, state, eval_batches()[rank][:1], batch_size_fn=lambda b: 0.5 + rank / 2
    )
    local_losses = []
    tracked = fl.with_tracking(step, trackers=[fl.tracking.JSONLTracker(out / f"track-{rank}")], every=5)
    fl.fold(
        tracked,
        tracked.init(),
        local_batches(rank, 1)[:10],
        progress=False,
        observers=[fl.Observer(lambda s, m: local_losses.append(float(m["loss"])), steps=1, at_end=False)],
    )
    everyone = [None, None]
    torch.distributed.all_gather_object(everyone, local_losses)
    # under with_fsdp too: the sharded parameters are gathered once, though the ranks' batch counts differ
    sharded = build("fsdp", rank).init()
    result_fsdp = fl.evaluate(fl.make_eval_step(fl.losses.classification), sharded, eval_batches()[rank])
    # BatchNorm statistics: rank 0's on every rank after each update (DistributedDataParallel's broadcast_buffers)
    buffers = {}
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        bn = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        core = fl.make_train_step(bn, fl.losses.cross_entropy, optimizer())
        step = fl.with_ddp(core) if mode == "ddp" else fl.with_fsdp(core)
        state = fl.fold(step, step.init(), local_batches(rank, 1)[:6], progress=False)
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, {k: v.tolist() for k, v in state.buffers.items()})
        buffers[mode] = gathered
    if rank == 0:
        saved = {"eval": result, "weighted": weighted, "eval_fsdp": result_fsdp, "losses": everyone, "buffers": buffers}
        (out / "metrics.json").write_text(json.dumps(saved))


def resume(out: Path, rank: int) -> None:
    step = build("fsdp", rank)
    target = step.init().with_slot("checkpointing", fl.CheckpointingState(""))  # saved under with_checkpointing
    state = fl.distributed.restore_sharded(out / "back.ckpt", target)
    assert int(state.step) == UPDATES // 2, int(state.step)
    state = fl.fold(step, state, local_batches(rank, 1), progress=False)
    save_params(out / "resumed.ckpt", state)


def fault(out: Path, rank: int) -> None:
    """Rank 1 dies (``FAULT=kill``: SIGKILL; ``raise``: an exception; ``hang``: stalls) at update 5 of a long DDP run.

    Under torchrun (``FAULT=restart``) it is the FSDP run of ``train`` with sharded checkpoints
    every 10 updates, and rank 1 is killed at update 12 of the first attempt only: torchrun's
    restart resumes from update 10.
    """
    import os
    import time

    kind = os.environ["FAULT"]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def maybe_die(state, metrics):
        if rank == 1 and int(state.step) == (12 if kind == "restart" else 5) and attempt == 0:
            if kind == "raise":
                raise RuntimeError("rank 1 fails on purpose")
            if kind == "hang":
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)

    die = fl.Observer(maybe_die, steps=1, at_end=False)
    if kind == "restart":
        step = fl.with_checkpointing(build("fsdp", rank), directory=out / "restart", every=10, keep_last=2)
        state = fl.fold(step, step.init(), local_batches(rank, 1), progress=False, observers=[die])
        save_params(out / "restarted.ckpt", state)
        if rank == 0:
            (out / "resumed_from.txt").write_text(state.slots["checkpointing"].resumed_from)
        return
    step = build("ddp", rank)
    fl.fold(step, step.init(), local_batches(rank, 1) * 50, progress=False, observers=[die])


def bn_model(rank):
    torch.manual_seed(rank)  # rank 0's weights win (scattered by with_fsdp, broadcast by with_ddp)
    return nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def bn_stack(mode, rank, directory):
    """BatchNorm statistics and accumulation flags (replicated, not 0-d), EMA (copies into shards)."""
    step = fl.make_train_step(bn_model(rank), fl.losses.cross_entropy, optimizer())
    step = fl.with_ddp(step) if mode == "ddp" else fl.with_fsdp(step)
    step = fl.with_ema(fl.with_grad_accum(step, every=2), decay=0.9)
    return fl.with_checkpointing(step, directory=directory, every=2, keep_last=2)


def checkpoints(out: Path, rank: int) -> None:
    """Train a BatchNorm stack 4 updates with a checkpoint every 2 (a resumed run starts where the last valid one is)."""
    mode = os.environ["MODE"]
    step = bn_stack(mode, rank, out / f"bn-{mode}")
    state = step.init()
    write_every_ranks(out / f"bn-{mode}-resumed-from.json", state.slots["checkpointing"].resumed_from)
    state = fl.fold(step, state, local_batches(rank, 1)[:8], max_steps=4, progress=False)
    write_every_ranks(out / f"bn-{mode}-ended.json", int(state.step))


def preempt(out: Path, rank: int) -> None:
    """SIGTERM to some ranks only, at micro-batch ``SIGNAL_AT`` (``"a,b"``: rank 0's, rank 1's; -1: none).

    Accumulation over 2 micro-batches, checkpoints on preemption only (every=100 is past the run). The first launch trains
    uninterrupted (``full.ckpt``), then is preempted (every rank's update, checkpoint and exit
    code go to ``preempted.json``); a second launch (``RESUME=1``) resumes and finishes
    (``resumed.ckpt``).
    """
    mode = os.environ["MODE"]
    directory = out / f"preempt-{mode}"
    if os.environ.get("RESUME"):
        step = fl.with_checkpointing(build(mode, rank, accum=2), directory=directory, every=100)
        state = step.init()
        write_every_ranks(out / "resumed-from.json", [state.slots["checkpointing"].resumed_from, int(state.step)])
        save_params(out / "resumed.ckpt", fl.fold(step, state, local_batches(rank, 2), progress=False))
        return
    step = build(mode, rank, accum=2)
    save_params(out / "full.ckpt", fl.fold(step, step.init(), local_batches(rank, 2), progress=False))
    step = fl.with_checkpointing(build(mode, rank, accum=2), directory=directory, every=100)
    from conftest import SignalledData  # tests/ is this script's directory

    at = int(os.environ["SIGNAL_AT"].split(",")[rank])  # -1: never
    try:
        fl.fold(step, step.init(), SignalledData(local_batches(rank, 2), at=at, signum=signal.SIGTERM), progress=False)
        outcome = None
    except fl.Preempted as e:
        outcome = [int(e.state.step), str(e.path), e.code, str(e)]
    write_every_ranks(out / "preempted.json", outcome)


def preempt_edges(out: Path, rank: int) -> None:
    """Signals no update carries, nested folds, a rank that handles no signals, a checkpoint one rank cannot take.

    Every scenario writes each rank's outcome (``[update, checkpoint name, exit code]`` of its
    ``Preempted``, or the exception's type and message) to ``edges.json``.
    """
    from conftest import SignalledData

    data = local_batches(rank, 1)[:4]
    outcomes = {}

    def run(name, fold):
        try:
            fold()
            outcome = "returned"
        except fl.Preempted as e:
            outcome = [int(e.state.step), Path(e.path).name if e.path else None, e.code]
        except Exception as e:  # reported to the test
            outcome = [type(e).__name__, str(e)[:300]]
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, outcome)
        outcomes[name] = everyone

    def stack(name, **eval_options):
        step = fl.make_train_step(local_model(rank), fl.losses.cross_entropy, optimizer())
        step = fl.with_ddp(step)
        if eval_options:
            step = fl.with_eval(step, loss_fn=fl.losses.cross_entropy, at_epoch_end=True, **eval_options)
        return fl.with_checkpointing(step, directory=out / f"edges-{name}", every=100, resume=False)

    class Val:  # SIGTERM to rank 1 while the last epoch's epoch-end evaluation runs: after the last update
        def __len__(self):
            return 1

        def __iter__(self):
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield data[0]

    step = stack("eval", data=Val())
    run("after-the-last-update", lambda: fl.fold(step, step.init(), data, progress=False))

    step = stack("unhandled")  # rank 0 handles no signals itself, but stops with rank 1
    signalled = SignalledData(data, at=2 if rank == 1 else -1, signum=signal.SIGTERM)
    run("handle-signals-on-one-rank", lambda: fl.fold(step, step.init(), signalled, handle_signals=rank == 1, progress=False))

    probe = fl.make_train_step(model(), fl.losses.cross_entropy, fl.optim.sgd(0.1))
    probe_data = SignalledData(data[:3], at=1 if rank == 1 else -1, signum=signal.SIGTERM)

    @fl.every(2, at_end=False)
    def fit_probe(state, metrics):  # an inner fold, signalled on rank 1: the outer fold stops, with its checkpoint
        fl.fold(probe, probe.init(), probe_data, progress=False)

    step = stack("nested")
    run("inside-a-nested-fold", lambda: fl.fold(step, step.init(), data, observers=[fit_probe], progress=False))

    width = 32 if rank == 0 else 16  # the checkpoint fits rank 0's state only (no with_ddp: its init would broadcast)
    core = fl.make_train_step(local_model(rank, width), fl.losses.cross_entropy, optimizer())
    resumed = fl.with_checkpointing(core, directory=out / "edges-nested", every=100)
    run("fits-one-rank-only", resumed.init)
    if rank == 0:
        (out / "edges.json").write_text(json.dumps(outcomes))


def main(out, phase):
    info = fl.init_distributed(timeout=float(os.environ.get("FNLIGHT_TEST_TIMEOUT", 60)))
    phases = {
        "train": train,
        "resume": resume,
        "fault": fault,
        "checkpoints": checkpoints,
        "preempt": preempt,
        "preempt_edges": preempt_edges,
    }
    phases[phase](Path(out), info.rank)
    torch.distributed.barrier()  # every rank is done before any exits


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
