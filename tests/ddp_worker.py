"""A data-parallel run for tests/test_ddp.py; launch with torchrun --nproc_per_node 2.

Usage: ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_FILE ACCUM`` — 20 AdamW updates on the
global batches of ``global_batches()``, each rank taking its half (ACCUM micro-batches per update);
rank 0 writes the final parameters to OUT_FILE.
"""

import sys

import torch
from torch import nn

import fnlight as fl


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


def global_batches(n=20, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 10, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def main(out, accum):
    info = fl.init_distributed(timeout=60)
    torch.manual_seed(100 + info.rank)  # different local init: with_ddp must broadcast rank 0's
    local = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    local.load_state_dict(model().state_dict()) if info.rank == 0 else None
    step = fl.with_ddp(fl.make_train_step(local, fl.losses.cross_entropy, fl.optim.adamw(1e-2)))
    if accum > 1:
        step = fl.with_grad_accum(step, every=accum)
    data = []
    for x, y in global_batches():
        half = slice(info.rank * 8, (info.rank + 1) * 8)
        xs, ys = x[half], y[half]
        data += [(xs[i::accum], ys[i::accum]) for i in range(accum)]
    state = fl.fold(step, step.init(), data, progress=False)
    assert int(state.step) == 20, int(state.step)
    if info.rank == 0:
        fl.checkpoint.save(out, state.params)
    torch.distributed.barrier()  # every rank is done before any exits


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
