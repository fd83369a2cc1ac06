"""Where the trunk's input comes from: the whole image at the target MPP, read one window at a time.

An :class:`ImageSource` hands out normalised windows of an image it may never hold whole. Two kinds:
:class:`ArraySource` over pixels already in memory or memory-mapped (a cache entry), and
:class:`SlideSource`, which reads each window straight from the slide file, resampled exactly as the
cache would have been (see :func:`wsilocal.slide.reader.read_region_at_mpp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from wsilocal.slide.reader import Slide, read_region_at_mpp, size_at_mpp


def to_tensor(image: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (H, W, 3) → normalised float32 (1, 3, H, W)."""
    x = torch.from_numpy(np.array(image, copy=True))  # a private, writable copy of the (memory-mapped) pixels
    x = x.permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean_t) / std_t).unsqueeze(0)


class ImageSource(Protocol):
    """An image of ``height``×``width`` pixels at the target MPP, read window by window."""

    height: int
    width: int

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The window as a normalised float32 tensor (1, 3, height, width); it lies inside the image."""
        ...


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
        """Window (1, 3, height, width), read from the slide and normalised."""
        _check_window(self, top, left, height, width)
        pixels = read_region_at_mpp(self.slide, self.mpp, self.region, window=(top, left, height, width))
        return to_tensor(pixels, self.mean, self.std)


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
