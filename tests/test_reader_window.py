"""read_region_at_mpp(window=...): a window of the resampled output, bit-identical to the whole read."""

from __future__ import annotations

import os

import numpy as np
import pytest

from wsilocal.slide.reader import level_for_mpp, open_slide, read_region_at_mpp, size_at_mpp


def texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Noisy colour content, so any misplaced tap or weight changes some output pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 128 + 60 * np.sin(x / 7.3)[..., None] * np.cos(y / 5.1)[..., None] * rng.uniform(-1, 1, 3)
    return np.clip(image + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def windows_of(out_h: int, out_w: int) -> list[tuple[int, int, int, int]]:
    """Corners, odd interior offsets, single pixels and the full output, as (top, left, height, width)."""
    return [
        (0, 0, out_h, out_w),  # full
        (0, 0, 17, 23),  # top-left corner
        (out_h - 13, out_w - 29, 13, 29),  # bottom-right corner
        (0, out_w - 1, out_h, 1),  # last column
        (out_h - 1, 0, 1, out_w),  # last row
        (37, 51, 1, 1),  # one interior pixel
        (out_h // 3 + 1, out_w // 5 + 3, out_h // 2, out_w // 3),  # odd interior block
    ]


@pytest.fixture
def slide_path(make_slide):
    """A real pyramidal JPEG TIFF (Aperio layout): level 0 at 0.25 µm/px, levels shrinking ×4."""
    return make_slide(texture(2100, 1300), mpp=0.25, layout="aperio")


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("mpp, region, level", [
    (0.37, (13, 7, 1203, 1011), 0),  # level 0, shrinking by a fractional step, odd offset
    (0.19, (101, 77, 301, 257), 0),  # level 0, enlarging (linear interpolation)
    (1.3, None, 1),  # level 1, whole slide
    (1.7, (333, 97, 1501, 1101), 1),  # level 1 at an odd offset, fractional step
])
def test_window_equals_the_same_window_of_the_whole_read(slide_path, backend, mpp, region, level):
    with open_slide(slide_path, _backend=backend) as slide:
        assert level_for_mpp(slide, mpp) == level
        whole = read_region_at_mpp(slide, mpp, region)
        out_h, out_w = whole.shape[:2]
        for top, left, height, width in windows_of(out_h, out_w):
            # A small band size as well: windows and bands must both stitch exactly.
            for tile in (64, 2048):
                part = read_region_at_mpp(slide, mpp, region, window=(top, left, height, width), tile=tile)
                assert part.shape == (height, width, 3)
                assert np.array_equal(part, whole[top : top + height, left : left + width]), (top, left, tile)


def test_window_reads_only_the_source_pixels_it_needs(slide_path):
    mpp, region = 0.37, (13, 7, 1203, 1011)
    with open_slide(slide_path) as slide:
        step = mpp / slide.mpp  # level-0 pixels per output pixel (level 0 is read)
        reads: list[tuple[int, int, int, int]] = []
        read_level = slide._read_level

        def recording(level, lx, ly, width, height):
            reads.append((lx, ly, width, height))
            return read_level(level, lx, ly, width, height)

        slide._read_level = recording
        top, left, height, width = 100, 200, 30, 40
        read_region_at_mpp(slide, mpp, region, window=(top, left, height, width))
    # Every read lies within the window's footprint in the source (area taps: plus one partial pixel).
    x0, x1 = region[0] + left * step, region[0] + (left + width) * step
    y0, y1 = region[1] + top * step, region[1] + (top + height) * step
    assert reads
    for lx, ly, w, h in reads:
        assert x0 - 1 <= lx and lx + w <= x1 + 1
        assert y0 - 1 <= ly and ly + h <= y1 + 1


def test_window_fills_out_and_checks_its_bounds(slide_path):
    with open_slide(slide_path) as slide:
        out_w, out_h = size_at_mpp(2100, 1300, slide.mpp, 1.3)
        whole = read_region_at_mpp(slide, 1.3)
        out = np.zeros((20, 30, 3), np.uint8)
        assert read_region_at_mpp(slide, 1.3, window=(5, 7, 20, 30), out=out) is out
        assert np.array_equal(out, whole[5:25, 7:37])
        with pytest.raises(ValueError, match="out must be uint8 of shape \\(20, 30, 3\\)"):
            read_region_at_mpp(slide, 1.3, window=(5, 7, 20, 30), out=np.zeros((21, 30, 3), np.uint8))
        for bad in [(0, 0, out_h + 1, 1), (0, out_w, 1, 1), (-1, 0, 1, 1), (0, 0, 0, 5)]:
            with pytest.raises(ValueError, match="is not inside the"):
                read_region_at_mpp(slide, 1.3, window=bad)


def test_bands_read_by_threads_equal_a_single_thread_read(slide_path, monkeypatch):
    import wsilocal.slide.reader as reader

    with open_slide(slide_path) as slide:
        assert reader.read_threads(slide) == min(8, len(os.sched_getaffinity(0)))
        seen = []
        threaded = read_region_at_mpp(slide, 0.37, (13, 7, 1203, 1011), tile=64,
                                      progress=lambda done, total: seen.append((done, total)))
        monkeypatch.setattr(reader, "MAX_READ_THREADS", 1)
        single = read_region_at_mpp(slide, 0.37, (13, 7, 1203, 1011), tile=64)
    assert np.array_equal(threaded, single)
    assert len(seen) > 2 and seen[-1] == (single.shape[0], single.shape[0])  # many bands, all reported
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_worker_processes_share_the_cores_for_reading(monkeypatch):
    import wsilocal.slide.reader as reader

    monkeypatch.setattr(reader, "usable_cores", lambda: 16)
    monkeypatch.setattr(reader, "MAX_READ_THREADS", 8)
    reader.share_cores_between(4)  # 4 processes on 16 cores: 4 threads each
    assert reader.MAX_READ_THREADS == 4
    reader.share_cores_between(32)  # more processes than cores: still one thread each
    assert reader.MAX_READ_THREADS == 1
