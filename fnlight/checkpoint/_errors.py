"""Checkpoint errors (a file that cannot be read, one that does not fit the target) and the skipped-file warning."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["CheckpointError", "CheckpointMismatchError", "CheckpointWarning"]


class CheckpointError(Exception):
    """A checkpoint file cannot be read: empty, truncated, damaged, hostile, or of an unknown format.

    The message always names the file. A missing file raises :class:`FileNotFoundError`
    instead, and an operating-system failure while reading raises :class:`OSError`.

    >>> str(CheckpointError("checkpoint /tmp/x.ckpt: the file is empty"))
    'checkpoint /tmp/x.ckpt: the file is empty'
    """


class CheckpointWarning(RuntimeWarning):
    """A damaged checkpoint was skipped while looking for one to resume from.

    Emitted by :func:`fnlight.find_latest` and by ``with_checkpointing``'s resume, once per
    skipped file, naming it and what is wrong with it. Turn it into an error with
    ``warnings.simplefilter("error", fnlight.checkpoint.CheckpointWarning)`` to stop rather
    than resume from an older checkpoint (or start over when none is readable).

    >>> issubclass(CheckpointWarning, RuntimeWarning)
    True
    """


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose leaves do not match the target tree given to ``restore``.

    The message lists every problem at once; the same lists are kept as attributes.

    Attributes:
        path: the checkpoint file.
        missing: dotted paths of leaves the target has and the file lacks.
        unexpected: dotted paths of leaves the file has and the target lacks.
        mismatched: ``"path: expected ..., found ..."`` lines (dtype, shape or Python type).

    >>> e = CheckpointMismatchError("a.ckpt", missing=["params.w"], unexpected=[], mismatched=[])
    >>> print(e)
    checkpoint a.ckpt does not match the target tree (1 problem):
      missing from the file (1):
        params.w
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[str],
    ) -> None:
        self.path = os.fspath(path)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(self._message())

    def _message(self) -> str:
        n = len(self.missing) + len(self.unexpected) + len(self.mismatched)
        lines = [f"checkpoint {self.path} does not match the target tree ({n} problem{'s' * (n != 1)}):"]
        for title, items in (
            ("missing from the file", self.missing),
            ("unexpected in the file (not in the target)", self.unexpected),
            ("dtype, shape or type differs", self.mismatched),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        return "\n".join(lines)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_mismatch, (self.path, self.missing, self.unexpected, self.mismatched))


def _rebuild_mismatch(path: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> CheckpointMismatchError:
    return CheckpointMismatchError(path, missing=missing, unexpected=unexpected, mismatched=mismatched)
