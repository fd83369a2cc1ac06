"""The streamed training step with its x_i store on disk and in host memory, beside the plain step: a measurement
for docs/benchmarks.md (issue 21, *Streaming*), not a test.

At 4096² (the benchmark's ``step_config`` networks and inputs of ``wsilocal bench memory``: folded, the authors'
K-module split), one warm-up then two rounds, the order rotated each round; medians and ratios to the plain step.

    .venv/bin/python scripts/store_timing.py K [TILE]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from wsilocal.bench import memory as bench_memory
from wsilocal.bench.options import VARIANTS
from wsilocal.runtime import tune_cpu_allocator
from wsilocal.train.local_step import local_training_step
from wsilocal.train.streaming import streaming_local_step


def main() -> None:
    tune_cpu_allocator()  # as training runs
    k = int(sys.argv[1])
    tile = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    hw = (4096, 4096)
    plain = bench_memory.step_config(VARIANTS["folded"], k, hw)
    streamed = bench_memory.step_config(VARIANTS["streaming"], k, hw, tile=tile)
    nets = {"plain": plain.build(), "disk": streamed.build(), "memory": streamed.build()}
    image, source = plain.inputs(), streamed.inputs()

    def step(name: str) -> float:
        net, generator = nets[name], torch.Generator().manual_seed(0)
        start = time.perf_counter()
        if name == "plain":
            local_training_step(net, image, bench_memory.LABEL, generator=generator)
        else:
            streaming_local_step(net, source, bench_memory.LABEL, tile=[tile] * len(net.stages), store=name,
                                 generator=generator)
        seconds = time.perf_counter() - start
        net.zero_grad(set_to_none=True)
        return seconds

    names = list(nets)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(3):
        for name in names[round_ % 3:] + names[:round_ % 3]:
            seconds = step(name)
            if round_:  # round 0 warms up
                times[name].append(seconds)
            print(round_, name, f"{seconds:.2f} s", flush=True)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"K={k} tile {tile}: plain {med['plain']:.2f} s, disk {med['disk']:.2f} s "
          f"({med['disk'] / med['plain']:.2f}x), memory {med['memory']:.2f} s ({med['memory'] / med['plain']:.2f}x)")


if __name__ == "__main__":
    main()
