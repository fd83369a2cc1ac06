"""Benchmarks, one module each (``accuracy``, ``memory``, ``speed``, ``pretrain``, ``scaling``, ``soak``) and
``report`` (``bench all``: several of them and one report). Their commands are :mod:`wsilocal.bench.commands`'s
table, their options :mod:`wsilocal.bench.options` (torch-free)."""

from __future__ import annotations

import sys


def log_progress(progress: bool, text: str) -> None:
    """A benchmark's progress line on stderr (stdout keeps its tables), when ``progress`` is on."""
    if progress:
        print(text, file=sys.stderr, flush=True)
