"""Write pyramidal, tiled, JPEG-compressed TIFF slides that OpenSlide and tiffslide both open.

Two layouts:

* ``"aperio"`` (default): BigTIFF; page 0 full resolution, tiled; page 1 a small stripped
  thumbnail; pages 2… the reduced levels, tiled and *not* marked ``subfiletype=1`` (tiffslide stops
  at a page marked reduced). The ImageDescription starts ``Aperio Image Library`` and carries
  ``AppMag`` and ``MPP``, so OpenSlide reports vendor ``aperio`` with its MPP.
* ``"generic"``: every level its own tiled page, reduced ones marked ``subfiletype=1``; OpenSlide
  reports ``generic-tiff``. With ``mpp=None`` no resolution is written at all (a slide without MPP).

The level-0 image is pulled from ``source`` one tile row at a time, so slides of 40000² px are
written while holding only one tile row plus the (16× smaller) second level, which lives in a
memory-mapped scratch file.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

# source(x, y, width, height) -> uint8 array (height, width, 3) of level 0.
RegionSource = Callable[[int, int, int, int], np.ndarray]

LEVEL_FACTOR = 4  # each pyramid level is 4× smaller than the previous, as in Aperio SVS files
MIN_LEVEL_SIDE = 512  # stop adding levels once the longer side drops below this


def downsample_area(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``×``factor`` blocks (edges padded by replication). uint8 in, uint8 out."""
    h, w = image.shape[:2]
    out_h, out_w = -(-h // factor), -(-w // factor)
    out = np.empty((out_h, out_w, image.shape[2]), np.uint8)
    rows = factor * 256  # a band at a time: float temporaries stay small for whole pyramid levels
    for y in range(0, h, rows):
        band = np.asarray(image[y : y + rows])
        pad_h, pad_w = -band.shape[0] % factor, out_w * factor - w
        if pad_h or pad_w:
            band = np.pad(band, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        blocks = band.reshape(band.shape[0] // factor, factor, out_w, factor, band.shape[2]).astype(np.float32)
        out[y // factor : y // factor + blocks.shape[0]] = np.clip(blocks.mean(axis=(1, 3)) + 0.5, 0, 255)
    return out


def _tiles(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Yield tiles of an in-memory level in row-major order, zero-padded to full tile size."""
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = image[y : y + tile, x : x + tile]
            if block.shape[0] != tile or block.shape[1] != tile:
                padded = np.zeros((tile, tile, 3), np.uint8)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            yield block


def write_pyramidal_tiff(
    path: str | Path,
    source: np.ndarray | RegionSource,
    size: tuple[int, int] | None = None,
    *,
    mpp: float | None = 0.25,
    app_mag: float = 40.0,
    layout: str = "aperio",
    tile: int = 256,
    quality: int = 90,
    on_row: Callable[[], None] | None = None,
) -> list[tuple[int, int]]:
    """Write ``source`` as a pyramidal TIFF slide and return the (width, height) of every level.

    Args:
        path: output file (conventionally ``.svs`` for the aperio layout, ``.tiff`` otherwise).
        source: the level-0 image, either an array (H, W, 3) uint8 or a callable
            ``source(x, y, width, height)`` returning that region of level 0.
        size: (width, height) of level 0; required when ``source`` is a callable.
        mpp: microns per pixel at level 0, or ``None`` to write no resolution metadata.
        app_mag: objective power written to the Aperio description.
        layout: ``"aperio"`` or ``"generic"`` (see module docstring).
        tile: tile edge in pixels (a multiple of 16).
        quality: JPEG quality.
        on_row: called after each level-0 tile row is written (for progress bars).
    """
    if layout not in ("aperio", "generic"):
        raise ValueError(f"layout must be 'aperio' or 'generic', not {layout!r}")
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError("source array must be uint8 with shape (H, W, 3)")
        array = source
        size = (array.shape[1], array.shape[0])

        def source(x: int, y: int, w: int, h: int) -> np.ndarray:  # noqa: F811 - array adapter
            return array[y : y + h, x : x + w]

    if size is None:
        raise ValueError("size=(width, height) is required when source is a callable")
    width, height = size
    n_levels = 1
    while max(width, height) // LEVEL_FACTOR ** n_levels >= MIN_LEVEL_SIDE:
        n_levels += 1

    resolution_kwargs: dict = {}
    if mpp is not None:
        pixels_per_cm = 1e4 / mpp
        resolution_kwargs = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
    common = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": quality}}

    level1_shape = (-(-height // LEVEL_FACTOR), -(-width // LEVEL_FACTOR), 3)
    with tempfile.TemporaryDirectory(prefix="wsilocal-pyramid-") as scratch:
        # Level 1 is filled while level 0 streams through, then the rest is derived from it.
        level1 = np.lib.format.open_memmap(Path(scratch) / "level1.npy", "w+", np.uint8, level1_shape)
        row_h = tile * LEVEL_FACTOR // np.gcd(tile, LEVEL_FACTOR)  # a multiple of both

        def level0_tiles() -> Iterator[np.ndarray]:
            for y in range(0, height, row_h):
                h = min(row_h, height - y)
                strip = np.ascontiguousarray(source(0, y, width, h))
                if strip.shape != (h, width, 3):
                    raise ValueError(f"source returned shape {strip.shape}, expected {(h, width, 3)}")
                small = downsample_area(strip, LEVEL_FACTOR)
                level1[y // LEVEL_FACTOR : y // LEVEL_FACTOR + small.shape[0]] = small
                for ty in range(0, h, tile):
                    yield from _tiles(strip[ty : ty + tile], tile)
                    if on_row is not None:
                        on_row()

        description = ""
        if layout == "aperio":
            mpp_text = f"|MPP = {mpp:.6g}" if mpp is not None else ""
            description = (
                f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
                f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {app_mag:g}{mpp_text}|Filename = wsilocal"
            )
        levels = [(width, height)]
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            tif.write(
                level0_tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                description=description, metadata=None, **common, **resolution_kwargs,
            )
            if layout == "aperio":
                thumb = level1
                while max(thumb.shape[:2]) > 768:
                    thumb = downsample_area(np.asarray(thumb), 2)
                tif.write(np.asarray(thumb), description="Aperio Image Library thumbnail",
                          metadata=None, rowsperstrip=16, **common)
            level = level1
            for index in range(1, n_levels):
                if index > 1:
                    level = downsample_area(np.asarray(level), LEVEL_FACTOR)
                levels.append((level.shape[1], level.shape[0]))
                # Reduced levels carry the level-0 resolution scaled by their downsample.
                extra = dict(resolution_kwargs)
                if mpp is not None:
                    ppcm = 1e4 / (mpp * LEVEL_FACTOR**index)
                    extra["resolution"] = (ppcm, ppcm)
                tif.write(
                    _tiles(np.asarray(level), tile), shape=level.shape, dtype=np.uint8, tile=(tile, tile),
                    subfiletype=1 if layout == "generic" else 0, metadata=None,
                    description=description if layout == "aperio" else None, **common, **extra,
                )
    return levels
