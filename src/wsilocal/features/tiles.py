"""Tiles for the MIL baselines: a regular grid over the tissue, and reading one tile at a target resolution.

A tile is ``tile``×``tile`` pixels at ``mpp`` µm/px, i.e. a square of :func:`tile_size_level0` level-0 pixels
(``tile · mpp / slide_mpp``, rounded to whole pixels). Tiles sit side by side, without overlap, from the
top-left corner of the tissue bounding box; like CLAM, only tiles lying wholly inside the slide are used.

A tile is kept when at least ``min_tissue`` of it is tissue. That fraction is measured on the overview
tissue mask of :func:`wsilocal.slide.tissue.detect_tissue` (16 µm/px by default, so a 256-px tile at 2 µm/px
covers 32×32 mask pixels): the share of mask pixels whose centres fall inside the tile. Working on the
mask costs nothing per tile — no pixels are read to decide.
"""

from __future__ import annotations

import math

import numpy as np

from wsilocal.errors import SlideError
from wsilocal.slide.reader import Slide, read_region_at_mpp, size_at_mpp
from wsilocal.slide.tissue import TissueRegion


def tile_size_level0(slide: Slide, mpp: float, tile: int) -> int:
    """Edge in level-0 pixels of a ``tile``-px tile at ``mpp``: the whole number of pixels read for one tile.

    It is ``tile · mpp / slide_mpp`` rounded, which :func:`read_region_at_mpp` resamples to exactly ``tile``
    pixels. When the target is finer than the scan (enlarging), a neighbouring size may be needed for that.

    Raises:
        SlideError: the slide has no MPP, or no whole number of level-0 pixels gives ``tile`` pixels.
    """
    exact = tile * mpp / slide.mpp
    for size in sorted({max(1, round(exact)), max(1, math.floor(exact)), math.ceil(exact)},
                       key=lambda s: abs(s - exact)):
        if size_at_mpp(size, size, slide.mpp, mpp) == (tile, tile):
            return size
    raise SlideError(slide.path, f"cannot read {tile}-px tiles at {mpp} µm/px from a slide scanned at "
                                 f"{slide.mpp:.4g} µm/px (no whole number of slide pixels gives {tile} px)")


def tile_grid(
    slide: Slide, tissue: TissueRegion, mpp: float, tile: int, min_tissue: float = 0.25
) -> list[tuple[int, int]]:
    """Level-0 (x, y) of the grid tiles over the tissue box with at least ``min_tissue`` tissue, row by row.

    Args:
        slide: the open slide (its MPP and level-0 size are used).
        tissue: the slide's tissue region (box and overview mask), from ``detect_tissue``.
        mpp: resolution of the tiles in µm/px (2.0 ≈ 5x).
        tile: tile edge in pixels at ``mpp``.
        min_tissue: minimum tissue fraction of a kept tile, in [0, 1], measured on the overview mask.
    """
    size = tile_size_level0(slide, mpp, tile)
    width, height = slide.level_dimensions[0]
    bx, by, bw, bh = tissue.bbox
    # Tiles start inside the box and lie wholly inside the slide (CLAM's rule: no padded tiles).
    xs = np.arange(bx, min(bx + bw, width - size + 1), size)
    ys = np.arange(by, min(by + bh, height - size + 1), size)
    if xs.size == 0 or ys.size == 0:
        return []
    fraction = _tissue_fractions(tissue.mask, (width, height), xs, ys, size)
    rows, cols = np.nonzero(fraction >= min_tissue)
    return [(int(xs[c]), int(ys[r])) for r, c in zip(rows, cols, strict=True)]


def read_tile(slide: Slide, xy: tuple[int, int], mpp: float, tile: int) -> np.ndarray:
    """The tile whose top-left corner is level-0 pixel ``xy``: uint8 RGB (tile, tile, 3) at ``mpp``."""
    size = tile_size_level0(slide, mpp, tile)
    return read_region_at_mpp(slide, mpp, (int(xy[0]), int(xy[1]), size, size))


def _tissue_fractions(
    mask: np.ndarray, slide_size: tuple[int, int], xs: np.ndarray, ys: np.ndarray, size: int
) -> np.ndarray:
    """Tissue fraction of every grid tile, (len(ys), len(xs)): mask pixels whose centre lies in the tile.

    Uses a summed-area table, so the cost does not depend on the tile size. A tile smaller than a mask
    pixel contains no pixel centre; it takes the value of the mask pixel under its centre.
    """
    scale_x, scale_y = slide_size[0] / mask.shape[1], slide_size[1] / mask.shape[0]
    # Mask pixel j has its centre at (j + 0.5)·scale; it lies in [start, end) for j in [first, stop).
    cols0, cols1 = _centre_range(xs, size, scale_x, mask.shape[1])
    rows0, rows1 = _centre_range(ys, size, scale_y, mask.shape[0])
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    r0, r1, c0, c1 = rows0[:, None], rows1[:, None], cols0[None, :], cols1[None, :]
    count = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return count / ((r1 - r0) * (c1 - c0))


def _centre_range(starts: np.ndarray, size: int, scale: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """[first, stop) of the mask pixels (along one axis) whose centres fall in [start, start + size)."""
    first = np.ceil(starts / scale - 0.5).astype(np.int64)
    stop = np.ceil((starts + size) / scale - 0.5).astype(np.int64)
    centre = np.floor((starts + size / 2) / scale).astype(np.int64)
    empty = stop <= first
    first, stop = np.where(empty, centre, first), np.where(empty, centre + 1, stop)
    return np.clip(first, 0, n - 1), np.clip(stop, 1, n)
