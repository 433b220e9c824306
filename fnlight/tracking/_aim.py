"""aim on an embedded local repository: no server, runs readable by ``aim up`` and aim's SDK."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from ._aim_direct import DirectScalars
from ._base import check_events, check_hparams, check_run_id, check_scalars, check_step

__all__ = ["AimTracker"]

_SYSTEM_METRICS_INTERVAL_S = 10


def import_aim() -> Any:
    """Import aim (slow, ~1 s), hiding the SQLAlchemy 2.0 deprecation warning aim 3.x triggers on import."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*declarative_base\(\)", category=Warning)
            import aim
            import aim.sdk.errors
            import aim.sdk.index_manager
    except ImportError as e:
        raise ImportError(
            f"AimTracker needs aim, which could not be imported ({e}): `pip install aim` (or `pip install fnlight[aim]`), "
            "or use JSONLTracker / CSVTracker, which need nothing"
        ) from e
    return aim


def _discard(batch: Any) -> None:
    """A store's ``commit`` while its writes are gathered (see ``AimTracker._one_write``)."""


def _rocks_stores(run: Any) -> list[Any]:
    """The rocksdb stores an aim run's tracking writes to (metadata, sequences); [] when not found."""
    try:
        from aim.storage.rockscontainer import RocksContainer

        trees = [run.meta_run_tree, run.meta_tree, *run.series_run_trees.values()]
    except (ImportError, AttributeError):
        return []
    stores: dict[int, Any] = {}
    for tree in trees:
        store = getattr(tree, "container", None)
        while store is not None and not isinstance(store, RocksContainer):
            store = getattr(store, "parent", None)
        if store is None or not callable(getattr(store, "batch", None)):
            return []
        stores[id(store)] = store
    return list(stores.values())


class AimTracker:
    """Track runs in an aim repository on local disk (``<repo>/.aim``), with no server.

    Each run is an aim run: scalars become metrics whose steps are the optimizer-update
    counts, hyperparameters go to ``run["hparams"]``, and the run id is aim's run hash, so
    ``open(run_id)`` continues the same aim run after a restart (steps carry on). On
    :meth:`close` the run is closed and indexed, so it is immediately readable through aim's
    SDK (``aim.Repo(repo).get_run(run_id)``) and visible in the UI: ``aim up --repo <repo>``.

    aim's own ``Run.track`` costs about 0.9 ms of CPU per event of 6 scalars; this tracker
    writes a metric's values after its first straight into aim's store, aim's records with
    a tenth of the work (60-130 µs per event; see :meth:`_track`). Still, wrap it in
    :class:`Trackers` (the default) or :class:`ProcessTrackers` so it runs off the training
    thread. aim's terminal-log
    capture is always off (it would take over ``sys.stdout``); its CPU/memory/GPU sampling
    is off unless ``system_metrics=True``. Constructing an ``AimTracker`` imports aim (~1 s);
    importing fnlight does not.

    Args:
        repo: the directory holding the aim repository (aim's convention: data in
            ``<repo>/.aim``, created on first use).
        experiment: the aim experiment new runs belong to (aim's ``"default"`` when None).
        system_metrics: let aim sample system usage every 10 s into the run.
        force_resume: reopen a run whose lock is held (by a process on another machine that
            died). A lock left by a dead process on this machine is released anyway.

    Raises:
        ImportError: aim is not installed (``pip install aim``).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tracker = AimTracker(d, experiment="demo")  # imports aim
    ...     run_id = tracker.open(hparams={"lr": 0.1})
    ...     tracker.log_scalars(1, {"loss": 0.5})
    ...     tracker.log_scalars(2, {"loss": 0.25})
    ...     tracker.close()
    ...     import aim  # read it back with aim's own SDK
    ...     run = aim.Repo(d).get_run(run_id)
    ...     (loss,) = run.metrics()
    ...     steps, (values, epochs, times) = loss.data.numpy()
    ...     print(run_id == run.hash, run["hparams"], loss.name, steps.tolist(), values.tolist())
    True {'lr': 0.1} loss [1, 2] [0.5, 0.25]
    """

    _generates_run_ids: ClassVar[bool] = True

    def __init__(
        self,
        repo: str | os.PathLike[str] = ".",
        *,
        experiment: str | None = None,
        system_metrics: bool = False,
        force_resume: bool = False,
    ) -> None:
        if experiment is not None and (not isinstance(experiment, str) or not experiment):
            raise TypeError(f"AimTracker: experiment must be a non-empty str or None, got {experiment!r}")
        self._aim = import_aim()
        self.repo = Path(repo)
        self.experiment = experiment
        self.system_metrics = bool(system_metrics)
        self.force_resume = bool(force_resume)
        self._run: Any = None
        self._direct: DirectScalars | None = None

    def __repr__(self) -> str:
        return f"AimTracker({str(self.repo)!r}, experiment={self.experiment!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Picklable while no run is open (for :class:`ProcessTrackers`); aim is imported again on unpickling."""
        if self._run is not None:
            raise TypeError("AimTracker: a tracker with an open run cannot be pickled; close it first")
        return {k: v for k, v in self.__dict__.items() if k != "_aim"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._aim = import_aim()

    @property
    def run_id(self) -> str:
        """The aim hash of the open run ("" when none is open)."""
        return self._run.hash if self._run is not None else ""

    def open(self, run_id: str = "", *, hparams: Mapping[str, Any] | None = None) -> str:
        """Start a new aim run (``run_id=""``) or reopen the aim run whose hash is ``run_id``.

        Raises:
            ValueError: ``run_id`` is not a run of this repository.
            RuntimeError: a run is already open, or another live process holds the run's lock.
        """
        if self._run is not None:
            raise RuntimeError(f"{self!r} already has run {self._run.hash!r} open: close() it before opening another")
        run_id = check_run_id(run_id, "AimTracker.open")
        hparams = None if hparams is None else check_hparams(hparams, "AimTracker.open: hparams")
        self.repo.mkdir(parents=True, exist_ok=True)
        options = {
            "repo": os.path.abspath(self.repo),
            "experiment": self.experiment,
            "system_tracking_interval": _SYSTEM_METRICS_INTERVAL_S if self.system_metrics else None,
            "capture_terminal_logs": False,
            "log_system_params": False,
        }
        if run_id:
            # aim caches its list of runs for 0.5 s: a run created just now (in this process) would look missing
            getattr(self._aim.Repo._all_run_hashes, "cache_clear", lambda: None)()
            try:
                self._run = self._aim.Run(run_id, force_resume=self.force_resume, **options)
            except self._aim.sdk.errors.MissingRunError:
                raise ValueError(
                    f"AimTracker.open: there is no aim run {run_id!r} in {self.repo / '.aim'}: "
                    "AimTracker reopens runs by their aim hash "
                    "(the id an earlier open() returned); pass run_id='' to start a new run"
                ) from None
        else:
            self._run = self._aim.Run(**options)
        stores = self._stores(self._run)
        self._direct = DirectScalars.build(self._run, stores) if stores else None
        if hparams is not None:
            self.log_hparams(hparams)
        return self._run.hash

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Track each scalar as the aim metric of that name (empty context) at ``step``."""
        step, scalars = check_step(step, "AimTracker.log_scalars"), check_scalars(scalars, "AimTracker.log_scalars")
        run = self._require_open()
        if scalars:
            self._track(run, [(step, scalars)])

    def log_batch(self, events: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Track several events (``(step, scalars)`` pairs, in order) with one write to disk.

        The repository holds what :meth:`log_scalars` per event, that is aim's ``Run.track``,
        would leave in it, and the batch is on disk when this returns; see :meth:`_track`.

        Raises:
            TypeError: an event is not a ``(step, scalars)`` pair, or as :meth:`log_scalars`.
        """
        events = check_events(events, "AimTracker.log_batch")
        self._track(self._require_open(), events)

    def _track(self, run: Any, events: list[tuple[int, dict[str, float]]]) -> None:
        """Write checked events to ``run``: one rocksdb write per store, and directly where aim's layout was confirmed.

        aim's ``Run.track`` writes every value of every event with a write of its own to its
        key-value store, about 25 store operations per scalar. Here they are gathered into one
        write per store (:meth:`_one_write`), and once a metric's first values are in, its
        values are written as the few puts that change the store (``DirectScalars``: aim's
        keys and encodings, checked against aim's own writes on the first event it could take).
        With ``system_metrics=True`` aim's sampling thread also writes to the run, so the
        events are tracked one by one by aim.
        """
        with self._one_write(run) as batches:
            if batches is not None and self._direct is not None:
                self._direct.write(events, lambda store: batches[id(store)])
                return
            for step, scalars in events:
                if scalars:
                    run.track(scalars, step=step)

    @contextlib.contextmanager
    def _one_write(self, run: Any) -> Iterator[dict[int, Any] | None]:
        """Gather aim's writes to the run's stores into one rocksdb batch each, written on exit.

        aim's ``Run.track`` only writes (it never reads what it wrote), and every write goes
        through its store's ``batch()`` and ``commit()``: inside this context those return
        one shared batch and do nothing, and on exit each store commits its batch, also
        when tracking raised (what was tracked before the error is kept, as without the
        batch). Yields the batches by ``id`` of their store, or None where aim's stores are
        not the ones this relies on (another aim version), or another thread may write, and
        the writes stay aim's own.
        """
        stores = self._stores(run)
        if not stores:
            yield None
            return
        batches = [store.batch() for store in stores]
        for store, batch in zip(stores, batches, strict=True):
            store.batch, store.commit = (lambda batch=batch: batch), _discard
        try:
            yield {id(store): batch for store, batch in zip(stores, batches, strict=True)}
        finally:
            for store in stores:
                del store.batch, store.commit  # aim's own methods again
            for store, batch in zip(stores, batches, strict=True):
                store.commit(batch)

    def _stores(self, run: Any) -> list[Any]:
        return [] if self.system_metrics else _rocks_stores(run)

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Merge ``hparams`` into the run's ``run["hparams"]`` (top-level keys replaced)."""
        hparams = check_hparams(hparams, "AimTracker.log_hparams: hparams")
        run = self._require_open()
        run["hparams"] = {**(run.get("hparams") or {}), **hparams}

    def close(self) -> None:
        """Close the run (releasing its lock) and index it so aim's SDK and UI can read it at once."""
        if self._run is None:
            return
        run, self._run, self._direct = self._run, None, None
        run_hash = run.hash
        run.close()
        repo = self._aim.Repo.from_path(os.path.abspath(self.repo))
        self._aim.sdk.index_manager.RepoIndexManager.get_index_manager(repo).index(run_hash)

    def _require_open(self) -> Any:
        if self._run is None:
            raise RuntimeError(f"{self!r} has no open run: call open() first")
        return self._run
