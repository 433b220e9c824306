"""Functional optimizers, gradient transformations and schedules on torch's fused kernels.

Optimizers follow optax's shape (``init``/``apply`` pairs, ``chain``) but do their
arithmetic with torch's fused and multi-tensor kernels, so they match
``torch.optim`` and run as fast.
"""

from ._adam import AdamState, adam, adamw
from ._base import GradientTransformation, Optimizer, Schedule, ScalarOrSchedule, chain
from ._masks import MaskFn, decay_mask_no_bias_norm

__all__ = [
    "AdamState",
    "GradientTransformation",
    "MaskFn",
    "Optimizer",
    "ScalarOrSchedule",
    "Schedule",
    "adam",
    "adamw",
    "chain",
    "decay_mask_no_bias_norm",
]
