"""ResNet features of tissue tiles, one HDF5 file per slide: the input of the MIL baselines.

The paper's baselines (Table 1) run MIL models on "ImageNet pretrained features" of 5x tiles from ResNet34.
Here: the standard torchvision ResNet34 (conv1 stride 2 — the stride-3 stem is only the method's own
trunk) up to ``layer4``, global average pooling → 512 numbers per tile; ``arch`` picks ResNet18 (512) or
ResNet50 (2048) instead, e.g. for pathology self-supervised weights. Tiles are scaled to [0, 1] and
normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as torchvision's
ImageNet weights expect. Weights come from a local torchvision state dict (``--weights``); without one the
network is randomly initialised (a fixed seed, so every run and every resumed run gets the same network),
and the features are then random projections — the run says so loudly.

:func:`extract_features` writes ``OUT/<slide_id>.h5`` (see :mod:`wsilocal.features.h5`) with attributes:
``slide_id``, ``source``, ``mpp`` and ``tile`` (the tiles), ``tile_level0`` (their edge in level-0 pixels),
``slide_mpp``, ``min_tissue``, ``assume_mpp`` (when given), ``extractor`` (a description naming the
architecture and the weights' SHA-256), ``arch``, ``weights``, ``n_tiles``, ``format_version`` and ``key``.
The key hashes the parameters, the extractor (with the weights' hash) and the slide file (path, size,
modification time): a re-run skips a slide whose file carries the same key and recomputes it otherwise, so an
interrupted run resumes where it stopped and a run with other parameters never reuses stale files. Slides are
processed one at a time and tiles are read in batches, so memory holds one slide's features (N × 512 float32,
2 kB per tile) and one or two batches of tiles, however many slides the cohort has.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsilocal.atomic import check_writable_folder, remove_stale_temporaries
from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD
from wsilocal.errors import ConfigError, SlideError, WsilocalError
from wsilocal.features.h5 import read_attrs, write_features
from wsilocal.features.tiles import read_tile, tile_grid, tile_size_level0
from wsilocal.models.resnet import DEFAULT_ARCH, ResNetTrunk, load_trunk_weights
from wsilocal.prepare.cache import DEFAULT_MAX_PIXELS, tissue_read_size
from wsilocal.runtime import resolve_device
from wsilocal.slide.cohort import SPLITS, Cohort, CohortSlide
from wsilocal.slide.reader import Slide, open_slide, stat_slide_file
from wsilocal.slide.tissue import detect_tissue

FORMAT_VERSION = 1
RANDOM_INIT_SEED = 0
MIN_TILE = 32  # the ResNet shrinks its input 32×: a smaller tile gives a 1-pixel map made mostly of padding
MASK_MPP = 16.0  # resolution of the tissue mask the tiles are selected on (detect_tissue's default)

#: What a feature file's attributes record about how its tiles and features were made (the rest describes the
#: slide). A baseline run keeps these, so ``wsilocal predict`` can make the same features from a slide file.
EXTRACTION_SETTINGS = ("mpp", "tile", "min_tissue", "assume_mpp", "mask_mpp", "extractor", "weights", "arch",
                       "format_version")
#: Those a file made before they were recorded may lack, and what such a file was made with.
OPTIONAL_SETTINGS = {"assume_mpp": None, "weights": "", "arch": DEFAULT_ARCH}

RANDOM_INIT_WARNING = (
    "WARNING: no pretrained weights given (--weights): the ResNet feature extractor is randomly initialised, "
    "so the tile features are random projections, not ImageNet features. Expect MIL baselines trained on them "
    "to fall well short of the paper's Table 1."
)


class FeatureExtractor(nn.Module):
    """Tiles → ``dim``-d features: ImageNet normalisation, ResNet (``arch``, conv1 stride 2), global average pooling.

    Always in eval mode without gradients. ``weights`` is a state dict of ``arch`` (any file
    :func:`~wsilocal.models.resnet.load_trunk_weights` reads, ``fc.*`` ignored); None gives the random
    initialisation of seed ``RANDOM_INIT_SEED``. ``dim`` is 512 (ResNet18/34) or 2048 (ResNet50).
    """

    def __init__(self, weights: str | Path | None = None, arch: str = DEFAULT_ARCH):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # a fixed network without touching the caller's RNG
            torch.manual_seed(RANDOM_INIT_SEED)
            self.trunk = ResNetTrunk(conv1_stride=2, arch=arch)
        self.dim = self.trunk.out_channels
        self.weights = Path(weights) if weights is not None else None
        self.weights_sha256: str | None = None
        if self.weights is not None:  # CheckpointError naming the file if unusable
            self.weights_sha256 = load_trunk_weights(self.trunk, self.weights).sha256
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def description(self) -> str:
        """What makes these features: network, pooling, normalisation and weights (stored in every file)."""
        weights = (f"weights sha256:{self.weights_sha256}" if self.weights_sha256
                   else f"random init seed {RANDOM_INIT_SEED}")
        return (f"torchvision {self.trunk.arch.title} conv1 stride 2, global average pooling, {self.dim}-d, "
                f"ImageNet normalisation; {weights}")

    @torch.no_grad()
    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (B, H, W, 3) → float32 features (B, dim)."""
        # contiguous NCHW: the memory layout picks the convolution kernels, and with them the float rounding
        x = tiles.to(self.mean.device).permute(0, 3, 1, 2).float().div_(255).contiguous()
        x = (x - self.mean) / self.std
        return self.trunk(x).mean(dim=(2, 3))


@dataclass
class ExtractResult:
    """What :func:`extract_features` did.

    Attributes:
        written: slide id → its feature file, for every slide that has a current file after the run
            (computed now or reused).
        skipped: slide id → why it has no file (the SlideError message: missing, corrupt, no tissue, ...).
        reused: ids of the slides whose file was already current (not recomputed).
        n_tiles: slide id → number of tiles in its file.
        warnings: warnings of the run (e.g. random weights), to repeat after the summary.
    """

    written: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    n_tiles: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def extract_features(
    cohort_or_slides: Cohort | Iterable[CohortSlide],
    out_dir: str | Path,
    *,
    mpp: float = 2.0,
    tile: int = 256,
    min_tissue: float = 0.25,
    batch_size: int = 32,
    weights: str | Path | None = None,
    device: str = "auto",
    assume_mpp: float | None = None,
    workers: int = 0,
    progress: bool = True,
    arch: str = DEFAULT_ARCH,
) -> ExtractResult:
    """Write ``out_dir/<slide_id>.h5`` with the tile features of every slide; skip slides already done.

    Args:
        cohort_or_slides: a cohort, or the slides to process.
        out_dir: folder of the feature files (created).
        mpp: tile resolution in µm/px (2.0 ≈ 5x, the paper's resolution).
        tile: tile edge in pixels at ``mpp``.
        min_tissue: minimum tissue fraction of a kept tile (on the overview mask, see ``features.tiles``).
        batch_size: tiles per forward pass.
        weights: state dict of ``arch`` (torchvision/timm/SSL checkpoint); None for random weights (with a warning).
        arch: the extractor's trunk, ``resnet18``, ``resnet34`` (the paper's) or ``resnet50``.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``, ...
        assume_mpp: µm/px of slides without resolution metadata.
        workers: threads reading tiles (0: read in this thread); they read the next batch during the
            forward pass of the current one.
        progress: show progress bars (slides, and tiles of the current slide).

    A slide that fails (missing, corrupt, no MPP, no tissue, no tile above ``min_tissue``) is listed in
    ``result.skipped`` with its reason, and a stale file of it is removed; the other slides finish.

    Raises:
        ConfigError: a parameter is out of range or the device does not exist.
        CheckpointError: ``weights`` is not a usable state dict of ``arch``.
    """

    _check_parameters(mpp, tile, min_tissue, batch_size, workers, assume_mpp)
    slides = list(cohort_or_slides.slides if isinstance(cohort_or_slides, Cohort) else cohort_or_slides)
    out_dir = check_writable_folder(out_dir, "feature files")  # read-only or full: said now, not per slide
    remove_stale_temporaries(out_dir)  # of a run killed while writing a file
    extractor = FeatureExtractor(weights, arch).to(resolve_device(device))
    result = ExtractResult()
    if weights is None:
        result.warnings.append(RANDOM_INIT_WARNING)
        tqdm.write(RANDOM_INIT_WARNING, file=sys.stderr)
    parameters = {"mpp": mpp, "tile": tile, "min_tissue": min_tissue, "assume_mpp": assume_mpp,
                  "mask_mpp": MASK_MPP, "extractor": extractor.description, "format_version": FORMAT_VERSION}

    for slide in tqdm(slides, desc="features", unit="slide", disable=not progress):
        path = out_dir / f"{slide.slide_id}.h5"
        try:
            key = _file_key(slide.path, parameters)
            if _current_key(path) == key:
                result.reused.append(slide.slide_id)
                result.n_tiles[slide.slide_id] = int(read_attrs(path).get("n_tiles", 0))
            else:
                path.unlink(missing_ok=True)  # stale: never leave it for a reader to mistake as current
                attrs = {"slide_id": slide.slide_id, "source": str(slide.path), **parameters, "key": key,
                         "weights": str(extractor.weights or ""), "arch": arch}
                result.n_tiles[slide.slide_id] = _extract_slide(slide, path, extractor, attrs, batch_size,
                                                                workers, progress)
            result.written[slide.slide_id] = path
        except WsilocalError as exc:
            result.skipped[slide.slide_id] = str(exc)
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # disk full, data the reader missed
            result.skipped[slide.slide_id] = f"{slide.path}: {type(exc).__name__}: {exc}"
    return result


def extraction_settings(attrs: Mapping[str, object]) -> dict | None:
    """The :data:`EXTRACTION_SETTINGS` of a feature file's attributes; None when the file does not record them
    (files made by CLAM, or by hand). ``assume_mpp`` is None and ``weights`` "" where they were not given, ``arch``
    resnet34 in files made before it was recorded."""
    required = [key for key in EXTRACTION_SETTINGS if key not in OPTIONAL_SETTINGS]
    if any(key not in attrs for key in required):
        return None
    assume_mpp = attrs.get("assume_mpp")
    return {"mpp": float(attrs["mpp"]), "tile": int(attrs["tile"]), "min_tissue": float(attrs["min_tissue"]),
            "assume_mpp": None if assume_mpp is None else float(assume_mpp), "mask_mpp": float(attrs["mask_mpp"]),
            "extractor": str(attrs["extractor"]), "weights": str(attrs.get("weights", "")),
            "arch": str(attrs.get("arch", DEFAULT_ARCH)), "format_version": int(attrs["format_version"])}


def format_summary(slides: Sequence[CohortSlide], result: ExtractResult) -> str:
    """A table per split and class (slides, with features, skipped, tiles), totals, then every skipped slide."""
    lines = [f"{'split':<6} {'class':<16} {'slides':>6} {'done':>6} {'skipped':>7} {'tiles':>9}"]
    for split in SPLITS:
        for label in sorted({s.label for s in slides}):
            ids = [s.slide_id for s in slides if s.split == split and s.label == label]
            if ids:
                done = [i for i in ids if i in result.written]
                tiles = sum(result.n_tiles.get(i, 0) for i in done)
                lines.append(f"{split:<6} {label:<16} {len(ids):>6} {len(done):>6} {len(ids) - len(done):>7} "
                             f"{tiles:>9,}")
    computed = len(result.written) - len(result.reused)
    lines.append(f"computed {computed}, reused {len(result.reused)}, skipped {len(result.skipped)}")
    lines += [f"skipped {slide_id}: {reason}" for slide_id, reason in result.skipped.items()]
    return "\n".join(lines)


def _extract_slide(slide: CohortSlide, path: Path, extractor: FeatureExtractor, attrs: dict,
                   batch_size: int, workers: int, progress: bool) -> int:
    """Compute one slide's features and write its file (atomically); returns the number of tiles."""
    mpp, tile = attrs["mpp"], attrs["tile"]
    with open_slide(slide.path, assume_mpp=attrs["assume_mpp"]) as handle:
        slide_mpp = handle.mpp  # a clear SlideError when the file has no MPP and none is assumed
        coords = tissue_tiles(handle, mpp, tile, attrs["min_tissue"], attrs["mask_mpp"])
        features = tile_features(handle, coords, extractor, mpp, tile, batch_size=batch_size, workers=workers,
                                 progress=progress, desc=slide.slide_id)
        tile_level0 = tile_size_level0(handle, mpp, tile)
    write_features(path, features, np.asarray(coords, np.int64),
                   {**attrs, "slide_mpp": slide_mpp, "tile_level0": tile_level0, "n_tiles": len(coords)})
    return len(coords)


def tissue_tiles(slide: Slide, mpp: float, tile: int, min_tissue: float,
                 mask_mpp: float = MASK_MPP) -> list[tuple[int, int]]:
    """Level-0 (x, y) of the tiles of an open slide that ``wsilocal features`` uses: its tissue, the grid over it.

    ``wsilocal predict`` on a baseline run calls this too, so it tiles a slide exactly as its features were.

    Raises:
        SlideError: no tissue, a tissue box larger than ``prepare`` accepts, or no tile with ``min_tissue``.
    """
    tissue = detect_tissue(slide, mask_mpp=mask_mpp)
    tissue_read_size(slide, tissue.bbox, mpp, DEFAULT_MAX_PIXELS)  # refuses what prepare would refuse
    coords = tile_grid(slide, tissue, mpp, tile, min_tissue)
    if not coords:
        raise SlideError(slide.path, f"no {tile}-px tile at {mpp} µm/px has at least {min_tissue:.0%} tissue")
    return coords


def tile_features(slide: Slide, coords: Sequence[tuple[int, int]], extractor: nn.Module, mpp: float, tile: int, *,
                  batch_size: int = 32, workers: int = 0, progress: bool = False, desc: str = "tiles") -> np.ndarray:
    """float32 (N, extractor.dim) features of the tiles at level-0 ``coords``, read and computed batch by batch."""
    features = np.empty((len(coords), extractor.dim), np.float32)
    with tqdm(total=len(coords), desc=desc, unit="tile", leave=False, disable=not progress) as bar:
        # closing(): reader threads stop before the slide closes, also when a batch fails
        with closing(tile_batches(slide, list(coords), mpp, tile, batch_size, workers)) as batches:
            for start, batch in batches:
                features[start : start + len(batch)] = extractor(torch.from_numpy(batch)).cpu().numpy()
                bar.update(len(batch))
    return features


def tile_batches(slide: Slide, coords: list[tuple[int, int]], mpp: float, tile: int, batch_size: int,
                 workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index of the first tile, uint8 (B, tile, tile, 3)) batch by batch.

    With ``workers`` threads, the next batch is being read while the caller uses the current one; at most
    two batches exist at a time. The threads share the slide handle (OpenSlide is thread-safe).
    """
    starts = range(0, len(coords), batch_size)
    if workers == 0:
        for start in starts:
            yield start, np.stack([read_tile(slide, xy, mpp, tile) for xy in coords[start : start + batch_size]])
        return
    with ThreadPoolExecutor(workers) as pool:
        def submit(start: int) -> list:
            return [pool.submit(read_tile, slide, xy, mpp, tile) for xy in coords[start : start + batch_size]]

        pending = submit(0)
        for start in starts:
            batch = np.stack([future.result() for future in pending])
            pending = submit(start + batch_size)
            yield start, batch


def _check_parameters(mpp: float, tile: int, min_tissue: float, batch_size: int, workers: int,
                      assume_mpp: float | None) -> None:
    problems = []
    if not (math.isfinite(mpp) and mpp > 0):
        problems.append(f"--mpp must be a positive number of µm/px, got {mpp}")
    if tile < MIN_TILE:
        problems.append(f"--tile must be at least {MIN_TILE} px (the ResNet shrinks tiles 32×), got {tile}")
    if not 0 <= min_tissue <= 1:
        problems.append(f"--min-tissue must be a fraction in [0, 1], got {min_tissue}")
    if batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        problems.append(f"--workers must be 0 or more, got {workers}")
    if assume_mpp is not None and not (math.isfinite(assume_mpp) and assume_mpp > 0):
        problems.append(f"--assume-mpp must be a positive number of µm/px, got {assume_mpp}")
    if problems:
        raise ConfigError("; ".join(problems))


def _file_key(source: Path, parameters: dict) -> str:
    """Hash of the parameters and the slide file's identity (resolved path, size, modification time)."""
    stat = stat_slide_file(source)
    facts = {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **parameters}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def _current_key(path: Path) -> str | None:
    """The key stored in an existing feature file; None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        return str(read_attrs(path).get("key"))
    except WsilocalError:
        return None

