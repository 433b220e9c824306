"""Step-time and peak-memory overhead of ``fnlight.fold`` against hand-written PyTorch loops.

Three ways to train the same model on the same batches, measured in this one run:

- (a) hand-written loop, ``torch.optim.AdamW(foreach=True)``:
  ``opt.zero_grad(set_to_none=True); loss = loss_fn(model, batch); loss.backward(); opt.step()``
- (b) the same loop with ``torch.optim.AdamW(fused=True)`` (the reference),
- (c) ``fnlight.fold(step, state, batches, donate="model", progress=False)`` with
  ``fnlight.optim.adamw`` (same hyperparameters, same fused kernel). ``donate="model"``
  trains the model's own tensors in place, as the hand-written loops do; ``donate=True``
  would first copy the parameters and buffers the state shares with the live model.

Step time: an MLP 784-512-512-10 (batch 64, cross-entropy on random data), a small
transformer encoder (2 layers, d_model 128, 4 heads, ff 512, dropout 0, seq 32, batch 16,
token embedding and a 1000-way head, next-token cross-entropy), and a tiny MLP whose
step is almost all fixed per-step cost (diagnostic, no target). Each method keeps its
own copy of the model with identical initial weights. After warm-up, every round times
one block of N steps per method (one whole ``fold`` call for (c), no observers), in an
order rotated each round; the table gives the median ms/step over rounds, the spread,
and the ratios to (b). The paired per-round ratios (same round, adjacent in time) are
printed too: they are less sensitive to slow drift of the machine than the ratio of
medians. The final weights of (b) and (c) are compared as a check that both did the
same work.

Heap trimming: glibc returns freed heap pages to the OS when the top of the heap is free,
and the next step faults them back in (~200-300 minor faults, ~0.5 ms per transformer
step here, for (b) and (c) alike when each runs alone). With three models sharing one
heap, which method pays is decided by the heap layout, which persists for the whole run,
so rotating the order does not cancel it: one run gave (c) 347 faults/step against 14
for (b), i.e. +0.9 ms/step, while with five loops in one process (b) paid 527. The
step-time process therefore turns trimming off (``mallopt``; the RSS workers keep the
default) and prints the minor page faults per step; ``--default-malloc`` keeps glibc's
default behaviour.

Peak RSS: a 100.7M-parameter MLP 4096-4096x6-10 (batch 8), each method in its own
subprocess (this script with the hidden ``--rss-worker`` flag), ``ru_maxrss`` after 5
steps. The model object stays alive in every worker, as in a user's script (for (c),
``step.init()`` aliases its tensors and ``donate="model"`` trains them in place, so that
costs nothing). Row (c') is the fold with
``donate=False``, which clones the input state once: expected one more copy of the
parameters and of both Adam moments (3 parameter-sized copies).

Acceptance targets: (c) <= 1.03x (b) median step time on the MLP and the transformer,
and (c) peak RSS <= 1.05x (b) on the large model.

Threads: ``--threads`` (default 1) is applied to every method and printed. On the 2-vCPU
machine this was written on, the two vCPUs share about one core (two busy processes each
run at half speed) and 2 intra-op threads made blocks 10-50x slower at random (OpenMP
barriers waiting on a descheduled vCPU), so 1 thread is the default; pass
``--threads N`` on a machine with N free cores.

Run (from the repository root; fnlight need not be installed)::

    python benchmarks/step_overhead.py                # full run, about 4 minutes on 2 vCPUs
    python benchmarks/step_overhead.py --quick        # CI smoke run, under 30 s
    python benchmarks/step_overhead.py --no-rss --markdown results.md   # append markdown tables
    python benchmarks/step_overhead.py --no-rss --threads 4 --rounds 40 --steps 50
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import fnlight as fl
except ModuleNotFoundError:  # run from a checkout without installing: use the repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fnlight as fl

Batch = tuple[Tensor, Tensor]
LR = 1e-3
WEIGHT_DECAY = 1e-2
METHODS = ("a", "b", "c")
LABELS = {
    "a": "(a) torch AdamW foreach",
    "b": "(b) torch AdamW fused",
    "c": "(c) fnlight fold, donate",
    "c'": "(c') fnlight fold, no donate",
}


# --------------------------------------------------------------------------- models


class TinyTransformer(nn.Module):
    """Token embedding + learned positions, a ``TransformerEncoder``, a linear vocabulary head."""

    def __init__(
        self, *, vocab: int = 1000, d_model: int = 128, heads: int = 4, ff: int = 512, layers: int = 2, seq: int = 32
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos))


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Cross-entropy of ``model(x)`` against integer targets (any leading shape)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Workload:
    """One row group of the step-time table: a model, its batches, the block length, a target or not."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Batch]
    steps: int
    target: bool = True


def _mlp_batch(g: torch.Generator) -> Batch:
    return torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)


def _transformer_batch(g: torch.Generator) -> Batch:
    tokens = torch.randint(0, 1000, (16, 33), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _tiny_batch(g: torch.Generator) -> Batch:
    return torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


WORKLOADS = (
    Workload("mlp 784-512-512-10, b64", lambda: mlp((784, 512, 512, 10)), _mlp_batch, steps=100),
    Workload("transformer 2x d128 h4 ff512, s32 b16", TinyTransformer, _transformer_batch, steps=40),
    # Almost no arithmetic: the time is the per-step fixed cost of each loop (diagnostic, no target).
    Workload("tiny mlp 32-32-10, b8 (fixed cost)", lambda: mlp((32, 32, 10)), _tiny_batch, steps=200, target=False),
)


def n_params(model: nn.Module) -> int:
    """The number of parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- methods


class HandLoop:
    """The hand-written loop with ``torch.optim.AdamW``; each call trains on one block of batches."""

    def __init__(self, model: nn.Module, *, fused: bool) -> None:
        model.train()
        kind = {"fused": True} if fused else {"foreach": True}
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **kind)

    def __call__(self, batches: Sequence[Batch]) -> None:
        model, opt = self.model, self.opt
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            loss = classification_loss(model, batch)
            loss.backward()
            opt.step()

    def params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}


class FoldRunner:
    """``fnlight.fold`` with ``fnlight.optim.adamw``; each call is one fold (one epoch over the block)."""

    def __init__(self, model: nn.Module, *, donate: bool | str) -> None:
        self.step = fl.make_train_step(model, classification_loss, fl.optim.adamw(LR, weight_decay=WEIGHT_DECAY))
        self.state = self.step.init(seed=0)
        self.donate = donate

    def __call__(self, batches: Sequence[Batch]) -> None:
        epochs = int(self.state.data.epoch) + 1
        self.state = fl.fold(self.step, self.state, batches, epochs=epochs, donate=self.donate, progress=False)

    def params(self) -> dict[str, Tensor]:
        return self.state.params


Runner = HandLoop | FoldRunner


def make_runner(method: str, model: nn.Module) -> Runner:
    """The runner for method ``"a"``, ``"b"``, ``"c"`` (fold, donate) or ``"c'"`` (fold, no donate)."""
    if method in ("a", "b"):
        return HandLoop(model, fused=method == "b")
    return FoldRunner(model, donate="model" if method == "c" else False)


# --------------------------------------------------------------------------- step time


@dataclasses.dataclass
class TimeResult:
    """Per-round ms/step for each method of one workload, and how far (c)'s weights ended from (b)'s."""

    workload: Workload
    params: int
    ms: dict[str, list[float]]
    faults: dict[str, list[float]]
    max_diff: float

    def median(self, m: str) -> float:
        return statistics.median(self.ms[m])

    def paired(self, num: str, den: str) -> list[float]:
        return [x / y for x, y in zip(self.ms[num], self.ms[den], strict=True)]


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles of ``xs``."""
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def time_workload(w: Workload, *, rounds: int, steps: int, warmup: int) -> TimeResult:
    """Warm up, then time ``rounds`` blocks of ``steps`` steps per method, rotating the order."""
    torch.manual_seed(0)
    reference = w.build()
    g = torch.Generator().manual_seed(1)
    batches = [w.batch(g) for _ in range(steps)]
    runners = {m: make_runner(m, copy.deepcopy(reference)) for m in METHODS}
    for _ in range(warmup):
        for m in METHODS:
            runners[m](batches)
    ms: dict[str, list[float]] = {m: [] for m in METHODS}
    faults: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        for m in METHODS[r % 3 :] + METHODS[: r % 3]:
            gc.collect()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            runners[m](batches)
            ms[m].append((time.perf_counter() - t0) * 1e3 / steps)
            faults[m].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
    b, c = runners["b"].params(), runners["c"].params()
    max_diff = max(float((b[n] - c[n]).abs().max()) for n in b)
    return TimeResult(w, n_params(reference), ms, faults, max_diff)


def keep_freed_heap() -> bool:
    """Stop glibc from trimming the heap or mmapping tensors below 32 MiB; return whether it took effect.

    Freed pages then stay in the process, so no method page-faults them back in on the
    next step (see "Heap trimming" in the module docstring).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


# --------------------------------------------------------------------------- peak RSS


@dataclasses.dataclass(frozen=True)
class RssConfig:
    """The large MLP ``in -> width x hidden -> 10`` for the peak-RSS measurement."""

    width: int = 4096
    hidden: int = 6
    d_in: int = 4096
    batch: int = 8
    steps: int = 5

    def widths(self) -> tuple[int, ...]:
        return (self.d_in, *([self.width] * self.hidden), 10)

    def describe(self) -> str:
        return f"mlp {self.d_in}-{self.width}x{self.hidden}-10, b{self.batch}, {self.steps} steps"


def maxrss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """This process's current resident set size in MiB (Linux ``/proc``; elsewhere the peak)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return maxrss_mib()
    return resident_pages * resource.getpagesize() / 2**20


def rss_worker(method: str, cfg: RssConfig) -> dict[str, float]:
    """Train the large MLP for ``cfg.steps`` steps with ``method``; report peak RSS (run in a subprocess)."""
    baseline = rss_mib()
    torch.manual_seed(0)
    model = mlp(cfg.widths())  # kept alive for the whole run, as a user script keeps it
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(cfg.batch, cfg.d_in, generator=g), torch.randint(0, 10, (cfg.batch,), generator=g)) for _ in range(cfg.steps)
    ]
    if method in ("a", "b"):
        HandLoop(model, fused=method == "b")(batches)
    else:
        step = fl.make_train_step(model, classification_loss, fl.optim.adamw(LR, weight_decay=WEIGHT_DECAY))
        state = step.init(seed=0)
        state = fl.fold(step, state, batches, epochs=1, donate="model" if method == "c" else False, progress=False)
        if int(state.step) != cfg.steps:
            raise RuntimeError(f"rss worker: the fold ran {int(state.step)} steps, expected {cfg.steps}")
    return {"peak": maxrss_mib(), "baseline": baseline, "params": float(n_params(model))}


def measure_rss(cfg: RssConfig, *, threads: int) -> dict[str, dict[str, float]]:
    """Run :func:`rss_worker` for every method, each in a fresh subprocess of this script."""
    results: dict[str, dict[str, float]] = {}
    for method in (*METHODS, "c'"):
        cmd = [
            sys.executable,
            __file__,
            "--threads",
            str(threads),
            "--rss-worker",
            method,
            "--rss-config",
            json.dumps(dataclasses.asdict(cfg)),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"rss worker {method!r} failed (exit {proc.returncode}):\n{proc.stderr}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------- report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int, markdown: bool) -> list[str]:
    """Rows as a markdown table or as aligned text (the first ``left`` columns left-aligned)."""
    if markdown:
        align = ["---" if i < left else "---:" for i in range(len(header))]
        return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def fmt(row: Sequence[str]) -> str:
        cells = enumerate(zip(row, widths, strict=True))
        return "  ".join(x.ljust(w) if i < left else x.rjust(w) for i, (x, w) in cells)

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _notes(notes: Sequence[str], *, markdown: bool) -> list[str]:
    return [f"- {n.strip()}" for n in notes] if markdown else list(notes)


def _median_iqr(label: str, xs: Sequence[float]) -> str:
    lo, hi = quartiles(xs)
    return f"{label} {statistics.median(xs):.3f} [{lo:.3f}-{hi:.3f}]"


def time_report(results: Sequence[TimeResult], *, markdown: bool) -> list[str]:
    header = ("model", "method", "ms/step (median)", "p25-p75", "min-max", "vs (b)", "page faults/step")
    rows: list[list[str]] = []
    notes: list[str] = []
    for res in results:
        ref = res.median("b")
        for m in METHODS:
            xs = res.ms[m]
            lo, hi = quartiles(xs)
            rows.append(
                [
                    res.workload.name if m == "a" else "",
                    LABELS[m],
                    f"{res.median(m):.3f}",
                    f"{lo:.3f}-{hi:.3f}",
                    f"{min(xs):.3f}-{max(xs):.3f}",
                    f"{res.median(m) / ref:.3f}x",
                    f"{statistics.median(res.faults[m]):.0f}",
                ]
            )
        cb, ca, ba = res.median("c") / ref, res.median("c") / res.median("a"), ref / res.median("a")
        paired = ", ".join(_median_iqr(f"{n}/{d}", res.paired(n, d)) for n, d in (("c", "b"), ("c", "a"), ("b", "a")))
        notes.append(
            f"{res.workload.name} ({res.params / 1e6:.2f}M params): ratio of medians c/b {cb:.3f}, "
            f"c/a {ca:.3f}, b/a {ba:.3f}; c - b = {(res.median('c') - ref) * 1e3:+.0f} us/step"
        )
        notes.append(f"  paired per-round ratios, median [p25-p75]: {paired}")
        notes.append(f"  (c) vs (b) final weights: max abs difference {res.max_diff:.1e}")
        if res.workload.target:
            notes.append(f"  target (c) <= 1.03x (b): {'met' if cb <= 1.03 else 'NOT met'}")
    return [*_table(header, rows, left=2, markdown=markdown), "", *_notes(notes, markdown=markdown)]


def rss_report(cfg: RssConfig, rss: dict[str, dict[str, float]], *, markdown: bool) -> list[str]:
    header = ("method", "peak MiB", "above baseline MiB", "vs (b)", "vs (a)")
    b, a = rss["b"]["peak"], rss["a"]["peak"]
    rows = [
        [LABELS[m], f"{r['peak']:.0f}", f"{r['peak'] - r['baseline']:.0f}", f"{r['peak'] / b:.3f}x", f"{r['peak'] / a:.3f}x"]
        for m, r in rss.items()
    ]
    params = rss["b"]["params"]
    copy_mib = params * 4 / 2**20
    cb = rss["c"]["peak"] / b
    extra = rss["c'"]["peak"] - rss["c"]["peak"]
    notes = [
        f"{cfg.describe()}: {params / 1e6:.1f}M params, {copy_mib:.0f} MiB per fp32 copy; "
        f"baseline = RSS after imports ({rss['b']['baseline']:.0f} MiB)",
        f"  (c') - (c) = {extra:.0f} MiB = {extra / copy_mib:.2f} param-sized copies (the fold's clone of the input state)",
        f"  target (c) <= 1.05x (b): {cb:.3f}x, {'met' if cb <= 1.05 else 'NOT met'}",
    ]
    return [*_table(header, rows, left=1, markdown=markdown), "", *_notes(notes, markdown=markdown)]


# --------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds and steps, small RSS model (CI smoke run)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also append the tables to PATH as markdown")
    p.add_argument("--rounds", type=int, help="timed rounds per workload (default 25, quick 5)")
    p.add_argument("--steps", type=int, help="steps per timed block for every model (default: per model)")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's heap trimming in the step-time process (see the module docstring)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads for every method (default 1: see the module docstring)"
    )
    p.add_argument("--rss-worker", choices=(*METHODS, "c'"), help=argparse.SUPPRESS)
    p.add_argument("--rss-config", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, low in (("rounds", 4), ("steps", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name} must be at least {low}, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker, RssConfig(**json.loads(args.rss_config)))))
        return
    rounds = args.rounds or (5 if args.quick else 25)
    warmup = 1 if args.quick else 3
    cfg = RssConfig(width=2048, hidden=4, d_in=2048, steps=3) if args.quick else RssConfig()

    trim = "default malloc" if args.default_malloc or not keep_freed_heap() else "glibc heap trim off"
    title = (
        f"fnlight step overhead: torch {torch.__version__}, torch.get_num_threads() = "
        f"{torch.get_num_threads()}, Python {platform.python_version()}, {platform.machine()}, {trim}"
    )
    blocks = {w.name: args.steps or (max(5, w.steps // 10) if args.quick else w.steps) for w in WORKLOADS}
    setup = (
        f"step time: {rounds} rounds of one block per method (steps per block: "
        + ", ".join(f"{n.split(',')[0]} {k}" for n, k in blocks.items())
        + f"), order rotated each round, {warmup} warm-up blocks per method; AdamW lr={LR} wd={WEIGHT_DECAY}"
    )
    print(title, setup, "", sep="\n", flush=True)
    results = [time_workload(w, rounds=rounds, steps=blocks[w.name], warmup=warmup) for w in WORKLOADS]
    print("\n".join(time_report(results, markdown=False)), flush=True)
    rss = None if args.no_rss else measure_rss(cfg, threads=args.threads)
    if rss is not None:
        print("", "peak RSS, one subprocess per method (ru_maxrss):", *rss_report(cfg, rss, markdown=False), sep="\n")

    if args.markdown:
        md = [f"### {title}", "", setup, "", *time_report(results, markdown=True)]
        if rss is not None:
            md += ["", "Peak RSS, one subprocess per method (ru_maxrss):", "", *rss_report(cfg, rss, markdown=True)]
        with args.markdown.open("a") as f:
            f.write("\n".join(md) + "\n\n")


if __name__ == "__main__":
    main()
