"""Errors a user can meet. Each carries a one-line message naming the file and the cause.

The CLI prints ``error: <message>`` for any :class:`WsilocalError` and exits non-zero, never a
traceback. Library callers can catch the specific subclasses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class WsilocalError(Exception):
    """Base class of every error wsilocal reports to a user."""

    def __str__(self) -> str:
        # One line whatever the message quotes (a label or file name with a line break in it).
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class SlideError(WsilocalError):
    """A slide cannot be opened or read, or is unusable (no tissue, no MPP, too large)."""

    def __init__(self, path: str | Path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class CohortError(WsilocalError):
    """A cohort CSV is malformed or inconsistent. ``problems`` lists every problem found."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        shown = "; ".join(self.problems[:10])
        more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
        super().__init__(f"{self.path}: {shown}{more}")


class ConfigError(WsilocalError):
    """A configuration value is missing, of the wrong type or out of range."""


class CheckpointError(WsilocalError):
    """A checkpoint is missing, truncated, unsafe or from another model."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C (SIGINT) after saving a checkpoint it can resume from exactly.

    Not a :class:`WsilocalError`: nothing went wrong. The CLI prints the message and exits with 130.
    """


@contextmanager
def out_of_memory_as_slide_error(path: str | Path, what: str) -> Iterator[None]:
    """Turn running out of memory inside the block into a one-line :class:`SlideError`: ``PATH: out of memory on
    WHAT`` (``what``: what was being computed, and any advice). Other errors pass through unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if "memory" not in str(exc).lower():
            raise
        raise SlideError(path, f"out of memory on {what}") from None
