"""Checkpoint save/load time and peak extra memory: ``fnlight.checkpoint`` against ``torch.save``/``torch.load``.

The state: ``fl.make_train_step(mlp, cross_entropy, fl.optim.adamw(1e-3)).init()`` for an MLP
1024-4096x4-10 (54.6M parameters), with both AdamW moments filled with random values, i.e. three
parameter-sized copies (625 MiB) plus a few 0-d tensors. The torch reference saves the same
tensors as a flat ``{dotted path: tensor}`` dict (what ``torch.save`` is usually given).

Rows, all measured in this one run, files in the same temporary directory:

- ``fnlight.save``: the default, atomic path (temporary file, fsync, rename, directory fsync).
- ``torch.save``: the reference; it does not fsync, so its bytes may still be in the page cache.
- ``torch.save + fsync``: the reference with the same durability, for information.
- ``fnlight.restore``: into a target on the ``meta`` device (no memory for the target).
- ``torch.load(weights_only=True)``: the reference (``mmap=False``, the default).

Timing: after one untimed warm-up run each, every operation is repeated (``--repeats``, default
9) in an order rotated every round;
``os.sync()`` runs before every timed operation (outside the timing), so no operation pays for
the dirty pages another left behind. Loads read files that are in the page cache (both alike).
The table gives the median, the range, and the ratio fnlight/torch of the medians.

Memory: each operation runs once more in its own subprocess (this script with the hidden
``--worker`` flag). The worker builds what it needs (the state for saves, the meta target for
loads), records its RSS, resets the peak (``/proc/self/clear_refs``), runs the operation and
reports the peak RSS growth (``VmHWM``, cross-checked by a thread sampling RSS every ms). For
loads, the growth includes the loaded tensors themselves (625 MiB for both libraries).

It also measures CRC-32 and Adler-32 throughput (``zlib``) over a 100 MB buffer.

Targets: save and load each at most 1.2x torch's median time, extra memory during save at most
64 MiB. The script prints whether each is met; it always exits 0.

Run from the repository root (fnlight need not be installed)::

    python benchmarks/checkpoint_io.py                 # full run, about 2 minutes on 2 vCPUs
    python benchmarks/checkpoint_io.py --quick         # small state, under 30 s
    python benchmarks/checkpoint_io.py --markdown results.md   # also append markdown tables
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optree
import torch
from torch import nn

try:
    import fnlight as fl
except ModuleNotFoundError:  # run from a checkout without installing: use the repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fnlight as fl
from fnlight import checkpoint

MiB = 1 << 20
SAVES = ("fnlight.save", "torch.save", "torch.save + fsync")
LOADS = ("fnlight.restore", "torch.load(weights_only=True)")
REFERENCE = {"fnlight.save": "torch.save", "fnlight.restore": "torch.load(weights_only=True)"}


# --------------------------------------------------------------------------- the state


def build_model(width: int, depth: int, inputs: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def build_state(width: int, depth: int, inputs: int, *, device: str = "cpu") -> fl.TrainState:
    """A TrainState with AdamW moments filled in place (no temporaries: RSS is then steady)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(width, depth, inputs)
    state = fl.make_train_step(model, fl.losses.cross_entropy, fl.optim.adamw(1e-3)).init(seed=0)
    if device == "cpu":
        g = torch.Generator().manual_seed(1)
        for t in [*state.opt_state.mu.values(), *state.opt_state.nu.values()]:
            t.uniform_(0, 1e-3, generator=g)
    return state


def flat_dict(state: Any) -> dict[str, torch.Tensor]:
    paths, leaves, _ = optree.tree_flatten_with_path(state, namespace="fnlight")
    return {".".join(map(str, p)): leaf for p, leaf in zip(paths, leaves)}


def meta_target(state_or_sizes: Any) -> Any:
    return optree.tree_map(lambda t: torch.empty_like(t, device="meta"), state_or_sizes, namespace="fnlight")


# --------------------------------------------------------------------------- operations


def torch_save_fsync(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def operations(state: Any, directory: str) -> dict[str, Callable[[], Any]]:
    flat = flat_dict(state) if state is not None else None
    target = meta_target(state) if state is not None else None
    return {
        "fnlight.save": lambda: checkpoint.save(f"{directory}/state.ckpt", state),
        "torch.save": lambda: torch.save(flat, f"{directory}/state.pt"),
        "torch.save + fsync": lambda: torch_save_fsync(flat, f"{directory}/state_fsync.pt"),
        "fnlight.restore": lambda: checkpoint.restore(f"{directory}/state.ckpt", target),
        "torch.load(weights_only=True)": lambda: torch.load(f"{directory}/state.pt", weights_only=True),
    }


def time_all(ops: dict[str, Callable[[], Any]], names: Sequence[str], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up, not timed: creates the files, faults in code paths
        os.sync()
        ops[name]()
    for r in range(repeats):
        for name in [*names[r % len(names) :], *names[: r % len(names)]]:
            os.sync()
            gc.collect()
            t0 = time.perf_counter()
            out = ops[name]()
            times[name].append(time.perf_counter() - t0)
            del out
    return times


# --------------------------------------------------------------------------- memory (subprocess)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(op: str, cfg: dict[str, Any]) -> dict[str, float]:
    """Run one operation in this (fresh) process and report its peak RSS growth in MiB."""
    torch.set_num_threads(1)
    loading = op in LOADS
    state = build_state(cfg["width"], cfg["depth"], cfg["inputs"], device="meta" if loading else "cpu")
    ops = operations(state, cfg["dir"])
    if loading:
        ops["fnlight.restore"] = lambda: checkpoint.restore(f"{cfg['dir']}/state.ckpt", state)
    gc.collect()
    rss0 = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    sampled, stop = [rss0], threading.Event()

    def sample() -> None:
        page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
        with open("/proc/self/statm") as f:
            while not stop.is_set():
                f.seek(0)
                sampled.append(int(f.read().split()[1]) * page_kib)
                time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = ops[op]()
    stop.set()
    thread.join()
    peak = max(max(sampled), _status_kib("VmHWM") if reset else 0)
    del out
    return {"rss0_mib": rss0 / 1024, "extra_mib": (peak - rss0) / 1024, "hwm_reset": reset}


def measure_memory(op: str, cfg: dict[str, Any]) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", op, "--worker-config", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {op} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- checksums


def checksum_throughput(size: int = 100_000_000, repeats: int = 5) -> dict[str, float]:
    data = memoryview(os.urandom(size))
    out = {}
    for name, fn in (("zlib.crc32", zlib.crc32), ("zlib.adler32", zlib.adler32)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, size, 8 * MiB):  # the chunking save and restore use
                fn(data[i : i + 8 * MiB])
            times.append(time.perf_counter() - t0)
        out[name] = size / statistics.median(times) / 1e9
    return out


# --------------------------------------------------------------------------- report


def report(
    times: dict[str, list[float]],
    memory: dict[str, dict[str, float]],
    crc: dict[str, float],
    crc_size: int,
    *,
    markdown: bool,
) -> list[str]:
    lines = []
    if markdown:
        lines += ["| operation | median s | min-max s | ratio fnlight/torch | peak extra RSS MiB |", "|---|---|---|---|---|"]
    else:
        lines.append(f"{'operation':32s} {'median s':>9s} {'min-max s':>15s} {'fnlight/torch':>14s} {'extra MiB':>10s}")
    for name in (*SAVES, *LOADS):
        med = statistics.median(times[name])
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        ref = REFERENCE.get(name)
        ratio = f"{med / statistics.median(times[ref]):.2f}x" if ref else ""
        mem = f"{memory[name]['extra_mib']:.1f}" if name in memory else ""
        if markdown:
            lines.append(f"| {name} | {med:.3f} | {spread} | {ratio} | {mem} |")
        else:
            lines.append(f"{name:32s} {med:9.3f} {spread:>15s} {ratio:>14s} {mem:>10s}")
    lines.append("")
    rates = ", ".join(f"{k} {v:.2f} GB/s" for k, v in crc.items())
    lines.append(f"checksum throughput ({crc_size / 1e6:.0f} MB buffer, 8 MiB chunks, median of 5): {rates}")
    return lines


def verdicts(times: dict[str, list[float]], memory: dict[str, dict[str, float]]) -> list[str]:
    def ratio(a: str, b: str) -> float:
        return statistics.median(times[a]) / statistics.median(times[b])

    def paired(a: str, b: str) -> str:
        per_round = sorted(x / y for x, y in zip(times[a], times[b]))
        return f"paired per-round ratio median {statistics.median(per_round):.2f}x (range {per_round[0]:.2f}-{per_round[-1]:.2f})"

    rs, rl = ratio("fnlight.save", "torch.save"), ratio("fnlight.restore", "torch.load(weights_only=True)")
    extra = memory["fnlight.save"]["extra_mib"]
    return [
        f"save fnlight/torch.save: {paired('fnlight.save', 'torch.save')}; "
        f"vs torch.save + fsync (same durability) {ratio('fnlight.save', 'torch.save + fsync'):.2f}x",
        f"load fnlight/torch.load: {paired('fnlight.restore', 'torch.load(weights_only=True)')}",
        f"target save <= 1.2x torch.save:        {rs:.2f}x  {'met' if rs <= 1.2 else 'NOT MET'}",
        f"target load <= 1.2x torch.load:        {rl:.2f}x  {'met' if rl <= 1.2 else 'NOT MET'}",
        f"target save extra memory <= 64 MiB:    {extra:.1f} MiB  {'met' if extra <= 64 else 'NOT MET'}",
        f"extra memory ratios fnlight/torch: save {extra:.1f}/{memory['torch.save']['extra_mib']:.1f} MiB, "
        f"load {memory['fnlight.restore']['extra_mib']:.1f}/{memory['torch.load(weights_only=True)']['extra_mib']:.1f} MiB "
        "(loads include the loaded tensors)",
    ]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small state (~1M parameters), 3 repeats: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per operation (default 9, quick 3)")
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory in /tmp)")
    p.add_argument("--markdown", metavar="PATH", help="also append the tables as markdown to PATH")
    p.add_argument("--worker", choices=(*SAVES, *LOADS), help=argparse.SUPPRESS)
    p.add_argument("--worker-config", default="{}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.worker_config))))
        return
    torch.set_num_threads(1)
    sizes = {"width": 512, "depth": 2, "inputs": 256} if args.quick else {"width": 4096, "depth": 3, "inputs": 1024}
    repeats = args.repeats or (3 if args.quick else 9)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fnlight-ckpt-bench-") as directory:
        state = build_state(**sizes)
        n_params = sum(p.numel() for p in state.params.values())
        tensors = optree.tree_leaves(state, namespace="fnlight")
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        n_tensors = len(tensors)
        ops = operations(state, directory)
        times = time_all(ops, SAVES, repeats)
        times.update(time_all(ops, LOADS, repeats))
        sizes_on_disk = {n: os.path.getsize(f"{directory}/{n}") / MiB for n in ("state.ckpt", "state.pt")}
        del state, ops, tensors
        gc.collect()
        cfg = {**sizes, "dir": directory}
        memory = {op: measure_memory(op, cfg) for op in (*SAVES, *LOADS)}
    crc_size = 10_000_000 if args.quick else 100_000_000
    crc = checksum_throughput(crc_size)
    header = [
        f"fnlight checkpoint I/O vs torch.save/torch.load  (torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, 1 torch thread)",
        f"state: {n_params / 1e6:.1f}M parameters + AdamW moments, {nbytes / MiB:.1f} MiB in {n_tensors} "
        f"tensors; files: fnlight {sizes_on_disk['state.ckpt']:.1f} MiB, torch {sizes_on_disk['state.pt']:.1f} MiB; "
        f"{repeats} repeats, os.sync() before each",
    ]
    print(*header, "", *report(times, memory, crc, crc_size, markdown=False), "", *verdicts(times, memory), sep="\n")
    if args.markdown:
        md = ["", f"### {header[0]}", "", header[1], "", *report(times, memory, crc, crc_size, markdown=True), ""]
        md += [f"- {v}" for v in verdicts(times, memory)]
        with open(args.markdown, "a") as f:
            f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
