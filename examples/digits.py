"""Train a small MLP on scikit-learn's bundled handwritten digits and report test accuracy.

The main job of the README. No download: ``sklearn.datasets.load_digits`` ships with
scikit-learn (1,797 8x8 images). Runs in seconds on 2 CPU cores.

Run::

    python examples/digits.py            # defaults: 30 epochs, seed 0
    python examples/digits.py --epochs 5 --seed 1 --no-progress
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fnlight as fl
from fnlight.optim import adamw, decay_mask_no_bias_norm, warmup_cosine


def load(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Digits as float tensors scaled to [0, 1], split 80/20 with a fixed seed."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)
    return (as_x(x_train), as_y(y_train)), (as_x(x_test), as_y(y_test))


def main() -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    (x_train, y_train), (x_test, y_test) = load(args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    steps_per_epoch = -(-len(x_train) // args.batch_size)  # updates per epoch
    total = args.epochs * steps_per_epoch
    schedule = warmup_cosine(args.lr, total // 10, total - total // 10, end_value=args.lr / 100)
    optimizer = adamw(schedule, weight_decay=1e-2, mask=decay_mask_no_bias_norm)

    step = fl.make_train_step(model, fl.losses.classification, optimizer)
    evaluate = fl.make_eval_step(fl.losses.classification)
    train_data = fl.Loader((x_train, y_train), batch_size=args.batch_size, shuffle=True, seed=args.seed)
    test_data = fl.Loader((x_test, y_test), batch_size=256)

    @fl.every(steps_per_epoch * 5)
    def report(state: fl.TrainState, metrics: dict[str, torch.Tensor]) -> None:
        val = fl.evaluate(evaluate, state, test_data)
        print(
            f"update {int(state.step):5d}  epoch {int(state.step) // steps_per_epoch:3d}  train loss {float(metrics['loss']):.4f}"
            f"  test loss {val['loss']:.4f}  test accuracy {val['accuracy']:.4f}"
        )

    start = time.perf_counter()
    state = fl.fold(
        step,
        step.init(seed=args.seed),
        train_data,
        epochs=args.epochs,
        observers=[report],
        progress=False if args.no_progress else None,
    )
    result = fl.evaluate(evaluate, state, test_data)
    print(
        f"trained {int(state.step)} updates in {time.perf_counter() - start:.1f}s; "
        f"test accuracy {result['accuracy']:.4f} (loss {result['loss']:.4f})"
    )
    return result["accuracy"]


if __name__ == "__main__":
    main()
