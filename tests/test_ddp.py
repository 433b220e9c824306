"""with_ddp under torchrun with 2 gloo ranks equals single-process training on the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fnlight as fl
from tests.ddp_worker import global_batches, model

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, accum):
    out = tmp_path / "ddp.ckpt"
    proc = torchrun("tests/ddp_worker.py", str(out), str(accum))
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = fl.make_train_step(model(), fl.losses.cross_entropy, fl.optim.adamw(1e-2))
    expected = fl.fold(step, step.init(), global_batches(), progress=False)
    got = fl.checkpoint.restore(out, {k: torch.empty_like(v) for k, v in expected.params.items()})
    for name in expected.params:
        torch.testing.assert_close(got[name], expected.params[name], rtol=1e-6, atol=1e-6)


def test_single_process_is_a_no_op():
    step = fl.with_ddp(fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1)))
    core = fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    assert fl.init_distributed() == fl.DistInfo(0, 1, 0) == fl.dist_info()
    state = step.init()
    assert fl.tree_equal(
        step(state, (torch.ones(2, 3), torch.zeros(2, 1)))[0].opt_state,
        core(state.replace(), (torch.ones(2, 3), torch.zeros(2, 1)))[0].opt_state,
    )


def test_options_and_order_are_validated():
    core = fl.make_train_step(nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    with pytest.raises(ValueError, match="bucket_mb must be a positive number, got 0"):
        fl.with_ddp(core, bucket_mb=0)
    with pytest.raises(ValueError, match="with_ddp cannot wrap a step already wrapped by with_grad_accum"):
        fl.with_ddp(fl.with_grad_accum(core, every=2))
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got -1"):
        fl.init_distributed(timeout=-1)
    with pytest.raises(ValueError, match="backend must be 'nccl', 'gloo' or None, got 'mpi'"):
        fl.init_distributed(backend="mpi")
