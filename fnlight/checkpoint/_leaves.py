"""What a checkpoint can hold: leaf key paths, plain Python values, and JSON-like metadata."""

from __future__ import annotations

import math
from typing import Any

import optree
import torch
from torch import Tensor

from .._state import NAMESPACE

__all__ = ["KeyPath", "PlainValue", "check_metadata", "flatten", "kind_of", "path_str"]

KeyPath = tuple[str | int, ...]
PlainValue = None | bool | int | float | str

MAX_METADATA_DEPTH = 64
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack can encode


def path_str(path: KeyPath) -> str:
    """A key path as a dotted string; the root of a one-leaf tree is ``<root>``.

    >>> path_str(("opt_state", "mu", "fc.bias")), path_str(())
    ('opt_state.mu.fc.bias', '<root>')
    """
    return ".".join(str(k) for k in path) or "<root>"


def _key(entry: optree.PyTreeEntry, at: KeyPath) -> str | int:
    key = entry.field if isinstance(entry, optree.NamedTupleEntry | optree.StructSequenceEntry) else entry.entry
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise TypeError(
            f"checkpoint: the key {key!r} under {path_str(at)} is a {type(key).__name__}; "
            "checkpoints support str and int keys only (rename the dict key)"
        )
    if isinstance(key, str):
        _check_utf8(key, f"the key {key!r} under {path_str(at)}")
    elif not _INT_MIN <= key <= _INT_MAX:
        raise ValueError(f"checkpoint: the int key {key} under {path_str(at)} does not fit in 64 bits (msgpack's integers)")
    return key


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"checkpoint: {what} is not encodable as UTF-8 ({e.reason} at index {e.start})") from None


def flatten(tree: Any) -> tuple[list[tuple[KeyPath, Any]], optree.PyTreeSpec]:
    """Flatten ``tree`` (fnlight namespace) into ``(key path, leaf)`` pairs and its treespec.

    Dict keys and sequence indices are kept as they are; named-tuple and dataclass fields
    are keyed by name (so ``opt_state.mu.w``, not ``opt_state.1.w``).

    Raises:
        TypeError: a container key that is neither ``str`` nor ``int``.

    >>> flatten({"b": [1, 2.0], "a": None})[0]
    [(('b', 0), 1), (('b', 1), 2.0)]
    """
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    pairs = []
    for accessor, leaf in zip(accessors, leaves):
        path: KeyPath = ()
        for entry in accessor:
            path = (*path, _key(entry, path))
        pairs.append((path, leaf))
    return pairs, spec


def kind_of(leaf: Any) -> str:
    """The kind of a leaf as the mismatch errors name it: ``tensor`` or a plain Python type.

    >>> kind_of(True), kind_of(3), kind_of(None), kind_of(object())
    ('bool', 'int', 'None', 'object')
    """
    if isinstance(leaf, Tensor):
        return "tensor"
    if leaf is None:
        return "None"
    for t in (bool, int, float, str):
        if isinstance(leaf, t):
            return t.__name__
    return type(leaf).__name__


def check_metadata(metadata: Any) -> None:
    """Check that ``metadata`` is a JSON-like dict msgpack stores exactly.

    Allowed: dicts with str keys, lists, None, bool, int (64-bit), float and str, nested at
    most 64 levels. Tuples are refused (they would come back as lists).

    Raises:
        TypeError: a value or key of another type; the message gives its key path.
        ValueError: an int outside 64 bits or nesting deeper than 64 levels.

    >>> check_metadata({"run": {"tags": ["a", 1, 2.5, None]}})
    >>> check_metadata({"run": {"tags": ("a",)}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: checkpoint metadata['run']['tags'] is a tuple; expected None, bool, int, float, str, list or dict ...
    """
    if not isinstance(metadata, dict):
        raise TypeError(f"checkpoint metadata must be a dict with str keys, got {type(metadata).__name__}: {metadata!r}")
    _check_value(metadata, "metadata", 0)


def _check_value(value: Any, where: str, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"checkpoint {where} is nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, str):
        _check_utf8(value, where)
        return
    if value is None or isinstance(value, bool | float):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"checkpoint {where} = {value} does not fit in 64 bits")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint {where} has the key {key!r} of type {type(key).__name__}; keys must be str")
            _check_utf8(key, f"{where} key {key!r}")
            _check_value(item, f"{where}[{key!r}]", depth + 1)
        return
    hint = " (use a list instead of a tuple)" if isinstance(value, tuple) else ""
    raise TypeError(f"checkpoint {where} is a {type(value).__name__}; expected None, bool, int, float, str, list or dict{hint}")


def check_plain(leaf: Any, path: KeyPath) -> PlainValue:
    """Check a non-tensor leaf for ``save``: return it if it is a storable plain value.

    Raises:
        TypeError: any other leaf type (names the path and the type).
        ValueError: an int outside 64 bits.

    >>> check_plain(0.5, ("lr",))
    0.5
    """
    if isinstance(leaf, str):
        _check_utf8(leaf, f"the str leaf at {path_str(path)}")
        return leaf
    if leaf is None or isinstance(leaf, bool | float):
        return leaf
    if isinstance(leaf, int):
        if not _INT_MIN <= leaf <= _INT_MAX:
            raise ValueError(f"checkpoint: the int leaf at {path_str(path)} = {leaf} does not fit in 64 bits")
        return leaf
    raise TypeError(
        f"checkpoint: the leaf at {path_str(path)} is a {type(leaf).__name__}; "
        "a checkpoint stores torch.Tensor, None, bool, int, float and str leaves "
        "(make it a tensor, or a static field of the tree)"
    )


def check_tensor(leaf: Tensor, path: KeyPath, dtype_names: dict[torch.dtype, str]) -> None:
    """Check a tensor leaf for ``save``: a plain strided tensor of an allowed dtype.

    Raises:
        TypeError: a tensor subclass (DTensor...), a sparse or quantized tensor, or a dtype
            outside the allow-list.
    """
    name = path_str(path)
    if type(leaf) not in (Tensor, torch.nn.Parameter):
        raise TypeError(
            f"checkpoint: the leaf at {name} is a {type(leaf).__name__}; save takes plain tensors "
            "(gather a DTensor with .full_tensor() first)"
        )
    if leaf.is_quantized:
        raise TypeError(f"checkpoint: the tensor at {name} is quantized ({leaf.dtype}); dequantize it (or save its int_repr)")
    if leaf.layout != torch.strided:
        raise TypeError(f"checkpoint: the tensor at {name} has layout {leaf.layout}; only dense strided tensors are stored")
    if leaf.dtype not in dtype_names:
        raise TypeError(f"checkpoint: the tensor at {name} has dtype {leaf.dtype}, which checkpoints do not store")
    if math.prod(leaf.shape) and leaf.device.type == "meta":
        raise TypeError(f"checkpoint: the tensor at {name} is on the meta device and has no data to save")
