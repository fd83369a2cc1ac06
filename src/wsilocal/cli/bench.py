"""``bench NAME``: the benchmarks of :data:`wsilocal.bench.commands.BENCHMARKS`, and ``bench all``, which runs
several of them into one report (:mod:`wsilocal.bench.report`)."""

from __future__ import annotations

import argparse

from wsilocal.cli.commands import Command, add_commands

ALL_HELP = "accuracy, memory, speed and scaling benchmarks and one report.md"


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from wsilocal.bench.commands import BENCHMARKS
    from wsilocal.bench.options import add_all_arguments

    commands = [Command(name, b.help, b.add_arguments, b.run) for name, b in BENCHMARKS.items()]
    add_commands(p, [*commands, Command("all", ALL_HELP, add_all_arguments, run_all)], dest="bench")


def run_all(args: argparse.Namespace) -> int:
    from wsilocal.bench.report import all_main

    return all_main(args)
