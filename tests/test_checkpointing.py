"""with_checkpointing: periodic saves, retention, resume, damaged files, preemption, fault injection."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.checkpoint import CheckpointWarning
from fnlight.optim import adamw, sgd
from tests.conftest import SignalledData, make_batches

ROOT = Path(__file__).resolve().parents[1]


def build(directory, *, dropout=0.2, loss_fn=fl.losses.classification, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))
    options.setdefault("every", 2)
    return fl.with_checkpointing(fl.make_train_step(model, loss_fn, adamw(1e-2)), directory=directory, **options)


def names(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def test_saves_every_n_updates_keeps_last_k_and_points_to_latest(tmp_path):
    step = build(tmp_path, every=2, keep_last=2)
    fl.fold(step, step.init(), make_batches(7), progress=False)
    assert names(tmp_path) == ["latest", "step-000000004.ckpt", "step-000000006.ckpt"]
    assert (tmp_path / "latest").read_text().strip() == "step-000000006.ckpt"
    meta = fl.checkpoint.read_metadata(tmp_path / "step-000000006.ckpt")
    assert meta["metadata"]["step"] == 6


def test_resume_restores_everything_and_continues_bitwise(tmp_path):
    batches = make_batches(8)
    reference = build(tmp_path / "a", every=100)
    whole = fl.fold(reference, reference.init(seed=1), batches, epochs=2, progress=False)
    first = build(tmp_path / "b", every=3)
    fl.fold(first, first.init(seed=1), batches, epochs=2, max_steps=9, progress=False)
    again = build(tmp_path / "b", every=3)
    resumed = again.init(seed=1)
    assert int(resumed.step) == 9 and (int(resumed.data.epoch), int(resumed.data.batch)) == (1, 1)
    assert resumed.slots["checkpointing"].resumed_from == str(tmp_path / "b" / "step-000000009.ckpt")
    final = fl.fold(again, resumed, batches, epochs=2, progress=False)
    assert fl.tree_equal(final.params, whole.params) and fl.tree_equal(final.opt_state, whole.opt_state)


def test_save_now_inside_an_accumulation_window_saves_it_in_one_process_and_refuses_under_data_parallelism(tmp_path, monkeypatch):
    torch.manual_seed(0)
    inner = fl.with_grad_accum(fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, adamw(1e-2)), every=3)
    step = fl.with_checkpointing(inner, directory=tmp_path, every=100)
    state = step.init()
    for batch in make_batches(4):  # one update, then 1 micro-batch into the next window
        state, _ = step(state, batch)
    resumed = fl.checkpoint.restore(step.save_now(state), step.init())
    assert int(resumed.slots["grad_accum"].count) == 1 and fl.tree_equal(resumed.slots["grad_accum"], state.slots["grad_accum"])
    from fnlight.transforms import _checkpointing

    monkeypatch.setattr(_checkpointing, "dist_info", lambda: fl.DistInfo(0, 2, 0))  # a replicated state on 2 ranks
    with pytest.raises(ValueError, match=r"got a state 1 micro-batch into a with_grad_accum window on 2 ranks"):
        step.save_now(state)


def test_a_state_without_the_slot_is_refused_before_anything_is_written(tmp_path):
    core = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1))
    step = fl.with_checkpointing(core, directory=tmp_path, every=1)
    bare = core.init()  # not from step.init(): a file of it would not fit step.init(), so no run could resume from it
    with pytest.raises(ValueError, match=r"expected a state with the 'checkpointing' slot, got one with no slots; nothing was"):
        step.save_now(bare)
    with pytest.raises(ValueError, match=r"state.with_slot\('checkpointing', step.init_slot\(state\)\)"):
        step(bare, (torch.ones(4, 2), torch.zeros(4, 1)))
    assert names(tmp_path) == []
    fixed = bare.with_slot("checkpointing", step.init_slot(bare))  # the fix the message gives (and the fold's) works
    assert fl.tree_equal(fl.checkpoint.restore(step.save_now(fixed), step.init()), fixed)


class Steps:
    """A tracker that records the updates it logs at and how often it was closed."""

    def __init__(self):
        self.logged, self.closed = [], 0

    def open(self, run_id="", *, hparams=None):
        return run_id or "run-1"

    def log_scalars(self, step, scalars):
        self.logged.append(step)

    def close(self):
        self.closed += 1


def tracked(directory, tracker):
    torch.manual_seed(0)
    core = fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, sgd(0.1))
    return fl.with_checkpointing(fl.with_tracking(core, trackers=[tracker], every=4), directory=directory, every=100)


def test_save_now_in_a_loop_of_ones_own_leaves_the_inner_transforms_running(tmp_path):
    plain, saving = Steps(), Steps()
    for tracker, directory in ((plain, tmp_path / "a"), (saving, tmp_path / "b")):
        step = tracked(directory, tracker)
        state = step.init()
        for i, batch in enumerate(make_batches(8)):
            state, _ = step(state, batch)
            if tracker is saving and i in (1, 5):
                step.save_now(state)
    assert plain.logged == saving.logged == [4, 8] and saving.closed == 0  # no window cut short, no run closed
    assert names(tmp_path / "b") == ["latest", "step-000000006.ckpt"]


def test_a_preempted_fold_with_checkpointing_saves_and_still_logs_the_last_window(tmp_path):
    tracker = Steps()
    step = tracked(tmp_path, tracker)
    with pytest.raises(fl.Preempted, match=r"after update 6 .* saved .*step-000000006.ckpt"):
        fl.fold(step, step.init(), SignalledData(make_batches(8), at=5, signum=signal.SIGINT), progress=False)
    assert tracker.logged == [4, 6] and tracker.closed == 1  # the window of updates 5-6 is logged at the stop


def test_retention_never_deletes_the_checkpoint_resumed_from(tmp_path):
    step = build(tmp_path, every=1, keep_last=1)
    fl.fold(step, step.init(), make_batches(2), progress=False)
    resumed = build(tmp_path, every=1, keep_last=1)
    fl.fold(resumed, resumed.init(), make_batches(2), epochs=3, progress=False)
    assert names(tmp_path) == ["latest", "step-000000002.ckpt", "step-000000006.ckpt"]


def test_a_fresh_start_into_a_directory_with_another_runs_checkpoints_is_warned_about(tmp_path):
    step = build(tmp_path, every=2, resume=False)
    step.init()  # an empty directory: nothing to warn about
    fl.fold(step, step.init(), make_batches(4), progress=False)
    again = build(tmp_path, every=2, resume=False)
    with pytest.warns(CheckpointWarning, match=r"holds 1 checkpoint\(s\) of an earlier run \(the newest: step-000000004\.ckpt\)"):
        again.init()


def kept_by_score(directory, values, *, mode="min", keep_best=1):
    """Fold one update per value, each logging it as ``score``, keeping the last and ``keep_best`` best; the files left."""
    scores = iter(values)

    def loss_fn(model, batch):
        return fl.losses.cross_entropy(model, batch), {"score": torch.tensor(next(scores))}

    step = build(directory, every=1, keep_last=1, keep_best=keep_best, monitor="score", mode=mode, loss_fn=loss_fn)
    fl.fold(step, step.init(), make_batches(len(values)), progress=False)
    return names(directory)


def test_keep_best_by_monitored_metric_nan_worst(tmp_path):
    got = kept_by_score(tmp_path, [5.0, 1.0, float("nan"), 3.0, 0.5, 4.0], keep_best=2)
    assert got == ["latest", "step-000000002.ckpt", "step-000000005.ckpt", "step-000000006.ckpt"]
    nan = float("nan")
    assert kept_by_score(tmp_path / "max", [nan] * 3, mode="max") == ["latest", "step-000000003.ckpt"]  # ties: the newest


def scripted_eval(values):
    """An eval step whose loss is the next of ``values`` (one per evaluation)."""
    losses = iter(values)
    return lambda state, batch: {"loss": torch.tensor(next(losses))}


def test_keep_best_scores_the_last_update_of_an_epoch_by_its_epoch_end_evaluation(tmp_path):
    # the epoch's last update is saved in its call, before the epoch-end flush evaluates it
    batches = make_batches(4)
    step = fl.with_eval(
        build(tmp_path, every=1).inner, data=batches[:1], eval_step=scripted_eval([0.5, 0.1, 0.9, 0.8]), at_epoch_end=True
    )
    step = fl.with_checkpointing(step, directory=tmp_path, every=4, keep_best=1, monitor="val/loss")
    whole = fl.fold(step, step.init(), batches, epochs=4, progress=False)
    assert names(tmp_path) == ["latest", "step-000000008.ckpt", "step-000000016.ckpt"]
    best = fl.checkpoint.read_metadata(tmp_path / "step-000000008.ckpt")["metadata"]
    assert best["value"] == pytest.approx(0.1) and best["epoch"] == 2  # past epoch 1's evaluation
    last = fl.checkpoint.restore(tmp_path / "step-000000016.ckpt", whole)
    assert (int(last.data.epoch), int(last.data.batch)) == (4, 0) and fl.tree_equal(last.params, whole.params)


def test_keep_best_warns_once_when_a_saved_update_has_no_score(tmp_path):
    step = build(tmp_path, every=2, keep_best=1, monitor="val/loss")  # no evaluation: no val/loss
    with pytest.warns(RuntimeWarning, match=r"checkpoint of update 2 was saved without monitor='val/loss'.*Said once") as caught:
        fl.fold(step, step.init(), make_batches(6), progress=False)
    assert len([w for w in caught if "saved without monitor" in str(w.message)]) == 1  # updates 2, 4 and 6


def test_a_preemption_saving_an_update_again_keeps_its_score(tmp_path):
    batches = make_batches(3)
    scores = {1: 0.5, 2: 0.4, 3: 0.1}

    def evaluate(state, batch):
        return {"loss": torch.tensor(scores[int(state.step)])}

    def signalled():
        for i, batch in enumerate(batches):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the fold stops after update 3, saved already with its score
            yield batch

    step = fl.with_eval(build(tmp_path).inner, data=batches[:1], eval_step=evaluate, every=1)
    step = fl.with_checkpointing(step, directory=tmp_path, every=1, keep_best=1, monitor="val/loss")
    with pytest.raises(fl.Preempted, match="saved .*step-000000003.ckpt"):
        fl.fold(step, step.init(), signalled(), progress=False)
    assert fl.checkpoint.read_metadata(tmp_path / "step-000000003.ckpt")["metadata"]["value"] == pytest.approx(0.1)


def test_keep_best_ranks_an_infinity_by_its_sign(tmp_path):
    for mode, first in (("max", float("inf")), ("min", float("-inf"))):
        values = [first, 1.0, 2.0, 0.5] if mode == "max" else [first, 1.0, 0.5, 2.0]
        assert kept_by_score(tmp_path / mode, values, mode=mode) == ["latest", "step-000000001.ckpt", "step-000000004.ckpt"]
        assert fl.checkpoint.read_metadata(tmp_path / mode / "step-000000001.ckpt")["metadata"]["value"] == first
    # an infinity the wrong way ranks worst, with NaN
    got = kept_by_score(tmp_path / "worst", [float("-inf"), 1.0, float("nan")], mode="max")
    assert got == ["latest", "step-000000002.ckpt", "step-000000003.ckpt"]


def test_partial_files_of_a_killed_save_are_removed_at_the_next_commit(tmp_path):
    step = build(tmp_path, every=2, keep_last=1)
    state = fl.fold(step, step.init(), make_batches(2), progress=False)
    # what SIGKILL during a save leaves: save()'s temporary file and the pointer's
    (tmp_path / ".step-000000004.ckpt.0123456789ab.tmp").write_bytes(b"partial")
    (tmp_path / ".latest.tmp").write_text("step-000000004.ckpt")
    (tmp_path / ".notes.txt.tmp").write_text("not ours")  # other names are left alone
    fl.fold(step, state, make_batches(2), epochs=2, progress=False)
    assert names(tmp_path) == [".notes.txt.tmp", "latest", "step-000000004.ckpt"]


def test_damaged_newest_checkpoint_is_skipped(tmp_path):
    step = build(tmp_path, every=2, keep_last=3)
    fl.fold(step, step.init(), make_batches(6), progress=False)
    newest = tmp_path / "step-000000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.warns(CheckpointWarning, match=r"step-000000006\.ckpt \(.*truncated or incomplete"):
        assert fl.find_latest(tmp_path).name == "step-000000004.ckpt"
    data = bytearray((tmp_path / "step-000000004.ckpt").read_bytes())
    data[200] ^= 0xFF
    (tmp_path / "step-000000004.ckpt").write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning) as caught:
        resumed = build(tmp_path, every=2, keep_last=3).init()
    assert int(resumed.step) == 2
    assert [str(w.message).split(" (")[0] for w in caught] == [
        f"skipped the damaged checkpoint {tmp_path / name}" for name in ("step-000000006.ckpt", "step-000000004.ckpt")
    ]
    assert fl.find_latest(tmp_path / "none") is None


def test_a_run_whose_every_checkpoint_is_damaged_starts_over_and_says_which(tmp_path):
    step = build(tmp_path, every=2)
    fl.fold(step, step.init(), make_batches(2), progress=False)
    only = tmp_path / "step-000000002.ckpt"
    data = bytearray(only.read_bytes())
    data[200] ^= 0xFF
    only.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"skipped the damaged checkpoint .*step-000000002\.ckpt \(.*checksum"):
        fresh = build(tmp_path, every=2).init()
    assert int(fresh.step) == 0 and fresh.slots["checkpointing"].resumed_from == ""
    with pytest.warns(CheckpointWarning, match="starting over if none is readable"):
        assert fl.find_latest(tmp_path, fresh) is None


def test_an_async_write_in_flight_completes_when_the_fold_raises(tmp_path):
    script = f"""
import time
import torch
from torch import nn
import fnlight as fl
import fnlight.transforms._checkpointing as checkpointing
save = checkpointing.save
checkpointing.save = lambda *args, **kwargs: (time.sleep(1.0), save(*args, **kwargs))  # a slow disk
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 10))
good = [(torch.randn(8, 16), torch.randint(0, 10, (8,))) for _ in range(4)]
bad = (torch.full((8, 16), float("nan")), torch.randint(0, 10, (8,)))
core = fl.make_train_step(model, fl.losses.cross_entropy, fl.optim.adamw(1e-3))
step = fl.with_checkpointing(core, directory={str(tmp_path)!r}, every=2, keep_last=5, async_write=True)
fl.fold(step, step.init(), good + [bad], progress=False)  # raises NonFiniteError right after saving update 4
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1 and "NonFiniteError" in done.stderr
    assert names(tmp_path) == ["latest", "step-000000002.ckpt", "step-000000004.ckpt"]
    assert int(fl.checkpoint.read_metadata(tmp_path / "step-000000004.ckpt")["metadata"]["step"]) == 4


def test_async_write_gives_the_same_files(tmp_path):
    sync = build(tmp_path / "sync", every=2, keep_last=5)
    asyn = build(tmp_path / "async", every=2, keep_last=5, async_write=True)
    fl.fold(sync, sync.init(), make_batches(6), progress=False)
    fl.fold(asyn, asyn.init(), make_batches(6), progress=False)
    assert names(tmp_path / "sync") == names(tmp_path / "async")
    template = build(tmp_path / "t").init()
    a = fl.checkpoint.restore(tmp_path / "sync" / "step-000000006.ckpt", template)
    b = fl.checkpoint.restore(tmp_path / "async" / "step-000000006.ckpt", template)
    assert fl.tree_equal(a.params, b.params) and fl.tree_equal(a.opt_state, b.opt_state)


def build_epoch_end(directory, **options):
    """Accumulation whose short last window is applied in the epoch-end flush, evaluation there, early stopping."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    step = fl.with_grad_accum(fl.make_train_step(model, fl.losses.classification, adamw(1e-3)), every=2)
    step = fl.with_eval(step, data=make_batches(2, seed=7), loss_fn=fl.losses.classification, at_epoch_end=True)
    step = fl.with_early_stop(step, monitor="val/loss", patience=2, min_delta=10.0, restore_best=True)  # never improves
    return fl.with_checkpointing(step, directory=directory, every=1, keep_last=100, **options)


@pytest.mark.filterwarnings("ignore:with_early_stop.*never appeared:RuntimeWarning")  # folds cut before an epoch end
def test_resuming_from_a_checkpoint_written_in_the_epoch_end_flush_does_not_flush_that_epoch_again(tmp_path):
    batches = make_batches(5)  # updates 1, 2 in the epoch's calls, 3 in its flush (the short window); then 4, 5, 6...
    reference = build_epoch_end(tmp_path / "ref")
    whole = fl.fold(reference, reference.init(), batches, epochs=10, progress=False)
    assert int(whole.step) == 9 and int(whole.data.epoch) == 3  # three checks at epoch ends: best, wait 1, wait 2
    meta = fl.checkpoint.read_metadata(tmp_path / "ref" / "step-000000003.ckpt")["metadata"]
    assert meta["epoch"] == 1  # written in epoch 0's flush: records the move to epoch 1
    for cut in range(1, 9):
        first = build_epoch_end(tmp_path / str(cut))
        fl.fold(first, first.init(), batches, epochs=10, max_steps=cut, progress=False)
        again = build_epoch_end(tmp_path / str(cut))
        final = fl.fold(again, again.init(), batches, epochs=10, progress=False)
        assert int(final.step) == 9, f"resumed at update {cut}"
        assert fl.tree_equal(final.params, whole.params) and fl.tree_equal(final.opt_state, whole.opt_state), cut
        assert fl.tree_equal(final.slots["early_stop"], whole.slots["early_stop"]), cut


def test_async_writes_leave_the_inner_chain_running_between_saves(tmp_path):
    from tests.test_tracking_transform import Recorder

    def trained(directory, async_write):
        torch.manual_seed(0)
        tracker = Recorder()
        core = fl.make_train_step(nn.Linear(10, 3), fl.losses.classification, adamw(1e-2))
        step = fl.with_tracking(core, trackers=[tracker], every=4)
        step = fl.with_checkpointing(step, directory=directory, every=1, async_write=async_write)
        fl.fold(step, step.init(), make_batches(8), progress=False)
        return tracker

    sync, asyn = trained(tmp_path / "sync", False), trained(tmp_path / "async", True)
    assert [s for s, _ in asyn.events] == [s for s, _ in sync.events] == [4, 8]  # no partial windows logged
    assert asyn.opened == sync.opened == [""] and asyn.closed == sync.closed == 1  # one run, closed once, at the end


def test_seconds_trigger(tmp_path, monkeypatch):
    import fnlight.transforms._checkpointing as ckpt

    clock = iter(range(1000))
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: float(next(clock)) * 0.4)
    step = build(tmp_path, every=None, seconds=1.0, keep_last=10)
    fl.fold(step, step.init(), make_batches(8), progress=False)
    saved = [int(n[5:14]) for n in names(tmp_path) if n.endswith(".ckpt")]
    assert saved and len(saved) < 8


def test_sigterm_saves_and_exits_cleanly_then_resumes_bitwise(tmp_path):
    batches = make_batches(8)
    reference = build(tmp_path / "ref", every=100)
    whole = fl.fold(reference, reference.init(seed=2), batches, epochs=2, progress=False)

    @fl.every(5)
    def terminate(state, metrics):
        os.kill(os.getpid(), signal.SIGTERM)

    step = build(tmp_path / "run", every=100)
    with pytest.raises(fl.Preempted, match=r"SIGTERM received; stopped after update 5 .* saved .*step-000000005.ckpt") as info:
        fl.fold(step, step.init(seed=2), batches, epochs=2, observers=[terminate], progress=False)
    assert info.value.code == 143 and int(info.value.state.step) == 5
    resumed = build(tmp_path / "run", every=100)
    final = fl.fold(resumed, resumed.init(seed=2), batches, epochs=2, progress=False)
    assert fl.tree_equal(final.params, whole.params)


def test_sigint_without_checkpointing_says_nothing_was_saved():
    step = fl.make_train_step(nn.Linear(10, 3), fl.losses.cross_entropy, sgd(0.1))

    @fl.every(2)
    def interrupt(state, metrics):
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(fl.Preempted, match="SIGINT received; stopped after update 2 .* Nothing was saved") as info:
        fl.fold(step, step.init(), make_batches(4), observers=[interrupt], progress=False)
    assert info.value.code == 130 and info.value.path is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"directory": 3, "every": 1}, TypeError, "directory must be a path, got 3"),
        ({"directory": "d"}, ValueError, "give every=N .* and/or seconds=T"),
        ({"directory": "d", "every": 0}, ValueError, "every must be an int >= 1, got 0"),
        ({"directory": "d", "seconds": -1}, ValueError, "seconds must be a positive number, got -1"),
        ({"directory": "d", "every": 1, "keep_last": 0}, ValueError, "keep_last must be an int >= 1, got 0"),
        ({"directory": "d", "every": 1, "keep_best": 2}, ValueError, "keep_best=2 needs monitor"),
        ({"directory": "d", "every": 1, "monitor": 3}, TypeError, "monitor must be a metric name"),
        ({"directory": "d", "every": 1, "mode": "up"}, ValueError, "mode must be 'min' or 'max', got 'up'"),
        ({"directory": "d", "every": 1, "resume": "no"}, TypeError, "resume must be a bool, got 'no'"),
        ({"directory": "d", "every": 1, "async_write": 1}, TypeError, "async_write must be a bool, got 1"),
        ({"directory": __file__, "every": 1}, ValueError, "directory '.*test_checkpointing.py' exists and is not a directory"),
    ],
)
def test_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        fl.with_checkpointing(fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1)), **kwargs)


def test_checkpointing_goes_outermost():
    core = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, sgd(0.1))
    with pytest.raises(ValueError, match="with_grad_accum cannot wrap a step already wrapped by with_checkpointing"):
        fl.with_grad_accum(fl.with_checkpointing(core, directory="d", every=1), every=2)


def run_worker(run_dir, *, kill_at=None, sig=signal.SIGKILL, rng=None):
    """Run the worker; with ``kill_at(start)``, send ``sig`` soon after the update it picks."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fault_worker.py"), str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    target = None
    for line in proc.stdout:
        lines.append(line)
        words = line.split()
        if kill_at is not None and words[:1] == ["start"]:
            target = kill_at(int(words[1]))
        if target is not None and words[:1] == ["update"] and int(words[1]) >= target:
            time.sleep(rng.uniform(0.0, 0.05))  # land anywhere in the next step(s), a checkpoint write included
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + out, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_fault_injection_ends_bitwise_equal(tmp_path, sig):
    code, _, err = run_worker(tmp_path / "clean")
    assert code == 0, err
    rng = random.Random(int(sig))
    interrupted, graceful, attempts = 0, 0, 0
    while not (tmp_path / "run" / "final.ckpt").exists():
        attempts += 1
        assert attempts < 12, "the run never finished"
        kill_at = (lambda start: start + rng.randint(1, 7)) if interrupted < 3 else None
        code, _, err = run_worker(tmp_path / "run", kill_at=kill_at, sig=sig, rng=rng)
        if code != 0:
            interrupted += 1
            assert code in (-signal.SIGKILL, 143), err
            if code == 143:
                graceful += 1
                assert "SIGTERM received; stopped after update" in err and "saved" in err
    assert interrupted == 3
    assert sig == signal.SIGKILL or graceful == 3
    a, b = _load_final(tmp_path / "clean" / "final.ckpt"), _load_final(tmp_path / "run" / "final.ckpt")
    assert a["step"] == b["step"] == 24
    assert fl.tree_equal(a, b)


def _load_final(path):
    """The worker's final tree, restored into a template of the same structure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    step = fl.with_amp(fl.make_train_step(model, fl.losses.cross_entropy, adamw(1e-2)), dtype="fp16")
    state = step.init()
    return fl.checkpoint.restore(path, {"params": state.params, "opt": state.opt_state, "step": 0})


def test_resume_refuses_checkpoints_of_another_model(tmp_path):
    batch = (torch.ones(4, 2), torch.zeros(4, 1))
    core = fl.make_train_step(nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    small = fl.with_checkpointing(core, directory=tmp_path, every=1)
    fl.fold(small, small.init(), [batch] * 2, progress=False)
    wide = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    other = fl.with_checkpointing(fl.make_train_step(wide, fl.losses.mse, fl.optim.sgd(0.1)), directory=tmp_path, every=1)
    with pytest.raises(fl.checkpoint.CheckpointMismatchError, match="does not match the target tree"):
        other.init()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000002.ckpt"]  # nothing overwritten
