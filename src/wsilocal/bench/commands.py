"""The benchmarks as commands: ``wsilocal bench NAME`` for each entry of :data:`BENCHMARKS`.

An entry holds the command's help, its options (:mod:`wsilocal.bench.options`, torch-free) and ``load``, which
imports the benchmark's module and returns its ``NAME_main`` (run from the parsed options). Parsing a command line
loads no benchmark; ``load`` is called only to run one. ``bench all`` (:mod:`wsilocal.bench.report`) runs its
sections through these same entries, so it is registered beside them by the command line, not here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from wsilocal.bench import options

BenchmarkMain = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Benchmark:
    """One ``wsilocal bench NAME`` command."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    load: Callable[[], BenchmarkMain]  # imports the benchmark (ImportError when it cannot); returns NAME_main

    def run(self, args: argparse.Namespace) -> int:
        """Run the benchmark from parsed options; its exit code."""
        return self.load()(args)


def _accuracy() -> BenchmarkMain:
    from wsilocal.bench.accuracy import accuracy_main

    return accuracy_main


def _memory() -> BenchmarkMain:
    from wsilocal.bench.memory import memory_main

    return memory_main


def _speed() -> BenchmarkMain:
    from wsilocal.bench.speed import speed_main

    return speed_main


def _pretrain() -> BenchmarkMain:
    from wsilocal.bench.pretrain import pretrain_main

    return pretrain_main


def _scaling() -> BenchmarkMain:
    from wsilocal.bench.scaling import scaling_main

    return scaling_main


def _soak() -> BenchmarkMain:
    from wsilocal.bench.soak import soak_main

    return soak_main


BENCHMARKS: dict[str, Benchmark] = {
    "accuracy": Benchmark("the paper's Tables 1 and 4 on synthetic cohorts: all methods, several seeds",
                          options.add_accuracy_arguments, _accuracy),
    "memory": Benchmark("the paper's Table 2: saved-for-backward bytes, peak RSS and step time per K and size",
                        options.add_memory_arguments, _memory),
    "speed": Benchmark("the paper's Table 3: whole-slide inference vs the tile pipeline (tiling, ResNet34 features, "
                       "gated ABMIL) per slide size; peak RSS; bfloat16", options.add_speed_arguments, _speed),
    "pretrain": Benchmark("linear and k-NN probes of tile class: random vs `wsilocal pretrain` weights, same run",
                          options.add_pretrain_arguments, _pretrain),
    "scaling": Benchmark("training throughput with 1 and 2 processes, with/without all-reduce overlap",
                         options.add_scaling_arguments, _scaling),
    "soak": Benchmark("train a synthetic cohort for many epochs; fail if process memory grows",
                      options.add_soak_arguments, _soak),
}
