"""Open a whole-slide image and read it at a target resolution (microns per pixel).

One small interface, :class:`Slide`, over two backends: OpenSlide first (the reference reader of
slide formats) and tiffslide as a fallback for TIFF files OpenSlide refuses. Every failure a user
can meet — missing, empty, unreadable or truncated files, missing resolution metadata — becomes a
:class:`~wsilocal.errors.SlideError` naming the file and the cause.

:func:`read_region_at_mpp` is how the rest of wsilocal reads pixels: it picks the pyramid level
just finer than the target resolution, reads it tile by tile and resizes it with area averaging,
one horizontal band at a time, into an output array (or memory map) of exactly the target size.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import openslide
import tifffile
import tiffslide

from wsilocal.errors import ConfigError, SlideError
from wsilocal.slide.tiff_tiles import DIRECT_VENDORS, TiffTileReader

#: A pyramid level counts as "not coarser than the target" up to this relative excess, so a level
#: stored at 2.01 µm/px serves a 2.0 µm/px request instead of falling back to a 4× finer level.
LEVEL_TOLERANCE = 0.01
#: Source bytes per band when resizing: bounds memory for very wide slides (plus the output itself).
BAND_BYTES = 32 * 2**20
#: Most threads reading the bands of one read at once (OpenSlide only; one per usable core): on 2 cores, 2 threads
#: read a 4096² box at 5x in 2.6 s instead of 4.6–5.7 s, bit-identically (docs/benchmarks.md, speed). On a GPU
#: host the read is most of a prediction, so its cores all help; each thread holds one band (≤ BAND_BYTES).
MAX_READ_THREADS = 8
#: Integer steps (source px per output px) resampled by integer block averaging: powers of two, whose 1/k weights
#: make the float taps' sums exact, up to 8 (8 × 8 × 255 still fits the uint16 block sums).
BLOCK_STEPS = (2, 4, 8)
#: Decompression-bomb guard: a TIFF strip or tile larger than this when decoded is refused at open.
MAX_CHUNK_BYTES = 256 * 2**20
#: Default pixel limit of a read (output, or pixels decoded to make it): larger reads are refused, not attempted.
DEFAULT_MAX_PIXELS = 40_000 * 40_000

_TIFF_MAGICS = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic TIFF and BigTIFF, both byte orders
# What the backends raise on unreadable data: OpenSlide errors, imagecodecs decode errors
# (RuntimeError subclasses), tifffile errors (ValueError), I/O errors, and lookups into damaged tables.
_READ_ERRORS = (openslide.OpenSlideError, RuntimeError, ValueError, OSError, KeyError, IndexError)

ProgressCallback = Callable[[int, int], None]


class Slide:
    """An open whole-slide image. Use as a context manager, or call :meth:`close` when done.

    Attributes:
        path: the slide file.
        backend: ``"openslide"`` or ``"tiffslide"``.
        vendor: the format the backend recognised (``"aperio"``, ``"generic-tiff"``, ...) or None.
        level_count, level_dimensions, level_downsamples: the pyramid, (width, height) per level.
        objective_power: the scanner objective magnification, if the file records it.
    """

    def __init__(self, path: Path, handle: openslide.OpenSlide | tiffslide.TiffSlide, backend: str,
                 assume_mpp: float | None):
        self.path = path
        self.backend = backend
        self._handle = handle
        prefix = backend + "."  # both backends name their normalised properties "<backend>.<name>"
        props = handle.properties
        self.vendor: str | None = _str_or_none(props.get(prefix + "vendor"))
        self.level_count: int = handle.level_count
        self.level_dimensions: list[tuple[int, int]] = [(int(w), int(h)) for w, h in handle.level_dimensions]
        self.level_downsamples: list[float] = [float(d) for d in handle.level_downsamples]
        self.objective_power: float | None = _positive_float(props.get(prefix + "objective-power"))
        mpps = [m for m in (_positive_float(props.get(prefix + "mpp-x")),
                            _positive_float(props.get(prefix + "mpp-y"))) if m is not None]
        file_mpp = sum(mpps) / len(mpps) if mpps else None
        self.mpp_or_none: float | None = file_mpp if file_mpp is not None else assume_mpp
        self._direct: TiffTileReader | None = None  # levels decoded without OpenSlide (attach_direct_reader)

    @property
    def direct_levels(self) -> list[int]:
        """Levels whose tiles are decoded straight from the TIFF file (bit-identical to OpenSlide, faster)."""
        return self._direct.levels if self._direct is not None else []

    @property
    def mpp(self) -> float:
        """Microns per pixel at level 0 (the file's value, else ``assume_mpp``); SlideError if neither."""
        if self.mpp_or_none is None:
            raise SlideError(self.path, "no resolution metadata (MPP) in the file; "
                                        "pass --assume-mpp to set it (e.g. 0.25 for a 40x scan)")
        return self.mpp_or_none

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read ``width``×``height`` pixels of ``level`` whose top-left corner is level-0 pixel (x, y).

        Returns uint8 RGB of shape (height, width, 3). As in OpenSlide, (x, y) are level-0
        coordinates; the region starts at level pixel ``floor(x / downsample)`` (no sub-pixel
        interpolation). Pixels outside the slide or transparent in it are white.
        """
        downsample = self.level_downsamples[level]
        lx, ly = math.floor(x / downsample), math.floor(y / downsample)
        pixels = self._read_level(level, lx, ly, width, height)
        return np.ascontiguousarray(pixels)

    def close(self) -> None:
        """Release the file. The slide cannot be read afterwards."""
        if self._direct is not None:
            self._direct.close()
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, vendor={self.vendor!r}, "
                f"levels={self.level_dimensions}, mpp={self.mpp_or_none}, direct_levels={self.direct_levels})")

    def attach_direct_reader(self) -> None:
        """Decode the levels of a plain tiled TIFF (Aperio SVS, generic TIFF) straight from the file.

        A level is read directly only if its first and last tiles decode to exactly OpenSlide's pixels; every
        other level, and every other format, stays with OpenSlide.
        """
        if self.backend != "openslide" or self.vendor not in DIRECT_VENDORS:  # both vendors are TIFF files
            return
        try:
            direct = TiffTileReader(self.path, self.level_dimensions)
        except _READ_ERRORS:
            return  # OpenSlide read the file; a page table tifffile cannot parse just means no direct reads
        for level in direct.levels:
            if not self._direct_matches_backend(direct, level):
                direct.drop_level(level)
        if direct.levels:
            self._direct = direct
        else:
            direct.close()

    def _direct_matches_backend(self, direct: TiffTileReader, level: int) -> bool:
        """Whether the first and last tiles of ``level`` decode alike directly and through OpenSlide (no direct
        reader is attached yet, so :meth:`_read_inside` reads through the backend)."""
        width, height = self.level_dimensions[level]
        tile_w, tile_h = direct.tile_size(level)
        tw, th = min(tile_w, width), min(tile_h, height)
        for lx, ly in ((0, 0), (width - tw, height - th)):
            try:
                mine = direct.read(level, lx, ly, tw, th)
            except _READ_ERRORS:
                return False
            if not np.array_equal(mine, self._read_inside(level, lx, ly, tw, th)):
                return False
        return True

    def _read_level(self, level: int, lx: int, ly: int, width: int, height: int) -> np.ndarray:
        """Read a region given in pixels *of the level*; everything outside the level is white."""
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        level_w, level_h = self.level_dimensions[level]
        x0, x1 = max(lx, 0), min(lx + width, level_w)
        y0, y1 = max(ly, 0), min(ly + height, level_h)
        if (x0, y0, x1, y1) == (lx, ly, lx + width, ly + height):
            return self._read_inside(level, lx, ly, width, height)
        # Only the part inside the level is read: the backends pad differently (OpenSlide with
        # transparent, tiffslide with black pixels), so padding is done here, the same for both.
        out = np.full((height, width, 3), 255, np.uint8)
        if x0 < x1 and y0 < y1:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _read_inside(self, level: int, lx: int, ly: int, width: int, height: int) -> np.ndarray:
        """Read a region lying wholly inside ``level`` (level pixels) through the backend."""
        downsample = self.level_downsamples[level]
        location = (_level0_coordinate(lx, downsample), _level0_coordinate(ly, downsample))
        try:
            if self._direct is not None and level in self._direct.levels:
                return self._direct.read(level, lx, ly, width, height)
            if self.backend == "openslide":
                pixels = np.asarray(self._handle.read_region(location, level, (width, height)))
            else:
                pixels = np.asarray(self._handle.read_region(location, level, (width, height), as_array=True))
        except _READ_ERRORS as error:
            raise SlideError(self.path, f"truncated or corrupt: cannot read level {level} at "
                                        f"({lx}, {ly}) ({_describe(error)})") from error
        return _to_rgb(self.path, pixels)


def stat_slide_file(path: Path) -> os.stat_result:
    """``path.stat()``, or a SlideError naming the file when it is missing or cannot be looked at (the reason
    a cohort run lists it under)."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise SlideError(path, "file not found") from None
    except OSError as exc:
        raise SlideError(path, exc.strerror or str(exc)) from None


def open_slide(path: str | Path, *, assume_mpp: float | None = None, direct_decode: bool = True,
               _backend: str | None = None) -> Slide:
    """Open a slide with OpenSlide, or with tiffslide when OpenSlide refuses a TIFF file.

    Args:
        path: the slide file (any format OpenSlide reads, or a TIFF tiffslide reads).
        assume_mpp: microns per pixel to use when the file records none (ignored otherwise).
        direct_decode: decode the tiles of plain tiled TIFF levels (SVS, generic TIFF) straight from the file
            where that gives OpenSlide's pixels exactly (:meth:`Slide.attach_direct_reader`); False reads every
            level through OpenSlide's ``read_region``, as the tile-based tools do.
        _backend: ``"openslide"`` or ``"tiffslide"`` to try only that backend (for tests).

    Raises:
        SlideError: the file is missing, empty, not a readable slide, or truncated/corrupt.
        ConfigError: ``assume_mpp`` is not a positive number.
    """
    path = Path(path)
    if assume_mpp is not None and not (math.isfinite(assume_mpp) and assume_mpp > 0):
        raise ConfigError(f"--assume-mpp must be a positive number of microns per pixel, got {assume_mpp}")
    _check_file(path)
    backends = (_backend,) if _backend else ("openslide", "tiffslide")
    failures: list[str] = []
    slide = None
    if "openslide" in backends:
        try:
            # OpenSlide() rather than openslide.open_slide(), which silently falls back to PIL.
            slide = Slide(path, openslide.OpenSlide(str(path)), "openslide", assume_mpp)
        except openslide.OpenSlideError as error:
            failures.append(f"OpenSlide: {error}")
    if slide is None and "tiffslide" in backends and _is_tiff(path):
        slide = _open_with_tiffslide(path, assume_mpp, failures)
    if slide is None:
        raise SlideError(path, f"not a slide format OpenSlide or tiffslide can read ({'; '.join(failures)})")
    try:
        _probe(slide)  # through the backend, before any direct reader: OpenSlide's checks of damaged tiles
    except SlideError:
        slide.close()
        raise
    if direct_decode:
        slide.attach_direct_reader()
    return slide


def level_for_mpp(slide: Slide, mpp: float) -> int:
    """The pyramid level to read for a target resolution: the coarsest level not coarser than ``mpp``.

    A level up to 1 % coarser than the target still counts. Level 0 when every level is coarser.
    """
    return _level_for_downsample(slide, mpp / slide.mpp)


def source_pixels(slide: Slide, downsample: float,
                  region: tuple[int, int, int, int] | None = None) -> tuple[int, int]:
    """(level, pixels of it decoded) when reading ``region`` at ``downsample`` (level-0 px per output px).

    ``region`` is (x, y, width, height) in level-0 pixels, the whole slide when None. For a slide without a
    level near the target (a flat TIFF) this is the level-0 area: the figure to check against a pixel limit
    *before* reading, because decoding, not the output, is what costs time (and memory for huge strips).
    """
    level = _level_for_downsample(slide, downsample)
    level_downsample = slide.level_downsamples[level]
    _, _, width, height = region or (0, 0, *slide.level_dimensions[0])
    return level, math.ceil(width / level_downsample) * math.ceil(height / level_downsample)


def describe_level(slide: Slide, level: int) -> str:
    """A level for messages: "level 0 of 1 (100000x100000 px, 0.25 µm/px)"; flat files show as 1 level."""
    width, height = slide.level_dimensions[level]
    mpp = slide.mpp_or_none
    at = f", {mpp * slide.level_downsamples[level]:.3g} µm/px" if mpp is not None else ""
    return f"level {level} of {slide.level_count} ({width}x{height} px{at})"


def size_at_mpp(width: int, height: int, slide_mpp: float, mpp: float) -> tuple[int, int]:
    """(width, height) in pixels at ``mpp`` of a level-0 region of ``width``×``height`` at ``slide_mpp``."""
    scale = slide_mpp / mpp
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_region_at_mpp(
    slide: Slide,
    mpp: float = 2.0,
    region: tuple[int, int, int, int] | None = None,
    *,
    out: np.ndarray | None = None,
    tile: int = 2048,
    progress: ProgressCallback | None = None,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Read ``region`` of the slide resampled to ``mpp`` microns per pixel.

    Args:
        slide: an open slide with known MPP.
        mpp: the target resolution (2.0 µm/px is about 5x).
        region: (x, y, width, height) in level-0 pixels; None for the whole slide. Parts outside
            the slide are white.
        out: a uint8 array or ``np.memmap`` of shape (out_height, out_width, 3) to fill; allocated
            when None. ``out_width = round(width * slide.mpp / mpp)``, likewise the height.
        tile: edge of the tiles read from the slide, in pixels of the level read.
        progress: called as ``progress(rows_done, rows_total)`` after each band of output rows.
        window: (top, left, height, width) in output pixels: return only this window of the whole
            output, bit-identical to ``whole[top:top+height, left:left+width]``, reading only the
            source pixels it needs (``out`` then has the window's shape). None for the whole output.

    Returns:
        ``out``, filled. Peak memory is the output plus about one band of source rows.
    """
    if not mpp > 0:
        raise ValueError(f"target mpp must be positive, got {mpp}")
    region = region or (0, 0, *slide.level_dimensions[0])
    out_size = size_at_mpp(region[2], region[3], slide.mpp, mpp)
    return _resample(slide, region, out_size, level_for_mpp(slide, mpp), out, tile, progress, window)


def read_region_downsampled(
    slide: Slide,
    downsample: float,
    region: tuple[int, int, int, int] | None = None,
    *,
    out: np.ndarray | None = None,
    tile: int = 2048,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Like :func:`read_region_at_mpp`, for a factor relative to level 0 (works without MPP).

    The output is ``round(width / downsample)`` × ``round(height / downsample)`` pixels.
    """
    if not downsample > 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    region = region or (0, 0, *slide.level_dimensions[0])
    out_size = (max(1, round(region[2] / downsample)), max(1, round(region[3] / downsample)))
    return _resample(slide, region, out_size, _level_for_downsample(slide, downsample), out, tile, progress)


# --- resampling ------------------------------------------------------------------------------


def _level_for_downsample(slide: Slide, downsample: float) -> int:
    """The level with the largest downsample that is at most ``downsample`` (within the tolerance)."""
    limit = downsample * (1 + LEVEL_TOLERANCE)
    candidates = [lv for lv, d in enumerate(slide.level_downsamples) if d <= limit]
    return max(candidates, key=lambda lv: slide.level_downsamples[lv], default=0)


def _resample(
    slide: Slide,
    region: tuple[int, int, int, int],
    out_size: tuple[int, int],
    level: int,
    out: np.ndarray | None,
    tile: int,
    progress: ProgressCallback | None,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Resize ``region`` (level-0 px) of ``level`` to ``out_size`` (w, h), band by band into ``out``.

    With ``window`` (top, left, height, width), only that part of the output is computed. The filter
    taps of every output pixel are computed in one frame anchored at the whole region's first source
    pixel, whatever band or window is being read, so bands and windows stitch bit-identically.
    """
    x, y, width, height = region
    if width <= 0 or height <= 0:
        raise ValueError(f"region size must be positive, got {width}x{height}")
    out_w, out_h = out_size
    top, left, win_h, win_w = window or (0, 0, out_h, out_w)
    if win_h <= 0 or win_w <= 0 or top < 0 or left < 0 or top + win_h > out_h or left + win_w > out_w:
        raise ValueError(f"window {window} (top, left, height, width) is not inside the {out_h}x{out_w} output")
    if out is None:
        out = np.empty((win_h, win_w, 3), np.uint8)
    elif out.shape != (win_h, win_w, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {(win_h, win_w, 3)}, got {out.dtype} {out.shape}")

    # The region in (fractional) pixels of the level read, and source pixels per output pixel.
    downsample = slide.level_downsamples[level]
    src_x, src_y = x / downsample, y / downsample
    step_x, step_y = width / downsample / out_w, height / downsample / out_h
    margin = 2  # source pixels beyond the region in the frame: room for the interpolation taps when enlarging
    col_origin, row_origin = math.floor(src_x) - margin, math.floor(src_y) - margin
    frame_cols = math.ceil(src_x + out_w * step_x) + margin - col_origin
    frame_rows = math.ceil(src_y + out_h * step_y) + margin - row_origin

    col_index, col_weight = _filter_taps(src_x - col_origin, step_x, np.arange(left, left + win_w), frame_cols)
    col0 = int(col_index.min())  # read only the source columns this window's taps touch
    cols = int(col_index.max()) + 1 - col0
    col_index = col_index - col0
    col_block = _block_step(col_index, col_weight)
    rows_per_band = max(64, min(tile, BAND_BYTES // (3 * cols)))  # source rows read per band
    out_rows_per_band = max(1, math.floor(rows_per_band / step_y))

    def resample_band(r0: int) -> int:
        r1 = min(r0 + out_rows_per_band, top + win_h)
        row_index, row_weight = _filter_taps(src_y - row_origin, step_y, np.arange(r0, r1), frame_rows)
        row0 = int(row_index.min())
        band = _read_band(slide, level, col_origin + col0, row_origin + row0,
                          int(row_index.max()) + 1 - row0, cols, tile)
        row_block = _block_step(row_index - row0, row_weight)
        if col_block and row_block:
            out[r0 - top : r1 - top] = _block_average(band, row_block, col_block)
            return r1 - r0
        # Separable: resample the columns of the band, then its rows.
        narrow = _apply_taps(band, col_index, col_weight, axis=1)
        rows_done = _apply_taps(narrow, row_index - row0, row_weight, axis=0)
        out[r0 - top : r1 - top] = np.clip(rows_done + 0.5, 0, 255).astype(np.uint8)
        return r1 - r0

    starts = range(top, top + win_h, out_rows_per_band)
    # Bands are independent and write disjoint rows. OpenSlide decodes and numpy resamples without holding
    # the GIL, so threads overlap them (about 2× on 2 cores); at most `threads` bands are in memory at once.
    threads = read_threads(slide) if len(starts) > 1 else 1
    done = 0
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        for rows in (pool.map(resample_band, starts) if pool is not None else map(resample_band, starts)):
            done += rows
            if progress is not None:
                progress(done, win_h)
    return out


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a SLURM job's share, not the whole node)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cores_between(processes: int) -> None:
    """In one of ``processes`` worker processes reading slides side by side: read each slide with this process's
    share of the cores, not all of them (the workers would otherwise oversubscribe the machine)."""
    global MAX_READ_THREADS
    MAX_READ_THREADS = max(1, min(MAX_READ_THREADS, usable_cores() // max(1, processes)))


def read_threads(slide: Slide) -> int:
    """Threads that read bands of one slide at once: one per usable core, at most :data:`MAX_READ_THREADS`, with
    OpenSlide, whose handles are thread-safe; 1 with tiffslide."""
    return min(MAX_READ_THREADS, usable_cores()) if slide.backend == "openslide" else 1


def _filter_taps(
    start: float, step: float, out_index: np.ndarray, n_source: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source pixels and weights, (n, taps) each, for output pixels ``out_index`` along one axis.

    Output pixel ``j`` covers the source interval ``[start + j*step, start + (j+1)*step)``. When
    shrinking (``step >= 1``) its value is the exact area average over that interval, partly
    covered source pixels weighted by the covered fraction. When enlarging, it is the linear
    interpolation between the two source pixel centres around the interval's centre. Both are
    continuous in the interval's position, so bands and whole-region resizes agree to rounding.
    """
    if step >= 1:
        low = start + out_index * step
        high = low + step
        index = np.floor(low).astype(np.int64)[:, None] + np.arange(math.ceil(step) + 1)
        weight = np.clip(np.minimum(index + 1, high[:, None]) - np.maximum(index, low[:, None]), 0, None)
    else:
        centre = start + (out_index + 0.5) * step - 0.5  # in source pixel-centre coordinates
        first = np.floor(centre)
        index = first.astype(np.int64)[:, None] + np.arange(2)
        weight = np.stack([1 - (centre - first), centre - first], axis=1)
    weight /= weight.sum(axis=1, keepdims=True)
    used = weight.any(axis=0)  # e.g. the spare last tap of an integer step: skip its work
    # Taps past the buffer only ever carry zero weight; clip them so indexing stays valid.
    return np.clip(index[:, used], 0, n_source - 1), weight[:, used].astype(np.float32)


def _apply_taps(image: np.ndarray, index: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """Weighted sum over taps along ``axis`` (0 = rows, 1 = columns) of an (H, W, 3) image; float32."""
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    result = np.take(image, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
    for tap in range(1, index.shape[1]):
        result += np.take(image, index[:, tap], axis=axis) * weight[:, tap].reshape(shape)
    return result


def block_averaged(region_start: tuple[float, float], steps: tuple[float, float]) -> bool:
    """Whether a read whose region starts at ``region_start`` (x, y in pixels of the level read) with ``steps``
    (source px per output px along x, y) is resampled by integer block averaging (:func:`_block_average`): both
    steps 2, 4 or 8 and the start on whole pixels. For memory estimates; the resampler decides from its taps."""
    return all(step in BLOCK_STEPS and float(start).is_integer()
               for start, step in zip(region_start, steps, strict=True))


def _block_step(index: np.ndarray, weight: np.ndarray) -> int:
    """``k`` when the taps average disjoint, consecutive blocks of ``k`` source pixels from pixel 0 with
    ``k`` a power of two up to 8 (the usual SVS case: 2 source px per output px), else 0.

    For such steps the float taps' sums are exact in float32 (every weight is 1/k), so the integer block average
    of :func:`_block_average` gives bit for bit what :func:`_apply_taps` does, 2–3× faster.
    """
    k = index.shape[1]
    if k not in BLOCK_STEPS or not np.all(weight == np.float32(1 / k)):
        return 0
    expected = np.arange(index.shape[0])[:, None] * k + np.arange(k)
    return k if np.array_equal(index, expected) else 0


def _block_average(band: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """uint8 mean of each ``rows``×``cols`` block of ``band`` (its leading blocks), rounded half up."""
    out_h, out_w = band.shape[0] // rows, band.shape[1] // cols
    # Strided slices added pairwise, rows then columns: far faster in numpy than a reshape and a sum over axes.
    by_rows = band[0 : out_h * rows : rows].astype(np.uint16)
    for i in range(1, rows):
        by_rows += band[i : out_h * rows : rows]
    total = by_rows[:, 0 : out_w * cols : cols].copy()
    for j in range(1, cols):
        total += by_rows[:, j : out_w * cols : cols]  # at most 64 × 255: fits in uint16
    count = rows * cols
    return ((total + count // 2) // count).astype(np.uint8)


def _read_band(slide: Slide, level: int, lx: int, ly: int, height: int, width: int, tile: int) -> np.ndarray:
    """Read a band of the level as tiles ``tile`` pixels wide (never one huge read)."""
    band = np.empty((height, width, 3), np.uint8)
    for tx in range(0, width, tile):
        tw = min(tile, width - tx)
        band[:, tx : tx + tw] = slide._read_level(level, lx + tx, ly, tw, height)
    return band


# --- opening and checking files --------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Fail early, with a plain cause, on paths no backend can open (OpenSlide says only 'unsupported')."""
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a directory")
    if not os.access(path, os.R_OK):
        raise SlideError(path, "permission denied")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) in _TIFF_MAGICS


def _open_with_tiffslide(path: Path, assume_mpp: float | None, failures: list[str]) -> Slide | None:
    """Open with tiffslide; None (and the reason appended to ``failures``) if it cannot.

    tifffile skips pages it cannot reach (a file cut short) and only logs it, and the JPEG decoder
    fills a tile cut short with grey; both are turned into a "truncated or corrupt" SlideError here.
    """
    with _tifffile_errors() as logged:
        try:
            handle = tiffslide.TiffSlide(path)
            slide = Slide(path, handle, "tiffslide", assume_mpp)  # reads the page tables
        except _READ_ERRORS as error:
            failures.append(f"tiffslide: {_describe(error)}")
            return None
        try:
            problem = f"truncated or corrupt: {logged[0]}" if logged else _page_problem(path)
        except _READ_ERRORS as error:
            problem = f"truncated or corrupt: {_describe(error)}"
    if problem:
        slide.close()
        raise SlideError(path, problem)
    return slide


def _page_problem(path: Path) -> str | None:
    """The first TIFF page whose data runs past the end of the file, or that is a decompression bomb.

    tiffslide decodes a whole strip or tile to read any pixel of it: a page stored as one huge compressed
    strip (a few kB of file can hold gigabytes of pixels) is refused before anything is decoded.
    """
    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        for index, page in enumerate(tif.pages):
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True) if n]
            if ends and max(ends) > size:
                return (f"truncated or corrupt: image data of page {index} ends at byte {max(ends)}, "
                        f"past the end of the file ({size} bytes)")
            rows, cols = ((page.tilelength, page.tilewidth) if page.is_tiled
                          else (min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth))
            chunk = rows * cols * page.samplesperpixel * max(page.bitspersample, 8) // 8
            if chunk > MAX_CHUNK_BYTES:
                kind = "tile" if page.is_tiled else "strip"
                return (f"refused (decompression-bomb guard): page {index} ({page.imagewidth}x{page.imagelength} "
                        f"px) is stored in {kind}s of {cols}x{rows} px, {chunk / 2**20:,.0f} MiB each to decode "
                        f"(limit {MAX_CHUNK_BYTES / 2**20:.0f} MiB); convert it to a tiled pyramid, e.g. with "
                        "`vips tiffsave --tile --pyramid`")
    return None


@contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect the error messages tifffile logs (instead of printing them) while the block runs."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # Drop tifffile's "<tifffile.TiffPages @16> " object prefix: it means nothing to a user.
            messages.append("tifffile: " + re.sub(r"^<[^>]*>\s*", "", record.getMessage()))

    logger = logging.getLogger("tifffile")
    handler = Collect(logging.ERROR)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _probe(slide: Slide) -> None:
    """Decode the last tile of every level: a cheap read that fails at open for truncated files.

    TIFF-based slides store tiles level by level in row order, so a level's last tile is the
    furthest into the file of that level's data.
    """
    for level, (width, height) in enumerate(slide.level_dimensions):
        slide._read_level(level, width - 1, height - 1, 1, 1)


# --- small helpers ---------------------------------------------------------------------------


def _level0_coordinate(level_pixel: int, downsample: float) -> int:
    """The smallest level-0 coordinate that tiffslide maps to ``level_pixel`` of a level.

    tiffslide reads from level pixel ``int(coordinate / downsample)``; OpenSlide interpolates at the
    fractional position ``coordinate / downsample``, which for this coordinate is ``level_pixel``
    exactly when the downsample is an integer (and less than ``1 / downsample`` past it otherwise).
    """
    coordinate = round(level_pixel * downsample)
    while int(coordinate / downsample) < level_pixel:
        coordinate += 1
    while coordinate > 0 and int((coordinate - 1) / downsample) >= level_pixel:
        coordinate -= 1
    return coordinate


def _to_rgb(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Backend pixels (RGBA, RGB or grey) as uint8 RGB; transparent pixels composited onto white."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise SlideError(path, f"unsupported pixel layout {pixels.dtype} {pixels.shape[2:]} (need 8-bit RGB)")
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if pixels.shape[2] == 3:
        return pixels
    rgb, alpha = pixels[..., :3], pixels[..., 3:]
    if alpha.min() == 255:
        return rgb
    alpha = alpha.astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _str_or_none(value: object) -> str | None:
    return str(value) if value not in (None, "") else None
