"""``wsilocal predict`` on a tile-based MIL baseline run: slide file → tiles → features → MIL model → prediction.

A baseline (``wsilocal baseline``) learnt from feature files of ``wsilocal features``. To predict a slide from
its file, :class:`BaselinePredictor` repeats that extraction exactly — the same functions
(:func:`~wsilocal.features.extract.tissue_tiles`, :func:`~wsilocal.features.extract.tile_features`), settings
(tile resolution and size, minimum tissue, mask resolution) and ResNet34 extractor with the same weights — so
its features equal those in the feature file, and its probabilities what ``wsilocal evaluate`` computes.

The extraction settings come from the run's ``model.json`` (recorded when the baseline was trained) or, for a
run trained before that, from the attributes of a feature file in the run's ``features`` folder. The weights
file is recognised by its SHA-256 (part of the extractor's description): another file is refused, and a
randomly initialised extractor is reproduced from its fixed seed.

The result is a :class:`~wsilocal.infer.prediction.Prediction` like the method's: its attention map holds the
model's per-tile attention (or scores) on the tile grid, one cell per tile, NaN where the grid has no tile
(:func:`~wsilocal.infer.heatmap.tile_attention_map`), so :func:`~wsilocal.infer.heatmap.save_heatmap` draws
it. :func:`evaluation_heatmaps` draws the same heatmaps for an evaluated split from ``attention_<split>/``.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsilocal.errors import WsilocalError, out_of_memory_as_slide_error
from wsilocal.features.extract import (
    FORMAT_VERSION,
    FeatureExtractor,
    tile_features,
    tissue_tiles,
)
from wsilocal.features.h5 import read_attrs
from wsilocal.features.tiles import tile_size_level0
from wsilocal.infer.heatmap import save_heatmap, tile_attention_map
from wsilocal.infer.prediction import PeakMemory, Prediction, check_run_options
from wsilocal.models.mil import MIL_MODELS, MILModel
from wsilocal.models.resnet import DEFAULT_ARCH
from wsilocal.run.directory import RunDirectory
from wsilocal.runtime import resolve_device
from wsilocal.slide.cohort import load_cohort
from wsilocal.slide.reader import Slide, open_slide
from wsilocal.train.bags import features_path
from wsilocal.train.baseline import load_baseline_run, recorded_feature_settings


def _baseline_run(run_dir: str | Path, checkpoint: str = "best",
                  assume_mpp: float | None = None) -> tuple[RunDirectory, dict]:
    """:func:`~wsilocal.infer.prediction.check_run_options`, and that the run is a baseline's."""
    run, meta = check_run_options(run_dir, checkpoint, assume_mpp)
    if not run.is_baseline:
        raise WsilocalError(f"{run.path}: not a baseline run (its config.yaml does not say method 'baseline')")
    return run, meta


def run_feature_settings(run_dir: str | Path) -> dict:
    """How the tile features of a baseline run were made (:data:`~wsilocal.features.extract.EXTRACTION_SETTINGS`).

    From ``model.json`` (``features``), else — a run trained before it was recorded there — from the first
    feature file in the run's ``features`` folder that records them.

    Raises:
        WsilocalError: neither says how the features were made (e.g. they were made by CLAM).
    """
    run, _ = _baseline_run(run_dir)
    settings = recorded_feature_settings(run)
    if settings is None:
        raise WsilocalError(f"{run.metadata_file}: the run does not record how its tile features were made, and no "
                            f"feature file in {run.config().features} does; predict needs features made by "
                            "`wsilocal features`")
    return settings


class BaselinePredictor:
    """A baseline run's MIL model with the feature extractor of its features, applied to slide files.

    Make one with :meth:`from_run`. ``settings`` are the run's extraction settings (:func:`run_feature_settings`);
    ``extractor`` maps uint8 tiles (B, H, W, 3) to (B, ``extractor.dim``) features.
    """

    def __init__(self, model: MILModel, extractor: nn.Module, classes: Sequence[str], settings: dict, *,
                 device: torch.device, assume_mpp: float | None = None, batch_size: int = 32):
        self.device = device
        self.model = model.to(device).eval()
        self.extractor = extractor.to(device).eval()
        self.classes = list(classes)
        self.settings = settings
        self.assume_mpp = assume_mpp if assume_mpp is not None else settings.get("assume_mpp")
        self.batch_size = batch_size
        with torch.no_grad():  # whether the model has per-tile attention or scores: ask it, on a one-tile bag
            has_attention = self.model(torch.zeros(1, model.in_dim, device=device)).attention is not None
        self.no_heatmap = None if has_attention else f"{model.paper} gives no per-tile attention or score to draw"

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", *, device: str = "auto",
                 assume_mpp: float | None = None, weights: str | Path | None = None,
                 batch_size: int = 32) -> BaselinePredictor:
        """Load a baseline run's model (``checkpoint_best.pt``, else ``_last``) and rebuild its feature extractor.

        Args:
            run_dir: a run directory of ``wsilocal baseline``.
            checkpoint: ``"best"`` (falls back to ``"last"``) or ``"last"``.
            device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
            assume_mpp: µm/px of slides without resolution metadata (default: what the features assumed).
            weights: the extractor's weights file, when it is no longer where the features recorded it.
            batch_size: tiles per forward pass of the extractor.

        Raises:
            WsilocalError: not a baseline run, extraction settings unknown, the weights file missing or not the
                one the features were made with (checked by SHA-256), features of another dimension.
        """
        run, meta = _baseline_run(run_dir, checkpoint, assume_mpp)
        settings = run_feature_settings(run.path)
        if settings["format_version"] != FORMAT_VERSION:
            raise WsilocalError(f"{run.path}: its features are of format version {settings['format_version']}, "
                                f"this wsilocal makes version {FORMAT_VERSION}; re-extract them and retrain")
        recorded = settings["weights"]
        path = Path(weights) if weights is not None else Path(recorded) if recorded else None
        if path is not None and not path.is_file():
            raise WsilocalError(f"{path}: feature extractor weights not found (the run's features were made with "
                                f"{recorded or 'random weights'}); give the file's current path with --weights")
        extractor = FeatureExtractor(path, settings.get("arch", DEFAULT_ARCH))  # runs recorded before: resnet34
        if extractor.description != settings["extractor"]:
            ours, theirs = (d.rsplit("; ", 1)[-1] for d in (extractor.description, settings["extractor"]))
            raise WsilocalError(f"{path or 'no --weights'}: the feature extractor would use {ours}, but the run's "
                                f"features were made with {theirs} ({recorded or 'no weights file'}); give that "
                                "file with --weights")
        if extractor.dim != meta.get("in_dim"):
            raise WsilocalError(f"{run.path}: the model takes {meta.get('in_dim')}-d features, the extractor "
                                f"makes {extractor.dim}-d ones")
        _, model, state = load_baseline_run(run.path, checkpoint)
        return cls(model, extractor, state["classes"], settings, device=resolve_device(device),
                   assume_mpp=assume_mpp, batch_size=batch_size)

    def bag(self, slide: Slide, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """The tiles of an open slide as ``wsilocal features`` makes them: level-0 coords (N, 2) int64,
        features (N, D) float32, and the tiles' edge in level-0 pixels."""
        mpp, tile = self.settings["mpp"], self.settings["tile"]
        coords = tissue_tiles(slide, mpp, tile, self.settings["min_tissue"], self.settings["mask_mpp"])
        features = tile_features(slide, coords, self.extractor, mpp, tile, batch_size=self.batch_size,
                                 progress=progress, desc=slide.path.stem)
        return np.asarray(coords, np.int64), features, tile_size_level0(slide, mpp, tile)

    def predict(self, slide_path: str | Path, *, heatmap: bool = False, progress: bool = False) -> Prediction:
        """Predict one slide; with ``heatmap=True`` also keep the tiles' attention (or scores) on the tile grid.

        Raises:
            SlideError: the file is missing or unreadable, has no MPP (and none is assumed), shows no tissue or
                no tile with enough of it, or memory ran out.
        """
        path = Path(slide_path)
        start = time.perf_counter()
        peak = PeakMemory(self.device)
        with peak, open_slide(path, assume_mpp=self.assume_mpp) as slide:
            with torch.no_grad(), out_of_memory_as_slide_error(path, "the tiles' features or the MIL model"):
                coords, features, tile_level0 = self.bag(slide, progress=progress)
                features_done = time.perf_counter()  # the features are on the CPU: the device is done
                output = self.model(torch.from_numpy(features).to(self.device))
                probabilities = torch.softmax(output.logits, dim=1)[0].cpu().numpy()
                scores = output.attention.cpu().numpy() if heatmap and output.attention is not None else None
                head_done = time.perf_counter()
        return tile_prediction(path, self.classes, probabilities, coords, tile_level0, self.settings["mpp"],
                               scores=scores, attention_is_softmax=self.model.attention_is_softmax,
                               seconds=time.perf_counter() - start, peak_memory_bytes=peak.bytes,
                               stages={"features": features_done - start, "head": head_done - features_done})


def tile_prediction(slide: str | Path, classes: Sequence[str], probabilities: Sequence[float], coords: np.ndarray,
                    tile_level0: int, mpp: float, *, scores: np.ndarray | None = None,
                    attention_is_softmax: bool = True, seconds: float = 0.0, peak_memory_bytes: int = 0,
                    stages: dict[str, float] | None = None) -> Prediction:
    """A :class:`Prediction` of a tile-based model: its map is the tile grid (one cell = one tile of
    ``tile_level0`` level-0 px), holding ``scores`` (per tile, in ``coords`` order) when given."""
    grid, origin = tile_attention_map(coords, np.zeros(len(coords)) if scores is None else scores, tile_level0)
    probabilities = np.asarray(probabilities, np.float64)
    return Prediction(
        slide=str(slide),
        predicted=classes[int(probabilities.argmax())],
        probabilities={name: float(p) for name, p in zip(classes, probabilities, strict=True)},
        seconds=seconds,
        peak_memory_bytes=peak_memory_bytes,
        mode="tiles",
        feature_shape=grid.shape,
        bbox=(origin[0], origin[1], grid.shape[1] * tile_level0, grid.shape[0] * tile_level0),
        mpp=mpp,
        cell_origin=(float(origin[0]), float(origin[1])),
        cell_size=(float(tile_level0), float(tile_level0)),
        attention=None if scores is None else grid,
        stages=stages or {},
        attention_is_softmax=attention_is_softmax,
    )


@dataclass
class EvaluationHeatmaps:
    """What :func:`evaluation_heatmaps` did: files by slide id, slides without a heatmap and why, or a note."""

    folder: Path
    written: dict[str, dict[str, Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # set when the model has no attention map at all


def evaluation_heatmaps(run_dir: str | Path, split: str = "test") -> EvaluationHeatmaps:
    """Heatmaps of an evaluated split of a baseline run, in ``RUN/heatmaps_<split>/``.

    Reads what ``wsilocal evaluate`` wrote — ``predictions_<split>.csv`` and each slide's tile attention in
    ``attention_<split>/<slide_id>.csv`` — the tile size from the slide's feature file (``tile_level0``) and
    the slide file (for the thumbnail) from the run's cohort. A slide whose heatmap cannot be drawn (slide file
    missing, feature file without a tile size, ...) is listed in ``failed`` with its reason; the others finish.

    Raises:
        WsilocalError: the split was not evaluated yet.
    """
    run, meta = _baseline_run(run_dir)
    config = run.config()
    classes = list(meta["classes"])
    result = EvaluationHeatmaps(run.heatmaps_folder(split))
    files = run.evaluation_files(split)
    predictions_csv, attention_dir = files.predictions, files.attention
    if not predictions_csv.is_file():
        raise WsilocalError(f"{predictions_csv}: not found; run `wsilocal evaluate {run.path} --split {split}` first")
    if not attention_dir.is_dir():
        result.note = (f"no heatmaps: {config.model} wrote no tile attention for split {split!r} "
                       f"({attention_dir} is missing), it has no attention map")
        return result
    with open(predictions_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    cohort = load_cohort(config.cohort, classes=classes, check_files=False, allow_outside=config.allow_outside_paths)
    slides = {s.slide_id: s.path for s in cohort.slides}
    for row in rows:
        slide_id = row["slide_id"]
        try:
            if slide_id not in slides:
                raise WsilocalError(f"{config.cohort}: no slide {slide_id!r} (the cohort changed since evaluate)")
            h5 = features_path(config.features, slide_id)
            attrs = read_attrs(h5)
            if "tile_level0" not in attrs or "mpp" not in attrs:
                raise WsilocalError(f"{h5}: records no tile size (tile_level0, mpp): not made by `wsilocal features`")
            table = np.loadtxt(attention_dir / f"{slide_id}.csv", delimiter=",", skiprows=1, ndmin=2)
            prediction = tile_prediction(slides[slide_id], classes, [float(row[f"p_{c}"]) for c in classes],
                                         table[:, :2].astype(np.int64), int(attrs["tile_level0"]),
                                         float(attrs["mpp"]), scores=table[:, 2],
                                         attention_is_softmax=MIL_MODELS[config.model].attention_is_softmax)
            result.written[slide_id] = save_heatmap(prediction, slides[slide_id], result.folder, slide_id=slide_id)
        except WsilocalError as exc:
            result.failed[slide_id] = str(exc)
        except (OSError, ValueError) as exc:  # a missing or malformed attention CSV
            result.failed[slide_id] = f"{type(exc).__name__}: {exc}"
    return result


def format_heatmaps(result: EvaluationHeatmaps) -> str:
    """One line for the terminal, then every slide without a heatmap and why."""
    if result.note:
        return result.note
    lines = [f"heatmaps of {len(result.written)} slides → {result.folder}"]
    lines += [f"no heatmap for {slide_id}: {reason}" for slide_id, reason in result.failed.items()]
    return "\n".join(lines)

