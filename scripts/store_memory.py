"""Peak anonymous RSS of one streamed K-module training step at 4096², its x_i store in files with an allowance of
host memory (``store_memory_bytes``; ``none``: all in files): a measurement for docs/benchmarks.md, not a test.

    .venv/bin/python scripts/store_memory.py K MEMORY_BYTES|none
"""

import sys
import time

import torch

from wsilocal.bench import memory as bench_memory
from wsilocal.bench.options import VARIANTS
from wsilocal.runtime import process_memory_bytes, tune_cpu_allocator
from wsilocal.train.streaming import streaming_local_step


def main() -> None:
    tune_cpu_allocator()  # as training runs
    k = int(sys.argv[1])
    allowance = None if sys.argv[2] == "none" else int(float(sys.argv[2]))
    config = bench_memory.step_config(VARIANTS["streaming"], k, (4096, 4096))
    net, source = config.build(), config.inputs()
    with bench_memory.AnonPeak() as anon:
        start_rss = process_memory_bytes("RssAnon")
        start = time.perf_counter()
        streaming_local_step(net, source, bench_memory.LABEL, tile=[4096] * k, store="disk",
                             store_memory_bytes=allowance, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
    print(f"K={k} store_memory_bytes={sys.argv[2]}: peak RssAnon {anon.peak / 2**20:.0f} MiB "
          f"(at start {start_rss / 2**20:.0f}), {seconds:.1f} s")


if __name__ == "__main__":
    main()
