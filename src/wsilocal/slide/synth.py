"""Synthetic H&E-like whole-slide images whose class is the *arrangement* of tumour nuclei (task
``morphology``) or the *relation* between two structures further apart than a tile (task ``context``).

A slide is described once, from its seed, by a :class:`SlideSpec`: coarse fields (tissue, lesion and
stroma density on an 8 µm grid), a list of shapes (glands, nests, fronds, vessels, fat cells, …) and a
list of nuclei (each a pre-rendered sprite). :func:`render_region` turns any level-0 rectangle of the spec
into pixels; every pixel depends only on its absolute coordinates, so a slide cut into strips gives the
same pixels as one rendered whole, and :func:`write_slide` streams 40000² px slides through
:func:`~wsilocal.slide.tiff_writer.write_pyramidal_tiff` in bounded memory.

Colour follows the Beer–Lambert law: each pixel carries haematoxylin and eosin concentrations, mixed
with per-slide stain vectors and intensities (the stain variation, drawn independently of the class).
See ``docs/synthetic.md`` for the model, its scales and what makes it hard.

The context task (:data:`CONTEXT_CLASSES`) draws one tumour focus (A) and one lymphoid follicle (B) on an
elongated strip of tissue; the label is only their distance (``near`` or ``far``). A and B are drawn over a
background generated without knowledge of them and clipped to their own regions, so every tile that holds
neither is independent of the label, and no tile holds both.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image
from scipy import ndimage
from scipy.spatial import Voronoi
from tqdm import tqdm

from wsilocal.errors import ConfigError
from wsilocal.slide.tiff_writer import write_pyramidal_tiff

GENERATOR_VERSION = "1.2"  # 1.1: the context task; 1.2: cases matched between classes (sizes, splits, stain)
MPP = 0.25  # µm per level-0 pixel (40x); every size below is given in µm and converted with UM
APP_MAG = 40
UM = 1.0 / MPP  # level-0 pixels per µm
CLASS_NAMES = ("glandular", "solid", "papillary", "cribriform", "micropapillary")
CONTEXT_CLASSES = ("near", "far")  # classes of the context task: the follicle's distance from the tumour focus
TASKS = ("morphology", "context")
DEFAULT_SIZE = {"morphology": (8192, 8192), "context": (28800, 12800)}  # level-0 px: 2×2 mm, 7.2×3.2 mm
FIELD_STEP = 32  # level-0 px between nodes of the coarse fields (8 µm); also the lesion-mask downsample
# Textures and nuclear sprites come in a few variants, each made once per process (~0.5 s) and cached;
# a slide picks one at random and shifts its texture coordinates.
VARIANTS = 4
CHUNK_ROWS, CHUNK_COLS = 256, 1024  # render at most this much at once: temporaries stay a few MB
EDGE = 1.5  # anti-aliased edge width in px

# Macenko's reference optical-density vectors (per R, G, B) of haematoxylin and eosin.
STAIN_OD = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
GLASS_OD = np.array([0.018, 0.022, 0.030])  # the faint tint of empty glass

# Materials fill shapes: haematoxylin and eosin concentration, which texture modulates them, how much.
FIBRE, GRAIN = 0, 1
MATERIALS = {
    "stroma": (0.05, 0.42, FIBRE, 0.5),
    "epithelium": (0.12, 0.36, GRAIN, 0.25),
    "lumen": (0.00, 0.08, GRAIN, 0.60),
    "fluid": (0.02, 0.28, GRAIN, 0.50),
    "fat": (0.00, 0.00, GRAIN, 0.00),
    "blood": (0.04, 1.45, GRAIN, 0.35),
    "wall": (0.07, 0.85, FIBRE, 0.30),
    "lymphoid": (0.28, 0.22, GRAIN, 0.30),
    "germinal": (0.10, 0.30, GRAIN, 0.30),  # pale germinal centre of a follicle (context task)
}
MATERIAL_IDS = {name: i for i, name in enumerate(MATERIALS)}
_MATERIAL_TABLE = np.array([m for m in MATERIALS.values()], dtype=np.float32)


@dataclass(frozen=True)
class NucleusKind:
    """How one kind of nucleus looks: sizes in µm, haematoxylin concentration, chromatin detail."""

    major: tuple[float, float]  # long axis range
    minor: tuple[float, float]  # short axis range
    irregular: float  # amplitude of boundary wobble
    density: tuple[float, float]  # haematoxylin concentration range
    chromatin: float  # strength of the coarse chromatin texture
    rim: float  # extra stain at the nuclear membrane (vesicular nuclei)
    nucleolus: float  # probability of a visible nucleolus


NUCLEUS_KINDS = {
    "tumour": NucleusKind((8.0, 10.5), (6.0, 8.0), 0.07, (0.7, 0.95), 0.45, 0.45, 0.6),
    "benign": NucleusKind((6.5, 8.0), (5.0, 6.0), 0.03, (1.05, 1.3), 0.25, 0.15, 0.1),
    "lymphocyte": NucleusKind((5.8, 7.2), (5.4, 6.8), 0.03, (1.7, 2.1), 0.15, 0.0, 0.0),
    "spindle": NucleusKind((11.0, 16.0), (2.0, 2.8), 0.05, (1.3, 1.6), 0.20, 0.0, 0.0),
    # Added last, so that the sprites of the kinds above (drawn in this order) stay as they were.
    "centroblast": NucleusKind((8.0, 10.0), (7.0, 8.5), 0.05, (0.75, 0.95), 0.30, 0.40, 0.5),
}
SPRITE_SHAPES, SPRITE_ANGLES = 8, 16  # per kind: distinct outlines × orientations over 180°


@dataclass
class SynthParams:
    """Every knob of the generator. Sizes of slides are level-0 pixels at :data:`MPP` µm/px.

    Attributes:
        task: ``"morphology"`` (classes differ by the arrangement of tumour nuclei) or ``"context"`` (two
            classes, ``near``/``far``: the distance between a tumour focus and a lymphoid follicle).
        classes: number of classes (2–5), named by the first ``classes`` entries of :data:`CLASS_NAMES`
            (morphology task only).
        size: (width, height) of level 0 in px; default by task (:data:`DEFAULT_SIZE`): 8192² px is 2×2 mm.
        lesion_fraction: range of the lesion's share of the tissue area, drawn uniformly per slide.
        lesion_regions: range of the number of lesion foci per slide (they may merge or split).
        tissue_pieces: range of the number of tissue pieces on the glass.
        tissue_cover: range of the tissue's share of the slide area (approximate).
        stain_variation: scale of the per-slide stain perturbation (0 = every slide stained the same).
        distractors: scale of the density of class-independent structures (lymphoid aggregates,
            vessels, fat, benign ducts); 0 removes them.
        seed: seed of the slide (a cohort derives one seed per slide from its own seed).
        quality: JPEG quality of the written tiles.
        context_tumour: context task: arrangement of the tumour focus A, one of :data:`CLASS_NAMES`.
        context_tumour_um: context task: range of A's diameter in µm.
        context_follicle_um: context task: range of the follicle B's diameter in µm.
        context_near_um: context task: range of the A–B gap (edge to edge, µm) of class ``near``.
        context_far_um: context task: range of the gap of class ``far``.
        context_tile_um: context task: edge of the tiles a tile-based model sees (256 px at 2 µm/px). No
            tile of this size, at any offset, holds both A and B, or A or B and glass
            (:attr:`context_margin_um`).

    The context task ignores ``classes``, ``lesion_fraction``, ``lesion_regions``, ``tissue_pieces`` and
    ``tissue_cover``.
    """

    task: str = "morphology"
    classes: int = 3
    size: tuple[int, int] | None = None
    lesion_fraction: tuple[float, float] = (0.05, 0.30)
    lesion_regions: tuple[int, int] = (1, 3)
    tissue_pieces: tuple[int, int] = (1, 3)
    tissue_cover: tuple[float, float] = (0.35, 0.55)
    stain_variation: float = 1.0
    distractors: float = 1.0
    seed: int = 0
    quality: int = 90
    context_tumour: str = "solid"
    context_tumour_um: tuple[float, float] = (400.0, 600.0)
    context_follicle_um: tuple[float, float] = (250.0, 400.0)
    context_near_um: tuple[float, float] = (800.0, 1200.0)
    context_far_um: tuple[float, float] = (2800.0, 3400.0)
    context_tile_um: float = 512.0

    def __post_init__(self) -> None:
        if self.size is None:  # the context layout needs a larger slide than the morphology task
            self.size = DEFAULT_SIZE.get(self.task, DEFAULT_SIZE["morphology"])
        self.size = tuple(self.size)

    @property
    def context_margin_um(self) -> float:
        """Least distance of A and B from glass, and least A–B gap: a tile's diagonal plus two mask pixels.

        Any square tile of edge ``context_tile_um`` that holds two points holds them within its diagonal, √2
        times its edge; the masks these distances are measured on are 8 µm pixels (one of slack each side).
        """
        return math.sqrt(2) * self.context_tile_um + 2 * FIELD_STEP * MPP

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an out-of-range knob."""
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.task == "context":
            problems += self._context_problems()
        if not 2 <= self.classes <= len(CLASS_NAMES):
            problems.append(f"classes must be 2..{len(CLASS_NAMES)}, not {self.classes}")
        if min(self.size) < 256:
            problems.append(f"size must be at least 256 px a side, not {self.size}")
        lo, hi = self.lesion_fraction
        if not 0 < lo <= hi <= 0.6:
            problems.append(f"lesion_fraction must satisfy 0 < lo <= hi <= 0.6, not {self.lesion_fraction}")
        for name in ("lesion_regions", "tissue_pieces"):
            lo_n, hi_n = getattr(self, name)
            if not 1 <= lo_n <= hi_n:
                problems.append(f"{name} must satisfy 1 <= lo <= hi, not {(lo_n, hi_n)}")
        if not 0.05 <= self.tissue_cover[0] <= self.tissue_cover[1] <= 0.8:
            problems.append(f"tissue_cover must lie within 0.05..0.8, not {self.tissue_cover}")
        if self.stain_variation < 0 or self.distractors < 0:
            problems.append("stain_variation and distractors must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))

    def _context_problems(self) -> list[str]:
        problems = []
        for name in ("context_tumour_um", "context_follicle_um", "context_near_um", "context_far_um"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                problems.append(f"{name} must satisfy 0 < lo <= hi, not {(lo, hi)}")
        if self.context_tile_um <= 0:
            problems.append(f"context_tile_um must be > 0, not {self.context_tile_um}")
        elif self.context_near_um[0] < self.context_margin_um:
            problems.append(f"context_near_um must start at >= {self.context_margin_um:.0f} µm (a tile's diagonal "
                            f"plus 16 µm) so that no tile holds both structures, not {self.context_near_um[0]}")
        if self.context_far_um[0] <= self.context_near_um[1]:
            problems.append(f"context_far_um {self.context_far_um} must lie beyond context_near_um "
                            f"{self.context_near_um}")
        if self.context_tumour not in CLASS_NAMES:
            problems.append(f"context_tumour must be one of {', '.join(CLASS_NAMES)}, not {self.context_tumour!r}")
        return problems


def class_names(classes: int, task: str = "morphology") -> list[str]:
    """Label names of a cohort: the first ``classes`` of :data:`CLASS_NAMES`, or ``near``, ``far`` (context)."""
    if task == "context":
        return list(CONTEXT_CLASSES)
    if not 2 <= classes <= len(CLASS_NAMES):
        raise ConfigError(f"classes must be 2..{len(CLASS_NAMES)}, not {classes}")
    return list(CLASS_NAMES[:classes])


# --------------------------------------------------------------------------------------------------
# Small numeric helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Stationary Gaussian-filtered white noise with unit standard deviation in expectation.

    Drawn on a grid padded by 3σ and cropped, and scaled by the theoretical 2σ√π, so that a grid smaller
    than σ gets a gentle slope rather than a constant blown up by its tiny sample spread.
    """
    sigma = max(sigma, 0.5)
    pad = int(3 * sigma) + 1
    noise = rng.standard_normal((shape[0] + 2 * pad, shape[1] + 2 * pad))
    smooth = ndimage.gaussian_filter(noise, sigma, mode="wrap")[pad:-pad, pad:-pad]
    return smooth * (2 * sigma * math.sqrt(math.pi))


def _periodic_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_along: float,
                    sigma_across: float, angle: float) -> np.ndarray:
    """Tileable noise filtered by an oriented Gaussian (streaks along ``angle``), unit std."""
    ky = (np.fft.fftfreq(shape[0]) * 2 * np.pi).astype(np.float32)[:, None]
    kx = (np.fft.rfftfreq(shape[1]) * 2 * np.pi).astype(np.float32)[None, :]
    along = (kx * math.cos(angle) + ky * math.sin(angle)) * sigma_along
    across = (ky * math.cos(angle) - kx * math.sin(angle)) * sigma_across
    gain = np.exp(-0.5 * (along * along + across * across))
    white = rng.standard_normal(shape, dtype=np.float32)
    out = scipy.fft.irfft2(scipy.fft.rfft2(white) * gain, s=shape)
    return out / max(float(out.std()), 1e-9)


def _harmonics(rng: np.random.Generator, n: int, irregular: float) -> np.ndarray:
    """Complex coefficients of boundary harmonics 2..5 of ``n`` blobs (radius = R(1 + Re Σ c_k e^{ikθ}))."""
    k = np.arange(2, 6)
    mags = np.abs(rng.normal(0, irregular, (n, 4))) / k**1.2
    mags *= np.minimum(1.0, 0.6 / np.maximum(mags.sum(axis=1, keepdims=True), 1e-9))  # keep r > 0.4 R
    return mags * np.exp(2j * np.pi * rng.random((n, 4)))


def _lattice(rng: np.random.Generator, bbox: Sequence[float], spacing: float, jitter: float) -> np.ndarray:
    """Jittered hexagonal lattice with random orientation covering ``bbox`` (x0, y0, x1, y1): (n, 2) points."""
    x0, y0, x1, y1 = bbox
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, math.hypot(x1 - x0, y1 - y0) / 2 + spacing
    row = spacing * math.sqrt(3) / 2
    js = np.arange(-math.ceil(half / row), math.ceil(half / row) + 1)
    i_s = np.arange(-math.ceil(half / spacing) - 1, math.ceil(half / spacing) + 1)
    gi, gj = np.meshgrid(i_s, js)
    u = (gi + 0.5 * (gj % 2) + rng.random()) * spacing
    v = (gj + rng.random()) * row
    angle = rng.random() * np.pi
    px = cx + u * math.cos(angle) - v * math.sin(angle)
    py = cy + u * math.sin(angle) + v * math.cos(angle)
    pts = np.stack([px.ravel(), py.ravel()], axis=1)
    pts += rng.normal(0, jitter * spacing, pts.shape)
    keep = (pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)
    return pts[keep]


def _grid_index(coord: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Left node and weight for linear interpolation of node values at pixel centres ``coord``."""
    u = np.clip((coord + 0.5) / FIELD_STEP - 0.5, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), n - 2)
    return i0, (u - i0).astype(np.float32)


def _sample_points(field_: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear value of a coarse field at level-0 points (same arithmetic as :func:`_sample_grid`)."""
    iy, fy = _grid_index(np.asarray(ys, np.float64), field_.shape[0])
    ix, fx = _grid_index(np.asarray(xs, np.float64), field_.shape[1])
    top = field_[iy, ix] + fx * (field_[iy, ix + 1] - field_[iy, ix])
    bottom = field_[iy + 1, ix] + fx * (field_[iy + 1, ix + 1] - field_[iy + 1, ix])
    return top + fy * (bottom - top)


def _sample_grid(fields: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear values of coarse fields (F, Hc, Wc) on the pixel grid ys × xs: (F, len(ys), len(xs)).

    Interpolates along x on the few coarse rows the window spans, then along y: the per-pixel work is
    one lerp and a row copy.
    """
    iy, fy = _grid_index(ys.astype(np.float64), fields.shape[1])
    ix, fx = _grid_index(xs.astype(np.float64), fields.shape[2])
    r0, r1, c0, c1 = int(iy[0]), int(iy[-1]) + 2, int(ix[0]), int(ix[-1]) + 2
    sub = fields[:, r0:r1, c0:c1]
    left, right = sub.take(ix - c0, axis=2), sub.take(ix - c0 + 1, axis=2)
    rows = left + fx * (right - left)  # (F, coarse rows, len(xs))
    top, bottom = rows.take(iy - r0, axis=1), rows.take(iy - r0 + 1, axis=1)
    bottom -= top  # in place: top + fy (bottom - top) without further full-size temporaries
    bottom *= fy[:, None]
    top += bottom
    return top


def _tile_lookup(tile: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Values of a periodic texture tile at absolute pixel coordinates."""
    return tile.take(ys % tile.shape[0], axis=0).take(xs % tile.shape[1], axis=1)


# --------------------------------------------------------------------------------------------------
# Shapes: blobs (irregular discs) and capsules (tapered segments), each filled with one material


@dataclass
class Shapes:
    """Filled shapes of a slide, in drawing order. ``geom`` holds (cx, cy, R, 0, 0, 0) for a blob and
    (ax, ay, bx, by, ra, rb) for a capsule; ``harm`` the blob's boundary harmonics; ``bbox`` x0, y0, x1, y1."""

    capsule: np.ndarray
    layer: np.ndarray
    material: np.ndarray
    geom: np.ndarray
    harm: np.ndarray
    bbox: np.ndarray

    def inside(self, i: int, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Signed distance-like depth of points inside shape ``i`` in px (> 0 inside), broadcasting px/py.

        Computed in the dtype of ``px``/``py`` (float32 for rendering windows keeps them small).
        """
        g = [float(v) for v in self.geom[i]]  # Python floats do not promote float32 arrays
        if self.capsule[i]:
            ax, ay, bx, by, ra, rb = g
            vx, vy = bx - ax, by - ay
            t = np.clip(((px - ax) * vx + (py - ay) * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
            return ra + t * (rb - ra) - np.hypot(px - ax - t * vx, py - ay - t * vy)
        cx, cy, radius = g[:3]
        dx, dy = px - cx, py - cy
        d = np.hypot(dx, dy)
        inv = 1.0 / np.maximum(d, 1e-6)
        cos1, sin1 = dx * inv, dy * inv
        cos_k, sin_k = cos1 * cos1 - sin1 * sin1, 2.0 * cos1 * sin1  # angle 2θ, then 3θ, 4θ, 5θ
        wobble = 0.0
        for c in self.harm[i].tolist():
            wobble = wobble + (c.real * cos_k - c.imag * sin_k)  # Re(c e^{ikθ})
            cos_k, sin_k = cos_k * cos1 - sin_k * sin1, sin_k * cos1 + cos_k * sin1
        return radius * (1.0 + wobble) - d

    def __len__(self) -> int:
        return len(self.material)

    def select(self, keep: np.ndarray) -> Shapes:
        """The shapes where ``keep`` is true, in the same order."""
        return Shapes(self.capsule[keep], self.layer[keep], self.material[keep], self.geom[keep],
                      self.harm[keep], self.bbox[keep])


class _ShapeList:
    """Collects shapes per drawing layer; :meth:`finish` orders them layer by layer."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []

    def blobs(self, layer: int, material: str, cx, cy, radius, harm: np.ndarray) -> Shapes:
        """Add blobs (arrays or scalars broadcast together; ``harm`` one row per blob); returns them."""
        cx, cy, radius = np.broadcast_arrays(np.asarray(cx, float), np.asarray(cy, float),
                                             np.asarray(radius, float))
        rows = [(layer, 0, MATERIAL_IDS[material], np.array([cx.flat[i], cy.flat[i], radius.flat[i], 0, 0, 0]),
                 harm[i]) for i in range(cx.size)]
        return self.extend(rows)

    def capsule(self, layer: int, material: str, a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> Shapes:
        """Add a capsule from ``a`` (radius ``ra``) to ``b`` (radius ``rb``); returns it."""
        geom = np.array([a[0], a[1], b[0], b[1], ra, rb])
        return self.extend([(layer, 1, MATERIAL_IDS[material], geom, np.zeros(4, complex))])

    def extend(self, rows: list) -> Shapes:
        """Add rows collected by another list; returns them as shapes."""
        self.rows.extend(rows)
        added = _ShapeList()
        added.rows = rows
        return added.finish()

    def finish(self) -> Shapes:
        rows = sorted(self.rows, key=lambda r: r[0])  # stable: creation order within a layer
        if not rows:
            return Shapes(np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 6)),
                          np.zeros((0, 4), complex), np.zeros((0, 4), np.int64))
        capsule = np.array([r[1] for r in rows], bool)
        geom = np.stack([r[3] for r in rows])
        harm = np.stack([r[4] for r in rows])
        reach = np.where(capsule, np.maximum(geom[:, 4], geom[:, 5]),
                         geom[:, 2] * (1 + np.abs(harm).sum(axis=1))) + EDGE + 1
        xa = np.where(capsule, np.minimum(geom[:, 0], geom[:, 2]), geom[:, 0])
        xb = np.where(capsule, np.maximum(geom[:, 0], geom[:, 2]), geom[:, 0])
        ya = np.where(capsule, np.minimum(geom[:, 1], geom[:, 3]), geom[:, 1])
        yb = np.where(capsule, np.maximum(geom[:, 1], geom[:, 3]), geom[:, 1])
        bbox = np.stack([np.floor(xa - reach), np.floor(ya - reach), np.ceil(xb + reach) + 1,
                         np.ceil(yb + reach) + 1], axis=1).astype(np.int64)
        return Shapes(capsule, np.array([r[0] for r in rows]), np.array([r[2] for r in rows]), geom, harm, bbox)


def _covered(shapes: Shapes, xs: np.ndarray, ys: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Which points lie deeper than ``margin`` px inside any of ``shapes``."""
    order = np.argsort(ys, kind="stable")
    sx, sy = xs[order], ys[order]
    hit = np.zeros(len(xs), bool)
    for i in range(len(shapes)):
        x0, y0, x1, y1 = shapes.bbox[i]
        lo, hi = np.searchsorted(sy, [y0, y1])
        idx = lo + np.flatnonzero((sx[lo:hi] >= x0) & (sx[lo:hi] < x1))
        if idx.size:
            hit[idx[shapes.inside(i, sx[idx], sy[idx]) > margin]] = True
    out = np.empty_like(hit)
    out[order] = hit
    return out


# --------------------------------------------------------------------------------------------------
# Nuclei: sprites rendered once per variant, stamped at their centres


SPRITE_OFFSET = {name: i * SPRITE_SHAPES * SPRITE_ANGLES for i, name in enumerate(NUCLEUS_KINDS)}


@functools.lru_cache(maxsize=VARIANTS)
def _sprites(variant: int) -> tuple[list[np.ndarray], int]:
    """SPRITE_SHAPES × SPRITE_ANGLES sprites per nucleus kind (kind k from SPRITE_OFFSET[k]): arrays
    (2, s, s) of (haematoxylin, coverage); and the largest half-size, how far a sprite reaches."""
    rng = np.random.default_rng([variant, 0x5B])
    sprites: list[np.ndarray] = []
    for kind in NUCLEUS_KINDS.values():
        for _ in range(SPRITE_SHAPES):
            a = rng.uniform(*kind.major) * UM / 2
            b = min(rng.uniform(*kind.minor) * UM / 2, a)
            harm = _harmonics(rng, 1, kind.irregular)[0]
            base = rng.uniform(*kind.density)
            nucleolus = rng.random() < kind.nucleolus
            half = math.ceil(a * 1.3 + EDGE + 1)
            yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
            for k in range(SPRITE_ANGLES):
                angle = np.pi * k / SPRITE_ANGLES
                u = xx * math.cos(angle) + yy * math.sin(angle)
                v = -xx * math.sin(angle) + yy * math.cos(angle)
                z = (u / a + 1j * v / b)
                rr = np.abs(z)
                z = z / np.maximum(rr, 1e-9)
                wobble = sum((c * z ** (j + 2)).real for j, c in enumerate(harm))
                depth = (1 + wobble - rr) * b  # ≈ px from the membrane, > 0 inside
                cover = np.clip(depth / EDGE + 0.5, 0, 1)
                chromatin = ndimage.gaussian_filter(rng.standard_normal(xx.shape), 1.2)
                chromatin /= max(float(chromatin.std()), 1e-9)
                h = base * (1 + 0.5 * kind.chromatin * chromatin) + kind.rim * base * np.exp(-((depth / 2.5) ** 2))
                if nucleolus:
                    ny, nx = rng.normal(0, 0.25 * b, 2)
                    h += 0.9 * base * np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / (2 * (0.35 * UM) ** 2))
                sprites.append(np.stack([np.clip(h, 0, None) * cover, cover]).astype(np.float32))
    return sprites, max(s.shape[1] for s in sprites) // 2 + 1


class _NucleusList:
    """Collects nuclei (centre, sprite, intensity gain) while a slide is built."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.parts: list[np.ndarray] = []

    def add(self, kind: str, pts: np.ndarray, angles: np.ndarray | None = None) -> None:
        """Add nuclei of ``kind`` at points (n, 2); ``angles`` orient their long axes (random if None)."""
        n = len(pts)
        if n == 0:
            return
        if angles is None:
            angles = self.rng.random(n) * np.pi
        angle_bin = np.round(np.asarray(angles) / np.pi * SPRITE_ANGLES).astype(np.int64) % SPRITE_ANGLES
        sprite = SPRITE_OFFSET[kind] + self.rng.integers(0, SPRITE_SHAPES, n) * SPRITE_ANGLES + angle_bin
        gain = np.exp(self.rng.normal(0, 0.10, n))
        self.parts.append(np.column_stack([np.round(pts[:, 0]), np.round(pts[:, 1]), sprite, gain]))

    def finish(self) -> np.ndarray:
        """(n, 4) float64 rows x, y, sprite, gain sorted by y (then x): strips find theirs by bisection."""
        if not self.parts:
            return np.zeros((0, 4))
        rows = np.concatenate(self.parts)
        return rows[np.lexsort((rows[:, 0], rows[:, 1]))]


# --------------------------------------------------------------------------------------------------
# The slide description


@dataclass
class Front:
    """The structures of a context slide (tumour focus A and follicle B), painted over the finished
    background and clipped to their regions (depth fields 1 and 3), so the background never depends on them."""

    shapes: Shapes
    nuclei: np.ndarray
    ground: int  # material filling the tumour focus between its structures (-1: plain stroma)


@dataclass
class SlideSpec:
    """Everything needed to render one slide; built by :func:`make_slide` from a seed.

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
        return _textures(self.variant)

    @property
    def mask_downsample(self) -> int:
        """Level-0 px per pixel of :func:`lesion_mask` and :func:`tissue_mask`."""
        return FIELD_STEP


@dataclass
class _Context:
    """What arrangement builders need: the coarse fields, a random generator and the shape/nucleus lists."""

    rng: np.random.Generator
    size: tuple[int, int]
    fields: np.ndarray
    shapes: _ShapeList
    nuclei: _NucleusList

    def tissue_at(self, pts: np.ndarray) -> np.ndarray:
        return _sample_points(self.fields[0], pts[:, 0], pts[:, 1])

    def lesion_at(self, pts: np.ndarray) -> np.ndarray:
        return _sample_points(self.fields[1], pts[:, 0], pts[:, 1])

    def lesion_bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        ys, xs = np.nonzero(self.fields[1] > -pad)
        return (xs.min() * FIELD_STEP - pad, ys.min() * FIELD_STEP - pad,
                (xs.max() + 1) * FIELD_STEP + pad, (ys.max() + 1) * FIELD_STEP + pad)

    def sites(self, spacing: float, jitter: float, depth: float = 0.0) -> np.ndarray:
        """Jittered lattice points deeper than ``depth`` px inside the lesion, and at least one (its
        deepest node) in every lesion region, so that even a tiny lesion shows its arrangement."""
        pts = _lattice(self.rng, self.lesion_bbox(), spacing, jitter)
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


def _blob_radius(harm: np.ndarray, radius: float) -> Callable[[np.ndarray], np.ndarray]:
    """The radius function r(θ) of a blob."""
    return lambda theta: radius * (1 + sum((c * np.exp(1j * (k + 2) * theta)).real for k, c in enumerate(harm)))


def _between(inner: Callable, outer: Callable, depth: float) -> Callable[[np.ndarray], np.ndarray]:
    """The curve ``depth`` of the way from radius function ``inner`` to ``outer``."""
    return lambda theta: inner(theta) + depth * (outer(theta) - inner(theta))


# --- arrangements: one builder per class, all drawing the same tumour nuclei and epithelium ---------


def _glands(ctx: _Context, centres: np.ndarray, radius: np.ndarray, lumen_ratio: np.ndarray,
            irregular: float, kind: str, layers_of_nuclei: np.ndarray) -> None:
    """Glands: epithelial blobs around a white lumen, nuclei lined up at the basal side."""
    n = len(centres)
    outer, inner = _harmonics(ctx.rng, n, irregular), _harmonics(ctx.rng, n, irregular * 0.6)
    ctx.shapes.blobs(1, "epithelium", centres[:, 0], centres[:, 1], radius, outer)
    ctx.shapes.blobs(2, "lumen", centres[:, 0], centres[:, 1], radius * lumen_ratio, inner)
    for i in range(n):
        r_out, r_in = _blob_radius(outer[i], radius[i]), _blob_radius(inner[i], radius[i] * lumen_ratio[i])
        for depth in np.linspace(0.62, 0.38, layers_of_nuclei[i]):  # 1 layer, or 2 where stratified
            ctx.ring_nuclei(kind, centres[i], _between(r_in, r_out, depth), 7.5 * UM, radial=True)


def _glandular(ctx: _Context) -> None:
    """Back-to-back glands 60–150 µm across, rings of (partly stratified) nuclei around white lumens."""
    rng = ctx.rng
    spacing = rng.uniform(100, 130) * UM
    centres = ctx.sites(spacing, 0.18)
    n = len(centres)
    radius = spacing / 2 * rng.uniform(0.62, 0.9, n)
    _glands(ctx, centres, radius, rng.uniform(0.42, 0.58, n), 0.14, "tumour", rng.integers(1, 3, n))


def _septa(ctx: _Context, spacing: float, width_um: tuple[float, float]) -> Shapes:
    """Thin stromal septa splitting the lesion's epithelial sheet into nests ~``spacing`` across: the
    ridges of the Voronoi diagram of jittered nest centres (each bent once, about a third left out)."""
    rng = ctx.rng
    centres = _lattice(rng, ctx.lesion_bbox(pad=spacing), spacing, 0.25)
    septa = _ShapeList()  # collected apart, so they can be returned together
    if len(centres) >= 4:
        vor = Voronoi(centres)
        for a, b in vor.ridge_vertices:
            if a < 0 or b < 0 or rng.random() < 0.35:
                continue
            pa, pb = vor.vertices[a], vor.vertices[b]
            bend = (pa + pb) / 2 + rng.normal(0, 0.12 * float(np.hypot(*(pb - pa))), 2)
            if ctx.lesion_at(bend[None])[0] > 0:
                width = rng.uniform(*width_um) * UM / 2
                septa.capsule(1, "stroma", pa, bend, width, width)
                septa.capsule(1, "stroma", bend, pb, width, width)
    return ctx.shapes.extend(septa.rows)


def _sheet_nuclei(ctx: _Context, spacing: float, *avoid: Shapes) -> None:
    """Tumour nuclei packed on a jittered lattice over the whole lesion, except on the ``avoid`` shapes."""
    pts = _lattice(ctx.rng, ctx.lesion_bbox(), spacing, 0.28)
    pts = pts[ctx.lesion_at(pts) > 2.5 * UM]
    for shapes in avoid:
        pts = pts[~_covered(shapes, pts[:, 0], pts[:, 1], margin=-4 * UM)]
    ctx.nuclei.add("tumour", pts)


def _solid(ctx: _Context) -> None:
    """Sheets of packed nuclei filling the lesion, split into ~100–200 µm nests by septa; no lumens."""
    septa = _septa(ctx, ctx.rng.uniform(100, 200) * UM, (10, 20))
    _sheet_nuclei(ctx, ctx.rng.uniform(12.5, 13.5) * UM, septa)


def _cribriform(ctx: _Context) -> None:
    """Sheets like the solid class but punched by many small round lumens (14–26 µm) every ~40 µm."""
    rng = ctx.rng
    septa = _septa(ctx, rng.uniform(250, 350) * UM, (5, 10))
    pts = ctx.sites(rng.uniform(34, 44) * UM, 0.15, depth=14 * UM)
    pts = pts[~_covered(septa, pts[:, 0], pts[:, 1], margin=-14 * UM)]
    harm = _harmonics(rng, len(pts), 0.06)
    lumens = ctx.shapes.blobs(2, "lumen", pts[:, 0], pts[:, 1], rng.uniform(7, 13, len(pts)) * UM, harm)
    _sheet_nuclei(ctx, rng.uniform(11, 12.5) * UM, septa, lumens)


def _papillary(ctx: _Context) -> None:
    """Branching finger-like fronds (pink stromal core lined by columnar nuclei) filling a cystic space.

    Each frond grows as a random walk of tapered segments that branch. A segment must keep a small gap
    from every earlier segment except its parent, grandparent and siblings (checked on a grid of
    segment points), so fronds never cross and clefts of the cyst show between them.
    """
    rng = ctx.rng
    epi, gap, cell = 10 * UM, 3 * UM, 30 * UM
    grid: dict[tuple[int, int], list[tuple[float, float, float, int]]] = {}
    segments: list[tuple[np.ndarray, np.ndarray, float, float, float]] = []  # start, end, r_start, r_end, heading
    parent_of: list[int] = []
    children: dict[int, list[int]] = {}

    def clear(p: np.ndarray, r: float, parent: int) -> bool:
        near = {parent, *children.get(parent, ())}
        if parent >= 0 and parent_of[parent] >= 0:
            near.add(parent_of[parent])
        kx, ky = int(p[0] // cell), int(p[1] // cell)
        return all(k in near or math.hypot(p[0] - qx, p[1] - qy) > r + qr + gap
                   for dx in range(-2, 3) for dy in range(-2, 3) for qx, qy, qr, k in grid.get((kx + dx, ky + dy), ()))

    for root in ctx.sites(rng.uniform(45, 60) * UM, 0.3, depth=20 * UM):
        radius = rng.uniform(20, 26) * UM
        if not clear(root, radius, -1):
            continue
        stack = [(root, rng.random() * 2 * np.pi, radius, 0, -1)]
        while stack:
            start, heading0, radius, depth, parent = stack.pop()
            r_end = max(radius * 0.92, 15 * UM)
            for attempt in range(6):  # blocked: try to bend around the obstacle
                heading = heading0 + rng.normal(0, 0.3 + 0.4 * attempt)
                end = start + rng.uniform(30, 55) * UM * np.array([math.cos(heading), math.sin(heading)])
                mid = (start + end) / 2
                if (ctx.lesion_at(end[None])[0] > r_end and clear(end, r_end, parent)
                        and clear(mid, r_end, parent)):
                    break
            else:
                continue
            k = len(segments)
            for p in (mid, end):
                grid.setdefault((int(p[0] // cell), int(p[1] // cell)), []).append((p[0], p[1], r_end, k))
            segments.append((start, end, radius, r_end, heading))
            parent_of.append(parent)
            children.setdefault(parent, []).append(k)
            if depth < 14 and rng.random() < 0.93:
                stack.append((end, heading, r_end, depth + 1, k))
                if rng.random() < 0.55:
                    turn = rng.choice([-1, 1]) * rng.uniform(0.6, 1.0)
                    stack.append((end, heading + turn, r_end, depth + 1, k))

    for k, (start, end, radius, r_end, heading) in enumerate(segments):
        ctx.shapes.capsule(1, "epithelium", start, end, radius, r_end)
        ctx.shapes.capsule(2, "stroma", start, end, radius - epi, r_end - epi)
        # Columnar nuclei along both sides, long axis across the frond; around the tip of a last segment.
        length = float(np.hypot(*(end - start)))
        t = (np.arange(max(1, int(length / (7.5 * UM)))) + rng.random()) * 7.5 * UM / max(length, 1e-9)
        normal = np.array([-math.sin(heading), math.cos(heading)])
        for side in (-1, 1):
            offset = (radius + t * (r_end - radius) - epi * 0.55 + rng.normal(0, 0.5 * UM, t.size)) * side
            pts = start + t[:, None] * (end - start) + offset[:, None] * normal
            ctx.nuclei.add("tumour", pts, np.full(t.size, heading + np.pi / 2))
        if k not in children:
            r_tip = r_end - epi * 0.55
            theta = heading + np.linspace(-np.pi / 2, np.pi / 2, max(2, int(np.pi * r_tip / (7.5 * UM))) + 1)[1:-1]
            ctx.nuclei.add("tumour", end + r_tip * np.column_stack([np.cos(theta), np.sin(theta)]), theta)


def _micropapillary(ctx: _Context) -> None:
    """Small clusters of cells (30–50 µm) floating in clear clefts (45–70 µm) of the stroma, nuclei at
    their rim (inside-out polarity)."""
    rng = ctx.rng
    centres = ctx.sites(rng.uniform(60, 75) * UM, 0.2)
    n = len(centres)
    cleft = rng.uniform(22, 34, n) * UM
    ctx.shapes.blobs(1, "lumen", centres[:, 0], centres[:, 1], cleft, _harmonics(rng, n, 0.15))
    cluster = cleft * rng.uniform(0.62, 0.76, n)
    shift = rng.normal(0, 0.03, (n, 2)) * cleft[:, None]
    harm = _harmonics(rng, n, 0.12)
    ctx.shapes.blobs(2, "epithelium", centres[:, 0] + shift[:, 0], centres[:, 1] + shift[:, 1], cluster, harm)
    for i in range(n):
        r_of = _blob_radius(harm[i], cluster[i] * 0.7)
        ctx.ring_nuclei("tumour", centres[i] + shift[i], r_of, 8 * UM, radial=True)


ARRANGEMENTS: dict[str, Callable[[_Context], None]] = {
    "glandular": _glandular,
    "solid": _solid,
    "papillary": _papillary,
    "cribriform": _cribriform,
    "micropapillary": _micropapillary,
}
HOLES = ("lumen", "stroma", "blood")  # top-layer materials no nucleus may sit in (lumens, frond cores)
# What fills the lesion between its structures: a cyst for papillary, epithelial sheets for solid and
# cribriform; glandular and micropapillary lesions sit in stroma.
LESION_GROUND = {"papillary": "fluid", "solid": "epithelium", "cribriform": "epithelium"}


# --- structures common to every class ------------------------------------------------------------


def _distractor_sites(ctx: _Context, count: int, radius_um: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` centres (n, 2) and radii (n,) in px: inside tissue, away from the lesion."""
    pts = ctx.rng.random((count * 20, 2)) * ctx.size  # candidates; most land on glass or the lesion
    r = ctx.rng.uniform(*radius_um, len(pts)) * UM
    ok = (ctx.tissue_at(pts) > r * 0.8) & (ctx.lesion_at(pts) < -r - 20 * UM)
    return pts[ok][:count], r[ok][:count]


def _common_structures(ctx: _Context, density: float, aggregates: bool = True) -> None:
    """Lymphoid aggregates, vessels, fat and benign ducts: present regardless of class, outside the lesion.

    ``aggregates=False`` leaves out the lymphoid aggregates (the context task's follicle is the only one).
    """
    rng = ctx.rng
    tissue_mm2 = float((ctx.fields[0] > 0).sum()) * (FIELD_STEP * MPP / 1000) ** 2

    def count(per_mm2: float) -> int:
        return int(rng.poisson(per_mm2 * tissue_mm2 * density))

    if aggregates:
        sites, r = _distractor_sites(ctx, count(0.6), (80, 200))
        blobs = ctx.shapes.blobs(1, "lymphoid", sites[:, 0], sites[:, 1], r, _harmonics(rng, len(sites), 0.15))
        for i in range(len(blobs)):
            pts = _lattice(rng, blobs.bbox[i], 8.5 * UM, 0.25)
            ctx.nuclei.add("lymphocyte", pts[blobs.inside(i, pts[:, 0], pts[:, 1]) > 2 * UM])

    sites, r = _distractor_sites(ctx, count(0.3), (150, 320))  # fat lobules
    for centre, lobule in zip(sites, r, strict=True):
        cell = rng.uniform(22, 32) * UM
        pts = _lattice(rng, (*(centre - lobule), *(centre + lobule)), 2 * cell, 0.08)
        pts = pts[np.hypot(*(pts - centre).T) < lobule]
        ctx.shapes.blobs(1, "fat", pts[:, 0], pts[:, 1], cell * 0.94, _harmonics(rng, len(pts), 0.06))

    sites, r = _distractor_sites(ctx, count(5.0), (12, 45))  # vessels, with blood or empty
    n = len(sites)
    wall_h, lumen_h = _harmonics(rng, n, 0.1), _harmonics(rng, n, 0.2)
    lumen_r = r * rng.uniform(0.6, 0.8, n)
    ctx.shapes.blobs(1, "wall", sites[:, 0], sites[:, 1], r, wall_h)
    for i in range(n):
        ctx.shapes.blobs(2, "blood" if rng.random() < 0.6 else "lumen", sites[i, 0], sites[i, 1], lumen_r[i],
                         lumen_h[i : i + 1])
        ctx.ring_nuclei("spindle", sites[i], _blob_radius(lumen_h[i], lumen_r[i] + 1.5 * UM), 16 * UM, radial=False)

    sites, r = _distractor_sites(ctx, count(1.2), (18, 32))  # benign ducts: one layer of small nuclei
    n = len(sites)
    _glands(ctx, sites, r, rng.uniform(0.3, 0.45, n), 0.05, "benign", np.ones(n, np.int64))


def _stroma_nuclei(ctx: _Context, ground: str | None, shapes: Shapes, only_lesion: bool = False) -> None:
    """Sparse spindle (fibroblast) nuclei and a few lymphocytes in the stroma, never inside a structure.

    With a lesion ``ground`` none in the lesion; ``only_lesion``: only there (the stroma of a context
    slide's tumour focus, which is drawn over the background).
    """
    rng = ctx.rng
    width, height = ctx.size
    for kind, spacing_um in (("spindle", 30.0), ("lymphocyte", 90.0)):
        n = rng.poisson(width * height / (spacing_um * UM) ** 2)
        pts = rng.random((n, 2)) * [width, height]
        keep = ctx.tissue_at(pts) > 4 * UM
        if only_lesion:
            keep &= ctx.lesion_at(pts) > 0
        elif ground is not None:
            keep &= ctx.lesion_at(pts) < 0
        pts = pts[keep]
        pts = pts[~_covered(shapes, pts[:, 0], pts[:, 1], margin=-4 * UM)]
        # Spindles follow a smooth local orientation, like the fibres they lie in.
        angles = _sample_points(ctx.fields[2], pts[:, 0], pts[:, 1]) * 40.0
        ctx.nuclei.add(kind, pts, angles)


# --- tissue, lesion, stain --------------------------------------------------------------------------


def _tissue_field(rng: np.random.Generator, params: SynthParams, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Depth inside tissue (px) on the coarse nodes: 1–3 irregular blobs laid out along the long side."""
    width, height = params.size
    gx, gy = grid
    n = int(rng.integers(params.tissue_pieces[0], params.tissue_pieces[1] + 1))
    cover = rng.uniform(*params.tissue_cover)
    long_is_x = width >= height
    long_len, short_len = (width, height) if long_is_x else (height, width)
    band = long_len / n
    radius = math.sqrt(cover * width * height / n / np.pi)
    radius = min(radius, 0.42 * band, 0.45 * short_len)
    out = np.full(gx.shape, -np.inf)
    for i in range(n):
        along = band * (i + 0.5) + rng.normal(0, 0.05) * band
        across = short_len / 2 + rng.normal(0, 0.05) * short_len
        cx, cy = (along, across) if long_is_x else (across, along)
        harm = _harmonics(rng, 1, 0.35)
        harm *= min(1.0, 0.3 / max(float(np.abs(harm).sum()), 1e-9))  # stays inside its band
        piece = _ShapeList().blobs(0, "stroma", cx, cy, radius * rng.uniform(0.8, 1.05), harm)
        out = np.maximum(out, piece.inside(0, gx, gy))
    ragged = _smooth_noise(rng, gx.shape, 0.15 * radius / FIELD_STEP) * 0.06 * radius
    return out + ragged


def _lesion_field(rng: np.random.Generator, params: SynthParams, tissue: np.ndarray,
                  grid: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, float]:
    """Depth inside the lesion (px) on the coarse nodes and the lesion's share of the tissue nodes.

    A few anisotropic bumps plus smooth noise, thresholded at the quantile that makes the lesion cover
    exactly the drawn fraction of the tissue nodes; kept a margin inside the tissue edge.
    """
    gx, gy = grid
    in_tissue = tissue > 0
    n_tissue = int(in_tissue.sum())
    fraction = rng.uniform(*params.lesion_fraction)
    target = max(1, round(fraction * n_tissue))
    margin = 40 * UM
    while margin > FIELD_STEP and (tissue > margin).sum() < 1.5 * target:
        margin /= 2  # small tissue pieces: let the lesion come closer to the edge
    interior = tissue > margin
    if interior.sum() < target:
        raise ConfigError(f"slide {params.size} too small for lesion fraction {fraction:.2f}")
    candidates = np.flatnonzero(interior.ravel())
    n_regions = min(int(rng.integers(params.lesion_regions[0], params.lesion_regions[1] + 1)), len(candidates))
    sigma = math.sqrt(target / n_regions / np.pi) * FIELD_STEP
    bumps = np.zeros(gx.shape)
    for flat in rng.choice(candidates, n_regions, replace=False):
        cx, cy = gx.ravel()[flat], gy.ravel()[flat]
        angle, stretch = rng.random() * np.pi, rng.uniform(0.6, 1.6)
        u = (gx - cx) * math.cos(angle) + (gy - cy) * math.sin(angle)
        v = -(gx - cx) * math.sin(angle) + (gy - cy) * math.cos(angle)
        bumps += rng.uniform(0.7, 1.3) * np.exp(-0.5 * ((u / (sigma * stretch)) ** 2 + (v * stretch / sigma) ** 2))
    bumps += 0.25 * _smooth_noise(rng, gx.shape, max(1.5, 0.4 * sigma / FIELD_STEP))
    values = np.sort(bumps[interior])[::-1]
    threshold = (values[target - 1] + values[target]) / 2 if target < len(values) else values[-1] - 1e-6
    # Scale to px: divide by the field's slope at the boundary, so edges anti-alias like the others.
    gy_, gx_ = np.gradient(bumps, FIELD_STEP)
    slope = np.hypot(gx_, gy_)[interior & (np.abs(bumps - threshold) < 0.1)]
    slope = float(np.median(slope)) if slope.size else 1.0 / sigma
    # Both terms are smooth, so the interpolated edge is smooth; > 0 exactly on `target` interior nodes.
    lesion = np.minimum((bumps - threshold) / max(slope, 1e-9), tissue - margin)
    return lesion, float((lesion > 0).sum() / n_tissue)


def _draw_stain(rng: np.random.Generator, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-slide stain vectors × intensities (2, 3) and glass tint (3,): protocol and scanner variation."""
    vectors = np.abs(STAIN_OD + rng.normal(0, 0.05 * strength, (2, 3)))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    intensity = np.exp(rng.normal(0, [0.22, 0.25]) * strength)
    glass = GLASS_OD * np.exp(rng.normal(0, 0.3 * strength, 3))
    return vectors * intensity[:, None], glass


def _fibre_tile(rng: np.random.Generator, period: tuple[int, int]) -> np.ndarray:
    """A tileable collagen texture: wavy bundles (oriented streak noise, one direction dominating
    locally, domain-warped) with thin pale clefts along the streaks' zero lines. Mean 0."""
    weights = [np.exp(5.0 * _periodic_noise(rng, period, 80, 80, 0)) for _ in range(3)]
    streaks = [_periodic_noise(rng, period, 30, 3.0, a) for a in (0, np.pi / 3, 2 * np.pi / 3)]
    f = sum(w * s for w, s in zip(weights, streaks, strict=True)) / sum(weights)
    f /= f.std()
    yy, xx = np.mgrid[0 : period[0], 0 : period[1]].astype(np.float64)
    warp = [8.0 * _periodic_noise(rng, period, 25, 25, 0) for _ in range(2)]
    f = ndimage.map_coordinates(f, [yy + warp[0], xx + warp[1]], order=1, mode="grid-wrap")
    tile = 0.4 * np.tanh(f) - 0.8 * np.exp(-((f / 0.22) ** 2))
    return (tile - tile.mean()).astype(np.float32)


@functools.lru_cache(maxsize=VARIANTS)
def _textures(variant: int) -> dict[str, np.ndarray]:
    """Periodic texture tiles addressed by absolute pixel coordinates (so strips agree).

    ``fibre_a``/``fibre_b``: collagen, two tiles whose periods share no small factor (averaged, the
    pattern repeats only every few mm); ``grain``: granular cytoplasm; ``edge``: raggedness of tissue
    edges in px; ``noise``: per-pixel scanner noise.
    """
    rng = np.random.default_rng([variant, 0x7E])
    fine, coarse = _periodic_noise(rng, (512, 520), 1.2, 1.2, 0), _periodic_noise(rng, (512, 520), 5, 5, 0)
    return {
        "fibre_a": _fibre_tile(rng, (1024, 1000)),
        "fibre_b": _fibre_tile(rng, (972, 864)),
        "grain": np.tanh(0.6 * fine + 0.5 * coarse).astype(np.float32),
        "edge": (4.0 * _periodic_noise(rng, (500, 506), 6, 6, 0)).astype(np.float32),
        "noise": rng.standard_normal((509, 511)).astype(np.float32),
    }


def make_slide(params: SynthParams, label: str, stain_seed: int | None = None) -> SlideSpec:
    """Describe one slide of class ``label`` from ``params.seed`` (stain from ``stain_seed`` if given,
    so slides of one case can share a staining run)."""
    params.validate()
    if params.task == "context":
        return _make_context_slide(params, label, stain_seed)
    if label not in ARRANGEMENTS:
        raise ConfigError(f"unknown class {label!r}; choose from {', '.join(CLASS_NAMES)}")
    rng = np.random.default_rng([params.seed, 0x5E7])
    width, height = params.size
    hc, wc = -(-height // FIELD_STEP), -(-width // FIELD_STEP)
    grid = np.meshgrid((np.arange(wc) + 0.5) * FIELD_STEP, (np.arange(hc) + 0.5) * FIELD_STEP)
    tissue = _tissue_field(rng, params, grid)
    lesion, fraction = _lesion_field(rng, params, tissue, grid)
    density = 1.0 + 0.12 * _smooth_noise(rng, tissue.shape, 120 * UM / FIELD_STEP)
    fields = np.stack([tissue, lesion, density]).astype(np.float32)

    ctx = _Context(rng, params.size, fields, _ShapeList(), _NucleusList(rng))
    ARRANGEMENTS[label](ctx)
    _common_structures(ctx, params.distractors)
    shapes = ctx.shapes.finish()
    ground = LESION_GROUND.get(label)
    _stroma_nuclei(ctx, ground, shapes)

    stain, glass = _draw_stain(np.random.default_rng([params.seed if stain_seed is None else stain_seed, 0x57A]),
                               params.stain_variation)
    return SlideSpec(
        label=label, size=(width, height), seed=params.seed, lesion_fraction=fraction, fields=fields,
        shapes=shapes, nuclei=_outside_holes(shapes, ctx.nuclei.finish()), stain=stain, glass=glass,
        lesion_ground=MATERIAL_IDS[ground] if ground else -1,
        variant=int(rng.integers(VARIANTS)), texture_shift=tuple(rng.integers(0, 10**6, 2)),
    )


def _outside_holes(shapes: Shapes, nuclei: np.ndarray) -> np.ndarray:
    """Where shapes overlap (touching glands, crossing fronds) drop nuclei that fell into a lumen or core."""
    holes = shapes.select((shapes.layer == 2) & np.isin(shapes.material, [MATERIAL_IDS[m] for m in HOLES]))
    return nuclei[~_covered(holes, nuclei[:, 0], nuclei[:, 1], margin=1.5 * UM)]


# --------------------------------------------------------------------------------------------------
# The context task: a tumour focus (A) and a lymphoid follicle (B); the label is only their distance


def _strip_tissue_field(rng: np.random.Generator, size: tuple[int, int],
                        grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Depth inside tissue (px) on the coarse nodes: one gently bent strip with round ends along the slide's
    long side (a resection strip), long enough for a far pair, with a ragged edge."""
    width, height = size
    long_is_x = width >= height
    long_len, short_len = (width, height) if long_is_x else (height, width)
    half = short_len * rng.uniform(0.38, 0.42)
    end = half + 0.03 * long_len
    along = np.linspace(end, long_len - end, 4)
    across = short_len / 2 + rng.normal(0, 0.015 * short_len, 4)
    spine = np.column_stack([along, across] if long_is_x else [across, along])
    strip = _ShapeList()
    for a, b in zip(spine[:-1], spine[1:], strict=True):
        strip.capsule(0, "stroma", a, b, half, half)
    pieces = strip.finish()
    depth = np.max([pieces.inside(i, *grid) for i in range(len(pieces))], axis=0)
    return depth + _smooth_noise(rng, depth.shape, 0.15 * half / FIELD_STEP) * 0.04 * half


def _draw_blob(rng: np.random.Generator, diameter_um: tuple[float, float],
               irregular: float) -> tuple[float, np.ndarray]:
    """Radius (px) and boundary harmonics of a roundish structure whose diameter is drawn from ``diameter_um``."""
    return rng.uniform(*diameter_um) * UM / 2, _harmonics(rng, 1, irregular)[0]


def _blob_depth(centre: Sequence[float], radius: float, harm: np.ndarray,
                grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Depth (px, > 0 inside) of a blob at the points of ``grid``."""
    return _ShapeList().blobs(0, "stroma", centre[0], centre[1], radius, harm[None]).inside(0, *grid)


def _reach_um(blob: tuple[float, np.ndarray], sign: int) -> float:
    """A bound on a blob's radius in µm: above its largest (sign +1) or below its smallest (sign -1)."""
    radius, harm = blob
    return radius * (1 + sign * float(np.abs(harm).sum())) * MPP


def _place_context(rng: np.random.Generator, params: SynthParams, tissue: np.ndarray,
                   grid: tuple[np.ndarray, np.ndarray], tumour: tuple[float, np.ndarray],
                   follicle: tuple[float, np.ndarray]) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, float]]]:
    """Centre (level-0 px, on a field node) of the tumour focus A and, per class, of the follicle B and its gap.

    A is drawn among the places that admit *both* a near and a far B, so where it lies does not depend on
    the label: for one seed the near and the far slide differ only in where B lies. A and B keep
    ``context_margin_um`` from glass and from the slide's border. The gap is the least distance (µm) between
    the centres of A's and B's mask pixels (nodes).
    """
    step = FIELD_STEP * MPP  # µm between nodes
    margin = params.context_margin_um + step  # one node of slack: the tests below are on node centres
    gx, gy = grid
    to_glass = ndimage.distance_transform_edt(np.pad(tissue > 0, 1))[1:-1, 1:-1] * step
    # B's mask as node offsets from its centre node: placed on any node, its mask is this pattern shifted.
    n = int(_reach_um(follicle, 1) / step) + 2
    local = np.arange(-n, n + 1) * float(FIELD_STEP)
    dy, dx = np.nonzero(_blob_depth((0.0, 0.0), *follicle, np.meshgrid(local, local)) > 0)
    dy, dx = dy - n, dx - n
    room_for_b = to_glass >= margin + _reach_um(follicle, 1)
    a_nodes = np.flatnonzero(to_glass >= margin + _reach_um(tumour, 1))
    for flat in rng.permutation(a_nodes)[:40]:
        a_centre = np.array([gx.flat[flat], gy.flat[flat]])
        to_a = ndimage.distance_transform_edt(_blob_depth(a_centre, *tumour, grid) <= 0) * step
        found: dict[str, tuple[np.ndarray, float]] = {}
        for label, (lo, hi) in zip(CONTEXT_CLASSES, (params.context_near_um, params.context_far_um), strict=True):
            # B's gap lies between to_a(centre) minus its largest and its smallest radius: try centres whose
            # interval meets [lo, hi], measuring the exact gap on the mask.
            maybe = room_for_b & (to_a - _reach_um(follicle, 1) <= hi) & (to_a - _reach_um(follicle, -1) >= lo)
            for node in rng.permutation(np.flatnonzero(maybe))[:20]:
                row, col = np.unravel_index(node, tissue.shape)
                gap = float(to_a[row + dy, col + dx].min())
                if lo <= gap <= hi:
                    found[label] = (np.array([gx[row, col], gy[row, col]]), gap)
                    break
        if len(found) == len(CONTEXT_CLASSES):
            return a_centre, found
    width, height = params.size
    raise ConfigError(f"slide {width}x{height} px is too small for the context layout: found no place for a tumour "
                      f"focus with both a near and a far follicle {params.context_margin_um:.0f} µm inside the "
                      f"tissue (far gap up to {params.context_far_um[1]:.0f} µm); give a larger size")


def _follicle(rng: np.random.Generator, shapes: _ShapeList, nuclei: _NucleusList, centre: np.ndarray,
              radius: float, harm: np.ndarray) -> None:
    """Lymphoid follicle B: a mantle of packed small lymphocytes around a paler, off-centre germinal centre
    of larger vesicular cells (a dark ring around a pale core at 5x)."""
    mantle = shapes.blobs(1, "lymphoid", centre[0], centre[1], radius, harm[None])
    core_centre = centre + rng.normal(0, 0.06, 2) * radius
    core = shapes.blobs(2, "germinal", core_centre[0], core_centre[1], radius * rng.uniform(0.5, 0.62),
                        _harmonics(rng, 1, 0.06))
    pts = _lattice(rng, mantle.bbox[0], 7.0 * UM, 0.25)
    keep = (mantle.inside(0, pts[:, 0], pts[:, 1]) > 2 * UM) & (core.inside(0, pts[:, 0], pts[:, 1]) < -1 * UM)
    nuclei.add("lymphocyte", pts[keep])
    pts = _lattice(rng, core.bbox[0], 11.0 * UM, 0.3)
    nuclei.add("centroblast", pts[core.inside(0, pts[:, 0], pts[:, 1]) > 3 * UM])


def _make_context_slide(params: SynthParams, label: str, stain_seed: int | None) -> SlideSpec:
    """One slide of the context task: tissue strip and background, then A and B drawn over them."""
    if label not in CONTEXT_CLASSES:
        raise ConfigError(f"unknown class {label!r} of the context task; choose from {', '.join(CONTEXT_CLASSES)}")
    # Separate random streams, none of which draws anything that depends on the label: the layout (tissue,
    # sizes, places: B's place is drawn for both classes), the background, the insides of A and of B.
    layout, background, inside_a, inside_b = (np.random.default_rng([params.seed, 0xC07, k]) for k in range(4))
    width, height = params.size
    hc, wc = -(-height // FIELD_STEP), -(-width // FIELD_STEP)
    grid = np.meshgrid((np.arange(wc) + 0.5) * FIELD_STEP, (np.arange(hc) + 0.5) * FIELD_STEP)
    tissue = _strip_tissue_field(layout, params.size, grid)
    density = 1.0 + 0.12 * _smooth_noise(layout, tissue.shape, 120 * UM / FIELD_STEP)
    tumour = _draw_blob(layout, params.context_tumour_um, 0.15)
    follicle = _draw_blob(layout, params.context_follicle_um, 0.08)
    a_centre, b_places = _place_context(layout, params, tissue, grid, tumour, follicle)
    lesion = _blob_depth(a_centre, *tumour, grid)
    b_centre = b_places[label][0]
    fields = np.stack([tissue, lesion, density, _blob_depth(b_centre, *follicle, grid)]).astype(np.float32)

    # Background: the tissue as it would be without A and B (no lesion anywhere to keep away from); no
    # lymphoid aggregates, so that B is the only lymphoid structure.
    no_lesion = np.full_like(fields[1], -1e9)
    ctx = _Context(background, params.size, np.stack([fields[0], no_lesion, fields[2]]), _ShapeList(),
                   _NucleusList(background))
    _common_structures(ctx, params.distractors, aggregates=False)
    shapes = ctx.shapes.finish()
    _stroma_nuclei(ctx, None, shapes)

    # Front: A filled with its arrangement (and stroma nuclei where it lies in stroma), then B.
    front = _Context(inside_a, params.size, fields[:3], _ShapeList(), _NucleusList(inside_a))
    ARRANGEMENTS[params.context_tumour](front)
    ground = LESION_GROUND.get(params.context_tumour)
    if ground is None:
        _stroma_nuclei(front, None, front.shapes.finish(), only_lesion=True)
    follicle_nuclei = _NucleusList(inside_b)
    _follicle(inside_b, front.shapes, follicle_nuclei, b_centre, *follicle)
    front_shapes = front.shapes.finish()
    front.nuclei.parts += follicle_nuclei.parts

    stain, glass = _draw_stain(np.random.default_rng([params.seed if stain_seed is None else stain_seed, 0x57A]),
                               params.stain_variation)
    return SlideSpec(
        label=label, size=(width, height), seed=params.seed,
        lesion_fraction=float((lesion > 0).sum() / (tissue > 0).sum()), fields=fields, shapes=shapes,
        nuclei=_outside_holes(shapes, ctx.nuclei.finish()), stain=stain, glass=glass, lesion_ground=-1,
        variant=int(layout.integers(VARIANTS)), texture_shift=tuple(layout.integers(0, 10**6, 2)),
        front=Front(front_shapes, _outside_holes(front_shapes, front.nuclei.finish()),
                    MATERIAL_IDS[ground] if ground else -1),
    )


# --------------------------------------------------------------------------------------------------
# Rendering


def _alpha(depth: np.ndarray) -> np.ndarray:
    """Coverage of a pixel whose centre lies ``depth`` px inside an edge."""
    return np.clip(depth * (1.0 / EDGE) + 0.5, 0.0, 1.0)


def _fill(h: np.ndarray, e: np.ndarray, cover: np.ndarray, material: int, tex: list[np.ndarray],
          window: tuple[slice, slice]) -> None:
    """Blend ``material`` into the concentration maps over ``window`` with per-pixel ``cover``."""
    mh, me, texture, amp = _MATERIAL_TABLE[material]
    mod = 1.0 + amp * tex[int(texture)][window]
    hw, ew = h[window], e[window]
    hw += cover * (mh * mod - hw)
    ew += cover * (me * mod - ew)


def _render_chunk(spec: SlideSpec, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    xs, ys = np.arange(x0, x0 + w), np.arange(y0, y0 + h)
    t, (tx, ty) = spec.textures, spec.texture_shift
    txs, tys = xs + tx, ys + ty  # texture coordinates
    sampled = _sample_grid(spec.fields, xs, ys)
    tissue, lesion, density = sampled[:3]
    cover = _alpha(tissue + _tile_lookup(t["edge"], txs, tys))  # ragged cut edge
    hem = np.zeros((h, w), np.float32)
    eos = np.zeros((h, w), np.float32)
    if cover.any():
        fibre = 0.5 * (_tile_lookup(t["fibre_a"], txs, tys) + _tile_lookup(t["fibre_b"], txs, tys))
        tex = [fibre, _tile_lookup(t["grain"], txs, tys)]
        sh, se, _, amp = _MATERIAL_TABLE[MATERIAL_IDS["stroma"]]
        hem += sh
        eos += se * (1.0 + amp * fibre) * density
        # Context slides: A and B replace the background on their regions (anti-aliased like any edge).
        region = _alpha(np.maximum(lesion, sampled[3])) if spec.front is not None else None
        front = None if region is None or not region.any() else (hem.copy(), eos.copy())
        window = (x0, y0, w, h)
        _paint(hem, eos, lesion, spec.lesion_ground, spec.shapes, spec.nuclei, spec.variant, tex, window)
        if front is not None:
            front_hem, front_eos = front  # plain stroma, painted with A and B only
            _paint(front_hem, front_eos, lesion, spec.front.ground, spec.front.shapes, spec.front.nuclei,
                   spec.variant, tex, window)
            hem += region * (front_hem - hem)
            eos += region * (front_eos - eos)
        hem *= cover
        eos *= cover
    # Beer-Lambert: optical density per RGB channel, plus faint scanner noise.
    stain, glass = spec.stain.astype(np.float32), spec.glass.astype(np.float32)
    noise = 0.012 * _tile_lookup(t["noise"], txs, tys)
    od = np.empty((3, h, w), np.float32)  # channel planes: contiguous inner loops
    for c in range(3):
        np.multiply(hem, stain[0, c], out=od[c])
        od[c] += eos * stain[1, c]
        od[c] += noise
        od[c] += glass[c]
    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= 255.0
    od += 0.5
    return np.clip(od, 0, 255, out=od).astype(np.uint8).transpose(1, 2, 0)


def _paint(hem: np.ndarray, eos: np.ndarray, lesion: np.ndarray, ground: int, shapes: Shapes, nuclei: np.ndarray,
           variant: int, tex: list[np.ndarray], window: tuple[int, int, int, int]) -> None:
    """Paint a layer onto the stroma: the lesion's ground material, then shapes in order, then nuclei."""
    if ground >= 0:
        _fill(hem, eos, _alpha(lesion), ground, tex, (slice(None), slice(None)))
    _draw_shapes(shapes, hem, eos, tex, *window)
    _stamp_nuclei(nuclei, variant, hem, eos, *window)


def _draw_shapes(shapes: Shapes, hem: np.ndarray, eos: np.ndarray, tex: list[np.ndarray],
                 x0: int, y0: int, w: int, h: int) -> None:
    """Fill every shape overlapping the window, in drawing order."""
    b = shapes.bbox
    hits = np.flatnonzero((b[:, 0] < x0 + w) & (b[:, 2] > x0) & (b[:, 1] < y0 + h) & (b[:, 3] > y0))
    for i in hits:
        wx0, wy0 = max(int(b[i, 0]), x0), max(int(b[i, 1]), y0)
        wx1, wy1 = min(int(b[i, 2]), x0 + w), min(int(b[i, 3]), y0 + h)
        px = np.arange(wx0, wx1, dtype=np.float32)[None, :]
        py = np.arange(wy0, wy1, dtype=np.float32)[:, None]
        cover = _alpha(shapes.inside(i, px, py))
        window = (slice(wy0 - y0, wy1 - y0), slice(wx0 - x0, wx1 - x0))
        _fill(hem, eos, cover, int(shapes.material[i]), tex, window)


def _stamp_nuclei(nuclei: np.ndarray, variant: int, hem: np.ndarray, eos: np.ndarray, x0: int, y0: int, w: int,
                  h: int) -> None:
    """Stamp nuclear sprites: haematoxylin takes the darker value, eosin fades under the nucleus."""
    sprites, reach = _sprites(variant)
    lo, hi = np.searchsorted(nuclei[:, 1], [y0 - reach, y0 + h + reach])
    rows = nuclei[lo:hi]
    rows = rows[(rows[:, 0] > x0 - reach) & (rows[:, 0] < x0 + w + reach)]
    for cx, cy, index, gain in rows:
        sprite = sprites[int(index)]
        half = sprite.shape[1] // 2
        sx0, sy0 = int(cx) - half - x0, int(cy) - half - y0  # sprite origin in window coordinates
        ax0, ay0 = max(sx0, 0), max(sy0, 0)
        ax1, ay1 = min(sx0 + sprite.shape[2], w), min(sy0 + sprite.shape[1], h)
        if ax0 >= ax1 or ay0 >= ay1:
            continue
        part = sprite[:, ay0 - sy0 : ay1 - sy0, ax0 - sx0 : ax1 - sx0]
        np.maximum(hem[ay0:ay1, ax0:ax1], part[0] * np.float32(gain), out=hem[ay0:ay1, ax0:ax1])
        eos[ay0:ay1, ax0:ax1] *= 1.0 - 0.6 * part[1]


def render_region(spec: SlideSpec, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Level-0 pixels of the region (x, y, w, h) as uint8 (h, w, 3).

    Every pixel is a function of its absolute coordinates only: any tiling of the slide into regions
    reproduces the same image.
    """
    width, height = spec.size
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise ValueError(f"region {(x, y, w, h)} is not inside the {width}x{height} slide")
    out = np.empty((h, w, 3), np.uint8)
    for cy in range(y, y + h, CHUNK_ROWS):
        ch = min(CHUNK_ROWS, y + h - cy)
        for cx in range(x, x + w, CHUNK_COLS):
            cw = min(CHUNK_COLS, x + w - cx)
            out[cy - y : cy - y + ch, cx - x : cx - x + cw] = _render_chunk(spec, cx, cy, cw, ch)
    return out


# --------------------------------------------------------------------------------------------------
# Masks, files, cohorts


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
    """Per slide of a cohort written by :func:`synthesize_cohort`, the numbers a model could learn instead of the
    tissue's pattern: slide width, height and area, tissue area (from its mask), lesion fraction and, on the
    context task, the areas of the tumour focus A and the follicle B. Keys are slide ids."""
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
    version, per-slide label, staining run, size, lesion fraction and lesion boxes; context task: also A's and B's boxes
    and areas and their gap, see :func:`context_layout`). About a quarter of the cases hold two slides of the
    same label (and staining run); splits (train/val/test) are drawn per case and stratified by class. The classes
    are matched case by case: each split holds, for every class, cases with the same slide counts, slide sizes
    and staining runs, so only the tissue tells the classes apart.

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
        "generator": "wsilocal.slide.synth", "version": GENERATOR_VERSION, "mpp": MPP, "app_mag": APP_MAG,
        "params": asdict(base), "slides_per_class": slides_per_class, "splits": list(splits),
        "size_jitter": size_jitter, "mask_downsample": FIELD_STEP, "classes": names,
        "mask_values": {"glass": MASK_GLASS, "tissue": MASK_TISSUE, "lesion": MASK_LESION,
                        **({"follicle": MASK_FOLLICLE} if base.task == "context" else {})},
        "slides": {job["slide_id"]: results[job["slide_id"]] for job in jobs},
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=1))
    return csv_path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m wsilocal.slide.synth OUT_DIR [options]``: write a synthetic cohort."""
    parser = argparse.ArgumentParser(description="Write a synthetic H&E-like whole-slide cohort.")
    parser.add_argument("out_dir")
    parser.add_argument("--task", choices=TASKS, default="morphology")
    parser.add_argument("--classes", type=int, help="morphology task: number of classes (default 3)")
    parser.add_argument("--slides-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        help="level-0 px (default: 8192 8192, context task 28800 12800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    path = synthesize_cohort(args.out_dir, classes=args.classes, slides_per_class=args.slides_per_class,
                             size=args.size and tuple(args.size), seed=args.seed, workers=args.workers,
                             params=SynthParams(task=args.task))
    print(path)


if __name__ == "__main__":
    main()
