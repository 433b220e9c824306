"""The research examples run in their CI sizes, as their docstrings say, and learn.

Each runs in a subprocess with warnings as errors and one intra-op thread (on a busy machine
torch's OpenMP threads would otherwise spin against the other processes).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fnlight.tracking import read_scalars

ROOT = Path(__file__).resolve().parents[1]


def launch(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` with warnings as errors and one intra-op thread."""
    return subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def run_example(name: str, *args: str) -> str:
    proc = launch(name, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stderr, proc.stderr
    return proc.stdout


def test_charlm_learns_tracks_checkpoints_and_samples(tmp_path):
    run_dir = tmp_path / "charlm"
    out = run_example("charlm.py", "--small", "--no-aim", "--no-progress", "--run-dir", str(run_dir))
    found = re.search(r"trained to update 40 .*val loss (\d+\.\d+) -> (\d+\.\d+) \(bits/char (\d+\.\d+) -> (\d+\.\d+)\)", out)
    assert found, out
    loss_before, loss_after, bits_before, bits_after = map(float, found.groups())
    assert abs(bits_before - loss_before / math.log(2)) < 2e-3  # bits per character are nats / ln 2
    assert loss_after < loss_before - 1.5 and bits_after < 0.7 * bits_before, out  # from ~7.7 bits/char (untrained) to ~4.7
    assert re.search(r"sample:\ndef .{100,}", out, flags=re.S), out

    run_id = re.search(r"tracked run (\S+) in", out).group(1)
    curve = read_scalars(run_dir / f"{run_id}.jsonl")["val/bits_per_char"]  # (update, value) every 10 updates
    assert [s for s, _ in curve] == [10, 20, 30, 40] and curve[-1][1] < curve[0][1], curve
    assert (run_dir / "checkpoints" / "step-000000040.ckpt").exists()


def test_gan_covers_the_modes():
    out = run_example("gan.py", "--steps", "800")
    first = re.search(r"turn +0 +near a mode +(\d+\.\d)% +modes covered (\d)/8", out)
    final = re.search(r"final: near a mode (\d+\.\d)%, modes covered (\d)/8", out)
    assert first and final, out
    assert float(first.group(1)) < 5 and int(first.group(2)) <= 1, out  # the untrained generator hits nothing
    assert float(final.group(1)) >= 30 and int(final.group(2)) >= 6, out


@pytest.mark.parametrize(
    "options", [[], ["--first-order", "--inner-steps", "3"]], ids=["second-order-1-step", "first-order-3-steps"]
)
def test_maml_adapts_better_than_from_scratch(options):
    out = run_example("maml.py", "--steps", "400", *options)
    untrained = re.search(r"untrained network: held-out query loss (\d+\.\d+) before adaptation, (\d+\.\d+) after", out)
    trained = re.search(
        r"meta-trained \((first|second) order.*: held-out query loss (\d+\.\d+) before adaptation, (\d+\.\d+) after", out
    )
    assert untrained and trained, out
    assert trained.group(1) == ("first" if options else "second"), out
    before, after = float(trained.group(2)), float(trained.group(3))
    from_scratch = float(untrained.group(2))
    assert after < 0.85 * before, out  # a few gradient steps on 10 points fit the new wave
    assert after < 0.75 * from_scratch, out  # and they do because of meta-training


@pytest.mark.parametrize(("option", "value"), [("--steps", "0"), ("--batch-size", "-1")])
def test_gan_refuses_non_positive_sizes(option, value):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gan.py"), option, value],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr  # --steps 0 was an UnboundLocalError after the loop
    assert re.search(rf"error: {option} must be at least 1, got {value}", proc.stderr), proc.stderr


@pytest.mark.parametrize(
    ("script", "option", "value", "message"),
    [
        ("maml.py", "--steps", "0", "--steps must be at least 1, got 0"),  # was a traceback from fold
        ("maml.py", "--tasks", "0", "--tasks must be at least 1, got 0"),  # an IndexError inside the loss
        ("maml.py", "--shots", "0", "--shots must be at least 1, got 0"),  # a ZeroDivisionError inside the loss
        ("maml.py", "--inner-steps", "-1", "--inner-steps must be at least 1, got -1"),  # ran without adapting
        ("ensemble_sweep.py", "--k", "0", "--k must be at least 1, got 0"),
        ("ensemble_sweep.py", "--steps", "0", "--steps must be at least 1, got 0"),
        ("ensemble_sweep.py", "--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("ensemble_sweep.py", "--batch-size", "5000", "--batch-size 5000 is larger than the 1437 training samples"),
        ("ensemble_sweep.py", "--lr-min", "0", "--lr-min must be a finite number > 0, got 0.0"),  # a nan learning rate
    ],
)
def test_maml_and_the_sweep_refuse_options_out_of_range(script, option, value, message):
    proc = launch(script, option, value, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {message}" in proc.stderr, proc.stderr
