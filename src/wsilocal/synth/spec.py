"""The slide description both tasks build (:class:`SlideSpec`, and a context slide's :class:`Front`), the
:class:`Builder` they draw structures into, and what every slide gets at the end: its stain and nuclei kept out
of lumens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from wsilocal.synth.params import FIELD_STEP, GLASS_OD, MATERIAL_IDS, STAIN_OD, UM
from wsilocal.synth.shapes import NucleusList, ShapeList, Shapes, covered, lattice, sample_points
from wsilocal.synth.variants import texture_tiles


@dataclass
class Front:
    """The structures of a context slide (tumour focus A and follicle B), painted over the finished
    background and clipped to their regions (depth fields 1 and 3), so the background never depends on them."""

    shapes: Shapes
    nuclei: np.ndarray
    ground: int  # material filling the tumour focus between its structures (-1: plain stroma)


@dataclass
class SlideSpec:
    """Everything needed to render one slide; built by :func:`~wsilocal.synth.cohort.make_slide` from a seed.

    ``fields`` holds, on nodes every FIELD_STEP px (node k centred at (k + 0.5)·FIELD_STEP), the depth
    inside tissue and inside the lesion in px (> 0 inside) and the stroma density; context slides add a
    fourth, the depth inside the follicle. Their lesion is the tumour focus.
    """

    label: str
    size: tuple[int, int]
    seed: int
    lesion_fraction: float
    fields: np.ndarray
    shapes: Shapes
    nuclei: np.ndarray
    stain: np.ndarray  # (2, 3) optical density of unit haematoxylin / eosin concentration
    glass: np.ndarray  # (3,) optical density of empty glass
    lesion_ground: int  # material filling the lesion between its structures (-1: plain stroma)
    variant: int  # which cached textures and nuclear sprites it uses
    texture_shift: tuple[int, int]  # offset of this slide's texture coordinates
    front: Front | None = None  # context task: A and B, drawn over everything else

    @property
    def textures(self) -> dict[str, np.ndarray]:
        return texture_tiles(self.variant)

    @property
    def mask_downsample(self) -> int:
        """Level-0 px per pixel of :func:`~wsilocal.synth.masks.lesion_mask` and its siblings."""
        return FIELD_STEP


@dataclass
class Builder:
    """What arrangement builders need: the coarse fields, a random generator and the shape/nucleus lists."""

    rng: np.random.Generator
    size: tuple[int, int]
    fields: np.ndarray
    shapes: ShapeList
    nuclei: NucleusList

    def tissue_at(self, pts: np.ndarray) -> np.ndarray:
        return sample_points(self.fields[0], pts[:, 0], pts[:, 1])

    def lesion_at(self, pts: np.ndarray) -> np.ndarray:
        return sample_points(self.fields[1], pts[:, 0], pts[:, 1])

    def lesion_bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        ys, xs = np.nonzero(self.fields[1] > -pad)
        return (xs.min() * FIELD_STEP - pad, ys.min() * FIELD_STEP - pad,
                (xs.max() + 1) * FIELD_STEP + pad, (ys.max() + 1) * FIELD_STEP + pad)

    def sites(self, spacing: float, jitter: float, depth: float = 0.0) -> np.ndarray:
        """Jittered lattice points deeper than ``depth`` px inside the lesion, and at least one (its
        deepest node) in every lesion region, so that even a tiny lesion shows its arrangement."""
        pts = lattice(self.rng, self.lesion_bbox(), spacing, jitter)
        pts = pts[self.lesion_at(pts) > depth] if len(pts) else pts.reshape(0, 2)
        regions, n = ndimage.label(self.fields[1] > 0)
        hc, wc = regions.shape
        rows = np.clip((pts[:, 1] // FIELD_STEP).astype(int), 0, hc - 1)
        cols = np.clip((pts[:, 0] // FIELD_STEP).astype(int), 0, wc - 1)
        missing = sorted(set(range(1, n + 1)) - set(regions[rows, cols].tolist()))
        extra = [np.unravel_index(np.argmax(np.where(regions == k, self.fields[1], -np.inf)), regions.shape)
                 for k in missing]
        extra_pts = (np.array(extra, float).reshape(-1, 2)[:, ::-1] + 0.5) * FIELD_STEP
        return np.concatenate([pts, extra_pts])

    def ring_nuclei(self, kind: str, centre: np.ndarray, r_of: Callable[[np.ndarray], np.ndarray],
                    spacing: float, radial: bool) -> None:
        """Nuclei every ``spacing`` px along the closed curve at radius ``r_of(θ)`` around ``centre``,
        long axis radial (columnar cells) or tangential (flat cells)."""
        n = max(3, int(2 * np.pi * float(np.mean(r_of(np.linspace(0, 2 * np.pi, 16)))) / spacing))
        theta = (np.arange(n) + self.rng.random() + self.rng.normal(0, 0.12, n)) * 2 * np.pi / n
        r = r_of(theta) + self.rng.normal(0, 0.6 * UM, n)
        pts = centre + np.column_stack([r * np.cos(theta), r * np.sin(theta)])
        self.nuclei.add(kind, pts, theta if radial else theta + np.pi / 2)


HOLES = ("lumen", "stroma", "blood")  # top-layer materials no nucleus may sit in (lumens, frond cores)


def outside_holes(shapes: Shapes, nuclei: np.ndarray) -> np.ndarray:
    """Where shapes overlap (touching glands, crossing fronds) drop nuclei that fell into a lumen or core."""
    holes = shapes.select((shapes.layer == 2) & np.isin(shapes.material, [MATERIAL_IDS[m] for m in HOLES]))
    return nuclei[~covered(holes, nuclei[:, 0], nuclei[:, 1], margin=1.5 * UM)]


def draw_stain(rng: np.random.Generator, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-slide stain vectors × intensities (2, 3) and glass tint (3,): protocol and scanner variation."""
    vectors = np.abs(STAIN_OD + rng.normal(0, 0.05 * strength, (2, 3)))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    intensity = np.exp(rng.normal(0, [0.22, 0.25]) * strength)
    glass = GLASS_OD * np.exp(rng.normal(0, 0.3 * strength, 3))
    return vectors * intensity[:, None], glass
