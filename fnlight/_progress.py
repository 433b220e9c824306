"""The fold's progress display: step, epoch, loss, steps/s and ETA, drawn with rich."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]

# The rich console the bar draws on; None draws on stderr (whose being a terminal enables the bar by default),
# keeping stdout for the program's own output. Tests point it at a buffer.
CONSOLE: Any = None


class Progress:
    """A rich progress bar fed by the fold; reads the loss (a host sync) at most every ``refresh`` s."""

    def __init__(self, *, total: int | None, enabled: bool | None, refresh: float = 0.25, start_step: int = 0) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.enabled = enabled
        self._refresh = refresh
        self._bar: Any = None
        self._last = 0.0
        self._t0 = time.perf_counter()
        self._start_step = start_step
        self.console: Any = CONSOLE
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("step {task.completed}" + ("/{task.total}" if total else "")),
            BarColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}  {task.fields[rate]}"),
            TimeRemainingColumn(),
            transient=False,
            auto_refresh=False,
            console=CONSOLE if CONSOLE is not None else Console(stderr=True),
        )
        self.console = self._bar.console
        self._task = self._bar.add_task("fold", total=total, completed=start_step, epoch=0, loss="-", rate="")
        self._bar.start()

    def update(self, step: int, epoch: int, metrics: dict[str, Any], *, force: bool = False) -> None:
        if self._bar is None:
            return
        now = time.perf_counter()
        if not force and now - self._last < self._refresh:
            return
        self._last = now
        loss = metrics.get("loss")
        done = step - self._start_step
        rate = f"{done / (now - self._t0):.1f} steps/s" if done > 0 else ""
        self._bar.update(self._task, completed=step, epoch=epoch, loss=_show(loss), rate=rate)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _show(loss: Any) -> str:
    """The loss as shown: a number, or the mean of a per-replica loss (ensembles: ``[K]``)."""
    if loss is None:
        return "-"
    if getattr(loss, "ndim", 0):
        return f"{float(loss.float().mean()):.4g} (mean of {loss.numel()})"
    return f"{float(loss):.4g}"
