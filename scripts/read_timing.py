"""Reading a slide at 5x with and without direct TIFF tile decoding, interleaved rounds in one process.

    python scripts/read_timing.py SIZE [ROUNDS]

SIZE is the edge of a `wsilocal bench speed` slide at 5x (written into /tmp/read_timing once, as the benchmark
writes it: Aperio SVS, JPEG tiles, level 0 at 1 µm/px). Each round reads the whole level-0 region at 2 µm/px
with `read_region_at_mpp` (the benchmark's read threads), once through OpenSlide's read_region and once with the
tiles decoded directly; prints the medians, their ratio and whether the two images are identical.
"""

import statistics
import sys
import time

import numpy as np

from wsilocal.bench.speed import bench_slide
from wsilocal.slide.reader import open_slide, read_region_at_mpp

size = int(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
path = bench_slide("/tmp/read_timing", size, size)
times: dict[bool, list[float]] = {False: [], True: []}
images = {}
with open_slide(path, direct_decode=False) as openslide_only, open_slide(path) as direct:
    width, height = direct.level_dimensions[0]
    for _ in range(rounds + 1):  # the first round warms the page cache and is not counted
        for use_direct, slide in ((False, openslide_only), (True, direct)):
            start = time.perf_counter()
            images[use_direct] = read_region_at_mpp(slide, 2.0, (0, 0, width, height))
            times[use_direct].append(time.perf_counter() - start)
medians = {k: statistics.median(v[1:]) for k, v in times.items()}
print(f"{size}² at 5x ({width}×{height} level-0 px, direct levels {direct.direct_levels}): "
      f"OpenSlide {medians[False]:.2f} s, direct {medians[True]:.2f} s, "
      f"ratio {medians[False] / medians[True]:.2f}×, identical {np.array_equal(images[False], images[True])}")
