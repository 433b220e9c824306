"""with_ddp and with_fsdp under torchrun with 2 gloo ranks equal single-process training on the global batch.

The ranks run tests/dist_worker.py (one launch for many scenarios: starting ranks costs seconds).
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fnlight as fl
from tests.dist_worker import (
    HEADS,
    OTHER_OPTIMIZERS,
    UPDATES,
    Heads,
    bn_model,
    eval_batches,
    global_batches,
    heads_batches,
    heads_loss,
    model,
    optimizer,
)

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def reference_step():
    return fl.make_train_step(model(), fl.losses.cross_entropy, optimizer())


def params_of(path, like):
    return fl.checkpoint.restore(path, {k: torch.empty_like(v) for k, v in like.items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The uninterrupted single-process reference, then the 2-rank ``train`` phase."""
    out = tmp_path_factory.mktemp("dist")
    step = reference_step()
    data = global_batches()
    half = fl.fold(step, step.init(), data, max_steps=UPDATES // 2, progress=False)
    fl.checkpoint.save(out / "single.ckpt", half)
    expected = fl.fold(step, step.init(), data, progress=False)
    proc = torchrun("tests/dist_worker.py", str(out), "train")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, expected


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_equal_one_process_on_the_global_batch(run, mode, accum):
    out, expected = run
    assert_params_close(params_of(out / f"{mode}-{accum}.ckpt", expected.params), expected.params)


def heads_reference(heads=None):
    """Two-head training by hand with torch.optim on the mean of the ranks' losses (``heads`` overrides theirs)."""
    reference = Heads()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    shares = [heads_batches(0), heads_batches(1)]
    for update in range(len(HEADS)):
        batches = [share[update] if heads is None else (*share[update][:2], heads) for share in shares]
        (sum(heads_loss(reference, b) for b in batches) / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in reference.named_parameters()}


def assert_params_close(got, expected):
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)


def test_ddp_parameters_reached_on_some_ranks_only_match_torch_optim_on_the_mean_loss(run):
    """A head one rank's batches skip takes part with zeros; one no rank uses is not updated (nor its momentum)."""
    out, _ = run
    expected = heads_reference()
    got = params_of(out / "heads.ckpt", expected)
    assert_params_close(got, expected)
    assert not torch.equal(got["b.weight"], Heads().b.weight.detach())


@pytest.mark.parametrize("name", sorted(OTHER_OPTIMIZERS))
def test_fsdp_with_the_other_optimizers_equals_one_process(run, name):
    """SGD and Adagrad (fused kernels DTensor has no rule for), RMSprop (foreach), value clipping."""
    out, _ = run
    step = fl.make_train_step(model(), fl.losses.cross_entropy, OTHER_OPTIMIZERS[name]())
    expected = fl.fold(step, step.init(), global_batches(), progress=False)
    assert_params_close(params_of(out / f"fsdp-{name}.ckpt", expected.params), expected.params)


def test_fsdp_skips_a_parameter_no_rank_reaches_and_refuses_one_some_ranks_reach(run):
    out, _ = run
    expected = heads_reference(heads="a")
    got = params_of(out / "heads-fsdp.ckpt", expected)
    assert_params_close(got, expected)
    assert torch.equal(got["b.weight"], Heads().b.weight.detach())  # never reached: never updated
    message = (out / "fsdp-uneven.txt").read_text()
    assert message.startswith("with_fsdp at update 0: the loss reached these parameters on some ranks only: ")
    assert "a.weight (1 of 2 ranks)" in message and "b.bias (1 of 2 ranks)" in message and "use with_ddp" in message


def test_a_direct_calls_loss_metric_is_the_mean_over_the_ranks(run):
    out, _ = run
    x, y = global_batches()[0]
    with torch.no_grad():
        expected = float(fl.losses.cross_entropy(model(), (x, y)))
    for rank_losses in json.loads((out / "losses.json").read_text()):
        for mode in ("ddp", "fsdp"):
            assert rank_losses[mode] == pytest.approx(expected, rel=1e-6), (mode, rank_losses)


@pytest.mark.parametrize("data", ["uneven-lists", "uneven-loaders"])  # loaders: over each rank's own data
def test_ranks_with_different_numbers_of_batches_are_refused_on_every_rank(run, data):
    out, _ = run
    for refused in json.loads((out / f"{data}.json").read_text()):
        for mode in ("ddp", "fsdp"):
            assert refused[mode].startswith(
                "fold: the ranks' data have different numbers of batches per epoch (rank 0: 4, rank 1: 5)"
            ), (mode, refused)


def test_loaders_that_do_not_split_the_data_among_the_ranks_are_refused_on_every_rank(run):
    out, _ = run
    start = "fold: the ranks' Loaders do not split the data among the 2 training ranks "
    for refused in json.loads((out / "unsplit-loaders.json").read_text()):
        assert refused["same-rank"].startswith(start + "(rank 0: rank=0, world_size=2; rank 1: rank=0, world_size=2), so some")
        assert refused["world-size"].startswith(start + "(rank 0: rank=0, world_size=4; rank 1: rank=1, world_size=4), so some")
        assert refused["world-size"].endswith("its own rank and world_size=2 (the defaults: the process group's)")


def test_with_eval_over_a_loader_with_no_batch_on_one_rank_evaluates_on_every_rank(run):
    out, _ = run
    step = fl.with_eval(reference_step(), data=[global_batches(1, size=1)[0]], loss_fn=fl.losses.cross_entropy, every=1)
    _, metrics = step(step.init(), global_batches()[0])
    expected = float(metrics["val/loss"])
    for rank, evaluated in enumerate(json.loads((out / "one-sample-eval.json").read_text())):
        for mode in ("ddp", "fsdp"):
            batches, loss = evaluated[mode]
            assert batches == 1 - rank and loss == pytest.approx(expected, rel=1e-6), (mode, rank, evaluated)


def test_save_now_inside_an_accumulation_window_is_refused_under_ddp_and_exact_under_fsdp(run):
    out, _ = run
    for midwindow in json.loads((out / "midwindow.json").read_text()):
        assert midwindow["ddp"].startswith(
            "with_checkpointing.save_now: expected a state between accumulation windows under data parallelism, "
            "got a state 1 micro-batch into a with_grad_accum window on 2 ranks"
        ), midwindow
        assert midwindow["fsdp"] == [1, True, True, True, True], midwindow  # resumed from it; every parameter equal


def test_fsdp_leaves_a_models_0d_parameter_alone_under_a_donating_fold(run):
    out, _ = run
    # per rank: the model's scale as it was, and another init() state's scale still rank 0's 1.0
    assert json.loads((out / "fsdp-scalar.json").read_text()) == [[True, True], [True, True]]


def test_fsdp_trap_of_gathering_without_grad_placements_is_caught(run):
    """Gathering without grad_placements=[Partial()] skips the reduction: the comparison above would fail."""
    out, expected = run
    got = params_of(out / "trap.ckpt", expected.params)
    assert any(not torch.allclose(got[n], expected.params[n], rtol=1e-4, atol=1e-4) for n in expected.params)


def test_fsdp_state_bytes_per_rank_are_about_half_of_ddp(run):
    out, _ = run
    for rank_sizes in json.loads((out / "bytes.json").read_text()):
        assert rank_sizes["fsdp"] <= 0.55 * rank_sizes["ddp"], rank_sizes


def test_metrics_are_reduced_over_ranks_and_tracked_on_rank_0_only(run):
    out, _ = run
    saved = json.loads((out / "metrics.json").read_text())
    # evaluate: the exact per-sample means over both ranks' uneven shares
    step = reference_step()
    everything = [b for share in eval_batches() for b in share]
    expected = fl.evaluate(fl.make_eval_step(fl.losses.classification), step.init(), everything)
    assert saved["eval"] == pytest.approx(expected, rel=1e-12)
    assert saved["eval_fsdp"] == pytest.approx(expected, rel=1e-6)  # sharded parameters, ranks with 3 and 2 batches
    assert saved["weighted"] == {"m": (0.5 * 1.0 + 1.0 * 2.0) / 1.5}  # the summed weights were cut to an int: 2.5
    for mode in ("ddp", "fsdp"):  # BatchNorm statistics stay rank 0's on every rank
        rank0, rank1 = saved["buffers"][mode]
        assert rank0 == rank1 and rank0["1.num_batches_tracked"] == 6, mode
    # tracking: rank 0 logged the mean over ranks and updates of each window; rank 1 wrote nothing
    assert not (out / "track-1").exists()
    (run_file,) = (out / "track-0").glob("*.jsonl")
    logged = dict(fl.tracking.read_scalars(run_file)["loss"])
    losses = torch.tensor(saved["losses"], dtype=torch.float64)  # [rank, update]
    assert logged == pytest.approx({5: float(losses[:, :5].mean()), 10: float(losses[:, 5:].mean())}, rel=1e-6)


def test_tracked_metrics_whose_names_differ_by_rank_are_averaged_by_name(run):
    out, _ = run
    assert not (out / "track-keys-1").exists()
    (run_file,) = (out / "track-keys-0").glob("*.jsonl")
    logged = fl.tracking.read_scalars(run_file)
    # a: (1 + 10) / 2, b: (2 + 20) / 2; only1 from rank 1's calls alone
    expected = {"a": 5.5, "b": 11.0, "only1": 5.0}
    assert {k: logged[k] for k in expected} == {k: [(2, v), (4, v)] for k, v in expected.items()}


def test_reshard_two_ranks_to_one_and_back_continues_bit_identically(run):
    out, _ = run
    sharded = out / "sharded" / f"step-{UPDATES // 2:09d}.ckpt"
    assert sorted(os.listdir(sharded)) == ["rank-00000-of-00002.ckpt", "rank-00001-of-00002.ckpt"]
    # 2 -> 1: the sharded directory restored whole into one process, written as one file ...
    step = reference_step()
    target = step.init().with_slot("checkpointing", fl.CheckpointingState(""))  # saved under with_checkpointing
    whole = fl.distributed.restore_sharded(sharded, target)
    assert int(whole.step) == UPDATES // 2
    fl.checkpoint.save(out / "back.ckpt", whole)
    # ... and 1 -> 2: restored into two FSDP ranks, which finish the run.
    proc = torchrun("tests/dist_worker.py", str(out), "resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    uninterrupted = params_of(out / "uninterrupted.ckpt", whole.params)
    resumed = params_of(out / "resumed.ckpt", whole.params)
    for name in whole.params:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_reshard_one_process_to_two_and_back_continues_bit_identically(run):
    out, expected = run
    step = reference_step()
    target = step.init()
    back = fl.distributed.restore_sharded(out / "single-on-2", target)
    assert fl.tree_equal(back, fl.checkpoint.restore(out / "single.ckpt", target))
    resumed = fl.fold(step, back, global_batches(), progress=False)
    assert fl.tree_equal(resumed.params, expected.params)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["kill", "raise", "hang"])
def test_when_a_rank_dies_raises_or_stalls_the_survivor_exits_with_a_clear_error(tmp_path, kind):
    """Two ranks started by hand (no torchrun to clean up): rank 0 must not hang after rank 1 fails."""
    port = free_port()
    # a rank that dies or raises closes its connections: the survivor fails at once, well before a 90 s timeout;
    # a stalled rank is only noticed at the timeout (10 s)
    timeout = "10" if kind == "hang" else "90"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": kind, "FNLIGHT_TEST_TIMEOUT": timeout, "WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, "tests/dist_worker.py", str(tmp_path), "fault"]
    ranks = [
        subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        _, stderr = ranks[0].communicate(timeout=60)  # kill, raise: before the 90 s timeout; hang: after the 10 s one
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode != 0
    assert "fnlight: with_ddp at update 5: a collective failed on rank 0 of 2" in stderr, stderr[-3000:]
    assert "Another rank has most likely died or raised" in stderr


def test_torchrun_restart_resumes_from_the_last_sharded_checkpoint(run):
    """Rank 1 is killed at update 12; torchrun restarts both ranks, which resume from update 10 and finish."""
    out, _ = run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT": "restart"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1"]
    proc = subprocess.run(
        [*cmd, "tests/dist_worker.py", str(out), "fault"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "resumed_from.txt").read_text().endswith(f"step-{UPDATES // 2:09d}.ckpt")
    like = reference_step().init().params
    restarted, uninterrupted = params_of(out / "restarted.ckpt", like), params_of(out / "uninterrupted.ckpt", like)
    assert all(torch.equal(restarted[n], uninterrupted[n]) for n in like)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_batchnorm_accumulation_ema_stack_resumes_on_two_ranks_and_on_one_past_a_damaged_checkpoint(tmp_path, mode):
    env = {**os.environ, "MODE": mode}
    run = lambda: subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["tests/dist_worker.py", str(tmp_path), "checkpoints"],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    proc = run()
    assert proc.returncode == 0, proc.stderr[-4000:]
    directory = tmp_path / f"bn-{mode}"
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-000000002.ckpt", "step-000000004.ckpt"]
    newest = directory / "step-000000004.ckpt"
    damaged = next(newest.iterdir()) if newest.is_dir() else newest  # one rank's file of a sharded checkpoint
    data = bytearray(damaged.read_bytes())
    for at in range(len(data) * 2 // 5, len(data) * 3 // 5, 16):  # inside the tensors: only checksums find it
        data[at] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = run()
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = json.loads((tmp_path / f"bn-{mode}-resumed-from.json").read_text())
    assert [Path(p).name for p in resumed] == ["step-000000002.ckpt"] * 2  # every rank skipped the damaged one
    assert json.loads((tmp_path / f"bn-{mode}-ended.json").read_text()) == [4, 4]
    # and one process continues the 2-rank run from its (rewritten) newest checkpoint
    step = fl.with_checkpointing(
        fl.with_ema(
            fl.with_grad_accum(fl.make_train_step(bn_model(0), fl.losses.cross_entropy, optimizer()), every=2), decay=0.9
        ),
        directory=directory,
        every=2,
    )
    state = step.init()
    assert int(state.step) == 4 and state.slots["checkpointing"].resumed_from.endswith("step-000000004.ckpt")
    assert state.buffers["1.running_mean"].shape == (8,) and int(state.buffers["1.num_batches_tracked"]) == 8


@pytest.mark.parametrize(
    ("mode", "signal_at", "stopped_at"),
    [("ddp", "-1,4", 3), ("fsdp", "-1,4", 3), ("ddp", "2,7", 2)],
    ids=["ddp-one-rank", "fsdp-one-rank", "ddp-two-ranks-apart"],
)
def test_a_signal_to_some_ranks_stops_every_rank_after_the_same_update_and_resumes_bit_exactly(
    tmp_path, mode, signal_at, stopped_at
):
    """Rank 1 alone is signalled mid-window (micro-batch 4 of windows of 2), or the ranks 5 micro-batches apart."""

    def launch(**extra):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MODE": mode, "SIGNAL_AT": signal_at, **extra}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        return subprocess.run(
            [*cmd, "tests/dist_worker.py", str(tmp_path), "preempt"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = launch()
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcomes = json.loads((tmp_path / "preempted.json").read_text())
    assert [o[:3] for o in outcomes] == [[stopped_at, outcomes[0][1], 143]] * 2  # one update, one checkpoint
    assert Path(outcomes[0][1]).name == f"step-{stopped_at:09d}.ckpt"
    signalled = [0 <= int(at) < 2 * stopped_at for at in signal_at.split(",")]  # fetched before the stop
    for (*_, message), here in zip(outcomes, signalled):
        assert ("SIGTERM received;" if here else "another rank received SIGTERM or SIGINT;") in message
    proc = launch(RESUME="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed_from = json.loads((tmp_path / "resumed-from.json").read_text())
    assert resumed_from == [[outcomes[0][1], stopped_at]] * 2
    like = reference_step().init().params
    full, resumed = params_of(tmp_path / "full.ckpt", like), params_of(tmp_path / "resumed.ckpt", like)
    assert all(torch.equal(full[n], resumed[n]) for n in like)


def test_the_local_rank_comes_from_torchrun_or_else_slurm(monkeypatch):
    from fnlight.distributed._group import _local_rank

    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert _local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")  # srun: dist_info() said 0 on every rank of a node
    assert _local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun inside a SLURM allocation
    assert _local_rank() == 1


def test_single_process_is_a_no_op():
    assert fl.init_distributed() == fl.DistInfo(0, 1, 0) == fl.dist_info()
    batch = (torch.ones(2, 3), torch.zeros(2, 1))
    core = fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    state = core.init()
    for wrap in (fl.with_ddp, fl.with_fsdp):
        step = wrap(fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1)))
        assert fl.tree_equal(step(state.replace(), batch)[0].params, core(state.replace(), batch)[0].params)


def test_options_and_order_are_validated():
    core = fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    with pytest.raises(ValueError, match="bucket_mb must be a positive finite number, got 0"):
        fl.with_ddp(core, bucket_mb=0)
    with pytest.raises(ValueError, match="bucket_mb must be a positive finite number, got inf"):
        fl.with_ddp(core, bucket_mb=float("inf"))
    with pytest.raises(ValueError, match="with_ddp cannot wrap a step already wrapped by with_grad_accum"):
        fl.with_ddp(fl.with_grad_accum(core, every=2))
    with pytest.raises(ValueError, match="with_fsdp cannot wrap a step already wrapped by with_grad_accum"):
        fl.with_fsdp(fl.with_grad_accum(core, every=2))
    with pytest.raises(ValueError, match="with_fsdp: the step is already wrapped by with_ddp; use one of"):
        fl.with_fsdp(fl.with_ddp(core))
    with pytest.raises(ValueError, match="with_ddp: the step is already wrapped by with_fsdp; use one of"):
        fl.with_ddp(fl.with_fsdp(core))
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds, at most 1e9 .*, got -1"):
        fl.init_distributed(timeout=-1)
    for endless in (float("inf"), 1e20):  # OverflowError from datetime or torch once launched
        bound = r"at most 1e9 \(about 31 years; torch needs a finite bound\), got "
        with pytest.raises(ValueError, match=bound + re.escape(repr(endless))):
            fl.init_distributed(timeout=endless)
    with pytest.raises(ValueError, match="backend must be 'nccl', 'gloo' or None, got 'mpi'"):
        fl.init_distributed(backend="mpi")


def test_signals_no_update_carries_nested_folds_and_ranks_without_handlers_still_stop_every_rank_together(tmp_path):
    proc = torchrun("tests/dist_worker.py", str(tmp_path), "preempt_edges")
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcomes = json.loads((tmp_path / "edges.json").read_text())
    # during the last epoch-end evaluation, after the last update: one more agreement at the fold's end
    assert outcomes["after-the-last-update"] == [[4, "step-000000004.ckpt", 143]] * 2
    # rank 0 handles no signals itself (handle_signals=False) but follows the agreement
    assert outcomes["handle-signals-on-one-rank"] == [[3, "step-000000003.ckpt", 143]] * 2
    # a fold run by an observer leaves the signal to the outer fold, which stops after its next update
    assert outcomes["inside-a-nested-fold"] == [[3, "step-000000003.ckpt", 143]] * 2
    # a checkpoint that fits rank 0 but not rank 1: both raise the mismatch (rank 0 was a TypeError)
    (kind0, message0), (kind1, message1) = outcomes["fits-one-rank-only"]
    assert kind0 == kind1 == "CheckpointMismatchError"
    assert "<another rank's state>: the checkpoint does not fit that rank's step" in message0
    assert "params.0.bias: expected tensor float32[16], found tensor float32[32]" in message1


@pytest.mark.parametrize(("backend", "expected"), [("nccl", "cpu:gloo,cuda:nccl"), ("gloo", "gloo")])
def test_nccl_groups_carry_cpu_tensors_over_gloo(monkeypatch, backend, expected):
    """fnlight's own collectives on CPU tensors (metric sums, checkpoint agreement) need a CPU backend beside NCCL."""
    from fnlight.distributed import _group

    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda devices, **kw: seen.update(devices=devices))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(_group, "_attempt_store", lambda *a: None)
    monkeypatch.setattr(_group, "_watch_uncaught", lambda: None)
    monkeypatch.setattr(_group.atexit, "register", lambda f: f)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fl.init_distributed(backend=backend) == fl.distributed.DistInfo(0, 2, 0)
    assert seen == {"devices": expected}


@pytest.mark.parametrize(
    ("cuda", "local_rank", "expected"),
    [
        (0, "0", r"local rank 0 with 0 CUDA devices \(torch.cuda.is_available\(\) is False\)"),
        (2, "2", "local rank 2 with 2 CUDA devices visible"),
    ],
    ids=["no-cuda", "more-ranks-than-devices"],
)
def test_nccl_without_a_cuda_device_for_the_rank_is_named(monkeypatch, cuda, local_rank, expected):
    """It was a bare AttributeError from torch.cuda.set_device on a machine without CUDA."""
    from fnlight.distributed import _group

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: pytest.fail("no group may be started"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(cuda))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(_group, "_attempt_store", lambda *a: None)
    monkeypatch.setenv("RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    needs = "init_distributed: backend 'nccl' needs a CUDA device for each rank of a node, got "
    with pytest.raises(ValueError, match=rf"{needs}{expected}; use backend='gloo'"):
        fl.init_distributed(backend="nccl")


def test_the_exit_hook_frees_the_groups_and_fnlights_device_meshes():
    """Torn down while Python runs: a group left to C++'s static destructors made gloo abort at exit."""
    code = """
import os, socket, torch.distributed as dist
from fnlight.distributed import _fsdp, _group
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = _fsdp._mesh("cpu", 1)
del mesh
_group._destroy()
print(dist.is_initialized(), len(_fsdp._MESHES))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "0"]


def test_restore_sharded_names_a_missing_or_incomplete_checkpoint(tmp_path):
    state = {"w": torch.arange(4.0), "n": 3}
    with pytest.raises(FileNotFoundError, match=r"restore_sharded: no checkpoint at .*nowhere"):
        fl.distributed.restore_sharded(tmp_path / "nowhere", state)
    (tmp_path / "empty").mkdir()
    with pytest.raises(fl.checkpoint.CheckpointError, match=r"empty: the directory holds no rank-\*-of-\*\.ckpt files"):
        fl.distributed.restore_sharded(tmp_path / "empty", state)
    fl.distributed.save_sharded(tmp_path / "one", state)
    (name,) = [p.name for p in (tmp_path / "one").iterdir()]
    (tmp_path / "one" / "rank-1-of-2.ckpt").write_bytes((tmp_path / "one" / name).read_bytes())  # a stray file
    with pytest.raises(fl.checkpoint.CheckpointError, match=r"one: incomplete: 2 rank files for a world size of \['1'\]"):
        fl.distributed.restore_sharded(tmp_path / "one", state)


def test_restore_sharded_lists_what_does_not_fit_the_target(tmp_path):
    fl.distributed.save_sharded(tmp_path / "ckpt", {"w": torch.arange(4.0), "n": 3})
    with pytest.raises(
        fl.checkpoint.CheckpointMismatchError,
        match=r"(?s)ckpt does not match the target tree \(3 problems\):.*missing from the file \(1\):\s+m\n"
        r".*unexpected in the file .*\(1\):\s+n\n.*w: expected tensor float32\[5\], found tensor float32\[4\]",
    ):
        fl.distributed.restore_sharded(tmp_path / "ckpt", {"w": torch.zeros(5), "m": 3})
