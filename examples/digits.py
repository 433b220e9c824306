"""Train a small MLP on scikit-learn's bundled handwritten digits, with tracking and checkpoints.

The main job of the README. No download: ``sklearn.datasets.load_digits`` ships with
scikit-learn (1,797 8x8 images). Runs in seconds on 2 CPU cores and shows the pieces a real
run uses: a shuffled resumable loader, warmup-cosine AdamW, evaluation on held-out data
every epoch, metrics tracked to aim (an embedded repository, when aim is installed) and to a
JSONL file, and checkpoints every 5 epochs. Running it again resumes from the last
checkpoint (``--fresh`` starts over); the options that define the run (``--epochs``,
``--batch-size``, ``--lr``, ``--seed``) must then be the same, or it stops and says which differ.

Run::

    python examples/digits.py                       # 30 epochs, seed 0, into runs/digits
    python examples/digits.py --epochs 5 --seed 1 --no-progress --run-dir /tmp/digits
    aim up --repo runs/digits                       # look at the curves (pip install aim)
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from _run_options import keep_run_options
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, decay_mask_no_bias_norm, warmup_cosine
from fnlight.tracking import ProcessTrackers, default_trackers


def load(seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Digits as float tensors scaled to [0, 1]: train / validation / test, 70/10/20, stratified."""
    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.125, random_state=seed, stratify=y_rest)

    def tensors(a, b):
        return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.int64)

    return tensors(x_train, y_train), tensors(x_val, y_val), tensors(x_test, y_test)


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/digits"))
    parser.add_argument("--fresh", action="store_true", help="delete the run directory's checkpoints first")
    parser.add_argument("--no-aim", action="store_true", help="track to JSONL only")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    for option in ("epochs", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if not 0 < args.lr < float("inf"):  # the schedule hands it to the optimizer only as the run goes
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.seed < 2**32:  # scikit-learn's random_state for the split
        parser.error(f"--seed must be an int in [0, 2**32), got {args.seed}")
    if args.fresh:
        shutil.rmtree(args.run_dir / "checkpoints", ignore_errors=True)
    # the options that define the run: resuming under others is refused (_run_options.py)
    options = {name: getattr(args, name) for name in ("epochs", "batch_size", "lr", "seed")}
    keep_run_options(parser, args.run_dir / "checkpoints", options)

    train, val, test = load(args.seed)
    train_data = fl.Loader(train, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    val_data = fl.Loader(val, batch_size=256)
    test_data = fl.Loader(test, batch_size=256)

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    per_epoch = len(train_data)  # optimizer updates per epoch
    total = args.epochs * per_epoch
    warmup = max(total // 10, 1)  # a tenth of the run, at least one update (a short run has fewer than 10)
    schedule = warmup_cosine(args.lr, warmup, max(total - warmup, 1), end_value=args.lr / 100)
    optimizer = adamw(schedule, weight_decay=1e-2, mask=decay_mask_no_bias_norm)

    step = fl.make_train_step(model, fl.losses.classification, optimizer)
    step = fl.with_eval(step, data=val_data, loss_fn=fl.losses.classification, every=per_epoch)
    # aim (when installed) and JSONL, run in a separate process: logging costs training a queue put
    trackers = ProcessTrackers(default_trackers(args.run_dir, experiment="digits", aim=False if args.no_aim else None))
    step = fl.with_tracking(step, trackers=[trackers], every=10, hparams=vars(args) | {"run_dir": str(args.run_dir)})
    step = fl.with_checkpointing(step, directory=args.run_dir / "checkpoints", every=5 * per_epoch, keep_last=2)

    @fl.every(5 * per_epoch)
    def report(state: fl.TrainState, metrics: dict[str, torch.Tensor]) -> None:
        print(
            f"update {int(state.step):5d}  epoch {int(state.step) // per_epoch:3d}  train loss {float(metrics['loss']):.4f}"
            f"  val loss {float(metrics['val/loss']):.4f}  val accuracy {float(metrics['val/accuracy']):.4f}"
        )

    start = time.perf_counter()
    state = step.init(seed=args.seed)
    if int(state.step):
        print(f"resumed from {state.slots['checkpointing'].resumed_from} at update {int(state.step)}")
    state = fl.fold(step, state, train_data, epochs=args.epochs, observers=[report], progress=False if args.no_progress else None)
    result = fl.evaluate(fl.make_eval_step(fl.losses.classification), state, test_data)
    print(
        f"trained to update {int(state.step)} in {time.perf_counter() - start:.1f}s; "
        f"test accuracy {result['accuracy']:.4f} (loss {result['loss']:.4f})"
    )
    print(f"tracked run {state.slots['tracking'].run_ids[0]} in {args.run_dir}; checkpoints in {args.run_dir / 'checkpoints'}")
    return result["accuracy"]


if __name__ == "__main__":
    main()
