"""Random tissue tiles of many slides, for pretraining: an index of where the tissue is, and batches drawn from it.

The index keeps, per slide, the level-0 corners of a half-overlapping grid of tiles that hold at least
``min_tissue`` tissue on the slide's overview mask (:func:`wsilocal.slide.tissue.detect_tissue`): a few kB per
slide, so memory stays bounded whatever the cohort size, and no tile is ever written to disk. A batch is a pure
function of ``(seed, step, rank)``: each tile picks a slide uniformly (small biopsies weigh as much as large
resections), one of its grid corners, and a random shift of up to half a tile. So a resumed run reads exactly the
tiles an uninterrupted one would, and ranks of a distributed run read different tiles.
"""

from __future__ import annotations

import glob
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from wsilocal.errors import SlideError, WsilocalError
from wsilocal.features.tiles import read_tile, tile_grid, tile_size_level0
from wsilocal.slide.reader import Slide, open_slide
from wsilocal.slide.tissue import detect_tissue

BATCH_STREAM = 0x5054  # "PT": the purpose of the per-step random stream that places a batch's tiles
MAX_OPEN_SLIDES = 32  # slide handles kept open at once (a cohort of thousands would exhaust file descriptors)


@dataclass
class TileIndex:
    """Where tissue tiles can be read: per slide, its path and the level-0 corners of its candidate tiles.

    Attributes:
        paths: one slide file per entry.
        corners: per slide, int64 (N, 2) level-0 (x, y) of the candidate tiles' top-left corners.
        step_level0: per slide, the grid step in level-0 px (half a tile): the range of the random shift.
        skipped: slide path → why it gives no tiles (missing, unreadable, no tissue, no MPP, ...).
    """

    paths: list[str] = field(default_factory=list)
    corners: list[np.ndarray] = field(default_factory=list)
    step_level0: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def n_tiles(self) -> int:
        return int(sum(len(c) for c in self.corners))

    def save(self, file: Path | BinaryIO) -> None:
        """Write the index as ``.npz`` (a resumed run reuses it instead of scanning every slide again)."""
        arrays = {f"corners_{i}": c for i, c in enumerate(self.corners)}
        np.savez(file, paths=np.array(self.paths, dtype=str), step_level0=np.array(self.step_level0, np.int64),
                 skipped_paths=np.array(list(self.skipped), dtype=str),
                 skipped_reasons=np.array(list(self.skipped.values()), dtype=str), **arrays)

    @classmethod
    def load(cls, path: Path) -> TileIndex:
        with np.load(path) as data:
            paths = [str(p) for p in data["paths"]]
            return cls(paths, [data[f"corners_{i}"] for i in range(len(paths))],
                       [int(s) for s in data["step_level0"]],
                       dict(zip([str(p) for p in data["skipped_paths"]], [str(r) for r in data["skipped_reasons"]],
                                strict=True)))


SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm")


def find_slide_files(pattern: str) -> list[Path]:
    """The slide files of a folder (recursively, by suffix: :data:`SLIDE_SUFFIXES`) or of a glob pattern, sorted.

    Raises:
        WsilocalError: nothing matches.
    """
    folder = Path(pattern)
    if folder.is_dir():
        found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES]
    else:
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    if not found:
        what = "no slide files (" + ", ".join(SLIDE_SUFFIXES) + ") in the folder" if folder.is_dir() else \
            "no file matches the pattern"
        raise WsilocalError(f"{pattern}: {what}")
    return sorted(found)


def build_tile_index(paths: Sequence[str | Path], *, mpp: float, tile: int, min_tissue: float,
                     assume_mpp: float | None = None, progress: bool = True) -> TileIndex:
    """Scan each slide's tissue once (its overview only) and keep the half-overlapping tile grid over it.

    A slide that cannot be used (missing, corrupt, no tissue, no resolution metadata, no tile with ``min_tissue``)
    is recorded in ``skipped`` with the reason, never silently dropped.
    """
    index = TileIndex()
    for path in tqdm(paths, desc="tissue of slides", unit="slide", disable=not progress, leave=False):
        try:
            with open_slide(path, assume_mpp=assume_mpp) as slide:
                corners, step = _grid_corners(slide, mpp, tile, min_tissue)
        except SlideError as exc:
            index.skipped[str(path)] = exc.cause
            continue
        index.paths.append(str(path))
        index.corners.append(corners)
        index.step_level0.append(step)
    return index


def _grid_corners(slide: Slide, mpp: float, tile: int, min_tissue: float) -> tuple[np.ndarray, int]:
    """Corners of the tiles of a grid with half a tile's step whose tissue share is at least ``min_tissue``."""
    tissue = detect_tissue(slide)
    size = tile_size_level0(slide, mpp, tile)
    step = max(1, size // 2)
    # Two offset grids of full-tile step together make the half-step grid (tile_grid steps by whole tiles).
    corners = []
    for dx in (0, step):
        for dy in (0, step):
            x, y, w, h = tissue.bbox
            shifted = replace(tissue, bbox=(x + dx, y + dy, max(1, w - dx), max(1, h - dy)))
            corners += tile_grid(slide, shifted, mpp, tile, min_tissue)
    if not corners:
        raise SlideError(slide.path, f"no {tile}-px tile at {mpp:g} µm/px has at least {min_tissue:.0%} tissue")
    return np.array(sorted(set(corners)), np.int64), step


class TileSampler:
    """Batches of random tissue tiles, uint8 (B, tile, tile, 3), each batch a pure function of (seed, step, rank).

    Reads run in ``workers`` threads (the decoders release the GIL); open slides are kept in a small LRU cache.
    ``prefetch(step)`` starts reading a batch in the background and ``batch(step)`` returns it (reading it now
    if it was not prefetched), so the next batch is read while the current one trains.
    """

    def __init__(self, index: TileIndex, *, mpp: float, tile: int, batch_size: int, seed: int, rank: int = 0,
                 workers: int = 2, assume_mpp: float | None = None):
        if not index.paths:
            raise WsilocalError("pretrain: no usable slide (every slide was skipped)")
        self.index, self.mpp, self.tile, self.batch_size = index, mpp, tile, batch_size
        self.seed, self.rank, self.assume_mpp = seed, rank, assume_mpp
        self._slides: OrderedDict[str, Slide] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, workers))
        self._pending: dict[int, list] = {}

    def placements(self, step: int) -> list[tuple[int, int, int]]:
        """(slide number, x, y) of each tile of the batch of ``step``: which slide and where (level 0)."""
        rng = np.random.default_rng([self.seed, BATCH_STREAM, step, self.rank])
        slides = rng.integers(0, len(self.index.paths), self.batch_size)
        placed = []
        for s in slides:
            corners, shift = self.index.corners[s], self.index.step_level0[s]
            x, y = corners[rng.integers(0, len(corners))] + rng.integers(-(shift // 2), shift // 2 + 1, 2)
            placed.append((int(s), max(0, int(x)), max(0, int(y))))
        return placed

    def _slide(self, number: int) -> Slide:
        path = self.index.paths[number]
        with self._lock:
            slide = self._slides.pop(path, None)
            if slide is None:
                slide = open_slide(path, assume_mpp=self.assume_mpp)
            self._slides[path] = slide  # most recently used last
            while len(self._slides) > MAX_OPEN_SLIDES:
                self._slides.popitem(last=False)[1].close()
            return slide

    def _read(self, number: int, x: int, y: int) -> np.ndarray:
        slide = self._slide(number)
        width, height = slide.level_dimensions[0]
        size = tile_size_level0(slide, self.mpp, self.tile)
        return read_tile(slide, (min(x, max(0, width - size)), min(y, max(0, height - size))), self.mpp, self.tile)

    def prefetch(self, step: int) -> None:
        if step not in self._pending:
            self._pending[step] = [self._pool.submit(self._read, *p) for p in self.placements(step)]

    def batch(self, step: int) -> np.ndarray:
        self.prefetch(step)
        futures = self._pending.pop(step)
        return np.stack([f.result() for f in futures])

    def close(self) -> None:
        for futures in self._pending.values():
            for f in futures:
                f.cancel()
        self._pool.shutdown(wait=True)
        with self._lock:
            for slide in self._slides.values():
                slide.close()
            self._slides.clear()
