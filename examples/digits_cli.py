"""A model and a data module for the fnlight command line: an MLP on scikit-learn's handwritten digits.

The CLI twin of ``examples/digits.py``: the same data and model, but the run is assembled
from ``examples/configs/digits.yaml`` by ``fnlight`` instead of by hand. No download
(``load_digits`` ships with scikit-learn); trains in seconds on 2 CPU cores. Running ``fit``
again resumes from the last checkpoint. From the repository root::

    fnlight fit --config examples/configs/digits.yaml
    fnlight fit --config examples/configs/digits.yaml --recipe.lr 0.01 --model.init_args.hidden 64 --print_config
    fnlight test --config runs/digits-cli/checkpoints/config.yaml
    fnlight predict --config runs/digits-cli/checkpoints/config.yaml --output runs/digits-cli/test.npy
    python -m fnlight.cli fit --config examples/configs/digits.yaml --recipe.epochs 40 --overwrite
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fnlight as fl


class DigitsMLP(nn.Module):
    """A ReLU MLP from the 64 pixels of a digit to its 10 class logits.

    Args:
        hidden: the width of each hidden layer.
        depth: the number of hidden layers.
        dropout: the dropout probability after each hidden layer.
    """

    def __init__(self, hidden: int = 256, depth: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsData:
    """The 1,797 8x8 digits scaled to [0, 1]: stratified 70/10/20 train/validation/test splits as fnlight Loaders.

    Args:
        batch_size: training batch size (the training order is shuffled per epoch).
        eval_batch_size: batch size of validation, test and prediction.
        seed: the split and the shuffling order.
    """

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 256, seed: int = 0) -> None:
        x, y = load_digits(return_X_y=True)
        x_rest, x_test, y_rest, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
        x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.125, random_state=seed, stratify=y_rest)
        self.splits = {
            name: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.int64))
            for name, a, b in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
        }
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed

    def train(self) -> fl.Loader:
        """Shuffled training batches ``(images, labels)``."""
        return fl.Loader(self.splits["train"], batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val(self) -> fl.Loader:
        """Validation batches."""
        return fl.Loader(self.splits["val"], batch_size=self.eval_batch_size)

    def test(self) -> fl.Loader:
        """Test batches."""
        return fl.Loader(self.splits["test"], batch_size=self.eval_batch_size)

    def predict(self) -> fl.Loader:
        """The test images alone, in order: ``predict`` writes one row of logits per image."""
        return fl.Loader((self.splits["test"][0],), batch_size=self.eval_batch_size)
