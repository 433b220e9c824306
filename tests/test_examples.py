"""The examples run as their docstrings say and reach their stated results."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_digits_main_job_reaches_95_percent():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    accuracy = float(re.search(r"test accuracy (\d\.\d+) \(loss", proc.stdout).group(1))
    assert accuracy >= 0.95, proc.stdout
