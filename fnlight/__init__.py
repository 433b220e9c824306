"""fnlight: pure training steps over an immutable TrainState, composed by transforms.

The public surface is re-exported here; submodules ``fnlight.optim`` (optimizers,
gradient transformations, schedules) and ``fnlight.losses`` are public too.
"""

from . import checkpoint, distributed, ensemble, export, finders, losses, optim, testing, tracking
from ._donation import DonatedStateError
from ._interop import apply, copy_into_module_, load_state_dict, save_safetensors, state_dict, to_module
from ._loop import Observer, evaluate, every, fold
from ._rng import derive_seed
from ._signals import Preempted
from ._state import DataPosition, TrainState
from ._step import EvalStep, GradContext, Gradients, LossFn, NonFiniteError, Step, TrainStep, make_eval_step, make_train_step
from ._summary import ModelSummary, SummaryRow, print_summary, summary
from ._tree import tree_clone, tree_equal
from .data import Loader
from .distributed import DistInfo, dist_info, init_distributed, with_ddp, with_fsdp
from .transforms import (
    CANONICAL_ORDER,
    AccumState,
    AmpState,
    CheckpointingState,
    CompileError,
    CompileFallbackWarning,
    EarlyStopState,
    EmaState,
    SwaState,
    TrackingState,
    Transform,
    averaged,
    current_lr,
    find_latest,
    update_bn,
    with_activation_checkpointing,
    with_amp,
    with_checkpointing,
    with_compile,
    with_early_stop,
    with_ema,
    with_eval,
    with_grad_accum,
    with_swa,
    with_tracking,
)

__version__ = "0.1.0"

__all__ = [
    "CANONICAL_ORDER",
    "AccumState",
    "AmpState",
    "CheckpointingState",
    "CompileError",
    "CompileFallbackWarning",
    "DataPosition",
    "DistInfo",
    "DonatedStateError",
    "EarlyStopState",
    "EmaState",
    "EvalStep",
    "GradContext",
    "Gradients",
    "Loader",
    "LossFn",
    "ModelSummary",
    "NonFiniteError",
    "Observer",
    "Preempted",
    "Step",
    "SummaryRow",
    "SwaState",
    "TrackingState",
    "TrainState",
    "TrainStep",
    "Transform",
    "apply",
    "averaged",
    "checkpoint",
    "copy_into_module_",
    "current_lr",
    "derive_seed",
    "dist_info",
    "distributed",
    "ensemble",
    "evaluate",
    "every",
    "export",
    "find_latest",
    "finders",
    "fold",
    "init_distributed",
    "load_state_dict",
    "losses",
    "make_eval_step",
    "make_train_step",
    "optim",
    "print_summary",
    "save_safetensors",
    "state_dict",
    "summary",
    "testing",
    "to_module",
    "tracking",
    "tree_clone",
    "tree_equal",
    "update_bn",
    "with_activation_checkpointing",
    "with_amp",
    "with_checkpointing",
    "with_compile",
    "with_ddp",
    "with_early_stop",
    "with_ema",
    "with_eval",
    "with_fsdp",
    "with_grad_accum",
    "with_swa",
    "with_tracking",
]
