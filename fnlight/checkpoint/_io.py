"""Streaming, atomic ``save`` and checked ``restore``/``read_metadata`` over the version-1 layout."""

from __future__ import annotations

import dataclasses
import os
import platform
import secrets
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import optree
import torch
from torch import Tensor

from .._donation import check_live
from ._errors import CheckpointError, CheckpointMismatchError
from ._format import (
    DTYPE_NAMES,
    FOOTER_SIZE,
    FORMAT_VERSION,
    PREAMBLE_SIZE,
    Index,
    TensorEntry,
    ValueEntry,
    align,
    decode_index,
    encode_index,
    footer,
    parse_footer,
    parse_preamble,
    preamble,
)
from ._leaves import KeyPath, check_metadata, check_plain, check_tensor, flatten, kind_of, path_str
from ._native import drop_cached_pages
from ._stream import Checksummer, Writer, byte_view, empty_like_entry, read_into

__all__ = ["read_metadata", "restore", "save"]

T = TypeVar("T")
PathLike = str | os.PathLike[str]


def save(path: PathLike, tree: Any, *, metadata: dict[str, Any] | None = None) -> None:
    """Write ``tree`` to a checkpoint file at ``path``, atomically and without pickle.

    Tensor bytes are streamed straight from each tensor's storage (a contiguous CPU copy is
    made, 16 MiB at a time, only for non-contiguous or non-CPU tensors), checksummed while
    they are written, then the msgpack index and the footer follow. The file is written
    under a temporary name in the same directory, fsynced, renamed over ``path``, and the
    directory is fsynced: a crash leaves either the old file or the new one, never a mix.

    Args:
        path: the file to write (its directory must exist); an existing file there is replaced.
        tree: any pytree in the ``fnlight`` namespace (a :class:`~fnlight.TrainState`, dicts,
            lists...) whose leaves are tensors or plain ``None``/``bool``/``int``/``float``/``str``.
        metadata: a JSON-like dict stored in the index, read back by :func:`read_metadata`.

    Raises:
        TypeError: an unsupported leaf (the message gives its path), or metadata that is not
            JSON-like (the message gives the key path).
        ValueError: an int outside 64 bits, metadata nested deeper than 64 levels, a string that is
            not valid UTF-8, an index over its limits (64 MiB, 4 million maps and lists), or a ``path``
            with no file name (empty, or ending with a separator).
        IsADirectoryError: ``path`` is a directory.
        FileNotFoundError: the directory of ``path`` does not exist.
        OSError: the file cannot be written (the previous file at ``path`` is left intact).

    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(f"{d}/a.ckpt", {"w": torch.ones(2), "lr": 0.1}, metadata={"epoch": 3})
    ...     print(read_metadata(f"{d}/a.ckpt")["metadata"])
    {'epoch': 3}
    """
    check_live(tree, "checkpoint.save")  # a donated state's tensors hold a later step's values
    metadata = {} if metadata is None else metadata
    check_metadata(metadata)
    plan, end = _plan(tree)
    versions = _library_versions()
    placeholders = [dataclasses.replace(e, crc32=0xFFFFFFFF) if isinstance(e, TensorEntry) else e for e, _ in plan]
    encode_index(placeholders, metadata=metadata, versions=versions)  # the limits, checked before any byte is written
    target = os.fsdecode(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"checkpoint: {target} is a directory; save needs a file path")
    directory, name = os.path.split(target)  # not abspath: it would resolve "link/.." by name, not as the file system does
    if not name:
        raise ValueError(f"checkpoint: save needs a file path, got {target!r} (no file name: empty, or ending with a separator)")
    if not os.path.isdir(directory or "."):
        raise FileNotFoundError(f"checkpoint: the directory {directory!r} to save {name!r} in does not exist; create it first")

    def write(w: Writer) -> None:
        w.write(preamble())
        with Checksummer() as checksums:
            for entry, leaf in plan:
                _write_leaf(w, entry, leaf, checksums)
            crcs = checksums.crcs()
        entries = [dataclasses.replace(e, crc32=crcs[e.path]) if isinstance(e, TensorEntry) else e for e, _ in plan]
        raw_index = encode_index(entries, metadata=metadata, versions=versions)
        index_offset = align(end)
        w.write(bytes(index_offset - end))
        w.write(raw_index)
        w.write(footer(index_offset, len(raw_index), zlib.crc32(raw_index)))

    _write_atomically(directory or ".", name, target, write)


def restore(path: PathLike, target: T) -> T:
    """Read a checkpoint into a new tree shaped like ``target``.

    ``target`` fixes what the file must contain: every leaf path, and per tensor its dtype and
    shape (per plain leaf its Python type). The result is ``target``'s treespec filled with the
    file's values, so static fields (such as ``TrainState.skeleton``) come from ``target``.
    Tensors are created on the target leaf's device (CPU for a ``meta`` target leaf, so a
    target on the meta device costs no memory), contiguous and not requiring grad, and
    ``target`` itself is not modified. The file
    is read once, front to back, straight into the new tensors; every byte is checked (the
    CRC-32s of large tensors on a worker thread, overlapping the reading).

    Args:
        path: the checkpoint file.
        target: a tree with the expected structure, e.g. ``step.init()``.

    Returns:
        A new tree with ``target``'s structure and the file's values.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointMismatchError: the file's leaves differ from ``target``'s (lists them all).
        CheckpointError: the file is empty, truncated, damaged or not a checkpoint.
        TypeError: ``target`` has a container key that is neither str nor int.

    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(f"{d}/a.ckpt", {"w": torch.arange(3.0)})
    ...     restore(f"{d}/a.ckpt", {"w": torch.zeros(3)})
    {'w': tensor([0., 1., 2.])}
    """
    where = f"checkpoint {os.fspath(path)}"
    pairs, spec = flatten(target)
    with open(path, "rb", buffering=0) as f:
        index = _read_index(f, where)
        _match(index, pairs, os.fspath(path))
        values: dict[KeyPath, Any] = {}
        devices = {p: leaf.device for p, leaf in pairs if isinstance(leaf, Tensor)}
        f.seek(PREAMBLE_SIZE)
        with Checksummer() as checksums:
            for entry in index.entries:
                if isinstance(entry, TensorEntry):
                    values[entry.path] = _read_tensor(f, entry, where, devices[entry.path], checksums)
                else:
                    values[entry.path] = entry.value
            _check_padding(f, index.index_offset, where, "before the index")
            crcs = checksums.crcs()
        for entry in index.entries:
            if isinstance(entry, TensorEntry) and entry.length:
                _check_crc(entry, crcs[entry.path], where)
    return optree.tree_unflatten(spec, [values[p] for p, _ in pairs])


def read_metadata(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint's metadata and versions without reading its tensors.

    The index is checked (checksum and schema); the tensor bytes are not read, so damage in
    them is only found by :func:`restore`.

    Args:
        path: the checkpoint file.

    Returns:
        ``{"format_version": int, "versions": {"fnlight": str, "torch": str, "python": str},
        "metadata": dict}`` (``metadata`` is ``{}`` when none was saved).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, damaged or not a checkpoint.

    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(f"{d}/a.ckpt", {"w": torch.ones(2)}, metadata={"best": 0.25})
    ...     info = read_metadata(f"{d}/a.ckpt")
    >>> info["format_version"], info["metadata"], sorted(info["versions"])
    (1, {'best': 0.25}, ['fnlight', 'python', 'torch'])
    """
    with open(path, "rb", buffering=0) as f:
        index = _read_index(f, f"checkpoint {os.fspath(path)}")
    return {"format_version": FORMAT_VERSION, "versions": index.versions, "metadata": index.metadata}


# --- writing -----------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    import fnlight  # at call time: fnlight/__init__ imports this package before setting __version__

    return {"fnlight": str(fnlight.__version__), "torch": str(torch.__version__), "python": platform.python_version()}


Plan = list[tuple[TensorEntry | ValueEntry, Tensor | None]]


def _plan(tree: Any) -> tuple[Plan, int]:
    """Check every leaf and lay the tensors out; return the entries (crc32 still 0) and the data end."""
    plan: Plan = []
    end = PREAMBLE_SIZE
    for key_path, leaf in flatten(tree)[0]:
        if isinstance(leaf, Tensor):
            check_tensor(leaf, key_path, DTYPE_NAMES)
            entry = TensorEntry(key_path, leaf.dtype, tuple(leaf.shape), align(end), leaf.numel() * leaf.element_size(), 0)
            end = entry.offset + entry.length
            plan.append((entry, leaf))
        else:
            plan.append((ValueEntry(key_path, check_plain(leaf, key_path)), None))
    return plan, end


def _write_atomically(directory: str, name: str, target: str, write: Callable[[Writer], None]) -> None:
    """Run ``write`` on a temporary file beside ``target`` (``directory/name``), fsync it, rename it over ``target``."""
    drop_cached_pages(target)  # the file being replaced: let the new one reuse its cache pages
    tmp, f = _open_temporary(directory, name)
    try:
        with f:
            w = Writer(f)
            write(w)
            w.sync()
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_directory(directory)


def temporary_stem(name: str) -> str:
    """``name`` cut so that ``.<stem>.<12 hex digits>.tmp`` still fits in 255 bytes (a file name's limit).

    >>> len(temporary_stem("x" * 255)), temporary_stem("step-000000002.ckpt")
    (237, 'step-000000002.ckpt')
    """
    raw = name.encode("utf-8", "surrogateescape")[: 255 - len(".") - len(".000000000000.tmp")]
    return raw.decode("utf-8", "ignore")  # a multi-byte character cut in two is dropped


def _open_temporary(directory: str, name: str) -> tuple[str, BinaryIO]:
    """Create a fresh ``.<name>.<random>.tmp`` beside the target (permissions follow the umask)."""
    while True:
        tmp = os.path.join(directory, f".{temporary_stem(name)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb", buffering=0)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_leaf(w: Writer, entry: TensorEntry | ValueEntry, leaf: Tensor | None, checksums: Checksummer) -> None:
    """Write one tensor's padding and bytes; its CRC-32 goes to ``checksums`` under its path."""
    if not isinstance(entry, TensorEntry) or leaf is None:
        return
    w.write(bytes(entry.offset - w.pos))
    checksums.write(w, leaf, entry.path)
    if w.pos != entry.offset + entry.length:
        raise RuntimeError(
            f"checkpoint: the tensor at {path_str(entry.path)} changed size while it was being saved "
            f"(expected {entry.length} bytes, wrote {w.pos - entry.offset})"
        )


# --- reading -----------------------------------------------------------------------------------


def _read_index(f: BinaryIO, where: str) -> Index:
    size = os.fstat(f.fileno()).st_size
    parse_preamble(_read_at(f, 0, min(size, PREAMBLE_SIZE), where), size=size, where=where)
    index_offset, index_length, index_crc = parse_footer(
        _read_at(f, size - FOOTER_SIZE, FOOTER_SIZE, where), size=size, where=where
    )
    raw = _read_at(f, index_offset, index_length, where)
    if zlib.crc32(raw) != index_crc:
        raise CheckpointError(
            f"{where}: damaged index: checksum mismatch (stored {index_crc:#010x}, computed {zlib.crc32(raw):#010x})"
        )
    return decode_index(raw, index_offset=index_offset, where=where)


def _read_at(f: BinaryIO, offset: int, n: int, where: str) -> bytes:
    f.seek(offset)
    buf = bytearray(n)
    if read_into(f, memoryview(buf))[0] != n:
        raise CheckpointError(f"{where}: truncated: the file ended while reading {n} bytes at offset {offset}")
    return bytes(buf)


def _read_tensor(
    f: BinaryIO, entry: TensorEntry, where: str, device: torch.device, checksums: Checksummer | None = None
) -> Tensor:
    """Read the tensor ``entry`` from ``f``'s position. Its checksum is checked here, or, given
    ``checksums``, left to the caller (``_check_crc`` on ``checksums.crcs()[entry.path]``)."""
    name = path_str(entry.path)
    _check_padding(f, entry.offset, where, f"before the tensor {name}")
    t = empty_like_entry(entry.shape, entry.dtype)
    if entry.length:
        if checksums is None:
            n, crc = read_into(f, byte_view(t))
        else:
            n = checksums.read_into(f, byte_view(t), entry.path)
        if n != entry.length:
            raise CheckpointError(f"{where}: truncated: the file ended inside the tensor {name}")
        if checksums is None:
            _check_crc(entry, crc, where)
    if device.type not in ("cpu", "meta"):
        t = t.to(device)
    return t


def _check_crc(entry: TensorEntry, crc: int, where: str) -> None:
    if crc != entry.crc32:
        raise CheckpointError(
            f"{where}: damaged: checksum mismatch in the tensor {path_str(entry.path)} "
            f"(stored crc32 {entry.crc32:#010x}, computed {crc:#010x})"
        )


def _check_padding(f: BinaryIO, upto: int, where: str, what: str) -> None:
    """Read the alignment padding from the current position up to ``upto``: it must be zero."""
    start = f.tell()
    if start < upto and any(_read_at(f, start, upto - start, where)):
        raise CheckpointError(f"{where}: damaged: non-zero alignment padding at [{start}, {upto}) {what}")


def _match(index: Index, pairs: list[tuple[KeyPath, Any]], file: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing every difference between file and target."""
    stored = {e.path: e for e in index.entries}
    wanted = dict(pairs)
    missing = [path_str(p) for p in wanted if p not in stored]
    unexpected = [path_str(p) for p in stored if p not in wanted]
    mismatched = []
    for p, leaf in pairs:
        entry = stored.get(p)
        if entry is None:
            continue
        expected, found = _describe_leaf(leaf), _describe_entry(entry)
        if expected != found:
            mismatched.append(f"{path_str(p)}: expected {expected}, found {found}")
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(file, missing=missing, unexpected=unexpected, mismatched=mismatched)


def _describe_leaf(leaf: Any) -> str:
    if isinstance(leaf, Tensor):
        return f"tensor {DTYPE_NAMES.get(leaf.dtype, str(leaf.dtype))}{list(leaf.shape)}"
    return kind_of(leaf)


def _describe_entry(entry: TensorEntry | ValueEntry) -> str:
    if isinstance(entry, TensorEntry):
        return f"tensor {DTYPE_NAMES[entry.dtype]}{list(entry.shape)}"
    return kind_of(entry.value)
