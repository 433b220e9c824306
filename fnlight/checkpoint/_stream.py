"""Byte streaming between tensors and files: chunked reads and writes with a running CRC-32.

Tensor bytes never pass through msgpack or an intermediate ``bytes`` object: a contiguous CPU
tensor is written from its own storage and read straight into a new tensor's storage, through
a uint8 numpy view (any dtype, including bfloat16 and float8, which numpy lacks). Every call
moves at most ``IO_CHUNK`` bytes, far below the ~2 GiB a single read/write may transfer.

The CRC-32 of a large tensor is computed on a helper thread, chunk by chunk, while the main
thread writes (or reads) the next chunk; ``zlib.crc32`` and file I/O both release the GIL.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import torch
from torch import Tensor

__all__ = [
    "RunningCrc",
    "as_bits",
    "byte_view",
    "contiguous_pieces",
    "crc_pool",
    "empty_like_entry",
    "read_into",
    "write_all",
    "write_tensor_bytes",
]

IO_CHUNK = 8 << 20  # bytes per read/write call and per crc32 update
COPY_CHUNK = 16 << 20  # the most a non-contiguous or non-CPU tensor is staged through CPU memory at once
THREAD_MIN = 4 << 20  # tensors smaller than this are checksummed inline (a thread hop costs more)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class RunningCrc:
    """The CRC-32 of a sequence of chunks, fed in order, optionally computed on ``pool``.

    ``pool`` must have exactly one worker, so the chunks are hashed in the order fed.

    >>> crc = RunningCrc(None)
    >>> crc.feed(memoryview(b"hello ")); crc.feed(memoryview(b"world"))
    >>> crc.value() == zlib.crc32(b"hello world")
    True
    """

    def __init__(self, pool: ThreadPoolExecutor | None) -> None:
        self._pool = pool
        self._crc = 0
        self._pending: list[Future[None]] = []

    def feed(self, chunk: memoryview) -> None:
        """Add ``chunk`` (it must stay unchanged until :meth:`value` returns)."""
        if self._pool is None:
            self._crc = zlib.crc32(chunk, self._crc)
        else:
            self._pending.append(self._pool.submit(self._step, chunk))

    def _step(self, chunk: memoryview) -> None:
        self._crc = zlib.crc32(chunk, self._crc)

    def value(self) -> int:
        """Wait for the chunks fed so far and return their CRC-32."""
        for future in self._pending:
            future.result()
        self._pending.clear()
        return self._crc


def crc_pool() -> ThreadPoolExecutor:
    """A one-worker pool for :class:`RunningCrc` (use it as a context manager)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnlight-checkpoint-crc")


def write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    """Write all of ``data`` to an unbuffered file, looping over short writes."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n:]


def write_tensor_bytes(f: BinaryIO, t: Tensor, pool: ThreadPoolExecutor | None) -> int:
    """Write ``t``'s bytes in row-major order and return their CRC-32.

    >>> import io
    >>> buf = io.BytesIO()
    >>> write_tensor_bytes(buf, torch.arange(3, dtype=torch.uint8), None) == zlib.crc32(b"\\x00\\x01\\x02")
    True
    """
    crc = RunningCrc(pool if t.numel() * t.element_size() >= THREAD_MIN else None)
    for piece in contiguous_pieces(t.detach()):
        view = byte_view(piece)
        for start in range(0, len(view), IO_CHUNK):
            chunk = view[start : start + IO_CHUNK]
            crc.feed(chunk)
            write_all(f, chunk)
    return crc.value()


def read_into(f: BinaryIO, view: memoryview, pool: ThreadPoolExecutor | None) -> tuple[int, int]:
    """Fill ``view`` from ``f`` in chunks; return (bytes read, their CRC-32), short only at end of file."""
    crc = RunningCrc(pool if len(view) >= THREAD_MIN else None)
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + IO_CHUNK])
        if not n:
            break
        crc.feed(view[pos : pos + n])
        pos += n
    return pos, crc.value()


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

    >>> empty_like_entry((2, 3), torch.bfloat16).shape
    torch.Size([2, 3])
    """
    return torch.empty(shape, dtype=_BITS.get(dtype.itemsize, dtype)).view(dtype)
