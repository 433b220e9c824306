"""The examples run as their docstrings say and reach their stated results."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_digits_main_job_reaches_95_percent(tmp_path):
    # its own run directory: runs/digits in the checkout may hold a finished run, which it would only resume and evaluate
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--no-progress", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    accuracy = float(re.search(r"test accuracy (\d\.\d+) \(loss", proc.stdout).group(1))
    assert accuracy >= 0.95, proc.stdout


def run(script, *args, timeout=120):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_digits_short_run_with_fewer_than_10_updates(tmp_path):
    # 1 epoch of 5 batches: the warmup (a tenth of the run) was 0 updates, which warmup_cosine refuses
    proc = run("digits.py", "--epochs", "1", "--batch-size", "256", "--no-aim", "--no-progress", "--run-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "trained to update 5 " in proc.stdout, proc.stdout


def test_charlm_short_run_with_fewer_than_10_updates(tmp_path):
    options = ["--small", "--steps", "3", "--sample-length", "5", "--no-aim", "--no-progress", "--run-dir", str(tmp_path)]
    proc = run("charlm.py", *options)
    assert proc.returncode == 0, proc.stderr
    assert "trained to update 3 " in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("script", "option", "value"),
    [
        ("digits.py", "--epochs", "0"),
        ("digits.py", "--batch-size", "-3"),
        ("charlm.py", "--steps", "-1"),  # --steps 0 meant the default, 500
        ("charlm.py", "--accumulate", "0"),
        ("ddp.py", "--epochs", "0"),
    ],
)
def test_examples_refuse_non_positive_sizes(script, option, value, tmp_path):
    proc = run(script, option, value, "--run-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {option} must be at least 1, got {value}" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("script", "option", "value", "message"),
    [  # each was a traceback after the run had recorded its options and trackers (digits and charlm: at update 1)
        ("digits.py", "--lr", "-1", "--lr must be a finite number > 0, got -1.0"),
        ("digits.py", "--lr", "nan", "--lr must be a finite number > 0, got nan"),
        ("digits.py", "--seed", "-1", "--seed must be an int in [0, 2**32), got -1"),
        ("charlm.py", "--lr", "-1", "--lr must be a finite number > 0, got -1.0"),
    ],
)
def test_examples_refuse_a_learning_rate_or_seed_out_of_range(script, option, value, message, tmp_path):
    proc = run(script, option, value, "--run-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {message}" in proc.stderr, proc.stderr
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []  # nothing recorded


def test_digits_resume_refuses_other_options_and_fresh_starts_over(tmp_path):
    common = ["--no-aim", "--no-progress", "--run-dir", str(tmp_path)]
    first = run("digits.py", "--epochs", "5", "--batch-size", "256", *common)  # 25 updates: a checkpoint at 25
    assert first.returncode == 0 and (tmp_path / "checkpoints" / "step-000000025.ckpt").exists(), first.stderr
    # another seed is another train/test split: resuming trained on the first run's test images, silently
    other = run("digits.py", "--epochs", "5", "--batch-size", "128", "--seed", "2", *common)
    assert other.returncode == 2, other.stdout + other.stderr
    assert "holds a run made with other options (--batch-size: saved 256, given 128; --seed: saved 0, given 2)" in other.stderr
    again = run("digits.py", "--epochs", "5", "--batch-size", "256", *common)
    assert again.returncode == 0 and "at update 25" in again.stdout, again.stderr
    fresh = run("digits.py", "--epochs", "5", "--batch-size", "128", "--seed", "2", "--fresh", *common)
    assert fresh.returncode == 0 and "resumed" not in fresh.stdout and "trained to update 50 " in fresh.stdout, fresh.stderr


def test_charlm_resume_refuses_other_options(tmp_path):
    common = ["--small", "--steps", "5", "--sample-length", "5", "--no-aim", "--no-progress", "--run-dir", str(tmp_path)]
    first = run("charlm.py", *common)  # eval and checkpoints every max(5 // 5, 1) = 1 update
    assert first.returncode == 0 and (tmp_path / "checkpoints" / "step-000000005.ckpt").exists(), first.stderr
    other = run("charlm.py", *common, "--lr", "0.01", "--batch-size", "8")
    assert other.returncode == 2, other.stdout + other.stderr
    assert "holds a run made with other options (--batch-size: saved 16, given 8; --lr: saved 0.003, given 0.01)" in other.stderr
    again = run("charlm.py", *common)
    assert again.returncode == 0 and "at update 5" in again.stdout, again.stderr
