"""examples/ddp.py runs unchanged on one process, on 2 ranks (DDP and FSDP, with resume) and on two "nodes"."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import fnlight as fl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run(cmd):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def accuracy(stdout, mode, ranks, update):
    found = re.search(rf"{mode}: {ranks} rank\(s\), update {update}: val accuracy ([0-9.]+)", stdout)
    assert found, stdout
    return float(found.group(1))


def test_one_process(tmp_path):
    proc = run([sys.executable, "examples/ddp.py", "--epochs", "2", "--run-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert accuracy(proc.stdout, "ddp", 1, 44) > 0.7


def test_a_global_batch_larger_than_the_training_set_is_named(tmp_path):
    """It was a traceback: 'with_eval: every must be an int >= 1 (optimizer updates) or None, got 0'."""
    proc = run([sys.executable, "examples/ddp.py", "--global-batch", "5000", "--run-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert "ddp.py: error: --global-batch 5000 is larger than the 1437 training samples" in proc.stderr


def test_two_ranks_fsdp_then_resume_bit_exactly_and_only_under_the_same_options(tmp_path):
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "examples/ddp.py", "--fsdp", "--run-dir", str(tmp_path)]
    first = run([*cmd, "--epochs", "20"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert accuracy(first.stdout, "fsdp", 2, 440) > 0.9
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints / "step-000000220.ckpt")) == [
        "rank-00000-of-00002.ckpt",
        "rank-00001-of-00002.ckpt",
    ]
    # the last checkpoint lost: the run resumes from update 220 and retraces the uninterrupted run's metrics exactly
    shutil.rmtree(checkpoints / "step-000000440.ckpt")
    again = run([*cmd, "--epochs", "20"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at update 220" in again.stdout
    assert accuracy(again.stdout, "fsdp", 2, 440) == accuracy(first.stdout, "fsdp", 2, 440)
    (metrics,) = (tmp_path / "metrics").glob("*.jsonl")  # one run, continued: the resumed epochs follow the first 20
    events = [json.loads(line) for line in metrics.read_text().splitlines()]  # the file holds the rerun epochs twice
    logged = fl.tracking.read_scalars(metrics)  # which reads each update once
    for name in ("loss", "accuracy", "val/loss", "val/accuracy"):
        raw = [(e["step"], e["scalars"][name]) for e in events if name in e["scalars"]]
        assert [s for s, _ in raw] == [22 * e for e in range(1, 21)] + [22 * e for e in range(11, 21)], name
        assert raw[20:] == raw[10:20] and logged[name] == raw[:20], name
    # other options, or another world size, would mix two runs: every rank stops and names what differs
    other = run([*cmd, "--epochs", "21", "--global-batch", "32"])
    assert other.returncode != 0
    assert "(--epochs: saved 20, given 21; --global-batch: saved 64, given 32); pass the same options" in other.stderr
    one = run([sys.executable, "examples/ddp.py", "--epochs", "20", "--run-dir", str(tmp_path)])
    assert one.returncode == 2
    assert "(--fsdp: saved True, given False; world size: saved 2, given 1); pass the same options" in one.stderr
    assert sorted(os.listdir(checkpoints)) == ["latest", "options.json", "step-000000220.ckpt", "step-000000440.ckpt"]


def test_two_nodes_on_one_machine(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node-rank",
                str(n),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"localhost:{port}",
                "examples/ddp.py",
                "--epochs",
                "2",
                "--run-dir",
                str(tmp_path),
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert accuracy(outputs[0][0], "ddp", 2, 44) > 0.7
