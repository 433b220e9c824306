"""The ``with_*`` transforms; the public names are re-exported from :mod:`fnlight`."""

from ._accum import AccumState, with_grad_accum
from ._activation import with_activation_checkpointing
from ._amp import AmpState, with_amp
from ._base import CANONICAL_ORDER, Transform
from ._checkpointing import CheckpointingState, find_latest, with_checkpointing
from ._compile import CompileError, CompileFallbackWarning, with_compile
from ._early_stop import EarlyStopState, with_early_stop
from ._ema import EmaState, averaged, with_ema
from ._eval import with_eval
from ._swa import SwaState, update_bn, with_swa
from ._tracking import TrackingState, current_lr, with_tracking

__all__ = [
    "CANONICAL_ORDER",
    "AccumState",
    "AmpState",
    "CheckpointingState",
    "CompileError",
    "CompileFallbackWarning",
    "EarlyStopState",
    "EmaState",
    "SwaState",
    "TrackingState",
    "Transform",
    "averaged",
    "current_lr",
    "find_latest",
    "update_bn",
    "with_activation_checkpointing",
    "with_amp",
    "with_checkpointing",
    "with_compile",
    "with_early_stop",
    "with_ema",
    "with_eval",
    "with_grad_accum",
    "with_swa",
    "with_tracking",
]
