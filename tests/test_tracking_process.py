"""ProcessTrackers: trackers in a child process — delivery, run reuse, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fnlight.tracking import AimTracker, JSONLTracker, ProcessTrackers, read_scalars


def test_events_arrive_in_order_and_the_process_is_reused(tmp_path):
    trackers = ProcessTrackers(JSONLTracker(tmp_path))
    run_id = trackers.open(hparams={"lr": 0.1})
    for step in range(1, 51):
        trackers.log_scalars(step, {"loss": 1.0 / step})
    trackers.log_batch([(51, {"loss": 0.0}), (52, {"loss": -1.0})])
    with pytest.raises(TypeError, match=r"ProcessTrackers.log_batch: event 0 must be a \(step, scalars\) pair"):
        trackers.log_batch([{"loss": 1.0}])
    trackers.close()
    process = trackers._process
    again = trackers.open(run_id)
    trackers.log_scalars(53, {"loss": 0.0})
    trackers.shutdown()
    assert again == run_id and process is not None and not process.is_alive()
    loss = read_scalars(tmp_path / f"{run_id}.jsonl")["loss"]
    assert [s for s, _ in loss] == list(range(1, 54)) and loss[1] == (2, 0.5) and loss[51] == (52, -1.0)


def test_aim_in_the_child_process(tmp_path):
    aim = pytest.importorskip("aim")
    trackers = ProcessTrackers(AimTracker(tmp_path), JSONLTracker(tmp_path))
    run_id = trackers.open()
    trackers.log_scalars(3, {"loss": 0.25})
    trackers.shutdown()
    run = aim.Repo(str(tmp_path)).get_run(run_id)
    (metric,) = [m for m in run.metrics() if m.name == "loss"]
    steps, (values, *_) = metric.data.numpy()
    assert steps.tolist() == [3] and values.tolist() == [0.25]


def test_a_failing_tracker_is_reported_once_by_the_child_and_the_others_go_on(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    trackers = ProcessTrackers(JSONLTracker(tmp_path / "ok"), JSONLTracker(blocker))
    run_id = trackers.open()
    trackers.log_scalars(1, {"loss": 1.0})
    trackers.log_scalars(2, {"loss": 2.0})
    trackers.shutdown()
    err = capfd.readouterr().err
    assert err.count("raised in open() and is disabled") == 1
    assert read_scalars(tmp_path / "ok" / f"{run_id}.jsonl") == {"loss": [(1, 1.0), (2, 2.0)]}


def test_a_run_whose_open_failed_everywhere_still_closes_so_the_next_run_opens(tmp_path, capfd):
    target = tmp_path / "runs"
    target.write_text("a file where the directory goes")  # open() fails: a transient problem
    trackers = ProcessTrackers(JSONLTracker(target))
    assert trackers.open() == ""
    trackers.log_scalars(1, {"loss": 1.0})
    trackers.close()
    target.unlink()  # fixed
    run_id = trackers.open()
    trackers.log_scalars(1, {"loss": 2.0})
    trackers.shutdown()
    assert run_id and read_scalars(target / f"{run_id}.jsonl") == {"loss": [(1, 2.0)]}
    assert "already has run" not in capfd.readouterr().err


def test_misuse_is_named(tmp_path):
    trackers = ProcessTrackers(JSONLTracker(tmp_path))
    with pytest.raises(RuntimeError, match="log_scalars: call open\\(\\) first"):
        trackers.log_scalars(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="ProcessTrackers.log_scalars: call open\\(\\) first"):
        trackers._log_checked(1, {"loss": 1.0})  # with_tracking's way in
    with pytest.raises(RuntimeError, match="ProcessTrackers.log_batch: call open\\(\\) first"):
        trackers.log_batch([(1, {"loss": 1.0})])
    with pytest.raises(RuntimeError, match="log_hparams: call open\\(\\) first"):
        trackers.log_hparams({"a": 1})
    with pytest.raises(TypeError, match="Trackers takes trackers"):
        ProcessTrackers(object())
    tracker = AimTracker(tmp_path)
    tracker.open()
    with pytest.raises(TypeError, match="a tracker with an open run cannot be pickled"):
        tracker.__getstate__()
    tracker.close()


def test_opening_a_second_run_before_closing_the_first_is_refused(tmp_path):
    # it warned "open failed in the tracking process", returned "" and forgot the open run's id, while the child
    # kept that run open and went on writing to it; Trackers and the file trackers raise
    trackers = ProcessTrackers(JSONLTracker(tmp_path), flush_every=0.05)
    run_id = trackers.open()
    with pytest.raises(RuntimeError, match=rf"already has run '{run_id}' open: close\(\) it before opening another"):
        trackers.open()
    assert trackers.run_id == run_id
    trackers.log_scalars(1, {"loss": 1.0})
    trackers.close()
    assert trackers.open(run_id) == run_id
    trackers.shutdown()
    assert read_scalars(tmp_path / f"{run_id}.jsonl") == {"loss": [(1, 1.0)]}


def test_logging_after_close_is_refused_as_before_open(tmp_path):
    trackers = ProcessTrackers(JSONLTracker(tmp_path))
    run_id = trackers.open()
    trackers.log_scalars(1, {"loss": 1.0})
    trackers.close()  # the run ends, the tracking process stays for the next open()
    with pytest.raises(RuntimeError, match=r"ProcessTrackers\.log_scalars: call open\(\) first \(no run is open\)"):
        trackers.log_scalars(2, {"loss": 0.5})  # was accepted, then dropped in the child without a word
    with pytest.raises(RuntimeError, match=r"ProcessTrackers\.log_scalars: call open\(\) first \(no run is open\)"):
        trackers._log_checked(2, {"loss": 0.5})
    with pytest.raises(RuntimeError, match=r"ProcessTrackers\.log_batch: call open\(\) first \(no run is open\)"):
        trackers.log_batch([(2, {"loss": 0.5})])
    with pytest.raises(RuntimeError, match=r"ProcessTrackers\.log_hparams: call open\(\) first \(no run is open\)"):
        trackers.log_hparams({"a": 1})
    assert trackers.open(run_id) == run_id
    trackers.log_scalars(2, {"loss": 0.5})
    trackers.shutdown()
    assert read_scalars(tmp_path / f"{run_id}.jsonl") == {"loss": [(1, 1.0), (2, 0.5)]}


def test_a_script_without_main_guard_gets_a_clear_error(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        f"from fnlight.tracking import JSONLTracker, ProcessTrackers\nProcessTrackers(JSONLTracker({str(tmp_path)!r})).open()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert 'put the training code under `if __name__ == "__main__":`' in proc.stderr


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_events_wait_in_this_process_until_flush_every_then_go_in_order(tmp_path):
    trackers = ProcessTrackers(JSONLTracker(tmp_path), flush_every=60.0)
    run_id = trackers.open()
    for step in range(1, 11):
        trackers.log_scalars(step, {"loss": float(step)})
    assert len(trackers._pending) == 10  # batched: nothing sent within flush_every of the open
    trackers.log_hparams({"lr": 0.5})  # sends the pending events first
    trackers.log_scalars(11, {"loss": 11.0})
    trackers.close()
    assert not trackers._pending
    trackers.shutdown()
    assert [s for s, _ in read_scalars(tmp_path / f"{run_id}.jsonl")["loss"]] == list(range(1, 12))


def test_a_waiting_event_is_sent_within_flush_every_without_another_call(tmp_path):
    trackers = ProcessTrackers(JSONLTracker(tmp_path), flush_every=0.2)
    run_id = trackers.open()
    trackers.log_scalars(1, {"loss": 1.0})  # just after open's message: waits for the flusher
    path = tmp_path / f"{run_id}.jsonl"
    deadline = time.monotonic() + 30
    while not any("scalars" in line for line in _lines(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert [line["step"] for line in _lines(path) if "scalars" in line] == [1]
    finally:
        trackers.shutdown()
    assert trackers._flusher is None


def test_only_the_flusher_sends_events_so_logging_never_pickles_or_takes_the_lock(tmp_path):
    # the training thread appends and returns: after a quiet spell too, the event waits for the flusher
    trackers = ProcessTrackers(JSONLTracker(tmp_path), flush_every=0.2)
    run_id = trackers.open()
    trackers._stopping.set()  # silence the flusher
    trackers._flusher.join()
    time.sleep(0.3)
    with trackers._lock:  # a caller that took the lock would wait here forever
        trackers.log_scalars(1, {"loss": 1.0})
        trackers._log_checked(2, {"loss": 2.0})
    assert list(trackers._pending) == [(1, {"loss": 1.0}), (2, {"loss": 2.0})]
    trackers.shutdown()  # close sends what waits first
    assert [s for s, _ in read_scalars(tmp_path / f"{run_id}.jsonl")["loss"]] == [1, 2]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("0.5", TypeError, r"flush_every must be a number of seconds, got '0.5'"),
        (True, TypeError, r"flush_every must be a number of seconds, got True"),
        (0, ValueError, r"flush_every must be a finite number of seconds above 0, got 0"),
        (-1.0, ValueError, r"above 0, got -1.0"),
        (float("inf"), ValueError, r"above 0, got inf"),
    ],
)
def test_flush_every_is_checked(tmp_path, value, error, match):
    with pytest.raises(error, match=match):
        ProcessTrackers(JSONLTracker(tmp_path), flush_every=value)


def test_flush_waits_until_the_child_has_written_everything(tmp_path):
    trackers = ProcessTrackers(JSONLTracker(tmp_path), flush_every=60.0)
    trackers.flush()  # before open: nothing to do
    run_id = trackers.open()
    for step in range(1, 6):
        trackers.log_scalars(step, {"loss": float(step)})
    path = tmp_path / f"{run_id}.jsonl"
    assert not any("scalars" in line for line in _lines(path))
    trackers.flush()
    assert [line["step"] for line in _lines(path) if "scalars" in line] == [1, 2, 3, 4, 5]
    trackers.shutdown()
    trackers.flush()  # after shutdown: nothing to do


def test_a_dead_tracking_process_is_replaced_with_one_flusher(tmp_path):
    import threading

    trackers = ProcessTrackers(JSONLTracker(tmp_path), flush_every=0.1)
    trackers.open()
    trackers._process.kill()
    trackers._process.join()
    run_id = trackers.open()  # a new child (and a new run: the old child took its run with it)
    trackers.log_scalars(1, {"loss": 1.0})
    flushers = [t for t in threading.enumerate() if t.name == "fnlight-trackers-flush"]
    trackers.shutdown()
    assert len(flushers) == 1 and not any(t.is_alive() for t in flushers)
    assert read_scalars(tmp_path / f"{run_id}.jsonl") == {"loss": [(1, 1.0)]}


@pytest.mark.parametrize("method", ["log_scalars", "_log_checked"])  # the latter: with_tracking's way in
def test_a_tracking_process_that_dies_in_use_is_reported_once_and_its_events_dropped(tmp_path, method):
    from fnlight.tracking import TrackerWarning

    trackers = ProcessTrackers(JSONLTracker(tmp_path), flush_every=0.05)
    run_id = trackers.open()
    trackers.log_scalars(1, {"loss": 1.0})
    trackers.flush()
    trackers._process.kill()  # the OOM killer, a crash in a tracker's native code
    trackers._process.join()
    with pytest.warns(TrackerWarning, match=r"the tracking process ended unexpectedly \(exit code -9\); the events") as caught:
        for step in range(2, 40):
            getattr(trackers, method)(step, {"loss": float(step)})
            time.sleep(0.005)
        trackers.flush()
        trackers.close()
    assert len(caught) == 1 and not trackers._pending  # nothing piles up for a process that is gone
    assert read_scalars(tmp_path / f"{run_id}.jsonl") == {"loss": [(1, 1.0)]}
    assert trackers.open() != run_id  # a new process and run
    trackers.shutdown()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_process_group_leaves_the_tracking_process_to_its_owner(tmp_path, signum):
    # Ctrl-C in a terminal signals the child too: it died of KeyboardInterrupt, and the fold's preemption
    # path (save, then close the trackers) failed with "the tracking process exited", losing the queued events
    trackers = ProcessTrackers(JSONLTracker(tmp_path))
    run_id = trackers.open()
    trackers.log_scalars(1, {"loss": 1.0})
    os.kill(trackers._process.pid, signum)
    time.sleep(0.5)
    trackers.log_scalars(2, {"loss": 0.5})
    trackers.close()
    trackers.shutdown()
    assert [s for s, _ in read_scalars(tmp_path / f"{run_id}.jsonl")["loss"]] == [1, 2]


def test_the_tracking_process_ends_when_its_owner_is_killed(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from fnlight.tracking import JSONLTracker, ProcessTrackers\n"
        "if __name__ == '__main__':\n"
        f"    t = ProcessTrackers(JSONLTracker({str(tmp_path)!r}))\n"
        "    t.open()\n"
        "    print(t._process.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    (tmp_path / "owner.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "owner.py")], capture_output=True, text=True, timeout=120)
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the tracking process outlived its killed owner by 30 s")
