"""``python -m wsilocal.synth OUT_DIR [options]``: write a synthetic cohort (``wsilocal synth`` does the same)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from wsilocal.synth.cohort import synthesize_cohort
from wsilocal.synth.params import TASKS, SynthParams


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``OUT_DIR [options]`` and write a synthetic cohort; prints the path of its ``cohort.csv``."""
    parser = argparse.ArgumentParser(description="Write a synthetic H&E-like whole-slide cohort.")
    parser.add_argument("out_dir")
    parser.add_argument("--task", choices=TASKS, default="morphology")
    parser.add_argument("--classes", type=int, help="morphology task: number of classes (default 3)")
    parser.add_argument("--slides-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        help="level-0 px (default: 8192 8192, context task 28800 12800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    path = synthesize_cohort(args.out_dir, classes=args.classes, slides_per_class=args.slides_per_class,
                             size=args.size and tuple(args.size), seed=args.seed, workers=args.workers,
                             params=SynthParams(task=args.task))
    print(path)


if __name__ == "__main__":
    main()
