"""What one tracker call costs its caller, and what aim's work costs in CPU (docs/tracking.md, "Cost").

Each tracker gets ``--events`` events of 6 scalars, one call each, timed around the call
(``perf_counter``); background trackers are then flushed (untimed) and closed. For aim the
script also gives the CPU time (``process_time``: every thread, rocksdb's included) per event
of three ways to write the same events into one repository: aim's own ``Run.track`` per
event, ``AimTracker.log_scalars`` per event, and ``AimTracker.log_batch`` in batches of 100
(what the background trackers hand it). The reference is aim's own ``Run.track``.

Run (from the repository root)::

    python benchmarks/tracker_calls.py            # about 30 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fnlight.tracking import AimTracker, JSONLTracker, Trackers, default_trackers

NAMES = ("loss", "lr", "grad_norm", "epoch", "throughput/steps_per_s", "throughput/samples_per_s")


def events(n: int, start: int = 1) -> list[tuple[int, dict[str, float]]]:
    return [(s, {k: 1.0 / s + i for i, k in enumerate(NAMES)}) for s in range(start, start + n)]


def caller_us(make: Callable[[str], object], n: int) -> tuple[float, float]:
    """Median and mean µs per ``log_scalars`` call, as its caller sees it."""
    with tempfile.TemporaryDirectory() as d:
        tracker = make(d)
        tracker.open()  # type: ignore[attr-defined]
        times = []
        for step, scalars in events(n):
            t0 = time.perf_counter()
            tracker.log_scalars(step, scalars)  # type: ignore[attr-defined]
            times.append((time.perf_counter() - t0) * 1e6)
        getattr(tracker, "flush", lambda: None)()
        tracker.close()  # type: ignore[attr-defined]
        getattr(tracker, "shutdown", lambda: None)()
    return statistics.median(times), statistics.fmean(times)


def aim_cpu_us(n: int, rounds: int) -> dict[str, list[float]]:
    """CPU µs per event of each way of writing events into aim, in interleaved rounds (one run each)."""
    ways = ("aim's Run.track per event", "AimTracker.log_scalars per event", "AimTracker.log_batch, 100 per batch")
    out: dict[str, list[float]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as d:
        trackers = [AimTracker(d) for _ in ways]
        for t in trackers:
            t.open()
        for t in trackers:  # each run's metrics set up, as in a run under way
            t.log_batch(events(2))
        next_step = dict.fromkeys(ways, 3)
        for _ in range(rounds):
            for way, tracker in zip(ways, trackers, strict=True):
                batch = events(n, next_step[way])
                next_step[way] += n
                c0 = time.process_time()
                if way.startswith("aim's"):
                    for step, scalars in batch:
                        tracker._run.track(scalars, step=step)
                elif "log_scalars" in way:
                    for step, scalars in batch:
                        tracker.log_scalars(step, scalars)
                else:
                    for i in range(0, n, 100):
                        tracker.log_batch(batch[i : i + 100])
                out[way].append((time.process_time() - c0) / n * 1e6)
        for t in trackers:
            t.close()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=500, help="events per tracker (default 500)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of aim's CPU time (default 5)")
    args = parser.parse_args(argv)
    import aim.__version__

    print(f"aim {aim.__version__.__version__}, {args.events} events of {len(NAMES)} scalars per tracker\n")
    print("| tracker | median µs per call | mean |\n|---|---:|---:|")
    cases: list[tuple[str, Callable[[str], object]]] = [
        ("`AimTracker`, called directly", AimTracker),
        ("`JSONLTracker`, called directly", lambda d: JSONLTracker(d)),
        ("`Trackers(AimTracker(...))` (background)", lambda d: Trackers(AimTracker(d))),
        ("`default_trackers(...)` (aim + JSONL, background)", lambda d: default_trackers(d)),
    ]
    for label, make in cases:
        median, mean = caller_us(make, args.events)
        print(f"| {label} | {median:.1f} | {mean:.1f} |")
    cpu = aim_cpu_us(args.events, args.rounds)
    print(f"\nCPU time per event written into aim ({args.rounds} interleaved rounds of {args.events} events; every thread)\n")
    print("| way | median µs | min-max | vs aim's Run.track (paired median) |\n|---|---:|---:|---:|")
    ref = cpu["aim's Run.track per event"]
    for way, xs in cpu.items():
        paired = statistics.median(x / r for x, r in zip(xs, ref, strict=True))
        print(f"| {way} | {statistics.median(xs):.0f} | {min(xs):.0f}-{max(xs):.0f} | {paired:.3f}x |")


if __name__ == "__main__":
    main()
