"""Reading a slide at 5x four ways: OpenSlide's read_region or direct TIFF tile decoding, float taps or integer
block averaging for the resampling; interleaved rounds in one process.

    python scripts/read_timing.py SIZE [ROUNDS]

SIZE is the edge of a `wsilocal bench speed` slide at 5x (written into /tmp/read_timing once, as the benchmark
writes it: Aperio SVS, JPEG tiles, level 0 at 1 µm/px, so 2 source px per output px). Each round reads the whole
level-0 region at 2 µm/px with `read_region_at_mpp` (the benchmark's read threads) each way; prints the medians
(the first round, which warms the page cache, not counted) and whether all four images are identical.
"""

import statistics
import sys
import time

import numpy as np

import wsilocal.slide.reader as reader
from wsilocal.bench.speed import bench_slide

size = int(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
path = bench_slide("/tmp/read_timing", size, size)
slides = {"direct": reader.open_slide(path), "OpenSlide": reader.open_slide(path, direct_decode=False)}
width, height = slides["direct"].level_dimensions[0]
block_step = reader._block_step
times: dict[tuple[str, str], list[float]] = {}
images = []
for _ in range(rounds + 1):
    for decoder, slide in slides.items():
        for resampler in ("float taps", "block"):
            reader._block_step = block_step if resampler == "block" else (lambda index, weight: 0)
            start = time.perf_counter()
            images.append(reader.read_region_at_mpp(slide, 2.0, (0, 0, width, height)))
            times.setdefault((decoder, resampler), []).append(time.perf_counter() - start)
reader._block_step = block_step
for (decoder, resampler), values in times.items():
    median = statistics.median(values[1:])
    print(f"{size}² at 5x ({width}×{height} level-0 px): {decoder} + {resampler}: {median:.3f} s")
print("identical:", all(np.array_equal(images[0], image) for image in images))
