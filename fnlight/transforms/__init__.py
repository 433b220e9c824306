"""The ``with_*`` transforms; the public names are re-exported from :mod:`fnlight`."""

from ._accum import AccumState, with_grad_accum
from ._base import CANONICAL_ORDER, Transform

__all__ = ["CANONICAL_ORDER", "AccumState", "Transform", "with_grad_accum"]
