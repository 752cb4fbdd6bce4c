"""Exceptions raised by dynbatch."""

from __future__ import annotations

__all__ = ["DynbatchError", "InvalidSampleError", "UnsupportedLeafError"]


class DynbatchError(Exception):
    """Base class of every error dynbatch raises itself."""


class InvalidSampleError(DynbatchError, ValueError):
    """A sample that cannot join a batch: its structure, a leaf's shape or a dtype differs.

    ``index`` is the sample's position in the input, ``path`` the leaf inside it (``""`` for
    the sample itself), so the offending input can be found without a debugger.
    """

    def __init__(self, index: int, path: str, problem: str) -> None:
        where = f"sample {index}" + (f", leaf {path}" if path else "")
        super().__init__(f"{where}: {problem}")
        self.index = index
        self.path = path
        self.problem = problem


class UnsupportedLeafError(InvalidSampleError, TypeError):
    """A leaf of a type dynbatch cannot stack (a string, None, an arbitrary object...)."""
