"""Shared fixtures: small models and data the tests train on."""

import os

import pytest
import torch
from torch import nn


def make_bn_mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(32, 3)]
    return nn.Sequential(*layers)


def make_batches(n: int = 8, batch: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 10, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches()


class SignalledData:
    """``batches`` (with a length) that send this process ``signum`` while batch ``at`` is fetched."""

    def __init__(self, batches: list, *, at: int, signum: int) -> None:
        self.batches, self.at, self.signum = batches, at, signum

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.at:
                os.kill(os.getpid(), self.signum)
            yield batch
