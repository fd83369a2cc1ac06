"""What band streaming holds in memory, and the estimate that chooses the band under a memory budget.

The reference is a count of the bytes of the tensors alive at once (:class:`LiveTensorBytes`: every tensor an op
makes, in the main thread and in the band reader, a storage counted once however many views share it), not the
resident memory: that depends on the heap (docs/benchmarks.md, *Band streaming memory*) and is not tested here.
"""

from __future__ import annotations

import threading
import tracemalloc
import weakref
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import wsilocal.slide.reader as slide_reader
import wsilocal.stream.bands as bands
import wsilocal.stream.forward as forward
import wsilocal.stream.sources as sources
from wsilocal.models.resnet import ResNetTrunk
from wsilocal.slide.reader import open_slide, read_region_at_mpp
from wsilocal.stream.bands import (
    DEFAULT_BAND,
    MIN_BAND,
    band_for_budget,
    band_forward_bytes,
    band_memory_terms,
    block_input_lengths,
    stream_along_longer_side,
)
from wsilocal.stream.geometry import block_geometry, footprint
from wsilocal.stream.sources import ArraySource, SlideSource

MEAN, STD = [0.8, 0.6, 0.75], [0.15, 0.2, 0.15]


class LiveTensorBytes:
    """Bytes of the tensors alive at once and their peak, across the threads that enter :meth:`mode`.

    A storage counts when an op first returns a tensor on it and stops counting when the last tensor seen on it
    is freed; views and in-place results of a storage already counted add nothing."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tensors: dict[int, int] = {}  # storage address → tensors seen on it, still alive
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        address, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        with self.lock:
            if address in self.tensors:
                self.tensors[address] += 1
            else:
                self.tensors[address], self.sizes[address] = 1, size
                self.current += size
                self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        with self.lock:
            self.tensors[address] -= 1
            if not self.tensors[address]:
                del self.tensors[address]
                self.current -= self.sizes.pop(address)

    def mode(self) -> TorchDispatchMode:
        counter = self

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor):
                        counter._add(tensor)
                return out

        return Count()


class CountedSource(ArraySource):
    """An :class:`ArraySource` whose reads (in the band reader's thread) are counted too."""

    def __init__(self, image: np.ndarray, counter: LiveTensorBytes):
        super().__init__(image, MEAN, STD)
        self.counter = counter

    def read(self, top, left, height, width):
        with self.counter.mode():
            return super().read(top, left, height, width)


class ReadAtOnce:
    """A stand-in for the band reader's thread pool that reads when asked: the next band is then always there
    while a band computes — the moment the estimate counts — and the count does not depend on thread timing."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def submit(self, fn, *args):
        future: Future = Future()
        future.set_result(fn(*args))
        return future


@pytest.fixture
def reads_at_once(monkeypatch):
    monkeypatch.setattr(bands, "ThreadPoolExecutor", ReadAtOnce)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def glass_band_mask(blocks, height: int, width: int) -> np.ndarray:
    """Needed map positions: all but a band of glass across the middle third of the longer side."""
    map_h, map_w = (block_input_lengths(blocks, n)[-1] for n in (height, width))
    needed = np.ones((map_h, map_w), bool)
    if height >= width:
        needed[map_h // 3 : 2 * map_h // 3] = False
    else:
        needed[:, map_w // 3 : 2 * map_w // 3] = False
    return needed


@pytest.mark.parametrize("arch, height, width, band, folded, masked", [
    ("resnet34", 1600, 96, 8, True, False),  # tall and thin: many bands, every block several windows
    ("resnet34", 1200, 300, 32, False, False),  # BatchNorm not folded
    ("resnet18", 300, 1700, 16, True, False),  # wide: streamed along its width, on transposed copies
    ("resnet18", 1500, 160, 8, True, True),  # glass skipped: column segments, a zeroed band per read
])
def test_the_estimate_covers_the_live_tensors_of_a_streamed_forward(reads_at_once, arch, height, width, band,
                                                                    folded, masked):
    """Every term of the estimate but oneDNN's weight copy (not a tensor) is tensors the engine holds: their sum
    is at least the live peak counted, and within 30 % of it."""
    torch.manual_seed(0)
    trunk = ResNetTrunk(3, folded, arch=arch).eval()
    blocks = trunk.blocks()
    needed = glass_band_mask(blocks, height, width) if masked else None
    counter = LiveTensorBytes()
    source = CountedSource(random_image(height, width), counter)
    with torch.no_grad(), counter.mode():
        stream_along_longer_side(blocks, source, band=band, needed=needed)
    terms = band_memory_terms(blocks, height, width, band, folded=folded, masked=masked, source=source)
    tensors = sum(terms.values()) - terms["onednn_weight"]
    assert counter.peak <= tensors <= 1.3 * counter.peak, (counter.peak, terms)
    assert band_forward_bytes(blocks, height, width, band, folded=folded, masked=masked, source=source) > tensors


def test_blocks_do_not_hold_their_windows_all_at_once(reads_at_once):
    """Each block's rows wait only until its next window runs, and the window's input is freed after it: the
    live peak is well below the sum of every block's window input, what a buffer per block holds (the engine that
    kept one, each block lagging a window behind the one before it, peaked at 1.6× that sum here)."""
    trunk = ResNetTrunk(3, False).eval()  # unfolded: no weight copies, the activations alone
    blocks = trunk.blocks()
    height, width, band = 1500, 1024, 32
    counter = LiveTensorBytes()
    with torch.no_grad(), counter.mode():
        stream_along_longer_side(blocks, CountedSource(random_image(height, width), counter), band=band)
    channels, every_window = 3, 0
    for block, w in zip(blocks, block_input_lengths(blocks, width), strict=False):
        stride, first, last = footprint(block_geometry([block]))
        every_window += 4 * channels * ((band - 1) * stride + last - first + 1) * w
        channels = block.out_channels
    assert counter.peak < 0.75 * every_window, (counter.peak, every_window)


@pytest.mark.parametrize("band", [1, 8, 64])
def test_each_block_keeps_only_its_halo_between_its_runs(band):
    """The row plans of the whole trunk: windows of at most ``band`` rows that partition each block's output, and
    after a run a block keeps fewer rows than its footprint spans — it never waits holding a window's worth of
    input for the next one (as a fixed grid of windows, lagging the block before it by its halo, would)."""
    blocks = ResNetTrunk(3, True).blocks()
    height = 5000
    plans = bands._row_plans(blocks, height, band)
    kept = [[] for _ in blocks]
    for step, rows in enumerate(bands._read_steps(blocks, height, band), start=1):
        arrivals = [rows]
        for index, plan in enumerate(plans):
            for count in arrivals:
                plan.receive(count)
            windows = plan.windows(step)
            kept[index] += [(keep0, keep1) for *_, keep0, keep1 in windows]
            arrivals = [keep1 - keep0 for keep0, keep1 in kept[index][len(kept[index]) - len(windows):]]
            if windows and plan.kept < plan.out_length:
                assert plan.arrived - plan.start <= plan.last - plan.first + plan.stride, (index, step)
    for index, (plan, windows) in enumerate(zip(plans, kept, strict=True)):
        assert windows[0][0] == 0 and windows[-1][1] == plan.out_length
        assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
        assert all(0 < k1 - k0 <= plan.band for k0, k1 in windows), index
        assert plan.band == (band if index else min(band, max(MIN_BAND, band // bands.STEM_SPLIT)))


def test_the_estimate_grows_with_the_band_and_the_shorter_side():
    blocks = ResNetTrunk(3, True).blocks()
    for height, width in [(4096, 4096), (8192, 8192), (23849, 10257)]:
        estimates = [band_forward_bytes(blocks, height, width, band) for band in (8, 16, 32, 64)]
        assert estimates == sorted(estimates) and len(set(estimates)) == 4, (height, width, estimates)
    for band in (8, 64):
        square, taller, wider = (band_forward_bytes(blocks, h, w, band)
                                 for h, w in [(4096, 4096), (4096 * 3, 4096), (8192, 8192)])
        assert square < taller < wider  # bands span the shorter side: a longer one adds only its map
        assert band_forward_bytes(blocks, 4096, 4096 * 3, band) > taller  # wide: the weights' transposed copies


def test_band_for_budget_picks_a_smaller_band_as_the_budget_shrinks():
    """On the paper's largest slide: each budget gets the largest band whose estimate fits it, down to MIN_BAND."""
    blocks = ResNetTrunk(3, True).blocks()
    height, width = 23849, 10257
    need = {band: band_forward_bytes(blocks, height, width, band, masked=True) for band in (8, 16, 32, 64)}
    for band in (16, 32, 64):
        assert band_for_budget(blocks, height, width, need[band], masked=True) == band
        assert band_for_budget(blocks, height, width, need[band] - 1, masked=True) == band // 2
    assert band_for_budget(blocks, height, width, 10 * need[DEFAULT_BAND], masked=True) == DEFAULT_BAND
    assert band_for_budget(blocks, height, width, 1, masked=True) == MIN_BAND
    # Glass skipping holds more (segment copies, a zeroed band per read, the needed maps): a budget that fits
    # band 64 unmasked may not fit it masked.
    assert band_forward_bytes(blocks, height, width, 64) < need[64]


def test_slide_reads_in_column_pieces_are_the_cached_pixels_and_cost_what_read_bytes_says(make_slide, monkeypatch):
    """A slide window resampled in pieces of READ_COLUMNS columns equals the cache's pixels; the resampler's
    numpy arrays at their peak (tracemalloc) are within ``read_bytes`` (its decoding part left out: OpenSlide's
    buffers and cache are not numpy's), which is within 1.5× of them."""
    monkeypatch.setattr(slide_reader, "MAX_READ_THREADS", 1)  # bands one after the other: a deterministic peak
    path = make_slide(random_image(600, 2600, seed=7), mpp=0.25)
    mpp, region = 0.5, (3, 5, 2590, 590)  # 2 source px per output px: 1295 x 295 px
    with open_slide(path) as slide:
        cached = read_region_at_mpp(slide, mpp, region)
        source = SlideSource(slide, mpp, region, MEAN, STD)
        expected = ArraySource(cached, MEAN, STD)
        for columns in (sources.READ_COLUMNS, 7):
            monkeypatch.setattr(sources, "READ_COLUMNS", columns)
            for window in [(0, 0, 295, 1295), (40, 3, 100, 1200), (294, 1294, 1, 1)]:
                assert torch.equal(source.read(*window), expected.read(*window)), (columns, window)
        monkeypatch.setattr(sources, "READ_COLUMNS", 1024)
        window = (10, 0, 200, 1295)  # two pieces, 1024 and 271 columns wide
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            source.read(*window)
            numpy_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    float_window = 4 * 3 * window[2] * window[3]  # the tensor returned, which tracemalloc does not see
    # The resampler's numpy arrays: what read_bytes counts outside decoding (OpenSlide's buffers and cache).
    estimate = source.read_bytes(window[2], window[3]) - source.decode_bytes(window[2], window[3])
    measured = max(numpy_peak, float_window + 3 * window[2] * window[3])
    assert numpy_peak <= estimate <= 1.5 * measured, (numpy_peak, estimate)


def test_trunk_forward_picks_the_band_with_glass_skipping_and_the_sources_reads_counted(monkeypatch):
    """A prediction's band comes from the estimate of what it will run: glass skipped or not, and what reading
    its source costs (a slide's resampler and cache)."""

    class CostlySource:  # reads are not made here: the streamed forward is replaced below
        height, width = 6000, 5000

        def read(self, top, left, height, width):
            raise AssertionError("not read")

        def read_bytes(self, height, width):
            return 20 * 3 * height * width  # a reader holding 20 bytes per pixel read

    bands_used = []
    monkeypatch.setattr(forward, "stream_along_longer_side",
                        lambda blocks, source, *, band, progress, needed: bands_used.append(band))
    trunk = ResNetTrunk(3, True).eval()
    blocks, source = trunk.blocks(), CostlySource()
    needed = np.ones((block_input_lengths(blocks, 6000)[-1], block_input_lengths(blocks, 5000)[-1]), bool)
    plain = band_forward_bytes(blocks, 6000, 5000, 64)
    costly = band_forward_bytes(blocks, 6000, 5000, 64, source=source)
    costly_masked = band_forward_bytes(blocks, 6000, 5000, 64, masked=True, source=source)
    assert plain < costly < costly_masked
    for budget, mask, band in [(costly_masked, needed, 64), (costly_masked - 1, needed, 32), (costly, None, 64),
                               (costly - 1, None, 32)]:
        forward.trunk_forward(trunk, source, memory_budget=budget, needed=mask)
        assert bands_used.pop() == band, (budget, mask is not None)
