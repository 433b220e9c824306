"""The ensemble sweep example runs as its docstring says (reduced size) and its sweep finds a working learning rate."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ensemble_sweep_reduced_run():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ensemble_sweep.py"), "--steps", "30", "--k", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trained 4 replicas for 30 updates" in proc.stdout, proc.stdout
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\d\.\d+)\s+(\d\.\d+)$", proc.stdout, flags=re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], proc.stdout
    lrs = [float(r[1]) for r in rows]
    accuracy = [float(r[3]) for r in rows]
    assert lrs == sorted(lrs) and lrs[0] == 1e-4 and lrs[-1] == 3e-1
    best = max(accuracy)
    assert best >= 0.85, proc.stdout  # 30 updates at a good learning rate already classify digits
    assert accuracy[0] < best and accuracy[-1] < best, proc.stdout  # the extremes of the sweep are worse
    assert f"validation accuracy {best:.4f}" in proc.stdout
