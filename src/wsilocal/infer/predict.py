"""``wsilocal predict``: class probabilities (and attention maps) of whole slides, straight from their files.

Inference uses what the method keeps at test time (DESIGN.md §1): the trunk and the final classifier H; the
auxiliary models are neither built nor loaded. A slide is opened, its tissue found as ``wsilocal prepare``
finds it (same overview resolution, margin and size limit), and the tissue box is streamed at the run's
resolution through the trunk — the whole image at once when that fits the memory budget and is the faster mode,
exactly in bands otherwise (:func:`wsilocal.stream.forward.trunk_forward`). No cache is written, and the
pixels are those the cache would hold, so a prediction equals what ``wsilocal evaluate`` computes.

A run of a tile-based MIL baseline (``wsilocal baseline``) predicts through the same functions:
:func:`~wsilocal.infer.load.load_predictor` returns a :class:`Predictor` or a
:class:`~wsilocal.infer.baseline_predict.BaselinePredictor` by the run's kind, and both give a
:class:`~wsilocal.infer.prediction.Prediction`.

The trunk can run in bfloat16 (``dtype=torch.bfloat16``, ``wsilocal predict --bf16``); H always runs in
float32. It pays only where the hardware computes bfloat16 (:func:`bfloat16_is_native`): elsewhere PyTorch
emulates it, many times slower than float32 (``docs/inference.md`` has the measured speed-up and accuracy).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from wsilocal.errors import CheckpointError, ConfigError, WsilocalError, out_of_memory_as_slide_error
from wsilocal.infer.heatmap import save_heatmap
from wsilocal.infer.prediction import PeakMemory, Prediction, SlidePredictor, check_run_options
from wsilocal.models.heads import FinalClassifier
from wsilocal.models.resnet import ResNetTrunk
from wsilocal.prepare.cache import PrepareSettings, settings_for, tissue_read_size
from wsilocal.run.directory import expected_signature, masks_glass
from wsilocal.runtime import default_memory_budget, resolve_device
from wsilocal.slide.cohort import load_cohort
from wsilocal.slide.reader import open_slide
from wsilocal.slide.tissue import detect_tissue, image_tissue_mask
from wsilocal.stream.bands import block_input_lengths
from wsilocal.stream.forward import stream_from_pixels, trunk_forward
from wsilocal.stream.geometry import footprint, tissue_positions, trunk_geometry
from wsilocal.stream.sources import SlideSource
from wsilocal.train.checkpoint import load_checkpoint

DTYPES = (torch.float32, torch.bfloat16)  # precisions the trunk can run in


@torch.no_grad()
def class_evidence(head: FinalClassifier, features: torch.Tensor, attention: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class evidence of each map cell: ``attention_i × softmax(classifier(h_i))_c``, shape (n, h, w).

    H's attention is class-agnostic (one weight per cell), and its classifier is an MLP applied to the
    attention-weighted mean feature, so a cell's contribution to a class logit is not separable. Instead each
    cell's own feature ``h_i`` (what H pools: the trunk's, or its context block's output) is classified by the same
    MLP and its class probabilities are weighted by the cell's attention: summed over cells, evidence shows *where*
    the attended tissue looks like each class.
    """
    height, width = features.shape[2:]
    instances = head.instances(features, mask).flatten(2)[0].t()  # (h·w, C)
    per_cell = torch.softmax(head.classifier(instances), dim=1)  # (h·w, n_classes)
    return (attention.reshape(-1, 1) * per_cell).t().reshape(-1, height, width)


def _receptive_grid(trunk: ResNetTrunk) -> tuple[int, float]:
    """Total stride of the trunk and the image x of output 0's receptive-field centre (pixel edges at integers)."""
    stride, first, last = footprint(trunk_geometry(trunk))
    return stride, (first + last) / 2 + 0.5  # + 0.5: from a pixel's index to its centre


def bfloat16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions in hardware: a CUDA GPU with bfloat16, or a CPU with
    AVX-512 BF16 / AMX (oneDNN). Elsewhere PyTorch emulates bfloat16, far slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


class _TimedSource:
    """An :class:`~wsilocal.stream.sources.ImageSource` that adds up the seconds spent reading its windows."""

    def __init__(self, source: SlideSource):
        self.source, self.height, self.width = source, source.height, source.width
        self.seconds = 0.0

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        start = time.perf_counter()
        window = self.source.read(top, left, height, width)
        self.seconds += time.perf_counter() - start
        return window

    def read_bytes(self, height: int, width: int) -> int:
        """What reading a window holds at its peak: the wrapped source's (the band choice counts it)."""
        return self.source.read_bytes(height, width)


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Load the ``prefix``-keys of a LocalNet state dict into ``module``; every key of it must be there."""
    part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in part]
    unexpected = [prefix + k for k in part if k not in expected]
    mismatched = [f"{prefix}{k} {tuple(part[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in part and part[k].shape != v.shape]
    problems = [f"{label} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''} ({len(keys)} keys)"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if keys]
    if problems:
        raise CheckpointError(f"{path}: does not fit the model: {'; '.join(problems)}")
    module.load_state_dict(part)


class Predictor:
    """Trunk + final classifier H of a trained run, applied to slide files. Make one with :meth:`from_run`.

    ``dtype`` is the trunk's precision (float32 or bfloat16); the trunk module is converted in place. With
    ``mask_glass`` H attends only to the map positions whose cell of the tissue image holds tissue, from the mask
    that ``wsilocal prepare`` stores beside the cached image (the same function on the same tissue detection).
    """

    no_heatmap: str | None = None  # H always has an attention map

    def __init__(self, trunk: ResNetTrunk, head: FinalClassifier, classes: Sequence[str], mean: Sequence[float],
                 std: Sequence[float], settings: PrepareSettings, *, device: torch.device,
                 memory_budget: int | None = None, band: int | None = None, dtype: torch.dtype = torch.float32,
                 mask_glass: bool = False):
        if dtype not in DTYPES:
            raise ConfigError(f"inference dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
        self.device = device
        self.dtype = dtype
        self.trunk = trunk.to(device=device, dtype=dtype).eval()
        self.head = head.to(device).eval()  # float32: its softmax over up to 10^5 cells needs the precision
        self.classes = list(classes)
        self.mean, self.std = list(mean), list(std)
        self.settings = settings
        self.memory_budget = memory_budget if memory_budget is not None else default_memory_budget(device)
        self.band = band
        self.stream_from = stream_from_pixels(device)  # on a CPU, streaming is faster from ~1 Mpx up
        self.mask_glass = mask_glass
        self.stride, self.centre = _receptive_grid(trunk)

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", *, device: str = "auto",
                 memory_budget: int | None = None, band: int | None = None, assume_mpp: float | None = None,
                 dtype: torch.dtype = torch.float32) -> Predictor:
        """Load a run directory's trunk and classifier H (``checkpoint_best.pt``, else ``_last``).

        Args:
            run_dir: a training run (``config.yaml``, ``model.json``, checkpoints).
            checkpoint: ``"best"`` (falls back to ``"last"`` when a run has no best yet) or ``"last"``.
            device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
            memory_budget: bytes a whole-image forward may take; larger slides are streamed in bands. Default: half the
                available RAM, or 80 % of the free GPU memory.
            band: stream every slide in bands of this many output rows per trunk block (see
                :func:`~wsilocal.stream.bands.band_forward`), even one that fits whole. Default: slides whose
                whole-image forward exceeds the budget, and on a CPU every slide whose tissue image has 1024² px
                or more (faster streamed: :func:`~wsilocal.stream.forward.stream_from_pixels`), with the largest
                band that fits the budget.
            assume_mpp: µm/px for slides without resolution metadata (default: the run's ``assume_mpp``).
            dtype: precision of the trunk, ``torch.float32`` or ``torch.bfloat16`` (see :func:`bfloat16_is_native`).
        """
        run, meta = check_run_options(run_dir, checkpoint, assume_mpp)
        if run.is_baseline:
            raise WsilocalError(f"{run.path}: a tile-based MIL baseline run; load it with load_predictor() or "
                                "BaselinePredictor.from_run()")
        if memory_budget is not None and memory_budget <= 0:
            raise ConfigError(f"memory budget must be positive, got {memory_budget} bytes")
        if band is not None and band < 1:
            raise ConfigError(f"band must be a positive number of rows, got {band}")
        config = run.config()
        try:
            classes, mean, std = meta["classes"], meta["mean"], meta["std"]
        except KeyError as exc:
            raise run.unreadable_metadata(exc) from None
        path = run.checkpoint_path(checkpoint)
        state = load_checkpoint(path, expected_signature=expected_signature(config, meta))
        trunk = ResNetTrunk(config.conv1_stride, config.fold_bn, arch=config.arch)  # resnet34 for older runs
        head = FinalClassifier(trunk.out_channels, len(classes), context=config.head_context)
        _load_part(trunk, state["model"], "trunk.", path)
        _load_part(head, state["model"], "head.", path)
        settings = settings_for(config, assume_mpp=assume_mpp)
        return cls(trunk, head, classes, mean, std, settings, device=resolve_device(device),
                   memory_budget=memory_budget, band=band, dtype=dtype, mask_glass=masks_glass(meta))

    def predict(self, slide_path: str | Path, *, heatmap: bool = False, progress: bool = False,
                measure_memory: bool = True) -> Prediction:
        """Predict one slide; with ``heatmap=True`` also keep its attention and per-class evidence maps.

        With ``measure_memory`` (the default) the prediction's peak memory is measured (:class:`PeakMemory`); the
        meter's reset runs before the clock starts, so ``seconds`` does not include it. ``measure_memory=False``
        skips the meter altogether (``peak_memory_bytes`` is None): nothing is trimmed or collected, as when the
        prediction is timed against code that does not trim either (``wsilocal bench speed``).

        Raises:
            SlideError: the file is missing or unreadable, has no MPP (and none is assumed), shows no tissue,
                its tissue is larger than the run's ``max_pixels``, or memory ran out.
        """
        path = Path(slide_path)
        settings = self.settings
        peak = PeakMemory(self.device) if measure_memory else None
        with peak if peak is not None else nullcontext():  # the meter's reset, before the clock starts
            start = time.perf_counter()
            with open_slide(path, assume_mpp=settings.assume_mpp) as slide:
                slide.mpp  # noqa: B018 -- a clear SlideError when the file has no MPP and none is assumed
                region = detect_tissue(slide, mask_mpp=settings.mask_mpp, margin=settings.margin)
                bbox = region.bbox
                tissue_done = time.perf_counter()
                # The image and the pixels decoded to make it (a flat TIFF decodes its full-resolution box) both
                # count against the run's max_pixels, before anything is read.
                out_w, out_h = tissue_read_size(slide, bbox, settings.mpp, settings.max_pixels)
                tissue = image_tissue_mask(region, slide.level_dimensions[0], (out_w, out_h))
                source = _TimedSource(SlideSource(slide, settings.mpp, bbox, self.mean, self.std))
                blocks = self.trunk.blocks()
                map_hw = (block_input_lengths(blocks, out_h)[-1], block_input_lengths(blocks, out_w)[-1])
                # H attends to the tissue cells only; streamed, the trunk computes only what they depend on.
                mask = tissue_positions(blocks, tissue, map_hw) if self.mask_glass else None
                with torch.no_grad(), out_of_memory_as_slide_error(
                        path, f"the {out_w}×{out_h} px tissue image; lower --memory-budget-gb so it is streamed"):
                    features, mode = trunk_forward(self.trunk, source, memory_budget=self.memory_budget,
                                                   band=self.band, stream_from=self.stream_from,
                                                   progress=progress,
                                                   needed=None if mask is None else mask.numpy())
                    trunk_done = _clock(self.device)
                    features = features.to(self.device, torch.float32)
                    logits, attention = self.head(features, mask)
                    probabilities = torch.softmax(logits, dim=1)[0].cpu().numpy()
                    evidence = class_evidence(self.head, features, attention, mask).cpu().numpy() if heatmap else None
                    head_done = time.perf_counter()  # .cpu() waited for the device
        # The image is out_w × out_h pixels of bbox_w / out_w level-0 px each; a map cell is `stride` of them.
        scale = (bbox[2] / out_w, bbox[3] / out_h)
        origin = tuple(float(b + (self.centre - self.stride / 2) * s) for b, s in zip(bbox[:2], scale, strict=True))
        return Prediction(
            slide=str(path),
            predicted=self.classes[int(probabilities.argmax())],
            probabilities={name: float(p) for name, p in zip(self.classes, probabilities, strict=True)},
            seconds=time.perf_counter() - start,
            peak_memory_bytes=peak.bytes if peak is not None else None,
            mode=mode,
            feature_shape=(int(features.shape[2]), int(features.shape[3])),
            bbox=tuple(int(v) for v in bbox),
            mpp=settings.mpp,
            cell_origin=origin,
            cell_size=(self.stride * scale[0], self.stride * scale[1]),
            attention=attention.cpu().numpy() if heatmap else None,
            attended=mask.cpu().numpy() if heatmap and mask is not None else None,
            evidence=evidence,
            stages={"tissue": tissue_done - start, "read": source.seconds,
                    "trunk": trunk_done - tissue_done - source.seconds, "head": head_done - trunk_done},
        )


@dataclass
class PredictionRun:
    """What :func:`predict_slides` did: predictions and skipped slides (slide id → reason) by slide id."""

    predictions: dict[str, Prediction]
    skipped: dict[str, str]
    paths: dict[str, str]  # slide id → slide file, for every slide asked for
    predictions_csv: Path
    skipped_csv: Path
    warnings: list[str] = field(default_factory=list)  # e.g. that the model has no attention map to draw


def predict_slides(predictor: SlidePredictor, slides: Sequence[tuple[str, str | Path]], out_dir: str | Path, *,
                   heatmap: bool = False, progress: bool = True) -> PredictionRun:
    """Predict many slides; a slide that fails is reported and skipped, the others finish.

    Writes ``OUT/predictions.csv`` (``slide_id, path, predicted, p_<class>…, seconds, peak_memory_mb, mode``;
    rows are written as slides finish), ``OUT/skipped.csv`` (``slide_id, path, reason``; header only when
    none failed) and, with ``heatmap=True``, each slide's heatmap files (:func:`~wsilocal.infer.heatmap.save_heatmap`)
    — or, for a model without an attention map, a warning in ``run.warnings`` saying so.
    """
    ids = [slide_id for slide_id, _ in slides]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise WsilocalError(f"duplicate slide id(s): {', '.join(duplicates)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = PredictionRun({}, {}, {slide_id: str(path) for slide_id, path in slides},
                        out / "predictions.csv", out / "skipped.csv")
    if heatmap and predictor.no_heatmap:
        run.warnings.append(f"no heatmaps written: {predictor.no_heatmap}")
        heatmap = False
    with open(run.predictions_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "path", "predicted", *[f"p_{c}" for c in predictor.classes], "seconds",
                         "peak_memory_mb", "mode"])
        for slide_id, path in tqdm(slides, desc="predict", unit="slide", disable=not progress):
            try:
                prediction = predictor.predict(path, heatmap=heatmap, progress=progress)
                if heatmap:
                    save_heatmap(prediction, path, out, slide_id=slide_id)
            except WsilocalError as exc:
                run.skipped[slide_id] = str(exc)
                continue
            except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # disk full, data the reader missed
                run.skipped[slide_id] = f"{path}: {type(exc).__name__}: {exc}"
                continue
            run.predictions[slide_id] = prediction
            writer.writerow([slide_id, str(path), prediction.predicted,
                             *[repr(float(p)) for p in prediction.probabilities.values()],
                             f"{prediction.seconds:.2f}", f"{prediction.peak_memory_bytes / 2**20:.1f}",
                             prediction.mode])
            handle.flush()
    with open(run.skipped_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "path", "reason"])
        writer.writerows([slide_id, run.paths[slide_id], reason] for slide_id, reason in run.skipped.items())
    return run


def cohort_slides(csv_path: str | Path, classes: Sequence[str], split: str | None = None, *,
                  strict: bool = False) -> list[tuple[str, Path]]:
    """(slide id, path) of a cohort CSV's slides, of one split or all. Missing files are left for
    :func:`predict_slides` to report, so one bad row does not stop the others; ``strict`` refuses the cohort
    instead, before any work (:class:`~wsilocal.errors.CohortError` listing every missing or unreadable file)."""
    cohort = load_cohort(csv_path, classes=list(classes), check_files=strict)
    chosen = cohort.split(split) if split else cohort.slides
    if not chosen:
        raise WsilocalError(f"{csv_path}: split {split!r} has no slides")
    return [(s.slide_id, s.path) for s in chosen]


def named_slides(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(slide id, path) of slide files given by name: the id is the file name without its extension."""
    slides = [(Path(p).stem, Path(p)) for p in paths]
    stems = [s for s, _ in slides]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise WsilocalError(f"several slides are named {', '.join(clashes)}; their outputs would collide "
                            "(rename them or use --cohort with distinct slide ids)")
    return slides


def format_run(run: PredictionRun) -> str:
    """A table of the predictions for the terminal, then every skipped slide with its reason."""
    width = max([8, *(len(i) for i in run.paths)])
    lines = [f"{'slide':<{width}}  {'predicted':<16}{'p':>7}{'seconds':>9}{'peak MB':>9}  mode"]
    for slide_id, p in run.predictions.items():
        lines.append(f"{slide_id:<{width}}  {p.predicted:<16}{p.probabilities[p.predicted]:>7.3f}"
                     f"{p.seconds:>9.1f}{p.peak_memory_bytes / 2**20:>9.0f}  {p.mode}")
    lines.append(f"{len(run.predictions)} predicted, {len(run.skipped)} skipped → {run.predictions_csv}")
    lines += [f"skipped {slide_id}: {reason}" for slide_id, reason in run.skipped.items()]
    lines += [f"warning: {warning}" for warning in run.warnings]
    return "\n".join(lines)
