"""The recipe: fnlight's own run settings as a typed dataclass, and the training step it describes.

The annotations are evaluated at runtime (no ``from __future__ import annotations``): jsonargparse
reads them to build the command line and to check config files.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from torch import nn

from .. import losses
from .._step import Step, make_train_step
from ..optim import (
    adagrad,
    adam,
    adamw,
    chain,
    clip_by_global_norm,
    constant,
    cosine,
    decay_mask_no_bias_norm,
    linear,
    rmsprop,
    sgd,
)
from ..optim import warmup as warmup_schedule
from ..tracking import AimTracker, CSVTracker, JSONLTracker, Trackers, default_trackers
from ..transforms import with_amp, with_checkpointing, with_early_stop, with_eval, with_grad_accum, with_tracking

__all__ = ["CheckpointConfig", "ConfigError", "EarlyStopConfig", "Recipe", "make_recipe_step"]

_OPTIMIZERS = {"adamw": adamw, "adam": adam, "sgd": sgd, "rmsprop": rmsprop, "adagrad": adagrad}
_MOMENTUM = ("sgd", "rmsprop")


class ConfigError(ValueError):
    """A configuration fnlight cannot run: a value out of range, a combination that does not fit, no checkpoint.

    The message names the setting (``recipe.grad_accum``), what was expected and what was
    given. The ``fnlight`` command prints it and exits with status 2, like a command-line error.
    """


@dataclass(frozen=True)
class EarlyStopConfig:
    """Early stopping (:func:`fnlight.with_early_stop`): stop when ``monitor`` stops improving.

    Args:
        monitor: the metric to watch: ``val/loss`` and ``val/<metric>`` (needs validation data) or the training ``loss``.
        mode: ``min`` or ``max``: which values are better.
        patience: checks (evaluations) without improvement before stopping.
        min_delta: how much better than the best a value must be to count as an improvement.
        min_updates: no stop before this many optimizer updates.
        restore_best: put the best parameters back when stopping.
    """

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 3
    min_delta: float = 0.0
    min_updates: int = 0
    restore_best: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (:func:`fnlight.with_checkpointing`) in ``<run_dir>/checkpoints``; fit also saves at its end.

    Args:
        every: save every N optimizer updates, every ``epoch``, or null (then give ``seconds``).
        seconds: also save after an update once this many seconds have passed since the last save.
        keep_last: how many of the newest checkpoints to keep.
        keep_best: how many of the best by ``monitor`` to keep as well.
        monitor: the metric that ranks checkpoints for ``keep_best`` and ``--ckpt_path best``, e.g. ``val/loss``.
        mode: ``min`` or ``max``: which ``monitor`` values are better.
        async_write: write checkpoints from a background thread.
        resume: fit continues from the newest valid checkpoint in the directory.
    """

    every: int | Literal["epoch"] | None = "epoch"
    seconds: float | None = None
    keep_last: int = 2
    keep_best: int = 0
    monitor: str | None = None
    mode: Literal["min", "max"] = "min"
    async_write: bool = False
    resume: bool = True


def _int(where: str, value: Any, low: int, *, optional: bool = False, alternatives: str = "") -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} must be an int >= {low}{' or null' if optional else ''}{alternatives}, got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """fnlight's run settings: optimizer, schedule, length, precision, evaluation, checkpoints, tracking, seed.

    The settings that fnlight interprets itself are checked here; those handed to an fnlight
    function (``lr``, ``clip_norm``, the early-stopping and checkpoint options) are checked by
    it when :func:`make_recipe_step` builds the step, and reported as :class:`ConfigError`.

    Args:
        seed: seeds Python, numpy and torch before the model is built, and the training state (dropout, shuffling).
        run_dir: the run's directory: checkpoints and config.yaml in ``<run_dir>/checkpoints``, tracker files in it.
        loss: the loss function ``loss_fn(model, batch) -> loss or (loss, metrics)``, as an import path.
        optimizer: the optimizer (``fnlight.optim``).
        lr: the peak learning rate.
        weight_decay: weight decay (decoupled for adamw).
        decay_bias_and_norm: also decay biases and normalisation weights (false: ``decay_mask_no_bias_norm``).
        momentum: momentum, for ``sgd`` and ``rmsprop`` only.
        schedule: ``constant``, or ``cosine``/``linear`` decay from ``lr`` to ``end_lr`` over the run.
        warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer updates.
        end_lr: the learning rate at the end of a ``cosine`` or ``linear`` schedule.
        epochs: the total number of epochs (a resumed run does what is left).
        max_steps: stop after this many optimizer updates in total.
        grad_accum: micro-batches per optimizer update (:func:`fnlight.with_grad_accum`).
        amp: mixed precision (:func:`fnlight.with_amp`): ``none``, ``bf16`` or ``fp16`` (with loss scaling).
        clip_norm: clip the gradients' global L2 norm to this, once per update.
        nonfinite: what a non-finite loss does: ``raise``, ``skip`` the update, ``stop`` the run, or ``ignore``.
        eval_every: evaluate on the data module's ``val()`` every N optimizer updates, every ``epoch``, or ``never``.
        early_stop: early stopping; null for none.
        checkpoint: checkpoint saving and retention.
        tracker: where metrics go: ``default`` (aim when installed, and JSONL), ``aim``, ``jsonl``, ``csv``, ``none``.
        log_every: send metrics to the tracker every N optimizer updates.
        progress: show a progress bar; null shows it when stderr is a terminal.
    """

    seed: int = 0
    run_dir: str = "runs/fnlight"
    loss: Callable[[nn.Module, Any], Any] = losses.classification
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop", "adagrad"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    decay_bias_and_norm: bool = True
    momentum: float = 0.0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    end_lr: float = 0.0
    epochs: int | None = 1
    max_steps: int | None = None
    grad_accum: int = 1
    amp: Literal["none", "bf16", "fp16"] = "none"
    clip_norm: float | None = None
    nonfinite: Literal["raise", "skip", "stop", "ignore"] = "raise"
    eval_every: int | Literal["epoch", "never"] = "epoch"
    early_stop: EarlyStopConfig | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracker: Literal["default", "aim", "jsonl", "csv", "none"] = "default"
    log_every: int = 50
    progress: bool | None = None

    def __post_init__(self) -> None:
        _int("recipe.seed", self.seed, 0)
        if self.seed >= 2**63:
            raise ConfigError(f"recipe.seed must be an int in [0, 2**63) (the state's int64 key), got {self.seed!r}")
        if not isinstance(self.run_dir, (str, os.PathLike)) or not os.fspath(self.run_dir):
            raise ConfigError(f"recipe.run_dir must be a non-empty path, got {self.run_dir!r}")
        if not callable(self.loss):
            raise ConfigError(f"recipe.loss must be a function loss_fn(model, batch), got {self.loss!r}")
        if not isinstance(self.checkpoint, CheckpointConfig):
            got = f"{type(self.checkpoint).__name__}: {self.checkpoint!r}"
            raise ConfigError(f"recipe.checkpoint must be a CheckpointConfig, got {got}")
        if self.early_stop is not None and not isinstance(self.early_stop, EarlyStopConfig):
            raise ConfigError(
                f"recipe.early_stop must be an EarlyStopConfig or None, got {type(self.early_stop).__name__}: {self.early_stop!r}"
            )
        for f in dataclasses.fields(self):
            choices = get_args(f.type) if get_origin(f.type) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"recipe.{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if self.momentum and self.optimizer not in _MOMENTUM:
            raise ConfigError(
                f"recipe.momentum applies to the optimizers {list(_MOMENTUM)}, got momentum={self.momentum!r} "
                f"with optimizer={self.optimizer!r}; set momentum to 0 or choose sgd/rmsprop"
            )
        _int("recipe.warmup_steps", self.warmup_steps, 0)
        if self.end_lr and self.schedule == "constant":
            raise ConfigError(
                f"recipe.end_lr applies to the schedules 'cosine' and 'linear', got end_lr={self.end_lr!r} "
                "with schedule='constant'"
            )
        _int("recipe.epochs", self.epochs, 1, optional=True)
        _int("recipe.max_steps", self.max_steps, 1, optional=True)
        if self.epochs is None and self.max_steps is None:
            raise ConfigError("recipe: give epochs and/or max_steps, got both null")
        _int("recipe.grad_accum", self.grad_accum, 1)
        if self.eval_every not in ("epoch", "never"):
            _int("recipe.eval_every", self.eval_every, 1, alternatives=", 'epoch' or 'never'")
        _int("recipe.log_every", self.log_every, 1)


def _per_epoch(recipe: Recipe, train: Any, where: str) -> int | None:
    """Optimizer updates per epoch (a short last accumulation window counts as one), if the data has a length."""
    if not hasattr(train, "__len__"):
        return None
    if len(train) == 0:
        raise ConfigError(f"{where}: the training data must not be empty, got {type(train).__name__} of length 0")
    return math.ceil(len(train) / recipe.grad_accum)


def _total(recipe: Recipe, per_epoch: int | None) -> int | None:
    bounds = [recipe.max_steps] if recipe.max_steps is not None else []
    if recipe.epochs is not None:
        if per_epoch is None:
            return recipe.max_steps
        bounds.append(recipe.epochs * per_epoch)
    return min(bounds)


def _learning_rate(recipe: Recipe, total: int | None) -> Any:
    # a schedule's values reach the optimizer only as it runs, so the optimizer cannot check them when it is built
    scheduled = ("lr", "end_lr") if recipe.schedule != "constant" else ("lr",) if recipe.warmup_steps else ()
    for name in scheduled:
        value = getattr(recipe, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ConfigError(
                f"recipe.{name} must be a finite number >= 0 (a learning rate of schedule={recipe.schedule!r}), got {value!r}"
            )
    if recipe.schedule == "constant":
        return warmup_schedule(constant(recipe.lr), recipe.warmup_steps) if recipe.warmup_steps else recipe.lr
    if total is None:
        raise ConfigError(
            f"recipe.schedule={recipe.schedule!r} needs the run's length in optimizer updates, but the training data "
            "has no len() and recipe.max_steps is null; set recipe.max_steps"
        )
    decay = total - recipe.warmup_steps
    if decay < 1:
        raise ConfigError(
            f"recipe.warmup_steps must be below the run's {total} optimizer updates for schedule={recipe.schedule!r}, "
            f"got {recipe.warmup_steps}"
        )
    main = (
        cosine(recipe.lr, decay, end_value=recipe.end_lr)
        if recipe.schedule == "cosine"
        else linear(recipe.lr, recipe.end_lr, decay)
    )
    return warmup_schedule(main, recipe.warmup_steps) if recipe.warmup_steps else main


def _trackers(recipe: Recipe) -> Trackers:
    run_dir = Path(recipe.run_dir)
    if recipe.tracker == "default":
        return default_trackers(run_dir)
    backend = {"aim": AimTracker, "jsonl": JSONLTracker, "csv": CSVTracker}[recipe.tracker]
    return Trackers(backend(run_dir))


def _built(where: str, build: Callable[[], Any]) -> Any:
    """Run ``build``; an fnlight function's ValueError/TypeError becomes a ConfigError naming the recipe setting."""
    try:
        return build()
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _assemble(
    model: nn.Module,
    recipe: Recipe,
    *,
    train: Any,
    val: Iterable[Any] | None,
    hparams: Mapping[str, Any] | None,
    for_fit: bool,
) -> tuple[Step, Step]:
    """The recipe's step and its inner part (core, AMP, accumulation) that evaluation runs in.

    ``for_fit=False`` builds the same state structure without side effects: no validation
    pass, an empty tracker fan-out, no resume (validate, test and predict restore a chosen
    checkpoint into it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"make_recipe_step: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"make_recipe_step: recipe must be a fnlight.cli.Recipe, got {type(recipe).__name__}")
    per_epoch = _per_epoch(recipe, train, "make_recipe_step")
    mask = None if recipe.decay_bias_and_norm else decay_mask_no_bias_norm

    def optimizer() -> Any:
        options: dict[str, Any] = {"weight_decay": recipe.weight_decay, "mask": mask}
        if recipe.optimizer in _MOMENTUM:
            options["momentum"] = recipe.momentum
        opt = _OPTIMIZERS[recipe.optimizer](_learning_rate(recipe, _total(recipe, per_epoch)), **options)
        return chain(clip_by_global_norm(recipe.clip_norm), opt) if recipe.clip_norm is not None else opt

    where = "recipe (optimizer, lr, weight_decay, momentum, schedule, clip_norm)"
    step = make_train_step(model, recipe.loss, _built(where, optimizer), nonfinite=recipe.nonfinite)
    if recipe.amp != "none":
        step = with_amp(step, dtype=recipe.amp)
    if recipe.grad_accum > 1:
        step = with_grad_accum(step, every=recipe.grad_accum)
    inner = step

    evaluating = for_fit and val is not None and recipe.eval_every != "never"
    if evaluating:
        if recipe.eval_every == "epoch":
            every, at_epoch_end = per_epoch, per_epoch is None  # same update as the epoch's checkpoint
        else:
            every, at_epoch_end = recipe.eval_every, False
        step = _built(
            "data.val() and recipe.eval_every",
            lambda: with_eval(inner, data=val, loss_fn=recipe.loss, every=every, at_epoch_end=at_epoch_end),
        )
    stop = recipe.early_stop
    if stop is not None:
        if for_fit and stop.monitor.startswith("val/") and not evaluating:
            raise ConfigError(
                f"recipe.early_stop.monitor={stop.monitor!r} is a validation metric, but nothing is evaluated: the "
                "data module has no val() (or it returned None), or recipe.eval_every is 'never'; monitor 'loss' "
                "or add validation data"
            )
        step = _built("recipe.early_stop", lambda: with_early_stop(step, **dataclasses.asdict(stop)))
    if recipe.tracker != "none":
        trackers = _trackers(recipe) if for_fit else Trackers(background=False)
        tracked = step
        step = _built(
            "recipe.tracker (the config is recorded as hyperparameters)",
            lambda: with_tracking(tracked, trackers=[trackers], every=recipe.log_every, hparams=hparams),
        )

    ckpt = recipe.checkpoint
    every_ckpt = ckpt.every
    if every_ckpt == "epoch":
        if per_epoch is None and for_fit:
            raise ConfigError(
                "recipe.checkpoint.every='epoch' needs len() of the training data to know where an epoch ends; "
                "give a number of optimizer updates or recipe.checkpoint.seconds"
            )
        every_ckpt = per_epoch or 1
    options = dataclasses.asdict(ckpt) | {"every": every_ckpt, "resume": ckpt.resume and for_fit}
    return inner, _built(
        "recipe.checkpoint", lambda: with_checkpointing(step, directory=Path(recipe.run_dir) / "checkpoints", **options)
    )


def make_recipe_step(
    model: nn.Module,
    recipe: Recipe,
    *,
    train: Any,
    val: Iterable[Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> Step:
    """The training step a :class:`Recipe` describes: ``make_train_step`` and the transforms, in the canonical order.

    ``make_train_step(model, recipe.loss, optimizer)`` -> ``with_amp`` -> ``with_grad_accum``
    -> ``with_eval`` (on ``val``) -> ``with_early_stop`` -> ``with_tracking`` ->
    ``with_checkpointing`` (into ``<run_dir>/checkpoints``, resuming from it), each only when
    the recipe asks for it; checkpointing always. ``train`` is not iterated: its ``len()``
    (batches per epoch) turns ``epoch`` settings and the schedule's length into optimizer updates.

    Args:
        model: the model; its tensors become the state's (see :func:`fnlight.make_train_step`).
        recipe: the settings.
        train: the training data the step will be folded over.
        val: validation data for ``with_eval``; None: no evaluation.
        hparams: recorded by the trackers (the CLI passes the whole resolved config).

    Returns:
        The step; ``step.init(seed=recipe.seed)`` resumes from the newest checkpoint.

    Raises:
        ConfigError: a recipe setting out of range for the function it is handed to, or
            a combination that needs what the data does not give (naming the setting).
        TypeError: ``model`` is not an ``nn.Module`` or ``recipe`` not a :class:`Recipe`.

    >>> import os, tempfile, torch, fnlight as fl
    >>> from fnlight.cli import Recipe, make_recipe_step
    >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 3
    >>> with tempfile.TemporaryDirectory() as d:
    ...     recipe = Recipe(run_dir=d, lr=0.01, grad_accum=3, tracker="none", epochs=2)
    ...     step = make_recipe_step(torch.nn.Linear(4, 2), recipe, train=data)
    ...     state = fl.fold(step, step.init(seed=recipe.seed), data, epochs=recipe.epochs, progress=False)
    ...     sorted(os.listdir(f"{d}/checkpoints"))
    ['latest', 'step-000000001.ckpt', 'step-000000002.ckpt']
    """
    return _assemble(model, recipe, train=train, val=val, hparams=hparams, for_fit=True)[1]
