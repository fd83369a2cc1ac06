"""Slides and cohorts: :func:`make_slide` describes one slide of either task, :func:`write_slide` streams it to a
pyramidal SVS through :func:`~wsilocal.slide.tiff_writer.write_pyramidal_tiff` in bounded memory (40000² px
slides too), and :func:`synthesize_cohort` writes a whole cohort with its masks, ``cohort.csv`` and ``synth.json``."""

from __future__ import annotations

import csv
import json
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsilocal.errors import ConfigError
from wsilocal.slide.tiff_writer import write_pyramidal_tiff
from wsilocal.synth.context import make_context_slide
from wsilocal.synth.masks import (
    MASK_FOLLICLE,
    MASK_GLASS,
    MASK_LESION,
    MASK_TISSUE,
    context_layout,
    label_mask,
    lesion_boxes,
)
from wsilocal.synth.morphology import make_morphology_slide
from wsilocal.synth.params import APP_MAG, CONTEXT_CLASSES, FIELD_STEP, GENERATOR_VERSION, MPP, SynthParams, class_names
from wsilocal.synth.render import render_region
from wsilocal.synth.spec import SlideSpec


def make_slide(params: SynthParams, label: str, stain_seed: int | None = None) -> SlideSpec:
    """Describe one slide of class ``label`` from ``params.seed`` (stain from ``stain_seed`` if given,
    so slides of one case can share a staining run)."""
    params.validate()
    if params.task == "context":
        return make_context_slide(params, label, stain_seed)
    return make_morphology_slide(params, label, stain_seed)


def write_slide(spec: SlideSpec, path: str | Path, *, quality: int = 90,
                on_row: Callable[[], None] | None = None) -> list[tuple[int, int]]:
    """Write ``spec`` as an Aperio-style pyramidal SVS (MPP 0.25, AppMag 40); returns the level sizes."""
    return write_pyramidal_tiff(path, lambda x, y, w, h: render_region(spec, x, y, w, h), spec.size,
                                mpp=MPP, app_mag=APP_MAG, layout="aperio", quality=quality, on_row=on_row)


def _write_one(job: dict) -> dict:
    """Build, write and describe one slide of a cohort (runs in a worker process when workers > 1)."""
    params = SynthParams(**job["params"])
    spec = make_slide(params, job["label"], stain_seed=job["stain_seed"])
    out = Path(job["out_dir"])
    write_slide(spec, out / job["path"], quality=params.quality)
    Image.fromarray(label_mask(spec)).save(out / job["mask"])
    info = {
        "slide_id": job["slide_id"], "case_id": job["case_id"], "label": job["label"], "split": job["split"],
        "seed": params.seed, "stain_seed": job["stain_seed"], "size": list(spec.size),
        "lesion_fraction": round(spec.lesion_fraction, 5),
        "lesion_bboxes": lesion_boxes(spec), "mask": job["mask"], "mask_downsample": spec.mask_downsample,
    }
    return {**info, **context_layout(spec)} if params.task == "context" else info


def _assign_splits(rng: np.random.Generator, n_cases: int, splits: Sequence[float]) -> list[int]:
    """Split indices for ``n_cases`` cases of one class: proportional, every non-empty split at least one."""
    wanted = [i for i, share in enumerate(splits) if share > 0]
    if n_cases < len(wanted):
        raise ConfigError(f"{n_cases} cases per class cannot fill {len(wanted)} splits; add slides_per_class")
    counts = {i: 1 for i in wanted}
    total = sum(splits[i] for i in wanted)
    for _ in range(n_cases - len(wanted)):  # then give each next case to the split furthest below its share
        i = max(wanted, key=lambda s: splits[s] / total * n_cases - counts[s])
        counts[i] += 1
    order = [i for i in wanted for _ in range(counts[i])]
    return [order[k] for k in rng.permutation(n_cases)]


def synthesize_cohort(
    out_dir: str | Path,
    *,
    classes: int | None = None,
    slides_per_class: int = 10,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    workers: int = 1,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    size_jitter: float = 0.25,
    progress: bool = True,
    params: SynthParams | None = None,
) -> Path:
    """Write a synthetic cohort and return the path of its ``cohort.csv``.

    Layout: ``slides/<slide_id>.svs``, ``masks/<slide_id>.png`` (255 lesion, 192 follicle (context task),
    128 other tissue, 0 glass; one pixel per ``mask_downsample`` level-0 px), ``cohort.csv``
    (``slide_id,path,label,split,case_id``, paths relative to it) and ``synth.json`` (parameters, generator
    version, per-slide label, staining run, size, lesion fraction and lesion boxes; context task: also A's and B's
    boxes and areas and their gap, see :func:`~wsilocal.synth.masks.context_layout`). About a quarter of the cases
    hold two slides of the same label (and staining run); splits (train/val/test) are drawn per case and stratified
    by class. The classes are matched case by case: each split holds, for every class, cases with the same slide
    counts, slide sizes and staining runs, so only the tissue tells the classes apart.

    Args:
        classes: number of classes of the morphology task (default ``params.classes``); the context task
            has two, ``near`` and ``far``.
        size: level-0 (width, height) in px (default ``params.size``, which defaults by task).
        params: template for the other knobs (task, lesion fraction, stain variation, …); ``classes``,
            ``size`` and ``seed`` given here take precedence.
        size_jitter: each side of each slide is ``size`` × U(1 − jitter, 1 + jitter), so sizes and aspect
            ratios vary; context task: × U(1, 1 + jitter), since ``size`` is what its layout needs.
        workers: slides written in parallel processes.
    """
    base = params or SynthParams()
    if classes is not None:
        if base.task == "context" and classes != len(CONTEXT_CLASSES):
            raise ConfigError(f"the context task has two classes ({', '.join(CONTEXT_CLASSES)}), not {classes}")
        base = replace(base, classes=classes)
    base = replace(base, size=tuple(size or base.size), seed=seed)
    base.validate()
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ConfigError(f"splits must be three non-negative shares (train, val, test), not {splits}")
    if not 0 <= size_jitter < 1:
        raise ConfigError(f"size_jitter must be in [0, 1), not {size_jitter}")
    if slides_per_class < 1:
        raise ConfigError(f"slides_per_class must be >= 1, not {slides_per_class}")
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 0xC0])
    split_names = ("train", "val", "test")

    # Every class gets the same cases, rank by rank: case r of each class has the same number of slides, the
    # same split, the same staining run and the same slide sizes. So no split can tell the classes apart by
    # slide size, stain or case structure; only the tissue can (generator 1.2).
    names = class_names(base.classes, base.task)
    pairs = min(slides_per_class // 4, max(0, slides_per_class - 3))
    slides_of_rank = [2] * pairs + [1] * (slides_per_class - 2 * pairs)
    split_of_rank = _assign_splits(rng, len(slides_of_rank), splits)
    stain_of_rank = rng.integers(0, 2**31, len(slides_of_rank))
    low = 1.0 if base.task == "context" else 1 - size_jitter
    size_of_slide = {(rank, k): tuple(max(256, round(side * rng.uniform(low, 1 + size_jitter))) for side in base.size)
                     for rank, n in enumerate(slides_of_rank) for k in range(n)}
    cases = [(label, rank) for label in names for rank in range(len(slides_of_rank))]
    slides = [(case, k) for case, (_, rank) in enumerate(cases) for k in range(slides_of_rank[rank])]
    order = rng.permutation(len(slides))  # slide ids say nothing about the class
    slide_seeds = rng.integers(0, 2**31, len(slides))
    jobs = []
    for number, s in enumerate(order):
        case, k = slides[s]
        label, rank = cases[case]
        w, h = size_of_slide[rank, k]
        slide_id = f"synth-{number:04d}"
        jobs.append({
            "params": {**asdict(base), "size": (w, h), "seed": int(slide_seeds[s])}, "label": label,
            "stain_seed": int(stain_of_rank[rank]), "out_dir": str(out), "slide_id": slide_id,
            "case_id": f"case-{case:03d}", "split": split_names[split_of_rank[rank]],
            "path": f"slides/{slide_id}.svs", "mask": f"masks/{slide_id}.png",
        })

    (out / "slides").mkdir(parents=True, exist_ok=True)  # only now: bad arguments leave nothing behind
    (out / "masks").mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    with tqdm(total=len(jobs), desc="synthetic slides", unit="slide", disable=not progress) as bar:
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for future in as_completed([pool.submit(_write_one, job) for job in jobs]):
                    info = future.result()
                    results[info["slide_id"]] = info
                    bar.update()
        else:
            for job in jobs:
                info = _write_one(job)
                results[info["slide_id"]] = info
                bar.update()

    csv_path = out / "cohort.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "path", "label", "split", "case_id"])
        for job in jobs:
            writer.writerow([job["slide_id"], job["path"], job["label"], job["split"], job["case_id"]])
    meta = {
        "generator": "wsilocal.synth", "version": GENERATOR_VERSION, "mpp": MPP, "app_mag": APP_MAG,
        "params": asdict(base), "slides_per_class": slides_per_class, "splits": list(splits),
        "size_jitter": size_jitter, "mask_downsample": FIELD_STEP, "classes": names,
        "mask_values": {"glass": MASK_GLASS, "tissue": MASK_TISSUE, "lesion": MASK_LESION,
                        **({"follicle": MASK_FOLLICLE} if base.task == "context" else {})},
        "slides": {job["slide_id"]: results[job["slide_id"]] for job in jobs},
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=1))
    return csv_path
