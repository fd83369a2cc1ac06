"""Benchmarks: each module ``wsilocal.bench.<name>`` is one command, ``wsilocal bench <name>``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

BenchmarkMain = Callable[[argparse.Namespace], int]


def benchmark_command(name: str, module: str | None = None) -> tuple[Callable[[argparse.ArgumentParser], None],
                                                                      BenchmarkMain]:
    """The two functions that make benchmark ``name`` a command: ``add_<name>_arguments`` (its options) and
    ``<name>_main`` (runs it from parsed options), from ``wsilocal.bench.<module>`` (default: ``name``).

    Raises:
        ImportError: the module is not there (``exc.name`` names it) or fails to import.
        AttributeError: the module lacks one of the two functions.
    """
    found = importlib.import_module(f"wsilocal.bench.{module or name}")
    return getattr(found, f"add_{name}_arguments"), getattr(found, f"{name}_main")
