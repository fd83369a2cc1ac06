"""Where the trunk's input comes from: the whole image at the target MPP, read one window at a time.

An :class:`ImageSource` hands out normalised windows of an image it may never hold whole. Two kinds:
:class:`ArraySource` over pixels already in memory or memory-mapped (a cache entry), and
:class:`SlideSource`, which reads each window straight from the slide file, resampled exactly as the
cache would have been (see :func:`wsilocal.slide.reader.read_region_at_mpp`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from wsilocal.slide.reader import (
    BAND_BYTES,
    Slide,
    block_averaged,
    level_for_mpp,
    read_region_at_mpp,
    read_threads,
    size_at_mpp,
)

#: Output columns of a slide window resampled at once (:meth:`SlideSource.read`). The resampler's float32
#: intermediates are about 5× the float32 window it makes (at 2 source px per output px), so one full-width band
#: of a 10k-px-wide slide would hold hundreds of MB; in 1024-column pieces they stay under ~30 MB a band.
READ_COLUMNS = 1024
#: The resampler's default tile edge (``read_region_at_mpp(tile=...)``): it caps the source rows of a band and
#: the width of a piece decoded at once.
_RESAMPLE_TILE = 2048
#: OpenSlide's tile cache per open slide (its default, 32 MiB), full after the first reads.
TILE_CACHE_BYTES = 32 * 2**20


def to_tensor(image: np.ndarray, mean: list[float], std: list[float], *, copy: bool = True) -> torch.Tensor:
    """uint8 (H, W, 3) → normalised float32 (1, 3, H, W). ``copy=False`` for a private, writable array (no copy
    is then made of it)."""
    # A private, writable copy of the (memory-mapped) pixels, unless the caller's array is already one.
    x = torch.from_numpy(np.array(image, copy=True) if copy else image)
    x = x.permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    # In place: the same values as (x - mean) / std, without two more float32 copies of the window (a reader
    # thread's band of a wide slide is tens of MB).
    return x.sub_(mean_t).div_(std_t).unsqueeze(0)


class ImageSource(Protocol):
    """An image of ``height``×``width`` pixels at the target MPP, read window by window."""

    height: int
    width: int

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The window as a normalised float32 tensor (1, 3, height, width); it lies inside the image."""
        ...


def read_bytes(source: ImageSource | None, height: int, width: int) -> int:
    """Bytes that reading a ``height``×``width`` window of ``source`` holds at its peak, the float32 window
    returned included: the source's own ``read_bytes`` where it has one, else (or with no ``source``) what
    :class:`ArraySource` takes."""
    if hasattr(source, "read_bytes"):
        return int(source.read_bytes(height, width))
    return _normalise_bytes(height, width)


def _normalise_bytes(height: int, width: int) -> int:
    """Peak bytes of :func:`to_tensor` on a ``height``×``width`` window: its uint8 copy beside the float32 one."""
    return 3 * height * width * (1 + 4)


def _check_window(source: ImageSource, top: int, left: int, height: int, width: int) -> None:
    if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > source.height \
            or left + width > source.width:
        raise ValueError(f"window (top={top}, left={left}, height={height}, width={width}) is not inside "
                         f"the {source.height}x{source.width} image")


class ArraySource:
    """An in-memory or memory-mapped uint8 (H, W, 3) image, normalised with ``mean``/``std`` on read."""

    def __init__(self, image: np.ndarray, mean: Sequence[float], std: Sequence[float]):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        self.image = image
        self.height, self.width = int(image.shape[0]), int(image.shape[1])
        self.mean, self.std = list(mean), list(std)

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """Window (1, 3, height, width), normalised as :func:`to_tensor`."""
        _check_window(self, top, left, height, width)
        return to_tensor(self.image[top : top + height, left : left + width], self.mean, self.std)

    def read_bytes(self, height: int, width: int) -> int:
        """Peak bytes of :meth:`read` of a ``height``×``width`` window: its uint8 copy beside the float32 one."""
        return _normalise_bytes(height, width)


class SlideSource:
    """A level-0 ``region`` (x, y, w, h) of an open slide at ``mpp`` µm/px, read from the file per window.

    The image is ``size_at_mpp(w, h)`` pixels; every window is bit-identical to the same window of
    ``read_region_at_mpp(slide, mpp, region)`` (what the cache stores) and only its source pixels are read.
    """

    def __init__(self, slide: Slide, mpp: float, region: tuple[int, int, int, int],
                 mean: Sequence[float], std: Sequence[float]):
        self.slide, self.mpp, self.region = slide, float(mpp), tuple(int(v) for v in region)
        self.width, self.height = size_at_mpp(region[2], region[3], slide.mpp, mpp)
        self.mean, self.std = list(mean), list(std)

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """Window (1, 3, height, width), read from the slide and normalised.

        Resampled :data:`READ_COLUMNS` output columns at a time into one array (windows of the resampler stitch
        bit-identically), so that its float intermediates do not grow with the slide's width.
        """
        _check_window(self, top, left, height, width)
        pixels = np.empty((height, width, 3), np.uint8)
        for c0 in range(0, width, READ_COLUMNS):
            c1 = min(width, c0 + READ_COLUMNS)
            read_region_at_mpp(self.slide, self.mpp, self.region, window=(top, left + c0, height, c1 - c0),
                               out=pixels[:, c0:c1])
        return to_tensor(pixels, self.mean, self.std, copy=False)

    def read_bytes(self, height: int, width: int) -> int:
        """Peak bytes of :meth:`read` of a ``height``×``width`` window (an estimate): the uint8 window, beside the
        work on one piece of :data:`READ_COLUMNS` columns — per band of source rows (up to one band per read
        thread at once) the source band, what decoding it holds (:meth:`decode_bytes`) and the resampler's
        larger pass: its column pass (a float32 result, a uint8 gather and its float32 product per tap) or its
        row pass (the column pass's result beside a float32 result, gather and product per output row), or for
        an aligned power-of-two step the integer block average's uint16 sums (:func:`block_averaged`) — or,
        after it, the float32 window; and the slide's tile cache.
        """
        return self._read_bytes(height, width, decoding=True)

    def decode_bytes(self, height: int, width: int) -> int:
        """The part of :meth:`read_bytes` outside numpy: OpenSlide's tile cache (full after the first reads), and
        per band being read one tile-wide piece decoded (OpenSlide's ARGB buffer, Pillow's image and numpy's
        copy of it: 12 bytes per source pixel)."""
        return self._read_bytes(height, width, decoding=True) - self._read_bytes(height, width, decoding=False)

    def _read_bytes(self, height: int, width: int, *, decoding: bool) -> int:
        level = level_for_mpp(self.slide, self.mpp)
        downsample = self.slide.level_downsamples[level]
        step_x = self.region[2] / downsample / self.width  # source px per output px
        step_y = self.region[3] / downsample / self.height
        piece = min(width, READ_COLUMNS)
        taps = 2 + math.ceil(max(step_x, step_y))
        cols = math.ceil(piece * step_x) + taps
        rows_per_band = max(64, min(_RESAMPLE_TILE, BAND_BYTES // (3 * cols)))
        out_rows = max(1, math.floor(rows_per_band / step_y))
        bands = -(-height // out_rows)
        band_rows = min(height, out_rows)
        source_rows = math.ceil(band_rows * step_y) + taps
        if block_averaged((self.region[0] / downsample, self.region[1] / downsample), (step_x, step_y)):
            # uint16 row sums of the source band, the uint16 block sums and two uint16 temporaries of the rounding,
            # the uint8 result
            resample = 2 * band_rows * cols + 7 * band_rows * piece
        else:
            resample = piece * max(source_rows * (4 + 1 + 4), source_rows * 4 + band_rows * 12)
        decode = 4 * min(_RESAMPLE_TILE, cols) * source_rows if decoding else 0
        per_band = 3 * (source_rows * cols + max(resample, decode))
        concurrent = min(bands, read_threads(self.slide) if bands > 1 else 1)
        cache = TILE_CACHE_BYTES if decoding else 0
        return 3 * height * width + max(concurrent * per_band, 3 * height * width * 4) + cache


class TensorSource:
    """An :class:`ImageSource` over a (1, C, H, W) tensor already in memory."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dim() != 4 or tensor.shape[0] != 1:
            raise ValueError(f"expected a (1, C, H, W) tensor, got {tuple(tensor.shape)}")
        self.tensor = tensor
        self.height, self.width = int(tensor.shape[2]), int(tensor.shape[3])

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The window (a view, no copy)."""
        return self.tensor[:, :, top : top + height, left : left + width]

    def read_bytes(self, height: int, width: int) -> int:
        """A read allocates nothing (a view)."""
        return 0
