"""Tracking: send a run's scalars and hyperparameters to aim, CSV or JSONL files, several at once.

A :class:`Tracker` records one run at a time: ``open(run_id)`` (``""`` starts a new run and
returns its id; an id continues that run), ``log_scalars(step, {name: value})`` once per
logging event with the optimizer-update count as ``step``, ``log_hparams``, ``close``.
:class:`AimTracker` writes an embedded aim repository (no server; ``aim up --repo <dir>``
shows it); :class:`CSVTracker` and :class:`JSONLTracker` need nothing. :class:`Trackers`
feeds several from a background thread, so logging costs the training loop a few µs, and
disables (with one :class:`TrackerWarning`) any tracker that fails. :func:`default_trackers`
is aim plus JSONL. Importing fnlight never imports aim. See ``docs/tracking.md``.

>>> import tempfile
>>> from fnlight.tracking import JSONLTracker, Trackers, read_scalars
>>> with tempfile.TemporaryDirectory() as d:
...     with Trackers(JSONLTracker(d)) as trackers:
...         run_id = trackers.open(hparams={"lr": 1e-3})
...         trackers.log_scalars(10, {"loss": 0.5, "lr": 1e-3})
...     read_scalars(f"{d}/{run_id}.jsonl")
{'loss': [(10, 0.5)], 'lr': [(10, 0.001)]}
"""

from ._aim import AimTracker
from ._base import Tracker, TrackerWarning
from ._files import CSVTracker, JSONLTracker, read_scalars
from ._process import ProcessTrackers
from ._trackers import Trackers, default_trackers

__all__ = [
    "AimTracker",
    "CSVTracker",
    "JSONLTracker",
    "ProcessTrackers",
    "Tracker",
    "TrackerWarning",
    "Trackers",
    "default_trackers",
    "read_scalars",
]
