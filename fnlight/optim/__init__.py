"""Functional optimizers, gradient transformations and schedules on torch's fused kernels.

Optimizers follow optax's shape (``init``/``apply`` pairs, ``chain``) but do their
arithmetic with torch's fused and multi-tensor kernels, so they match
``torch.optim`` and run as fast. See ``docs/optim.md``.
"""

from ._adagrad import AdagradState, adagrad
from ._adam import AdamState, adam, adamw
from ._base import GradientTransformation, Optimizer, ScalarOrSchedule, Schedule, chain
from ._clip import ClipState, clip_by_global_norm, clip_by_value, global_norm
from ._masks import MaskFn, decay_mask_no_bias_norm
from ._rmsprop import RmspropState, rmsprop
from ._schedules import (
    constant,
    cosine,
    exponential,
    join,
    linear,
    piecewise_constant,
    step_decay,
    warmup,
    warmup_cosine,
)
from ._sgd import SgdState, sgd

__all__ = [
    "AdagradState",
    "AdamState",
    "ClipState",
    "GradientTransformation",
    "MaskFn",
    "Optimizer",
    "RmspropState",
    "ScalarOrSchedule",
    "Schedule",
    "SgdState",
    "adagrad",
    "adam",
    "adamw",
    "chain",
    "clip_by_global_norm",
    "clip_by_value",
    "constant",
    "cosine",
    "decay_mask_no_bias_norm",
    "exponential",
    "global_norm",
    "join",
    "linear",
    "piecewise_constant",
    "rmsprop",
    "sgd",
    "step_decay",
    "warmup",
    "warmup_cosine",
]
