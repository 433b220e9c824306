"""Trackers: file round trips, aim read back through aim's SDK, the background fan-out, failure isolation."""

import enum
import json
import math
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch

from fnlight.tracking import (
    AimTracker,
    CSVTracker,
    JSONLTracker,
    Tracker,
    Trackers,
    TrackerWarning,
    default_trackers,
    read_scalars,
)
from fnlight.tracking._base import check_hparams

FILE_TRACKERS = [CSVTracker, JSONLTracker]
EXTREMES = [0.1, 1e-300, -2.5e300, 1 / 3, float("nan"), float("inf"), -float("inf"), 0.0, -0.0]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def same_series(got, want) -> bool:
    return len(got) == len(want) and all(s1 == s2 and same(v1, v2) for (s1, v1), (s2, v2) in zip(got, want))


class Recorder:
    """A tracker that records every call; optionally fails in one method or blocks until released."""

    def __init__(self, name="rec", *, fail_in=None, fail_after=0, gate=None):
        self.name, self.fail_in, self.fail_after, self.gate = name, fail_in, fail_after, gate
        self.calls: list[tuple] = []
        self.threads: set[str] = set()
        self._seen = 0

    def __repr__(self):
        return f"Recorder({self.name!r})"

    def _call(self, method, *args):
        self.threads.add(threading.current_thread().name)
        if self.gate is not None and method == "log_scalars":
            assert self.gate.wait(timeout=30)
        if method == self.fail_in:
            self._seen += 1
            if self._seen > self.fail_after:
                raise OSError(28, f"No space left on device ({self.name})")
        self.calls.append((method, *args))

    def open(self, run_id="", *, hparams=None):
        self._call("open", run_id, hparams)
        return run_id or f"{self.name}-run"

    def log_scalars(self, step, scalars):
        self._call("log_scalars", step, dict(scalars))

    def log_hparams(self, hparams):
        self._call("log_hparams", dict(hparams))

    def close(self):
        self._call("close")

    def events(self):
        return [c[1:] for c in self.calls if c[0] == "log_scalars"]


# ---------------------------------------------------------------------------------------------
# CSV and JSONL


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_round_trip(cls, tmp_path):
    tracker = cls(tmp_path)
    assert isinstance(tracker, Tracker)
    run_id = tracker.open(hparams={"lr": 0.1, "model": {"width": 32, "act": "relu"}, "tags": ["a", "b"], "seed": None})
    assert tracker.run_id == run_id and tracker.path == tmp_path / f"{run_id}{tracker.suffix}"
    names = ["loss", "val/acc", 'a,"quoted" name', "ünï cödé"]
    want: dict[str, list] = {}
    for step, value in enumerate(EXTREMES):
        scalars = {name: value * (i + 1) for i, name in enumerate(names[: 1 + step % len(names)])}
        tracker.log_scalars(step, scalars)
        for name, v in scalars.items():
            want.setdefault(name, []).append((step, v))
    tracker.log_scalars(99, {})  # an empty event is allowed and writes no value
    tracker.close()
    assert tracker.run_id == "" and tracker.path is None
    got = read_scalars(tmp_path / f"{run_id}{cls.suffix}")
    assert got.keys() == want.keys()
    assert all(same_series(got[k], want[k]) for k in want), (got, want)
    hparams = json.loads((tmp_path / f"{run_id}.hparams.json").read_text())
    assert hparams == {"lr": 0.1, "model": {"width": 32, "act": "relu"}, "tags": ["a", "b"], "seed": None}


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_log_batch_writes_what_log_scalars_writes(cls, tmp_path):
    events = [(step, {"loss": v, "val/acc": v / 2} if step % 2 else {"loss": v}) for step, v in enumerate(EXTREMES)]
    one_by_one, batched = cls(tmp_path / "a"), cls(tmp_path / "b")
    run_a, run_b = one_by_one.open(), batched.open()
    for step, scalars in events:
        one_by_one.log_scalars(step, scalars)
    batched.log_batch(events[:4])
    batched.log_batch(())  # an empty batch writes nothing
    batched.log_batch(iter(events[4:]))  # any iterable
    path_b = tmp_path / "b" / f"{run_b}{cls.suffix}"
    in_file = read_scalars(path_b)  # flushed when log_batch returns, before close
    one_by_one.close()
    batched.close()
    want, got = read_scalars(tmp_path / "a" / f"{run_a}{cls.suffix}"), read_scalars(path_b)
    assert got.keys() == want.keys() == {"loss", "val/acc"} and in_file.keys() == got.keys()
    assert all(same_series(got[k], want[k]) and same_series(in_file[k], want[k]) for k in want), (got, want)
    with pytest.raises(RuntimeError, match=r"has no open run: call open\(\) first"):
        batched.log_batch(events)


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_reopen_appends_to_the_same_run(cls, tmp_path):
    tracker = cls(tmp_path)
    run_id = tracker.open(hparams={"lr": 0.1, "epochs": 3})
    for step in (1, 2, 3):
        tracker.log_scalars(step, {"loss": 1.0 / step})
    tracker.close()
    other = tracker.open()  # a new run in between, in the same directory
    tracker.log_scalars(1, {"loss": 9.0})
    tracker.close()
    assert other != run_id

    again = cls(tmp_path)  # as a resumed process would
    assert again.open(run_id, hparams={"epochs": 5, "resumed": True}) == run_id
    again.log_scalars(4, {"loss": 0.25, "val_loss": 0.5})  # a key that appears later
    again.close()
    got = read_scalars(tmp_path / f"{run_id}{cls.suffix}")
    assert got == {"loss": [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)], "val_loss": [(4, 0.5)]}
    assert json.loads((tmp_path / f"{run_id}.hparams.json").read_text()) == {"lr": 0.1, "epochs": 5, "resumed": True}
    assert read_scalars(tmp_path / f"{other}{cls.suffix}") == {"loss": [(1, 9.0)]}


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_steps_rerun_after_a_resume_read_back_once_with_the_later_value(cls, tmp_path):
    tracker = cls(tmp_path)
    run_id = tracker.open()
    tracker.log_batch([(1, {"loss": 1.0}), (2, {"loss": 0.5, "val": 0.7}), (3, {"loss": 0.4})])
    tracker.close()  # the process dies after update 3; the newest checkpoint is of update 1
    assert tracker.open(run_id) == run_id
    tracker.log_batch([(2, {"loss": 0.5, "val": 0.6}), (3, {"loss": 0.4}), (4, {"loss": 0.3})])  # updates 2-3 again
    tracker.close()
    assert read_scalars(tmp_path / f"{run_id}{cls.suffix}") == {
        "loss": [(1, 1.0), (2, 0.5), (3, 0.4), (4, 0.3)],
        "val": [(2, 0.6)],  # the value logged last, as aim keeps it
    }


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_opens_an_unknown_id_as_a_new_run(cls, tmp_path):
    tracker = cls(tmp_path / "nested" / "dir")
    assert tracker.open("my-run.1") == "my-run.1"
    tracker.log_scalars(0, {"x": 1})
    tracker.close()
    assert read_scalars(tmp_path / "nested" / "dir" / f"my-run.1{cls.suffix}") == {"x": [(0, 1.0)]}
    assert not (tmp_path / "nested" / "dir" / "my-run.1.hparams.json").exists()


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_drops_a_partial_last_line(cls, tmp_path):
    tracker = cls(tmp_path)
    run_id = tracker.open()
    tracker.log_scalars(1, {"loss": 1.0})
    tracker.close()
    path = tmp_path / f"{run_id}{cls.suffix}"
    with open(path, "a") as f:
        f.write("2,loss,0.5" if cls is CSVTracker else '{"step": 2, "time": 0, "scal')  # a crash mid-write
    assert read_scalars(path) == {"loss": [(1, 1.0)]}  # readers ignore it
    tracker.open(run_id)  # reopening truncates it
    tracker.log_scalars(2, {"loss": 0.5})
    tracker.close()
    assert read_scalars(path) == {"loss": [(1, 1.0), (2, 0.5)]}
    assert path.read_text().endswith("\n")


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_accepts_numbers_of_any_kind(cls, tmp_path):
    tracker = cls(tmp_path)
    run_id = tracker.open()
    tracker.log_scalars(np.int64(3), {"int": 2, "np": np.float32(0.5), "t": torch.tensor(1.5), "np64": np.float64(0.25)})
    tracker.close()
    got = read_scalars(tmp_path / f"{run_id}{cls.suffix}")
    assert got == {"int": [(3, 2.0)], "np": [(3, 0.5)], "t": [(3, 1.5)], "np64": [(3, 0.25)]}


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_names_with_line_breaks_read_back(cls, tmp_path):
    # csv quoted a name holding "\n" but not one holding "\r" (lineterminator="\n"): the reader split the row there
    # and read_scalars failed with "ValueError: not enough values to unpack (expected 4, got 2)"
    names = ["cr\rname", "crlf\r\n", "lf\nname", "plain"]
    tracker = cls(tmp_path)
    run_id = tracker.open()
    tracker.log_scalars(1, {name: float(i) for i, name in enumerate(names)})
    tracker.log_batch([(2, {"cr\rname": 5.0, "plain": 6.0})])
    tracker.close()
    tracker.open(run_id)  # reopening keeps every row (no line taken for a partial one)
    tracker.log_scalars(3, {"plain": 7.0})
    tracker.close()
    got = read_scalars(tmp_path / f"{run_id}{cls.suffix}")
    assert got == {
        "cr\rname": [(1, 0.0), (2, 5.0)],
        "crlf\r\n": [(1, 1.0)],
        "lf\nname": [(1, 2.0)],
        "plain": [(1, 3.0), (2, 6.0), (3, 7.0)],
    }


def test_new_run_ids_are_unique_and_file_safe(tmp_path):
    tracker = JSONLTracker(tmp_path)
    ids = []
    for _ in range(20):
        ids.append(tracker.open())
        tracker.close()
    assert len(set(ids)) == 20
    assert all(len(i.split("-")) == 3 for i in ids)


def test_csv_reopen_refuses_a_foreign_file(tmp_path):
    (tmp_path / "r.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(ValueError, match=r"r\.csv is not a CSVTracker file: its header is \['epoch', 'loss'\]"):
        CSVTracker(tmp_path).open("r")
    with pytest.raises(ValueError, match="is not a CSVTracker file"):
        read_scalars(tmp_path / "r.csv")


def test_read_scalars_refuses_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"reads \.csv and \.jsonl tracker files, got '.*run\.txt'"):
        read_scalars(tmp_path / "run.txt")


@pytest.mark.parametrize("cls", FILE_TRACKERS)
def test_file_tracker_lifecycle_errors(cls, tmp_path):
    tracker = cls(tmp_path)
    with pytest.raises(RuntimeError, match=r"has no open run: call open\(\) first"):
        tracker.log_scalars(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="has no open run"):
        tracker.log_hparams({"lr": 1})
    tracker.close()  # closing when nothing is open does nothing
    run_id = tracker.open()
    with pytest.raises(RuntimeError, match=rf"already has run '{run_id}' open: close\(\) it"):
        tracker.open()
    tracker.close()
    tracker.close()


BAD_RUN_IDS = [
    (None, TypeError, "run_id must be a str"),
    ("../escape", ValueError, r"run_id must be '' \(a new run\) or letters"),
    ("a/b", ValueError, "run_id must be ''"),
    ("-flag", ValueError, "run_id must be ''"),
    ("x" * 129, ValueError, "run_id must be ''"),
]
BAD_STEPS = [
    (-1, ValueError, r"step must be >= 0 \(the optimizer-update count\), got -1"),
    (1.0, TypeError, "step must be an int .* got float: 1.0"),
    (True, TypeError, "step must be an int .* got bool"),
    ("3", TypeError, "step must be an int"),
]
BAD_SCALARS = [
    ([("loss", 1.0)], TypeError, "scalars must be a mapping of name -> number, got list"),
    ({"loss": "0.5"}, TypeError, r"scalar 'loss' must be a real number .* got str: '0.5'"),
    ({"loss": None}, TypeError, "scalar 'loss' must be a real number"),
    ({"ok": True}, TypeError, "scalar 'ok' must be a real number .* got bool"),
    ({"loss": torch.ones(2)}, TypeError, r"scalar 'loss' cannot be converted to float"),
    ({"loss": 1j}, TypeError, "scalar 'loss' must be a real number"),
    ({"n": 10**400}, TypeError, r"scalar 'n' cannot be converted to float \(int too large to convert to float\)"),
    ({3: 1.0}, TypeError, "scalar names must be non-empty str, got 3"),
    ({"": 1.0}, TypeError, "scalar names must be non-empty str, got ''"),
]
BAD_EVENTS = [
    ({1: {"loss": 1.0}}, r"events must be an iterable of \(step, scalars\) pairs, got dict"),
    (7, r"events must be an iterable of \(step, scalars\) pairs, got int: 7"),
    ([(1, {"loss": 1.0}), (2,)], r"event 1 must be a \(step, scalars\) pair, got tuple: \(2,\)"),
    ([{"loss": 1.0}], r"event 0 must be a \(step, scalars\) pair, got dict"),
]


class BigSeed(enum.IntEnum):
    SEED = 2**63 + 5


class Mode(enum.StrEnum):
    TRAIN = "train"


class Level(enum.IntEnum):
    HIGH = 2


BAD_HPARAMS = [
    ([1], TypeError, "hparams must be a mapping of str -> value, got list"),
    ({"lr": torch.tensor(0.1)}, TypeError, r"hparams\['lr'\] is a Tensor .* convert it first"),
    ({"opt": {"betas": (0.9, object())}}, TypeError, r"hparams\['opt'\]\['betas'\]\[1\] is a object"),
    ({"lr": float("nan")}, ValueError, r"hparams\['lr'\] is nan: hyperparameters must be finite"),
    ({"seed": 2**63 + 5}, ValueError, r"hparams\['seed'\] is 9223372036854775813, outside int64 .* log it as str\(value\)"),
    ({1: 2}, TypeError, "hparams: keys must be non-empty str, got 1"),
    ({"seed": BigSeed.SEED}, ValueError, r"hparams\['seed'\] is 9223372036854775813, outside int64"),  # a subclass of int too
]


def _bad_input_cases(tracker, opened):
    """Each bad input raises, naming the tracker and the method (``JSONLTracker.log_scalars: step must be ...``)."""
    name = type(tracker).__name__

    def raises(err, match, method):
        return pytest.raises(err, match=rf"^{name}\.{method}: (hparams)?.*{match}")

    for run_id, err, match in BAD_RUN_IDS:
        if not opened:
            with raises(err, match, "open"):
                tracker.open(run_id)
    for hparams, err, match in BAD_HPARAMS:
        if opened:
            with raises(err, match, "log_hparams"):
                tracker.log_hparams(hparams)
        else:
            with raises(err, match, "open"):
                tracker.open(hparams=hparams)
    if opened:
        for step, err, match in BAD_STEPS:
            with raises(err, match, "log_scalars"):
                tracker.log_scalars(step, {"loss": 1.0})
        for scalars, err, match in BAD_SCALARS:
            with raises(err, match, "log_scalars"):
                tracker.log_scalars(1, scalars)
        for step, err, match in BAD_STEPS:  # the same checks for each event of a batch
            with raises(err, match, "log_batch"):
                tracker.log_batch([(1, {"loss": 1.0}), (step, {"loss": 1.0})])
        for scalars, err, match in BAD_SCALARS:
            with raises(err, match, "log_batch"):
                tracker.log_batch([(1, scalars)])
        for events, match in BAD_EVENTS:
            with raises(TypeError, match, "log_batch"):
                tracker.log_batch(events)


@pytest.mark.parametrize(
    "make", [CSVTracker, JSONLTracker, lambda d: Trackers(JSONLTracker(d))], ids=["csv", "jsonl", "trackers"]
)
def test_bad_inputs_raise_on_the_callers_thread(make, tmp_path):
    tracker = make(tmp_path)
    _bad_input_cases(tracker, opened=False)
    run_id = tracker.open()
    _bad_input_cases(tracker, opened=True)
    tracker.log_scalars(7, {"loss": 0.5})
    tracker.close()
    assert read_scalars(tmp_path / f"{run_id}.jsonl" if make is not CSVTracker else tmp_path / f"{run_id}.csv") == {
        "loss": [(7, 0.5)]
    }


# ---------------------------------------------------------------------------------------------
# aim


@pytest.fixture(scope="module")
def aim_repo(tmp_path_factory):
    """One aim repository for the module: creating one costs ~2 s (aim runs its migrations)."""
    return tmp_path_factory.mktemp("aim")


def aim_series(repo_dir, run_id):
    """{name: [(step, value)]}, hparams and experiment of a run, read through aim's own SDK."""
    import aim

    run = aim.Repo(str(repo_dir)).get_run(run_id)
    assert run is not None, f"aim cannot see run {run_id}"
    series = {}
    for metric in run.metrics():
        steps, (values, _epochs, _times) = metric.data.numpy()
        assert metric.context.to_dict() == {}
        series[metric.name] = list(zip(steps.tolist(), values.tolist()))
    return series, run.get("hparams"), run.experiment


def test_aim_round_trip_read_back_through_aims_sdk(aim_repo):
    tracker = AimTracker(aim_repo, experiment="fnlight-test")
    assert isinstance(tracker, Tracker)
    run_id = tracker.open(hparams={"lr": 0.1, "model": {"width": 32}, "tags": ["a"]})
    assert tracker.run_id == run_id and len(run_id) == 24
    want: dict[str, list] = {}
    for step, value in enumerate(EXTREMES, start=1):
        scalars = {"loss": value, "lr": 0.1 / step}
        if step % 3 == 0:
            scalars["val/acc"] = step / 10
        tracker.log_scalars(step, scalars)
        for k, v in scalars.items():
            want.setdefault(k, []).append((step, v))
    tracker.close()
    assert tracker.run_id == ""
    series, hparams, experiment = aim_series(aim_repo, run_id)
    assert series.keys() == want.keys()
    assert all(same_series(series[k], want[k]) for k in want), (series, want)
    assert hparams == {"lr": 0.1, "model": {"width": 32}, "tags": ["a"]}
    assert experiment == "fnlight-test"


def test_hparams_of_subclasses_are_recorded_as_plain_values(aim_repo, tmp_path):
    # a StrEnum member passed the hparams check, then aim refused it at open ("TypeError: Expected unicode, got
    # Mode"): with_tracking's build-time check promises values every tracker can record, so they are plain now
    hparams = {"mode": Mode.TRAIN, "by_mode": {Mode.TRAIN: Level.HIGH}, "x": np.float64(0.5), "flag": True}
    want = {"mode": "train", "by_mode": {"train": 2}, "x": 0.5, "flag": True}
    checked = check_hparams(hparams)
    assert checked == want and [type(v) for v in checked.values()] == [str, dict, float, bool]
    assert [(type(k), type(v)) for k, v in checked["by_mode"].items()] == [(str, int)]
    run_ids = []
    for tracker in (AimTracker(aim_repo), JSONLTracker(tmp_path)):
        run_ids.append(tracker.open(hparams=hparams))
        tracker.log_scalars(1, {"loss": 1.0})
        tracker.close()
    assert aim_series(aim_repo, run_ids[0])[1] == want
    assert json.loads((tmp_path / f"{run_ids[1]}.hparams.json").read_text()) == want


def _count_commits(monkeypatch):
    """Count the writes aim's rocksdb stores make (``RocksContainer.commit``: one per write batch)."""
    from aim.storage.rockscontainer import RocksContainer

    commits = []
    original = RocksContainer.commit
    monkeypatch.setattr(RocksContainer, "commit", lambda store, batch: (commits.append(store.path), original(store, batch)))
    return commits


def test_aim_log_batch_stores_what_aims_track_stores_in_one_write_per_store(aim_repo, monkeypatch):
    from fnlight.tracking._aim import _rocks_stores

    events = [(step, {"loss": v, "lr": 0.1 / step} if step % 3 else {"loss": v}) for step, v in enumerate(EXTREMES, 1)]
    commits = _count_commits(monkeypatch)
    one_by_one = AimTracker(aim_repo)
    run_a = one_by_one.open()
    del commits[:]
    for step, scalars in events:
        one_by_one._run.track(scalars, step=step)  # aim's own way
    per_event = len(commits)
    batched = AimTracker(aim_repo)
    run_b = batched.open()
    batched.log_scalars(*events[0])
    stores = _rocks_stores(batched._run)
    del commits[:]
    batched.log_batch(events[1:])
    assert sorted(commits) == sorted(store.path for store in stores) and len(stores) == 2  # metadata and sequences
    assert per_event > 10 * len(events)  # aim's own way: several writes per scalar
    assert not any("batch" in vars(store) or "commit" in vars(store) for store in stores)  # aim's methods again
    one_by_one.close()
    batched.close()
    want, _, _ = aim_series(aim_repo, run_a)
    got, _, _ = aim_series(aim_repo, run_b)
    assert got.keys() == want.keys() == {"loss", "lr"}
    assert all(same_series(got[k], want[k]) for k in want), (got, want)


@pytest.mark.parametrize("failing_step", [2, 4])  # 2: aim writes it (it checks the direct writes), 4: written directly
def test_aim_log_batch_keeps_what_was_tracked_before_an_error(aim_repo, monkeypatch, failing_step):
    from fnlight.tracking._aim import _rocks_stores

    tracker = AimTracker(aim_repo)
    run_id = tracker.open()
    track, encode = tracker._run.track, tracker._direct._encode

    def failing(scalars, step):
        if step == failing_step:
            raise OSError(28, "No space left on device")
        track(scalars, step=step)

    def failing_encode(value):
        if value == float(failing_step):
            raise OSError(28, "No space left on device")
        return encode(value)

    monkeypatch.setattr(tracker._run, "track", failing)
    monkeypatch.setattr(tracker._direct, "_encode", failing_encode)
    with pytest.raises(OSError, match="No space left on device"):
        tracker.log_batch([(s, {"loss": float(s)}) for s in range(1, 6)])
    assert not any("batch" in vars(store) or "commit" in vars(store) for store in _rocks_stores(tracker._run))
    monkeypatch.undo()
    tracker.close()
    series, _, _ = aim_series(aim_repo, run_id)
    assert series == {"loss": [(s, float(s)) for s in range(1, failing_step)]}
    import aim

    (record,) = (r["loss"] for r in aim.Repo(str(aim_repo)).get_run(run_id).meta_run_tree.collect("traces").values())
    last = failing_step - 1
    assert (record["last_step"], record["last"], record["max"]) == (last, float(last), float(last))


def test_aim_log_batch_writes_one_by_one_where_another_thread_may_write(aim_repo, monkeypatch):
    from fnlight.tracking import _aim

    commits = _count_commits(monkeypatch)
    tracker = AimTracker(aim_repo)
    run_id = tracker.open()
    tracker.log_scalars(1, {"loss": 1.0})
    tracker.system_metrics = True  # aim's sampling thread would write to the run too (not started here)
    del commits[:]
    tracker.log_batch([(2, {"loss": 2.0}), (3, {"loss": 3.0})])
    assert len(commits) > 2
    tracker.system_metrics = False
    monkeypatch.setattr(_aim, "_rocks_stores", lambda run: [])  # an aim whose stores are not the expected ones
    del commits[:]
    tracker.log_batch([(4, {"loss": 4.0}), (5, {"loss": 5.0})])
    assert len(commits) > 2
    tracker.close()
    series, _, _ = aim_series(aim_repo, run_id)
    assert series == {"loss": [(s, float(s)) for s in range(1, 6)]}


def test_aim_reopen_continues_the_same_run(aim_repo):
    tracker = AimTracker(aim_repo)
    run_id = tracker.open(hparams={"lr": 0.1, "epochs": 2})
    for step in (1, 2, 3):
        tracker.log_scalars(step, {"loss": float(step)})
    tracker.close()

    resumed = AimTracker(aim_repo)  # as a restarted process would
    assert resumed.open(run_id, hparams={"epochs": 4}) == run_id
    for step in (4, 5):
        resumed.log_scalars(step, {"loss": float(step), "val_loss": 0.5})
    resumed.log_hparams({"note": "resumed"})
    resumed.close()
    series, hparams, _ = aim_series(aim_repo, run_id)
    assert series == {"loss": [(s, float(s)) for s in range(1, 6)], "val_loss": [(4, 0.5), (5, 0.5)]}
    assert hparams == {"lr": 0.1, "epochs": 4, "note": "resumed"}


def test_aim_reopen_of_an_unknown_run_is_a_clear_error(aim_repo):
    tracker = AimTracker(aim_repo)
    with pytest.raises(ValueError, match=r"AimTracker.open: there is no aim run 'f{24}' in .*\.aim: AimTracker reopens"):
        tracker.open("f" * 24)
    with pytest.raises(RuntimeError, match=r"has no open run: call open\(\) first"):
        tracker.log_scalars(1, {"loss": 1.0})
    run_id = tracker.open()
    with pytest.raises(RuntimeError, match="already has run .* open"):
        tracker.open(run_id)
    with pytest.raises(ValueError, match="step must be >= 0"):
        tracker.log_scalars(-1, {"loss": 1.0})
    tracker.close()
    tracker.close()
    with pytest.raises(TypeError, match="AimTracker: experiment must be a non-empty str or None"):
        AimTracker(aim_repo, experiment="")


def test_default_trackers_share_one_run_id_across_aim_and_jsonl(aim_repo):
    trackers = default_trackers(aim_repo, experiment="defaults")
    assert [type(t) for t in trackers.trackers] == [AimTracker, JSONLTracker]
    run_id = trackers.open(hparams={"batch_size": 16})
    for step in range(1, 6):
        trackers.log_scalars(step, {"loss": 1 / step, "acc": step / 5})
    trackers.close()
    series, hparams, experiment = aim_series(aim_repo, run_id)
    assert read_scalars(aim_repo / f"{run_id}.jsonl") == series  # the JSONL file is named by the aim hash
    assert hparams == {"batch_size": 16} == json.loads((aim_repo / f"{run_id}.hparams.json").read_text())
    assert experiment == "defaults"

    again = default_trackers(aim_repo)  # resume: both continue
    assert again.open(run_id) == run_id
    again.log_scalars(6, {"loss": 1 / 6})
    again.close()
    series, _, _ = aim_series(aim_repo, run_id)
    assert series["loss"][-1] == (6, 1 / 6) == read_scalars(aim_repo / f"{run_id}.jsonl")["loss"][-1]


def test_aim_tracker_must_come_first(aim_repo, tmp_path):
    with pytest.raises(ValueError, match=r"AimTracker\(.*\) must be the first tracker: its run ids are chosen by its backend"):
        Trackers(JSONLTracker(tmp_path), AimTracker(aim_repo))


def test_without_aim_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "aim", None)  # makes `import aim` raise ImportError
    with pytest.raises(ImportError, match=r"AimTracker needs aim, .*`pip install aim`"):
        AimTracker(tmp_path)
    with pytest.raises(ImportError, match="pip install aim"):
        default_trackers(tmp_path, aim=True)
    assert [type(t) for t in default_trackers(tmp_path).trackers] == [JSONLTracker]
    with pytest.raises(TypeError, match="aim must be None"):
        default_trackers(tmp_path, aim="yes")


def test_importing_fnlight_does_not_import_aim():
    code = "import sys, fnlight, fnlight.tracking; assert 'aim' not in sys.modules, 'aim was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Trackers: background fan-out and failure isolation


def test_trackers_never_make_the_caller_wait_and_deliver_in_order():
    gate = threading.Event()
    slow, fast = Recorder("slow", gate=gate), Recorder("fast")
    trackers = Trackers(slow, fast)
    assert isinstance(trackers, Tracker)
    assert trackers.open(hparams={"lr": 1}) == "slow-run"
    expected = []
    for step in range(20):  # every call returns while the slow tracker is blocked on its first event
        scalars = {"loss": step / 2, "step_copy": step}
        trackers.log_scalars(step, scalars)
        scalars["loss"] = -1.0  # mutating after the call does not change what was logged
        expected.append((step, {"loss": step / 2, "step_copy": float(step)}))
        if step == 9:
            trackers.log_hparams({"late": True})
    assert slow.events() == [] == fast.events()  # nothing got past the blocked tracker (one worker, in order)
    gate.set()
    trackers.close()
    assert slow.calls[0] == ("open", "", {"lr": 1})
    assert fast.calls[0] == ("open", "slow-run", {"lr": 1})  # the first tracker chose the run id
    for rec in (slow, fast):
        assert rec.events() == expected
        assert rec.calls[11] == ("log_hparams", {"late": True})
        assert rec.calls[-1] == ("close",)
        assert rec.threads == {"fnlight-trackers"}
    assert trackers.run_id == ""


def test_trackers_inline_mode_calls_trackers_on_the_callers_thread():
    rec = Recorder()
    trackers = Trackers(rec, background=False)
    assert repr(trackers) == "Trackers(Recorder('rec'), background=False)"
    assert trackers.open("given") == "given"
    trackers.log_scalars(1, {"a": 1.0})
    assert rec.events() == [(1, {"a": 1.0})]  # delivered before the call returned
    trackers.close()
    assert rec.threads == {threading.current_thread().name}


def test_trackers_flush_waits_for_the_worker():
    gate = threading.Event()
    rec = Recorder(gate=gate)
    trackers = Trackers(rec)
    trackers.flush()  # no open run: nothing to wait for
    trackers.open()
    trackers.log_scalars(1, {"x": 1.0})
    trackers.log_scalars(2, {"x": 2.0})
    threading.Timer(0.05, gate.set).start()
    trackers.flush()
    assert rec.events() == [(1, {"x": 1.0}), (2, {"x": 2.0})]  # delivered before flush returned
    assert ("_sync",) not in rec.calls  # the sync mark is not a tracker call
    trackers.close()
    inline = Trackers(Recorder(), background=False)
    inline.open()
    inline.flush()  # inline: a no-op
    inline.close()


def test_trackers_hand_events_to_the_worker_in_batches():
    rec = Recorder()
    trackers = Trackers(rec, flush_every=60.0)
    trackers.open()
    for step in range(5):
        trackers.log_scalars(step, {"x": float(step)})
    assert len(trackers._pending) == 5 and rec.events() == []  # within flush_every of open: waiting
    trackers.log_hparams({"late": True})  # goes after the events logged before it
    trackers.flush()
    assert rec.events() == [(s, {"x": float(s)}) for s in range(5)] and rec.calls[-1] == ("log_hparams", {"late": True})
    trackers.close()


class BatchRecorder(Recorder):
    """A Recorder that also takes a batch of events in one call."""

    def log_batch(self, events):
        self._call("log_batch", [(step, dict(scalars)) for step, scalars in events])

    def events(self):
        return [e for c in self.calls if c[0] in ("log_batch", "log_scalars") for e in (c[1] if c[0] == "log_batch" else [c[1:]])]


@pytest.mark.parametrize("background", [True, False])
def test_trackers_give_each_batch_in_one_call_to_a_tracker_with_log_batch(background):
    batching, plain = BatchRecorder("batching"), Recorder("plain")
    trackers = Trackers(batching, plain, background=background, flush_every=60.0)
    trackers.open()
    for step in range(3):
        trackers.log_scalars(step, {"x": float(step)})
    trackers.log_batch([(3, {"x": 3}), (4, {"x": 4.0})])
    trackers.close()
    want = [(s, {"x": float(s)}) for s in range(5)]
    assert batching.events() == want == plain.events()
    batches = [c[1] for c in batching.calls if c[0] == "log_batch"]
    assert batches == ([want] if background else [want[3:]])  # inline, log_scalars delivers each event at once
    assert [c[0] for c in plain.calls].count("log_scalars") == 5


def test_a_tracker_failing_in_log_batch_is_reported_and_disabled():
    bad, good = BatchRecorder("bad", fail_in="log_batch"), Recorder("good")
    trackers = Trackers(bad, good, flush_every=60.0)
    trackers.open()
    trackers.log_scalars(1, {"x": 1.0})
    with pytest.warns(TrackerWarning, match=r"tracker Recorder\('bad'\) raised in log_batch\(\) and is disabled"):
        trackers.flush()  # reported on the caller's thread at its next call
    trackers.log_scalars(2, {"x": 2.0})
    trackers.close()
    assert good.events() == [(1, {"x": 1.0}), (2, {"x": 2.0})] and bad.events() == []
    assert bad.calls[-1] == ("close",)


def test_an_idle_trackers_worker_takes_waiting_events_after_flush_every():
    import time

    rec = Recorder()
    trackers = Trackers(rec, flush_every=0.1)
    trackers.open()
    trackers.log_scalars(1, {"x": 1.0})  # right after open's message: waits
    deadline = time.monotonic() + 30
    while not rec.events() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.events() == [(1, {"x": 1.0})] and trackers._pending == []
    trackers.close()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [("1", TypeError, r"Trackers: flush_every must be a number of seconds, got '1'"), (0.0, ValueError, r"above 0, got 0.0")],
)
def test_trackers_flush_every_is_checked(value, error, match):
    with pytest.raises(error, match=match):
        Trackers(Recorder(), flush_every=value)


def test_closed_trackers_pickle_and_open_ones_say_why_not(tmp_path):
    import pickle

    trackers = Trackers(JSONLTracker(tmp_path), flush_every=0.25)
    copy = pickle.loads(pickle.dumps(trackers))
    assert copy.flush_every == 0.25 and len(copy.trackers) == 1
    run_id = copy.open()  # the copy works: its lock is new
    copy.log_scalars(1, {"x": 1.0})
    with pytest.raises(TypeError, match="has an open run and cannot be pickled; close it first"):
        pickle.dumps(copy)
    copy.close()
    assert read_scalars(tmp_path / f"{run_id}.jsonl") == {"x": [(1, 1.0)]}


def test_trackers_apply_backpressure_without_losing_events():
    gate = threading.Event()
    rec = Recorder(gate=gate)
    trackers = Trackers(rec, max_queue=1)
    trackers.open()
    threading.Timer(0.05, gate.set).start()
    for step in range(50):
        trackers.log_scalars(step, {"x": step})
    trackers.close()
    assert rec.events() == [(s, {"x": float(s)}) for s in range(50)]


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("fail_in", ["log_scalars", "log_hparams", "close"])
def test_a_failing_tracker_is_reported_once_and_the_others_get_everything(background, fail_in):
    bad, good = Recorder("bad", fail_in=fail_in, fail_after=2 if fail_in == "log_scalars" else 0), Recorder("good")
    trackers = Trackers(bad, good, background=background)
    with pytest.warns(TrackerWarning) as record:
        run_id = trackers.open()
        for step in range(10):
            trackers.log_scalars(step, {"loss": float(step)})
            trackers.log_hparams({"step": step})
        trackers.close()
    assert len(record) == 1, [str(w.message) for w in record]
    message = str(record[0].message)
    assert f"tracker Recorder('bad') raised in {fail_in}() and is disabled for the rest of this run" in message
    assert "OSError: [Errno 28] No space left on device (bad)" in message
    assert record[0].filename == __file__  # attributed to the caller's line, not fnlight's
    assert run_id == "bad-run"
    assert good.events() == [(s, {"loss": float(s)}) for s in range(10)]
    assert good.calls[-1] == ("close",)
    if fail_in == "log_scalars":
        assert bad.events() == [(0, {"loss": 0.0}), (1, {"loss": 1.0})]
        assert bad.calls[-1] == ("close",)  # disabled trackers are closed, then left alone
        assert len([c for c in bad.calls if c[0] == "log_hparams"]) == 2


def test_a_tracker_that_fails_to_open_is_skipped_and_the_next_chooses_the_run_id():
    bad, good = Recorder("bad", fail_in="open"), Recorder("good")
    trackers = Trackers(bad, good)
    with pytest.warns(TrackerWarning, match=r"Recorder\('bad'\) raised in open\(\)"):
        run_id = trackers.open()
    assert run_id == "good-run" == trackers.run_id
    trackers.log_scalars(1, {"x": 1.0})
    trackers.close()
    assert bad.calls == [("close",)] and good.events() == [(1, {"x": 1.0})]


def test_reopening_enables_a_tracker_that_failed_in_the_previous_run():
    flaky = Recorder("flaky", fail_in="log_scalars")
    trackers = Trackers(flaky, background=False)
    trackers.open()
    with pytest.warns(TrackerWarning, match="flaky"):
        trackers.log_scalars(1, {"x": 1.0})
    trackers.log_scalars(2, {"x": 2.0})  # disabled: no second warning
    trackers.close()
    flaky.fail_in = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trackers.open("again")
        trackers.log_scalars(3, {"x": 3.0})
        trackers.close()
    assert flaky.events() == [(3, {"x": 3.0})]


def test_trackers_are_flattened_and_work_as_a_context_manager(tmp_path):
    a, b, c = Recorder("a"), Recorder("b"), Recorder("c")
    with Trackers(Trackers(a, b), c) as trackers:
        assert trackers.trackers == (a, b, c)
        trackers.open()
        trackers.log_scalars(1, {"x": 1.0})
    assert [r.calls[-1] for r in (a, b, c)] == [("close",)] * 3
    empty = Trackers()
    assert empty.open() == "" and empty.close() is None


def test_trackers_construction_errors(tmp_path):
    with pytest.raises(TypeError, match=r"Trackers takes trackers \(objects with open, log_scalars, log_hparams and close"):
        Trackers(JSONLTracker(tmp_path), print)
    with pytest.raises(ValueError, match="Trackers: max_queue must be an int >= 1, got 0"):
        Trackers(JSONLTracker(tmp_path), max_queue=0)
    trackers = Trackers(Recorder())
    with pytest.raises(RuntimeError, match=r"has no open run: call open\(\) first"):
        trackers.log_scalars(1, {"x": 1.0})
    trackers.open()
    with pytest.raises(RuntimeError, match="already has run 'rec-run' open"):
        trackers.open()
    trackers.close()


def test_an_unclosed_trackers_is_drained_and_closed_at_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        from fnlight.tracking import JSONLTracker, Trackers
        trackers = Trackers(JSONLTracker({str(tmp_path)!r}))
        trackers.open("forgotten")
        for step in range(200):
            trackers.log_scalars(step, {{"loss": step / 10}})
        # no close(): the process simply ends
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert read_scalars(tmp_path / "forgotten.jsonl") == {"loss": [(s, s / 10) for s in range(200)]}
