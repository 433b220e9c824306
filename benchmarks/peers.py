"""Step time and peak memory of fnlight against its peers: hand-written loops, Lightning's Trainer and Fabric.

Six ways to train the same model on the same batches, measured in this one run:

- (a) hand-written loop, ``torch.optim.AdamW(foreach=True)``:
  ``opt.zero_grad(set_to_none=True); loss_fn(model, batch).backward(); opt.step()``
- (b) the same loop with ``torch.optim.AdamW(fused=True)``: **the reference**,
- (c) fnlight eager: ``fnlight.fold(step, state, batches, donate="model", progress=False)``
  with ``fnlight.optim.adamw`` (the same fused kernel; ``donate="model"`` trains the model's
  own tensors in place, as (a) and (b) do),
- (d) fnlight compiled: (c) with the whole step compiled (``fnlight.with_compile`` or
  ``fold(..., compile=True)``, whichever this fnlight has; the row is left out, with a note,
  when it has neither),
- (e) Lightning's ``Trainer`` (a ``LightningModule`` whose ``training_step`` returns the same
  loss, ``configure_optimizers`` the same fused AdamW; ``logger=False,
  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
  accelerator="cpu", devices=1``),
- (f) Lightning Fabric: ``fabric.setup(model, opt)``, the loop of (b) with ``fabric.backward``.

(e) and (f) need ``lightning`` (installed by ``nox -s bench`` only); without it they are left
out with a printed note.

Step time: the models and batches of ``step_overhead.py`` (MLP 784-512-512-10 batch 64, the
small transformer encoder, and the tiny MLP that shows the fixed cost per step). Each method
has its own copy of the model with identical initial weights. After warm-up, every round
times one block of N steps per method (the same N batches), in an order rotated each round;
the table gives the median ms/step over rounds, the spread, the ratio of medians to (b) and
the median of the per-round ratios to (b) (paired: adjacent in time, less sensitive to the
machine's drift). The final weights are compared with (b)'s as a check that every method did
the same training.

How the Trainer is timed: a ``Trainer`` cannot be paused and resumed between ``fit`` calls
without paying ``fit``'s setup each time, so one ``fit`` runs over all rounds, one epoch per
block (the N batches), and drives the interleaving from a callback: at the end of each epoch
the callback records the Trainer's block time and runs the other methods' blocks that come
before the Trainer's next turn, then restarts the clock. A Trainer block is thus the wall time
from one epoch end to the next: N steady-state steps with everything the Trainer does per batch
and one epoch transition, as a fold block is one ``fold`` call. ``fit``'s own setup and the
warm-up epochs are not timed. (Per-batch hooks with ``perf_counter`` would miss the loop's work
between batches.)

Peak RSS: each (method, model) in its own subprocess (this script with the hidden
``--rss-worker`` flag): build the model, train N steps, report the peak RSS (``VmHWM``; a
child of ``subprocess`` inherits its parent's ``ru_maxrss``) and the RSS after imports (so
the cost of importing Lightning shows separately). Every worker first takes one
``torch.optim.AdamW`` step on a 2x2 layer: torch.optim's first step imports ~800 modules
(``torch._dynamo``...; ~90 MiB) that fnlight's optimizers never load, which would otherwise
show as training memory of the hand loops only. Models: the MLP and the transformer above,
and the 100.7M-parameter MLP of ``step_overhead.py``, where the training state dominates.
The compiled row (d) is built with ``fallback="raise"``, so a step that cannot be compiled
is reported (and left out) rather than timed eagerly under the compiled label.

Peak tensor memory: a second subprocess per (method, model) runs the same training under
``torch.profiler`` with ``profile_memory=True`` and reports the most tensor memory live at
once (``tensor_peak_mib``): the CPU counterpart of ``torch.cuda.max_memory_allocated``, which
is what "peak memory" means on a GPU. RSS also counts what no tensor holds: the interpreter,
imported modules, and for (d) the compiler's own modules and data.

Acceptance targets (issue 8), medians of this run, on the MLP and the transformer: (c) <= 1.00x
(b), (d) <= 0.85x (b), (c) and (d) <= 0.75x (e); peak RSS and peak tensor memory of (c) and
(d) <= 1.02x (b). The script prints whether each is met (not in a --quick run); it always
exits 0.

Run (from the repository root; fnlight need not be installed)::

    python benchmarks/peers.py                  # full run, about 10 minutes on 2 vCPUs
    python benchmarks/peers.py --quick          # smoke run (no compiled row, small models)
    python benchmarks/peers.py --markdown out.md --methods a b c e
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import inspect
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import (
    LR,
    WEIGHT_DECAY,
    WORKLOADS,
    HandLoop,
    RssConfig,
    Workload,
    _table,
    classification_loss,
    fl,
    keep_freed_heap,
    maxrss_mib,
    mlp,
    n_params,
    quartiles,
    rss_mib,
)

Batch = tuple[Tensor, Tensor]
METHODS = ("a", "b", "c", "d", "e", "f")
LABELS = {
    "a": "(a) hand loop, AdamW foreach",
    "b": "(b) hand loop, AdamW fused",
    "c": "(c) fnlight fold, eager",
    "d": "(d) fnlight fold, compiled",
    "e": "(e) Lightning Trainer",
    "f": "(f) Lightning Fabric",
}
LIGHTNING = ("e", "f")
TARGETS = {"c": 1.00, "d": 0.85}  # step time vs (b)
VS_TRAINER = 0.75  # (c) and (d) vs (e)
MEMORY = 1.02  # peak RSS and peak tensor memory of (c) and (d) vs (b)
MEMORY_TITLE = (
    "Peak memory, two subprocesses per method and model: peak RSS (VmHWM) in one, in the other the most "
    "tensor memory live at once (torch's CPU allocator under the profiler: the CPU counterpart of "
    "torch.cuda.max_memory_allocated)"
)


# --------------------------------------------------------------------------- what is available


def lightning_version() -> str | None:
    """``lightning.__version__``, or ``None`` when Lightning is not importable."""
    try:
        import lightning
    except ImportError:
        return None
    return str(lightning.__version__)


def compile_api() -> str | None:
    """How this fnlight compiles a whole step: ``"with_compile"``, ``"fold(compile=True)"`` or ``None``."""
    if _with_compile() is not None:
        return "with_compile"
    if "compile" in inspect.signature(fl.fold).parameters:
        return "fold(compile=True)"
    return None


def _with_compile() -> Callable[..., Any] | None:
    for where in (fl, getattr(fl, "transforms", None)):
        found = getattr(where, "with_compile", None)
        if callable(found):
            return found
    return None


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: ``VmHWM``, which starts afresh at ``exec``.

    (``ru_maxrss`` does not: a child started with ``vfork``/``exec``, as ``subprocess`` does,
    reports at least its parent's RSS at the time, which hides the peak of a small model.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_mib()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info lines ("GPU available: False...") and its advice warnings."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


# --------------------------------------------------------------------------- methods


class FoldPeer:
    """(c)/(d): ``fnlight.fold`` with ``fnlight.optim.adamw``, eager or with the whole step compiled."""

    def __init__(self, model: nn.Module, *, compiled: str | None) -> None:
        step = fl.make_train_step(model, classification_loss, fl.optim.adamw(LR, weight_decay=WEIGHT_DECAY))
        self.kwargs: dict[str, Any] = {}
        if compiled == "with_compile":
            with_compile = _with_compile()
            assert with_compile is not None
            # a step that cannot be compiled must fail here, not fall back to eager under the compiled label
            raising = {"fallback": "raise"} if "fallback" in inspect.signature(with_compile).parameters else {}
            step = with_compile(step, **raising)
        elif compiled is not None:
            self.kwargs["compile"] = True
        self.step = step
        self.state = step.init(seed=0)

    def __call__(self, batches: Sequence[Batch]) -> None:
        epochs = int(self.state.data.epoch) + 1
        self.state = fl.fold(self.step, self.state, batches, epochs=epochs, donate="model", progress=False, **self.kwargs)

    def params(self) -> dict[str, Tensor]:
        return dict(self.state.params)


class FabricLoop:
    """(f): the loop of (b) set up by Lightning Fabric (``fabric.setup``, ``fabric.backward``)."""

    def __init__(self, model: nn.Module) -> None:
        from lightning.fabric import Fabric

        with quiet_lightning():
            self.fabric = Fabric(accelerator="cpu", devices=1)
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
            self.model, self.opt = self.fabric.setup(model, opt)
        self.plain = model

    def __call__(self, batches: Sequence[Batch]) -> None:
        model, opt, fabric = self.model, self.opt, self.fabric
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            loss = classification_loss(model, batch)
            fabric.backward(loss)
            opt.step()

    def params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.plain.named_parameters()}


class Block:
    """The block's batches as one plain iterable (a list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_module(model: nn.Module) -> Any:
    """A ``LightningModule`` training ``model`` with the loss and the fused AdamW of (b)."""
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
            return classification_loss(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    return Classifier()


def make_trainer(max_steps: int, callbacks: Sequence[Any] = ()) -> Any:
    """The Trainer of (e): one CPU device, no logger, checkpointing, progress bar or model summary."""
    import lightning.pytorch as pl

    with quiet_lightning():
        return pl.Trainer(
            max_steps=max_steps,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            callbacks=list(callbacks),
        )


def fit_interleaved(
    model: nn.Module, batches: Sequence[Batch], schedule: Iterator[None], *, warmup: int, rounds: int, threads: int
) -> list[float]:
    """(e): one ``fit``, one epoch per block; between epochs a callback runs ``schedule`` up to the Trainer's next turn.

    Returns the Trainer's ms/step of each timed block (epoch end to epoch end, see the module docstring).
    """
    import lightning.pytorch as pl

    times: list[float] = []
    steps = len(batches)

    class Interleave(pl.Callback):
        epochs = 0
        t0: float | None = None

        def on_train_start(self, trainer: Any, module: Any) -> None:
            torch.set_num_threads(threads)  # the same intra-op threads as every other method

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            now = time.perf_counter()
            if self.t0 is not None:
                times.append((now - self.t0) * 1e3 / steps)
                self.t0 = None
            self.epochs += 1
            if self.epochs < warmup:
                return
            try:
                next(schedule)  # the other methods' blocks until the Trainer's turn
            except StopIteration:
                trainer.should_stop = True
                return
            gc.collect()
            self.t0 = time.perf_counter()

    trainer = make_trainer((warmup + rounds + 1) * steps, [Interleave()])
    with quiet_lightning():
        trainer.fit(lightning_module(model), train_dataloaders=Block(batches))
    if len(times) != rounds:
        raise RuntimeError(f"the Trainer timed {len(times)} blocks, expected {rounds}")
    return times


def make_runner(method: str, model: nn.Module, compiled: str | None) -> Callable[[Sequence[Batch]], None]:
    if method in ("a", "b"):
        return HandLoop(model, fused=method == "b")
    if method in ("c", "d"):
        return FoldPeer(model, compiled=compiled if method == "d" else None)
    if method == "f":
        return FabricLoop(model)
    raise ValueError(f"method {method!r} has no block runner (the Trainer drives its own loop)")


def params_of(runner: Any, model: nn.Module) -> dict[str, Tensor]:
    return runner.params() if runner is not None else {n: p.detach() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- step time


@dataclasses.dataclass
class TimeResult:
    """Per-round ms/step of each method on one workload, and each method's final-weight distance to (b)."""

    workload: Workload
    params: int
    methods: list[str]
    ms: dict[str, list[float]]
    max_diff: dict[str, float]
    notes: list[str]

    def median(self, m: str) -> float:
        return statistics.median(self.ms[m])

    def paired(self, num: str, den: str) -> list[float]:
        return [x / y for x, y in zip(self.ms[num], self.ms[den], strict=True)]


def time_workload(
    w: Workload, methods: Sequence[str], *, rounds: int, steps: int, warmup: int, threads: int, compiled: str | None
) -> TimeResult:
    """Warm up, then time ``rounds`` blocks of ``steps`` steps per method in an order rotated each round."""
    torch.manual_seed(0)
    reference = w.build()
    g = torch.Generator().manual_seed(1)
    batches = [w.batch(g) for _ in range(steps)]
    models = {m: copy.deepcopy(reference) for m in methods}
    runners = {m: make_runner(m, models[m], compiled) for m in methods if m not in ("d", "e")}
    notes = []
    if "d" in methods:
        try:  # the first call compiles
            runners["d"] = make_runner("d", models["d"], compiled)
            runners["d"](batches)
        except Exception as e:  # a compile API in flux must not cost the other columns
            notes.append(f"(d) fnlight compiled: left out, it failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            methods = [m for m in methods if m != "d"]
            runners.pop("d", None)
    for i in range(warmup):
        for m, run in runners.items():
            if not (m == "d" and i == 0):  # (d) ran its first warm-up block above
                run(batches)
    ms: dict[str, list[float]] = {m: [] for m in methods}

    def schedule() -> Iterator[None]:
        for r in range(rounds):
            for m in [*methods[r % len(methods) :], *methods[: r % len(methods)]]:
                if m == "e":
                    yield  # the Trainer times its own block
                    continue
                gc.collect()
                t0 = time.perf_counter()
                runners[m](batches)
                ms[m].append((time.perf_counter() - t0) * 1e3 / steps)

    if "e" in methods:
        ms["e"] = fit_interleaved(models["e"], batches, schedule(), warmup=warmup, rounds=rounds, threads=threads)
    else:
        for _ in schedule():
            raise AssertionError("unreachable: no Trainer in the schedule")
    ref = params_of(runners["b"], models["b"])
    diffs = {}
    for m in methods:
        got = params_of(runners.get(m), models[m])
        diffs[m] = max(float((ref[n] - got[n].detach()).abs().max()) for n in ref)
    return TimeResult(w, n_params(reference), list(methods), ms, diffs, notes)


# --------------------------------------------------------------------------- peak RSS


def rss_workloads(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Batch], int, str]]:
    """name -> (build, batch, steps, description) of the models whose peak RSS is measured."""
    small = {"mlp": (WORKLOADS[0], 20), "transformer": (WORKLOADS[1], 10)}  # step_overhead.py's MLP and transformer
    out = {k: (w.build, w.batch, 3 if quick else n, w.name) for k, (w, n) in small.items()}
    if quick:
        return {"mlp": out["mlp"]}
    cfg = RssConfig()

    def large_batch(g: torch.Generator) -> Batch:
        return torch.randn(cfg.batch, cfg.d_in, generator=g), torch.randint(0, 10, (cfg.batch,), generator=g)

    out["large"] = (lambda: mlp(cfg.widths()), large_batch, cfg.steps, cfg.describe())
    return out


def tensor_peak_mib(run: Callable[[], None]) -> float:
    """The most tensor memory live at once while ``run()`` runs, in MiB (``fnlight.testing.peak_tensor_bytes``)."""
    from fnlight.testing import peak_tensor_bytes

    return peak_tensor_bytes(run) / 2**20


def rss_worker(method: str, workload: str, quick: bool, compiled: str | None, *, tensors: bool = False) -> dict[str, float]:
    """Train one model for a few steps with ``method``; report peak RSS (run in a subprocess).

    With ``tensors``, report the peak of live tensor memory instead (:func:`tensor_peak_mib`), in a
    process of its own: the profiler's own memory would disturb the RSS figures.
    """
    if method in LIGHTNING:
        import lightning.pytorch  # noqa: F401  (imports count in the baseline, as for every method)
    # torch.optim's first step imports ~800 modules (torch._dynamo, sympy...: ~90 MiB); take that
    # step on a 2x2 layer first, so that it counts in every worker's baseline, not only in (a)/(b)'s peak
    layer = nn.Linear(2, 2)
    opt = torch.optim.AdamW(layer.parameters(), fused=True)
    layer(torch.ones(1, 2)).sum().backward()
    opt.step()
    del layer, opt
    baseline = rss_mib()
    build, make_batch, steps, _ = rss_workloads(quick)[workload]
    kept: list[nn.Module] = []

    def train() -> None:
        torch.manual_seed(0)
        model = build()
        kept.append(model)  # kept alive for the whole run, as a user script keeps it
        g = torch.Generator().manual_seed(1)
        batches = [make_batch(g) for _ in range(steps)]
        if method == "e":
            with quiet_lightning():
                make_trainer(steps).fit(lightning_module(model), train_dataloaders=Block(batches))
        else:
            make_runner(method, model, compiled)(batches)

    if tensors:
        return {"tensor_peak": tensor_peak_mib(train), "params": float(n_params(kept[0]))}
    train()
    return {"peak": peak_rss_mib(), "baseline": baseline, "params": float(n_params(kept[0]))}


def measure_rss(
    methods: Sequence[str], *, quick: bool, threads: int, compiled: str | None, jobs: int
) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> method -> {peak, baseline, params, tensor_peak}, each from fresh subprocesses of this script.

    Two subprocesses per (workload, method): one for the RSS figures, one for the peak of live
    tensor memory (under the profiler, whose own memory would disturb the RSS).
    """

    def one(key: tuple[str, str, bool]) -> dict[str, float]:
        workload, method, tensors = key
        cmd = [sys.executable, __file__, "--threads", str(threads), "--rss-worker", method, "--rss-workload", workload]
        cmd += ["--quick"] if quick else []
        cmd += ["--rss-compiled", compiled] if compiled else []
        cmd += ["--rss-tensors"] if tensors else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode and method == "d":  # as in the step-time table: (d) failing leaves the others
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"failed": 1.0, "why": last[:300]}  # type: ignore[dict-item]
        if proc.returncode:
            raise RuntimeError(f"rss worker {method!r} on {workload!r} failed (exit {proc.returncode}):\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    keys = [(w, m, tensors) for w in rss_workloads(quick) for m in methods for tensors in (False, True)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # memory does not depend on timing
        values = list(pool.map(one, keys))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (w, m, _), v in zip(keys, values, strict=True):
        merged = out.setdefault(w, {}).setdefault(m, {})  # a failure of either worker leaves the method out
        if "failed" in v:
            merged.clear()
        if "failed" not in merged:
            merged.update(v)
    return out


# --------------------------------------------------------------------------- report


def _verdict(value: float, limit: float) -> str:
    return f"{value:.3f}x, {'met' if value <= limit else 'NOT met'}"


def time_report(results: Sequence[TimeResult], methods: Sequence[str], *, markdown: bool, verdicts: bool) -> list[str]:
    header = (
        "model",
        "method",
        "ms/step (median)",
        "p25-p75",
        "min-max",
        "vs (b)",
        "paired vs (b) [p25-p75]",
        "vs (e)",
        "max abs Δw vs (b)",
    )
    trainer = "e" in methods
    rows: list[list[str]] = []
    notes: list[str] = []
    for res in results:
        ref = res.median("b")
        for i, m in enumerate(res.methods):
            xs = res.ms[m]
            lo, hi = quartiles(xs)
            plo, phi = quartiles(res.paired(m, "b"))
            rows.append(
                [
                    res.workload.name if i == 0 else "",
                    LABELS[m],
                    f"{res.median(m):.3f}",
                    f"{lo:.3f}-{hi:.3f}",
                    f"{min(xs):.3f}-{max(xs):.3f}",
                    f"{res.median(m) / ref:.3f}x",
                    f"{statistics.median(res.paired(m, 'b')):.3f}x [{plo:.3f}-{phi:.3f}]",
                    f"{res.median(m) / res.median('e'):.3f}x" if trainer else "",
                    f"{res.max_diff[m]:.1e}",
                ]
            )
            if not trainer:
                del rows[-1][-2]
        notes += [f"{res.workload.name}: {n}" for n in res.notes]
        if not (res.workload.target and verdicts):
            continue
        for m, limit in TARGETS.items():
            if m not in res.methods:
                notes.append(f"{res.workload.name}: target {LABELS[m][:3]} <= {limit:.2f}x (b): not measured")
            if m in res.methods:
                paired = statistics.median(res.paired(m, "b"))
                notes.append(
                    f"{res.workload.name}: target {LABELS[m][:3]} <= {limit:.2f}x (b): "
                    f"{_verdict(res.median(m) / ref, limit)} (paired {paired:.3f}x)"
                )
            if m in res.methods and trainer:
                paired = statistics.median(res.paired(m, "e"))
                notes.append(
                    f"{res.workload.name}: target {LABELS[m][:3]} <= {VS_TRAINER:.2f}x (e): "
                    f"{_verdict(res.median(m) / res.median('e'), VS_TRAINER)} (paired {paired:.3f}x)"
                )
    if not trainer:
        header = header[:-2] + header[-1:]
    table = _table(header, rows, left=2, markdown=markdown)
    return [*table, "", *([f"- {n}" for n in notes] if markdown else notes)]


def rss_report(
    rss: dict[str, dict[str, dict[str, float]]], descriptions: dict[str, str], *, markdown: bool, verdicts: bool
) -> list[str]:
    header = (
        "model",
        "method",
        "peak RSS MiB",
        "vs (b)",
        "above imports MiB",
        "vs (b)",
        "after imports MiB",
        "peak tensors MiB",
        "vs (b)",
    )
    rows: list[list[str]] = []
    notes: list[str] = []
    for w, by_method in rss.items():
        b = by_method["b"]
        for m, r in list(by_method.items()):
            if "failed" in r:
                notes.append(f"{descriptions[w]}: {LABELS[m]} left out, its worker failed: {r['why']}")
                del by_method[m]
        for i, (m, r) in enumerate(by_method.items()):
            rows.append(
                [
                    f"{descriptions[w]} ({r['params'] / 1e6:.1f}M params)" if i == 0 else "",
                    LABELS[m],
                    f"{r['peak']:.0f}",
                    f"{r['peak'] / b['peak']:.3f}x",
                    f"{r['peak'] - r['baseline']:.0f}",
                    f"{(r['peak'] - r['baseline']) / (b['peak'] - b['baseline']):.3f}x",
                    f"{r['baseline']:.0f}",
                    f"{r['tensor_peak']:.1f}",
                    f"{r['tensor_peak'] / b['tensor_peak']:.3f}x",
                ]
            )
        if verdicts:
            for m in ("c", "d"):
                if m in by_method:
                    for what, key in (("peak RSS", "peak"), ("peak tensor memory", "tensor_peak")):
                        ratio = by_method[m][key] / b[key]
                        notes.append(
                            f"{descriptions[w]}: target {LABELS[m][:3]} {what} <= {MEMORY:.2f}x (b): {_verdict(ratio, MEMORY)}"
                        )
    table = _table(header, rows, left=2, markdown=markdown)
    return [*table, "", *([f"- {n}" for n in notes] if markdown else notes)]


# --------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds and steps, no compiled row, one small RSS model (smoke run)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also append the tables to PATH as markdown")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the methods to run ((b) always runs)")
    p.add_argument("--rounds", type=int, help="timed rounds per workload (default 25, quick 4)")
    p.add_argument("--steps", type=int, help="steps per timed block for every model (default: per model, as step_overhead.py)")
    p.add_argument("--compile", action="store_true", help="keep the compiled row (d) in a --quick run")
    p.add_argument("--rss-jobs", type=int, default=2, help="peak-RSS subprocesses run at once (default 2)")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's heap trimming in the step-time process")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every method (default 1)")
    p.add_argument("--rss-worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--rss-workload", help=argparse.SUPPRESS)
    p.add_argument("--rss-compiled", help=argparse.SUPPRESS)
    p.add_argument("--rss-tensors", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, low in (("rounds", 4), ("steps", 1), ("threads", 1), ("rss_jobs", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker, args.rss_workload, args.quick, args.rss_compiled, tensors=args.rss_tensors)))
        return
    skipped: list[str] = []
    lightning = lightning_version()
    compiled = compile_api()
    wanted = set(args.methods) | {"b"}
    if lightning is None and wanted & set(LIGHTNING):
        skipped.append("(e) Lightning Trainer and (f) Lightning Fabric: not measured, `lightning` is not importable here")
    if compiled is None and "d" in wanted:
        skipped.append("(d) fnlight compiled: not measured, this fnlight has neither `with_compile` nor `fold(compile=...)`")
    elif args.quick and not args.compile and "d" in wanted:
        skipped.append("(d) fnlight compiled: skipped in a --quick run (compiling takes tens of seconds; pass --compile)")
        compiled = None
    methods = [
        m for m in METHODS if m in wanted and not (m in LIGHTNING and lightning is None) and not (m == "d" and compiled is None)
    ]

    rounds = args.rounds or (4 if args.quick else 25)
    warmup = 1 if args.quick else 3
    workloads = [w for w in WORKLOADS if w.target] if args.quick else list(WORKLOADS)
    blocks = {w.name: args.steps or (max(5, w.steps // 10) if args.quick else w.steps) for w in workloads}
    trim = "default malloc" if args.default_malloc or not keep_freed_heap() else "glibc heap trim off"
    title = (
        f"fnlight against its peers: torch {torch.__version__}, lightning {lightning or 'not installed'}, "
        f"compile API {compiled or 'none'}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"Python {platform.python_version()}, {platform.machine()}, {trim}"
    )
    setup = (
        f"step time: {rounds} rounds of one block per method (steps per block: "
        + ", ".join(f"{n.split(',')[0]} {k}" for n, k in blocks.items())
        + f"), order rotated each round, {warmup} warm-up blocks per method; AdamW lr={LR} wd={WEIGHT_DECAY}; "
        "Trainer blocks timed epoch end to epoch end inside one fit"
    )
    print(title, setup, *(f"note: {s}" for s in skipped), "", sep="\n", flush=True)
    results = []
    for w in workloads:
        results.append(
            time_workload(w, methods, rounds=rounds, steps=blocks[w.name], warmup=warmup, threads=args.threads, compiled=compiled)
        )
        print(f"  measured {w.name}", flush=True)
    verdicts = not args.quick
    print("\n".join(time_report(results, methods, markdown=False, verdicts=verdicts)), flush=True)
    rss = None
    descriptions = {k: v[3] for k, v in rss_workloads(args.quick).items()}
    if not args.no_rss:
        rss = measure_rss(methods, quick=args.quick, threads=args.threads, compiled=compiled, jobs=args.rss_jobs)
        print("", f"{MEMORY_TITLE}:", sep="\n")
        print("\n".join(rss_report(rss, descriptions, markdown=False, verdicts=verdicts)), flush=True)
    if args.quick:
        print("(a --quick smoke run: no verdicts on the targets)")

    if args.markdown:
        md = [f"### {title}", "", setup, "", *(f"- note: {s}" for s in skipped), "" if skipped else None]
        md += [*time_report(results, methods, markdown=True, verdicts=verdicts)]
        if rss is not None:
            md += ["", f"{MEMORY_TITLE}:", ""]
            md += rss_report(rss, descriptions, markdown=True, verdicts=verdicts)
        if args.quick:
            md += ["", "A `--quick` smoke run: no verdicts on the targets."]
        with args.markdown.open("a") as f:
            f.write("\n".join(x for x in md if x is not None) + "\n\n")


if __name__ == "__main__":
    main()
