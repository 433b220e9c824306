"""A learning-rate sweep on the handwritten digits: K replicas trained at once in one vmap step.

Sixteen copies of the same MLP (same initial weights), each with its own AdamW learning rate,
log-spaced from ``--lr-min`` to ``--lr-max``, train together: every update is one
``torch.func.vmap`` forward pass, one backward and one vectorised optimizer update for all
replicas (``fnlight.ensemble``). Afterwards the stacked state is taken apart into K ordinary
states, each evaluated on held-out data with ``fnlight.evaluate``; the script prints every
replica's validation accuracy and the best learning rate. With ``--lr-find`` it also runs
``fnlight.finders.lr_find`` on the same model and data, for comparison, and ``--plot PATH``
saves that finder's plot (``docs/images/lr_finder.png`` was made this way).

No download: ``sklearn.datasets.load_digits`` ships with scikit-learn (1,797 8x8 images).

Run::

    python examples/ensemble_sweep.py                          # 16 replicas, 400 updates: seconds on 2 CPU cores
    python examples/ensemble_sweep.py --steps 30 --k 4         # the reduced run the tests use
    python examples/ensemble_sweep.py --lr-find --plot docs/images/lr_finder.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fnlight as fl
from fnlight.ensemble import make_ensemble_step, unstack_states
from fnlight.finders import lr_find


def load(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Digits scaled to [0, 1]: a stratified 80/20 train/validation split."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)

    def tensors(a, b):
        return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.int64)

    return tensors(x_train, y_train), tensors(x_val, y_val)


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def main() -> list[tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=16, help="replicas (learning rates)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer updates")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr-min", type=float, default=1e-4)
    parser.add_argument("--lr-max", type=float, default=3e-1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-find", action="store_true", help="also run lr_find on the same model and data")
    parser.add_argument("--plot", type=Path, help="save the lr_find plot here (implies --lr-find)")
    args = parser.parse_args()
    for option in ("k", "steps", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    for option in ("lr_min", "lr_max"):  # log-spaced: 0 would be -inf
        if not 0 < getattr(args, option) < float("inf"):
            parser.error(f"--{option.replace('_', '-')} must be a finite number > 0, got {getattr(args, option)}")
    torch.set_num_threads(1)

    train, val = load(args.seed)
    train_data = fl.Loader(train, batch_size=args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    if not len(train_data):  # drop_last: a batch larger than the training set gives no batch at all
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(train[0])} training samples")
    val_data = fl.Loader(val, batch_size=512)
    lrs = torch.logspace(torch.log10(torch.tensor(args.lr_min)), torch.log10(torch.tensor(args.lr_max)), args.k).tolist()

    step = make_ensemble_step(model(), fl.losses.classification, k=args.k, lr=lrs, options={"weight_decay": 1e-2})
    state = step.init(seeds=args.seed)  # the same initial weights for every replica: only the learning rate differs
    start = time.perf_counter()
    state = fl.fold(step, state, train_data, max_steps=args.steps, epochs=10_000, progress=False)
    seconds = time.perf_counter() - start
    updates = int(state.step)
    print(
        f"trained {args.k} replicas for {updates} updates in {seconds:.1f} s ({args.k * updates / seconds:.0f} replica-updates/s)"
    )

    evaluate = fl.make_eval_step(fl.losses.classification)
    results = []
    print(f"{'replica':>7}  {'lr':>9}  {'val loss':>8}  {'val accuracy':>12}")
    for i, replica in enumerate(unstack_states(state)):  # ordinary TrainStates: evaluate, export, checkpoint...
        metrics = fl.evaluate(evaluate, replica, val_data)
        results.append((lrs[i], metrics["accuracy"]))
        print(f"{i:>7}  {lrs[i]:>9.2e}  {metrics['loss']:>8.4f}  {metrics['accuracy']:>12.4f}")
    best_lr, best_accuracy = max(results, key=lambda r: r[1])
    print(f"best: lr {best_lr:.2e}, validation accuracy {best_accuracy:.4f}")

    if args.lr_find or args.plot:
        torch.manual_seed(args.seed)
        single = fl.make_train_step(model(), fl.losses.classification, fl.optim.adamw(1e-3, weight_decay=1e-2))
        found = lr_find(single, single.init(seed=args.seed), train_data, start=1e-6, end=10.0)
        print(f"lr_find suggestion: {found.suggestion:.2e} ({len(found.lrs)} updates, diverged: {found.diverged})")
        if args.plot:
            print(f"saved {found.plot(args.plot, title='lr_find: MLP 64-128-10 on digits, AdamW')}")
    return results


if __name__ == "__main__":
    main()
