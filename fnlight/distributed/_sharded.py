"""Sharded checkpoints: one checkpoint file per rank in a directory, restorable on any number of ranks.

Every rank writes its own part of the state (a ``DTensor`` leaf as its local shard) as an
ordinary fnlight checkpoint file ``rank-<r>-of-<world>.ckpt``, with the row range of each
sharded leaf in the file's metadata. Restoring reads, for each leaf of the target, the rows
the target needs from whichever files hold them: a directory written by 2 ranks restores on 1
(whole tensors) or on 4, a single-file checkpoint restores into a sharded state, and every
byte read is checked against its CRC-32 as in :func:`fnlight.checkpoint.restore`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, TypeVar

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from ..checkpoint import FORMAT_VERSION, CheckpointError, CheckpointMismatchError, save
from ..checkpoint._format import DTYPE_NAMES, TensorEntry
from ..checkpoint._io import _read_index, _read_tensor
from ..checkpoint._leaves import flatten, kind_of, path_str
from ._group import dist_info

__all__ = ["is_checkpoint_dir", "is_sharded", "read_sharded_metadata", "restore_sharded", "save_sharded"]

SHARDS_KEY = "fnlight_shards"
PathLike = str | os.PathLike[str]
T = TypeVar("T")


def _dtensor_type() -> Any:
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(tree: Any) -> bool:
    """Whether ``tree`` holds a ``DTensor`` leaf (a state trained under :func:`with_fsdp`).

    >>> import torch, fnlight as fl
    >>> from fnlight.distributed import is_sharded
    >>> is_sharded(fl.make_train_step(torch.nn.Linear(2, 1), fl.losses.mse, fl.optim.sgd(0.1)).init())
    False
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None:
        return False
    return any(isinstance(leaf, dtensor) for leaf in optree.tree_leaves(tree, namespace="fnlight"))


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of ``n`` that ``Shard(0)`` gives ``rank`` (``torch.chunk`` split)."""
    chunk = -(-n // world) if n else 0
    return min(rank * chunk, n), min((rank + 1) * chunk, n)


def _is_row_sharded(t: Any, dtensor: Any, where: str) -> bool:
    if dtensor is None or not isinstance(t, dtensor):
        return False
    placements = t.placements
    p = placements[0] if len(placements) == 1 else None
    if p is None or not (p.is_replicate() or (p.is_shard() and p.dim == 0)):
        raise ValueError(
            f"{where}: sharded checkpoints support DTensors on a 1-D mesh, sharded on dim 0 or replicated; "
            f"got placements {placements}"
        )
    return p.is_shard()


def _shard_file(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.ckpt"


def is_checkpoint_dir(path: PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_sharded`.

    >>> import tempfile, torch
    >>> from fnlight.checkpoint import save
    >>> from fnlight.distributed import is_checkpoint_dir, save_sharded
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_sharded(f"{d}/sharded", {"w": torch.ones(2)})
    ...     save(f"{d}/single.ckpt", {"w": torch.ones(2)})
    ...     is_checkpoint_dir(f"{d}/sharded"), is_checkpoint_dir(f"{d}/single.ckpt"), is_checkpoint_dir(d)
    (True, False, False)
    """
    p = Path(path)
    return p.is_dir() and any(name.startswith("rank-") and name.endswith(".ckpt") for name in os.listdir(p))


def save_sharded(path: PathLike, tree: Any, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``tree`` as a sharded checkpoint directory: every rank writes its own file (collective).

    Call it on every rank at the same point. ``DTensor`` leaves are written as their local
    shards, every other leaf as it is (rank 0's copy is the one restored). The files are
    written into ``<path>.partial``; after a barrier rank 0 renames it to ``path`` (replacing
    an older directory there), so a crash leaves the previous checkpoint or the new one, never
    a mix. In a single process this writes a directory with one file.

    Args:
        path: the directory to create.
        tree: a pytree (e.g. a :class:`~fnlight.TrainState` trained under :func:`fnlight.with_fsdp`).
        metadata: a JSON-like dict, read back by :func:`read_sharded_metadata`.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: a DTensor sharded other than on dim 0 of a 1-D mesh.
        OSError: a file cannot be written (the previous checkpoint at ``path`` is left intact).

    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_sharded(f"{d}/c", {"w": torch.arange(4.0)})
    ...     sorted(os.listdir(f"{d}/c")), restore_sharded(f"{d}/c", {"w": torch.zeros(4)})
    (['rank-00000-of-00001.ckpt'], {'w': tensor([0., 1., 2., 3.])})
    """
    info = dist_info()
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    dtensor = _dtensor_type()
    rows: dict[str, list[int]] = {}
    pairs, spec = flatten(tree)
    local = []
    for key, leaf in pairs:
        if _is_row_sharded(leaf, dtensor, f"save_sharded: {path_str(key)}"):
            start, stop = _rows(leaf.shape[0], info.rank, info.world_size)
            shard = leaf.to_local()
            if shard.shape[0] != stop - start:
                raise ValueError(f"save_sharded: {path_str(key)}: local shard has {shard.shape[0]} rows, expected {stop - start}")
            rows[path_str(key)] = [start, leaf.shape[0]]
            local.append(shard)
        else:
            local.append(leaf.to_local() if dtensor is not None and isinstance(leaf, dtensor) else leaf)
    meta = {**(metadata or {}), SHARDS_KEY: {"rank": info.rank, "world_size": info.world_size, "rows": rows}}
    if info.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(info)
    save(partial / _shard_file(info.rank, info.world_size), optree.tree_unflatten(spec, local), metadata=meta)
    _barrier(info)
    if info.rank == 0:
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(partial, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, target)
    _barrier(info)
    return target


def _barrier(info: Any) -> None:
    if info.world_size > 1:
        dist.barrier()


class _Source:
    """One file of a checkpoint: its index, and per leaf the rows of the whole tensor it holds."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.where = f"checkpoint {file}"
        with open(file, "rb", buffering=0) as f:
            self.index = _read_index(f, self.where)
        self.entries = {path_str(e.path): e for e in self.index.entries}
        shards = self.index.metadata.get(SHARDS_KEY, {})
        self.rows: dict[str, list[int]] = shards.get("rows", {}) if isinstance(shards, dict) else {}

    def span(self, name: str) -> tuple[int, int, tuple[int, ...]]:
        """``(start, stop, whole shape)`` of the rows this file holds of the leaf ``name``."""
        entry = self.entries[name]
        assert isinstance(entry, TensorEntry)
        if name in self.rows:
            start, total = self.rows[name]
            return start, start + entry.shape[0], (total, *entry.shape[1:])
        return 0, entry.shape[0] if entry.shape else 1, entry.shape

    def read(self, name: str) -> Tensor:
        entry = self.entries[name]
        assert isinstance(entry, TensorEntry)
        with open(self.file, "rb", buffering=0) as f:
            f.seek(entry.offset)
            return _read_tensor(f, entry, self.where, torch.device("cpu"))


def _sources(path: Path) -> list[_Source]:
    if not path.exists():
        raise FileNotFoundError(f"restore_sharded: no checkpoint at {path}")
    if not path.is_dir():
        return [_Source(path)]
    files = sorted(n for n in os.listdir(path) if n.startswith("rank-") and n.endswith(".ckpt"))
    if not files:
        raise CheckpointError(f"restore_sharded: checkpoint {path}: the directory holds no rank-*-of-*.ckpt files")
    sources = [_Source(path / n) for n in files]
    worlds = {s.index.metadata.get(SHARDS_KEY, {}).get("world_size") for s in sources}
    if len(worlds) != 1 or len(sources) != next(iter(worlds)):
        raise CheckpointError(
            f"restore_sharded: checkpoint {path}: incomplete: {len(sources)} rank files "
            f"for a world size of {sorted(map(str, worlds))}"
        )
    return sources


def restore_sharded(path: PathLike, target: T) -> T:
    """Read a checkpoint (a :func:`save_sharded` directory or a single file) into a tree shaped like ``target``.

    Each tensor leaf of ``target`` gets the rows it needs: a ``DTensor`` sharded on dim 0 its
    own shard (for this rank), any other tensor the whole tensor, assembled from however many
    files the checkpoint has. Plain Python leaves come from the first file. ``target`` fixes
    the structure, dtypes and whole shapes, as in :func:`fnlight.checkpoint.restore`; it is not
    modified. Every tensor read is verified against its checksum.

    Args:
        path: the checkpoint directory or file.
        target: e.g. ``step.init()`` on the ranks (and world size) that will continue.

    Returns:
        A new tree with ``target``'s structure and the checkpoint's values.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointMismatchError: the checkpoint's leaves differ from ``target``'s (lists them all).
        CheckpointError: a damaged file, or a directory missing some rank's file.

    >>> import tempfile, torch
    >>> from fnlight.checkpoint import save
    >>> from fnlight.distributed import restore_sharded
    >>> with tempfile.TemporaryDirectory() as d:  # a single-file checkpoint reads as one rank's
    ...     save(f"{d}/last.ckpt", {"w": torch.arange(3.0), "lr": 0.1})
    ...     restore_sharded(f"{d}/last.ckpt", {"w": torch.empty(3, device="meta"), "lr": 0.0})
    {'w': tensor([0., 1., 2.]), 'lr': 0.1}
    """
    where = Path(path)
    sources = _sources(where)
    first = sources[0]
    dtensor = _dtensor_type()
    pairs, spec = flatten(target)
    _match(where, first, pairs, dtensor)
    out = []
    for key, leaf in pairs:
        name = path_str(key)
        if not isinstance(leaf, Tensor):
            out.append(first.entries[name].value)  # type: ignore[union-attr]
            continue
        whole = tuple(leaf.shape)
        if _is_row_sharded(leaf, dtensor, f"restore_sharded: {name}"):
            start, stop = _rows(whole[0], leaf.device_mesh.get_local_rank(), leaf.device_mesh.size())
        else:
            start, stop = 0, whole[0] if whole else 1
        value = _assemble(sources, name, start, stop, whole, leaf.dtype)
        device = leaf.device if leaf.device.type != "meta" else torch.device("cpu")
        value = value.to(device) if device.type != "cpu" else value
        if dtensor is not None and isinstance(leaf, dtensor):
            value = dtensor.from_local(
                value, leaf.device_mesh, leaf.placements, run_check=False, shape=leaf.shape, stride=leaf.stride()
            )
        out.append(value)
    return optree.tree_unflatten(spec, out)


def _assemble(sources: list[_Source], name: str, start: int, stop: int, whole: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if not whole:  # a 0-d tensor: every file holds it whole
        return sources[0].read(name)
    out = torch.empty((stop - start, *whole[1:]), dtype=dtype)
    # Rows [start, stop) from the files in order of their first row: a sharded tensor's pieces are
    # disjoint, a replicated one (a BatchNorm statistic, an accumulation flag) is whole in every
    # file and is read once.
    filled = start
    for first_row, source in sorted(((source.span(name)[0], source) for source in sources), key=lambda p: p[0]):
        lo, hi = max(first_row, filled), min(source.span(name)[1], stop)
        if lo > filled:  # a gap: no file holds row `filled`
            break
        if lo >= hi:
            continue
        piece = source.read(name)
        out[lo - start : hi - start].copy_(piece[lo - first_row : hi - first_row])
        filled = hi
    if filled != stop:
        raise CheckpointError(
            f"restore_sharded: checkpoint {sources[0].file.parent}: rows [{start}, {stop}) of {name} are not all in the files"
        )
    return out


def _match(path: Path, first: _Source, pairs: list[tuple[Any, Any]], dtensor: Any) -> None:
    wanted = {path_str(k): leaf for k, leaf in pairs}
    missing = [n for n in wanted if n not in first.entries]
    unexpected = [n for n in first.entries if n not in wanted]
    mismatched = []
    for name, leaf in wanted.items():
        entry = first.entries.get(name)
        if entry is None:
            continue
        if isinstance(leaf, Tensor):
            expected = f"tensor {DTYPE_NAMES.get(leaf.dtype, str(leaf.dtype))}{list(leaf.shape)}"
            found = (
                f"tensor {DTYPE_NAMES[entry.dtype]}{list(first.span(name)[2])}"
                if isinstance(entry, TensorEntry)
                else kind_of(entry.value)
            )
        else:
            expected = kind_of(leaf)
            found = kind_of(entry.value) if not isinstance(entry, TensorEntry) else f"tensor {DTYPE_NAMES[entry.dtype]}"
        if expected != found:
            mismatched.append(f"{name}: expected {expected}, found {found}")
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, missing=missing, unexpected=unexpected, mismatched=mismatched)


def read_sharded_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata saved with a :func:`save_sharded` directory (rank 0's file) or a checkpoint file.

    Returns the same form as :func:`fnlight.checkpoint.read_metadata`, plus
    ``"world_size"``: how many ranks wrote it (1 for a single file).

    >>> import tempfile, torch
    >>> from fnlight.distributed import read_sharded_metadata, save_sharded
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_sharded(f"{d}/c", {"w": torch.ones(2)}, metadata={"epoch": 3})
    ...     info = read_sharded_metadata(f"{d}/c")
    >>> info["metadata"], info["world_size"]
    ({'epoch': 3}, 1)
    """
    sources = _sources(Path(path))
    meta = dict(sources[0].index.metadata)
    shards = meta.pop(SHARDS_KEY, {})
    return {
        "format_version": FORMAT_VERSION,
        "versions": sources[0].index.versions,
        "metadata": meta,
        "world_size": shards.get("world_size", 1) if isinstance(shards, dict) else 1,
    }
