"""The data role of the command line: a class with a typed ``__init__`` and methods that return data."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["DataModule"]


@runtime_checkable
class DataModule(Protocol):
    """The data role of the CLI: a class whose typed ``__init__`` the config fills, with methods that return data.

    ``train()`` is required; ``val()``, ``test()`` and ``predict()`` are optional (absent, or
    returning ``None``, means there is no such data; ``fit`` then skips evaluation, and the
    subcommand that needs it refuses with a :class:`ConfigError`). Each returns what
    :func:`fnlight.fold` and :func:`fnlight.evaluate` take: a re-iterable of batches such as a
    :class:`fnlight.Loader` (resumes mid-epoch) or a ``DataLoader``; ``train()`` may also
    return a function ``epoch -> iterable``. A ``predict`` batch is the model's input, or a
    tuple/list whose first element is.

    >>> import torch, fnlight as fl
    >>> class Tiny:
    ...     def __init__(self, batch_size: int = 4) -> None:
    ...         self.x, self.y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    ...         self.batch_size = batch_size
    ...     def train(self):
    ...         return fl.Loader((self.x, self.y), batch_size=self.batch_size, shuffle=True)
    >>> isinstance(Tiny(), DataModule), len(Tiny().train())
    (True, 3)
    """

    def train(self) -> Any: ...
