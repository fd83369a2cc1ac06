"""What a slide description is built from: small numeric helpers (smooth noise, boundary harmonics, lattices,
bilinear sampling of the coarse fields), the filled shapes (blobs and capsules) and the list of nuclei."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from wsilocal.synth.params import EDGE, FIELD_STEP, MATERIAL_IDS, SPRITE_ANGLES, SPRITE_OFFSET, SPRITE_SHAPES

# --------------------------------------------------------------------------------------------------
# Small numeric helpers


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Stationary Gaussian-filtered white noise with unit standard deviation in expectation.

    Drawn on a grid padded by 3σ and cropped, and scaled by the theoretical 2σ√π, so that a grid smaller
    than σ gets a gentle slope rather than a constant blown up by its tiny sample spread.
    """
    sigma = max(sigma, 0.5)
    pad = int(3 * sigma) + 1
    noise = rng.standard_normal((shape[0] + 2 * pad, shape[1] + 2 * pad))
    smooth = ndimage.gaussian_filter(noise, sigma, mode="wrap")[pad:-pad, pad:-pad]
    return smooth * (2 * sigma * math.sqrt(math.pi))


def periodic_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_along: float,
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


def harmonics(rng: np.random.Generator, n: int, irregular: float) -> np.ndarray:
    """Complex coefficients of boundary harmonics 2..5 of ``n`` blobs (radius = R(1 + Re Σ c_k e^{ikθ}))."""
    k = np.arange(2, 6)
    mags = np.abs(rng.normal(0, irregular, (n, 4))) / k**1.2
    mags *= np.minimum(1.0, 0.6 / np.maximum(mags.sum(axis=1, keepdims=True), 1e-9))  # keep r > 0.4 R
    return mags * np.exp(2j * np.pi * rng.random((n, 4)))


def lattice(rng: np.random.Generator, bbox: Sequence[float], spacing: float, jitter: float) -> np.ndarray:
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


def sample_points(field_: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear value of a coarse field at level-0 points (same arithmetic as :func:`sample_grid`)."""
    iy, fy = _grid_index(np.asarray(ys, np.float64), field_.shape[0])
    ix, fx = _grid_index(np.asarray(xs, np.float64), field_.shape[1])
    top = field_[iy, ix] + fx * (field_[iy, ix + 1] - field_[iy, ix])
    bottom = field_[iy + 1, ix] + fx * (field_[iy + 1, ix + 1] - field_[iy + 1, ix])
    return top + fy * (bottom - top)


def sample_grid(fields: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
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


def tile_lookup(tile: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
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


class ShapeList:
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
        added = ShapeList()
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


def covered(shapes: Shapes, xs: np.ndarray, ys: np.ndarray, margin: float = 0.0) -> np.ndarray:
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
# Nuclei: collected while a slide is built (each a sprite, see variants.nucleus_sprites)


class NucleusList:
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
