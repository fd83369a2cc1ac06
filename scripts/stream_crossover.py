"""Where does the band-streamed forward become faster than the whole-image one? A measurement for
docs/benchmarks.md (issue 23: which mode ``trunk_forward`` takes when both fit), not a test.

For each backbone and square size: a random-weight stride-3 trunk, a random image in memory (``ArraySource``: no
reading, no glass), one warm-up of each mode, then ``--repeats`` timed rounds of the whole-image forward and of
the band-streamed one at band 64 (what a prediction uses), interleaved; the median of each, their ratio, and the
whole forward's estimated bytes (:func:`~wsilocal.stream.forward.whole_forward_bytes`, what the rule reads).

    .venv/bin/python scripts/stream_crossover.py --sizes 1024 2048 3072 4096 --archs resnet18 resnet34 resnet50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD
from wsilocal.models.resnet import ResNetTrunk
from wsilocal.stream.bands import DEFAULT_BAND
from wsilocal.stream.forward import trunk_forward, whole_forward_bytes
from wsilocal.stream.sources import ArraySource


def time_modes(arch: str, size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    trunk = ResNetTrunk(arch=arch)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    source = ArraySource(image, IMAGENET_MEAN, IMAGENET_STD)
    modes = {"whole": {"memory_budget": None}, "streamed": {"band": DEFAULT_BAND}}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(repeats + 1):
        for mode, kwargs in modes.items():
            start = time.perf_counter()
            trunk_forward(trunk, source, **kwargs)
            if round_:  # round 0 warms up
                seconds[mode].append(time.perf_counter() - start)
    whole, streamed = (statistics.median(seconds[m]) for m in modes)
    return {"arch": arch, "size": size, "whole_s": whole, "streamed_s": streamed,
            "streamed_over_whole": streamed / whole,
            "whole_estimate_mib": whole_forward_bytes(trunk, size, size, source=source) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'arch':<9}{'size':>6}{'whole s':>9}{'band s':>9}{'band/whole':>11}{'est. MiB':>9}", flush=True)
    for arch in args.archs:
        for size in args.sizes:
            r = time_modes(arch, size, args.repeats)
            print(f"{arch:<9}{size:>6}{r['whole_s']:>9.2f}{r['streamed_s']:>9.2f}{r['streamed_over_whole']:>11.2f}"
                  f"{r['whole_estimate_mib']:>9.0f}  {json.dumps(r)}", flush=True)


if __name__ == "__main__":
    main()
