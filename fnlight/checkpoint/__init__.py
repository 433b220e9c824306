"""Checkpoints: save and restore any fnlight pytree to one file, without pickle.

A checkpoint is a single file: a 64-byte preamble, the raw tensor bytes (64-byte aligned,
checksummed with CRC-32), a msgpack index (leaf paths, dtypes, shapes, offsets, checksums,
plain Python leaves, user metadata, library versions) and a 32-byte footer. Loading never
executes code. See ``docs/checkpoints.md`` for the byte-level specification.

>>> import tempfile, torch
>>> from fnlight import checkpoint
>>> tree = {"w": torch.arange(4.0).reshape(2, 2), "step": 7}
>>> with tempfile.TemporaryDirectory() as d:
...     checkpoint.save(f"{d}/t.ckpt", tree, metadata={"note": "demo"})
...     back = checkpoint.restore(f"{d}/t.ckpt", {"w": torch.empty(2, 2), "step": 0})
>>> back["step"], back["w"].tolist()
(7, [[0.0, 1.0], [2.0, 3.0]])
"""

from ._errors import CheckpointError, CheckpointMismatchError, CheckpointWarning
from ._format import FORMAT_VERSION
from ._io import read_metadata, restore, save

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWarning",
    "read_metadata",
    "restore",
    "save",
]
