"""AimTracker's direct writes: byte for byte what aim's own ``Run.track`` leaves in the repository."""

import math
import time
import types

import aim
import aim.sdk.tracker
import pytest
from aim.storage import encoding
from aim.storage.rockscontainer import RocksContainer

from fnlight.tracking import AimTracker, _aim_direct

NOW = 1_700_000_000.25

# resumed runs rerun steps below the last one; metrics come and go; values at the float extremes
FIRST = [(s, {"loss": v, "lr": 0.1 / s} if s % 3 else {"loss": v}) for s, v in enumerate([0.1, 1e-300, -2.5e300, 1 / 3, 7.0], 1)]
SECOND = [(6, {"loss": float("nan"), "lr": 0.5}), (7, {"loss": float("inf"), "val/acc": 0.25}), (8, {"loss": -0.0})]
RESUMED = [(5, {"loss": 3.0, "lr": 9.0}), (6, {"loss": -float("inf")}), (9, {"loss": 0.0, "val/acc": 1.0, "new": 2.0})]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tmp_path_factory.mktemp("aim")


@pytest.fixture
def fixed_clock(monkeypatch):
    """aim's clock and the direct writer's read the same instant, so the stored times compare too."""
    moment = types.SimpleNamespace(timestamp=lambda: NOW)
    clock = types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda tz=None: moment))
    monkeypatch.setattr(aim.sdk.tracker, "datetime", clock)
    monkeypatch.setattr(_aim_direct, "time", types.SimpleNamespace(time=lambda: NOW))


def contents(repo, run_id):
    """The run's raw key-value records: every sequence record, and its metadata about them."""
    run = aim.Repo(str(repo)).get_run(run_id)
    series = dict(run.series_run_trees[2].container.items())
    parts = [encoding.encode_path((part,)) for part in ("traces", "typed_traces", "contexts")]
    meta = {k: v for k, v in run.meta_run_tree.container.items() if k.startswith(tuple(parts))}
    return series, meta


def aims_own(repo, batches):
    """The reference: every event through aim's ``Run.track``, the run closed and reopened between batches."""
    run_id = ""
    for events in batches:
        tracker = AimTracker(repo)
        run_id = tracker.open(run_id)
        for step, scalars in events:
            tracker._run.track(scalars, step=step)
        tracker.close()
    return run_id


def batched(repo, batches, tamper=None):
    run_id, writers = "", []
    for events in batches:
        tracker = AimTracker(repo)
        run_id = tracker.open(run_id)
        if tamper is not None:
            tamper(tracker._direct)
        tracker.log_batch(events)
        writers.append(tracker._direct)
        tracker.close()
    return run_id, writers


def test_direct_writes_leave_exactly_what_aims_track_leaves(repo, fixed_clock):
    batches = [FIRST, SECOND, RESUMED]
    want = contents(repo, aims_own(repo, batches))
    run_id, writers = batched(repo, batches)
    assert [w.verified for w in writers] == [True, True, True]  # checked against aim's writes, then written directly
    got = contents(repo, run_id)
    assert got == want
    assert len(want[0]) > 80  # the comparison covers every record of every value


def test_a_resumed_run_reads_back_as_aim_wrote_it(repo):
    run_id, _ = batched(repo, [FIRST, SECOND, RESUMED])
    run = aim.Repo(str(repo)).get_run(run_id)
    loss = next(m for m in run.metrics() if m.name == "loss")
    steps, (values, _, _) = loss.data.numpy()
    expected = {s: v["loss"] for s, v in FIRST + SECOND + RESUMED}  # a rerun step keeps its last value
    assert steps.tolist() == sorted(expected)
    for s, v in zip(steps.tolist(), values.tolist(), strict=True):
        want = expected[s]
        assert (math.isnan(v) and math.isnan(want)) or (v == want and math.copysign(1, v) == math.copysign(1, want))
    traces = run.meta_run_tree.collect("traces")
    (record,) = (r["loss"] for r in traces.values())
    assert (record["last_step"], record["last"]) == (9, 0.0)  # steps 5 and 6 reran below the last: aim's rule
    assert (record["max"], record["min"]) == (float("inf"), -float("inf"))  # the NaN at step 6 compared with neither
    assert record["first_step"] == 1


def test_the_stored_time_is_the_events_time(repo):
    before = time.time()
    run_id, writers = batched(repo, [FIRST])
    after = time.time()
    assert writers[0].verified
    run = aim.Repo(str(repo)).get_run(run_id)
    loss = next(m for m in run.metrics() if m.name == "loss")
    _, (_, _, times) = loss.data.numpy()
    assert all(before <= t <= after for t in times.tolist())


def test_a_layout_that_differs_from_aims_is_left_to_aim(repo, fixed_clock):
    want = contents(repo, aims_own(repo, [FIRST, SECOND]))

    def tamper(writer):  # another aim version would put its metadata elsewhere
        writer._meta_prefix += b"x"

    run_id, writers = batched(repo, [FIRST, SECOND], tamper)
    assert [w.verified for w in writers] == [False, False]
    assert contents(repo, run_id) == want


class Counting:
    """A write batch that counts the operations it forwards."""

    def __init__(self, batch, ops):
        self.batch, self.ops = batch, ops

    def put(self, key, value):
        self.ops.append("put")
        self.batch.put(key, value)

    def delete(self, key):
        self.ops.append("delete")
        self.batch.delete(key)

    def delete_range(self, begin, end):
        self.ops.append("range")
        self.batch.delete_range(begin, end)


def test_direct_writes_are_four_puts_per_value_and_no_deletes(repo, monkeypatch):
    ops = []
    original = RocksContainer.batch
    monkeypatch.setattr(RocksContainer, "batch", lambda store: Counting(original(store), ops))
    monkeypatch.setattr(RocksContainer, "commit", lambda store, batch, commit=RocksContainer.commit: commit(store, batch.batch))
    tracker = AimTracker(repo)
    tracker.open()
    tracker.log_batch([(1, {"loss": 1.0, "lr": 0.1}), (2, {"loss": 0.5, "lr": 0.1})])  # aim's: set up, then checked
    assert tracker._direct.verified
    aims = len(ops)
    del ops[:]
    tracker.log_batch([(s, {"loss": 1.0 / s, "lr": 0.1}) for s in range(3, 103)])
    written = list(ops)
    tracker.close()
    assert aims > 2 * 20  # aim's own way, for comparison: some 25 operations per value
    # 100 events x 2 values x 4 array records, then last and last_step of both and the new min of loss
    assert written.count("put") == 100 * 2 * 4 + 5 and written.count("put") == len(written)


def test_an_error_in_aims_part_of_an_event_keeps_what_came_before_it_as_aims_own_does(repo):
    def run(direct):
        tracker = AimTracker(repo)
        run_id = tracker.open()
        tracker._run.track(aim.Text("a note"), name="note", step=0)  # a text sequence: a float for it makes aim raise
        tracker.log_batch([(1, {"loss": 1.0}), (2, {"loss": 2.0})])
        assert tracker._direct.verified
        event = {"loss": 3.0, "note": 1.0, "lr": 0.5}
        with pytest.raises(ValueError, match="Incompatible data types"):
            if direct:
                tracker.log_scalars(3, event)
            else:
                tracker._run.track(event, step=3)
        tracker.close()
        loss = next(m for m in aim.Repo(str(repo)).get_run(run_id).metrics() if m.name == "loss")
        return loss.data.numpy()[0].tolist(), loss.data.numpy()[1][0].tolist()

    assert run(direct=True) == run(direct=False) == ([1, 2, 3], [1.0, 2.0, 3.0])
