"""The options that define an example's run, kept beside its checkpoints (shared by digits.py, charlm.py and ddp.py).

Resuming a run under other options would mix two runs (another ``--seed`` is another data split,
another ``--batch-size`` another position in the data), so a script that resumes from its last
checkpoint calls :func:`keep_run_options` first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def keep_run_options(
    parser: argparse.ArgumentParser,
    checkpoints: Path,
    options: dict[str, Any],
    *,
    launch: dict[str, Any] | None = None,
    record: bool = True,
) -> None:
    """Stop (``parser.error``) when ``checkpoints`` holds a run made with other ``options``; else record them.

    The options are written to ``checkpoints/options.json`` when there is no checkpoint to resume
    from; each option that differs from the saved run's is named with both values. ``launch``
    holds what defines the run without being an option (ddp.py: the world size), named as given.
    Under several ranks every rank checks (all stop together) and only one ``record``s.
    """
    named = {f"--{k.replace('_', '-')}": (k, v) for k, v in options.items()} | {k: (k, v) for k, v in (launch or {}).items()}
    saved_options = checkpoints / "options.json"
    if saved_options.exists() and any(checkpoints.glob("*.ckpt")):  # a checkpoint to resume from
        saved = json.loads(saved_options.read_text())
        changed = [f"{name}: saved {saved.get(k)!r}, given {v!r}" for name, (k, v) in named.items() if v != saved.get(k)]
        if changed:
            parser.error(
                f"{checkpoints} holds a run made with other options ({'; '.join(changed)}); "
                "pass the same options to resume it, --fresh to start over, or another --run-dir"
            )
    elif record:
        checkpoints.mkdir(parents=True, exist_ok=True)
        saved_options.write_text(json.dumps(dict(named.values())))
