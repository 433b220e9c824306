"""Trackers with no dependencies: one CSV or JSONL file per run, appended to and flushed per call."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, ClassVar

from ._base import check_events, check_hparams, check_run_id, check_scalars, check_step, new_run_id

__all__ = ["CSVTracker", "JSONLTracker", "read_scalars"]

CSV_HEADER = ["step", "name", "value", "time"]


class _FileTracker:
    """One file per run, ``<directory>/<run_id><suffix>``, hyperparameters beside it."""

    suffix: ClassVar[str]

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._file: IO[str] | None = None
        self._run_id = ""
        self._hparams: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r})"

    @property
    def run_id(self) -> str:
        """The id of the open run ("" when none is open)."""
        return self._run_id if self._file is not None else ""

    @property
    def path(self) -> Path | None:
        """The file of the open run (``None`` when none is open)."""
        return self.directory / f"{self._run_id}{self.suffix}" if self._file is not None else None

    def open(self, run_id: str = "", *, hparams: Mapping[str, Any] | None = None) -> str:
        """Start a new run (``run_id=""``: a fresh id) or append to ``run_id``'s file (created if missing)."""
        if self._file is not None:
            raise RuntimeError(f"{self!r} already has run {self._run_id!r} open: close() it before opening another")
        run_id = check_run_id(run_id, f"{type(self).__name__}.open")
        hparams = None if hparams is None else check_hparams(hparams, f"{type(self).__name__}.open: hparams")
        self.directory.mkdir(parents=True, exist_ok=True)
        if run_id:
            path = self.directory / f"{run_id}{self.suffix}"
            _drop_partial_last_line(path)
            file = open(path, "a", encoding="utf-8", newline="")
        else:
            for _ in range(100):
                run_id = new_run_id()
                path = self.directory / f"{run_id}{self.suffix}"
                try:
                    file = open(path, "x", encoding="utf-8", newline="")
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover - 100 collisions of 24 random bits within one second
                raise RuntimeError(f"{type(self).__name__}.open: could not create a new run file in {self.directory}")
        try:
            self._start(file, path)
        except BaseException:
            file.close()
            raise
        self._file, self._run_id = file, run_id
        hp_path = self._hparams_path()
        self._hparams = json.loads(hp_path.read_text(encoding="utf-8")) if hp_path.exists() else {}
        if hparams is not None:
            self.log_hparams(hparams)
        return run_id

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Append one event (``step`` and ``scalars``) to the run's file and flush it."""
        where = f"{type(self).__name__}.log_scalars"
        step, scalars = check_step(step, where), check_scalars(scalars, where)
        file = self._require_open()
        file.write(self._format(step, scalars, time.time()))
        file.flush()

    def log_batch(self, events: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Append several events (``(step, scalars)`` pairs, in order) and flush once.

        Raises:
            TypeError: an event is not a ``(step, scalars)`` pair, or as :meth:`log_scalars`.
        """
        events = check_events(events, f"{type(self).__name__}.log_batch")
        file = self._require_open()
        now = time.time()
        file.write("".join([self._format(step, scalars, now) for step, scalars in events]))
        file.flush()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Merge ``hparams`` into ``<run_id>.hparams.json`` (top-level keys replaced), written atomically."""
        hparams = check_hparams(hparams, f"{type(self).__name__}.log_hparams: hparams")
        self._require_open()
        self._hparams.update(hparams)
        path = self._hparams_path()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self._hparams, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def close(self) -> None:
        """Flush, fsync and close the run's file. Does nothing when no run is open."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()

    def _require_open(self) -> IO[str]:
        if self._file is None:
            raise RuntimeError(f"{self!r} has no open run: call open() first")
        return self._file

    def _hparams_path(self) -> Path:
        return self.directory / f"{self._run_id}.hparams.json"

    def _start(self, file: IO[str], path: Path) -> None:
        """Check or write the file's header."""

    def _format(self, step: int, scalars: dict[str, float], now: float) -> str:
        """The text of one event in the file."""
        raise NotImplementedError


class JSONLTracker(_FileTracker):
    """Write each run to ``<directory>/<run_id>.jsonl``: one JSON object per logging event.

    Each line is ``{"step": 12, "time": 1738329901.5, "scalars": {"loss": 0.31, "lr": 0.001}}``
    (``time`` in Unix seconds; NaN and infinities written as ``NaN``/``Infinity``, as Python's
    :mod:`json` reads them). Hyperparameters go to ``<run_id>.hparams.json``. Each call
    (:meth:`log_scalars`, or ``log_batch`` with several events) is flushed to the operating
    system before it returns; :meth:`close` also fsyncs. Reopening a
    run appends to its file (dropping a partial last line left by a crash), so steps logged
    again after a resume appear twice. Read a file back with :func:`read_scalars` (each step
    once, the value logged last).

    Args:
        directory: where the run files go (created on :meth:`open`).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tracker = JSONLTracker(d)
    ...     run_id = tracker.open(hparams={"lr": 0.1})
    ...     tracker.log_scalars(1, {"loss": 0.5})
    ...     tracker.close()
    ...     read_scalars(f"{d}/{run_id}.jsonl")
    {'loss': [(1, 0.5)]}
    """

    suffix = ".jsonl"

    def _format(self, step: int, scalars: dict[str, float], now: float) -> str:
        return json.dumps({"step": step, "time": now, "scalars": scalars}, separators=(",", ":")) + "\n"


class CSVTracker(_FileTracker):
    """Write each run to ``<directory>/<run_id>.csv`` in long ("tidy") form: one row per scalar.

    The columns are ``step,name,value,time``, so metrics that appear later in a run (a
    validation loss every 1000 steps) need no change of header, and the file loads directly
    into a dataframe (``pandas.read_csv(path).pivot_table(index="step", columns="name",
    values="value")``). Values are written with ``repr`` (exact round trip; ``nan``, ``inf``);
    ``time`` is Unix seconds. Hyperparameters go to ``<run_id>.hparams.json``. Flushed per
    call (an event, or a batch of them), fsynced on :meth:`close`; reopening a run appends (after checking the header),
    so steps logged again after a resume appear twice: :func:`read_scalars` keeps the value logged last.

    Args:
        directory: where the run files go (created on :meth:`open`).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tracker = CSVTracker(d)
    ...     run_id = tracker.open()
    ...     tracker.log_scalars(1, {"loss": 0.5, "lr": 1e-3})
    ...     tracker.close()
    ...     header, first, second = (tracker.directory / f"{run_id}.csv").read_text().splitlines()
    >>> header, first.rsplit(",", 1)[0], second.rsplit(",", 1)[0]
    ('step,name,value,time', '1,loss,0.5', '1,lr,0.001')
    """

    suffix = ".csv"

    def _start(self, file: IO[str], path: Path) -> None:
        if file.tell() == 0:
            csv.writer(file, lineterminator="\n").writerow(CSV_HEADER)
            file.flush()
            return
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), None)
        if header != CSV_HEADER:
            raise ValueError(f"{path} is not a CSVTracker file: its header is {header!r}, expected {CSV_HEADER!r}")

    def _format(self, step: int, scalars: dict[str, float], now: float) -> str:
        buf = io.StringIO()
        stamp = repr(now)
        # the csv module quotes a field holding "\n" but not one holding "\r" (with lineterminator="\n"), which every
        # reader then takes for a line break: a name holding "\r" has the event's rows quoted whole
        quoting = csv.QUOTE_ALL if any("\r" in name for name in scalars) else csv.QUOTE_MINIMAL
        writer = csv.writer(buf, lineterminator="\n", quoting=quoting)
        writer.writerows([(step, name, repr(value), stamp) for name, value in scalars.items()])
        return buf.getvalue()


def read_scalars(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Read a :class:`CSVTracker` (``.csv``) or :class:`JSONLTracker` (``.jsonl``) run file back.

    A last line without its newline (a write cut short by a crash) is ignored. A step logged
    again (a run resumed from a checkpoint reruns the updates after it, and the file, appended
    to, holds both) reads back once, with the value logged last, as aim keeps it.

    Args:
        path: the run's file.

    Returns:
        ``{name: [(step, value), ...]}``, each series in the order its steps were first logged.

    Raises:
        ValueError: ``path`` ends in neither ``.csv`` nor ``.jsonl``.

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with open(os.path.join(d, "r.jsonl"), "w") as f:
    ...         _ = f.write('{"step": 3, "time": 0.0, "scalars": {"loss": 1.5}}\\n')
    ...     read_scalars(os.path.join(d, "r.jsonl"))
    {'loss': [(3, 1.5)]}
    """
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise ValueError(f"read_scalars reads .csv and .jsonl tracker files, got {str(path)!r}")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    text = text[: text.rfind("\n") + 1]  # complete lines only
    series: dict[str, dict[int, float]] = {}  # per name, step -> value: a step logged again keeps its place, takes the value
    if path.suffix == ".jsonl":
        for line in text.splitlines():
            event = json.loads(line)
            for name, value in event["scalars"].items():
                series.setdefault(name, {})[event["step"]] = float(value)
    else:
        rows = csv.reader(io.StringIO(text, newline=""))
        header = next(rows, None)
        if header is not None and header != CSV_HEADER:
            raise ValueError(f"{path} is not a CSVTracker file: its header is {header!r}, expected {CSV_HEADER!r}")
        for step, name, value, _ in rows:
            series.setdefault(name, {})[int(step)] = float(value)
    return {name: list(values.items()) for name, values in series.items()}


def _drop_partial_last_line(path: Path) -> None:
    """Truncate ``path`` after its last newline (a crash can leave half a line); no-op if absent."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)
