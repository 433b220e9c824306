"""The checkpoint file layout, byte by byte: preamble, aligned tensor bytes, msgpack index, footer.

Version 1 (all integers little-endian; docs/checkpoints.md has the full specification)::

    [0, 64)                 preamble: MAGIC (8 bytes), u32 format version, 52 zero bytes
    [64, index_offset)      tensor bytes, each starting at a multiple of 64, zero padding between
    [index_offset, +len)    the index: one msgpack map (paths, dtypes, shapes, offsets, crc32s)
    [size - 32, size)       footer: u64 index_offset, u64 index_length, u32 index crc32,
                            u32 crc32 of the previous 20 bytes, END_MAGIC (8 bytes)

Nothing here touches a file: this module turns headers into bytes and checks bytes read back.
Every check raises :class:`CheckpointError` naming the file, whatever the bytes contain.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from ._errors import CheckpointError
from ._leaves import KeyPath, PlainValue, check_metadata, path_str

__all__ = [
    "ALIGNMENT",
    "DTYPES",
    "DTYPE_NAMES",
    "FOOTER_SIZE",
    "FORMAT_VERSION",
    "PREAMBLE_SIZE",
    "Index",
    "TensorEntry",
    "ValueEntry",
    "align",
    "decode_index",
    "encode_index",
    "footer",
    "parse_footer",
    "parse_preamble",
    "preamble",
]

FORMAT_VERSION = 1
FORMAT_NAME = "fnlight.checkpoint"
MAGIC = b"\x89FNLCKPT"
END_MAGIC = b"FNLCKEND"
ALIGNMENT = 64
PREAMBLE_SIZE = 64
FOOTER_SIZE = 32
# Bounds on the index, enforced when saving and when reading. A decoded msgpack object can be
# ~70x larger in memory than its bytes (an empty map: 1 byte -> a dict), so both the size and
# the number of maps and lists are capped: a hostile index makes the reader allocate at most
# ~1.4 GiB (measured: 64 MiB of two-letter strings), a legitimate one fits ~600,000 leaves.
MAX_INDEX_BYTES = 64 << 20
MAX_INDEX_CONTAINERS = 4_000_000
MAX_NDIM = 64
MAX_PATH_LEN = 256
_INT64_MAX = (1 << 63) - 1
_FOOTER_BODY = struct.Struct("<QQI")
_FOOTER_TAIL = struct.Struct("<I8s")
_VERSION = struct.Struct("<I")

# The allow-list of storable dtypes, by torch's own name. A name read from a file is looked up
# here and nowhere else (never ``getattr(torch, name)``). Quantized dtypes are left out: their
# scale and zero point are not plain bytes.
_DTYPE_NAMES = (
    "bool",
    *("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"),
    *("float16", "bfloat16", "float32", "float64"),
    *("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"),
    *("complex32", "complex64", "complex128"),
    *("bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"),
    *(f"int{n}" for n in range(1, 8)),
    *(f"uint{n}" for n in range(1, 8)),
)
DTYPES: dict[str, torch.dtype] = {
    name: dtype for name in _DTYPE_NAMES if isinstance(dtype := getattr(torch, name, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def align(n: int) -> int:
    """The smallest multiple of ``ALIGNMENT`` (64) that is ``>= n``.

    >>> align(0), align(1), align(64), align(65)
    (0, 64, 64, 128)
    """
    return -(-n // ALIGNMENT) * ALIGNMENT


def preamble() -> bytes:
    """The 64 bytes every version-1 checkpoint starts with.

    >>> p = preamble()
    >>> len(p), p[:8], p[8:12]
    (64, b'\\x89FNLCKPT', b'\\x01\\x00\\x00\\x00')
    """
    return MAGIC + _VERSION.pack(FORMAT_VERSION) + bytes(PREAMBLE_SIZE - len(MAGIC) - _VERSION.size)


def parse_preamble(head: bytes, *, size: int, where: str) -> None:
    """Check the first bytes of a file (``head``, up to 64 of them) of ``size`` bytes in all.

    Raises:
        CheckpointError: empty file, wrong magic, unknown version, non-zero reserved bytes, or
            a file too short to hold a preamble and a footer.

    >>> parse_preamble(preamble(), size=64 + 32 + 1, where="checkpoint x")
    >>> parse_preamble(b"PK\\x03\\x04", size=4, where="checkpoint x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fnlight.checkpoint._errors.CheckpointError: checkpoint x: not an fnlight checkpoint: it starts with b'PK\\x03\\x04', ...
    """
    if size == 0:
        raise CheckpointError(f"{where}: the file is empty (0 bytes)")
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        raise CheckpointError(f"{where}: truncated: {size} bytes, too short for the preamble and footer alone")
    if head[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{where}: not an fnlight checkpoint: it starts with {head[:8]!r}, not {MAGIC!r}")
    # the version before any size: another version's file may be laid out (and sized) otherwise
    if len(head) >= len(MAGIC) + _VERSION.size and (version := _VERSION.unpack_from(head, len(MAGIC))[0]) != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: unsupported checkpoint format version {version}; this fnlight reads version {FORMAT_VERSION}"
        )
    if len(head) < PREAMBLE_SIZE:
        raise CheckpointError(f"{where}: truncated: {size} bytes, too short for the preamble and footer alone")
    if any(head[len(MAGIC) + _VERSION.size : PREAMBLE_SIZE]):
        raise CheckpointError(f"{where}: damaged preamble: its reserved bytes 12-63 must be zero")
    if size < PREAMBLE_SIZE + FOOTER_SIZE:
        raise CheckpointError(f"{where}: truncated: {size} bytes, too short for the preamble and footer alone")


def footer(index_offset: int, index_length: int, index_crc32: int) -> bytes:
    """The 32-byte footer that ends every checkpoint and locates its index.

    >>> raw = footer(64, 10, 0)
    >>> len(raw), raw[-8:], parse_footer(raw, size=64 + 10 + 32, where="checkpoint x")
    (32, b'FNLCKEND', (64, 10, 0))
    """
    body = _FOOTER_BODY.pack(index_offset, index_length, index_crc32)
    return body + _FOOTER_TAIL.pack(zlib.crc32(body), END_MAGIC)


def parse_footer(raw: bytes, *, size: int, where: str) -> tuple[int, int, int]:
    """Check the last 32 bytes of a file of ``size`` bytes; return (index offset, length, crc32).

    Raises:
        CheckpointError: missing end magic (truncated or incomplete file), footer checksum
            mismatch, or an index position that does not fit the file.
    """
    if len(raw) != FOOTER_SIZE or raw[-len(END_MAGIC) :] != END_MAGIC:
        raise CheckpointError(
            f"{where}: truncated or incomplete: the file does not end with the footer magic {END_MAGIC!r} ({size} bytes)"
        )
    body = raw[: _FOOTER_BODY.size]
    (stored_crc, _) = _FOOTER_TAIL.unpack_from(raw, _FOOTER_BODY.size)
    if zlib.crc32(body) != stored_crc:
        raise CheckpointError(f"{where}: damaged footer: checksum mismatch")
    index_offset, index_length, index_crc = _FOOTER_BODY.unpack(body)
    if (
        index_offset < PREAMBLE_SIZE
        or index_offset % ALIGNMENT
        or index_offset + index_length + FOOTER_SIZE != size
        or not 0 < index_length <= MAX_INDEX_BYTES
    ):
        raise CheckpointError(
            f"{where}: damaged footer: index at offset {index_offset} with length {index_length} "
            f"does not fit a {size}-byte file (expected a 64-aligned offset >= 64 ending at the footer)"
        )
    return index_offset, index_length, index_crc


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor leaf in the index: where its bytes are and what they must hash to."""

    path: KeyPath
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    length: int
    crc32: int


@dataclasses.dataclass(frozen=True)
class ValueEntry:
    """One plain Python leaf (None, bool, int, float or str), stored inline in the index."""

    path: KeyPath
    value: PlainValue


Entry = TensorEntry | ValueEntry


@dataclasses.dataclass(frozen=True)
class Index:
    """A decoded, validated index: library versions, user metadata, and the leaves in file order."""

    versions: dict[str, str]
    metadata: dict[str, Any]
    entries: list[Entry]
    index_offset: int


def encode_index(entries: Sequence[Entry], *, metadata: dict[str, Any], versions: dict[str, str]) -> bytes:
    """The msgpack bytes of the index (small: no tensor data goes through msgpack).

    Raises:
        ValueError: the index would exceed ``MAX_INDEX_BYTES`` or ``MAX_INDEX_CONTAINERS``.

    >>> raw = encode_index([ValueEntry(("lr",), 0.1)], metadata={}, versions={"torch": "2"})
    >>> decode_index(raw, index_offset=64, where="x").entries
    [ValueEntry(path=('lr',), value=0.1)]
    """
    leaves = []
    for e in entries:
        if isinstance(e, TensorEntry):
            leaves.append(
                {
                    "path": list(e.path),
                    "kind": "tensor",
                    "dtype": DTYPE_NAMES[e.dtype],
                    "shape": list(e.shape),
                    "offset": e.offset,
                    "length": e.length,
                    "crc32": e.crc32,
                }
            )
        else:
            leaves.append({"path": list(e.path), "kind": "value", "value": e.value})
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "alignment": ALIGNMENT,
        "checksum": "crc32",
        "versions": versions,
        "metadata": metadata,
        "leaves": leaves,
    }
    raw = msgpack.packb(index, use_bin_type=True)
    containers = _count_containers(index)
    if len(raw) > MAX_INDEX_BYTES or containers > MAX_INDEX_CONTAINERS:
        raise ValueError(
            f"checkpoint: the index would take {len(raw)} bytes and {containers} maps and lists; the limits are "
            f"{MAX_INDEX_BYTES} bytes and {MAX_INDEX_CONTAINERS} (too many leaves, or too much metadata)"
        )
    return raw


def _count_containers(obj: Any) -> int:
    count, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += 1
            stack.extend(item.values())
        elif isinstance(item, list):
            count += 1
            stack.extend(item)
    return count


class _TooManyContainers(Exception):
    pass


def _unpack(raw: bytes) -> Any:
    """msgpack-decode the index: lengths bounded by its size, at most MAX_INDEX_CONTAINERS maps and lists."""
    budget = MAX_INDEX_CONTAINERS

    def spend(container: Any) -> Any:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise _TooManyContainers
        return container

    n = len(raw)
    return msgpack.unpackb(
        raw,
        raw=False,
        strict_map_key=True,
        use_list=True,
        list_hook=spend,
        object_hook=spend,
        max_str_len=n,
        max_bin_len=0,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=0,
    )


def decode_index(raw: bytes, *, index_offset: int, where: str) -> Index:
    """Unpack (with size limits) and validate the index, including the canonical tensor layout.

    Raises:
        CheckpointError: not msgpack, too deeply nested or too many maps and lists, wrong schema, unknown dtype name,
            byte count that does not match dtype and shape, offsets out of place, duplicate paths.
    """
    try:
        obj = _unpack(raw)
    except _TooManyContainers:
        raise CheckpointError(f"{where}: damaged index: more than {MAX_INDEX_CONTAINERS} maps and lists") from None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        raise CheckpointError(f"{where}: damaged index: not valid msgpack ({type(e).__name__}: {e})") from e
    schema = _Schema(where)
    top = schema.map(obj, "the index")
    if top.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: damaged index: format is {top.get('format')!r}, expected {FORMAT_NAME!r}")
    version = top.get("version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise CheckpointError(
            f"{where}: unsupported checkpoint format version {version!r} in the index; "
            f"this fnlight reads version {FORMAT_VERSION}"
        )
    if top.get("alignment") != ALIGNMENT or top.get("checksum") != "crc32":
        raise CheckpointError(f"{where}: damaged index: expected alignment 64 and checksum 'crc32'")
    versions = schema.map(top.get("versions"), "versions")
    if not all(isinstance(v, str) for v in versions.values()):
        raise CheckpointError(f"{where}: damaged index: library versions must be strings")
    metadata = schema.map(top.get("metadata"), "metadata")
    try:
        check_metadata(metadata)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: damaged index: {e}") from e
    entries = schema.leaves(top.get("leaves"), index_offset)
    return Index(versions=dict(versions), metadata=metadata, entries=entries, index_offset=index_offset)


class _Schema:
    """Validators for the decoded index; each failure names the file and the offending field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: damaged index: {problem}")

    def map(self, obj: Any, what: str) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise self.fail(f"{what} should be a map, found {type(obj).__name__}")
        return obj

    def int(self, obj: Any, what: str, *, lo: int = 0, hi: int = _INT64_MAX) -> int:
        if type(obj) is not int or not lo <= obj <= hi:
            raise self.fail(f"{what} should be an integer in [{lo}, {hi}], found {obj!r}")
        return obj

    def path(self, obj: Any, i: int) -> KeyPath:
        if not isinstance(obj, list) or len(obj) > MAX_PATH_LEN:
            raise self.fail(f"leaf {i}: path should be a list of at most {MAX_PATH_LEN} keys, found {type(obj).__name__}")
        if not all(isinstance(k, str) or type(k) is int for k in obj):
            raise self.fail(f"leaf {i}: path keys should be strings or integers, found {obj!r}")
        return tuple(obj)

    def leaves(self, obj: Any, index_offset: int) -> list[Entry]:
        if not isinstance(obj, list):
            raise self.fail(f"leaves should be a list, found {type(obj).__name__}")
        entries: list[Entry] = []
        seen: set[KeyPath] = set()
        end = PREAMBLE_SIZE  # where the next tensor's bytes may start, before alignment
        for i, leaf in enumerate(obj):
            leaf = self.map(leaf, f"leaf {i}")
            path = self.path(leaf.get("path"), i)
            if path in seen:
                raise self.fail(f"duplicate leaf path {path_str(path)}")
            seen.add(path)
            kind = leaf.get("kind")
            if kind == "value":
                value = leaf.get("value")
                if value is not None and type(value) not in (bool, int, float, str):
                    raise self.fail(f"{path_str(path)}: inline value of type {type(value).__name__}")
                entries.append(ValueEntry(path, value))
            elif kind == "tensor":
                entry = self.tensor(leaf, path, end, index_offset)
                end = entry.offset + entry.length
                entries.append(entry)
            else:
                raise self.fail(f"{path_str(path)}: kind should be 'tensor' or 'value', found {kind!r}")
        if align(end) != index_offset:
            raise self.fail(f"the tensors end at byte {end}, but the index starts at {index_offset}")
        return entries

    def tensor(self, leaf: dict[str, Any], path: KeyPath, end: int, index_offset: int) -> TensorEntry:
        name = path_str(path)
        dtype_name = leaf.get("dtype")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise self.fail(f"{name}: unknown dtype {dtype_name!r}; expected one of {sorted(DTYPES)}")
        shape = leaf.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise self.fail(f"{name}: shape should be a list of at most {MAX_NDIM} sizes, found {shape!r}")
        for d in shape:
            self.int(d, f"{name}: shape entry")
        if math.prod(d for d in shape if d) > _INT64_MAX:
            raise self.fail(f"{name}: shape {shape} is too large")
        offset = self.int(leaf.get("offset"), f"{name}: offset")
        length = self.int(leaf.get("length"), f"{name}: length")
        crc = self.int(leaf.get("crc32"), f"{name}: crc32", hi=0xFFFFFFFF)
        expected_length = math.prod(shape) * dtype.itemsize
        if length != expected_length:
            raise self.fail(
                f"{name}: length {length} does not match dtype {dtype_name} and shape {shape} ({expected_length} bytes)"
            )
        if offset != align(end) or offset + length > index_offset:
            raise self.fail(
                f"{name}: bytes at [{offset}, {offset + length}) are out of place "
                f"(expected to start at {align(end)} and end by the index at {index_offset})"
            )
        return TensorEntry(path, dtype, tuple(shape), offset, length, crc)
