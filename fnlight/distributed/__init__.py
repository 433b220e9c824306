"""Distributed training: process groups and data parallelism; public names are re-exported from :mod:`fnlight`."""

from ._ddp import with_ddp
from ._fsdp import local_bytes, with_fsdp
from ._group import DistInfo, dist_info, init_distributed
from ._sharded import is_checkpoint_dir, is_sharded, read_sharded_metadata, restore_sharded, save_sharded

__all__ = [
    "DistInfo",
    "dist_info",
    "init_distributed",
    "is_checkpoint_dir",
    "is_sharded",
    "local_bytes",
    "read_sharded_metadata",
    "restore_sharded",
    "save_sharded",
    "with_ddp",
    "with_fsdp",
]
