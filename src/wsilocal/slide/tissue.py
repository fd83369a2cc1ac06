"""Find the tissue on a slide: a mask on a low-resolution overview, and its bounding box.

H&E-stained tissue is coloured (pink eosin, purple haematoxylin) while glass is white or grey, so
the detector thresholds colour saturation (the S of HSV) with Otsu's method, guarded so that a
blank slide yields nothing, then cleans the mask with morphology. The bounding box crops the slide
for training and prediction. The mask, carried onto the pixels of the cropped image
(:class:`ImageTissueMask`, :func:`image_tissue_mask`), tells the attention pools which map positions
are glass (``mask_glass``); it is also kept for thumbnails and reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from wsilocal.errors import SlideError
from wsilocal.slide.reader import (
    DEFAULT_MAX_PIXELS,
    Slide,
    describe_level,
    read_region_at_mpp,
    read_region_downsampled,
    source_pixels,
)

#: For a slide without MPP the overview is taken as if it were scanned at 40x (0.25 µm/px), the
#: common case. Only the overview's resolution depends on it, never the bounding box's coordinates.
FALLBACK_MPP = 0.25
#: Largest overview accepted: 64 Mpx at 16 µm/px is 128 mm square, far beyond any glass slide.
OVERVIEW_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class TissueRegion:
    """Where the tissue is.

    Attributes:
        mask: tissue pixels of the overview (bool, overview resolution).
        downsample: level-0 pixels per mask pixel.
        bbox: (x, y, width, height) of the tissue in level-0 pixels, with a margin, inside the slide.
        tissue_fraction: tissue pixels / all pixels of the overview.
    """

    mask: np.ndarray
    downsample: float
    bbox: tuple[int, int, int, int]
    tissue_fraction: float


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(p)  # share of values in bins 0..k
    mean_low = np.cumsum(p * centres)  # their (unnormalised) mean
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_low[-1] * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    min_saturation: float = 0.07,
    max_saturation_cut: float = 0.2,
    max_brightness: float = 0.92,
    radius: int = 2,
    min_object_fraction: float = 0.001,
) -> np.ndarray:
    """Tissue mask of a low-resolution H&E RGB image (uint8, (H, W, 3)) as a bool (H, W) array.

    A pixel is tissue when its saturation exceeds the Otsu threshold — clipped to
    [``min_saturation``, ``max_saturation_cut``] so that a blank slide (only noise) finds nothing
    and a slide covered in tissue is not split in two — and its mean brightness is at most
    ``max_brightness``; near-black pixels (scanner padding) are background. The mask is then
    closed and opened with a disk of ``radius`` pixels, its holes are filled, and objects smaller
    than ``min_object_fraction`` of the image are dropped.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    pixels = rgb.astype(np.float32) / 255
    value = pixels.max(axis=2)
    saturation = (value - pixels.min(axis=2)) / np.maximum(value, 1e-6)
    brightness = pixels.mean(axis=2)
    candidate = value > 0.12  # pure black is scanner padding, never tissue

    if not candidate.any():
        return np.zeros(rgb.shape[:2], bool)
    cut = min(max(otsu_threshold(saturation[candidate]), min_saturation), max_saturation_cut)
    mask = candidate & (saturation > cut) & (brightness <= max_brightness)

    disk = _disk(radius)
    # Pad so that closing does not erode tissue touching the image border.
    mask = np.pad(mask, radius + 1)
    mask = ndimage.binary_opening(ndimage.binary_closing(mask, disk), disk)
    mask = ndimage.binary_fill_holes(mask)[radius + 1 : -radius - 1, radius + 1 : -radius - 1]
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, min_object_fraction * mask.size)
        keep[0] = False  # label 0 is the background
        mask = keep[labels]
    return mask


def read_overview(slide: Slide, mpp: float = 16.0, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, float]:
    """A low-resolution RGB view of the whole slide and its downsample (level-0 px per view px).

    At ``mpp`` microns per pixel when the slide's MPP is known; otherwise at the downsample
    ``mpp / FALLBACK_MPP`` from the pyramid levels, so slides without MPP work too.

    Raises:
        SlideError: before reading, when the overview would exceed ``OVERVIEW_MAX_PIXELS`` (no real slide
            comes near it) or producing it means decoding more than ``max_pixels`` pixels (a slide without
            a pyramid level near ``mpp``, e.g. a huge flat TIFF).
    """
    slide_mpp = slide.mpp_or_none if slide.mpp_or_none is not None else FALLBACK_MPP
    downsample = mpp / slide_mpp
    width, height = slide.level_dimensions[0]
    out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
    if out_w * out_h > OVERVIEW_MAX_PIXELS:
        assumed = " (assumed)" if slide.mpp_or_none is None else ""
        raise SlideError(slide.path, f"implausibly large: {width}x{height} px at {slide_mpp:g} µm/px{assumed} would "
                                     f"make a {out_w}x{out_h} px overview at {mpp:g} µm/px (limit "
                                     f"{OVERVIEW_MAX_PIXELS:,} px)")
    level, decoded = source_pixels(slide, downsample)
    if decoded > max_pixels:
        raise SlideError(slide.path, f"finding the tissue on a {mpp:g} µm/px overview means decoding {decoded:,} px "
                                     f"of {describe_level(slide, level)}, above the limit of {max_pixels:,} px")
    if slide.mpp_or_none is not None:
        view = read_region_at_mpp(slide, mpp)
    else:
        view = read_region_downsampled(slide, downsample)
    return view, (width / view.shape[1] + height / view.shape[0]) / 2


def tissue_region_from_overview(
    overview: np.ndarray, downsample: float, slide_size: tuple[int, int], *, margin: float = 0.05
) -> TissueRegion | None:
    """The tissue region of an overview (see :func:`read_overview`), or None if it shows no tissue.

    The box is that of the mask plus one overview pixel, widened on every side by ``margin`` times
    its width / height, and clipped to the slide of size ``slide_size`` = (width, height) in level-0
    pixels.
    """
    mask = tissue_mask_from_rgb(overview)
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    width, height = slide_size
    scale_x, scale_y = width / mask.shape[1], height / mask.shape[0]
    # One overview pixel more on every side: a pixel only partly covered by tissue can miss the cut.
    x0, x1 = (cols[0] - 1) * scale_x, (cols[-1] + 2) * scale_x
    y0, y1 = (rows[0] - 1) * scale_y, (rows[-1] + 2) * scale_y
    pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(0, math.floor(x0 - pad_x)), max(0, math.floor(y0 - pad_y))
    right, bottom = min(width, math.ceil(x1 + pad_x)), min(height, math.ceil(y1 + pad_y))
    return TissueRegion(mask, downsample, (left, top, right - left, bottom - top), float(mask.mean()))


def detect_tissue(slide: Slide, *, mask_mpp: float = 16.0, margin: float = 0.05,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> TissueRegion:
    """Detect the tissue of ``slide`` on an overview at ``mask_mpp`` µm/px.

    Raises:
        SlideError: the slide shows no tissue, or its overview is too large to read (see :func:`read_overview`).
    """
    overview, downsample = read_overview(slide, mask_mpp, max_pixels)
    region = tissue_region_from_overview(overview, downsample, slide.level_dimensions[0], margin=margin)
    if region is None:
        raise SlideError(slide.path, f"no tissue found (nothing coloured like stained tissue on the "
                                     f"{overview.shape[1]}x{overview.shape[0]} px overview)")
    return region


@dataclass(frozen=True)
class ImageTissueMask:
    """Which pixels of an image made from a slide region are tissue: pixel (y, x) is tissue when
    ``overview[rows[y], cols[x]]``.

    The image's pixel mask is the overview's tissue mask sampled at each pixel's centre, so it is separable into
    a row and a column index; it stays so under crops, flips and 90° rotations (the training augmentations), and
    it costs one index per row and column of the image instead of one byte per pixel.

    Attributes:
        overview: bool (h, w), the part of the overview's tissue mask the image covers.
        rows: int (H,), the overview row of each image row.
        cols: int (W,), the overview column of each image column.
    """

    overview: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return len(self.rows), len(self.cols)

    def pixels(self) -> np.ndarray:
        """The bool (H, W) pixel mask (large for a whole slide: for tests and small images)."""
        return self.overview[np.ix_(self.rows, self.cols)]

    def crop(self, top: int, bottom: int, left: int, right: int) -> ImageTissueMask:
        """The mask of ``image[top : H - bottom, left : W - right]``."""
        height, width = self.shape
        return ImageTissueMask(self.overview, self.rows[top : height - bottom], self.cols[left : width - right])

    def flip(self, axis: int) -> ImageTissueMask:
        """The mask of the image flipped along ``axis`` (0: upside down, 1: left to right)."""
        if axis == 0:
            return ImageTissueMask(self.overview, self.rows[::-1], self.cols)
        return ImageTissueMask(self.overview, self.rows, self.cols[::-1])

    def rot90(self, k: int) -> ImageTissueMask:
        """The mask of ``np.rot90(image, k)`` (anticlockwise quarter turns)."""
        mask = self
        for _ in range(k % 4):  # rot90(a)[i, j] = a[j, W-1-i]
            mask = ImageTissueMask(mask.overview.T, mask.cols[::-1], mask.rows)
        return mask

    def grid(self, stride: int, offset: int, shape: tuple[int, int]) -> np.ndarray:
        """Which positions of a map of ``shape`` (h, w) over the image are tissue: bool (h, w).

        Position ``o`` of an axis stands for the image pixels ``[o·stride + offset, (o+1)·stride + offset)``,
        the first and last position extended to the image's edges, so the cells tile the image; a position is
        tissue when its cell holds any tissue pixel. An image without tissue gives every position (nothing
        would be left to attend to).
        """
        rows = _cell_members(self.rows, stride, offset, shape[0], self.overview.shape[0])
        cols = _cell_members(self.cols, stride, offset, shape[1], self.overview.shape[1])
        # Tissue pixels per cell, counted exactly (float64 holds integers far beyond any slide's pixel count).
        counts = rows @ self.overview.astype(np.float64) @ cols.T
        positions = counts > 0
        return positions if positions.any() else np.ones(shape, bool)


def _cell_members(index: np.ndarray, stride: int, offset: int, n_cells: int, n_overview: int) -> np.ndarray:
    """float (n_cells, n_overview): 1 where some pixel of the cell samples that overview row (or column)."""
    edges = np.clip(np.arange(1, n_cells) * stride + offset, 0, len(index))
    cell = np.searchsorted(edges, np.arange(len(index)), side="right")  # the cell of each image pixel
    members = np.zeros((n_cells, n_overview))
    members[cell, index] = 1.0
    return members


def image_tissue_mask(region: TissueRegion, slide_size: tuple[int, int],
                      image_size: tuple[int, int]) -> ImageTissueMask:
    """The tissue mask of the image of ``region.bbox`` read at ``image_size`` = (width, height) px, from the
    region's overview mask; ``slide_size`` = (width, height) of the slide in level-0 pixels.

    Each image pixel takes the overview pixel under its centre. The 5x cache (``wsilocal prepare``) and
    prediction from the slide file both call this with what :func:`detect_tissue` gave them, so a slide gets the
    same mask on both paths.
    """
    x, y, w, h = region.bbox
    out_w, out_h = image_size
    mask_h, mask_w = region.mask.shape

    def index(start: int, extent: int, n: int, slide_extent: int, n_mask: int) -> np.ndarray:
        centres = start + (np.arange(n, dtype=np.float64) + 0.5) * (extent / n)  # level-0 px
        return np.clip(np.floor(centres * (n_mask / slide_extent)).astype(np.int64), 0, n_mask - 1)

    rows = index(y, h, out_h, slide_size[1], mask_h)
    cols = index(x, w, out_w, slide_size[0], mask_w)
    # Keep only the overview's part under the image: a few hundred bytes per slide instead of the whole mask.
    r0, c0 = int(rows.min()), int(cols.min())
    overview = np.ascontiguousarray(region.mask[r0 : int(rows.max()) + 1, c0 : int(cols.max()) + 1])
    return ImageTissueMask(overview, (rows - r0).astype(np.int32), (cols - c0).astype(np.int32))


def _disk(radius: int) -> np.ndarray:
    """A disk-shaped structuring element of the given radius (a single pixel for radius 0)."""
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius
