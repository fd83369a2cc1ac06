"""Where streaming training keeps the maps of a slide — block inputs, intermediate activations, their gradients.

A full-resolution feature map of a gigapixel slide does not fit compute memory (x_1 of a 16384² image is
64 channels at 1/6 of the side: 1.9 GB in float32), but streaming never needs it whole: the block engine of
:mod:`wsilocal.stream.blocks` writes each window's exact part and reads windows back (with their halos) in the
next block and in the backward, and adds each window's input gradient into a gradient store. So the maps live
outside compute memory:

* ``where="memory"``: a host-memory array — the right place when the model runs on a GPU;
* ``where="disk"``: a memory-mapped file — on CPU, or when host memory is short. Its pages belong to the
  page cache (file-backed), so the kernel can write them out and evict them under pressure; they do not
  count as the process's anonymous memory. The file is unlinked as soon as it is mapped: nothing is left
  on disk when the store is closed or the process dies.

The array is laid out (H, W, C) so that one window is ``height`` contiguous runs of ``width·C`` values, and a
window seen as (1, C, h, w) is in channels-last order (oneDNN's native layout). An :class:`ActivationStore` is an
:class:`~wsilocal.stream.sources.ImageSource` (``read`` gives a private (1, C, h, w) copy) and a
:class:`~wsilocal.stream.blocks.MapStore` (``window`` gives a view to read, copy into or add to).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

Where = Literal["memory", "disk"]
WHERE = ("memory", "disk")


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype holding ``dtype`` values exactly (float16/32/64; bfloat16 has no numpy twin)."""
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        raise ValueError(f"an activation store cannot hold {dtype} values") from None


class ActivationStore:
    """A (C, H, W) feature map held outside compute memory, written and read one window at a time."""

    def __init__(self, array: np.ndarray, dtype: torch.dtype, where: Where):
        self.array, self.dtype, self.where = array, dtype, where
        self.tensor = torch.from_numpy(array)  # the same memory (or mapping), for in-place window access
        self.height, self.width, self.channels = (int(n) for n in array.shape)

    @classmethod
    def create(cls, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32, *, where: Where = "memory",
               dir: str | Path | None = None, zero: bool = False) -> ActivationStore:
        """An empty store for a map of ``shape`` = (C, H, W) in host memory or in an unnamed file in ``dir``
        (default: the system's temporary folder); ``zero``: filled with zeros (a gradient store; a new file
        always is, and zeroed host memory is only touched where it is written)."""
        if where not in WHERE:
            raise ValueError(f"activation store: where must be one of {WHERE}, got {where!r}")
        channels, height, width = (int(n) for n in shape)
        if min(channels, height, width) < 1:
            raise ValueError(f"activation store: shape must be positive, got {tuple(shape)}")
        layout = (height, width, channels)
        if where == "memory":
            return cls((np.zeros if zero else np.empty)(layout, numpy_dtype(dtype)), dtype, where)
        fd, path = tempfile.mkstemp(prefix="wsilocal-activations-", suffix=".bin", dir=dir)
        try:
            with os.fdopen(fd, "w+b") as handle:
                array = np.memmap(handle, numpy_dtype(dtype), mode="w+", shape=layout)
        finally:
            os.unlink(path)  # the mapping keeps the data alive; the name is gone
        return cls(array, dtype, where)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W), as the map's tensor would have."""
        return self.channels, self.height, self.width

    def _check(self, top: int, left: int, height: int, width: int) -> None:
        if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > self.height \
                or left + width > self.width:
            raise ValueError(f"window (top={top}, left={left}, height={height}, width={width}) is not inside "
                             f"the {self.height}x{self.width} activation store")

    def write(self, top: int, left: int, block: torch.Tensor) -> None:
        """Store ``block`` (1, C, h, w) at rows ``top..top+h-1``, columns ``left..left+w-1``."""
        if block.dim() != 4 or block.shape[0] != 1 or block.shape[1] != self.channels or block.dtype != self.dtype:
            raise ValueError(f"expected a (1, {self.channels}, h, w) {self.dtype} block, "
                             f"got {tuple(block.shape)} {block.dtype}")
        self._check(top, left, block.shape[2], block.shape[3])
        self.array[top : top + block.shape[2], left : left + block.shape[3]] = \
            block[0].detach().permute(1, 2, 0).cpu().numpy()

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The window as a (1, C, height, width) CPU tensor of the store's dtype (a private copy)."""
        self._check(top, left, height, width)
        window = torch.from_numpy(np.array(self.array[top : top + height, left : left + width]))
        return window.permute(2, 0, 1).unsqueeze(0).contiguous()

    def window(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The window as a (1, C, height, width) *view* of the store (channels-last strides): reading it copies
        nothing, ``copy_`` writes it and ``add_`` accumulates into it."""
        self._check(top, left, height, width)
        return self.tensor[top : top + height, left : left + width].permute(2, 0, 1).unsqueeze(0)

    def close(self) -> None:
        """Release the memory or the mapping (and so the unnamed file's disk space).

        Dropping the only reference unmaps the file (``read`` hands out copies, never views)."""
        self.array = np.empty((0, 0, self.channels), self.array.dtype)
        self.tensor = torch.from_numpy(self.array)
        self.height = self.width = 0

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
