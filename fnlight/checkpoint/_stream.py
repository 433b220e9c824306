"""Byte streaming between tensors and files: chunked reads and writes with a running CRC-32.

Tensor bytes never pass through msgpack or an intermediate ``bytes`` object: a contiguous CPU
tensor is written from its own storage and read straight into a new tensor's storage, through
a uint8 numpy view (any dtype, including bfloat16 and float8, which numpy lacks). Every call
moves at most ``IO_CHUNK`` bytes, far below the ~2 GiB a single read/write may transfer.

The CRC-32 is updated chunk by chunk, right after each chunk is read or before it is written,
while its bytes are still in cache. When a whole file is saved or restored, a ``Checksummer``
computes the CRC-32s of large tensors on a worker thread while the next chunk is written or
read (both release the GIL): the I/O and the checks overlap instead of adding up.
"""

from __future__ import annotations

import os
import queue
import threading
import zlib
from collections.abc import Hashable, Iterator
from typing import BinaryIO

import torch
from torch import Tensor

from ._native import prefault, start_writeback

__all__ = [
    "Checksummer",
    "Writer",
    "as_bits",
    "byte_view",
    "contiguous_pieces",
    "empty_like_entry",
    "read_into",
    "write_tensor_bytes",
]

IO_CHUNK = 8 << 20  # bytes per read/write call and per crc32 update
COPY_CHUNK = 16 << 20  # the most a non-contiguous or non-CPU tensor is staged through CPU memory at once
WRITEBACK_CHUNK = 32 << 20  # start the disk writeback of every this many bytes written
PREFAULT_MIN = 1 << 20  # read buffers at least this large are prefaulted in one system call
THREAD_MIN = 1 << 20  # a Checksummer checks reads at least this large on its worker thread
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Writer:
    """An unbuffered file being written front to back: loops over short writes, tracks the
    position, and starts the disk writeback every ``WRITEBACK_CHUNK`` bytes.

    >>> import io
    >>> w = Writer(io.BytesIO(), writeback=False)
    >>> w.write(b"abc"); w.write(memoryview(b"de")); w.pos
    5
    """

    def __init__(self, f: BinaryIO, *, writeback: bool = True) -> None:
        self.f = f
        self.pos = 0
        self._synced = 0
        self._fd = f.fileno() if writeback else None

    def write(self, data: bytes | memoryview) -> None:
        """Write all of ``data``."""
        view = memoryview(data)
        while view:
            n = self.f.write(view)
            view = view[n:]
            self.pos += n
        if self._fd is not None and self.pos - self._synced >= WRITEBACK_CHUNK:
            start_writeback(self._fd, self._synced, self.pos - self._synced)
            self._synced = self.pos

    def sync(self) -> None:
        """Wait until everything written is on disk (``fsync``)."""
        os.fsync(self.f.fileno())


def write_tensor_bytes(w: Writer, t: Tensor) -> int:
    """Write ``t``'s bytes in row-major order and return their CRC-32.

    >>> import io
    >>> w = Writer(io.BytesIO(), writeback=False)
    >>> write_tensor_bytes(w, torch.arange(3, dtype=torch.uint8)) == zlib.crc32(b"\\x00\\x01\\x02")
    True
    """
    crc = 0
    for piece in contiguous_pieces(t.detach()):
        view = byte_view(piece)
        for start in range(0, len(view), IO_CHUNK):
            chunk = view[start : start + IO_CHUNK]
            crc = zlib.crc32(chunk, crc)  # then write it while it is hot in cache
            w.write(chunk)
    return crc


def read_into(f: BinaryIO, view: memoryview) -> tuple[int, int]:
    """Fill ``view`` from ``f`` in chunks; return (bytes read, their CRC-32), short only at end of file.

    >>> import io
    >>> buf = bytearray(4)
    >>> read_into(io.BytesIO(b"abc"), memoryview(buf)) == (3, zlib.crc32(b"abc"))
    True
    """
    crc = pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + IO_CHUNK])
        if not n:
            break
        crc = zlib.crc32(view[pos : pos + n], crc)  # while the chunk is hot in cache
        pos += n
    return pos, crc


class Checksummer:
    """Reads and writes whose CRC-32s are computed on a worker thread, overlapping the next read.

    ``read_into(f, view, key)`` fills ``view`` like the function of that name and queues its
    chunks; ``write(w, t, key)`` writes a tensor's bytes like ``write_tensor_bytes`` and queues
    them; ``crcs()`` waits for the worker and returns ``{key: crc32}``. Only views of memory that
    already exists are queued (a read's target, a contiguous CPU tensor's own storage), so
    queueing costs no memory; shorter transfers than ``THREAD_MIN`` and tensors staged through
    copies are checksummed on the calling thread. The queued bytes must not change before
    ``crcs()`` returns. Use as a context manager: leaving it stops the worker, also on an error.

    >>> import io
    >>> buf = bytearray(3)
    >>> with Checksummer() as c:
    ...     c.read_into(io.BytesIO(b"abc"), memoryview(buf), "k")
    ...     c.crcs() == {"k": zlib.crc32(b"abc")}
    3
    True
    """

    def __init__(self) -> None:
        self._crcs: dict[Hashable, int] = {}
        self._queue: queue.SimpleQueue[tuple[Hashable, memoryview] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    def read_into(self, f: BinaryIO, view: memoryview, key: Hashable) -> int:
        """Fill ``view`` from ``f`` (short only at end of file); its CRC-32 goes under ``key``."""
        if len(view) < THREAD_MIN:
            n, self._crcs[key] = read_into(f, view)
            return n
        self._start()
        self._crcs[key] = 0
        pos = 0
        while pos < len(view):
            n = f.readinto(view[pos : pos + IO_CHUNK])
            if not n:
                break
            self._queue.put((key, view[pos : pos + n]))
            pos += n
        return pos

    def write(self, w: Writer, t: Tensor, key: Hashable) -> None:
        """Write ``t``'s bytes in row-major order; their CRC-32 goes under ``key``."""
        t = t.detach()
        own = not (t.is_conj() or t.is_neg()) and t.device.type == "cpu" and t.is_contiguous()
        if not own or t.numel() * t.element_size() < THREAD_MIN:
            self._crcs[key] = write_tensor_bytes(w, t)
            return
        self._start()
        self._crcs[key] = 0
        view = byte_view(t)
        for start in range(0, len(view), IO_CHUNK):
            chunk = view[start : start + IO_CHUNK]
            self._queue.put((key, chunk))
            w.write(chunk)

    def crcs(self) -> dict[Hashable, int]:
        """Wait for the queued checks; ``{key: CRC-32}`` of everything read."""
        self._stop()
        return self._crcs

    def _start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="fnlight-crc32", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        crcs = self._crcs
        while (item := self._queue.get()) is not None:
            key, chunk = item
            crcs[key] = zlib.crc32(chunk, crcs[key])  # in file order: one worker, a FIFO queue

    def _stop(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def __enter__(self) -> Checksummer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()


def as_bits(t: Tensor) -> Tensor:
    """``t`` reinterpreted as the integer dtype of the same item size (no copy).

    Copy kernels exist for every integer dtype, not for shell dtypes such as ``int4``, and
    integer tensors carry no experimental-dtype warnings (``complex32``).

    >>> as_bits(torch.ones(2, dtype=torch.bfloat16)).dtype
    torch.int16
    """
    bits = _BITS.get(t.element_size())
    return t if bits is None or t.dtype == bits else t.view(bits)


def byte_view(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype).

    >>> bytes(byte_view(torch.tensor([1, 2], dtype=torch.int16)))
    b'\\x01\\x00\\x02\\x00'
    """
    flat = t.as_strided((t.numel(),), (1,))  # contiguous: dense from its storage offset, whatever size-1 strides say
    return memoryview(flat.view(torch.uint8).numpy())


def contiguous_pieces(t: Tensor) -> Iterator[Tensor]:
    """Contiguous CPU tensors whose bytes, one after another, are ``t``'s in row-major order.

    A contiguous CPU tensor is yielded as it is (no copy). Anything else (non-contiguous,
    another device, a conjugate or negative view) is copied in pieces of at most
    ``COPY_CHUNK`` bytes, splitting along the leading dimensions.

    >>> [p.tolist() for p in contiguous_pieces(torch.arange(4).reshape(2, 2).t())]
    [[[0, 2], [1, 3]]]
    """
    plain = not (t.is_conj() or t.is_neg())
    if t.numel() == 0:
        return  # no bytes (and none to copy: an empty tensor on the meta device has no data)
    if plain and t.device.type == "cpu" and t.is_contiguous():
        yield t
    elif t.dim() == 0 or t.numel() * t.element_size() <= COPY_CHUNK:
        yield as_bits(t.resolve_conj().resolve_neg()).contiguous().cpu()
    elif t.is_contiguous():
        flat, step = t.view(-1), max(1, COPY_CHUNK // t.element_size())
        for i in range(0, flat.numel(), step):
            yield from contiguous_pieces(flat[i : i + step])
    elif (row_bytes := t[0].numel() * t.element_size()) > COPY_CHUNK:
        for i in range(t.shape[0]):
            yield from contiguous_pieces(t[i])
    else:
        step = COPY_CHUNK // row_bytes
        for i in range(0, t.shape[0], step):
            yield from contiguous_pieces(t[i : i + step])


def empty_like_entry(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor to read into (allocated as integers: no complex32 warning).

    Large tensors are prefaulted in one system call (Linux), much cheaper than a fault per page.

    >>> empty_like_entry((2, 3), torch.bfloat16).shape
    torch.Size([2, 3])
    """
    t = torch.empty(shape, dtype=_BITS.get(dtype.itemsize, dtype)).view(dtype)
    if t.numel() * t.element_size() >= PREFAULT_MIN:
        prefault(t)
    return t
