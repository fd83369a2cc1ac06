"""``wsilocal bench speed``: the paper's Table 3 — whole-slide inference against the tile pipeline — on this machine.

For each slide size (the tissue image at 5x, height × width) one synthetic slide file is written (and kept in
``OUT/slides`` for the next run) and two ways of classifying it from the file are timed:

(a) **ours**: :meth:`wsilocal.infer.predict.Predictor.predict` — open, find the tissue, stream the tissue box
    at 5x through the stride-3 trunk (whole or band-streamed, the automatic memory budget; streamed, only what
    the tissue positions depend on is computed) and H, which attends to the tissue positions (glass masked,
    as a new run does);
(b) **pipeline**: the tile-based gated-ABMIL pipeline the paper compares against, as its users run it and with
    the project's own pieces (those of ``wsilocal features``): the same tissue detection, a grid of 256×256
    tiles at 5x with ≥ 25 % tissue, each tile read from the file with OpenSlide and resampled, batches of
    tiles through the standard stride-2 ResNet34 (reader threads fill the next batch during the forward, as
    CLAM's DataLoader workers do), the features written to and read back from an HDF5 file, gated ABMIL.

Both run in float32 with the same torch threads, in one child process per size, in interleaved rounds after
a warm-up round (medians; the order rotates each round). The timed rounds of ours run without the memory meter
(:class:`~wsilocal.infer.predict.PeakMemory`): its reset hands the freed heap back to the OS, and every round
would then page-fault its activations in again while the pipeline's rounds reuse the heap. Memory is measured
apart instead: per size, two fresh child processes predict the slide once each, with the meter, one with the
whole-image forward and one streamed in bands: their peak RSS shows the streamed one staying flat as the slide grows.
bfloat16 inference (trunk in bfloat16, H in float32) is timed in the same rounds where the hardware computes
bfloat16 natively; elsewhere PyTorch emulates it (20× slower than float32 on an AVX2 CPU), so it is measured
once on a small probe slide only, for its accuracy and the size of the slow-down.

Weights are random (seeded; the trunk's BatchNorm calibrated on a synthetic crop so activations have a sane
scale) unless ``--run`` gives a trained run: the time does not depend on them.

Slides: a procedural H&E-like pattern (tissue pieces from smoothed noise covering about 60 % of the box,
4-px "nuclei" on pink stroma, scanner noise), written with
:func:`~wsilocal.slide.tiff_writer.write_pyramidal_tiff` as Aperio SVS whose level 0 is at ``scan_mpp``
(default 1.0 µm/px, i.e. the 10x level of a 40x scan). Reading at 5x then decodes that level, exactly the
level a 40x slide's 5x read decodes, while the file is 16× smaller to write than its 40x original.
(:mod:`wsilocal.synth` renders a 8192² slide at 5x — 65536² px at 0.25 µm/px — in far too long.)

Results: ``OUT/speed.json`` (one record per size), ``OUT/speed.md`` (tables) and ``OUT/speed.png`` (plot).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from wsilocal.atomic import atomic_output
from wsilocal.bench import log_progress
from wsilocal.bench.child import run_child
from wsilocal.bench.options import BATCH_SIZE, SCAN_MPP, pipeline_workers
from wsilocal.errors import ConfigError, SlideError
from wsilocal.features.extract import IMAGENET_MEAN, IMAGENET_STD, MASK_MPP, FeatureExtractor, tile_batches
from wsilocal.features.h5 import read_features, write_features
from wsilocal.features.tiles import tile_grid
from wsilocal.infer.predict import Predictor, bfloat16_is_native
from wsilocal.models.heads import FinalClassifier
from wsilocal.models.mil.abmil import GatedABMIL
from wsilocal.models.resnet import DEFAULT_ARCH, ResNetTrunk, calibrate_batchnorm
from wsilocal.prepare.cache import PrepareSettings
from wsilocal.runtime import default_memory_budget, process_memory_bytes, resolve_device, tune_cpu_allocator
from wsilocal.slide.reader import open_slide
from wsilocal.slide.tiff_writer import write_pyramidal_tiff
from wsilocal.slide.tissue import detect_tissue
from wsilocal.stream.bands import DEFAULT_BAND
from wsilocal.stream.forward import whole_forward_bytes
from wsilocal.stream.sources import to_tensor

MPP = 2.0  # 5x, the paper's resolution
TILE = 256  # the pipeline's tiles, px at MPP
MIN_TISSUE = 0.25  # the pipeline's tile selection (``wsilocal features``' default)
WORKERS = pipeline_workers()  # the pipeline's reader threads; its batch size and slides' MPP: BATCH_SIZE, SCAN_MPP
N_CLASSES = 2
SEED = 0
BF16_TOLERANCE = 0.01  # bfloat16 is offered when its probabilities stay this close to float32
BF16_PROBE = (512, 512)  # (height, width) at 5x of the probe slide where bfloat16 is emulated
DEFAULT_SIZES = ((2048, 2048), (4096, 4096), (8192, 8192))
QUICK_SIZES = ((512, 512), (1024, 1024), (1536, 1536))
WHOLE = 2**62  # a memory budget that forces the whole-image forward
MiB = 2**20

# Paper, Table 3 (GPU, TCGA slides): seconds of GABMIL (tiling + features + prediction) and of ours.
PAPER_TABLE3 = {"sizes": [(8698, 7496), (12223, 10057), (23849, 10257)],  # width × height as printed
                "pipeline_s": [2.9, 4.4, 11.4], "ours_s": [0.3, 0.6, 1.2], "ratio": [9.7, 7.3, 9.5]}

# --- synthetic slides -----------------------------------------------------------------------------------

SLIDE_VERSION = 1  # part of the cached file name: bump when the pattern changes
FIELD = 16  # level-0 px per cell of the tissue field
GLASS_MARGIN = 0.03  # share of each side left as glass around the tissue
TISSUE_SHARE = 0.6  # share of the tissue box covered by tissue
GLASS, STROMA, NUCLEUS = (242, 240, 243), (226, 150, 196), (112, 62, 150)


def _tissue_field(size: tuple[int, int], seed: int) -> np.ndarray:
    """Bool tissue mask, one cell per ``FIELD`` level-0 px: smoothed noise thresholded inside a glass margin."""
    cols, rows = (max(8, math.ceil(side / FIELD)) for side in size)
    rng = np.random.default_rng([seed, 1])
    field = ndimage.gaussian_filter(rng.standard_normal((rows, cols)), sigma=max(rows, cols) / 14, mode="wrap")
    inside = np.zeros((rows, cols), bool)
    mr, mc = math.ceil(rows * GLASS_MARGIN), math.ceil(cols * GLASS_MARGIN)
    inside[mr : rows - mr, mc : cols - mc] = True
    cut = np.quantile(field[inside], 1 - TISSUE_SHARE)
    return inside & (field > cut)


def he_pattern(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB pixels over a bool ``mask`` (H, W): glass outside, stroma with 4-px nuclei inside, plus noise."""
    height, width = mask.shape
    nuclei = rng.random((math.ceil(height / 4), math.ceil(width / 4))) < 0.12
    nuclei = nuclei.repeat(4, axis=0).repeat(4, axis=1)[:height, :width]
    image = np.empty((height, width, 3), np.int16)
    image[:] = GLASS
    image[mask] = STROMA
    image[mask & nuclei] = NUCLEUS
    image += rng.integers(-6, 7, (height, width, 1), dtype=np.int16)  # scanner noise
    return np.clip(image, 0, 255).astype(np.uint8)


def bench_slide(folder: str | Path, height: int, width: int, *, scan_mpp: float = SCAN_MPP, seed: int = SEED) -> Path:
    """The benchmark slide whose tissue image at 5x is about ``height`` × ``width`` px; written once, then reused.

    Level 0 is ``width · 2 / scan_mpp`` px wide (likewise high) at ``scan_mpp`` µm/px; tissue covers about
    ``TISSUE_SHARE`` of it inside a glass margin of ``GLASS_MARGIN`` per side. Written atomically, so a file
    that exists is complete.
    """
    scale = MPP / scan_mpp
    size = (round(width * scale), round(height * scale))
    path = Path(folder) / f"speed-{width}x{height}-scan{scan_mpp:g}-seed{seed}-v{SLIDE_VERSION}.svs"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tissue = _tissue_field(size, seed)

    def region(x: int, y: int, w: int, h: int) -> np.ndarray:
        rows, cols = np.arange(y, y + h) // FIELD, np.arange(x, x + w) // FIELD
        return he_pattern(tissue[np.ix_(rows, cols)], np.random.default_rng([seed, y, x]))

    with atomic_output(path) as tmp:
        write_pyramidal_tiff(tmp, region, size, mpp=scan_mpp, app_mag=10 / scan_mpp)
    return path


# --- the two ways of classifying a slide ----------------------------------------------------------------


class _Laps:
    """Seconds between successive calls of :meth:`lap`, by name (the device's queued work finished first)."""

    def __init__(self, device: torch.device):
        self.device, self.stages = device, {}
        self._last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._last
        self._last = now


@torch.no_grad()
def run_tile_pipeline(slide_path: str | Path, extractor: FeatureExtractor, mil: GatedABMIL, scratch: str | Path, *,
                      mpp: float = MPP, tile: int = TILE, min_tissue: float = MIN_TISSUE,
                      batch_size: int = BATCH_SIZE, workers: int = WORKERS) -> dict[str, Any]:
    """Classify one slide the tile-based way; returns ``seconds``, ``stages``, ``probabilities``, ``n_tiles``.

    Stages (seconds): ``tissue`` (open, tissue mask), ``tiling`` (the tile grid), ``tile_read`` (waiting for
    tiles: the reading that the forward passes did not hide), ``features`` (ResNet34 forwards),
    ``feature_file`` (write the HDF5 feature file and read it back, as the MIL step loads it), ``mil``.
    """
    device = next(extractor.parameters()).device
    start = time.perf_counter()
    laps = _Laps(device)
    # Tiles read through OpenSlide's read_region, as CLAM's, DSMIL's and TransMIL's readers do (not our direct
    # TIFF tile decoding, which `wsilocal features` does use).
    with open_slide(slide_path, direct_decode=False) as slide:
        tissue = detect_tissue(slide, mask_mpp=MASK_MPP)
        laps.lap("tissue")
        coords = tile_grid(slide, tissue, mpp, tile, min_tissue)
        if not coords:
            raise SlideError(slide_path, f"no {tile}-px tile at {mpp} µm/px has {min_tissue:.0%} tissue")
        laps.lap("tiling")
        features = np.empty((len(coords), extractor.dim), np.float32)
        with closing(tile_batches(slide, coords, mpp, tile, batch_size, workers)) as batches:
            for index, batch in batches:
                laps.lap("tile_read")
                features[index : index + len(batch)] = extractor(torch.from_numpy(batch)).cpu().numpy()
                laps.lap("features")
    h5 = Path(scratch) / f"{Path(slide_path).stem}.h5"
    write_features(h5, features, np.asarray(coords, np.int64), {"mpp": mpp, "tile": tile})
    features, _, _ = read_features(h5, dim=extractor.dim)
    laps.lap("feature_file")
    probabilities = torch.softmax(mil(torch.from_numpy(features).to(device)).logits, dim=1)[0].cpu().numpy()
    laps.lap("mil")
    return {"seconds": time.perf_counter() - start, "stages": laps.stages,
            "probabilities": probabilities.tolist(), "n_tiles": len(coords)}


def run_ours(predictor: Predictor, slide_path: str | Path, *, measure_memory: bool = False) -> dict[str, Any]:
    """Classify one slide with :meth:`Predictor.predict`; returns its seconds, stages, probabilities, mode, size.

    Without ``measure_memory`` (timing) the prediction runs without the memory meter, whose reset (heap trim,
    high-water mark) the pipeline does not pay either; ``peak_memory_bytes`` is then None.
    """
    p = predictor.predict(slide_path, measure_memory=measure_memory)
    # a map cell is `stride` px of the tissue image: level-0 px per image px = cell_size / stride
    width, height = (round(side * predictor.stride / cell) for side, cell in zip(p.bbox[2:], p.cell_size, strict=True))
    return {"seconds": p.seconds, "stages": p.stages, "probabilities": list(p.probabilities.values()),
            "mode": p.mode, "height": height, "width": width, "peak_memory_bytes": p.peak_memory_bytes}


def _calibration_image(size: int = 256) -> torch.Tensor:
    """A synthetic crop (left half glass, right half tissue) to calibrate a random trunk's BatchNorm on."""
    mask = np.zeros((size, size), bool)
    mask[:, size // 2 :] = True
    return to_tensor(he_pattern(mask, np.random.default_rng(SEED)), list(IMAGENET_MEAN), list(IMAGENET_STD))


def build_predictor(device: str = "auto", run: str | None = None, memory_budget: int | None = None,
                    arch: str = DEFAULT_ARCH) -> Predictor:
    """Our predictor: a trained ``run``'s (its own arch and glass masking), or seeded random weights of an ``arch``
    trunk (BatchNorm calibrated on a synthetic crop) that masks glass as a new run does, so that the band-streamed
    forward skips what no tissue position depends on."""
    if run:
        return Predictor.from_run(run, device=device, memory_budget=memory_budget)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        trunk = ResNetTrunk(arch=arch)
        head = FinalClassifier(trunk.out_channels, N_CLASSES)
    calibrate_batchnorm(trunk, [_calibration_image()])
    return Predictor(trunk, head, [f"class{i}" for i in range(N_CLASSES)], IMAGENET_MEAN, IMAGENET_STD,
                     PrepareSettings(mpp=MPP), device=resolve_device(device), memory_budget=memory_budget,
                     mask_glass=True)


def build_pipeline(device: torch.device, n_classes: int = N_CLASSES,
                   arch: str = DEFAULT_ARCH) -> tuple[FeatureExtractor, GatedABMIL]:
    """The tile pipeline's models: the seeded random ``arch`` extractor of ``wsilocal features`` (ResNet34 by
    default) and a seeded gated ABMIL on its features."""
    extractor = FeatureExtractor(arch=arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        mil = GatedABMIL(n_classes, in_dim=extractor.dim).to(device).eval()
    return extractor.to(device), mil


def bfloat16_copy(predictor: Predictor) -> Predictor:
    """The same predictor with its trunk (a copy) in bfloat16."""
    return Predictor(copy.deepcopy(predictor.trunk), predictor.head, predictor.classes, predictor.mean,
                     predictor.std, predictor.settings, device=predictor.device,
                     memory_budget=predictor.memory_budget, band=predictor.band, dtype=torch.bfloat16,
                     mask_glass=predictor.mask_glass)


# --- child processes ------------------------------------------------------------------------------------


def _child_time(spec: dict[str, Any]) -> dict[str, Any]:
    """One warm-up round, then ``repeats`` rounds running every contender once, the order rotated each round.

    Returns ``{"threads": torch threads, "runs": {contender: [one result per round]}}``.
    """
    predictor = build_predictor(spec["device"], spec["run"], arch=spec.get("arch", DEFAULT_ARCH))
    # the pipeline's extractor has the same backbone as ours: the comparison is of the methods, not the trunks
    extractor, mil = build_pipeline(predictor.device, len(predictor.classes), predictor.trunk.arch.name)
    contenders: dict[str, Callable[[], dict[str, Any]]] = {
        "ours": lambda: run_ours(predictor, spec["slide"]),
        "pipeline": lambda: run_tile_pipeline(spec["slide"], extractor, mil, spec["scratch"],
                                              mpp=predictor.settings.mpp, batch_size=spec["batch_size"],
                                              workers=spec["workers"]),
    }
    if spec["bf16"]:
        bf16 = bfloat16_copy(predictor)
        contenders["bf16"] = lambda: run_ours(bf16, spec["slide"])
    names = list(contenders)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_index in range(spec["repeats"] + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            result = contenders[name]()
            if round_index > 0:
                runs[name].append(result)
    return {"threads": torch.get_num_threads(), "runs": runs, "arch": predictor.trunk.arch.name}


def measure_memory(predictor: Predictor, slide_path: str | Path, forward: str) -> dict[str, Any]:
    """One prediction with the ``"whole"``-image or the ``"streamed"`` forward, and its memory (run it in a fresh
    process: the process's high-water mark is part of the result).

    ``added_bytes`` is the prediction's own peak above the RSS at its start (``Prediction.peak_memory_bytes``:
    freed heap handed back and the kernel's high-water mark reset first); ``peak_rss_bytes`` is the process's
    high-water mark afterwards, i.e. that start plus the prediction's peak (everything since start-up where the
    mark cannot be reset).

    The streamed forward runs with the band a prediction takes when its image exceeds the memory budget
    (:data:`~wsilocal.stream.bands.DEFAULT_BAND` output rows per block window, what the default budget allows up to
    far beyond 16384² px), not the smallest band: its time is then what a user's streamed prediction costs. The
    predictor's budget and band are restored afterwards.
    """
    saved = predictor.memory_budget, predictor.band, predictor.stream_from
    if forward == "whole":
        predictor.memory_budget, predictor.band, predictor.stream_from = WHOLE, None, None
    else:
        predictor.band = DEFAULT_BAND  # a band given: streamed even where the whole image would fit
    band = predictor.band
    try:
        result = run_ours(predictor, slide_path, measure_memory=True)
    finally:
        predictor.memory_budget, predictor.band, predictor.stream_from = saved
    return {"mode": result["mode"], "seconds": result["seconds"], "peak_rss_bytes": process_memory_bytes("VmHWM"),
            "added_bytes": result["peak_memory_bytes"], "band": band}


def whole_forward_skip(arch: str, height: int, width: int, device: torch.device) -> dict[str, Any] | None:
    """``{"skipped": why}`` when the whole-image forward of a ``height`` × ``width`` image would need more than the
    default memory budget (a prediction would stream it; forcing it could exhaust the machine), else None."""
    need, budget = whole_forward_bytes(ResNetTrunk(arch=arch), height, width), default_memory_budget(device)
    if need <= budget:
        return None
    return {"skipped": f"not run: the whole-image forward needs about {need / 2**30:,.1f} GiB, above the default "
                       f"memory budget of {budget / 2**30:,.1f} GiB", "estimate_bytes": need, "budget_bytes": budget}


def _child_memory(spec: dict[str, Any]) -> dict[str, Any]:
    predictor = build_predictor(spec["device"], spec["run"], arch=spec.get("arch", DEFAULT_ARCH))
    return measure_memory(predictor, spec["slide"], spec["forward"])


def _child_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """bfloat16 against float32 on one slide, one run each after a float32 warm-up (emulated bfloat16 is slow)."""
    predictor = build_predictor(spec["device"], spec["run"], arch=spec.get("arch", DEFAULT_ARCH))
    run_ours(predictor, spec["slide"])
    return {"ours": [run_ours(predictor, spec["slide"])], "bf16": [run_ours(bfloat16_copy(predictor), spec["slide"])]}


CHILDREN = {"time": _child_time, "memory": _child_memory, "probe": _child_probe}


def _measure(spec: dict[str, Any]) -> Any:
    """One measurement of this benchmark in a fresh interpreter (:func:`~wsilocal.bench.child.run_child`)."""
    return run_child("wsilocal.bench.speed", spec)


# --- the benchmark --------------------------------------------------------------------------------------


def _median_stages(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {name: statistics.median(r["stages"].get(name, 0.0) for r in runs) for name in runs[0]["stages"]}


def _max_diff(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> float:
    """Largest difference of a class probability between two contenders' runs (all runs of a slide agree)."""
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra["probabilities"], rb["probabilities"], strict=True))


def bf16_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """bfloat16 against float32 (ours) from a child's runs: median seconds, speed-up, largest probability gap."""
    float32_s = statistics.median(r["seconds"] for r in runs["ours"])
    bf16_s = statistics.median(r["seconds"] for r in runs["bf16"])
    diff = _max_diff(runs["ours"], runs["bf16"])
    return {"float32_s": float32_s, "bf16_s": bf16_s, "speedup": float32_s / bf16_s, "max_prob_diff": diff,
            "within_tolerance": diff <= BF16_TOLERANCE, "bf16_runs": [r["seconds"] for r in runs["bf16"]],
            "bf16_stages": _median_stages(runs["bf16"])}


def make_record(requested: tuple[int, int], slide: str | Path, timing: dict[str, Any]) -> dict[str, Any]:
    """One size's record from a timing child's result: medians, stages, ratio (pipeline / ours), bfloat16."""
    runs = timing["runs"]
    ours, pipeline = runs["ours"], runs["pipeline"]
    ours_s = statistics.median(r["seconds"] for r in ours)
    pipeline_s = statistics.median(r["seconds"] for r in pipeline)
    return {
        "height": ours[0]["height"], "width": ours[0]["width"],  # the tissue image at 5x that ours processed
        "requested": list(requested), "slide": str(slide), "n_tiles": pipeline[0]["n_tiles"],
        "threads": timing["threads"],
        "ours_s": ours_s, "ours_mode": ours[0]["mode"], "ours_stages": _median_stages(ours),
        "ours_runs": [r["seconds"] for r in ours],
        "pipeline_s": pipeline_s, "pipeline_stages": _median_stages(pipeline),
        "pipeline_runs": [r["seconds"] for r in pipeline],
        "ratio": pipeline_s / ours_s,
        "bf16": bf16_summary(runs) if "bf16" in runs else None,
        "rss": {},
    }


def run_speed_benchmark(
    out_dir: str | Path,
    *,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    repeats: int = 3,
    run: str | None = None,
    device: str = "auto",
    workers: int = WORKERS,
    batch_size: int = BATCH_SIZE,
    scan_mpp: float = SCAN_MPP,
    bf16: bool = True,
    bf16_probe: tuple[int, int] = BF16_PROBE,
    rss: bool = True,
    progress: bool = True,
    arch: str = DEFAULT_ARCH,
) -> dict[str, Any]:
    """Time ours against the tile pipeline at every size; write ``speed.json``, ``.md`` and ``.png`` in ``out_dir``.

    Args:
        sizes: tissue images at 5x as (height, width); one slide each, kept in ``out_dir/slides``.
        repeats: timed rounds after the warm-up round (medians are reported).
        run: a training run to take our trunk and H from (default: seeded random weights).
        device: ``auto``, ``cpu``, ``cuda``, ...
        workers: reader threads of the pipeline (0: tiles read in the main thread, between forwards).
        batch_size: tiles per extractor forward in the pipeline.
        scan_mpp: level-0 µm/px of the generated slides.
        bf16: also measure bfloat16 inference (every size where native, else on a ``bf16_probe`` slide).
        rss: also measure the peak RSS of the whole-image and the streamed forward at every size.
        progress: print one line per measurement on stderr.
        arch: the backbone of both, ours and the pipeline's extractor (``run`` given: the run's own).

    Returns ``{"machine", "settings", "records", "bf16"}`` as written to ``speed.json``.
    """
    if repeats < 1:
        raise ConfigError(f"bench speed: repeats must be >= 1, got {repeats}")
    if workers < 0 or batch_size < 1:
        raise ConfigError(f"bench speed: workers must be >= 0 and batch size >= 1, got {workers} and {batch_size}")
    if not (math.isfinite(scan_mpp) and 0 < scan_mpp <= MPP):
        raise ConfigError(f"bench speed: scan_mpp must be in (0, {MPP}] µm/px, got {scan_mpp}")
    out = Path(out_dir)
    (out / "scratch").mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    native = bfloat16_is_native(torch_device)
    started = time.perf_counter()
    base = {"device": device, "run": run, "arch": arch}
    records = []
    for index, (height, width) in enumerate(sizes, start=1):
        slide = bench_slide(out / "slides", height, width, scan_mpp=scan_mpp)
        log_progress(progress, f"[{index}/{len(sizes)}] {width}x{height} at 5x: {slide.name}, 1 warm-up + {repeats} "
                               f"rounds ({time.perf_counter() - started:.0f} s)")
        timing = _measure({**base, "child": "time", "slide": str(slide), "scratch": str(out / "scratch"),
                             "repeats": repeats, "bf16": bf16 and native, "workers": workers,
                             "batch_size": batch_size})
        record = {"arch": timing["arch"], **make_record((height, width), slide, timing)}
        log_progress(progress, f"    ours {record['ours_s']:.2f} s ({record['ours_mode']}), pipeline "
                               f"{record['pipeline_s']:.2f} s ({record['n_tiles']} tiles): {record['ratio']:.2f}×")
        for forward in ("whole", "streamed") if rss else ():
            skip = (whole_forward_skip(record["arch"], record["height"], record["width"], torch_device)
                    if forward == "whole" else None)  # the tissue image ours processed, not the requested size
            record["rss"][forward] = skip or _measure({**base, "child": "memory", "slide": str(slide),
                                                       "forward": forward})
            log_progress(progress, f"    {forward} forward: " + (skip["skipped"] if skip else
                                   f"peak RSS {record['rss'][forward]['peak_rss_bytes'] / MiB:,.0f} MiB"))
        records.append(record)
        write_speed_report(_report(records, None, native, settings={}), out)  # partial results survive a crash
    probe = None
    if bf16 and not native:
        slide = bench_slide(out / "slides", *bf16_probe, scan_mpp=scan_mpp)
        log_progress(progress, f"bfloat16 is emulated on this {torch_device.type}: one probe run at "
                               f"{bf16_probe[1]}x{bf16_probe[0]}")
        probe = {"height": bf16_probe[0], "width": bf16_probe[1],
                 **bf16_summary(_measure({**base, "child": "probe", "slide": str(slide)}))}
    settings = {"sizes": [list(s) for s in sizes], "repeats": repeats, "run": run, "device": str(torch_device),
                "arch": records[0]["arch"] if records else arch,
                "workers": workers, "batch_size": batch_size, "scan_mpp": scan_mpp, "mpp": MPP, "tile": TILE,
                "min_tissue": MIN_TISSUE, "threads": records[0]["threads"] if records else None,
                "seconds": round(time.perf_counter() - started, 1)}
    report = _report(records, probe, native, settings)
    write_speed_report(report, out)
    return report


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _report(records: list[dict[str, Any]], probe: dict[str, Any] | None, native: bool,
            settings: dict[str, Any]) -> dict[str, Any]:
    """What ``speed.json`` holds: the machine, the settings, one record per size and the bfloat16 verdict."""
    diffs = [r["bf16"]["max_prob_diff"] for r in records if r["bf16"]] + ([probe["max_prob_diff"]] if probe else [])
    machine = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
               "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    bf16 = {"native": native, "tolerance": BF16_TOLERANCE, "probe": probe,
            "max_prob_diff": max(diffs) if diffs else None,
            "within_tolerance": max(diffs) <= BF16_TOLERANCE if diffs else None}
    return {"machine": machine, "settings": settings, "records": records, "bf16": bf16}


# --- report ---------------------------------------------------------------------------------------------

OURS_STAGES = ("tissue", "read", "trunk", "head")
PIPELINE_STAGES = ("tissue", "tiling", "tile_read", "features", "feature_file", "mil")


def _s(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def _size_label(record: dict[str, Any]) -> str:
    return f"{record['width']}×{record['height']}"


def format_speed_tables(report: dict[str, Any]) -> str:
    """Markdown: totals and ratio per size, the stages, peak RSS of the two forwards, the bfloat16 verdict."""
    records = report["records"]
    lines = ["| size at 5x | arch | tiles | ours s | ours mode | pipeline s | pipeline / ours | bf16 s "
             "| bf16 speed-up | bf16 max Δp |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in records:
        b = r["bf16"] or {}
        arch = r.get("arch", DEFAULT_ARCH)  # records written before the column: resnet34
        lines.append(f"| {_size_label(r)} | {arch} | {r['n_tiles']:,} | {_s(r['ours_s'])} | {r['ours_mode']} "
                     f"| {_s(r['pipeline_s'])} | **{r['ratio']:.2f}×** | {_s(b.get('bf16_s'))} "
                     f"| {_s(b.get('speedup'), '×')} | {_s(b.get('max_prob_diff'), digits=4)} |")
    stages = list(dict.fromkeys(OURS_STAGES + PIPELINE_STAGES))
    lines += ["", "Median seconds of each stage (`tile_read`: waiting for tiles the reader threads had not yet "
                  "read; `feature_file`: writing the HDF5 feature file and reading it back):", "",
              "| size at 5x | method | " + " | ".join(stages) + " | total |",
              "|---|---|" + "---:|" * (len(stages) + 1)]
    for r in records:
        for method, own in (("ours", OURS_STAGES), ("pipeline", PIPELINE_STAGES)):
            values = r[f"{method}_stages"]
            cells = [_s(values.get(name)) if name in own else "" for name in stages]
            lines.append(f"| {_size_label(r)} | {method} | " + " | ".join(cells) + f" | {_s(r[f'{method}_s'])} |")
    if any(r["rss"] for r in records):
        lines += ["", "Peak RSS of a fresh process predicting the slide once (MiB; \"added\": the prediction's peak "
                      "above the RSS at its start, models and libraries excluded; streamed: in bands of "
                      f"{DEFAULT_BAND} output rows per block window, as a prediction too large for its budget):", "",
                  "| size at 5x | whole: peak | whole: added | whole s | streamed: peak | streamed: added "
                  "| streamed s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in records:
            cells = []
            for forward in ("whole", "streamed"):
                m = r["rss"].get(forward)
                cells += ["—"] * 3 if not m or "skipped" in m else [f"{m['peak_rss_bytes'] / MiB:,.0f}",
                                                  f"{m['added_bytes'] / MiB:,.0f}", _s(m["seconds"])]
            lines.append(f"| {_size_label(r)} | " + " | ".join(cells) + " |")
        lines += [f"\n{_size_label(r)}, {forward} forward: {m['skipped']}." for r in records
                  for forward, m in r["rss"].items() if "skipped" in m]
    lines += ["", format_bf16(report["bf16"])]
    return "\n".join(lines)


def format_bf16(bf16: dict[str, Any]) -> str:
    """One paragraph: where bfloat16 was measured, its speed-up and accuracy, and whether it is offered."""
    if bf16["max_prob_diff"] is None:
        return "bfloat16: not measured."
    verdict = (f"within the {bf16['tolerance']} tolerance" if bf16["within_tolerance"]
               else f"**above** the {bf16['tolerance']} tolerance: not offered")
    if bf16["native"]:
        where = "native on this device, timed in the same rounds at every size (columns above)"
    else:
        p = bf16["probe"]
        where = (f"emulated on this device (no AVX-512 BF16 / AMX): one run on a {p['width']}×{p['height']} probe "
                 f"slide took {p['bf16_s']:.1f} s against {p['float32_s']:.2f} s in float32 "
                 f"({p['speedup']:.3f}× — do not use `--bf16` here)")
    return (f"bfloat16 (trunk in bfloat16, H in float32): {where}; largest class-probability difference to float32 "
            f"{bf16['max_prob_diff']:.4f}, {verdict}.")


def write_speed_report(report: dict[str, Any], out_dir: str | Path) -> None:
    """Write ``speed.json`` (the report), ``speed.md`` (tables) and ``speed.png`` (plot) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=1))
    m, st = report["machine"], report["settings"]
    head = (f"# Speed benchmark ({m['date']}, torch {m['torch']}, {m['cpu_count']} CPUs {m['cpu'] or ''}, "
            f"GPU: {m['cuda'] or 'none'})\n\n")
    if st:
        head += (f"Tiles {st['tile']} px at {st['mpp']} µm/px with ≥ {st['min_tissue']:.0%} tissue, batches of "
                 f"{st['batch_size']}, {st['workers']} reader threads; {st['threads']} torch threads; medians of "
                 f"{st['repeats']} rounds after a warm-up; slides scanned at {st['scan_mpp']} µm/px.\n\n")
    (out / "speed.md").write_text(head + format_speed_tables(report) + "\n")
    plot_speed(report["records"], out / "speed.png")


def plot_speed(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Left: seconds per stage, ours beside the pipeline, per size, with the ratio. Right: peak RSS added by the
    whole-image and the streamed forward against the tissue image's area."""
    from wsilocal.bench.plots import plt  # matplotlib on the Agg backend

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colours = dict(zip(dict.fromkeys(OURS_STAGES + PIPELINE_STAGES), plt.get_cmap("tab10").colors, strict=False))
    labelled = set()
    for i, r in enumerate(records):
        for offset, method, own in ((-0.2, "ours", OURS_STAGES), (0.2, "pipeline", PIPELINE_STAGES)):
            bottom = 0.0
            for name in own:
                value = r[f"{method}_stages"].get(name, 0.0)
                left.bar(i + offset, value, 0.38, bottom=bottom, color=colours[name],
                         label=None if name in labelled else name)
                labelled.add(name)
                bottom += value
        left.annotate(f"{r['ratio']:.1f}×", (i + 0.2, r["pipeline_s"]), ha="center", va="bottom", fontsize=9)
    left.set_xticks(range(len(records)), [f"{_size_label(r)}\nours | pipeline" for r in records])
    left.set_ylabel("seconds (median)")
    left.set_title("Whole-slide inference (ours) vs tile pipeline, per stage")
    left.legend(fontsize=8)
    for forward, style in (("whole", "o-"), ("streamed", "s--")):
        points = sorted((r["height"] * r["width"] / 1e6, r["rss"][forward]["added_bytes"] / 2**30)
                        for r in records if "added_bytes" in r["rss"].get(forward, {}))
        if points:
            right.plot(*zip(*points, strict=True), style, label=f"{forward} forward")
    right.set_xlabel("tissue image at 5x (megapixels)")
    right.set_ylabel("peak RSS added by the prediction (GiB)")
    right.set_title("Memory of one prediction (fresh process)")
    right.set_ylim(bottom=0)
    right.grid(True, alpha=0.3)
    if right.lines:
        right.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------------


def speed_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments, print the tables and where the files are."""
    report = run_speed_benchmark(args.out, sizes=args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES),
                                 repeats=1 if args.quick else args.repeats, run=args.run, device=args.device,
                                 workers=args.workers, batch_size=args.batch_size, scan_mpp=args.scan_mpp,
                                 bf16=not args.no_bf16, rss=not args.no_rss, arch=args.arch)
    print(format_speed_tables(report))
    print(f"wrote {Path(args.out) / 'speed.json'}, speed.md, speed.png")
    return 0


def _child_main(spec: dict[str, Any]) -> Any:
    tune_cpu_allocator()  # time predictions the way the CLI runs them
    return CHILDREN[spec["child"]](spec)


if __name__ == "__main__":  # a measurement child (see bench/child.py)
    print(json.dumps(_child_main(json.loads(sys.argv[1]))))
