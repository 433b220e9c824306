"""Counter-based randomness: every random draw is a function of (seed, step, rank, micro-batch)."""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["derive_seed", "held_generators", "restore_generators", "seed_generators", "step_seed"]

_held = threading.local()
_HELD: list[tuple[torch.Generator, Tensor]] = []  # what seed_generators returns inside held_generators

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *counters: int) -> int:
    """Mix ``seed`` with ``counters`` (step, rank, micro-batch, ...) into a 63-bit seed.

    The result depends on every argument and on their order; it never depends on
    any global random state.

    Each argument is an int; a 0-d integer tensor (``state.key``, ``state.step``) or a NumPy
    integer counts as the int it holds, so ``derive_seed(state.key, state.step, 0)`` is the
    seed a step uses for its forward pass.

    Raises:
        TypeError: an argument that is not an integer (a float, a bool, a tensor of several
            elements or of a floating dtype).

    >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(0, 2)
    True
    >>> import torch
    >>> derive_seed(torch.tensor(7), torch.tensor(3), 0) == derive_seed(7, 3, 0)
    True
    """
    x = _splitmix64(_integer(seed, "seed") & _MASK64)
    for i, counter in enumerate(counters):
        x = _splitmix64(x ^ (_integer(counter, f"counter {i}") & _MASK64))
    return x & ((1 << 63) - 1)


def _integer(value: object, what: str) -> int:
    """``value`` as a Python int (tensors' wrapping int64 arithmetic would mix to other seeds)."""
    if type(value) is int:
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    shown = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else repr(value)
    raise TypeError(f"derive_seed: {what} must be an int (or a 0-d integer tensor), got {shown}")


@functools.lru_cache(maxsize=16)
def _step_prefix(seed: int, step: int) -> int:
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def step_seed(seed: int, step: int, micro: int, rank: int = 0) -> int:
    """``derive_seed(seed, step, micro)`` (``..., micro, rank)`` for a nonzero rank), with the
    ``(seed, step)`` part cached: the micro-batches of one update mix it once (the Python
    integer arithmetic costs ~1 us per mixing round on a step's hot path).

    >>> step_seed(7, 3, 1) == derive_seed(7, 3, 1) and step_seed(7, 3, 1, 2) == derive_seed(7, 3, 1, 2)
    True
    """
    x = _splitmix64(_step_prefix(seed, step) ^ (micro & _MASK64))
    if rank:
        x = _splitmix64(x ^ (rank & _MASK64))
    return x & ((1 << 63) - 1)


def cuda_devices(params: dict[str, Tensor]) -> tuple[torch.device, ...]:
    """The CUDA devices of ``params`` (whose generators a seeded region seeds as well as the CPU's)."""
    return tuple({t.device for t in params.values() if t.device.type == "cuda"})


EVAL_STREAM = 0xE7A1  # evaluation's draws: a stream apart from the training steps' (seed, step, micro)
_evaluating = threading.local()  # set while fnlight.evaluate has seeded the generators for one batch


def eval_seed(seed: int, step: int, index: int, rank: int = 0) -> int:
    """The seed of an evaluation's batch ``index`` of a state at update ``step`` (``rank``'s share).

    >>> eval_seed(7, 3, 1) == derive_seed(7, 3, EVAL_STREAM, 1) != eval_seed(7, 3, 2)
    True
    """
    return derive_seed(seed, step, EVAL_STREAM, index, rank) if rank else derive_seed(seed, step, EVAL_STREAM, index)


@contextlib.contextmanager
def evaluating(seed: int, devices: tuple[torch.device, ...] = ()) -> Iterator[None]:
    """Seed the generators with ``seed`` for one batch of :func:`fnlight.evaluate`, and put them back after it.

    An eval step called inside (:meth:`fnlight.EvalStep.__call__`) then draws from this seed instead of
    seeding its own (see :func:`evaluated_alone`).
    """
    saved = seed_generators(seed, devices, apart=True)
    outer, _evaluating.active = getattr(_evaluating, "active", False), True
    try:
        yield
    finally:
        _evaluating.active = outer  # (an evaluate nested in another's eval step leaves the outer one's flag as it was)
        restore_generators(saved)


@contextlib.contextmanager
def generators_kept(devices: tuple[torch.device, ...] = ()) -> Iterator[None]:
    """Put torch's default generators (CPU and ``devices``) back as they were at the block's end.

    :func:`fnlight.evaluate` iterates its data inside this block: a ``DataLoader`` draws its
    workers' base seed (and a shuffled one its order) from the global generator when iterated,
    which an evaluation inside a fold must leave where the training left it.
    """
    generators = [torch.default_generator, *(torch.cuda.default_generators[d.index or 0] for d in devices if d.type == "cuda")]
    saved = [(g, g.get_state()) for g in generators]
    try:
        yield
    finally:
        restore_generators(saved)


def evaluated_alone() -> bool:
    """Whether an eval step runs outside :func:`evaluating` (called directly), so it seeds its own draws."""
    return not getattr(_evaluating, "active", False)


def seed_generators(
    seed: int, devices: tuple[torch.device, ...] = (), *, apart: bool = False
) -> list[tuple[torch.Generator, Tensor]]:
    """Seed torch's default generators (CPU and ``devices``) with ``seed``; return their previous states.

    Inside :func:`held_generators` (a fold) the outermost seeding of a step does not save
    the states: the first call records each generator's state once, and the block restores
    it at its end. Seeding nested inside a step's seeded region saves and restores as usual,
    so the step draws what it draws when called on its own. ``apart=True`` always saves
    them, for draws in a stream apart from the training steps' (an evaluation's): what a
    fold draws between steps (a ``DataLoader`` starting an epoch) must not depend on
    whether an evaluation ran in between.
    """
    generators = [torch.default_generator]
    if devices:  # (no comprehension on the CPU's hot path)
        generators += [torch.cuda.default_generators[d.index or 0] for d in devices if d.type == "cuda"]
    held: dict[torch.Generator, Tensor] | None = getattr(_held, "states", None)
    if held is not None and not _held.depth and not apart:  # a step called by the fold; nested seeding saves as usual
        for g in generators:
            if g not in held:
                held[g] = g.get_state()
            g.manual_seed(seed)
        _held.depth = 1
        return _HELD
    saved = [(g, g.get_state()) for g in generators]
    for g in generators:
        g.manual_seed(seed)
    return saved


@contextlib.contextmanager
def held_generators() -> Iterator[None]:
    """Restore the generators that steps seed inside this block once, at its end, not after every step.

    A step seeds torch's default generators for its forward pass and, called on its own,
    puts the caller's states back afterwards; saving and restoring a generator's 5 KiB
    state around every call cost ~5 us per call in a fold's hot loop (more than seeding).
    ``fold`` runs its steps inside this block: code that draws from the global generator
    between steps (an observer; a ``DataLoader`` starting an epoch) then draws from the
    stream the last step seeded, and the caller's states come back when the fold ends.
    """
    previous = getattr(_held, "states", None), getattr(_held, "depth", 0)
    states: dict[torch.Generator, Tensor] = {}
    _held.states, _held.depth = states, 0
    try:
        yield
    finally:
        _held.states, _held.depth = previous
        for g, state in states.items():
            g.set_state(state)


def restore_generators(saved: list[tuple[torch.Generator, Tensor]]) -> None:
    """Undo :func:`seed_generators`."""
    if saved is _HELD:
        _held.depth = 0
        return
    for g, state in saved:
        g.set_state(state)
