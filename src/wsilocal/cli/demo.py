"""``demo``: the user's path end to end on a synthetic cohort (:mod:`wsilocal.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="folder for the cohort, cache, pretraining, run, predictions "
                                                     "and summary.png")
    p.add_argument("--quick", action="store_true", help="a tiny version for smoke tests (about a minute; not accurate)")


def run_demo(args: argparse.Namespace) -> int:
    from wsilocal import demo

    demo.run_demo(Path(args.out), quick=args.quick)
    return 0
