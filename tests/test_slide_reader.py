"""wsilocal.slide.reader against real slide files read by OpenSlide and tiffslide."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsilocal.errors import ConfigError, SlideError
from wsilocal.slide.reader import level_for_mpp, open_slide, read_region_at_mpp, read_region_downsampled


def smooth_texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random but JPEG-friendly content: sums of sinusoids of random period, phase and colour."""
    rng = np.random.default_rng(seed)
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)[:, None]
    waves = np.zeros((height, width, 6), np.float32)
    for k in range(6):
        fx, fy = rng.uniform(-0.08, 0.08, 2)
        a, b = 2 * np.pi * fx * x, 2 * np.pi * fy * y + rng.uniform(0, 2 * np.pi)
        waves[..., k] = np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)  # sin(a + b), separably
    image = 128 + waves @ rng.uniform(-25, 25, (6, 3)).astype(np.float32)  # a colour per wave
    return np.clip(image, 0, 255).astype(np.uint8)


def area_average(image: np.ndarray, start: float, step: float, count: int, axis: int) -> np.ndarray:
    """Reference: exact area averages of ``count`` intervals [start + j*step, +step) along ``axis``.

    Computed from the running integral of the piecewise-constant pixel values (float64).
    """
    values = np.moveaxis(image.astype(np.float64), axis, 0)
    integral = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])

    def integral_at(t: np.ndarray) -> np.ndarray:
        whole = np.floor(t).astype(int)
        part = (t - whole).reshape((-1,) + (1,) * (values.ndim - 1))
        return integral[whole] + part * values[np.minimum(whole, len(values) - 1)]

    low = start + step * np.arange(count)
    return np.moveaxis((integral_at(low + step) - integral_at(low)) / step, 0, axis)


# --- opening and metadata -----------------------------------------------------------------


@pytest.mark.parametrize("layout, vendor", [("aperio", "aperio"), ("generic", "generic-tiff")])
def test_open_reports_pyramid_mpp_and_vendor(make_slide, layout, vendor):
    path = make_slide(smooth_texture(2100, 2400), layout=layout, mpp=0.5, app_mag=20)
    with open_slide(path) as slide:
        assert slide.backend == "openslide"
        assert slide.vendor == vendor
        assert slide.path == path
        assert slide.level_count == 2
        assert slide.level_dimensions == [(2100, 2400), (525, 600)]
        assert slide.level_downsamples == [1.0, 4.0]
        assert slide.mpp == pytest.approx(0.5)
        assert slide.objective_power == (20.0 if layout == "aperio" else None)


def test_both_backends_read_the_same_pixels_and_metadata(make_slide):
    path = make_slide(smooth_texture(2100, 2400, seed=3))
    with open_slide(path, _backend="openslide") as openslide_slide, \
            open_slide(path, _backend="tiffslide") as tiffslide_slide:
        assert (openslide_slide.backend, tiffslide_slide.backend) == ("openslide", "tiffslide")
        for attribute in ("level_dimensions", "level_downsamples", "mpp", "objective_power", "vendor"):
            assert getattr(openslide_slide, attribute) == getattr(tiffslide_slide, attribute), attribute
        # Odd offsets at level 1 (not multiples of the downsample) and regions sticking out of the slide.
        for x, y, level, w, h in [(101, 37, 0, 300, 200), (103, 41, 1, 150, 90), (1990, 2350, 0, 300, 200),
                                  (-30, -50, 1, 80, 70), (2000, 2300, 1, 100, 100)]:
            a = openslide_slide.read_region(x, y, level, w, h)
            b = tiffslide_slide.read_region(x, y, level, w, h)
            assert a.shape == (h, w, 3) and a.dtype == np.uint8
            np.testing.assert_array_equal(a, b)
        region = (33, 71, 1999, 2222)
        np.testing.assert_array_equal(read_region_at_mpp(openslide_slide, 1.7, region),
                                      read_region_at_mpp(tiffslide_slide, 1.7, region))


def test_level_pixels_start_at_floor_of_level0_coordinate_and_outside_is_white(make_slide):
    image = smooth_texture(2100, 2400, seed=4)
    with open_slide(make_slide(image, quality=100)) as slide:
        level1 = slide.read_region(0, 0, 1, 525, 600)
        # x = 103 is level-1 pixel 25.75: the region starts at pixel 25 (no sub-pixel interpolation).
        np.testing.assert_array_equal(slide.read_region(103, 41, 1, 50, 40), level1[10:50, 25:75])
        corner = slide.read_region(2050, 2380, 0, 100, 40)
        np.testing.assert_array_equal(corner[20:, :], 255)  # below the slide
        np.testing.assert_array_equal(corner[:, 50:], 255)  # right of the slide
        assert np.abs(corner[:20, :50].astype(int) - image[2380:, 2050:]).mean() < 3  # JPEG error only


def test_tiffslide_fallback_opens_a_tiff_openslide_refuses(tmp_path):
    # A stripped (not tiled), uncompressed TIFF: OpenSlide's generic-tiff reader needs tiles.
    image = smooth_texture(300, 200, seed=5)
    path = tmp_path / "stripped.tif"
    pixels_per_cm = 1e4 / 0.5
    tifffile.imwrite(path, image, photometric="rgb", resolution=(pixels_per_cm, pixels_per_cm),
                     resolutionunit="CENTIMETER")
    with pytest.raises(SlideError):
        open_slide(path, _backend="openslide")
    with open_slide(path) as slide:
        assert slide.backend == "tiffslide"
        assert slide.level_dimensions == [(300, 200)]
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 300, 200), image)


# --- level choice and resampling ---------------------------------------------------------


@pytest.fixture(scope="module")
def three_level_slide(module_tmp):
    """8192 x 640 px at 0.25 µm/px: levels at 0.25, 1.0 and 4.0 µm/px."""
    from wsilocal.slide.tiff_writer import write_pyramidal_tiff

    path = module_tmp("levels") / "levels.svs"
    write_pyramidal_tiff(path, smooth_texture(8192, 640, seed=6), mpp=0.25)
    return path


@pytest.mark.parametrize("target, level", [
    (0.1, 0), (0.25, 0), (0.5, 0), (0.99, 0),  # finer than level 1: read level 0
    (1.0, 1), (1.005, 1), (0.995, 1),  # level 1 (1.0 µm/px), also when 1 % coarser than the target
    (2.0, 1), (3.9, 1), (3.97, 2), (4.0, 2), (16.0, 2), (100.0, 2),
])
def test_level_for_mpp_picks_the_coarsest_level_not_coarser_than_the_target(three_level_slide, target, level):
    with open_slide(three_level_slide) as slide:
        assert slide.level_downsamples == [1.0, 4.0, 16.0]
        assert level_for_mpp(slide, target) == level


@pytest.mark.parametrize("target, region", [(2.0, (333, 97, 2003, 1201)), (1.3, (50, 31, 1777, 1111)),
                                            (0.37, (50, 31, 377, 311))])
def test_stripes_have_the_right_period_and_phase_after_resampling(make_slide, target, region):
    # Level 0 at 0.5 µm/px, grey (so JPEG keeps it well): vertical stripes of period 40 µm = 80 px
    # and horizontal stripes of period 60 µm = 120 px.
    def stripes(x, y, damp_x=1.0, damp_y=1.0):
        return 128 + 50 * damp_x * np.sin(2 * np.pi * x / 80) + 50 * damp_y * np.sin(2 * np.pi * y / 120)

    y, x = np.mgrid[0:1400, 0:2500]
    image = np.repeat(np.clip(stripes(x, y) + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    with open_slide(make_slide(image, mpp=0.5, quality=95)) as slide:
        rx, ry, rw, rh = region
        out = read_region_at_mpp(slide, target, region).astype(np.float64)
    assert out.shape == (round(rh * 0.5 / target), round(rw * 0.5 / target), 3)
    # Period in output pixels from the spectrum of the mean row: 40 µm / target µm/px.
    spectrum = np.abs(np.fft.rfft(out[:, :, 0].mean(axis=0) - out[:, :, 0].mean()))
    assert np.argmax(spectrum) == round(out.shape[1] / (40 / target))
    # Every output pixel: the stripes at its centre in level-0 coordinates, damped by the area average
    # over its footprint (a sinc) when shrinking; the region maps exactly onto the output, so the
    # footprint is width / out_width. What is left is JPEG error, about a grey level.
    step_x, step_y = rw / out.shape[1], rh / out.shape[0]
    cx = rx + (np.arange(out.shape[1]) + 0.5) * step_x - 0.5
    cy = ry + (np.arange(out.shape[0]) + 0.5) * step_y - 0.5
    damp = (np.sinc(step_x / 80), np.sinc(step_y / 120)) if step_x > 1 else (1.0, 1.0)
    expected = stripes(cx[None, :], cy[:, None], *damp)
    error = np.abs(out - expected[..., None])
    assert error.max() < 3 and error.mean() < 0.6  # a shift of half a level-0 pixel would add ~1.3


@pytest.mark.parametrize("target, region", [
    (2.0, (333, 97, 2003, 1201)),  # level 1 at an odd offset, step 2
    (1.7, (37, 91, 1501, 1203)),  # level 1, fractional step
    (0.7, (5, 3, 1333, 1211)),  # level 0, fractional step
    (5.3, None),  # whole slide, level 1
])
def test_banded_reading_equals_a_whole_region_area_average(make_slide, target, region):
    with open_slide(make_slide(smooth_texture(2700, 2300, seed=7))) as slide:
        banded = read_region_at_mpp(slide, target, region, tile=64)  # many bands, many tiles per band
        whole = read_region_at_mpp(slide, target, region, tile=10**6)  # one band, one read
        np.testing.assert_array_equal(banded, whole)
        # Independent reference: exact area average of the level, read in one piece.
        level = level_for_mpp(slide, target)
        downsample = slide.level_downsamples[level]
        width, height = slide.level_dimensions[level]
        source = slide.read_region(0, 0, level, width, height)
        x, y, w, h = region or (0, 0, *slide.level_dimensions[0])
        out_h, out_w = banded.shape[:2]
        reference = area_average(source, x / downsample, w / downsample / out_w, out_w, axis=1)
        reference = area_average(reference, y / downsample, h / downsample / out_h, out_h, axis=0)
        assert np.abs(banded - reference).max() <= 0.5 + 1e-3  # rounding only


def test_enlarging_interpolates_linearly_and_bands_stitch(make_slide):
    with open_slide(make_slide(smooth_texture(600, 500, seed=8), mpp=1.0)) as slide:
        region = (101, 77, 211, 190)
        banded = read_region_at_mpp(slide, 0.37, region, tile=16)
        whole = read_region_at_mpp(slide, 0.37, region, tile=10**6)
        assert banded.shape == (round(190 / 0.37), round(211 / 0.37), 3)
        assert np.abs(banded.astype(int) - whole).max() <= 1
        source = slide.read_region(0, 0, 0, 600, 500).astype(np.float64)
    # Reference: bilinear interpolation at each output pixel's centre.
    step_x, step_y = 211 / banded.shape[1], 190 / banded.shape[0]
    cx = 101 + (np.arange(banded.shape[1]) + 0.5) * step_x - 0.5
    cy = 77 + (np.arange(banded.shape[0]) + 0.5) * step_y - 0.5
    x0, y0 = np.floor(cx).astype(int), np.floor(cy).astype(int)
    fx, fy = (cx - x0)[None, :, None], (cy - y0)[:, None, None]
    top = source[y0][:, x0] * (1 - fx) + source[y0][:, x0 + 1] * fx
    bottom = source[y0 + 1][:, x0] * (1 - fx) + source[y0 + 1][:, x0 + 1] * fx
    assert np.abs(banded - (top * (1 - fy) + bottom * fy)).max() <= 0.5 + 1e-3


def test_reads_into_a_memmap_with_progress(make_slide, tmp_path):
    with open_slide(make_slide(smooth_texture(2700, 2300, seed=9))) as slide:
        expected = read_region_at_mpp(slide, 2.0)
        out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.uint8, expected.shape)
        calls = []
        result = read_region_at_mpp(slide, 2.0, out=out, tile=128,
                                    progress=lambda done, total: calls.append((done, total)))
        assert result is out
        out.flush()
        np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
        assert len(calls) > 1 and calls[-1] == (expected.shape[0], expected.shape[0])
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
        with pytest.raises(ValueError, match="out must be uint8 of shape"):
            read_region_at_mpp(slide, 2.0, out=np.empty((3, 3, 3), np.uint8))


def test_read_region_downsampled_works_without_mpp(make_slide):
    with open_slide(make_slide(smooth_texture(2700, 2300, seed=10), layout="generic", mpp=None)) as slide:
        assert slide.mpp_or_none is None
        view = read_region_downsampled(slide, 8.0, (100, 200, 1603, 999))
        assert view.shape == (round(999 / 8), round(1603 / 8), 3)


# --- resolution metadata ------------------------------------------------------------------


def test_slide_without_mpp_needs_assume_mpp(make_slide):
    path = make_slide(smooth_texture(700, 600), layout="generic", mpp=None)
    with open_slide(path) as slide:
        assert slide.mpp_or_none is None
        with pytest.raises(SlideError) as error:
            _ = slide.mpp
        assert str(error.value) == (f"{path}: no resolution metadata (MPP) in the file; "
                                    "pass --assume-mpp to set it (e.g. 0.25 for a 40x scan)")
        with pytest.raises(SlideError, match="--assume-mpp"):
            read_region_at_mpp(slide, 2.0)
    with open_slide(path, assume_mpp=0.5) as slide:
        assert slide.mpp == 0.5
        assert read_region_at_mpp(slide, 2.0).shape == (150, 175, 3)


def test_assume_mpp_does_not_override_the_file(make_slide):
    with open_slide(make_slide(smooth_texture(700, 600), mpp=0.25), assume_mpp=0.5) as slide:
        assert slide.mpp == pytest.approx(0.25)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_invalid_assume_mpp_is_a_config_error(make_slide, bad):
    path = make_slide(smooth_texture(700, 600))
    with pytest.raises(ConfigError, match="--assume-mpp must be a positive number"):
        open_slide(path, assume_mpp=bad)


# --- bad files ----------------------------------------------------------------------------


def test_missing_directory_and_empty_files(tmp_path):
    cases = [(tmp_path / "missing.svs", "file not found"), (tmp_path, "is a directory")]
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    cases.append((empty, "empty file (0 bytes)"))
    for path, cause in cases:
        with pytest.raises(SlideError) as error:
            open_slide(path)
        assert str(error.value) == f"{path}: {cause}"
        assert error.value.path == str(path) and error.value.cause == cause


def test_text_file_named_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    with pytest.raises(SlideError) as error:
        open_slide(path)
    assert str(error.value) == (f"{path}: not a slide format OpenSlide or tiffslide can read "
                                "(OpenSlide: Unsupported or missing image file)")


@pytest.fixture(scope="module")
def slide_bytes(module_tmp):
    """The bytes of one two-level slide per layout, written once for the truncation tests."""
    from wsilocal.slide.tiff_writer import write_pyramidal_tiff

    image = smooth_texture(700, 2100, seed=11)
    result = {}
    for layout in ("aperio", "generic"):
        path = module_tmp("whole") / f"slide.{layout}"
        write_pyramidal_tiff(path, image, layout=layout)
        result[layout] = path.read_bytes()
    return result


@pytest.mark.parametrize("layout", ["aperio", "generic"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("backend", [None, "tiffslide"])
def test_truncated_slide_fails_with_slide_error(slide_bytes, tmp_path, layout, fraction, backend):
    data = slide_bytes[layout]
    cut = tmp_path / ("cut.svs" if layout == "aperio" else "cut.tiff")
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideError) as error:
        with open_slide(cut, _backend=backend) as slide:
            read_region_at_mpp(slide, 1.0)
    assert str(error.value).startswith(f"{cut}: truncated or corrupt: ")


def test_corrupt_tile_in_the_middle_fails_when_read(make_slide, tmp_path):
    path = make_slide(smooth_texture(2100, 2400, seed=12))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        middle = len(page.dataoffsets) // 2
        offset, length = page.dataoffsets[middle], page.databytecounts[middle]
    data = bytearray(path.read_bytes())
    data[offset : offset + length] = bytes(length)  # zeros: not a JPEG stream any more
    path.write_bytes(bytes(data))
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, _backend=backend) as slide:  # the probe reads only the last tiles
            with pytest.raises(SlideError) as error:
                read_region_at_mpp(slide, 0.25, (0, 0, 2100, 2400))
        assert str(error.value).startswith(f"{path}: truncated or corrupt: cannot read level 0"), backend


# --- direct TIFF tile decoding ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["aperio", "generic"])
def test_direct_tile_decoding_gives_openslides_pixels_bit_for_bit(make_slide, layout):
    path = make_slide(smooth_texture(2100, 1800, seed=3), layout=layout, mpp=0.5, tile=256)
    regions = [(0, 0, 2100, 1800), (255, 255, 2, 2), (100, 700, 1900, 900), (2099, 1799, 1, 1), (-40, 1600, 300, 300)]
    with open_slide(path) as direct, open_slide(path, direct_decode=False) as reference:
        assert direct.level_count == 2 and direct.direct_levels == [0, 1]
        assert reference.direct_levels == []
        for level in (0, 1):
            scale = direct.level_downsamples[level]
            for x, y, w, h in regions:
                w, h = max(1, round(w / scale)), max(1, round(h / scale))
                np.testing.assert_array_equal(direct.read_region(x, y, level, w, h),
                                              reference.read_region(x, y, level, w, h))
        np.testing.assert_array_equal(read_region_at_mpp(direct, 1.3), read_region_at_mpp(reference, 1.3))


def test_a_level_whose_direct_decode_differs_from_openslide_stays_with_openslide(make_slide, monkeypatch):
    from wsilocal.slide.tiff_tiles import TiffTileReader

    path = make_slide(smooth_texture(2100, 1800), mpp=0.5, tile=256)  # two levels
    with open_slide(path, direct_decode=False) as reference:
        expected = reference.read_region(0, 0, 0, 600, 600)
    decode = TiffTileReader.read

    def off_by_one_on_level_0(self, level, *args):
        pixels = decode(self, level, *args)
        return pixels ^ 1 if level == 0 else pixels

    monkeypatch.setattr(TiffTileReader, "read", off_by_one_on_level_0)
    with open_slide(path) as slide:
        assert slide.direct_levels == [1]  # level 0 failed the check at open and is read by OpenSlide
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 600, 600), expected)


def test_a_damaged_tile_in_the_middle_of_a_level_is_a_slide_error_when_read(make_slide):
    path = make_slide(smooth_texture(1024, 1024), mpp=0.5, tile=256)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]  # neither first nor last tile
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)  # zeros: no JPEG markers left in the tile
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        assert 0 in slide.direct_levels
        slide.read_region(0, 0, 0, 256, 256)  # an intact tile reads
        with pytest.raises(SlideError, match=f"{path}.*truncated or corrupt: cannot read level 0"):
            slide.read_region(256, 256, 0, 256, 256)


@pytest.mark.parametrize("rows, cols", [(2, 2), (4, 4), (2, 8)])
def test_integer_block_averaging_equals_the_float_taps_bit_for_bit(rows, cols):
    from wsilocal.slide.reader import _apply_taps, _block_average, _block_step, _filter_taps

    band = np.random.default_rng(rows * cols).integers(0, 256, (rows * 37, cols * 53, 3), dtype=np.uint8)
    row_index, row_weight = _filter_taps(0.0, float(rows), np.arange(37), band.shape[0])
    col_index, col_weight = _filter_taps(0.0, float(cols), np.arange(53), band.shape[1])
    assert (_block_step(row_index, row_weight), _block_step(col_index, col_weight)) == (rows, cols)
    floats = _apply_taps(_apply_taps(band, col_index, col_weight, axis=1), row_index, row_weight, axis=0)
    np.testing.assert_array_equal(_block_average(band, rows, cols), np.clip(floats + 0.5, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("start, step", [(0.5, 2.0), (0.0, 3.0), (0.0, 1.5), (1.0, 2.0)])
def test_block_averaging_is_used_only_for_aligned_power_of_two_steps(start, step):
    from wsilocal.slide.reader import _block_step, _filter_taps

    index, weight = _filter_taps(start, step, np.arange(20), 100)
    # (1.0, 2.0): aligned blocks, but starting at source pixel 1 — the band read starts there, so the caller
    # shifts the index to 0 first; unshifted it is not the block layout.
    assert _block_step(index, weight) == 0
