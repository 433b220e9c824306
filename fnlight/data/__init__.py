"""Data: a resumable loader; its public names are re-exported from :mod:`fnlight`."""

from ._loader import Loader

__all__ = ["Loader"]
