"""Periodic checkpoints of the whole state, retention by recency and by a monitored metric, resume."""

from __future__ import annotations

import math
import os
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import optree
from torch import Tensor

from .._state import NAMESPACE, DataPosition, TrainState
from ..checkpoint import CheckpointError, CheckpointMismatchError, CheckpointWarning, read_metadata, restore, save
from ..distributed._group import dist_info
from ..distributed._sharded import is_sharded, read_sharded_metadata, restore_sharded, save_sharded
from ._accum import window_open
from ._base import Metrics, Transform

__all__ = ["CheckpointingState", "find_latest", "with_checkpointing"]

_NAME = re.compile(r"^step-(\d{9,})\.ckpt$")
# what a save killed before its rename leaves behind: fnlight.checkpoint.save's temporary file, the pointer's
_TEMPORARY = re.compile(r"^\.(step-\d{9,}\.ckpt\.[0-9a-f]{12}|latest)\.tmp$")
# a sharded save's directory before its rename, and the one it replaces (fnlight.distributed.save_sharded)
_TEMPORARY_DIR = re.compile(r"^step-\d{9,}\.ckpt\.(partial|old)$")
LATEST = "latest"


class CheckpointingState(NamedTuple):
    """The slot of :func:`with_checkpointing`.

    Fields:
        resumed_from: the checkpoint file this run was restored from ("" for a fresh start);
            retention never deletes it.
    """

    resumed_from: str


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / name) for name in os.listdir(directory) if (m := _NAME.match(name))]
    return sorted(found)


def _restore(path: Path, target: Any) -> Any:
    """A checkpoint file, or a sharded checkpoint directory, restored into ``target`` (sharded or not)."""
    return restore_sharded(path, target) if path.is_dir() or is_sharded(target) else restore(path, target)


def _read_metadata(path: Path) -> dict[str, Any]:
    return read_sharded_metadata(path) if path.is_dir() else read_metadata(path)


def _skipped(path: Path, error: BaseException) -> None:
    warnings.warn(
        f"skipped the damaged checkpoint {path} ({error}); resuming from an older one, or starting over if none is readable",
        CheckpointWarning,
        stacklevel=3,
    )


def find_latest(directory: str | os.PathLike[str], target: Any = None) -> Path | None:
    """The newest valid checkpoint in ``directory`` (``step-*.ckpt``), skipping damaged ones.

    A checkpoint is a file, or for a state sharded by :func:`fnlight.with_fsdp` a directory
    of per-rank files (see :func:`fnlight.distributed.save_sharded`).

    With ``target`` each candidate is fully restored into it (every checksum verified, the
    structure checked) and the first that succeeds is returned; without, a candidate is
    valid when its preamble, index and footer are intact. A readable checkpoint whose
    structure differs from ``target`` (another model, another chain of transforms) raises
    :class:`~fnlight.checkpoint.CheckpointMismatchError` rather than being skipped: silently
    starting over would overwrite that run's checkpoints. Each damaged checkpoint skipped is
    reported by a :class:`~fnlight.checkpoint.CheckpointWarning` naming it.

    Raises:
        CheckpointMismatchError: the newest readable checkpoint does not fit ``target``.

    Returns:
        The path, or ``None`` when there is no valid checkpoint (or no directory).

    >>> find_latest("/nonexistent") is None
    True
    """
    for _, path in reversed(_checkpoints(Path(directory))):
        try:
            _restore(path, target) if target is not None else _read_metadata(path)
        except CheckpointMismatchError:
            raise  # readable, but of another model or transform chain: resuming from an older one would be wrong
        except (CheckpointError, OSError) as e:
            _skipped(path, e)
            continue
        return path
    return None


def _cpu_copy(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, Tensor) else t, tree, namespace=NAMESPACE)


def _agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a time-based save must happen on all ranks at the same update)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(int(flag))
    dist.broadcast(t, src=0)
    return bool(t)


def _next_epoch(position: DataPosition) -> DataPosition:
    """The position the fold moves to after flushing an epoch: the next epoch's first batch (new tensors)."""
    return DataPosition(epoch=position.epoch + 1, batch=position.batch.new_zeros(()))


class Checkpointing(Transform):
    """See :func:`with_checkpointing`."""

    name = "with_checkpointing"
    slot = "checkpointing"

    def __init__(
        self,
        inner: Any,
        *,
        directory: Path,
        every: int | None,
        seconds: float | None,
        keep_last: int,
        keep_best: int,
        monitor: str | None,
        mode: str,
        async_write: bool,
        resume: bool,
    ) -> None:
        super().__init__(inner)
        self.directory, self.every, self.seconds = directory, every, seconds
        self.keep_last, self.keep_best, self.monitor, self.mode = keep_last, keep_best, monitor, mode
        self.async_write, self.resume = async_write, resume
        self._last_save = time.monotonic()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._unscored: int | None = None  # the update last saved without keep_best's monitor among its metrics
        self._warned = False  # an unscored checkpoint is reported once per transform, not at every save

    def init(self, **options: Any) -> TrainState:
        """The inner initial state — or, with ``resume``, the newest valid checkpoint restored into it."""
        state = super().init(**options)
        if not self.resume:
            found = _checkpoints(self.directory)
            if found and dist_info().rank == 0:
                warnings.warn(
                    f"with_checkpointing(resume=False): {self.directory} holds {len(found)} checkpoint(s) of an earlier "
                    f"run (the newest: {found[-1][1].name}); this run starts over and saves beside them, so retention "
                    "counts them among its newest and a later resume restores the newest of either run. Give a new "
                    "run a directory of its own, or remove them first.",
                    CheckpointWarning,
                    stacklevel=2,
                )
            return state
        info = dist_info()
        if info.world_size == 1:
            path = find_latest(self.directory, state)
            if path is None:
                return state
            return _restore(path, state).with_slot(self.slot, CheckpointingState(str(path)))
        return self._resume_on_every_rank(state, info.rank, info.world_size)

    def init_slot(self, state: TrainState) -> CheckpointingState:
        """A fresh start's slot: resumed from no checkpoint."""
        return CheckpointingState("")

    def _resume_on_every_rank(self, state: TrainState, rank: int, world: int) -> TrainState:
        """The newest checkpoint that every rank restores whole (checksums included): rank 0 lists the
        candidates, each rank tries the next one, and all move on together when any rank finds it damaged."""
        import torch
        import torch.distributed as dist

        from .._ranks import all_sum, collective

        listed = [[str(p) for _, p in reversed(_checkpoints(self.directory))] if rank == 0 else None]
        with collective("with_checkpointing resume"):
            dist.broadcast_object_list(listed, src=0)
        for candidate in listed[0] or []:
            restored, mismatch = None, None
            try:
                restored = _restore(Path(candidate), state)
            except CheckpointMismatchError as e:
                mismatch = e
            except (CheckpointError, OSError) as e:
                _skipped(Path(candidate), e)
            with collective("with_checkpointing resume"):
                ok, bad = all_sum(torch.tensor([float(restored is not None), float(mismatch is not None)], dtype=torch.float64))
            if bad:  # of another model or transform chain on some rank: every rank stops, none starts over
                raise mismatch or CheckpointMismatchError(
                    candidate,
                    missing=[],
                    unexpected=[],
                    mismatched=["<another rank's state>: the checkpoint does not fit that rank's step (see its error)"],
                )
            if int(ok) == world:
                return restored.with_slot(self.slot, CheckpointingState(candidate))  # type: ignore[union-attr]
        return state

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        before = int(state.step)
        new_state, metrics = self.inner(state, batch)
        self._maybe_save(new_state, metrics, before)
        return new_state, metrics

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        before = int(state.step)
        new_state, metrics = self.inner.flush(state)
        # the fold flushes once an epoch's batches are done and then moves to the next epoch; a checkpoint
        # written here records that move (so a resumed fold does not flush this epoch again: the epoch-end
        # evaluation and early-stopping check would count twice)
        position = _next_epoch(new_state.data)
        if int(new_state.step) != before:
            self._maybe_save(new_state, metrics, before, position=position)
        elif self._unscored == before and self.monitor in metrics:
            # the epoch's last update was saved before the epoch-end evaluation that gives keep_best its
            # score: write it again, scored (and past the evaluation, which a resumed fold then skips)
            self._save(new_state.replace(data=position), metrics, wait=not self.async_write)
        return new_state, metrics

    def save_now(self, state: TrainState, metrics: Metrics | None = None) -> Path:
        """Write a checkpoint of ``state`` now (synchronously) and apply retention; return its path.

        It waits for a write still in flight (``async_write``) and changes nothing else: the transforms
        inside keep running as they were (a tracker's window, its open runs), as after any other save.

        Under data parallelism with a replicated state (``with_ddp`` on several ranks), ``state``
        must not be inside a ``with_grad_accum`` window: each rank then holds partial gradients of
        its own, which a checkpoint (rank 0's state) cannot hold. Saves that ``with_checkpointing``
        makes itself, and preemption's, fall on updates.
        """
        world = dist_info().world_size
        if world > 1 and window_open(state) and not is_sharded(state):
            count = int(state.slots["grad_accum"].count)
            raise ValueError(
                f"with_checkpointing.save_now: expected a state between accumulation windows under data parallelism, "
                f"got a state {count} micro-batch{'es' if count != 1 else ''} into a with_grad_accum window on {world} "
                "ranks: each rank holds its own partial gradients, and a checkpoint holds rank 0's state only, so "
                "a run resumed from it would be wrong. Save after the window's update (with_checkpointing's own "
                "saves fall on updates), or use with_fsdp, whose windows are sharded and saved exactly"
            )
        self._wait()
        return self._save(state, metrics or {}, wait=True)

    def finish(self, state: TrainState) -> None:
        """Wait for a checkpoint still being written in the background (re-raising its error), then finish the inner chain."""
        self._wait()
        self._warn_unscored()
        finish = getattr(self.inner, "finish", None)
        if finish is not None:
            finish(state)

    def abort(self) -> None:
        """The fold stopped on an error: let a checkpoint being written in the background land, then abort the inner chain."""
        try:
            self._wait()
        finally:
            super().abort()

    def _wait(self) -> None:
        """Wait for the checkpoint being written in the background, if any, and re-raise its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _maybe_save(self, state: TrainState, metrics: Metrics, before: int, position: DataPosition | None = None) -> None:
        step = int(state.step)
        if step == before:
            return
        due = self.every is not None and step % self.every == 0
        if self.seconds is not None:
            late = time.monotonic() - self._last_save >= self.seconds
            due = due or (late if dist_info().world_size == 1 else _agree(late))
        if due:
            self._save(state if position is None else state.replace(data=position), metrics, wait=not self.async_write)

    def _warn_unscored(self) -> None:
        """Warn (the first time only) that a checkpoint was left without a score in keep_best's ranking."""
        if self._unscored is None:
            return
        step, self._unscored = self._unscored, None
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"with_checkpointing: the checkpoint of update {step} was saved without monitor={self.monitor!r} among "
            f"the step's metrics, so keep_best ranks it last; compute {self.monitor!r} on the updates that save "
            f"(e.g. with_eval(every=N) with the same N as every=N, or at_epoch_end=True with saves at epoch ends). "
            f"Said once: later checkpoints without it are not reported",
            RuntimeWarning,
            stacklevel=3,
        )

    def _score(self, step: int, path: Path, metrics: Metrics) -> float | None:
        """The monitor's value for the checkpoint of update ``step``: from ``metrics``, else the one it already has."""
        if self.monitor is None:
            return None
        if self.monitor in metrics:
            value = float(metrics[self.monitor])
            return None if math.isnan(value) else value  # NaN ranks worst; an infinity ranks by its sign
        if path.exists():  # the same update saved again (a preemption, an epoch's end): keep the score it has
            try:
                return _read_metadata(path).get("metadata", {}).get("value")
            except (CheckpointError, OSError):
                return None
        return None

    def _save(self, state: TrainState, metrics: Metrics, *, wait: bool) -> Path:
        if self.slot not in state.slots:  # a file without it would not fit step.init(): no run could resume from it
            raise ValueError(
                f"with_checkpointing: expected a state with the {self.slot!r} slot, got one with "
                f"{sorted(state.slots) or 'no slots'}; nothing was saved. Build the state with this step's init(), "
                f"or give it the slot: state.with_slot({self.slot!r}, step.init_slot(state))"
            )
        step = int(state.step)
        path = self.directory / f"step-{step:09d}.ckpt"
        self._wait()  # at most one write in flight: the file of this update may be the one being written
        if self._unscored is not None and self._unscored != step:
            self._warn_unscored()
        value = self._score(step, path, metrics)
        self._unscored = step if self.keep_best and value is None and self.monitor not in metrics else None
        metadata = {"step": step, "epoch": int(state.data.epoch), "monitor": self.monitor, "value": value}
        self._last_save = time.monotonic()
        info = dist_info()
        if info.world_size > 1 and is_sharded(state):  # every rank writes its shards, together
            save_sharded(path, state, metadata=metadata)
            if info.rank == 0:
                self._commit(path, state)
            return path
        if info.rank != 0:  # replicated state: rank 0 writes it for everyone
            return path
        if wait:
            self._write(path, state, metadata)
            return path
        snapshot = _cpu_copy(state)  # one snapshot in flight at most (waited for above): bounded extra memory

        def run() -> None:
            try:
                self._write(path, snapshot, metadata)
            except BaseException as e:  # surfaced by finish()
                self._error = e

        # not a daemon: an exception that ends the script (or the end of a hand-written loop that never calls
        # finish()) still lets the write complete before the interpreter exits, instead of losing the checkpoint
        self._writer = threading.Thread(target=run, name="fnlight-checkpoint", daemon=False)
        self._writer.start()
        return path

    def _write(self, path: Path, state: TrainState, metadata: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        save(path, state, metadata=metadata)
        self._commit(path, state)

    def _commit(self, path: Path, state: TrainState) -> None:
        """Point ``latest`` at ``path`` and apply retention."""
        pointer = self.directory / f".{LATEST}.tmp"
        pointer.write_text(path.name + "\n")
        os.replace(pointer, self.directory / LATEST)
        self._prune(keep={path, Path(state.slots[self.slot].resumed_from)})

    def _prune(self, keep: set[Path]) -> None:
        found = _checkpoints(self.directory)
        kept = {p for _, p in found[-self.keep_last :]} if self.keep_last else set()
        if self.keep_best and self.monitor is not None:
            sign = 1.0 if self.mode == "min" else -1.0
            scored = []
            for step, p in found:
                try:
                    value = _read_metadata(p).get("metadata", {}).get("value")
                except (CheckpointError, OSError):
                    continue
                scored.append((math.inf if value is None else sign * value, -step, p))
            kept |= {p for *_, p in sorted(scored)[: self.keep_best]}
        for _, p in found:
            if p not in kept and p not in keep:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        # partial files of saves that a hard kill (SIGKILL, OOM, power loss) stopped before their rename;
        # this run writes one checkpoint at a time and has just committed it, so none of these is in flight
        for name in os.listdir(self.directory):
            if _TEMPORARY.match(name):
                (self.directory / name).unlink(missing_ok=True)
            elif _TEMPORARY_DIR.match(name):
                shutil.rmtree(self.directory / name, ignore_errors=True)


def with_checkpointing(
    step: Any,
    *,
    directory: str | os.PathLike[str],
    every: int | None = None,
    seconds: float | None = None,
    keep_last: int = 1,
    keep_best: int = 0,
    monitor: str | None = None,
    mode: str = "min",
    async_write: bool = False,
    resume: bool = True,
) -> Checkpointing:
    """Save the whole state every N optimizer updates and/or T seconds; resume from the newest valid one.

    Files are ``directory/step-<update>.ckpt`` in fnlight's checkpoint format (atomic writes,
    checksums), and ``directory/latest`` names the newest. Everything needed to continue is
    in them: parameters, buffers, optimizer state, step, seed, data position, every
    transform's slot. With ``resume`` (default), ``step.init()`` restores the newest valid
    checkpoint in ``directory`` (damaged files are skipped) — so resuming a run is running
    the same script again. On SIGTERM/SIGINT the fold saves through this transform and exits
    (see :func:`fnlight.fold`).

    Retention keeps the ``keep_last`` newest, plus the ``keep_best`` best by the ``monitor``
    metric of the saving step (``mode`` ``"min"`` or ``"max"``; NaN counts as worst, an
    infinity by its sign), and never deletes the checkpoint the run resumed from. After each
    save it also removes the partial files that a save stopped by a hard kill left behind.

    Args:
        step: the step to wrap (outermost; see docs/transforms.md).
        directory: where checkpoints go (created on first save).
        every: save after every N-th optimizer update.
        seconds: save after an update when T seconds have passed since the last save.
        keep_last: how many of the newest to keep (>= 1).
        keep_best: how many of the best by ``monitor`` to keep as well.
        monitor: a metric name of the step (needed for ``keep_best``).
        mode: ``"min"`` or ``"max"``: which ``monitor`` values are better.
        async_write: copy the state to CPU memory and write in a background thread; at
            most one write is in flight (extra memory: one CPU copy of the state).
        resume: restore the newest valid checkpoint in ``init``. ``False`` starts over (a
            :class:`~fnlight.checkpoint.CheckpointWarning` when ``directory`` holds checkpoints already).

    Returns:
        The wrapped step.

    Raises:
        ValueError, TypeError: bad options (neither ``every`` nor ``seconds``, ``keep_best``
            without ``monitor``, ...), or a wrong composition order.

    >>> import os, tempfile, torch, fnlight as fl
    >>> core = fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     step = fl.with_checkpointing(core, directory=d, every=2)
    ...     state = fl.fold(step, step.init(), [(torch.ones(4, 2), torch.zeros(4, 1))] * 5, progress=False)
    ...     resumed = step.init()
    ...     int(resumed.step), sorted(os.listdir(d))
    (4, ['latest', 'step-000000004.ckpt'])
    """
    where = "with_checkpointing"
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{where}: directory must be a path, got {directory!r}")
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"{where}: directory {os.fspath(directory)!r} exists and is not a directory")
    for flag, value in (("async_write", async_write), ("resume", resume)):
        if not isinstance(value, bool):
            raise TypeError(f"{where}: {flag} must be a bool, got {value!r}")
    if every is None and seconds is None:
        raise ValueError(f"{where}: give every=N (optimizer updates) and/or seconds=T")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"{where}: every must be an int >= 1, got {every!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0):
        raise ValueError(f"{where}: seconds must be a positive number, got {seconds!r}")
    for name, value, low in (("keep_last", keep_last, 1), ("keep_best", keep_best, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    if keep_best and monitor is None:
        raise ValueError(f"{where}: keep_best={keep_best} needs monitor=<metric name>")
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(f"{where}: monitor must be a metric name (str), got {monitor!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"{where}: mode must be 'min' or 'max', got {mode!r}")
    return Checkpointing(
        step,
        directory=Path(directory),
        every=every,
        seconds=seconds,
        keep_last=keep_last,
        keep_best=keep_best,
        monitor=monitor,
        mode=mode,
        async_write=async_write,
        resume=resume,
    )
