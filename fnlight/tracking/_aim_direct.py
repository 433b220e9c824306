"""aim's scalar tracking written straight into its key-value stores: aim's data, a fraction of its work.

aim's ``Run.track`` stores each value of a metric with four array writes (value, step, epoch,
time) and two or more metadata writes (``last``, ``last_step``, ``max``, ``min``), and each
write is a rocksdb range delete, a blob delete and a put: about 25 store operations and 60 µs
of Python per scalar, and range tombstones that rocksdb's compactions then work through. For
a float metric whose sequence aim has already set up, every one of those operations but the
puts deletes nothing (the keys are leaves that hold scalars), and only the last of a batch's
metadata writes survives it. :class:`DirectScalars` writes just those puts.

It trusts nothing about the installed aim's layout: the first event it could write is given
to aim's own ``Run.track``, whose operations are recorded; it writes the same event its own
way and compares what each leaves in an empty store. Only when both leave the same keys and
values (the event's time excepted, which each reads from the clock) does it write later events
itself; otherwise every event stays aim's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DirectScalars"]

_META = ("last", "last_step", "max", "min")  # a float metric's records in the run's metadata that its values move


class _Recorder:
    """Stands in for a rocksdb write batch: keeps the operations, to compare and then replay them."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[tuple[str, bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append(("put", key, value))

    def delete(self, key: bytes) -> None:
        self.ops.append(("delete", key, None))

    def delete_range(self, begin: bytes, end: bytes) -> None:
        self.ops.append(("range", begin, end))

    def replay(self, batch: Any) -> None:
        for op, a, b in self.ops:
            if op == "put":
                batch.put(a, b)
            elif op == "delete":
                batch.delete(a)
            else:
                batch.delete_range(a, b)

    def contents(self) -> dict[bytes, bytes]:
        """What these operations leave in an empty store."""
        out: dict[bytes, bytes] = {}
        for op, a, b in self.ops:
            if op == "put":
                out[a] = b  # type: ignore[assignment]
            elif op == "delete":
                out.pop(a, None)
            else:
                for k in [k for k in out if a <= k < b]:  # type: ignore[operator]
                    del out[k]
        return out


class _Sequence:
    """One float metric: its keys (absolute, in its stores) and aim's in-memory record of it."""

    __slots__ = ("epoch", "info", "last", "max", "meta", "min", "step", "store", "time", "val")

    def __init__(self, info: Any, store: Any, arrays: tuple[bytes, ...], meta: tuple[bytes, ...]) -> None:
        self.info, self.store = info, store
        self.val, self.epoch, self.time, self.step = arrays
        self.meta = meta  # the keys of last, last_step, max and min
        self.last: tuple[float, int] | None = None  # what the batch's end writes: the last value, if it moved
        self.max = self.min = False


class DirectScalars:
    """Write ``(step, {name: float})`` events into an open aim run as ``Run.track`` does (see the module)."""

    def __init__(self, run: Any, stores: Iterable[Any]) -> None:
        from aim.storage import encoding
        from aim.storage.context import Context
        from aim.storage.rockscontainer import RocksContainer

        tracker = run._tracker
        if run.read_only or run.repo.is_remote_repo or tracker._non_blocking:
            raise LookupError("aim writes this run itself (read-only, remote, or on its own tracking thread)")
        self._run, self._tracker, self._rocks = run, tracker, RocksContainer
        self._encode, self._decode, self._encode_path = encoding.encode, encoding.decode, encoding.encode_path
        self._none = encoding.encode(None)
        self._ctx = Context({})
        self._stores = {id(store) for store in stores}  # the stores whose batches write() is given
        self.meta_store, self._meta_prefix = self._absolute(run.meta_run_tree.container)
        if id(self.meta_store) not in self._stores:
            raise LookupError("the run's metadata store is not among the stores given")
        self._sequences: dict[str, _Sequence] = {}
        self.verified: bool | None = None  # None until an event was compared with aim's own writes

    @classmethod
    def build(cls, run: Any, stores: Iterable[Any]) -> DirectScalars | None:
        """A writer for ``run`` into ``stores``, or None where this aim's objects are not the ones it knows."""
        try:
            return cls(run, stores)
        except (ImportError, AttributeError, LookupError, TypeError):
            return None

    def _absolute(self, container: Any) -> tuple[Any, bytes]:
        """The rocksdb store under ``container`` (a chain of aim's prefix views) and the view's key prefix in it."""
        key = b""
        while not isinstance(container, self._rocks):
            key = container.absolute_path(key)
            container = container.parent
        return container, key

    def _sequence(self, name: str) -> _Sequence | None:
        """The float metric ``name`` (empty context) once aim has set it up and written to it; else None."""
        seq = self._sequences.get(name)
        if seq is not None:
            return seq
        tracker, ctx = self._tracker, self._ctx
        info = tracker.sequence_infos.get((ctx.idx, name))  # .get: the dict is a defaultdict
        if (
            info is None
            or not info.initialized
            or info.version != 2
            or info.dtype != "float"
            or info.step_view is None
            or not info.count
            or ctx not in tracker.contexts
        ):
            return None
        views = (info.val_view, info.epoch_view, info.time_view, info.step_view)
        stores, arrays = zip(*(self._absolute(v.tree.container) for v in views), strict=True)
        if any(s is not stores[0] for s in stores) or id(stores[0]) not in self._stores:
            return None
        meta = tuple(self._meta_prefix + self._encode_path(("traces", ctx.idx, name, k)) for k in _META)
        seq = self._sequences[name] = _Sequence(info, stores[0], arrays, meta)
        return seq

    def _step_key(self, seq: _Sequence, step: int) -> bytes:
        """The key of ``step``'s records under each of the metric's arrays (aim's hash of the step)."""
        return self._encode_path((seq.info.step_hash_fn(step),))

    def write(self, events: Iterable[tuple[int, Mapping[str, float]]], batch: Any) -> None:
        """Write checked events (float values) into ``batch(store)``, the write batch of each store."""
        run, sequence = self._run, self._sequence
        touched: dict[int, _Sequence] = {}
        try:
            for step, scalars in events:
                if not scalars:
                    continue
                if self.verified is not True:
                    if self.verified is None and all(sequence(name) is not None for name in scalars):
                        self._verify(step, scalars, batch)
                    else:
                        run.track(dict(scalars), step=step)
                    continue
                # in the event's order, as aim's would (an error in aim's part keeps what came before it):
                # metrics aim has not set up yet go to aim, which sets them up; the rest are written here
                now, mine, theirs = time.time(), [], {}
                for name, value in scalars.items():
                    seq = sequence(name)
                    if seq is None:
                        if mine:
                            self._put(step, mine, now, batch, touched)
                            mine = []
                        theirs[name] = value
                    else:
                        if theirs:
                            run.track(theirs, step=step)
                            theirs = {}
                        mine.append((seq, value))
                if theirs:
                    run.track(theirs, step=step)
                self._put(step, mine, now, batch, touched)
        finally:  # also after an error: the events written so far get their metadata, as aim's would have
            self._put_meta(touched.values(), batch)

    def _put(
        self, step: int, values: list[tuple[_Sequence, float]], now: float, batch: Any, touched: dict[int, _Sequence]
    ) -> None:
        """The event's four array entries per metric; the metadata it changes is noted for :meth:`_put_meta`."""
        encode, at, write, store = self._encode, None, None, None
        now_b, step_b, epoch_b = encode(now), encode(step), self._none
        for seq, value in values:
            info = seq.info
            if at is None:
                at = self._step_key(seq, step)  # every float metric hashes its steps alike
            if write is None or seq.store is not store:
                store = seq.store
                write = batch(store).put
            write(seq.val + at, encode(value))
            write(seq.epoch + at, epoch_b)
            write(seq.time + at, now_b)
            write(seq.step + at, step_b)
            if step >= info.count:  # as aim: a step below the last one (a rerun after resume) leaves last alone
                info.count = step + 1
                seq.last = (value, step)
            if value > info.max:
                info.max, seq.max = value, True
            if value < info.min:
                info.min, seq.min = value, True
            touched[id(seq)] = seq

    def _put_meta(self, sequences: Iterable[_Sequence], batch: Any) -> None:
        """Each touched metric's last, last_step, max and min: once per batch, the values it ended with."""
        encode, write = self._encode, None
        for seq in sequences:
            if write is None:
                write = batch(self.meta_store).put
            last, last_step, max_key, min_key = seq.meta
            if seq.last is not None:
                write(last, encode(seq.last[0]))
                write(last_step, encode(seq.last[1]))
            if seq.max:
                write(max_key, encode(seq.info.max))
            if seq.min:
                write(min_key, encode(seq.info.min))
            seq.last, seq.max, seq.min = None, False, False

    def _verify(self, step: int, scalars: Mapping[str, float], batch: Any) -> None:
        """Track one event with aim's ``Run.track``, recording its operations; write it directly too, and compare.

        aim's operations go into the batches as recorded; the direct ones are only compared.
        """
        seqs = [self._sequences[name] for name in scalars]  # write() found each of them set up
        stores = {id(s.store): s.store for s in seqs} | {id(self.meta_store): self.meta_store}
        before = _records(seqs)
        theirs = {key: _Recorder() for key in stores}
        originals = {key: store.batch for key, store in stores.items()}
        for key, store in stores.items():
            store.batch = lambda recorder=theirs[key]: recorder
        try:
            self._run.track(dict(scalars), step=step)
        finally:
            for key, store in stores.items():
                store.batch = originals[key]
                theirs[key].replay(batch(store))
        after = _records(seqs)
        first = seqs[0]
        stamp = theirs[id(first.store)].contents().get(first.time + self._step_key(first, step))
        if stamp is None:  # aim put the event's time elsewhere: another layout
            self.verified = False
            return
        _restore(seqs, before)
        mine = {key: _Recorder() for key in stores}
        self._put(step, list(zip(seqs, scalars.values(), strict=True)), self._decode(stamp), lambda s: mine[id(s)], {})
        self._put_meta(seqs, lambda s: mine[id(s)])
        self.verified = _records(seqs) == after and all(mine[key].contents() == theirs[key].contents() for key in stores)
        _restore(seqs, after)


def _records(seqs: list[_Sequence]) -> list[tuple[int, float, float]]:
    """What aim keeps in memory about each metric: the next step, the largest and the smallest value."""
    return [(s.info.count, s.info.max, s.info.min) for s in seqs]


def _restore(seqs: list[_Sequence], records: list[tuple[int, float, float]]) -> None:
    for s, (count, high, low) in zip(seqs, records, strict=True):
        s.info.count, s.info.max, s.info.min = count, high, low
