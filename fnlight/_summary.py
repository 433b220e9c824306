"""Model summary: parameter counts per module, trainable vs frozen, size in MiB."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from ._state import TrainState

__all__ = ["ModelSummary", "SummaryRow", "print_summary", "summary"]


class SummaryRow(NamedTuple):
    """One module of a :class:`ModelSummary`."""

    name: str
    kind: str
    trainable: int
    frozen: int
    mib: float

    @property
    def params(self) -> int:
        """Trainable plus frozen parameters."""
        return self.trainable + self.frozen


class ModelSummary(NamedTuple):
    """Rows per module (to ``depth``) and totals over the whole model (shared tensors counted once)."""

    rows: tuple[SummaryRow, ...]
    total: SummaryRow
    buffers_mib: float

    def __str__(self) -> str:
        width = max([len(r.name) for r in (*self.rows, self.total)] + [6])
        lines = [f"{'module':<{width}}  {'type':<20} {'params':>12} {'trainable':>12} {'frozen':>10} {'MiB':>9}"]
        for r in (*self.rows, self.total):
            lines.append(f"{r.name:<{width}}  {r.kind:<20} {r.params:>12,} {r.trainable:>12,} {r.frozen:>10,} {r.mib:>9.2f}")
        return "\n".join(lines)


def _count(tensors: list[tuple[Tensor, bool]]) -> tuple[int, int, float]:
    trainable = sum(t.numel() for t, train in tensors if train)
    frozen = sum(t.numel() for t, train in tensors if not train)
    return trainable, frozen, sum(t.numel() * t.element_size() for t, _ in tensors) / 2**20


def summary(model: nn.Module | TrainState, *, depth: int = 1) -> ModelSummary:
    """Parameter counts per module down to ``depth`` levels, trainable vs frozen, and size in MiB.

    For a ``TrainState`` the counts and sizes are those of the state's tensors (e.g. their
    dtypes after ``with_amp(mode="true")``); trainable means ``requires_grad`` was set on the
    model's parameter (the step updates it). For a stacked ensemble state the counts and
    sizes cover all K replicas, and each row's type says so (``Linear x4 replicas``).

    Raises:
        TypeError: ``model`` is not a module or a ``TrainState``, or ``depth`` is not an int.
        ValueError: ``depth`` is below 1.

    >>> import torch
    >>> s = summary(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    >>> [(r.name, r.params) for r in s.rows], s.total.params
    ([('0', 16), ('1', 0), ('2', 10)], 26)
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"summary: depth must be an int >= 1, got {type(depth).__name__} {depth!r}")
    if depth < 1:
        raise ValueError(f"summary: depth must be an int >= 1, got {depth!r}")
    if isinstance(model, TrainState):
        if model.skeleton is None:
            raise TypeError(
                "summary: expected an nn.Module or a TrainState with a module skeleton (a step's init() makes one), "
                "got a TrainState without one"
            )
        module = model.skeleton
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}  # the skeleton keeps the flags
        values = {**model.params}
        buffers = model.buffers
    elif isinstance(model, nn.Module):
        module = model
        values = dict(model.named_parameters())
        trainable = {n for n, p in values.items() if p.requires_grad}
        buffers = dict(model.named_buffers())
    else:
        raise TypeError(f"summary: expected an nn.Module or a TrainState, got {type(model).__name__}")
    key = model.key if isinstance(model, TrainState) else None
    replicas = f" x{key.shape[0]} replicas" if isinstance(key, Tensor) and key.ndim == 1 else ""
    canonical = {id(p): n for n, p in module.named_parameters()}  # a tied weight counts under its first name
    rows = []
    for name, sub in module.named_modules(remove_duplicate=False):  # a module shared by two names is a row under each
        if not name or name.count(".") + 1 > depth:
            continue
        ids, tensors = set(), []
        for pname, p in sub.named_parameters(prefix=name):
            if id(p) not in ids:
                ids.add(id(p))
                pname = canonical.get(id(p), pname)
                tensors.append((values.get(pname, p), pname in trainable))
        rows.append(SummaryRow(name, type(sub).__name__ + replicas, *_count(tensors)))
    total = SummaryRow("total", type(module).__name__ + replicas, *_count([(t, n in trainable) for n, t in values.items()]))
    buffers_mib = sum(b.numel() * b.element_size() for b in buffers.values()) / 2**20
    return ModelSummary(tuple(rows), total, buffers_mib)


def print_summary(model: nn.Module | TrainState, *, depth: int = 1, console: Any = None) -> ModelSummary:
    """Print :func:`summary` as a rich table (to ``console``, default stderr) and return it.

    Raises:
        TypeError: ``console`` is not a ``rich.console.Console`` (or ``None``), or as :func:`summary`.
        ValueError: as :func:`summary`.

    >>> import io, torch, fnlight as fl
    >>> from rich.console import Console
    >>> console = Console(file=io.StringIO(), width=80)
    >>> fl.print_summary(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), console=console).total.trainable
    9
    >>> "Linear" in console.file.getvalue()
    True
    """
    from rich.console import Console
    from rich.table import Table

    if console is not None and not isinstance(console, Console):
        raise TypeError(f"print_summary: console must be a rich.console.Console or None, got {type(console).__name__}")
    s = summary(model, depth=depth)
    table = Table(title="model summary", title_justify="left")
    for column, justify in (
        ("module", "left"),
        ("type", "left"),
        ("params", "right"),
        ("trainable", "right"),
        ("frozen", "right"),
        ("MiB", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in (*s.rows, s.total):
        table.add_row(
            r.name,
            r.kind,
            f"{r.params:,}",
            f"{r.trainable:,}",
            f"{r.frozen:,}",
            f"{r.mib:.2f}",
            style="bold" if r is s.total else None,
        )
    (console or Console(stderr=True)).print(table)
    return s
