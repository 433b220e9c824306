"""The tracker role, the warning a failing tracker raises, and the checks every tracker shares."""

from __future__ import annotations

import math
import operator
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["Tracker", "TrackerWarning"]

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HPARAM_LEAVES = (type(None), bool, int, float, str)


@runtime_checkable
class Tracker(Protocol):
    """Where scalars and hyperparameters of a run go: aim, a CSV or JSONL file, several at once.

    A tracker records one *run* at a time. The training loop calls :meth:`open` once (lazily,
    at the first logging event), then :meth:`log_scalars` once per logging event with the
    optimizer-update count as ``step``, and :meth:`close` at the end. The id :meth:`open`
    returns is stored in the training state, so a resumed run calls ``open(run_id)`` with it
    and continues the same run. Trackers are not thread-safe: call one from one thread
    (:class:`Trackers` runs them on its own background thread).

    Any object with these four methods is a tracker; :class:`CSVTracker`,
    :class:`JSONLTracker` and :class:`AimTracker` are the built-in ones. A tracker may also
    have ``log_batch(events)``, taking a list of ``(step, scalars)`` pairs in order: when it
    has, :class:`Trackers` and :class:`ProcessTrackers` hand it each batch of events in one
    call (the built-in trackers then write a batch at once: one flush of the file, one aim
    write batch), and call :meth:`log_scalars` per event otherwise.

    >>> import tempfile
    >>> from fnlight.tracking import JSONLTracker, Tracker
    >>> with tempfile.TemporaryDirectory() as d:
    ...     isinstance(JSONLTracker(d), Tracker)
    True
    """

    def open(self, run_id: str = "", *, hparams: Mapping[str, Any] | None = None) -> str:
        """Start a new run (``run_id=""``) or reopen ``run_id`` to continue it; return the run id.

        A tracker given an id it has never seen either starts a run under that id (the file
        trackers) or raises (:class:`AimTracker`, whose ids are aim's run hashes).
        ``hparams`` is recorded as by :meth:`log_hparams`.
        """
        ...

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (name -> value) at ``step``, the optimizer-update count."""
        ...

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record hyperparameters; later calls update earlier ones key by key (top level)."""
        ...

    def close(self) -> None:
        """Flush and close the run. A closed tracker can :meth:`open` another run."""
        ...


class TrackerWarning(RuntimeWarning):
    """A tracker raised and was disabled for the rest of the run; training and the other trackers go on.

    Emitted once per failing tracker by :class:`Trackers`, on the thread that calls it. Silence
    it with ``warnings.simplefilter("ignore", fnlight.tracking.TrackerWarning)``, or turn it
    into an error with ``"error"`` to stop on the first tracker failure.

    >>> issubclass(TrackerWarning, RuntimeWarning)
    True
    """


def new_run_id() -> str:
    """A fresh run id: local date and time, then 6 random hex digits (``20250131-142501-9f3a2c``)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def check_run_id(run_id: Any, where: str) -> str:
    if not isinstance(run_id, str):
        raise TypeError(f"{where}: run_id must be a str ('' for a new run), got {type(run_id).__name__}: {run_id!r}")
    if run_id and not _RUN_ID.match(run_id):
        raise ValueError(
            f"{where}: run_id must be '' (a new run) or letters, digits, '.', '_' and '-' (1-128, not starting with "
            f"'.', '_' or '-'), got {run_id!r}"
        )
    return run_id


def check_step(step: Any, where: str) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise TypeError(f"{where}: step must be an int (the optimizer-update count), got {type(step).__name__}: {step!r}")
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"{where}: step must be >= 0 (the optimizer-update count), got {step}")
    return step


def check_events(events: Any, where: str) -> list[tuple[int, dict[str, float]]]:
    """``events`` (an iterable of ``(step, scalars)`` pairs) as a list of checked pairs."""
    if isinstance(events, (str, bytes, Mapping)) or not hasattr(events, "__iter__"):
        raise TypeError(f"{where}: events must be an iterable of (step, scalars) pairs, got {type(events).__name__}: {events!r}")
    out = []
    for i, event in enumerate(events):
        if not isinstance(event, tuple | list) or len(event) != 2:
            raise TypeError(f"{where}: event {i} must be a (step, scalars) pair, got {type(event).__name__}: {event!r}")
        out.append((check_step(event[0], where), check_scalars(event[1], where)))
    return out


def check_flush_every(flush_every: Any, where: str) -> float:
    """``flush_every`` (seconds an event may wait before it is sent on) as a float > 0."""
    if isinstance(flush_every, bool) or not isinstance(flush_every, (int, float)):
        raise TypeError(f"{where}: flush_every must be a number of seconds, got {flush_every!r}")
    if not (math.isfinite(flush_every) and flush_every > 0):
        raise ValueError(f"{where}: flush_every must be a finite number of seconds above 0, got {flush_every!r}")
    return float(flush_every)


def check_scalars(scalars: Any, where: str) -> dict[str, float]:
    """A copy of ``scalars`` as ``{str: float}``; NaN and infinities pass through unchanged."""
    if not isinstance(scalars, Mapping):
        raise TypeError(f"{where}: scalars must be a mapping of name -> number, got {type(scalars).__name__}: {scalars!r}")
    out: dict[str, float] = {}
    for name, value in scalars.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: scalar names must be non-empty str, got {name!r}")
        if type(value) is float:
            out[name] = value
            continue
        if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__float__"):
            raise TypeError(
                f"{where}: scalar {name!r} must be a real number (int, float, numpy scalar or 0-d tensor), "
                f"got {type(value).__name__}: {value!r}"
            )
        try:
            out[name] = float(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # (an int beyond any float: OverflowError)
            raise TypeError(f"{where}: scalar {name!r} cannot be converted to float ({e}); got {value!r}") from None
    return out


def check_hparams(hparams: Any, path: str = "hparams") -> dict[str, Any]:
    """A deep copy of ``hparams`` made of dicts with str keys, lists, and None/bool/int/float/str leaves."""
    if not isinstance(hparams, Mapping):
        raise TypeError(f"{path} must be a mapping of str -> value, got {type(hparams).__name__}: {hparams!r}")
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{path}: keys must be non-empty str, got {key!r}")
        out[str.__str__(key)] = _check_hparam(value, f"{path}[{key!r}]")  # a str subclass's key as a plain str
    return out


def _check_hparam(value: Any, path: str) -> Any:
    if isinstance(value, _HPARAM_LEAVES):
        # subclasses (an IntEnum or StrEnum member, a numpy float64) as the plain value: aim refuses them (a StrEnum's
        # "Expected unicode"), and a subclass's int escaped the int64 check
        if value is None or type(value) is bool:
            return value
        if isinstance(value, float):
            value = float.__float__(value)
            if not math.isfinite(value):
                raise ValueError(f"{path} is {value!r}: hyperparameters must be finite (JSON has no NaN or infinity)")
            return value
        if isinstance(value, int):
            value = int.__int__(value)
            if not -(2**63) <= value < 2**63:  # aim stores int64: the run would be lost
                raise ValueError(
                    f"{path} is {value!r}, outside int64 [-2**63, 2**63), which aim cannot store; log it as str(value)"
                )
            return value
        return str.__str__(value)
    if isinstance(value, Mapping):
        return check_hparams(value, path)
    if isinstance(value, (list, tuple)):
        return [_check_hparam(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{path} is a {type(value).__name__} ({value!r}): hyperparameters must be None, bool, int, float, str, "
        f"or lists and dicts of those; convert it first (e.g. str(value) or value.item())"
    )
