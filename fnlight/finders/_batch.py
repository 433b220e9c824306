"""The batch-size finder: power-of-two growth, then a binary search, on out-of-memory or a memory budget."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._donation import check_live, donating
from .._state import TrainState
from .._step import EvalStep, Step
from .._tree import tree_clone
from ..transforms._accum import window_open
from ._lr import check_no_side_effects

__all__ = ["BatchSizeResult", "BatchSizeTrial", "batch_size_find", "batch_size_search", "is_out_of_memory"]


@dataclasses.dataclass(frozen=True)
class BatchSizeTrial:
    """One batch size tried: whether it fits, why not, and the memory measured (bytes or ``None``)."""

    size: int
    fits: bool
    reason: str
    bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class BatchSizeResult:
    """The largest batch size that fits, and every trial in the order it was made."""

    batch_size: int
    trials: list[BatchSizeTrial]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` reports an allocation failure (CUDA, CPU allocator or Python ``MemoryError``).

    >>> import torch
    >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")), is_out_of_memory(RuntimeError("shape mismatch"))
    (True, False)
    """
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _size(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    return value


def _search(attempt: Callable[[int], BatchSizeTrial], start: int, max_size: int, where: str) -> BatchSizeResult:
    trials: list[BatchSizeTrial] = []

    def fits(n: int) -> bool:
        trial = attempt(n)
        trials.append(trial)
        return trial.fits

    if not fits(start):
        raise ValueError(
            f"{where}: the first batch size, {start}, does not fit ({trials[0].reason}); "
            "pass a smaller start, a larger memory_budget, or free memory"
        )
    low, high = start, None
    while high is None and low < max_size:  # grow by powers of two until a size fails
        n = min(2 * low, max_size)
        if fits(n):
            low = n
        else:
            high = n
    while high is not None and high - low > 1:  # then bisect between the last fit and the first failure
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return BatchSizeResult(low, trials)


def batch_size_search(fits: Callable[[int], bool], *, start: int = 1, max_size: int = 4096) -> BatchSizeResult:
    """The largest batch size in ``[start, max_size]`` for which ``fits(batch_size)`` is true.

    Doubles from ``start`` until ``fits`` fails (or ``max_size`` is reached), then bisects
    between the last size that fit and the first that did not, assuming that whatever fits
    at ``n`` fits at every smaller size. Use it with your own measurement, e.g. a trial
    run that reads ``torch.cuda.max_memory_allocated``.

    Raises:
        ValueError: ``start``/``max_size`` are not positive ints with ``start <= max_size``, or
            ``start`` itself does not fit.
        TypeError: ``fits`` is not callable.

    >>> from fnlight.finders import batch_size_search
    >>> result = batch_size_search(lambda n: n <= 37)
    >>> result.batch_size, [t.size for t in result.trials]
    (37, [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37])
    """
    where = "batch_size_search"
    if not callable(fits):
        raise TypeError(f"{where}: fits must be callable batch_size -> bool, got {fits!r}")
    start, max_size = _size("start", start, where), _size("max_size", max_size, where)
    if start > max_size:
        raise ValueError(f"{where}: expected start <= max_size, got start={start}, max_size={max_size}")

    def attempt(n: int) -> BatchSizeTrial:
        ok = fits(n)
        if not isinstance(ok, bool):
            raise TypeError(f"{where}: fits({n}) must return a bool, got {ok!r}")
        return BatchSizeTrial(n, ok, "fits" if ok else "fits() returned False")

    return _search(attempt, start, max_size, where)


def _storage_key(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def batch_size_find(
    step: Step,
    state: TrainState,
    make_batch: Callable[[int], Any],
    *,
    start: int = 1,
    max_size: int = 4096,
    steps: int = 1,
    memory_budget: int | None = None,
) -> BatchSizeResult:
    """The largest batch size whose training steps run without running out of memory (and within a budget).

    Each trial builds ``make_batch(n)`` and runs ``steps`` updates on a copy of ``state``
    (in place on that copy, as inside :func:`fnlight.fold`; ``state`` is never modified).
    A trial fails when it raises an out-of-memory error (:func:`is_out_of_memory`: CUDA's
    ``torch.OutOfMemoryError``, the CPU allocator's "can't allocate memory", ``MemoryError``),
    or when its measured memory exceeds ``memory_budget``:

    - parameters on a CUDA device: the peak of ``torch.cuda.max_memory_allocated`` during the
      trial (the whole step: parameters, optimizer state, activations, gradients);
    - on the CPU, torch keeps no allocator statistics, so the measure is the bytes of the
      tensors autograd saves for backward (activations: the part of a step's memory that
      grows with the batch size), counted once per storage, excluding the state's own
      parameters and buffers. Parameters, gradients and optimizer state come on top.

    On the CPU an allocation rarely fails (the kernel overcommits, then kills the process),
    so give a ``memory_budget`` there. The search is :func:`batch_size_search`'s.

    Args:
        step: a train step (or transform chain without checkpointing/tracking transforms: refused).
        state: the state to try it on; left untouched.
        make_batch: ``batch_size -> batch``.
        start, max_size: the range searched.
        steps: updates per trial (under streaming ``with_grad_accum(every=K)``, K calls each).
        memory_budget: bytes, or ``None`` to stop on out-of-memory errors only.

    Returns:
        A :class:`BatchSizeResult` with every :class:`BatchSizeTrial` (and its measured bytes).

    Raises:
        TypeError: ``state`` is not a ``TrainState``, ``step``/``make_batch`` are not callable, or
            ``step`` is an eval step.
        ValueError: an option is out of range, ``start`` itself does not fit, or the step is
            wrapped by ``with_checkpointing`` or ``with_tracking`` (the trials would be saved or logged).

    >>> import torch, fnlight as fl
    >>> from fnlight.finders import batch_size_find
    >>> step = fl.make_train_step(torch.nn.Linear(256, 256), fl.losses.mse, fl.optim.sgd(0.1))
    >>> make = lambda n: (torch.randn(n, 256), torch.randn(n, 256))
    >>> result = batch_size_find(step, step.init(), make, max_size=1024, memory_budget=96 * 1024)
    >>> result.batch_size  # saved for backward: input, output and target, n x 256 float32 each (3 KiB/sample)
    32
    """
    where = "batch_size_find"
    if not isinstance(state, TrainState):
        raise TypeError(f"{where}: expected a fnlight.TrainState, got {type(state).__name__}")
    check_live(state, where)
    if not callable(step):
        raise TypeError(f"{where}: step must be callable (state, batch) -> (state, metrics), got {step!r}")
    if isinstance(step, EvalStep):
        raise TypeError(f"{where}: step is an eval step (make_eval_step), which makes no update; pass the train step")
    check_no_side_effects(step, where)
    if not callable(make_batch):
        raise TypeError(f"{where}: make_batch must be callable batch_size -> batch, got {make_batch!r}")
    start, max_size, steps = _size("start", start, where), _size("max_size", max_size, where), _size("steps", steps, where)
    if start > max_size:
        raise ValueError(f"{where}: expected start <= max_size, got start={start}, max_size={max_size}")
    if memory_budget is not None:
        memory_budget = _size("memory_budget", memory_budget, where)
    device = next(iter(state.params.values())).device if state.params else torch.device("cpu")
    cuda = device.type == "cuda"

    def attempt(n: int) -> BatchSizeTrial:
        work: Any = None
        saved: dict[int, int] = {}
        try:
            batch = make_batch(n)
            work = tree_clone(state)
            own = {_storage_key(t)[0] for t in (*work.params.values(), *work.buffers.values())}

            def pack(t: Tensor) -> Tensor:
                ptr, nbytes = _storage_key(t)
                if ptr not in own:
                    saved[ptr] = max(saved.get(ptr, 0), nbytes)
                return t

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            peak = 0
            with donating():
                for _ in range(steps):
                    while True:  # under streaming with_grad_accum(every=K), K calls make one update
                        saved.clear()
                        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                            work, _ = step(work, batch)
                        peak = max(peak, sum(saved.values()))
                        if not window_open(work):
                            break
            measured = torch.cuda.max_memory_allocated(device) if cuda else peak
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            work = batch = e = None  # drop the failed trial's tensors (the traceback holds its frames) before the next
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            return BatchSizeTrial(n, False, f"out of memory: {first_line[:120]}")
        finally:
            del work
            saved.clear()
        if memory_budget is not None and measured > memory_budget:
            return BatchSizeTrial(n, False, f"over budget: {measured} > {memory_budget} bytes", measured)
        return BatchSizeTrial(n, True, "fits", measured)

    return _search(attempt, start, max_size, where)
