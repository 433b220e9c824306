"""The command line: ``fnlight fit|validate|test|predict --config run.yaml``, parsed by jsonargparse from type hints."""

from __future__ import annotations

import json
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optree
import torch
import yaml
from torch import nn

from .._interop import to_module
from .._loop import Observer, fold
from .._state import TrainState
from ..checkpoint import CheckpointError, CheckpointMismatchError, CheckpointWarning, read_metadata, restore
from ..transforms import find_latest, with_eval
from ._data import DataModule
from ._recipe import ConfigError, Recipe, _assemble, _built, _per_epoch
from ._saved_config import CONFIG_NAME, check_saved_config, resolved_config, write_saved_config

try:
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace
except ImportError as e:
    raise ImportError("fnlight.cli needs jsonargparse: pip install 'fnlight[cli]'") from e

__all__ = ["FnlightCLI", "main"]

SUBCOMMANDS = {
    "fit": "Train: make_train_step and the recipe's transforms folded over data.train(); resumes from the run's checkpoints.",
    "validate": "Evaluate a checkpoint on data.val() (val/ metrics).",
    "test": "Evaluate a checkpoint on data.test() (test/ metrics).",
    "predict": "Run a checkpoint's model over data.predict() and write the outputs to a .pt or .npy file.",
}
_EVAL_DATA = {"validate": "val", "test": "test", "predict": "predict"}
_OUTPUTS = (".pt", ".pth", ".npy")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if isinstance(v, torch.Tensor) and v.ndim == 0}


def _report(values: dict[str, Any]) -> None:
    """Print ``name: value`` lines, values in JSON: readable, and YAML for scripts."""
    for name, value in values.items():
        print(f"{name}: {json.dumps(value)}")


class FnlightCLI:
    """A command line for a model and a data module, from their type hints: fit, validate, test, predict.

    Builds a jsonargparse parser with one subcommand per action. Each takes ``--config
    run.yaml`` (several: later ones win), command-line overrides such as ``--recipe.lr 0.01``
    or ``--model.init_args.hidden 64`` on top, and ``--print_config`` (print the resolved YAML
    and exit). The config has three sections: ``model`` (an ``nn.Module``), ``data`` (a
    :class:`DataModule`) and ``recipe`` (a :class:`Recipe`). Unknown keys, wrong types and
    missing required values are refused by the parser, naming the key.

    Then it seeds Python, numpy and torch with ``recipe.seed``, builds the model, the data
    module and the recipe, and runs the subcommand:

    - ``fit [--overwrite]``: writes the resolved config to ``<run_dir>/checkpoints/config.yaml``
      (a different existing one is refused unless ``--overwrite``; the same config resumes),
      builds the step (:func:`make_recipe_step`), restores the newest checkpoint, folds over
      ``data.train()`` and saves a final checkpoint.
    - ``validate``/``test [--ckpt_path latest|best|FILE]``: restores a checkpoint (default the
      newest in ``<run_dir>/checkpoints``; ``best`` ranks by ``recipe.checkpoint.monitor``) and
      prints the mean metrics over ``data.val()``/``data.test()`` as ``val/...``/``test/...``.
    - ``predict [--ckpt_path ...] [--output FILE]``: runs the checkpoint's model (eval mode)
      over ``data.predict()`` and writes the outputs, concatenated along the batch dimension,
      to ``FILE`` (``.pt``: ``torch.save``; ``.npy``: one tensor; default
      ``<run_dir>/predictions.pt``).

    Args:
        model_class: the model's class; its ``__init__`` arguments are the ``model`` section
            (``--model.hidden 64``). ``None``: any ``nn.Module`` by ``class_path`` and
            ``init_args`` (``--model.init_args.hidden 64``).
        data_class: the data module's class, likewise; ``None``: any class with ``train()``
            by ``class_path``.
        args: the command line without the program name (default ``sys.argv[1:]``).
        subclass_mode_model: with ``model_class``, take it or a subclass by ``class_path``.
        subclass_mode_data: likewise for ``data_class``.
        run: run the subcommand now; ``False`` parses and builds only (call :meth:`run`).
        exit_on_error: on a command-line or config-file error print the usage and the error
            and exit with status 2 (argparse's behaviour); ``False`` raises
            ``jsonargparse.ArgumentError`` instead.
        prog: the program name in usage lines.

    Attributes:
        parser: the jsonargparse parser.
        subcommand: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        config: the subcommand's resolved config (a jsonargparse ``Namespace``).
        model, data, recipe: the built objects.
        resolved: the ``model``, ``data`` and ``recipe`` sections as plain data (what
            ``config.yaml`` holds; the trackers record it as hyperparameters).
        run_dir, checkpoint_dir: ``recipe.run_dir`` and its ``checkpoints`` directory.
        state: after :meth:`run`, the final (fit) or restored :class:`fnlight.TrainState`.
        checkpoint: after :meth:`run`, the checkpoint written last (fit) or restored.
        metrics: after :meth:`run`, ``{name: float}``: fit's last metrics, or the evaluation's.
        predictions: after ``predict``, the outputs (a tensor or a tree of tensors); ``output``
            is where they were written.

    Raises:
        ConfigError: a recipe value or combination fnlight cannot run, a model or data module
            whose ``__init__`` refuses its arguments (``ValueError``, ``TypeError``,
            ``RuntimeError``), a data module without the method the subcommand needs, a
            conflicting saved config, no checkpoint.
        TypeError: ``model_class``/``data_class`` are not a module class/a class with ``train``.
        SystemExit: ``--help``, ``--print_config`` (status 0), and command-line errors
            (status 2) when ``exit_on_error``.

    >>> import tempfile, torch, fnlight as fl
    >>> class Tiny:
    ...     def __init__(self, n: int = 32) -> None:
    ...         self.x, self.y = torch.randn(n, 4), torch.randint(0, 2, (n,))
    ...     def train(self):
    ...         return fl.Loader((self.x, self.y), batch_size=8)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     args = ["fit", "--model.in_features", "4", "--model.out_features", "2", "--recipe.run_dir", d,
    ...             "--recipe.tracker", "none", "--recipe.progress", "false", "--recipe.epochs", "2"]
    ...     cli = FnlightCLI(torch.nn.Linear, Tiny, args=args, run=False)
    ...     cli.run()  # doctest: +ELLIPSIS
    fit: new run in ...
    >>> int(cli.state.step), cli.checkpoint.name, type(cli.model).__name__
    (8, 'step-000000008.ckpt', 'Linear')
    """

    def __init__(
        self,
        model_class: type[nn.Module] | None = None,
        data_class: type | None = None,
        *,
        args: Sequence[str] | None = None,
        subclass_mode_model: bool = False,
        subclass_mode_data: bool = False,
        run: bool = True,
        exit_on_error: bool = True,
        prog: str = "fnlight",
    ) -> None:
        if model_class is not None and not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
            raise TypeError(f"FnlightCLI: model_class must be a torch.nn.Module subclass or None, got {model_class!r}")
        if data_class is not None and not (isinstance(data_class, type) and callable(getattr(data_class, "train", None))):
            raise TypeError(
                f"FnlightCLI: data_class must be a class with a train() method (see fnlight.cli.DataModule) or None, "
                f"got {data_class!r}"
            )
        description = "Train, evaluate and predict from a YAML config with model, data and recipe sections."
        self.parser = ArgumentParser(prog=prog, description=description, exit_on_error=exit_on_error)
        self._subparsers: dict[str, ArgumentParser] = {}
        subcommands = self.parser.add_subcommands(required=True, dest="subcommand")
        for name, help_text in SUBCOMMANDS.items():
            sub = ArgumentParser(description=help_text, exit_on_error=exit_on_error)
            sub.add_argument("-c", "--config", action=ActionConfigFile, help="A YAML config file; give several to layer them.")
            _add_role(sub, "model", model_class or nn.Module, subclass=model_class is None or subclass_mode_model)
            _add_role(sub, "data", data_class or DataModule, subclass=data_class is None or subclass_mode_data)
            sub.add_class_arguments(Recipe, "recipe")
            if name == "fit":
                sub.add_argument(
                    "--overwrite",
                    action=ActionYesNo,
                    default=False,
                    help="Replace a different config.yaml in the run's checkpoints.",
                )
            else:
                sub.add_argument(
                    "--ckpt_path",
                    type=str | None,
                    default=None,
                    help="latest (default), best (by recipe.checkpoint.monitor), or a file.",
                )
            if name == "predict":
                sub.add_argument(
                    "--output", type=str | None, default=None, help="A .pt or .npy file; default <run_dir>/predictions.pt."
                )
            subcommands.add_subcommand(name, sub, help=help_text)
            self._subparsers[name] = sub

        parsed = self.parser.parse_args(args)
        self.subcommand: str = parsed.subcommand
        self.config: Namespace = parsed[self.subcommand]
        _check_sections(self.config, self.subcommand)
        self.state: TrainState | None = None
        self.checkpoint: Path | None = None
        self.metrics: dict[str, float] = {}
        self.predictions: Any = None
        self.output: Path | None = None
        self._setup()
        if run:
            self.run()

    # --- setup: everything that can be refused before any work --------------------------------

    def _setup(self) -> None:
        sub = self.subcommand
        _seed_everything(self.config.recipe.seed)  # before the model's parameters are drawn
        parser = self._subparsers[sub]
        try:
            built = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(self.config)  # renamed in 4.49
        except ConfigError:  # the recipe's own checks
            raise
        except (ValueError, TypeError, RuntimeError) as e:  # a model's or data module's __init__ refused its arguments
            raise ConfigError(_build_error(sub, e)) from e
        self.model, self.data, self.recipe = built.model, built.data, built.recipe
        self.run_dir = Path(self.recipe.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        needed = _EVAL_DATA.get(sub)
        if needed is not None and not callable(getattr(self.data, needed, None)):
            raise ConfigError(f"{sub}: the data module {type(self.data).__name__} has no {needed}() method, which {sub} runs on")
        self.resolved = resolved_config(parser, self.config)
        if sub == "fit" and not self.config.overwrite:
            check_saved_config(self.checkpoint_dir, self.resolved)
        if sub == "predict":
            self.output = Path(self.config.output) if self.config.output else self.run_dir / "predictions.pt"
            if self.output.suffix not in _OUTPUTS:
                raise ConfigError(f"predict: --output must end in one of {list(_OUTPUTS)}, got {str(self.output)!r}")

    # --- subcommands ----------------------------------------------------------------------------

    def run(self) -> None:
        """Run the parsed subcommand (``fit``, ``validate``, ``test`` or ``predict``); results land in the attributes."""
        {"fit": self._fit, "validate": self._evaluate, "test": self._evaluate, "predict": self._predict}[self.subcommand]()

    def _fit(self) -> None:
        recipe, started = self.recipe, time.perf_counter()
        train = self.data.train()
        val = self.data.val() if callable(getattr(self.data, "val", None)) else None
        _, step = _assemble(self.model, recipe, train=train, val=val, hparams=self.resolved, for_fit=True)
        try:  # with_checkpointing refuses checkpoints of another model rather than silently starting over
            state = step.init(seed=recipe.seed)
        except CheckpointMismatchError as e:
            raise ConfigError(
                f"fit: the checkpoints in {self.checkpoint_dir} do not fit this config's model, optimizer and "
                f"transforms, so the run cannot continue from them; choose another --recipe.run_dir. {e}"
            ) from e
        try:  # after the resume check: a refused run changes nothing
            write_saved_config(self.checkpoint_dir, self.resolved)
        except OSError as e:
            raise ConfigError(f"fit: recipe.run_dir {str(self.run_dir)!r} cannot hold the run's files: {e}") from e
        resumed = state.slots["checkpointing"].resumed_from
        position = f"update {int(state.step)}, {int(state.data.batch)} batches into epoch {int(state.data.epoch) + 1}"
        where = f"resumed from {resumed} at {position}" if resumed else "new run"
        print(f"fit: {where} in {self.run_dir}")
        per_epoch = _per_epoch(recipe, train, "fit")

        def record(state: TrainState, metrics: dict[str, Any]) -> None:
            self.metrics = _scalars(metrics)
            values = "  ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
            # the epoch the update belongs to, counted from 1: at an epoch's end (batch 0) the fold has moved past it
            epoch = int(state.data.epoch) + (1 if int(state.data.batch) or not int(state.data.epoch) else 0)
            print(f"epoch {epoch:4d}  update {int(state.step):7d}  {values}", flush=True)

        observers = [Observer(record, steps=per_epoch or recipe.log_every)]
        before = _files(self.checkpoint_dir)  # what this fold did not write (with resume: false, another run's)
        final = fold(
            step, state, train, epochs=recipe.epochs, max_steps=recipe.max_steps, observers=observers, progress=recipe.progress
        )
        latest = find_latest(self.checkpoint_dir)
        # the final state is saved already when the newest checkpoint is of its update and holds it: written by this
        # fold, or the one it resumed from when there was nothing left to train
        holds_final = latest is not None and read_metadata(latest)["metadata"].get("step") == int(final.step)
        if holds_final and str(latest) != resumed and _files(self.checkpoint_dir).get(latest) == before.get(latest):
            holds_final = False  # the same update of a run this one did not resume from (recipe.checkpoint.resume: false)
        if not holds_final:
            latest = step.save_now(final)  # type: ignore[attr-defined]
        self.state, self.checkpoint = final, latest
        _report(
            {
                "trained_to_update": int(final.step),
                "epoch": int(final.data.epoch),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        _report({"checkpoint": str(latest), "config": str(self.checkpoint_dir / CONFIG_NAME)})

    def _restored(self) -> tuple[Any, TrainState]:
        """The recipe's inner step (for evaluation) and the chosen checkpoint restored into its state."""
        sub = self.subcommand
        inner, step = _assemble(self.model, self.recipe, train=self.data.train(), val=None, hparams=None, for_fit=False)
        path = self._checkpoint_path(self.config.ckpt_path)
        try:
            with warnings.catch_warnings():  # the structure only: this step never saves beside the run's checkpoints
                warnings.filterwarnings("ignore", r"with_checkpointing\(resume=False\)", CheckpointWarning)
                target = step.init(seed=self.recipe.seed)
            state = restore(path, target)
        except CheckpointMismatchError as e:
            raise ConfigError(
                f"{sub}: the checkpoint does not fit this config's model, optimizer and transforms; pass the config it "
                f"was trained with (--config {self.checkpoint_dir / CONFIG_NAME}). {e}"
            ) from e
        except (CheckpointError, OSError) as e:
            raise ConfigError(f"{sub}: the checkpoint {str(path)!r} cannot be read: {e}") from e
        self.checkpoint, self.state = path, state
        return inner, state

    def _checkpoint_path(self, given: str | None) -> Path:
        sub = self.subcommand
        if given not in (None, "latest", "best"):
            path = Path(given)
            if not path.is_file():
                raise ConfigError(f"{sub}: --ckpt_path {given!r}: no such file (expected latest, best, or a checkpoint file)")
            return path
        if given == "best":
            return self._best_checkpoint()
        path = find_latest(self.checkpoint_dir)
        if path is None:
            raise ConfigError(
                f"{sub}: no checkpoint (step-*.ckpt) in {self.checkpoint_dir}; run fit with this config first, "
                "or pass --ckpt_path FILE"
            )
        return path

    def _best_checkpoint(self) -> Path:
        sub, ckpt = self.subcommand, self.recipe.checkpoint
        if ckpt.monitor is None:
            raise ConfigError(
                f"{sub}: --ckpt_path best ranks checkpoints by recipe.checkpoint.monitor, which is null; set it (e.g. val/loss)"
            )
        scored = []
        for path in sorted(self.checkpoint_dir.glob("step-*.ckpt")):
            try:
                metadata = read_metadata(path)["metadata"]
            except (CheckpointError, OSError):
                continue
            if metadata.get("monitor") == ckpt.monitor and metadata.get("value") is not None:
                sign = 1.0 if ckpt.mode == "min" else -1.0
                scored.append((sign * metadata["value"], -int(metadata.get("step", 0)), path))
        if not scored:
            raise ConfigError(
                f"{sub}: --ckpt_path best: no checkpoint in {self.checkpoint_dir} records a value of "
                f"{ckpt.monitor!r}; give --ckpt_path latest or a file"
            )
        return min(scored)[2]

    def _evaluate(self) -> None:
        sub = self.subcommand
        which = _EVAL_DATA[sub]
        data = getattr(self.data, which)()
        if data is None:
            raise ConfigError(f"{sub}: {type(self.data).__name__}.{which}() returned None: there is no data to evaluate on")
        inner, state = self._restored()
        prefix = "val/" if which == "val" else "test/"
        evaluation = _built(
            f"{sub}: data.{which}()",
            lambda: with_eval(inner, data=data, loss_fn=self.recipe.loss, at_epoch_end=True, prefix=prefix),
        )
        self.metrics = {k: float(v) for k, v in evaluation.evaluate(state).items()}
        _report({"checkpoint": str(self.checkpoint), "step": int(state.step), **self.metrics})

    def _predict(self) -> None:
        data = self.data.predict()
        if data is None:
            raise ConfigError(f"predict: {type(self.data).__name__}.predict() returned None: there is nothing to predict")
        _, state = self._restored()
        module = to_module(state)
        outputs = []
        with torch.inference_mode():
            for batch in data:
                outputs.append(module(batch[0] if isinstance(batch, (tuple, list)) else batch))
        if not outputs:
            raise ConfigError(f"predict: {type(self.data).__name__}.predict() gave no batches")
        for path, value in zip(*optree.tree_flatten_with_path(outputs[0], none_is_leaf=True)[:2]):
            if not (isinstance(value, torch.Tensor) and value.dim() > 0):
                got = "a 0-d tensor" if isinstance(value, torch.Tensor) else f"{type(value).__name__}: {value!r}"
                where = "".join(f"[{k!r}]" for k in path) or " itself"
                raise ConfigError(
                    f"predict: the model's output{where} is {got}; predict concatenates the outputs of the batches "
                    f"along their first dimension, so every output must be a tensor with a batch dimension"
                )
        predictions = optree.tree_map(lambda *parts: torch.cat(parts), *outputs)
        output = Path(self.output or self.run_dir / "predictions.pt")
        if output.suffix == ".npy" and not isinstance(predictions, torch.Tensor):
            raise ConfigError(
                f"predict: --output {str(output)!r} (.npy) holds one array, but the model returns "
                f"{type(predictions).__name__}; use a .pt file"
            )
        array = None
        if output.suffix == ".npy":
            try:
                array = predictions.numpy()
            except (TypeError, RuntimeError) as e:  # a dtype numpy lacks (bfloat16, float8)
                raise ConfigError(
                    f"predict: --output {str(output)!r} (.npy) cannot hold the model's {predictions.dtype} output: {e}; "
                    "use a .pt file"
                ) from e
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"predict: --output {str(output)!r} cannot be written: {e}") from e
        tmp = output.with_name(f".{output.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                if array is not None:
                    np.save(f, array)
                else:
                    torch.save(predictions, f)
            os.replace(tmp, output)
        except OSError as e:  # a directory of that name, a read-only or full disk: no traceback, no partial file
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"predict: --output {str(output)!r} cannot be written: {e}") from e
        self.predictions = predictions
        shapes = optree.tree_map(lambda t: list(t.shape), predictions)
        _report({"checkpoint": str(self.checkpoint), "step": int(state.step), "output": str(output), "shape": shapes})


def _build_error(sub: str, error: BaseException) -> str:
    """The message for a model or data module whose ``__init__`` raised while the config was built: which, and why."""
    cause = error
    while cause.__cause__ is not None:  # jsonargparse wraps the error of a class given by class_path
        cause = cause.__cause__
    role = "the model or the data module"
    frames = []
    tb = cause.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in frames:  # the outermost __init__ is the one the config called
        obj = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if obj is not None and not isinstance(obj, Recipe):
            kind = "model" if isinstance(obj, nn.Module) else "data"
            role = f"{kind} ({type(obj).__module__}.{type(obj).__qualname__})"
            break
    return f"{sub}: {role} could not be built from the config: {type(cause).__name__}: {cause}"


def _files(directory: Path) -> dict[Path, tuple[int, int]]:
    """The checkpoints in ``directory`` with their inode and modification time: a checkpoint written again changes both."""
    found = {}
    for path in directory.glob("step-*.ckpt"):
        try:
            info = path.stat()
        except OSError:
            continue
        found[path] = (info.st_ino, info.st_mtime_ns)
    return found


def _add_role(parser: ArgumentParser, key: str, cls: type, *, subclass: bool) -> None:
    if subclass:
        parser.add_subclass_arguments(cls, key, required=True)
    else:
        parser.add_class_arguments(cls, key)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fnlight`` command (and ``python -m fnlight.cli``): :class:`FnlightCLI` with any model and data by class path.

    Class paths are imported as ``python -m`` would: the current directory is put on
    ``sys.path`` first, so ``examples.digits_cli.DigitsMLP`` works from the repository root.

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success (also ``--help`` and ``--print_config``), 2 for a
        command-line, config-file or :class:`ConfigError` (the message goes to stderr).

    >>> from fnlight.cli import main
    >>> main(["fit", "--recipe.lrr", "1"])  # stderr: error: unrecognized arguments: --recipe.lrr 1
    2
    """
    added = "" not in sys.path and os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        FnlightCLI(args=argv)
    except ConfigError as e:
        print(f"fnlight: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --print_config (0); argument errors (2) and preemption (143, 130), already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if added:
            sys.path.remove(os.getcwd())
    return 0


def _check_sections(config: Namespace, sub: str) -> None:
    """Refuse a recipe section, or its checkpoint/early_stop section, that is not a mapping.

    jsonargparse crashes on such a section, or replaces it by the defaults when the command
    line overrides one of its keys, so the config files given (``--config``, and a ``--recipe``
    file) are read for them as well. A null ``early_stop`` is no early stopping; a null
    ``checkpoint`` is refused like any other non-mapping.
    """
    expected = {"recipe": "Recipe", "recipe.checkpoint": "CheckpointConfig", "recipe.early_stop": "EarlyStopConfig"}
    recipe = config.get("recipe")
    # --config files hold the recipe as their "recipe" section; a --recipe file is the recipe itself
    files = [(path, False) for path in config.get("config") or []]
    if isinstance(recipe, Namespace) and recipe.get("__path__") is not None:
        files.append((recipe.get("__path__"), True))
    for path, whole in files:
        if path is None:  # a config given inline (YAML text, not a file): its types are checked below only
            continue
        try:
            content = yaml.safe_load(Path(os.fspath(path)).read_text())
        except (OSError, TypeError, ValueError, yaml.YAMLError):
            continue  # the parser has read it already; what it could not read it reported
        section = content if whole else content.get("recipe") if isinstance(content, dict) else None
        sections = {"recipe": section}
        if isinstance(section, dict):  # null is no early stopping, but not a checkpoint setting
            sections.update({f"recipe.{k}": section[k] for k in ("checkpoint", "early_stop") if k in section})
        for key, value in sections.items():
            if not (isinstance(value, dict) or (value is None and key != "recipe.checkpoint")):
                raise ConfigError(
                    f"{sub}: {key} in {path} must be a mapping of {expected[key]} fields, got {type(value).__name__}: {value!r}"
                )
    if not isinstance(recipe, Namespace):
        raise ConfigError(f"{sub}: recipe must be a mapping of Recipe fields, got {type(recipe).__name__}: {recipe!r}")
    for key, allowed_none in (("checkpoint", False), ("early_stop", True)):
        value = recipe.get(key)
        if not (isinstance(value, Namespace) or (allowed_none and value is None)):
            raise ConfigError(
                f"{sub}: recipe.{key} must be a mapping of {expected['recipe.' + key]} fields, "
                f"got {type(value).__name__}: {value!r}"
            )
