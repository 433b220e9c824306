"""Cost of the transforms: gradient accumulation vs a hand-written accumulation loop, and the
memory that activation checkpointing saves on a deep model.

1. Accumulation overhead (target: <= 1.03x). MLP 784-512-512-10, fused AdamW, K=4 micro-batches
   of 16 per update. (h) hand-written: ``(loss * n_i / N).backward()`` for each micro-batch, then
   ``opt.step(); opt.zero_grad(set_to_none=True)``; (s) ``fnlight.with_grad_accum(every=4)`` in a
   donating fold; (p) ``with_grad_accum(micro_batches=4)`` on the 64-sample batches. Blocks of
   20 updates, interleaved, order rotated each round, in 3 fresh processes of 50 rounds each,
   one after the other: a process's memory layout biases its own comparison (single
   processes of 100 rounds gave paired medians from 0.99x to 1.05x on the same code), so
   the rounds of all processes are pooled. Reported: median ms per update, ratios to (h),
   the paired per-round ratio per process and pooled, with a bootstrap 95% interval.
2. Activation checkpointing. A deep MLP (24 blocks Linear(256, 256) + GELU, batch 8192, so that
   activations dominate the parameters, gradients and Adam moments): bytes
   saved for backward (``saved_tensors_hooks``), and peak RSS of 3 training steps in a fresh
   subprocess each, with and without checkpointing every block; plus the step-time ratio.

Run (from the repository root)::

    python benchmarks/transforms_overhead.py            # about 3 minutes on 2 vCPUs
    python benchmarks/transforms_overhead.py --quick    # smoke run, under 30 s
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import fl, keep_freed_heap, maxrss_mib, mlp, quartiles

Batch = tuple[Tensor, Tensor]
K, MICRO = 4, 16


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


class HandAccum:
    """The hand-written accumulation loop (weights n_i / N, so a short window would be right too)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def __call__(self, windows: Sequence[Sequence[Batch]]) -> None:
        model, opt = self.model, self.opt
        for window in windows:
            total = sum(len(b[0]) for b in window)
            for batch in window:
                (loss_fn(model, batch) * (len(batch[0]) / total)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


class FoldAccum:
    """``with_grad_accum`` in a donating fold: streaming over micro-batches or splitting whole batches."""

    def __init__(self, model: nn.Module, *, split: bool) -> None:
        core = fl.make_train_step(model, loss_fn, fl.optim.adamw(1e-3))
        self.step = fl.with_grad_accum(core, micro_batches=K) if split else fl.with_grad_accum(core, every=K)
        self.state = self.step.init()
        self.split = split
        self._data: tuple[int, list[Batch]] | None = None

    def __call__(self, windows: Sequence[Sequence[Batch]]) -> None:
        if self._data is None or self._data[0] != id(windows):  # built once, outside the timed calls, as (h)'s windows
            if self.split:
                data = [(torch.cat([b[0] for b in w]), torch.cat([b[1] for b in w])) for w in windows]
            else:
                data = [b for w in windows for b in w]
            self._data = (id(windows), data)
        epochs = int(self.state.data.epoch) + 1
        self.state = fl.fold(self.step, self.state, self._data[1], epochs=epochs, donate=True, progress=False)


def time_accumulation(rounds: int, updates: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    reference = mlp((784, 512, 512, 10))
    g = torch.Generator().manual_seed(1)
    windows = [
        [(torch.randn(MICRO, 784, generator=g), torch.randint(0, 10, (MICRO,), generator=g)) for _ in range(K)]
        for _ in range(updates)
    ]
    runners: dict[str, Callable[[Sequence[Sequence[Batch]]], None]] = {
        "h": HandAccum(copy.deepcopy(reference)),
        "s": FoldAccum(copy.deepcopy(reference), split=False),
        "p": FoldAccum(copy.deepcopy(reference), split=True),
    }
    for run in runners.values():
        run(windows)
    ms: dict[str, list[float]] = {m: [] for m in runners}
    order = list(runners)
    for r in range(rounds):
        for m in order[r % 3 :] + order[: r % 3]:
            gc.collect()
            t0 = time.perf_counter()
            runners[m](windows)
            ms[m].append((time.perf_counter() - t0) * 1e3 / updates)
    return ms


def run_accumulation(processes: int, rounds: int, updates: int, threads: int) -> list[dict[str, list[float]]]:
    """:func:`time_accumulation` in ``processes`` fresh processes, one after the other."""
    out = []
    for i in range(processes):
        cmd = [sys.executable, __file__, "--threads", str(threads), "--accum-worker", json.dumps([rounds, updates])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"accumulation worker {i + 1} of {processes} failed (exit {proc.returncode}):\n{proc.stderr}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"accumulation: process {i + 1} of {processes} done", file=sys.stderr, flush=True)
    return out


def bootstrap_median(xs: Sequence[float], *, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% interval for the median of ``xs`` (percentile bootstrap, resampling the rounds)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def deep(blocks: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(blocks)], nn.Linear(width, 10))


def deep_step(checkpointed: bool, blocks: int, width: int) -> fl.Transform | fl.TrainStep:
    step = fl.make_train_step(deep(blocks, width), loss_fn, fl.optim.adamw(1e-3))
    return fl.with_activation_checkpointing(step, modules=nn.Sequential) if checkpointed else step


def memory_worker(checkpointed: bool, blocks: int, width: int, batch: int) -> dict[str, float]:
    """Three training steps of the deep MLP; peak RSS and bytes saved for backward (run in a subprocess).

    Every allocation over 64 KiB is mmapped and returned on free (a fixed ``M_MMAP_THRESHOLD``
    turns off glibc's dynamic threshold), so RSS follows the live tensors.
    """
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 10)
    step = deep_step(checkpointed, blocks, width)
    state = step.init()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, width, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(3)]
    state = fl.fold(step, state, data[:1], donate=True, progress=False)  # warm-up
    t0 = time.perf_counter()
    state = fl.fold(step, state, data, epochs=2, donate=True, progress=False)
    ms = (time.perf_counter() - t0) * 1e3 / len(data)
    peak = maxrss_mib()  # before the pure step below, which copies the state
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(state, data[0])
    return {"peak": peak, "saved_mib": saved / 2**20, "ms": ms}


def run_memory(blocks: int, width: int, batch: int) -> dict[bool, dict[str, float]]:
    out = {}
    for checkpointed in (False, True):
        cmd = [sys.executable, __file__, "--memory-worker", json.dumps([checkpointed, blocks, width, batch])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"memory worker failed (exit {proc.returncode}):\n{proc.stderr}")
        out[checkpointed] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def report(runs: list[dict[str, list[float]]], memory: dict[bool, dict[str, float]], cfg: tuple[int, int, int]) -> list[str]:
    labels = {
        "h": "(h) hand-written accumulation, fused AdamW",
        "s": "(s) fnlight with_grad_accum(every=4)",
        "p": "(p) fnlight with_grad_accum(micro_batches=4)",
    }
    ms = {m: [x for run in runs for x in run[m]] for m in labels}
    paired = {m: [x / y for run in runs for x, y in zip(run[m], run["h"], strict=True)] for m in labels}
    rounds = len(runs[0]["h"])
    lines = [
        f"## Transforms (torch {torch.__version__}, {torch.get_num_threads()} thread(s))",
        "",
        f"### Accumulation: MLP 784-512-512-10, {K} micro-batches of {MICRO} per update",
        "",
        f"{len(runs)} processes of {rounds} rounds, pooled.",
        "",
        "| method | median ms/update | IQR | ratio to (h) | paired ratio per process | paired ratio, pooled [95% interval] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    h = statistics.median(ms["h"])
    for m, label in labels.items():
        q1, q3 = quartiles(ms[m])
        per = ", ".join(f"{statistics.median(x / y for x, y in zip(run[m], run['h'], strict=True)):.3f}x" for run in runs)
        lo, hi = bootstrap_median(paired[m])
        lines.append(
            f"| {label} | {statistics.median(ms[m]):.3f} | {q1:.3f}-{q3:.3f} | "
            f"{statistics.median(ms[m]) / h:.3f}x | {per} | {statistics.median(paired[m]):.3f}x [{lo:.3f}-{hi:.3f}] |"
        )
    blocks, width, batch = cfg
    off, on = memory[False], memory[True]
    lines += [
        "",
        f"### Activation checkpointing: MLP {blocks} x Linear({width}) + GELU, batch {batch}",
        "",
        "| | saved for backward (MiB) | peak RSS (MiB) | ms/step |",
        "|---|---:|---:|---:|",
        f"| without | {off['saved_mib']:.1f} | {off['peak']:.0f} | {off['ms']:.1f} |",
        f"| every block checkpointed | {on['saved_mib']:.1f} | {on['peak']:.0f} | {on['ms']:.1f} |",
        f"| ratio | {on['saved_mib'] / off['saved_mib']:.3f}x | {on['peak'] / off['peak']:.3f}x | {on['ms'] / off['ms']:.2f}x |",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes for the accumulation timing")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--accum-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(*json.loads(args.memory_worker))))
        return
    if args.accum_worker:
        keep_freed_heap()
        print(json.dumps(time_accumulation(*json.loads(args.accum_worker))))
        return
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    rounds, updates = (5, 5) if args.quick else (50, 20)
    processes = 2 if args.quick else args.processes
    cfg = (6, 128, 1024) if args.quick else (24, 256, 8192)
    lines = report(run_accumulation(processes, rounds, updates, args.threads), run_memory(*cfg), cfg)
    print("\n".join(lines))
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
