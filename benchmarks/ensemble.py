"""Throughput of K replicas trained in one vectorised step (``fnlight.ensemble``) against K sequential runs.

Both methods train the same K replicas of the same MLP, each with its own seed and its own
learning rate (a sweep, log-spaced from 1e-4 to 1e-2, AdamW), on the same batches:

- (s) **K sequential fnlight runs**: K ordinary steps (``make_train_step`` with
  ``fnlight.optim.adamw(lr_i)``), each trained by its own ``fnlight.fold(..., donate=True)``
  over the block of batches, one replica after the other (the reference);
- (v) **fnlight.ensemble**: one ``make_ensemble_step(..., k=K, lr=[...])`` state trained by
  one ``fnlight.fold(..., donate=True)`` over the same block: ``torch.func.vmap`` over the
  forward pass, one ``autograd.grad``, one vectorised AdamW update per step.

Throughput is samples x replicas per second (batch size x K x steps / seconds). After
warm-up, every round times one block per method, in an order alternated each round; the
table gives the median over rounds, the interquartile range, the ratio of medians and the
median of the per-round (paired) ratios, which is less sensitive to the machine's drift.
As a check that both did the same work, the final weights of replica 0 are compared.

Workloads: a small MLP 64-32-10 with batch 32 (the digits size, where each step is mostly
fixed per-step cost: the case ensembles are for; goal >= 3x at K=16) and an MLP
64-128-128-10 with batch 64, where arithmetic takes a larger share (no target: vmap turns
K small matmuls into one batched matmul, which saves the per-call overhead, not the FLOPs).

1 intra-op thread by default (``--threads``), as the other benchmarks; glibc heap trimming
is turned off as in ``step_overhead.py``.

Run (from the repository root; fnlight need not be installed)::

    python benchmarks/ensemble.py                 # 1-2 minutes on 2 vCPUs
    python benchmarks/ensemble.py --quick         # CI smoke run, under 30 s
    python benchmarks/ensemble.py --markdown results.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import fl, keep_freed_heap, mlp, quartiles

from fnlight.ensemble import make_ensemble_step, replica_state

Batch = tuple[Tensor, Tensor]


@dataclasses.dataclass(frozen=True)
class Workload:
    """An MLP, its batch size, the ensemble sizes to measure, and whether the 3x goal applies."""

    widths: tuple[int, ...]
    batch: int
    ks: tuple[int, ...]
    goal: bool

    @property
    def name(self) -> str:
        return f"mlp {'-'.join(map(str, self.widths))}, b{self.batch}"


WORKLOADS = (
    Workload((64, 32, 10), 32, (4, 16, 32), goal=True),
    Workload((64, 128, 128, 10), 64, (4, 16), goal=False),
)


def lrs(k: int) -> list[float]:
    """K learning rates log-spaced from 1e-4 to 1e-2 (the sweep)."""
    return torch.logspace(-4, -2, k, dtype=torch.float64).tolist() if k > 1 else [1e-3]


def make_batches(w: Workload, steps: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(w.batch, w.widths[0], generator=g), torch.randint(0, w.widths[-1], (w.batch,), generator=g))
        for _ in range(steps)
    ]


def build(w: Workload, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(w.widths)


class Sequential:
    """(s): K ordinary steps and states; a block is K folds, one per replica."""

    def __init__(self, w: Workload, k: int) -> None:
        self.steps = [fl.make_train_step(build(w, i), fl.losses.cross_entropy, fl.optim.adamw(lr)) for i, lr in enumerate(lrs(k))]
        self.states = [step.init(seed=i) for i, step in enumerate(self.steps)]

    def __call__(self, batches: Sequence[Batch]) -> None:
        for i, step in enumerate(self.steps):
            epochs = int(self.states[i].data.epoch) + 1
            self.states[i] = fl.fold(step, self.states[i], batches, epochs=epochs, donate=True, progress=False)

    def replica0(self) -> dict[str, Tensor]:
        return self.states[0].params


class Vectorised:
    """(v): one ensemble step and one stacked state; a block is one fold."""

    def __init__(self, w: Workload, k: int) -> None:
        self.step = make_ensemble_step(mlp(w.widths), fl.losses.cross_entropy, k=k, lr=lrs(k))
        self.state = self.step.init(seeds=list(range(k)))

    def __call__(self, batches: Sequence[Batch]) -> None:
        epochs = int(self.state.data.epoch) + 1
        self.state = fl.fold(self.step, self.state, batches, epochs=epochs, donate=True, progress=False)

    def replica0(self) -> dict[str, Tensor]:
        return replica_state(self.state, 0).params


@dataclasses.dataclass
class Result:
    """Per-round seconds of each method for one (workload, K)."""

    workload: Workload
    k: int
    steps: int
    seconds: dict[str, list[float]]
    max_diff: float

    def throughput(self, m: str) -> list[float]:
        return [self.workload.batch * self.k * self.steps / s for s in self.seconds[m]]

    def paired(self) -> list[float]:
        return [s / v for s, v in zip(self.seconds["s"], self.seconds["v"], strict=True)]


def measure(w: Workload, k: int, *, rounds: int, steps: int, warmup: int) -> Result:
    """Warm up, then time ``rounds`` blocks of ``steps`` steps per method, alternating the order."""
    batches = make_batches(w, steps)
    runners = {"s": Sequential(w, k), "v": Vectorised(w, k)}
    for _ in range(warmup):
        for r in runners.values():
            r(batches)
    seconds: dict[str, list[float]] = {"s": [], "v": []}
    for i in range(rounds):
        for m in ("s", "v") if i % 2 == 0 else ("v", "s"):
            gc.collect()
            t0 = time.perf_counter()
            runners[m](batches)
            seconds[m].append(time.perf_counter() - t0)
    a, b = runners["s"].replica0(), runners["v"].replica0()
    return Result(w, k, steps, seconds, max(float((a[n] - b[n]).abs().max()) for n in a))


def report(results: Sequence[Result], *, quick: bool = False) -> list[str]:
    """The markdown table and notes (no verdict on the goal for a ``--quick`` smoke run)."""
    lines = [
        "| model | K | method | samples x replicas / s (median) | p25-p75 | vs (s) | paired vs (s), median [p25-p75] |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    notes = []
    for res in results:
        ref = statistics.median(res.throughput("s"))
        for m, label in (("s", f"(s) {res.k} sequential fnlight runs"), ("v", "(v) fnlight.ensemble, one vmap step")):
            xs = res.throughput(m)
            lo, hi = quartiles(xs)
            first = m == "s"
            paired = (
                "1.00x" if first else "{:.2f}x [{:.2f}-{:.2f}]".format(statistics.median(res.paired()), *quartiles(res.paired()))
            )
            lines.append(
                f"| {res.workload.name if first else ''} | {res.k if first else ''} | {label} | {statistics.median(xs):,.0f} "
                f"| {lo:,.0f}-{hi:,.0f} | {statistics.median(xs) / ref:.2f}x | {paired} |"
            )
        ratio = statistics.median(res.throughput("v")) / ref
        goal = ""
        if res.workload.goal and res.k == 16 and not quick:
            goal = f"; goal >= 3x at K=16: {'met' if ratio >= 3 else 'NOT met'} ({ratio:.2f}x)"
        notes.append(
            f"- {res.workload.name}, K={res.k}: replica 0 final weights, (v) vs (s): max abs difference {res.max_diff:.1e}{goal}"
        )
    return [*lines, "", *notes]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds and steps (CI smoke run)")
    p.add_argument("--rounds", type=int, help="timed rounds per (model, K) (default 15, quick 3)")
    p.add_argument("--steps", type=int, help="steps per timed block (default 50, quick 5)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also append the table to PATH")
    args = p.parse_args(argv)
    for name, low in (("rounds", 2), ("steps", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name} must be at least {low}, got {value}")
    rounds = args.rounds or (3 if args.quick else 15)
    steps = args.steps or (5 if args.quick else 50)
    torch.set_num_threads(args.threads)
    trimmed = keep_freed_heap()
    header = (
        f"fnlight ensemble throughput: {datetime.date.today()}, torch {torch.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}, Python {platform.python_version()}, {platform.machine()}, "
        f"glibc heap trim {'off' if trimmed else 'on'}; {rounds} rounds of one block of {steps} steps per method, "
        "order alternated each round, 2 warm-up blocks; AdamW, lr log-spaced 1e-4..1e-2 over the replicas"
    )
    print(header, flush=True)
    results = []
    for w in WORKLOADS:
        for k in w.ks[:2] if args.quick else w.ks:
            results.append(measure(w, k, rounds=rounds, steps=steps, warmup=2))
            print(f"  measured {w.name}, K={k}", flush=True)
    lines = ["", *report(results, quick=args.quick)]
    print("\n".join(lines))
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n".join(["", "```text", header, "```", *lines, ""]))


if __name__ == "__main__":
    main()
