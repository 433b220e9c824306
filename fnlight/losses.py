"""Ready-made loss functions with the ``loss_fn(model, batch)`` signature fnlight steps take.

A loss function receives the model (with the state's tensors bound into it) and one
batch, and returns either a 0-d loss tensor or ``(loss, {name: 0-d tensor})``; the
dictionary's entries become metrics of the step.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["classification", "cross_entropy", "mse"]


def _pair(batch: Any, where: str) -> tuple[Any, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"fnlight.losses.{where}: expected a batch (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    """Mean cross-entropy of ``model(inputs)`` logits against integer ``targets``.

    >>> import torch
    >>> cross_entropy(torch.nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))).shape
    torch.Size([])
    """
    x, y = _pair(batch, "cross_entropy")
    return F.cross_entropy(model(x), y)


def classification(model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy loss plus an ``accuracy`` metric (fraction of correct argmax predictions).

    Takes what ``F.cross_entropy`` takes: logits ``[N, C]``, ``[N, C, d1, ...]`` (classes
    in dimension 1, e.g. a sequence model's ``[batch, vocab, length]``) or ``[C]``, and
    class indices (targets equal to ``-100``, cross-entropy's ``ignore_index``, are left
    out of the accuracy as of the loss) or class probabilities (their argmax is the class).

    >>> import torch
    >>> loss, aux = classification(torch.nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    >>> sorted(aux)
    ['accuracy']
    """
    x, y = _pair(batch, "classification")
    logits = model(x)
    classes = 1 if logits.ndim > 1 else 0
    predicted = logits.detach().argmax(classes)
    if y.is_floating_point():  # class probabilities
        accuracy = (predicted == y.argmax(classes)).float().mean()
    else:  # no host sync: the ignored targets are masked out of both counts
        counted = y != -100
        accuracy = ((predicted == y) & counted).sum().float() / counted.sum().float()
    return F.cross_entropy(logits, y), {"accuracy": accuracy}


def mse(model: nn.Module, batch: Any) -> Tensor:
    """Mean squared error of ``model(inputs)`` against ``targets`` of the same shape.

    >>> import torch
    >>> float(mse(torch.nn.Identity(), (torch.ones(2), torch.ones(2))))
    0.0
    """
    x, y = _pair(batch, "mse")
    return F.mse_loss(model(x), y)
