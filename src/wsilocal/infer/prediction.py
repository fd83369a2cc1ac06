"""What every predictor shares: the :class:`Prediction` of a slide, the :class:`SlidePredictor` protocol, the
:class:`PeakMemory` meter and the checks of the options every predictor takes (:func:`check_run_options`).

The method's :class:`~wsilocal.infer.predict.Predictor` and the baselines'
:class:`~wsilocal.infer.baseline_predict.BaselinePredictor` both build on this module;
:func:`~wsilocal.infer.load.load_predictor` picks one of them by the kind of run.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from wsilocal.errors import ConfigError, WsilocalError
from wsilocal.run.directory import CHECKPOINTS, RunDirectory
from wsilocal.runtime import process_memory_bytes, trim_heap


@dataclass(frozen=True, eq=False)
class Prediction:
    """The prediction for one slide.

    Attributes:
        slide: the slide file.
        predicted: the most probable class.
        probabilities: class name → probability (the run's class order).
        seconds: wall time of the whole prediction (open, tissue detection, reading, forward).
        peak_memory_bytes: peak resident memory added by this prediction (CPU), or peak CUDA memory allocated
            beyond what was allocated before it (GPU); None where it was not measured
            (``Predictor.predict(..., measure_memory=False)``).
        mode: ``"whole"`` (one forward over the whole tissue image) or ``"streamed"`` (exact band streaming,
            :mod:`wsilocal.stream.bands`); ``"tiles"`` for a tile-based MIL baseline.
        feature_shape: (h, w) of the trunk's final map, one attention weight per cell (a baseline: of its tile
            grid, one cell per tile).
        bbox: the tissue box (x, y, width, height) in level-0 pixels (a baseline: the box its tile grid covers).
        mpp: the resolution the tissue box was read at (the run's).
        cell_origin: level-0 (x, y) of the top-left corner of map cell (0, 0).
        cell_size: level-0 (width, height) of one map cell. Cell (i, j) covers
            ``x ∈ [x0 + j·w, x0 + (j+1)·w)``, ``y ∈ [y0 + i·h, y0 + (i+1)·h)``: a square centred on its
            receptive field, so cell (0, 0) starts about half a cell before the tissue box. The heatmap files
            cut or extend the outer rows and columns to the box's edges
            (:func:`~wsilocal.infer.heatmap.cell_edges`).
        attention: H's attention map (h, w), summing to 1 (only with ``heatmap=True``). A baseline's map holds
            its per-tile attention or scores, NaN in cells without a tile
            (:func:`~wsilocal.infer.heatmap.tile_attention_map`).
        evidence: per-class evidence maps (n_classes, h, w): ``attention × softmax(H's classifier(feature))``
            at each cell (only with ``heatmap=True``; see :func:`~wsilocal.infer.predict.class_evidence`).
        stages: seconds of each step, summing to about ``seconds``: ``tissue`` (open the file, find the
            tissue), ``read`` (read and resample the tissue box at the run's MPP, normalise), ``trunk`` (the
            trunk's forward; streamed, it overlaps the reads, which are not counted here) and
            ``head`` (H, and the evidence maps with ``heatmap=True``). A baseline: ``features`` (open the file,
            find the tissue, read the tiles, extract their features) and ``head`` (the MIL model).
        attention_is_softmax: whether ``attention`` is a distribution over the cells (H, ABMIL, CLAM, DSMIL)
            rather than per-tile scores in [0, 1] (max-/mean-pooling, MIL-RNN); the heatmap scales it accordingly.
        attended: bool (h, w), the cells H may attend to — the tissue cells of a run that masks glass (only with
            ``heatmap=True``); None: every cell.
    """

    slide: str
    predicted: str
    probabilities: dict[str, float]
    seconds: float
    peak_memory_bytes: int | None
    mode: str
    feature_shape: tuple[int, int]
    bbox: tuple[int, int, int, int]
    mpp: float
    cell_origin: tuple[float, float]
    cell_size: tuple[float, float]
    attention: np.ndarray | None = None
    evidence: np.ndarray | None = None
    stages: dict[str, float] = field(default_factory=dict)
    attention_is_softmax: bool = True
    attended: np.ndarray | None = None


class SlidePredictor(Protocol):
    """What :func:`~wsilocal.infer.predict.predict_slides` needs of a predictor:
    :class:`~wsilocal.infer.predict.Predictor` or :class:`~wsilocal.infer.baseline_predict.BaselinePredictor`."""

    classes: list[str]
    device: torch.device
    no_heatmap: str | None  # why this model can draw no heatmap; None when it can

    def predict(self, slide_path: str | Path, *, heatmap: bool = False, progress: bool = False) -> Prediction: ...


class PeakMemory:
    """Measures the peak memory a block of code adds: resident set size on CPU, CUDA allocations on GPU.

    Entering it first resets (:meth:`reset`): on CPU, freed heap memory is handed back to the OS (``malloc_trim``)
    and the kernel's high-water mark reset (``/proc/self/clear_refs``), so the figure is this block's own peak
    even when an earlier slide was larger. Where the mark cannot be reset, it is the process peak minus the RSS at
    the start (an upper bound).

    The reset costs time inside and after it: the heap handed back must be page-faulted in again by the next large
    allocation. Code that is timed against code without the meter must run without it (see
    ``Predictor.predict(..., measure_memory=False)``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def reset(self) -> None:
        """Collect garbage and reset the peak: CUDA's peak statistics, or (CPU) trim the heap and reset the
        kernel's high-water mark."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            trim_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def __enter__(self) -> PeakMemory:
        self.reset()
        if self.device.type == "cuda":
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = process_memory_bytes("VmRSS")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self.bytes = max(0, process_memory_bytes("VmHWM") - self._start)


def check_run_options(run_dir: str | Path, checkpoint: str, assume_mpp: float | None) -> tuple[RunDirectory, dict]:
    """The run directory and its ``model.json``, once the options every predictor takes are checked."""
    run = RunDirectory(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    if not run.config_file.is_file() or not run.metadata_file.is_file():
        raise WsilocalError(f"{run.path}: not a run directory (needs {run.config_file.name} and "
                            f"{run.metadata_file.name})")
    if assume_mpp is not None and not (math.isfinite(assume_mpp) and assume_mpp > 0):
        raise ConfigError(f"--assume-mpp must be a positive number of microns per pixel, got {assume_mpp}")
    return run, run.metadata()
