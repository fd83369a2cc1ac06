"""Decode the tiles of a TIFF pyramid level straight from the file, without OpenSlide's compositing.

For the commonest slide files — Aperio SVS and generic tiled TIFF with JPEG or lossless tiles — OpenSlide's
``read_region`` spends most of its time not decoding but painting the decoded tiles into a premultiplied-ARGB
canvas, which is then converted back to RGB: on this project's 2-core VM it took 0.50 s for a 4096² level region
that libjpeg-turbo, called through tifffile/imagecodecs, decodes in 0.12 s on one thread (docs/benchmarks.md,
*Speed*). :class:`TiffTileReader` reads such a level tile by tile itself.

It is used only where it gives OpenSlide's pixels exactly: for the level's pages it recognises (8-bit, 3 samples,
RGB or YCbCr, tiled, every tile present), and only after a check at open that its first and last tiles decode to
the very bytes OpenSlide returns for them. Anything else stays with OpenSlide.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile

#: TIFF compressions read directly: JPEG (libjpeg-turbo in both readers) and the lossless codecs.
DIRECT_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946, 50000})  # none, LZW, JPEG, deflate (two tags), zstd
#: OpenSlide formats whose levels are plain TIFF pages (no overlaps, offsets or sparse tiles between them).
DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})
#: Decoded tiles kept per open slide, as OpenSlide's own tile cache (32 MiB): a tile cut by a band boundary is
#: needed by two bands, and the bands of a row are read in column pieces.
TILE_CACHE_BYTES = 32 * 2**20


class TiffTileReader:
    """Reads regions of some levels of a TIFF slide by decoding their tiles; thread-safe.

    Args:
        path: the TIFF file.
        level_dimensions: the slide's levels as OpenSlide lists them, (width, height) each; a level is served
            when a tiled page of exactly that size, in a layout this reader decodes, exists.
    """

    def __init__(self, path: Path, level_dimensions: list[tuple[int, int]]):
        self._tiff = tifffile.TiffFile(path)
        self._fd = self._tiff.filehandle.fileno()
        self._size = os.fstat(self._fd).st_size
        self._pages: dict[int, tifffile.TiffPage] = {}
        pages = [p for p in self._tiff.pages if isinstance(p, tifffile.TiffPage)]
        for level, (width, height) in enumerate(level_dimensions):
            # The first decodable page of the level's size (a stripped SVS thumbnail can share it; the check at
            # open, against OpenSlide, guards against any other mix-up).
            page = next((p for p in pages if (p.imagewidth, p.imagelength) == (width, height) and self._decodable(p)),
                        None)
            if page is not None:
                self._pages[level] = page
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def levels(self) -> list[int]:
        """The levels read directly."""
        return sorted(self._pages)

    def tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of one tile of ``level``."""
        page = self._pages[level]
        return page.tilewidth, page.tilelength

    def drop_level(self, level: int) -> None:
        """Leave ``level`` to the other reader from now on (e.g. after it failed the check at open)."""
        self._pages.pop(level, None)

    def close(self) -> None:
        self._tiff.close()

    def read(self, level: int, lx: int, ly: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) of ``level`` from level pixel (lx, ly); the region lies inside the level.

        Raises whatever the decoder raises on damaged data (the caller turns it into a SlideError).
        """
        page = self._pages[level]
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        out = np.empty((height, width, 3), np.uint8)
        for row in range(ly // th, (ly + height - 1) // th + 1):
            for col in range(lx // tw, (lx + width - 1) // tw + 1):
                tile = self._tile(level, page, row * across + col)
                x0, y0 = max(lx, col * tw), max(ly, row * th)
                x1, y1 = min(lx + width, (col + 1) * tw), min(ly + height, (row + 1) * th)
                out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = tile[y0 - row * th : y1 - row * th,
                                                                 x0 - col * tw : x1 - col * tw]
        return out

    def _tile(self, level: int, page: tifffile.TiffPage, index: int) -> np.ndarray:
        key = (level, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        # Decoded outside the lock: imagecodecs releases the GIL, so reader threads decode side by side.
        data = os.pread(self._fd, page.databytecounts[index], page.dataoffsets[index])
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        tile = np.ascontiguousarray(decoded[0, :, :, :3])
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached_bytes += tile.nbytes
                while self._cached_bytes > TILE_CACHE_BYTES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached_bytes -= old.nbytes
        return tile

    def _decodable(self, page: tifffile.TiffPage) -> bool:
        """A tiled, contiguous 8-bit RGB/YCbCr page in a codec both readers decode alike, every tile in the file."""
        if not (page.is_tiled and page.tiledepth == 1 and page.imagedepth == 1 and page.bitspersample == 8
                and page.samplesperpixel == 3 and page.planarconfig == 1 and page.photometric in (2, 6)
                and int(page.compression) in DIRECT_COMPRESSIONS):
            return False
        counts, offsets = page.databytecounts, page.dataoffsets
        return (len(counts) > 0 and min(counts) > 0
                and max(o + n for o, n in zip(offsets, counts, strict=True)) <= self._size)
