"""Run every benchmark and rewrite the generated section of ``docs/benchmarks.md``.

Each script runs in its own process, one after the other (never two at once: they time
themselves), with ``--markdown`` pointing at a temporary file; its console output is shown
as it comes. The markdown of all the scripts, under a header with the date, the machine
(CPU model, cores, memory, load average), the software (torch, Python, Lightning, the fnlight
commit) and the device label, replaces what lies between the markers
``<!-- suite:begin -->`` and ``<!-- suite:end -->`` in the output file (appended at the end
when the file has no markers yet). Everything outside the markers, the hand-written analysis,
is kept as it is. Inside, each script has its own part, opened by a marker that records its
run (``<!-- suite:part name=... date=... -->``): a run of some scripts (``--only``, ``--skip``)
rewrites their parts and keeps the others' as they were (``--fresh`` drops them), and the
table at the top gives each part's date. A script that fails or times out gets a line saying
so (and the end of its output) in its part; the others still run. The suite exits non-zero
if any script failed.

Every figure in the section is a ratio to a reference measured by the same script in the same
run, with medians and spread over repeats (see each script's docstring).

Scripts (``--only``/``--skip`` take these names): ``peers`` (step time and peak memory of
fnlight eager and compiled, hand-written loops, Lightning's Trainer and Fabric; it covers
``step_overhead``'s loops, so ``step_overhead`` runs only when named with ``--only``),
``transforms_overhead`` (accumulation, activation checkpointing), ``checkpoint_io``,
``tracking_overhead``, ``ensemble``, ``ddp``, and ``compile`` (whole-step compile against
hand-compiled loops) where this checkout has ``benchmarks/compile.py``.

Run (from the repository root; ``nox -s bench`` runs it with Lightning installed)::

    python benchmarks/suite.py                          # full run, 30-45 minutes on 2 vCPUs
    python benchmarks/suite.py --only peers ensemble    # some scripts
    python benchmarks/suite.py --quick --output /tmp/benchmarks.md   # smoke run
    python benchmarks/suite.py --device-label "2-vCPU VM, shared with other jobs"

A ``--quick`` run writes to ``--output`` only when one is given (its figures mean nothing, so
it never overwrites the docs by default); without one it prints the section.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


@dataclasses.dataclass(frozen=True)
class Script:
    """One benchmark script: its file, the heading of its part of the section, and what it compares against."""

    name: str
    title: str
    reference: str

    @property
    def path(self) -> Path:
        return ROOT / "benchmarks" / f"{self.name}.py"


SCRIPTS = (
    Script("peers", "Step time and peak memory: fnlight against hand-written loops and Lightning", "(b) hand loop, fused AdamW"),
    Script("step_overhead", "Step overhead: fold against a hand-written loop", "(b) hand loop, fused AdamW"),
    Script(
        "transforms_overhead", "Transforms: gradient accumulation, activation checkpointing", "hand-written accumulation loop"
    ),
    Script("checkpoint_io", "Checkpoint I/O", "torch.save / torch.load(weights_only=True)"),
    Script("tracking_overhead", "Tracking overhead", "the same fold without tracking"),
    Script("ensemble", "Ensemble throughput", "K sequential fnlight runs"),
    Script("ddp", "DDP: with_ddp against DistributedDataParallel", "torch DistributedDataParallel"),
    Script(
        "compile",
        "Whole-step compile: with_compile against hand-written loops, eager and hand-compiled",
        "(b) hand loop, fused AdamW",
    ),
)
# peers runs step_overhead's loops; a script not in this checkout (compile.py comes with with_compile) is left out
DEFAULT = tuple(s.name for s in SCRIPTS if s.name != "step_overhead" and s.path.exists())


@dataclasses.dataclass
class Outcome:
    """What one script left: its markdown, exit status, wall time and the end of its console output."""

    script: Script
    markdown: str
    returncode: int
    seconds: float
    tail: list[str]


# --------------------------------------------------------------------------- running


def run_script(script: Script, *, quick: bool, timeout: float) -> Outcome:
    """Run one script with ``--markdown`` into a temporary file, echoing its output."""
    with tempfile.TemporaryDirectory(prefix="fnlight-suite-") as tmp:
        md = Path(tmp) / "out.md"
        cmd = [sys.executable, str(script.path), *(["--quick"] if quick else []), "--markdown", str(md)]
        print(f"\n=== {script.name}: {' '.join(cmd[1:])}", flush=True)
        tail: collections.deque[str] = collections.deque(maxlen=25)
        t0 = time.perf_counter()
        # its own process group, so that a timeout also ends what it started (ddp.py's torchrun ranks)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the script's process group closes its output
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))
        returncode = proc.wait()
        timer.cancel()
        if killed.is_set():
            tail.append(f"(killed after the suite's timeout of {timeout:.0f} s)")
        seconds = time.perf_counter() - t0
        text = md.read_text() if md.exists() else ""
    return Outcome(script, text.strip(), returncode, seconds, list(tail))


# --------------------------------------------------------------------------- the section


def demote_headings(markdown: str, *, top: int) -> str:
    """Shift the headings of ``markdown`` (outside code fences) so that the highest becomes level ``top``."""
    lines = markdown.splitlines()
    fenced, levels = False, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) ", line)):
            levels.append(len(m[1]))
    if not levels:
        return markdown
    shift = top - min(levels)
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) ", line)):
            line = "#" * min(6, len(m[1]) + shift) + line[len(m[1]) :]
        out.append(line)
    return "\n".join(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return "?"
    return f"{kib / 2**20:.0f} GiB"


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _quiet(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def software() -> dict[str, str]:
    """Versions, read by a fresh interpreter (importing torch here would cost the suite's memory nothing, but time)."""
    probe = (
        "import platform, torch\n"
        "try:\n    import lightning; lv = lightning.__version__\nexcept ImportError:\n    lv = 'not installed'\n"
        "cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''\n"
        "print(torch.__version__, platform.python_version(), lv, torch.get_num_threads(), repr(cuda), sep='|')"
    )
    out = _quiet([sys.executable, "-c", probe]).split("|")
    torch_v, python_v, lightning_v, threads, cuda = out if len(out) == 5 else ["?"] * 5
    commit = _quiet(["git", "rev-parse", "--short", "HEAD"]) or "?"
    dirty = " (with uncommitted changes)" if _quiet(["git", "status", "--porcelain", "--untracked-files=no"]) else ""
    return {
        "torch": torch_v,
        "python": python_v,
        "lightning": lightning_v,
        "threads": threads,
        "cuda": cuda.strip("'\""),
        "commit": commit + dirty,
    }


def device_label(sw: dict[str, str], override: str | None) -> str:
    if override:
        return override
    if sw["cuda"]:
        return f"CPU for every script except ddp.py, which uses the GPU: {sw['cuda']}"
    return "CPU (torch sees no GPU)"


PART = re.compile(r"<!-- suite:part name=(\w+) date=(\S+) mode=(\w+) status=(\S+) seconds=(\d+) -->")


def render_part(o: Outcome, *, started: datetime.datetime, quick: bool, sw: dict[str, str]) -> str:
    """One script's part of the section: a marker holding its run's facts, its heading, its markdown."""
    status = "ok" if o.returncode == 0 else f"failed:exit-{o.returncode}"
    mode = "quick" if quick else "full"
    lines = [
        f"<!-- suite:part name={o.script.name} date={started:%Y-%m-%dT%H:%MZ} mode={mode} status={status} "
        f"seconds={o.seconds:.0f} -->",
        f"### {o.script.name}",
        "",
        f"{o.script.title} (`benchmarks/{o.script.name}.py`). Run {started:%Y-%m-%d %H:%M} UTC"
        f"{' (--quick)' if quick else ''}, {o.seconds:.0f} s; torch {sw['torch']}, lightning {sw['lightning']}, "
        f"fnlight {sw['commit']}.",
        "",
    ]
    if o.markdown:
        lines.append(demote_headings(o.markdown, top=4))
    if o.returncode != 0:
        lines += ["", f"**The script failed (exit {o.returncode}).** The end of its output:", "", "```text", *o.tail, "```"]
    return "\n".join(lines).strip()


def parse_parts(document: str) -> dict[str, str]:
    """The scripts' parts in the generated section of ``document`` (name -> text), if it has one."""
    if document.count(BEGIN) != 1 or document.count(END) != 1:
        return {}
    section = document[document.find(BEGIN) : document.find(END)]
    found = list(PART.finditer(section))
    bounds = [m.start() for m in found] + [len(section)]
    return {m[1]: section[start:stop].strip() for m, start, stop in zip(found, bounds, bounds[1:], strict=False)}


def build_section(
    parts: dict[str, str],
    *,
    quick: bool,
    started: datetime.datetime,
    load: tuple[str, str],
    label: str | None,
    sw: dict[str, str],
) -> str:
    """The generated section: this run's header, a table of the scripts' parts, then the parts in the suite's order."""
    cpus = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cpus
    lines = [
        BEGIN,
        "<!-- generated by benchmarks/suite.py: everything between these markers is rewritten by the next run -->",
        "",
        "## Latest suite run" + (" (a --quick smoke run: the figures mean nothing)" if quick else ""),
        "",
        f"- **Date**: {started:%Y-%m-%d %H:%M} UTC (parts kept from an earlier run give their own date in the table).",
        f"- **Machine**: {cpu_model()}, {cpus} logical CPUs ({usable} usable), {memory_gib()} RAM, "
        f"{platform.system()} {platform.release()}; load average (1/5/15 min) {load[0]} at the start, {load[1]} at the end.",
        f"- **Software**: torch {sw['torch']}, Python {sw['python']}, lightning {sw['lightning']}, "
        f"fnlight commit {sw['commit']}; {sw['threads']} torch thread(s) by default, the scripts set 1.",
        f"- **Device**: {device_label(sw, label)}.",
        "- **Method**: every figure is a ratio to a reference measured by the same script in the same run; "
        "methods are timed in interleaved rounds (order rotated or alternated each round) and the tables give medians, "
        "the spread over rounds (p25-p75, min-max) and paired per-round ratios. Other jobs may share this CPU: "
        "read the paired ratios and the spread with the medians.",
        "",
        "| benchmark | reference (1.00x) | run (UTC) | status | wall time |",
        "|---|---|---|---|---:|",
    ]
    ordered = [(s, parts[s.name]) for s in SCRIPTS if s.name in parts]
    for script, text in ordered:
        m = PART.match(text)
        date, mode, status, seconds = (m[2], m[3], m[4], m[5]) if m else ("?", "?", "?", "0")
        when = date.replace("T", " ").rstrip("Z") + (" (--quick)" if mode == "quick" else "")
        status = status.replace("failed:exit-", "FAILED, exit ")
        lines.append(f"| `{script.name}.py` | {script.reference} | {when} | {status} | {int(seconds)} s |")
    for _, text in ordered:
        lines += ["", text]
    lines += ["", END]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def replace_section(document: str, section: str) -> str:
    """``document`` with the text between the markers (inclusive) replaced by ``section``; appended if there are none.

    Raises:
        ValueError: the markers are not exactly one ``BEGIN`` followed by one ``END``.
    """
    begins, ends = document.count(BEGIN), document.count(END)
    if begins == ends == 0:
        return document.rstrip("\n") + "\n\n" + section + "\n"
    start, stop = document.find(BEGIN), document.find(END)
    if begins != 1 or ends != 1 or stop < start:
        raise ValueError(
            f"expected one {BEGIN!r} followed by one {END!r}, found {begins} and {ends}"
            f"{' in the wrong order' if begins == ends == 1 else ''}: fix the markers by hand, then run again"
        )
    return document[:start] + section + document[stop + len(END) :]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.suite-tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [s.name for s in SCRIPTS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every script's --quick smoke run (written only to an explicit --output)")
    p.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"run only these scripts ({', '.join(names)})")
    p.add_argument("--skip", nargs="+", choices=names, default=[], metavar="NAME", help="run all the default scripts but these")
    p.add_argument("--output", type=Path, help="the markdown file to rewrite (default docs/benchmarks.md; none for --quick)")
    p.add_argument("--fresh", action="store_true", help="drop the parts of scripts not run now (default: keep them)")
    p.add_argument("--device-label", help="describe the device in the header instead of the detected one")
    p.add_argument("--timeout", type=float, help="seconds per script before it is killed (default 3600, quick 600)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    chosen = [s for s in SCRIPTS if s.name in (args.only or DEFAULT) and s.name not in args.skip]
    missing = [s.name for s in chosen if not s.path.exists()]
    if missing:
        raise SystemExit(f"no such benchmark script in this checkout: {', '.join(missing)}")
    output = args.output or (None if args.quick else ROOT / "docs" / "benchmarks.md")
    if output is not None and not output.parent.is_dir():
        raise SystemExit(f"--output {str(output)!r}: no such directory")
    timeout = args.timeout or (600.0 if args.quick else 3600.0)
    started = datetime.datetime.now(datetime.UTC)
    load_start = load_average()
    outcomes = []
    for script in chosen:
        outcomes.append(run_script(script, quick=args.quick, timeout=timeout))
        keep = Path(tempfile.gettempdir()) / f"fnlight-suite-{started:%Y%m%dT%H%M%S}-{script.name}.md"
        keep.write_text(outcomes[-1].markdown)  # nothing measured is lost if the rest fails
    sw = software()
    document = output.read_text() if output is not None and output.exists() else "# Benchmarks\n"
    parts = {} if args.fresh else parse_parts(document)  # the other scripts' parts stay as they were
    parts.update({o.script.name: render_part(o, started=started, quick=args.quick, sw=sw) for o in outcomes})
    load = (load_start, load_average())
    section = build_section(parts, quick=args.quick, started=started, load=load, label=args.device_label, sw=sw)
    if output is None:
        print("\n" + section)
    else:
        write_atomically(output, replace_section(document, section))
        print(f"\nwrote the generated section of {output}")
    failed = [o.script.name for o in outcomes if o.returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
