"""Step time of ``fnlight.with_ddp`` against torch's ``DistributedDataParallel``, same ranks, same run.

Two ways to train the same model on the same per-rank batches, 2 ranks (gloo on CPU, NCCL on a
GPU), measured in one run:

- (a) the reference: ``DistributedDataParallel(model)`` with ``torch.optim.AdamW(fused=True)``:
  ``opt.zero_grad(set_to_none=True); loss_fn(ddp_model, batch).backward(); opt.step()``
  (DDP's bucketed all-reduce overlapping backward, default 25 MiB buckets);
- (b) ``fnlight.fold(with_ddp(make_train_step(...)), state, batches, donate=True)`` with
  ``fnlight.optim.adamw`` (the same fused kernel; one bucketed all-reduce after backward).

Models: an MLP 784-512-512-10 (batch 64 per rank) and a small transformer encoder (2 layers,
d_model 128, seq 32, batch 16 per rank, 1000-way head), as in benchmarks/step_overhead.py.
After warm-up, every round times one block of N steps per method, in an order alternated each
round; ranks start each block together (a barrier) and rank 0 reports the median ms/step over
rounds, the spread, the ratio of medians and the median of the per-round paired ratios.
Target: (b) <= 1.05x (a). The final weights of (a) and (b) are compared as a check that both did
the same work (float tolerance: DDP sums gradients in a different order).

Run (from the repository root; it starts its own 2 ranks with torchrun)::

    python benchmarks/ddp.py                 # about 2 minutes on 2 vCPUs
    python benchmarks/ddp.py --quick         # smoke run
    python benchmarks/ddp.py --markdown out.md   # also append the table as markdown

With one GPU per rank it uses NCCL; on the 2-vCPU machine this was written on, the two ranks
share about one core, so the CPU figures mostly measure the per-step overhead of each method
around the same arithmetic and gloo all-reduce.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fnlight as fl  # noqa: E402

Batch = tuple[Tensor, Tensor]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 512, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)))


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def batches(kind: str, n: int, rank: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(1000 + rank)
    if kind == "mlp":
        data = [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(n)]
    else:
        data = [(torch.randint(0, 1000, (16, 32), generator=g), torch.randint(0, 1000, (16, 32), generator=g)) for _ in range(n)]
    return [(x.to(device), y.to(device)) for x, y in data]


def build(kind: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return (mlp() if kind == "mlp" else TinyTransformer()).to(device)


def runners(kind: str, device: torch.device) -> dict[str, tuple[Callable[[list[Batch]], None], Callable[[], dict[str, Tensor]]]]:
    from torch.nn.parallel import DistributedDataParallel

    ref_model = build(kind, device)
    ddp = DistributedDataParallel(ref_model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, fused=True)

    def run_torch(data: list[Batch]) -> None:
        for batch in data:
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp, batch).backward()
            opt.step()

    step = fl.with_ddp(fl.make_train_step(build(kind, device), loss_fn, fl.optim.adamw(1e-3)))
    holder = {"state": step.init()}

    def run_fnlight(data: list[Batch]) -> None:
        holder["state"] = fl.fold(step, holder["state"], data, donate=True, progress=False)
        holder["state"] = holder["state"].replace(data=fl.DataPosition())  # the next block is a new pass

    return {
        "torch DDP": (run_torch, lambda: dict(ref_model.named_parameters())),
        "fnlight with_ddp": (run_fnlight, lambda: dict(holder["state"].params)),
    }


def measure(kind: str, *, rounds: int, steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    rank = dist.get_rank()
    methods = runners(kind, device)
    data = batches(kind, steps, rank, device)
    for run, _ in methods.values():
        run(data[:warmup])
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            methods[name][0](data)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    ref, got = (methods[n][1]() for n in names)
    worst = max(float((ref[k].detach() - got[k].detach()).abs().max()) for k in ref)
    times["_max_weight_diff"] = [worst]
    return times


def report(results: dict[str, dict[str, list[float]]], *, device: str, threads: int, markdown: bool) -> list[str]:
    lines = []
    head = [
        "model",
        "torch DDP ms/step",
        "fnlight with_ddp ms/step",
        "ratio of medians",
        "paired ratio median [p25-p75]",
        "max abs Δw",
    ]
    rows = []
    for kind, t in results.items():
        a, b = t["torch DDP"], t["fnlight with_ddp"]
        paired = sorted(y / x for x, y in zip(a, b))
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        rows.append(
            [
                kind,
                f"{statistics.median(a):.3f}",
                f"{statistics.median(b):.3f}",
                f"{statistics.median(b) / statistics.median(a):.3f}x",
                f"{statistics.median(paired):.3f}x [{q[0]:.3f}-{q[2]:.3f}]",
                f"{t['_max_weight_diff'][0]:.1e}",
            ]
        )
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append(
        f"2 ranks, {device}, torch {torch.__version__}, {threads} thread(s) per rank, {platform.machine()} "
        f"{os.cpu_count()} logical CPUs. Target: fnlight <= 1.05x torch DDP."
    )
    verdicts = []
    for kind, t in results.items():
        ratio = statistics.median(t["fnlight with_ddp"]) / statistics.median(t["torch DDP"])
        verdicts.append(f"{kind}: {ratio:.3f}x ({'met' if ratio <= 1.05 else 'NOT met'})")
    lines.append("Verdict: " + "; ".join(verdicts))
    return lines


def worker(args: argparse.Namespace) -> None:
    info = fl.init_distributed(timeout=300)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    results = {
        kind: measure(kind, rounds=args.rounds, steps=args.steps, warmup=args.warmup, device=device) for kind in args.models
    }
    if info.rank == 0:
        lines = report(results, device=str(device.type), threads=args.threads, markdown=False)
        print("\n".join(lines), flush=True)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write("\n".join(report(results, device=str(device.type), threads=args.threads, markdown=True)) + "\n")
    dist.barrier()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (few rounds; no verdict worth reading)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    p.add_argument("--markdown", default=None, help="append the table as markdown to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 5, 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.worker or "RANK" in os.environ:
        worker(args)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--worker", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    raise SystemExit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
