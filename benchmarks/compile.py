"""Whole-step compile: ``fnlight.transforms.with_compile`` against hand-written loops, eager and compiled.

Methods, each on its own copy of the same initial weights and the same batches, in one run:

- (b) hand-written eager loop, ``torch.optim.AdamW(fused=True)`` (**the reference**):
  ``opt.zero_grad(set_to_none=True); loss_fn(model, batch).backward(); opt.step()``
- (c) ``fnlight.fold(step, ..., donate=True)``, eager
- (h) hand-compiled loop, as torch's tutorials write it: ``torch.compile(model)`` (forward and
  backward compiled by AOTAutograd) and ``torch.compile``'d ``opt.step()`` of an
  ``AdamW(foreach=True)``; the loop itself is (b)'s
- (w) a hand-written whole step, compiled once: ``torch.func.functional_call``, ``autograd.grad``
  and the AdamW update written per parameter with a tensor step count (what with_compile
  builds, written out by hand in about 25 lines; the same inductor options as (f))
- (f) ``fnlight.fold`` of ``with_compile(step)`` (inductor; forward, backward and the AdamW
  update in one graph), ``donate=True``

Models and batches are ``step_overhead.py``'s (imported from it): the MLP 784-512-512-10
(batch 64) and the transformer (2 layers, d_model 128, seq 32, batch 16, 1000-token head);
``--tiny`` adds the tiny MLP whose step is almost all fixed cost (diagnostic, no goal).

Timing: every compiled method is compiled (and warmed up) before timing; its first-call time
is printed as "compile s". Then each round times one block of steps per method, the order
rotated each round; the table gives the median ms/step over rounds, the spread, the ratio
of medians to (b) and the paired per-round ratios (same round, adjacent in time), which
drift of a shared machine disturbs less. One intra-op thread by default and glibc heap
trimming off, as in ``step_overhead.py`` (see its docstring for why). The final weights of
(f) are compared with (b)'s, and (f)'s graph count is checked: one graph, none compiled
during the timed rounds (no recompilation as the step counter and the learning rate move).

Goal (issue 8): (f) <= 0.85x (b) on the MLP and the transformer (medians, same run).

Run (from the repository root; fnlight need not be installed)::

    python benchmarks/compile.py                 # full run, about 10 minutes on 2 vCPUs
    python benchmarks/compile.py --quick         # smoke run: MLP only, few rounds
    python benchmarks/compile.py --markdown out.md --rounds 30
    python benchmarks/compile.py --options '{"cpp_wrapper": true}'   # inductor options for (f)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import (  # the sibling script, importable once its folder is on the path
    LR,
    WEIGHT_DECAY,
    WORKLOADS,
    Batch,
    HandLoop,
    Workload,
    _median_iqr,
    _table,
    classification_loss,
    keep_freed_heap,
    n_params,
    quartiles,
)

try:
    import fnlight as fl
except ModuleNotFoundError:  # run from a checkout without installing: use the repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fnlight as fl
from fnlight.transforms import with_compile

METHODS = ("b", "c", "h", "w", "f")
LABELS = {
    "b": "(b) hand loop, AdamW fused",
    "c": "(c) fnlight fold, eager",
    "h": "(h) hand loop, compiled model + opt.step",
    "w": "(w) hand-written whole step, compiled",
    "f": "(f) fnlight fold, with_compile",
}
COMPILED = ("h", "w", "f")
GOAL = 0.85


class HandCompiled:
    """(h): ``torch.compile(model)`` and a compiled ``opt.step()`` of ``AdamW(foreach=True)``, in (b)'s loop."""

    def __init__(self, model: nn.Module) -> None:
        model.train()
        self.model = model
        self.compiled = torch.compile(model)
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
        self.opt_step = torch.compile(self.opt.step)

    def __call__(self, batches: Sequence[Batch]) -> None:
        model, opt = self.compiled, self.opt
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            classification_loss(model, batch).backward()
            self.opt_step()

    def params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}


class WholeStep:
    """(w): forward, ``autograd.grad`` and AdamW in one hand-written function, compiled once; updates in place."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        model.train()
        self.model = model
        self.weights = {n: p.detach() for n, p in model.named_parameters()}
        self.mu = {n: torch.zeros_like(p) for n, p in self.weights.items()}
        self.nu = {n: torch.zeros_like(p) for n, p in self.weights.items()}
        self.count = torch.zeros((), dtype=torch.float32)  # float32: see with_compile's docs on 0-d float64/int inputs
        self.compiled = torch.compile(self.step, fullgraph=True, options=options)

    def step(self, batch: Batch) -> None:
        leaves = {n: p.detach().requires_grad_() for n, p in self.weights.items()}
        loss = classification_loss(lambda x: torch.func.functional_call(self.model, leaves, (x,)), batch)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        self.count.add_(1)
        b1, b2 = 0.9, 0.999
        coefs = torch.stack([LR / (1 - b1**self.count), torch.sqrt(1 - b2**self.count)])  # once, not per element
        for (n, p), g in zip(self.weights.items(), grads, strict=True):
            m, v = self.mu[n], self.nu[n]
            p.mul_(1 - LR * WEIGHT_DECAY)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(coefs[0] * m / (v.sqrt() / coefs[1] + 1e-8))

    def __call__(self, batches: Sequence[Batch]) -> None:
        with torch._dynamo.config.patch(trace_autograd_ops=True):  # autograd.grad inside the graph
            for batch in batches:
                self.compiled(batch)

    def params(self) -> dict[str, Tensor]:
        return self.weights


class Fold:
    """(c)/(f): ``fnlight.fold`` with ``fnlight.optim.adamw``, eager or ``with_compile``'d; one fold per block."""

    def __init__(self, model: nn.Module, *, compiled: bool, options: dict[str, Any] | None) -> None:
        step: Any = fl.make_train_step(model, classification_loss, fl.optim.adamw(LR, weight_decay=WEIGHT_DECAY))
        if compiled:  # a step that cannot be compiled must fail here, not be timed eagerly under the compiled label
            step = with_compile(step, fallback="raise", options=options)
        self.step = step
        self.state = step.init(seed=0)

    def __call__(self, batches: Sequence[Batch]) -> None:
        epochs = int(self.state.data.epoch) + 1
        self.state = fl.fold(self.step, self.state, batches, epochs=epochs, donate=True, progress=False)

    def params(self) -> dict[str, Tensor]:
        return self.state.params


def make_runner(method: str, model: nn.Module, options: dict[str, Any] | None) -> Callable[[Sequence[Batch]], None]:
    """The runner of ``method`` on ``model``."""
    if method == "b":
        return HandLoop(model, fused=True)
    if method == "h":
        return HandCompiled(model)
    if method == "w":
        return WholeStep(model, {"cpp_wrapper": True, "fallback_random": True, **(options or {})})
    return Fold(model, compiled=method == "f", options=options)


@dataclasses.dataclass
class Result:
    """Per-round ms/step of every method on one workload, with compile times and checks."""

    workload: Workload
    params: int
    ms: dict[str, list[float]]
    compile_s: dict[str, float]
    max_diff: float
    graphs_after_warmup: dict[str, int]
    graphs_during_timing: int

    def median(self, m: str) -> float:
        return statistics.median(self.ms[m])

    def paired(self, num: str, den: str) -> list[float]:
        return [x / y for x, y in zip(self.ms[num], self.ms[den], strict=True)]


def time_workload(w: Workload, *, rounds: int, steps: int, warmup: int, options: dict[str, Any] | None) -> Result:
    """Compile and warm up every method, then time ``rounds`` interleaved blocks of ``steps`` steps each."""
    torch.manual_seed(0)
    reference = w.build()
    g = torch.Generator().manual_seed(1)
    batches = [w.batch(g) for _ in range(steps)]
    runners = {m: make_runner(m, copy.deepcopy(reference), options) for m in METHODS}
    compile_s: dict[str, float] = {}
    for m in METHODS:  # the first call compiles (h, f); timed on its own, then warm-up blocks
        t0 = time.perf_counter()
        runners[m](batches[:2])
        compile_s[m] = time.perf_counter() - t0
    for _ in range(warmup):
        for m in METHODS:
            runners[m](batches)
    fold_f = runners["f"]
    assert isinstance(fold_f, Fold)
    graphs = dict(fold_f.step.graphs)
    ms: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        for m in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
            gc.collect()
            t0 = time.perf_counter()
            runners[m](batches)
            ms[m].append((time.perf_counter() - t0) * 1e3 / steps)
    during = sum(fold_f.step.graphs.values()) - sum(graphs.values())
    b, f = runners["b"].params(), runners["f"].params()  # type: ignore[attr-defined]
    max_diff = max(float((b[n] - f[n]).abs().max()) for n in b)
    return Result(w, n_params(reference), ms, compile_s, max_diff, graphs, during)


def report(results: Sequence[Result], *, markdown: bool, quick: bool) -> list[str]:
    """The step-time table and the notes (ratios, paired ratios, checks, goal)."""
    header = ("model", "method", "ms/step (median)", "p25-p75", "min-max", "vs (b)", "compile s")
    rows: list[list[str]] = []
    notes: list[str] = []
    for res in results:
        ref = res.median("b")
        for m in METHODS:
            xs = res.ms[m]
            lo, hi = quartiles(xs)
            rows.append(
                [
                    res.workload.name if m == METHODS[0] else "",
                    LABELS[m],
                    f"{res.median(m):.3f}",
                    f"{lo:.3f}-{hi:.3f}",
                    f"{min(xs):.3f}-{max(xs):.3f}",
                    f"{res.median(m) / ref:.3f}x",
                    f"{res.compile_s[m]:.1f}" if m in COMPILED else "",
                ]
            )
        fb, fw, hb = res.median("f") / ref, res.median("f") / res.median("w"), res.median("h") / ref
        pairs = ", ".join(
            _median_iqr(f"{n}/{d}", res.paired(n, d)) for n, d in (("f", "b"), ("f", "w"), ("f", "h"), ("f", "c"), ("w", "b"))
        )
        notes.append(
            f"{res.workload.name} ({res.params / 1e6:.2f}M params): ratio of medians f/b {fb:.3f}, f/w {fw:.3f}, h/b {hb:.3f}"
        )
        notes.append(f"  paired per-round ratios, median [p25-p75]: {pairs}")
        notes.append(
            f"  (f): graphs after warm-up {res.graphs_after_warmup}, compiled during the timed rounds: "
            f"{res.graphs_during_timing}; final weights vs (b): max abs difference {res.max_diff:.1e}"
        )
        if res.workload.target and not quick:
            notes.append(f"  goal (f) <= {GOAL}x (b): {fb:.3f}x, {'met' if fb <= GOAL else 'NOT met'}")
    body = _table(header, rows, left=2, markdown=markdown)
    return [*body, "", *([f"- {n.strip()}" for n in notes] if markdown else notes)]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="MLP only, few rounds and steps (smoke run; no goal verdict)")
    p.add_argument("--tiny", action="store_true", help="also time the tiny MLP (fixed per-step cost; no goal)")
    p.add_argument("--rounds", type=_at_least(4), help="timed rounds per workload (default 20, quick 4)")
    p.add_argument("--steps", type=_at_least(1), help="steps per timed block for every model (default: per model)")
    p.add_argument("--threads", type=_at_least(1), default=1, help="torch.set_num_threads for every method (default 1)")
    p.add_argument("--options", type=json.loads, default=None, help="inductor options for (f), as JSON")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also append the table to PATH as markdown")
    return p.parse_args(argv)


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    trim = "glibc heap trim off" if keep_freed_heap() else "default malloc"
    rounds = args.rounds or (4 if args.quick else 20)
    warmup = 1 if args.quick else 2
    workloads = [WORKLOADS[0]] if args.quick else [*WORKLOADS[:2], *(WORKLOADS[2:] if args.tiny else [])]
    blocks = {w.name: args.steps or (max(5, w.steps // 10) if args.quick else max(10, w.steps // 2)) for w in workloads}
    title = (
        f"fnlight whole-step compile: torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
        f"Python {platform.python_version()}, {platform.machine()}, {trim}"
    )
    setup = (
        f"{rounds} rounds of one block per method (steps per block: "
        + ", ".join(f"{n.split(',')[0]} {k}" for n, k in blocks.items())
        + f"), order rotated each round, {warmup} warm-up blocks after compiling; AdamW lr={LR} wd={WEIGHT_DECAY}; "
        f"(f) inductor options: {args.options or 'default'}"
    )
    print(title, setup, "", sep="\n", flush=True)
    results = []
    for w in workloads:
        results.append(time_workload(w, rounds=rounds, steps=blocks[w.name], warmup=warmup, options=args.options))
        print(f"{w.name}: done", flush=True)
    print("", *report(results, markdown=False, quick=args.quick), sep="\n", flush=True)
    if args.markdown:
        md = [f"### {title}", "", setup, "", *report(results, markdown=True, quick=args.quick)]
        with args.markdown.open("a") as f:
            f.write("\n".join(md) + "\n\n")


if __name__ == "__main__":
    main()
