"""What the generator knows about its slides and writes beside them: tissue, lesion and follicle masks on the
coarse grid, the lesion's boxes, a context slide's layout, and the numbers (:func:`slide_measurements`) a model
could learn instead of the tissue's pattern."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from wsilocal.synth.params import FIELD_STEP, MPP
from wsilocal.synth.spec import SlideSpec


def tissue_mask(spec: SlideSpec) -> np.ndarray:
    """Tissue on the coarse grid (one pixel per ``spec.mask_downsample`` level-0 px)."""
    return spec.fields[0] > 0


def lesion_mask(spec: SlideSpec) -> np.ndarray:
    """Lesion on the coarse grid (one pixel per ``spec.mask_downsample`` level-0 px)."""
    return spec.fields[1] > 0


def follicle_mask(spec: SlideSpec) -> np.ndarray:
    """The context task's follicle B on the coarse grid (all false on a morphology slide)."""
    if len(spec.fields) < 4:
        return np.zeros(spec.fields.shape[1:], bool)
    return spec.fields[3] > 0


MASK_GLASS, MASK_TISSUE, MASK_LESION = 0, 128, 255  # values of the written mask PNGs
MASK_FOLLICLE = 192  # context task: the follicle B (its tumour focus A is the lesion, 255)


def label_mask(spec: SlideSpec) -> np.ndarray:
    """uint8 mask on the coarse grid: MASK_LESION on the lesion, MASK_FOLLICLE on a context slide's
    follicle, MASK_TISSUE on other tissue, else 0."""
    mask = np.where(tissue_mask(spec), MASK_TISSUE, MASK_GLASS).astype(np.uint8)
    mask[lesion_mask(spec)] = MASK_LESION
    mask[follicle_mask(spec)] = MASK_FOLLICLE
    return mask


def mask_of_region(mask: np.ndarray, bbox: tuple[int, int, int, int] | list[int], downsample: float,
                   size: tuple[int, int]) -> np.ndarray:
    """A coarse-grid mask (one pixel per ``downsample`` level-0 px) cut to the level-0 box ``bbox`` (x, y, w, h)
    and resized, nearest neighbour, to ``size`` (width, height): the mask of a cached image of that box (a cache
    entry holds the tissue box, not the whole slide)."""
    x, y, w, h = bbox
    box = (x / downsample, y / downsample, (x + w) / downsample, (y + h) / downsample)
    return np.asarray(Image.fromarray(mask).resize(tuple(size), Image.NEAREST, box=box))


def _mask_boxes(mask: np.ndarray, size: tuple[int, int]) -> list[list[int]]:
    """Bounding boxes [x0, y0, x1, y1] in level-0 px of each connected region of a coarse-grid mask."""
    labels, _ = ndimage.label(mask)
    width, height = size
    return [[sl[1].start * FIELD_STEP, sl[0].start * FIELD_STEP, min(sl[1].stop * FIELD_STEP, width),
             min(sl[0].stop * FIELD_STEP, height)] for sl in ndimage.find_objects(labels)]


def lesion_boxes(spec: SlideSpec) -> list[list[int]]:
    """Bounding boxes [x0, y0, x1, y1] in level-0 px of each connected lesion region."""
    return _mask_boxes(lesion_mask(spec), spec.size)


def gap_um(a: np.ndarray, b: np.ndarray) -> float:
    """Least distance (µm) between the centres of a pixel of coarse-grid mask ``a`` and one of mask ``b``."""
    return float(ndimage.distance_transform_edt(~a)[b].min()) * FIELD_STEP * MPP


def context_layout(spec: SlideSpec) -> dict:
    """Where a context slide's tumour focus A and follicle B lie: their boxes [x0, y0, x1, y1] (level-0 px),
    mask areas (µm²) and the gap between them (:func:`gap_um`), as recorded in ``synth.json``."""
    a, b = lesion_mask(spec), follicle_mask(spec)
    pixel_um2 = (FIELD_STEP * MPP) ** 2
    return {"tumour_bbox": _mask_boxes(a, spec.size)[0], "follicle_bbox": _mask_boxes(b, spec.size)[0],
            "tumour_area_um2": float(a.sum() * pixel_um2), "follicle_area_um2": float(b.sum() * pixel_um2),
            "gap_um": round(gap_um(a, b), 3)}


def slide_measurements(folder: str | Path) -> dict[str, dict[str, float]]:
    """Per slide of a cohort written by :func:`~wsilocal.synth.cohort.synthesize_cohort`, the numbers a model
    could learn instead of the tissue's pattern: slide width, height and area, tissue area (from its mask), lesion
    fraction and, on the context task, the areas of the tumour focus A and the follicle B. Keys are slide ids."""
    folder = Path(folder)
    meta = json.loads((folder / "synth.json").read_text())
    mm_per_px = MPP / 1000
    measured = {}
    for slide_id, info in meta["slides"].items():
        width, height = info["size"]
        mask = np.asarray(Image.open(folder / info["mask"]))
        values = {"slide width (mm)": width * mm_per_px, "slide height (mm)": height * mm_per_px,
                  "slide area (mm²)": width * height * mm_per_px**2,
                  "tissue area (mm²)": float((mask >= MASK_TISSUE).sum()) * (info["mask_downsample"] * mm_per_px)**2,
                  "lesion fraction": info["lesion_fraction"]}
        if "tumour_area_um2" in info:
            values |= {"tumour area (mm²)": info["tumour_area_um2"] / 1e6,
                       "follicle area (mm²)": info["follicle_area_um2"] / 1e6}
        measured[slide_id] = values
    return measured
