"""The run's ``config.yaml``: the resolved config saved beside its checkpoints, and a different one refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ._recipe import ConfigError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

CONFIG_NAME = "config.yaml"
SECTIONS = ("model", "data", "recipe")
# what only changes how the run is shown or how often metrics are sent, not what it computes: a resume may change it
PRESENTATION = ("progress", "log_every")


def resolved_config(parser: ArgumentParser, config: Namespace) -> dict[str, Any]:
    """The ``model``, ``data`` and ``recipe`` sections of a parsed config as plain data, nulls included.

    Subcommand options (``--overwrite``, ``--ckpt_path``, ``--output``) are left out, so the
    file that ``fit`` saves is a valid ``--config`` for every subcommand.
    """
    try:
        text = parser.dump(config, skip_unset=False)
    except TypeError:  # jsonargparse < 4.49 calls it skip_none
        text = parser.dump(config, skip_none=False)
    return {k: v for k, v in yaml.safe_load(text).items() if k in SECTIONS}


class _Absent:
    def __repr__(self) -> str:
        return "absent"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: tree}


def differences(saved: Any, given: Any, *, limit: int = 5) -> str:
    """``key: saved X, given Y`` for each dotted key whose value differs (the first ``limit`` of them)."""
    a, b, absent = _flat(saved), _flat(given), _Absent()
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k, absent) != b.get(k, absent)]
    shown = [f"{k}: saved {a.get(k, absent)!r}, given {b.get(k, absent)!r}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _compared(config: Any) -> Any:
    """``config`` without the recipe's presentation keys (``recipe.progress``, ``recipe.log_every``)."""
    if not (isinstance(config, dict) and isinstance(config.get("recipe"), dict)):
        return config
    return {**config, "recipe": {k: v for k, v in config["recipe"].items() if k not in PRESENTATION}}


def check_saved_config(directory: Path, resolved: dict[str, Any]) -> None:
    """Refuse a run directory whose saved config differs from ``resolved`` (the same config resumes).

    ``recipe.progress`` and ``recipe.log_every`` are not compared: they change what the run shows
    and how often it sends metrics, not what it computes.
    """
    path = directory / CONFIG_NAME
    if not path.exists():
        return
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:  # edited by hand, or not a file
        raise ConfigError(
            f"fit: {path} (the run's saved config) cannot be read: {type(e).__name__}: {e}; pass --overwrite to replace "
            f"it with this config, or choose another --recipe.run_dir"
        ) from e
    saved, given = _compared(saved), _compared(resolved)
    if saved != given:
        raise ConfigError(
            f"fit: {path} holds a different config ({differences(saved, given)}); pass --overwrite to continue "
            f"the run in {directory.parent} with this config, or choose another --recipe.run_dir"
        )


def write_saved_config(directory: Path, resolved: dict[str, Any]) -> Path:
    """Write ``directory/config.yaml`` atomically (a crash leaves the previous file or none)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_NAME
    tmp = directory / f".{CONFIG_NAME}.tmp"
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    os.replace(tmp, path)
    return path
