"""Best-effort hints to the kernel (Linux): prefault read buffers, write back early, drop stale cache.

They never change what is read or written, they are no-ops off Linux or where libc lacks the
call, and their failures are ignored. Measured on the reference machine (2 vCPUs, ext4 on
virtio; see docs/checkpoints.md):

- Reading 576 MiB into fresh tensors costs ~0.33 s, almost all of it page faults (one trap per
  4 KiB page; copying from the page cache into prefaulted memory takes 0.05 s). Populating the
  buffer first with one ``madvise(MADV_POPULATE_WRITE)`` call (Linux >= 5.14) brings the read to
  ~0.26 s. (``MADV_HUGEPAGE`` was faster when it worked, 0.12 s, but stalled for ~1 s in half of
  the runs on compaction: the kernel's ``defrag=madvise`` default compacts memory synchronously.)
- ``fsync`` of a freshly written 625 MiB file waits ~0.2 s for the disk; asking the kernel to
  start writing back every 32 MiB as the save goes (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
  as RocksDB's ``bytes_per_sync`` and PostgreSQL's ``checkpoint_flush_after`` do) overlaps that
  with the rest of the save and leaves ~0.01 s for the final ``fsync``.
- An atomic save writes the new file beside the old one, so for a moment both sit in the page
  cache, and the new file's pages come from free memory (on this VM, often memory the host must
  fault back in). Dropping the old file's clean cached pages first (``posix_fadvise
  DONTNEED``: the file on disk is untouched) lets the new file reuse them: 625 MiB saves went
  from 0.52 s median with outliers up to 2.0 s to 0.51 s median, worst 0.78 s.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

from torch import Tensor

__all__ = ["drop_cached_pages", "prefault", "start_writeback"]

PAGE = 4096
_MADV_POPULATE_WRITE = 23
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _libc_function(name: str, argtypes: tuple[type, ...]) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def prefault(t: Tensor) -> None:
    """Fault in the memory of a fresh CPU tensor with one system call, before it is filled.

    Only the pages entirely inside ``t`` are populated. The memory stays torch's.

    >>> import torch
    >>> prefault(torch.empty(1 << 20, dtype=torch.uint8))
    """
    madvise = _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    start = t.data_ptr()
    lo = -(-start // PAGE) * PAGE
    hi = (start + t.numel() * t.element_size()) // PAGE * PAGE
    if madvise is not None and hi > lo:
        madvise(lo, hi - lo, _MADV_POPULATE_WRITE)  # EINVAL before Linux 5.14: then pages fault one by one


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start (without waiting for) the writeback of ``length`` bytes of ``fd`` from ``offset``.

    >>> import tempfile
    >>> with tempfile.TemporaryFile() as f:
    ...     _ = f.write(b"x" * 10); f.flush()
    ...     start_writeback(f.fileno(), 0, 10)
    """
    sync_file_range = _libc_function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
    if sync_file_range is not None and length > 0:
        sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def drop_cached_pages(path: str) -> None:
    """Drop the clean page-cache pages of the file at ``path`` (if any); its contents are untouched.

    >>> drop_cached_pages("/no/such/file")
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
