"""The 5x cache: each slide's tissue box read once at the target MPP and stored as a memory-mappable array.

``prepare_cohort`` fills a cache folder with one entry per slide::

    CACHE/<slide_id>.npy          uint8 (H, W, 3), the tissue bounding box at the target MPP
    CACHE/<slide_id>.tissue.npz   the image's tissue mask (:class:`~wsilocal.slide.tissue.ImageTissueMask`)
    CACHE/<slide_id>.json         the entry's key and facts (source file, MPP, box, channel sums)

An entry is keyed by the source file (resolved path, size, modification time) and the parameters that
shape it (MPP, assumed MPP, tissue settings, cache version): a changed file or changed parameters make it
stale and it is rebuilt; a second run over an unchanged cohort does no work. Files are written under a
temporary name and renamed, so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from wsilocal.atomic import atomic_output, check_writable_folder, remove_stale_temporaries, write_text_atomic
from wsilocal.errors import SlideError, WsilocalError
from wsilocal.slide.cohort import Cohort, CohortSlide
from wsilocal.slide.reader import (
    DEFAULT_MAX_PIXELS,
    Slide,
    describe_level,
    open_slide,
    read_region_at_mpp,
    share_cores_between,
    size_at_mpp,
    source_pixels,
    stat_slide_file,
)
from wsilocal.slide.tissue import ImageTissueMask, detect_tissue, image_tissue_mask

if TYPE_CHECKING:  # only for the hint: `wsilocal prepare` needs no config module
    from wsilocal.config import TrainConfig

CACHE_VERSION = 2  # 2: each entry holds its image's tissue mask
STATS_CHUNK_ROWS = 512


@dataclass(frozen=True)
class PrepareSettings:
    """Parameters that shape a cache entry (part of its key)."""

    mpp: float = 2.0
    assume_mpp: float | None = None
    mask_mpp: float = 16.0
    margin: float = 0.05
    max_pixels: int = DEFAULT_MAX_PIXELS


def settings_for(config: TrainConfig, *, assume_mpp: float | None = None) -> PrepareSettings:
    """The settings a training config makes its 5x images with (``assume_mpp``: instead of the config's)."""
    return PrepareSettings(mpp=config.mpp, max_pixels=config.max_pixels,
                           assume_mpp=assume_mpp if assume_mpp is not None else config.assume_mpp)


@dataclass
class CacheEntry:
    """Facts of one cached slide; ``image()`` maps the pixels without reading them all."""

    slide_id: str
    array_path: str
    source: str
    key: str
    height: int
    width: int
    slide_mpp: float
    mpp: float
    bbox: list[int]  # x, y, w, h of the tissue box in level-0 pixels
    tissue_fraction: float
    channel_sum: list[float]
    channel_sumsq: list[float]
    n_pixels: int
    tissue_path: str

    def image(self) -> np.ndarray:
        """The cached RGB image as a read-only memory map (H, W, 3) uint8."""
        return np.load(self.array_path, mmap_mode="r")

    def tissue(self) -> ImageTissueMask:
        """The image's tissue mask, as :func:`~wsilocal.slide.tissue.image_tissue_mask` made it from the slide.

        Raises:
            WsilocalError: the mask file is missing or damaged (naming it).
        """
        try:
            with np.load(self.tissue_path) as saved:
                mask = ImageTissueMask(saved["overview"], saved["rows"], saved["cols"])
        except (OSError, ValueError, KeyError) as exc:
            raise WsilocalError(f"{self.tissue_path}: unreadable tissue mask of cached slide {self.slide_id} "
                                f"({exc}); run wsilocal prepare again") from None
        if mask.shape != (self.height, self.width):
            raise WsilocalError(f"{self.tissue_path}: tissue mask of {mask.shape} px for a "
                                f"{self.height}x{self.width} px cached image; run wsilocal prepare again")
        return mask


@dataclass
class PrepareResult:
    """What ``prepare_cohort`` did: entries by slide id, skipped slides with reasons, work done."""

    entries: dict[str, CacheEntry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def _entry_key(source: Path, settings: PrepareSettings) -> str:
    """Hash of the slide file's identity (path, size, modification time) and the settings; SlideError naming the
    file when it is missing or cannot be looked at (the reason a cohort run lists it under)."""
    stat = stat_slide_file(source)
    facts = {
        "source": str(source.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "settings": asdict(settings),
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def load_entry(cache_dir: Path, slide_id: str) -> CacheEntry | None:
    """The cached entry of a slide, or None when there is none or its files are incomplete or damaged."""
    meta = Path(cache_dir) / f"{slide_id}.json"
    try:
        entry = CacheEntry(**json.loads(meta.read_text()))
        shape = entry.image().shape  # maps the array: checks its header and that the file holds all pixels
    except (OSError, ValueError, TypeError):
        return None
    return entry if shape == (entry.height, entry.width, 3) and Path(entry.tissue_path).is_file() else None


def _channel_sums(image: np.ndarray) -> tuple[list[float], list[float]]:
    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    for y in range(0, image.shape[0], STATS_CHUNK_ROWS):
        chunk = image[y : y + STATS_CHUNK_ROWS].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(axis=0)
        total_sq += (chunk * chunk).sum(axis=0)
    return total.tolist(), total_sq.tolist()


def build_entry(slide: CohortSlide, cache_dir: Path, settings: PrepareSettings) -> CacheEntry:
    """Read one slide's tissue box at the target MPP into the cache (rebuilding it unconditionally)."""
    cache_dir = Path(cache_dir)
    key = _entry_key(slide.path, settings)
    with open_slide(slide.path, assume_mpp=settings.assume_mpp) as handle:
        slide_mpp = handle.mpp  # raises a clear SlideError when the file has no MPP and none is assumed
        tissue = detect_tissue(handle, mask_mpp=settings.mask_mpp, margin=settings.margin,
                               max_pixels=settings.max_pixels)
        x, y, w, h = tissue.bbox
        out_w, out_h = tissue_read_size(handle, tissue.bbox, settings.mpp, settings.max_pixels)
        final = cache_dir / f"{slide.slide_id}.npy"
        with atomic_output(final) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(out_h, out_w, 3))
            _reserve(tmp)
            read_region_at_mpp(handle, settings.mpp, region=(x, y, w, h), out=out)
            out.flush()
            channel_sum, channel_sumsq = _channel_sums(out)
            del out
        mask = image_tissue_mask(tissue, handle.level_dimensions[0], (out_w, out_h))
    tissue_path = cache_dir / f"{slide.slide_id}.tissue.npz"
    entry = CacheEntry(
        slide_id=slide.slide_id, array_path=str(final.resolve()), source=str(slide.path), key=key,
        height=out_h, width=out_w, slide_mpp=slide_mpp, mpp=settings.mpp, bbox=[x, y, w, h],
        tissue_fraction=tissue.tissue_fraction, channel_sum=channel_sum, channel_sumsq=channel_sumsq,
        n_pixels=out_h * out_w, tissue_path=str(tissue_path.resolve()),
    )
    try:
        with atomic_output(tissue_path) as tmp, open(tmp, "wb") as file:
            np.savez(file, overview=mask.overview, rows=mask.rows, cols=mask.cols)
        write_text_atomic(cache_dir / f"{slide.slide_id}.json", json.dumps(asdict(entry), indent=1))
    except OSError:
        # No pixels without their facts and mask: the entry is wholly there or not at all.
        final.unlink(missing_ok=True)
        tissue_path.unlink(missing_ok=True)
        raise
    return entry


def tissue_read_size(slide: Slide, bbox: tuple[int, int, int, int], mpp: float, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the tissue box ``bbox`` (level-0 px) read at ``mpp``, checked against ``max_pixels``.

    Both the image and the pixels decoded to make it count: a slide without a pyramid level near ``mpp``
    (a flat TIFF) decodes its full-resolution box, however small the result.

    Raises:
        SlideError: before anything is read or allocated, when either exceeds ``max_pixels``.
    """
    out_w, out_h = size_at_mpp(bbox[2], bbox[3], slide.mpp, mpp)
    if out_w * out_h > max_pixels:
        raise SlideError(slide.path, f"tissue region at {mpp} µm/px is {out_w}×{out_h} = {out_w * out_h:,} px, above "
                                     f"the limit of {max_pixels:,} px (raise --max-pixels if this is intended)")
    level, decoded = source_pixels(slide, mpp / slide.mpp, bbox)
    if decoded > max_pixels:
        raise SlideError(slide.path, f"reading the tissue region at {mpp} µm/px means decoding {decoded:,} px of "
                                     f"{describe_level(slide, level)}, above the limit of {max_pixels:,} px (raise "
                                     "--max-pixels if this is intended)")
    return out_w, out_h


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now: on a full disk, an OSError here instead of a SIGBUS later.

    ``open_memmap`` makes a sparse file; writing pixels into its pages when the disk is full kills the
    process with SIGBUS, no message and no clean-up.
    """
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: go on sparse
                raise


def _prepare_one(args: tuple[CohortSlide, Path, PrepareSettings]) -> tuple[str, CacheEntry | None, str | None]:
    slide, cache_dir, settings = args
    try:
        return slide.slide_id, build_entry(slide, cache_dir, settings), None
    except WsilocalError as exc:
        return slide.slide_id, None, str(exc)
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # disk full, corrupt data the reader missed
        return slide.slide_id, None, f"{type(exc).__name__}: {exc}"


def prepare_slides(
    slides: Iterable[CohortSlide],
    cache_dir: str | Path,
    settings: PrepareSettings | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
) -> PrepareResult:
    """Make sure every slide has a fresh cache entry; build the missing or stale ones.

    A slide that cannot be read is skipped and reported in ``result.skipped`` with its reason; the others
    finish. Fresh entries are reused without opening the slide.
    """
    settings = settings or PrepareSettings()
    cache_dir = check_writable_folder(cache_dir, "cache")  # read-only or full: said once, not per slide
    remove_stale_temporaries(cache_dir)  # of a run killed while writing an entry
    result = PrepareResult()
    todo: list[CohortSlide] = []
    for slide in slides:
        entry = load_entry(cache_dir, slide.slide_id)
        try:
            fresh = entry is not None and entry.key == _entry_key(slide.path, settings)
        except SlideError as exc:
            result.skipped[slide.slide_id] = str(exc)
            continue
        if fresh:
            result.entries[slide.slide_id] = entry
            result.reused.append(slide.slide_id)
        else:
            todo.append(slide)
    jobs = [(s, cache_dir, settings) for s in todo]
    bar = tqdm(total=len(jobs), desc="prepare", unit="slide", disable=not progress or not jobs)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=share_cores_between, initargs=(workers,)) as pool:
            outcomes = pool.map(_prepare_one, jobs)
            for outcome in outcomes:
                _record(result, outcome)
                bar.update()
    else:
        for job in jobs:
            _record(result, _prepare_one(job))
            bar.update()
    bar.close()
    return result


def _record(result: PrepareResult, outcome: tuple[str, CacheEntry | None, str | None]) -> None:
    slide_id, entry, reason = outcome
    if entry is None:
        result.skipped[slide_id] = reason or "unknown error"
    else:
        result.entries[slide_id] = entry
        result.built.append(slide_id)


def channel_stats(entries: Iterable[CacheEntry]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (of pixel values scaled to [0, 1]) over all pixels of the given entries."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for entry in entries:
        total += entry.channel_sum
        total_sq += entry.channel_sumsq
        count += entry.n_pixels
    if count == 0:
        raise ValueError("no pixels to compute channel statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


def prepare_cohort(
    cohort: Cohort,
    cache_dir: str | Path,
    settings: PrepareSettings | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
) -> tuple[PrepareResult, dict]:
    """Prepare every slide of a cohort and write ``CACHE/stats.json`` (mean/std of the training split).

    Returns the result and the stats dictionary (``mean``, ``std``, ``n_slides``, ``classes``).
    """
    result = prepare_slides(cohort.slides, cache_dir, settings, workers=workers, progress=progress)
    train = [result.entries[s.slide_id] for s in cohort.split("train") if s.slide_id in result.entries]
    stats: dict = {"classes": list(cohort.classes), "n_slides": len(train)}
    if train:
        stats["mean"], stats["std"] = channel_stats(train)
        write_text_atomic(Path(cache_dir) / "stats.json", json.dumps(stats, indent=1))
    return result, stats


def format_summary(cohort: Cohort, result: PrepareResult) -> str:
    """A table: per split and class, slides cached; then every skipped slide with its reason."""
    lines = [f"{'split':<6} {'class':<16} {'cached':>6} {'skipped':>7}"]
    for split in ("train", "val", "test"):
        for name in cohort.classes:
            ids = [s.slide_id for s in cohort.split(split) if s.label == name]
            ok = sum(i in result.entries for i in ids)
            lines.append(f"{split:<6} {name:<16} {ok:>6} {len(ids) - ok:>7}")
    lines.append(
        f"built {len(result.built)}, reused {len(result.reused)}, skipped {len(result.skipped)}"
    )
    for slide_id, reason in result.skipped.items():
        lines.append(f"skipped {slide_id}: {reason}")
    return "\n".join(lines)
