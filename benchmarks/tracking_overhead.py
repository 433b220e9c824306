"""Cost of tracking: fold step time with aim tracking every update vs no tracking (target <= 1.02x).

MLP 784-512-512-10, batch 64, fused AdamW, in a donating fold. (n) no tracking;
(t) ``with_tracking(every=1)`` into ``ProcessTrackers(AimTracker(...))`` — aim on an
embedded repository, run in a separate process, events sent in batches every 0.5 s (the
default ``flush_every``) — so every update is a logging event (one host read of the
window's means plus a list append); (t10) the same every 10 updates; (j) every update into
a JSONL file on a background thread (``Trackers``, which also hands its worker batches every
0.5 s); (n2) a second untracked fold, identical to (n) but on its own copy of the model:
the A/A control, whose ratio to (n) shows how far this machine's noise and another place in
memory alone move a ratio in the same run. (t) trains (n)'s own state, the same tensors with
the tracking toggled, so (t)/(n) leaves out where the tensors lie (a different copy alone
moved ratios by up to 8% here); (t10) and (j) have their own copies, like (n2).

Timing: blocks of N updates (default 600, ~2 s: several ``flush_every`` periods, so the
tracking process works during the block as it would in a long run), interleaved, order
rotated each round; median ms/update and ratios to (n). After every block the script waits,
untimed, until the block's trackers have delivered everything (``flush()``), so no
tracker's backlog runs into another method's block. What a tracking process does after the
block's last batch was sent (at most ``flush_every`` of events) is therefore not timed; in
a long run it would overlap the next updates.

The tracking processes' own CPU time (every thread of the child process, from
``/proc/<pid>/task/*/stat``, Linux only) is read before each tracked block and after its
``flush()``, so it covers exactly the block's events: what aim costs per update on the other
vCPU, a figure this machine's noise moves far less than a ratio of wall times.

**Decomposed, with confidence intervals.** The table above compares methods in ~2 s blocks,
and this machine's noise moves such a ratio by several percent (see (n2)). The second part
measures the two costs of tracking separately, in many blocks each paired with untracked
blocks right before or after, which cancels slow drifts:
(X) the training process's own cost — the same fold, on the same state, with
``with_tracking(every=1)`` into a ``ProcessTrackers`` whose tracker does nothing, so the
child does no work — in 300 triples of 50-update blocks (tracked, untracked, and the
untracked fold again as the A/A control, all on the same state), every order of the three
in turn; (Y) the cost of aim working on the other vCPU — the untracked fold while a separate
process writes, with ``AimTracker.log_batch``, one 6-scalar event per update of (n) in
batches every 0.5 s (what the tracking process of (t) does), against the same fold while
that process idles, in 300-update blocks (a block must span several of aim's batches). For
each, the ratio of summed times (every update weighs alike, so a cost paid in some blocks
only counts in full) and a 95% bootstrap interval over rounds; X * Y estimates (t)'s ratio,
and the A/A control's interval shows how finely (X)'s method resolves.

Run (from the repository root)::

    python benchmarks/tracking_overhead.py            # about 10 minutes on 2 vCPUs
    python benchmarks/tracking_overhead.py --quick
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import fl, keep_freed_heap, mlp, quartiles

from fnlight.tracking import AimTracker, JSONLTracker, ProcessTrackers, Trackers

Batch = tuple[Tensor, Tensor]


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of every thread of process ``pid`` so far; None off Linux."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        total = 0
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def child_cpu_s(trackers: Trackers | ProcessTrackers) -> float | None:
    """The tracking process's CPU seconds so far (None for a thread, or off Linux)."""
    process = getattr(trackers, "_process", None)
    return None if process is None else process_cpu_s(process.pid)


class NullTracker:
    """A tracker that does nothing: (X) times the training process's side of tracking alone."""

    def open(self, run_id: str = "", *, hparams: object = None) -> str:
        return run_id or "null"

    def log_scalars(self, step: int, scalars: object) -> None:
        pass

    def log_hparams(self, hparams: object) -> None:
        pass

    def close(self) -> None:
        pass


def aim_writer(repo: str, period_s: float, active: object, stop: object, ready: object) -> None:
    """(Y)'s load: while ``active`` is set, track one 6-scalar event per ``period_s`` into aim, in 0.5 s batches."""
    tracker = AimTracker(repo)
    tracker.open()
    names = ["loss", "lr", "throughput/steps_per_s", "throughput/samples_per_s", "epoch", "finite"]
    per_batch, step = max(1, round(0.5 / period_s)), 0
    ready.set()  # type: ignore[attr-defined]
    while not stop.is_set():  # type: ignore[attr-defined]
        t0 = time.monotonic()
        if active.is_set():  # type: ignore[attr-defined]
            tracker.log_batch([(step + i, {k: 0.5 * (step + i) for k in names}) for i in range(per_batch)])
            step += per_batch
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
    tracker.close()


def ratio_ci(
    pairs: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]] = (), *, resamples: int = 2000
) -> tuple[float, float, float]:
    """The ratio of sums of ``(a, b)`` pairs (times that of ``other``, if given) and a 95% bootstrap interval (fixed seed).

    A ratio of sums (total time with the cost over total time without it) weighs every update
    alike, so a cost paid in some blocks only (a batch sent every 0.5 s) counts in full, as it
    does in a long run; a median of per-block ratios could leave it out. Rounds are resampled
    as wholes, ``pairs`` and ``other`` independently.
    """
    rng = random.Random(0)

    def ratio(ps: Sequence[tuple[float, float]]) -> float:
        return sum(a for a, _ in ps) / sum(b for _, b in ps) if ps else 1.0

    def estimate(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
        return ratio(a) * ratio(b)

    boot = sorted(
        estimate(rng.choices(pairs, k=len(pairs)), rng.choices(other, k=len(other)) if other else ()) for _ in range(resamples)
    )
    return estimate(pairs, other), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


def decomposed(
    reference: nn.Module, batches: Sequence[Batch], *, x_rounds: int, x_steps: int, y_rounds: int, repo: str
) -> list[str]:
    """(X) and (Y) of the module docstring, with the A/A control, as markdown lines."""
    null = ProcessTrackers(NullTracker())
    plain = Runner(copy.deepcopy(reference), None)
    tracked = Runner(None, null, shares=plain)  # the same state: only the tracking differs
    again = Runner(None, None, shares=plain)  # the A/A control: the same untracked step on the same state
    short = batches[:x_steps]

    def timed(run: Runner, data: Sequence[Batch] = batches) -> float:
        t0 = time.perf_counter()
        run(data)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        for run in (plain, tracked, again):
            timed(run, short)
    null.flush()
    period_s = statistics.median(timed(plain) for _ in range(3)) / len(batches)

    # X: many short blocks in triples, every order of the three in turn, so that slow drifts cancel in each
    # triple and no method keeps a position; the tracking process's batches (every 0.5 s) fall in the tracked
    # blocks they come in, and the ratio of sums counts them in full
    x: list[tuple[float, float]] = []
    aa: list[tuple[float, float]] = []
    orders = list(itertools.permutations(("plain", "tracked", "again")))
    runs = {"plain": plain, "tracked": tracked, "again": again}
    gc.collect()
    gc.disable()  # a collection inside a short block would weigh on one method alone
    try:
        for r in range(x_rounds):
            times = {m: timed(runs[m], short) for m in orders[r % len(orders)]}
            x.append((times["tracked"], times["plain"]))
            aa.append((times["again"], times["plain"]))
    finally:
        gc.enable()

    context = multiprocessing.get_context("spawn")
    active, stop, ready = context.Event(), context.Event(), context.Event()
    writer = context.Process(target=aim_writer, args=(repo, period_s, active, stop, ready), daemon=True)
    writer.start()
    ready.wait(timeout=120)

    def loaded() -> float:
        active.set()
        time.sleep(0.05)  # the writer's next batch starts within the block
        seconds = timed(plain)
        active.clear()
        time.sleep(0.5)  # its last batch is written before the next block
        return seconds

    y: list[tuple[float, float]] = []
    for r in range(y_rounds):
        gc.collect()
        if r % 2:
            base = timed(plain)
            y.append((loaded(), base))
        else:
            load = loaded()
            y.append((load, timed(plain)))
    stop.set()
    writer.join(timeout=60)
    null.shutdown()

    def median_ratio(ps: Sequence[tuple[float, float]]) -> float:
        return statistics.median(a / b for a, b in ps)

    (xm, x1, x2), (am, a1, a2), (ym, y1, y2), (pm, p1, p2) = ratio_ci(x), ratio_ci(aa), ratio_ci(y), ratio_ci(x, y)
    return [
        f"### Decomposed: (X) {x_rounds} rounds of {x_steps}-update blocks, "
        f"(Y) {y_rounds} rounds of {len(batches)}-update blocks",
        "",
        "| cost | ratio of sums | 95% interval | median of per-round ratios |",
        "|---|---:|---:|---:|",
        f"| (X) training process: `with_tracking(every=1)` into `ProcessTrackers` (a no-op tracker), on the same state "
        f"| {xm:.4f}x | {x1:.4f}-{x2:.4f} | {median_ratio(x):.4f}x |",
        f"| (A/A) the untracked fold against itself, on the same state, in the same rounds as (X) "
        f"| {am:.4f}x | {a1:.4f}-{a2:.4f} | {median_ratio(aa):.4f}x |",
        f"| (Y) aim on the other vCPU: one 6-scalar event per {period_s * 1e3:.2f} ms update, batches every 0.5 s "
        f"| {ym:.4f}x | {y1:.4f}-{y2:.4f} | {median_ratio(y):.4f}x |",
        f"| X * Y: estimate of (t), aim every update | {pm:.4f}x | {p1:.4f}-{p2:.4f} | |",
        "",
        "(A/A) is what the method gives where there is no cost at all: its interval shows the resolution of (X)'s.",
    ]


class Runner:
    """One fold per call over a block of batches; optionally tracking every ``every`` updates.

    ``shares``: train that runner's state (its model's tensors, in place) with this runner's
    step, the same step with tracking or without: the two then differ only in tracking, not
    in where their tensors lie in memory (which alone moves a ratio by several percent here).
    """

    def __init__(
        self,
        model: nn.Module | None,
        trackers: Trackers | ProcessTrackers | None,
        every: int = 1,
        *,
        shares: Runner | None = None,
    ) -> None:
        if shares is None:
            assert model is not None
            self.base: Any = fl.make_train_step(model, loss_fn, fl.optim.adamw(1e-3))
            self.box: list[Any] = [None]
        else:
            self.base, self.box = shares.base, shares.box
        step = self.base
        if trackers is not None:  # one run over all blocks: the trackers stay open between folds
            step = fl.with_tracking(step, trackers=[trackers], every=every, close_on_finish=False)
        self.step = step
        if self.box[0] is None or (trackers is not None and "tracking" not in self.box[0].slots):
            self.box[0] = step.init()  # a tracked step needs its slot in the state (the untracked one ignores it)

    def __call__(self, batches: Sequence[Batch]) -> None:
        state = self.box[0]
        epochs = int(state.data.epoch) + 1
        self.box[0] = fl.fold(self.step, state, batches, epochs=epochs, donate=True, progress=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--no-decomposed", action="store_true", help="skip the decomposed part (X and Y)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_heap()
    rounds, steps = (3, 40) if args.quick else (16, 600)
    torch.manual_seed(0)
    reference = mlp((784, 512, 512, 10))
    g = torch.Generator().manual_seed(1)
    distinct = [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(60)]
    batches = [distinct[i % len(distinct)] for i in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        aim = ProcessTrackers(AimTracker(repo=f"{tmp}/aim"))
        aim10 = ProcessTrackers(AimTracker(repo=f"{tmp}/aim10"))
        jsonl = Trackers(JSONLTracker(f"{tmp}/jsonl"))
        plain = Runner(copy.deepcopy(reference), None)
        runners = {
            "n": plain,
            "n2": Runner(copy.deepcopy(reference), None),
            "t": Runner(None, aim, shares=plain),  # (n)'s state and tensors: only the tracking differs
            "t10": Runner(copy.deepcopy(reference), aim10, every=10),
            "j": Runner(copy.deepcopy(reference), jsonl),
        }
        trackers = {"t": aim, "t10": aim10, "j": jsonl}
        for m, run in runners.items():
            run(batches)
            if m in trackers:
                trackers[m].flush()
        ms: dict[str, list[float]] = {m: [] for m in runners}
        cpu: dict[str, list[float]] = {m: [] for m in runners}
        child: dict[str, list[float]] = {m: [] for m in trackers}
        order = list(runners)
        for r in range(rounds):
            for m in order[r % len(order) :] + order[: r % len(order)]:
                gc.collect()
                before = child_cpu_s(trackers[m]) if m in trackers else None
                t0, c0 = time.perf_counter(), time.thread_time()
                runners[m](batches)
                cpu[m].append((time.thread_time() - c0) * 1e3 / steps)
                ms[m].append((time.perf_counter() - t0) * 1e3 / steps)
                if m in trackers:
                    trackers[m].flush()  # untimed: the backlog stays out of the next block
                    after = child_cpu_s(trackers[m])
                    if before is not None and after is not None:
                        child[m].append((after - before) * 1e6 / steps)
        t0 = time.perf_counter()
        aim.shutdown()
        aim10.shutdown()
        jsonl.close()
        drain = time.perf_counter() - t0
    labels = {
        "n": "(n) fold, no tracking",
        "n2": "(n2) fold, no tracking, a second runner with its own tensors (A/A control: noise and memory layout only)",
        "t": "(t) fold + aim every update (tracking process, batches every 0.5 s), on (n)'s state",
        "t10": "(t10) fold + aim every 10 updates (tracking process, batches every 0.5 s)",
        "j": "(j) fold + JSONL every update (background thread, batches every 0.5 s)",
    }
    n = statistics.median(ms["n"])
    lines = [
        f"## Tracking overhead (torch {torch.__version__}, {torch.get_num_threads()} thread(s))",
        "",
        f"MLP 784-512-512-10, batch 64, fused AdamW; 6-7 scalars per logging event; {rounds} rounds of {steps}-update blocks.",
        "",
        "| method | median ms/update | IQR | ratio to (n) | paired ratio (median) | paired p25-p75 "
        "| thread CPU ms/update | ratio to (n) | tracking process CPU µs/update |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n_cpu = statistics.median(cpu["n"])
    for m, label in labels.items():
        q1, q3 = quartiles(ms[m])
        ratios = [x / y for x, y in zip(ms[m], ms["n"], strict=True)]
        p1, p3 = quartiles(ratios)
        own = f"{statistics.median(child[m]):.0f}" if child.get(m) else "-"
        lines.append(
            f"| {label} | {statistics.median(ms[m]):.3f} | {q1:.3f}-{q3:.3f} | "
            f"{statistics.median(ms[m]) / n:.3f}x | {statistics.median(ratios):.3f}x | {p1:.3f}-{p3:.3f} | "
            f"{statistics.median(cpu[m]):.3f} | {statistics.median(cpu[m]) / n_cpu:.3f}x | {own} |"
        )
    lines += [
        "",
        "(n2) does exactly what (n) does, on its own copy of the model: its distance from 1.000x is what noise and",
        "another place in memory alone give a ratio in this run. (t) trains (n)'s own state (the same tensors, the",
        "tracking toggled); (t10) and (j) have their own copies, like (n2).",
        "Wall time is the target's measure; the thread CPU columns (the training thread's `time.thread_time`)",
        "leave out the time the VM gave to other work, so they move less between runs. The last column is the",
        "CPU time of the tracking process (all its threads: aim's and rocksdb's) per update of the block; (j)'s",
        "worker is a thread of the training process, so it has none.",
        "",
        f"Closing the trackers after the last block took {drain:.2f} s.",
    ]
    if not args.no_decomposed:
        with tempfile.TemporaryDirectory() as tmp:
            lines += [
                "",
                *decomposed(
                    reference,
                    batches[: 40 if args.quick else 300],
                    x_rounds=6 if args.quick else 300,
                    x_steps=10 if args.quick else 50,
                    y_rounds=4 if args.quick else 40,
                    repo=f"{tmp}/aim",
                ),
            ]
    print("\n".join(lines))
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
