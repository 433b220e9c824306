"""Finders: a learning-rate sweep and a batch-size search, run on copies of a state.

:func:`lr_find` sweeps the learning rate exponentially over a few hundred updates, stops
when the loss diverges and suggests the learning rate of steepest descent;
:func:`batch_size_find` grows the batch size by powers of two, then bisects, until a step
runs out of memory or over a memory budget. Neither modifies the state it is given.
See ``docs/finders.md``.
"""

from ._batch import BatchSizeResult, BatchSizeTrial, batch_size_find, batch_size_search, is_out_of_memory
from ._lr import LRFinderResult, lr_find

__all__ = [
    "BatchSizeResult",
    "BatchSizeTrial",
    "LRFinderResult",
    "batch_size_find",
    "batch_size_search",
    "is_out_of_memory",
    "lr_find",
]
