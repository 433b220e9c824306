"""Distributed training: process groups and data parallelism; public names are re-exported from :mod:`fnlight`."""

from ._ddp import with_ddp
from ._group import DistInfo, dist_info, init_distributed

__all__ = ["DistInfo", "dist_info", "init_distributed", "with_ddp"]
