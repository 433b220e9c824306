"""The fnlight command line: ``fnlight fit|validate|test|predict --config run.yaml``.

A config has three sections, each checked against type hints by jsonargparse: ``model``
(any ``nn.Module``, by ``class_path`` and ``init_args``), ``data`` (a :class:`DataModule`)
and ``recipe`` (a :class:`Recipe`: fnlight's run settings). ``fit`` assembles
``make_train_step`` and the transforms in the canonical order (:func:`make_recipe_step`) and
folds; ``validate``/``test``/``predict`` restore a checkpoint. See ``docs/cli.md``.

Needs the ``cli`` extra: ``pip install 'fnlight[cli]'`` (jsonargparse, pyyaml).
"""

from ._cli import FnlightCLI, main
from ._data import DataModule
from ._recipe import CheckpointConfig, ConfigError, EarlyStopConfig, Recipe, make_recipe_step

__all__ = ["CheckpointConfig", "ConfigError", "DataModule", "EarlyStopConfig", "FnlightCLI", "Recipe", "main", "make_recipe_step"]
