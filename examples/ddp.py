"""The same training script on one process, on 2 ranks under torchrun, and on two "nodes".

Digits (scikit-learn's bundled 8x8 images, no download) with a global batch of 64 split over
the ranks by a sharded, resumable :class:`fnlight.Loader`; ``--fsdp`` shards the parameters and
optimizer state instead of replicating them. Evaluation averages over every rank's share, only
rank 0 writes the metrics (JSONL), checkpoints are written every 10 epochs (by rank 0, or by every
rank for its shards under ``--fsdp``) and running the command again resumes from the newest. The
options that define the run (``--epochs``, ``--global-batch``, ``--fsdp``) and the world size must
then be the same, or every rank stops and says which differ (``--fresh`` starts over).

Run::

    python examples/ddp.py                                            # one process
    torchrun --standalone --nproc_per_node 2 examples/ddp.py          # 2 ranks (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc_per_node 2 examples/ddp.py --fsdp   # 2 ranks, fully sharded

    # two "nodes" on one machine: start both commands (two terminals), they meet at localhost:29400
    torchrun --nnodes 2 --nproc_per_node 1 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint localhost:29400 examples/ddp.py
    torchrun --nnodes 2 --nproc_per_node 1 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint localhost:29400 examples/ddp.py

Under SLURM, ``srun python examples/ddp.py`` works the same (with ``MASTER_ADDR``/``MASTER_PORT``
exported by the job script). The step code is identical in every case: only the launcher changes.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from _run_options import keep_run_options
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, warmup_cosine


def load(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    as_tensors = lambda a, b: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.int64))
    return as_tensors(x_train, y_train), as_tensors(x_val, y_val)


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state (with_fsdp)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/ddp"))
    parser.add_argument("--fresh", action="store_true", help="delete the run's checkpoints first (rank 0)")
    args = parser.parse_args()
    for option in ("epochs", "global_batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")

    info = fl.init_distributed(timeout=120)  # a no-op without torchrun/SLURM variables
    if args.global_batch % info.world_size:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the world size {info.world_size}")
    if args.fresh and info.rank == 0:
        shutil.rmtree(args.run_dir / "checkpoints", ignore_errors=True)
    if info.world_size > 1:
        torch.distributed.barrier()  # nobody resumes from a checkpoint rank 0 is deleting
    # the options that define the run: resuming under others is refused on every rank (_run_options.py)
    options = {name: getattr(args, name) for name in ("epochs", "global_batch", "fsdp")}
    launch = {"world size": info.world_size}  # another share of each global batch per rank, other dropout draws
    keep_run_options(parser, args.run_dir / "checkpoints", options, launch=launch, record=info.rank == 0)

    train, val = load(seed=0)
    shard = dict(rank=info.rank, world_size=info.world_size)
    train_data = fl.Loader(train, batch_size=args.global_batch // info.world_size, shuffle=True, seed=0, drop_last=True, **shard)
    val_data = fl.Loader(val, batch_size=128, **shard)  # every sample evaluated once, by one rank
    if not len(train_data):  # drop_last: a global batch past the training set gives no batch at all
        parser.error(f"--global-batch {args.global_batch} is larger than the {len(train[0])} training samples")

    torch.manual_seed(0)  # the same initial model everywhere (with_ddp/with_fsdp also take rank 0's)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 10))
    total = args.epochs * len(train_data)
    warmup = max(total // 10, 1)  # a tenth of the run, at least one update (a short run has fewer than 10)
    step = fl.make_train_step(model, fl.losses.classification, adamw(warmup_cosine(3e-3, warmup, max(total - warmup, 1))))
    step = fl.with_fsdp(step) if args.fsdp else fl.with_ddp(step)
    step = fl.with_eval(step, data=val_data, loss_fn=fl.losses.classification, every=len(train_data))
    step = fl.with_tracking(step, trackers=[fl.tracking.JSONLTracker(args.run_dir / "metrics")], every=len(train_data))
    step = fl.with_checkpointing(step, directory=args.run_dir / "checkpoints", every=10 * len(train_data), keep_last=2)

    state = step.init(seed=0)
    if int(state.step) and info.rank == 0:
        print(f"resumed from {state.slots['checkpointing'].resumed_from} at update {int(state.step)}")
    state = fl.fold(step, state, train_data, epochs=args.epochs, progress=False)
    result = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, val_data)  # over all ranks' shares
    if info.rank == 0:
        mode = "fsdp" if args.fsdp else "ddp"
        print(f"{mode}: {info.world_size} rank(s), update {int(state.step)}: val accuracy {result['accuracy']:.4f}")
    return result["accuracy"]


if __name__ == "__main__":
    main()
