"""The trunk's streaming engine: band streaming and the window plans give the whole-image forward's map.

The trunk's receptive field is 1345 px at conv1 stride 3 (899 px at stride 2), so a band or window only has
interior edges on an axis longer than that: the full-trunk cases use thin images, long along one axis;
shorter runs of blocks (the first five: receptive field 121 px) show interior edges on small images.

Precision: a wrong halo on the full trunk is tiny, because the outermost taps of a 1345-px field weigh
little: keeping one output row too many is off by ~1e-12 of the map's scale. float32 rounding (~1e-6,
the summation order of a convolution changes with the input's shape) would hide that, so full-trunk
exactness is checked in float64, to 1e-13 relative (the rounding there is ~1e-15); this is far inside
the 1e-4 absolute bound. Where a wrong halo shows plainly (the 5-block prefix) float32 is used.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wsilocal.models.resnet import BasicBlock, ResNetTrunk
from wsilocal.slide.reader import open_slide, read_region_at_mpp
from wsilocal.stream.bands import (
    FIXED_OVERHEAD,
    MIN_BAND,
    STEM_SPLIT,
    band_for_budget,
    band_forward,
    band_forward_bytes,
    band_memory_terms,
    stream_along_longer_side,
)
from wsilocal.stream.forward import (
    CPU_STREAM_FROM_PIXELS,
    WHOLE_HEAP_OVERHEAD,
    forward_bytes_estimate,
    stream_from_pixels,
    trunk_forward,
    whole_forward_bytes,
)
from wsilocal.stream.geometry import TilePlan, block_geometry, footprint, output_length, plan_axis, trunk_geometry
from wsilocal.stream.sources import ArraySource, SlideSource

MEAN, STD = [0.8, 0.6, 0.75], [0.15, 0.2, 0.15]
FLOAT64_RELATIVE = 1e-13  # tolerances relative to the whole map's largest magnitude
FLOAT32_RELATIVE = 1e-5


@pytest.fixture(scope="module")
def trunks() -> dict[int, ResNetTrunk]:
    """Randomly initialised float64 trunks, conv1 stride 3 and 2."""
    result = {}
    for stride in (3, 2):
        torch.manual_seed(stride)
        result[stride] = ResNetTrunk(conv1_stride=stride).double().eval()
    return result


@pytest.fixture
def trunk_with(trunks):
    """``trunk_with(stride, folded, dtype=float64)``: a shared trunk set up so, and reset after the test."""

    def setup(stride: int, folded: bool, dtype: torch.dtype = torch.float64) -> ResNetTrunk:
        trunks[stride].fold_bn = folded
        return trunks[stride].to(dtype)

    yield setup
    for trunk in trunks.values():
        trunk.fold_bn = True
        trunk.double().eval()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def whole_forward(blocks, source: ArraySource) -> torch.Tensor:
    """The reference: the blocks run on the whole image at once, in their weights' precision."""
    dtype = next(blocks[0].parameters()).dtype
    with torch.no_grad():
        return nn.Sequential(*blocks)(source.read(0, 0, source.height, source.width).to(dtype))


def relative_error(result: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |result − reference| over the largest magnitude of ``scale`` (default: the reference)."""
    assert result.dtype == reference.dtype and result.shape == reference.shape
    scale = reference if scale is None else scale
    assert scale.abs().max() > 0  # a live map, not all zeros
    return ((result - reference).abs().max() / scale.abs().max()).item()


def reference_receptive_field(geometry) -> tuple[int, int]:
    """(total stride, receptive field size) by the textbook forward recurrence r += (k-1)·j, j *= s."""
    field, jump = 1, 1
    for kernel, stride, _ in geometry:
        field += (kernel - 1) * jump
        jump *= stride
    return jump, field


# --- geometry and plans ------------------------------------------------------------------------


@pytest.mark.parametrize("stride, expected_field", [(3, 1345), (2, 899)])
def test_trunk_geometry_is_read_from_the_modules(trunks, stride, expected_field):
    geometry = trunk_geometry(trunks[stride])
    assert len(geometry) == 2 + 2 * 16  # conv1, maxpool, two convs per BasicBlock
    assert geometry[:3] == [(7, stride, 3), (3, 2, 1), (3, 1, 1)]
    total_stride, first, last = footprint(geometry)
    assert (total_stride, last - first + 1) == reference_receptive_field(geometry) == (16 * stride, expected_field)
    assert (first, last) == (-(expected_field // 2), expected_field // 2)  # centred: symmetric padding


def test_a_shortcut_reaching_beyond_the_main_path_is_refused():
    block = BasicBlock(64, 128, stride=2)
    assert block_geometry([block]) == [(3, 2, 1), (3, 1, 1)]  # the 1x1 downsample is inside: accepted
    block.downsample[0] = nn.Conv2d(64, 128, 9, 2, padding=4, bias=False)  # sees 4 px each side, main path 3
    with pytest.raises(ValueError, match="shortcut's footprint"):
        block_geometry([block])


@pytest.mark.parametrize("stride", [3, 2])
def test_output_length_matches_pytorch(stride):
    with torch.device("meta"):  # shapes only, no arithmetic
        meta = ResNetTrunk(conv1_stride=stride)
    geometry = trunk_geometry(meta)
    for length in [1, 2, 5, 47, 48, 49, 95, 96, 97, 143, 1000, 1345, 2049]:
        with torch.no_grad():
            shape = meta(torch.empty(1, 3, length, 7, device="meta")).shape
        assert (shape[2], shape[3]) == (output_length(length, geometry), output_length(7, geometry))


def _geometries() -> list:
    """Geometries of whole trunks (17 blocks) and of their first five blocks, at conv1 stride 3 and 2."""
    with torch.device("meta"):
        trunks = [ResNetTrunk(conv1_stride=stride) for stride in (3, 2)]
    return [block_geometry(trunk.blocks()[:n]) for trunk in trunks for n in (17, 5)]


GEOMETRIES = _geometries()


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 6000), tile=st.integers(1, 3000), geometry=st.sampled_from(GEOMETRIES))
def test_plan_windows_are_aligned_exact_and_partition_the_output(length, tile, geometry):
    total_stride, first, last = footprint(geometry)
    windows = plan_axis(length, tile, geometry)
    out_len = output_length(length, geometry)
    starts, stops = [w[4] for w in windows], [w[5] for w in windows]
    # The kept ranges tile [0, out_len) in order, without gaps or overlaps.
    assert starts[0] == 0 and stops[-1] == out_len and starts[1:] == stops[:-1]
    for in_start, in_stop, out_start, out_stop, keep_start, keep_stop in windows:
        assert 0 <= in_start < in_stop <= length and in_start % total_stride == 0
        assert (out_start, out_stop) == (in_start // total_stride,
                                         in_start // total_stride + output_length(in_stop - in_start, geometry))
        assert out_start <= keep_start < keep_stop <= out_stop
        assert keep_stop - keep_start <= max(1, tile // total_stride)
        # Exactness: every kept footprint is inside the window or runs past a true image edge.
        assert in_start == 0 or keep_start * total_stride + first >= in_start
        assert in_stop == length or (keep_stop - 1) * total_stride + last < in_stop
    if out_len <= max(1, tile // total_stride):  # the image fits one tile: one window, the whole image
        assert windows == [(0, length, 0, out_len, 0, out_len)]


def test_an_image_smaller_than_a_tile_is_one_window(trunks):
    plan = TilePlan.build(150, 230, 1536, trunk_geometry(trunks[3]))
    assert len(plan) == 1
    assert plan.rows == ((0, 150, 0, 4, 0, 4),) and plan.cols == ((0, 230, 0, 5, 0, 5),)


def test_bad_lengths_and_tiles_are_refused(trunks):
    for length, tile in [(0, 96), (100, 0)]:
        with pytest.raises(ValueError, match="length and tile must be positive"):
            plan_axis(length, tile, trunk_geometry(trunks[3]))


# --- exactness against the whole-image forward -------------------------------------------------


@pytest.mark.parametrize("stride, folded, height, width, band", [
    (3, True, 1500, 8, 8),  # many bands: every block has interior band edges
    (3, False, 1459, 6, 3),  # a length that is no multiple of the stride; tiny bands
    (2, True, 1000, 5, 4),
    (2, False, 1111, 3, 64),
    (3, True, 1, 1, 1),  # a single pixel
    (3, False, 150, 230, 64),  # one band
])
def test_band_streamed_trunk_equals_whole_image_forward(trunk_with, stride, folded, height, width, band):
    trunk = trunk_with(stride, folded)
    source = ArraySource(random_image(height, width, seed=height + width), MEAN, STD)
    whole = whole_forward(trunk.blocks(), source)
    with torch.no_grad():
        streamed = band_forward(trunk.blocks(), source, band=band)
    geometry = trunk_geometry(trunk)
    assert streamed.shape == (1, 512, output_length(height, geometry), output_length(width, geometry))
    assert relative_error(streamed, whole) <= FLOAT64_RELATIVE
    assert (streamed - whole).abs().max().item() <= 1e-4


def test_keeping_one_more_row_than_the_footprint_allows_is_detected(trunk_with):
    # The tolerance above can fail: the row just past a window's kept range differs by more than it.
    trunk = trunk_with(3, True)
    source = ArraySource(random_image(1500, 8, seed=1508), MEAN, STD)
    in_start, in_stop, out_start, out_stop, keep_start, keep_stop = plan_axis(1500, 576, trunk_geometry(trunk))[0]
    assert in_stop < 1500 and keep_stop < out_stop  # an interior bottom edge
    whole = whole_forward(trunk.blocks(), source)
    window = whole_forward(trunk.blocks(), ArraySource(source.image[in_start:in_stop], MEAN, STD))
    assert relative_error(window[:, :, :keep_stop], whole[:, :, :keep_stop], whole) <= FLOAT64_RELATIVE
    assert relative_error(window[:, :, keep_stop], whole[:, :, keep_stop], whole) > 10 * FLOAT64_RELATIVE


def test_two_dimensional_window_plan_on_the_first_five_blocks(trunk_with):
    # Stem, layer1 and layer2's first block (with its strided 1x1 downsample shortcut): stride 12. The plan
    # streamed training uses: every window's kept part equals the whole-image forward there.
    blocks = trunk_with(3, False, torch.float32).blocks()[:5]
    source = ArraySource(random_image(260, 200, seed=4), MEAN, STD)
    plan = TilePlan.build(source.height, source.width, 72, block_geometry(blocks))
    for windows, length in ((plan.rows, source.height), (plan.cols, source.width)):
        assert any(0 < w[0] and w[1] < length for w in windows)  # a window with two interior edges
    whole = whole_forward(blocks, source)
    for rows in plan.rows:
        for cols in plan.cols:
            window = whole_forward(blocks, ArraySource(source.image[rows[0]:rows[1], cols[0]:cols[1]], MEAN, STD))
            kept = window[:, :, rows[4] - rows[2]:rows[5] - rows[2], cols[4] - cols[2]:cols[5] - cols[2]]
            assert relative_error(kept, whole[:, :, rows[4]:rows[5], cols[4]:cols[5]], whole) <= FLOAT32_RELATIVE
    # Here one row too many is plainly wrong, even in float32.
    in_start, in_stop, _, out_stop, _, keep_stop = plan.rows[0]
    window = whole_forward(blocks, ArraySource(source.image[in_start:in_stop], MEAN, STD))
    assert keep_stop < out_stop
    assert relative_error(window[:, :, keep_stop], whole[:, :, keep_stop], whole) > 10 * FLOAT32_RELATIVE


def test_band_streaming_on_the_first_five_blocks_in_float32_with_progress(trunk_with, capsys):
    blocks = trunk_with(3, False, torch.float32).blocks()[:5]
    source = ArraySource(random_image(260, 200, seed=4), MEAN, STD)
    with torch.no_grad():
        streamed = band_forward(blocks, source, band=2, progress=True)
    assert relative_error(streamed, whole_forward(blocks, source)) <= FLOAT32_RELATIVE
    assert "260/260" in capsys.readouterr().err  # the tqdm bar counted every image row


def test_band_streaming_recomputes_only_each_blocks_own_halo(trunk_with):
    """The window forward recomputes the trunk's 672-px halo per window; bands only a block's few rows."""
    trunk = trunk_with(3, True, torch.float32)
    blocks = trunk.blocks()
    height = 3000
    rows_in = {index: 0 for index in range(len(blocks))}
    calls = {index: 0 for index in range(len(blocks))}

    def count(index, rows):
        rows_in[index] += rows
        calls[index] += 1

    hooks = [block.register_forward_pre_hook(lambda _m, args, i=index: count(i, args[0].shape[2]))
             for index, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            band_forward(blocks, ArraySource(random_image(height, 16, seed=9), MEAN, STD), band=32)
    finally:
        for hook in hooks:
            hook.remove()
    length = height
    for index, block in enumerate(blocks):
        geometry = block_geometry([block])
        stride, first, last = footprint(geometry)
        out_length = output_length(length, geometry)
        # At most `band` output rows per window (the stem: half of it, STEM_SPLIT), so at least this many windows.
        assert calls[index] >= -(-out_length // (32 // STEM_SPLIT if index == 0 else 32))
        assert calls[index] > 1 or index >= 14  # layer4 at 1/48 of 3000 rows is about one band
        # Each window reads its rows plus the block's own halo (under last - first rows, stride alignment included).
        assert rows_in[index] <= length + calls[index] * (last - first)
        assert rows_in[index] <= 1.25 * length
        length = out_length


def test_the_next_band_is_read_in_a_reader_thread(trunk_with):
    trunk = trunk_with(3, True, torch.float32)

    class RecordingSource(ArraySource):
        def read(self, top, left, height, width):
            threads.append(threading.current_thread().name)
            return super().read(top, left, height, width)

    threads: list[str] = []
    source = RecordingSource(random_image(700, 40, seed=2), MEAN, STD)
    with torch.no_grad():
        streamed = band_forward(trunk.blocks(), source, band=8)
    assert len(threads) == -(-700 // 48) and all(name.startswith("band-reader") for name in threads)
    assert relative_error(streamed, whole_forward(trunk.blocks(), source)) <= FLOAT32_RELATIVE


def test_a_wide_image_is_streamed_along_its_width(trunk_with):
    """Transposed image and kernels, the map transposed back: exact, and every read spans the shorter side."""
    trunk = trunk_with(3, False)
    reads: list[tuple[int, int]] = []

    class RecordingSource(ArraySource):
        def read(self, top, left, height, width):
            reads.append((height, width))
            return super().read(top, left, height, width)

    source = RecordingSource(random_image(7, 1500, seed=11), MEAN, STD)
    whole = whole_forward(trunk.blocks(), source)
    reads.clear()
    with torch.no_grad():
        streamed = stream_along_longer_side(trunk.blocks(), source, band=8)
    assert streamed.shape == whole.shape and streamed.is_contiguous()
    assert relative_error(streamed, whole) <= FLOAT64_RELATIVE
    assert len(reads) > 1 and all(height == 7 and width < 1500 for height, width in reads)
    assert trunk.conv1.weight.dtype == torch.float64  # the trunk itself is untouched (copies were transposed)
    assert torch.equal(whole, whole_forward(trunk.blocks(), source))


def test_bad_bands_are_refused(trunk_with):
    source = ArraySource(random_image(10, 10), MEAN, STD)
    with pytest.raises(ValueError, match="band must be a positive number of rows, got 0"):
        band_forward(trunk_with(3, True).blocks(), source, band=0)
    with pytest.raises(ValueError, match="needs at least one block"):
        band_forward([], source)


# --- mode choice -------------------------------------------------------------------------------


class LiveActivations(TorchDispatchMode):
    """The reference for the memory estimate: the bytes of the activations (batch-1 4-D tensors) that the ops run
    under it allocate and that are still alive, and their peak. A storage counts once, however many in-place ops
    return it, and is released when its tensor is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, pointer: int) -> None:
        self.current -= self.live.pop(pointer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[0] == 1:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in self.live:
                    self.live[pointer] = tensor.untyped_storage().nbytes()
                    self.current += self.live[pointer]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(tensor, self._release, pointer)
        return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize(("height", "width", "conv1_stride"), [(97, 131, 3), (64, 200, 2), (250, 77, 3)])
def test_forward_bytes_estimate_is_the_peak_of_the_activations_a_forward_allocates(arch, height, width,
                                                                                   conv1_stride):
    """Folded and not: the input, the stem's max-pooling indices, each residual block's input held for its
    shortcut, the downsample branch and the residual sum, exactly as a real no-grad forward allocates them."""
    image = torch.randn(1, 3, height, width)
    for folded in (True, False):
        trunk = ResNetTrunk(conv1_stride, folded, arch=arch).eval()
        with torch.no_grad(), LiveActivations() as live:
            trunk(image)
        assert forward_bytes_estimate(trunk, height, width) == image.numel() * 4 + live.peak, (arch, folded)


def test_forward_bytes_estimate_counts_the_downsample_branch():
    """ResNet50 at 480²: its peak is layer1[0]'s residual sum — the 64-channel input, the 256-channel main path,
    the 256-channel 1×1 shortcut and their sum — not the stem's conv1 beside max-pooling."""
    unit = 80 * 80  # positions after the stem of a 480² image at conv1 stride 3
    stem = 64 * 160 * 160 + 3 * 64 * unit  # conv1's output beside the pooled output and its int64 indices
    layer1_sum = (64 + 3 * 256) * unit
    assert layer1_sum > stem
    trunk = ResNetTrunk(3, True, arch="resnet50")
    assert forward_bytes_estimate(trunk, 480, 480) == 4 * (3 * 480 * 480 + layer1_sum)


def test_whole_forward_bytes_adds_the_read_and_the_heap_to_the_live_activations(trunk_with, make_slide):
    """The resident estimate that chooses the mode: activations and the read of the image (an in-memory image's
    uint8 and float32 copies, or a slide's resampling work) times the heap factor, plus the fixed overhead."""
    trunk = trunk_with(3, True, torch.float32)
    activations = forward_bytes_estimate(trunk, 150, 230) - 4 * 3 * 150 * 230
    in_memory = whole_forward_bytes(trunk, 150, 230)
    assert in_memory == round(WHOLE_HEAP_OVERHEAD * (activations + 3 * 150 * 230 * 5)) + FIXED_OVERHEAD
    with open_slide(make_slide(random_image(600, 920, seed=2), mpp=0.5)) as slide:
        source = SlideSource(slide, 2.0, (0, 0, 920, 600), MEAN, STD)  # 230 × 150 px at 2 µm/px
        reading = source.read_bytes(source.height, source.width)
        assert whole_forward_bytes(trunk, source.height, source.width, source=source) == round(
            WHOLE_HEAP_OVERHEAD * (forward_bytes_estimate(trunk, source.height, source.width)
                                   - 4 * 3 * source.height * source.width + reading)) + FIXED_OVERHEAD
    assert reading > 3 * source.height * source.width * 5  # a slide's read holds more than an array's


def test_trunk_forward_picks_whole_or_streamed_by_budget(trunk_with):
    trunk = trunk_with(3, True, torch.float32).train()  # forward in eval mode, the mode then restored
    assert trunk.training
    source = ArraySource(random_image(150, 230, seed=5), MEAN, STD)
    needed = whole_forward_bytes(trunk, 150, 230, source=source)
    unlimited, mode_unlimited = trunk_forward(trunk, source)
    fits, mode_fits = trunk_forward(trunk, source, memory_budget=needed)
    streamed, mode_streamed = trunk_forward(trunk, source, memory_budget=needed - 1)
    asked, mode_asked = trunk_forward(trunk, source, band=4)  # a band asked for streams even what fits
    assert (mode_unlimited, mode_fits, mode_streamed, mode_asked) == ("whole", "whole", "streamed", "streamed")
    # From stream_from pixels up the faster streamed mode is taken even without a budget (at the default band).
    pixels = 150 * 230
    _, mode_below = trunk_forward(trunk, source, memory_budget=needed, stream_from=pixels + 1)
    faster, mode_faster = trunk_forward(trunk, source, stream_from=pixels)
    assert (mode_below, mode_faster) == ("whole", "streamed")
    assert relative_error(faster, unlimited) <= FLOAT32_RELATIVE
    assert stream_from_pixels(torch.device("cpu")) == CPU_STREAM_FROM_PIXELS == 1024 * 1024
    assert stream_from_pixels(torch.device("cuda")) is None
    assert torch.equal(unlimited, fits) and not unlimited.requires_grad
    assert relative_error(streamed, unlimited) <= FLOAT32_RELATIVE
    assert relative_error(asked, unlimited) <= FLOAT32_RELATIVE
    assert trunk.training and trunk.layer1[0].conv1.training


def test_band_forward_bytes_grows_with_the_band_not_with_the_height(trunk_with):
    blocks = trunk_with(3, True).blocks()
    width = 8000
    small, large = (band_forward_bytes(blocks, 20000, width, band) for band in (8, 64))
    assert small < large
    # A taller image adds only its output map (512 channels at 1/48 of the side), not larger bands.
    short, tall = (band_memory_terms(blocks, height, width, 8) for height in (20000, 80000))
    geometry = trunk_geometry(trunk_with(3, True))
    out_rows = output_length(80000, geometry) - output_length(20000, geometry)
    assert tall["out_map"] - short["out_map"] == 4 * 512 * out_rows * output_length(width, geometry)
    assert {k: v for k, v in tall.items() if k != "out_map"} == {k: v for k, v in short.items() if k != "out_map"}
    assert band_forward_bytes(blocks, 80000, width, 8) > small


def test_band_for_budget_is_the_largest_band_that_fits(trunk_with):
    blocks = trunk_with(3, True).blocks()
    height, width = 30000, 20000
    bands = []
    for budget_gib in (0.3, 1, 4):
        budget = int(budget_gib * 2**30)
        band = band_for_budget(blocks, height, width, budget)
        bands.append(band)
        assert band == MIN_BAND or band_forward_bytes(blocks, height, width, band) <= budget
        if band < 64:
            assert band_forward_bytes(blocks, height, width, 2 * band) > budget
    assert bands == sorted(bands) and bands[0] < bands[-1]
    assert band_for_budget(blocks, height, width, 1) == MIN_BAND  # nothing fits: the smallest band


# --- streaming from a slide file ---------------------------------------------------------------


def test_slide_source_streams_the_cached_pixels_and_the_streamed_map(make_slide, trunk_with):
    trunk = trunk_with(3, True, torch.float32)  # the precision inference runs in
    path = make_slide(random_image(2100, 300, seed=3), mpp=0.25)
    mpp, region = 0.35, (11, 37, 41, 2011)  # level 0, fractional step, odd offset: 29 x 1436 px
    with open_slide(path) as slide:
        cached = read_region_at_mpp(slide, mpp, region)  # what the cache stores for this box
        streamed = SlideSource(slide, mpp, region, MEAN, STD)
        assert (streamed.height, streamed.width) == cached.shape[:2] == (1436, 29)
        in_memory = ArraySource(cached, MEAN, STD)
        for window in [(0, 0, 1436, 29), (0, 0, 7, 5), (1435, 28, 1, 1), (500, 3, 611, 17)]:
            assert torch.equal(streamed.read(*window), in_memory.read(*window))
        with pytest.raises(ValueError, match="is not inside the 1436x29 image"):
            streamed.read(1400, 0, 38, 1)
        with torch.no_grad():
            bands = band_forward(trunk.blocks(), streamed, band=16)
    assert relative_error(bands, whole_forward(trunk.blocks(), in_memory)) <= FLOAT32_RELATIVE
