"""Pixels of a slide description: :func:`render_region` turns any level-0 rectangle of a
:class:`~wsilocal.synth.spec.SlideSpec` into RGB. Every pixel depends only on its absolute coordinates, so a slide
cut into strips gives the same pixels as one rendered whole.

Colour follows the Beer–Lambert law: each pixel carries haematoxylin and eosin concentrations, mixed with the
slide's stain vectors and intensities (the stain variation, drawn independently of the class)."""

from __future__ import annotations

import numpy as np

from wsilocal.synth.params import EDGE, MATERIAL_IDS, MATERIALS
from wsilocal.synth.shapes import Shapes, sample_grid, tile_lookup
from wsilocal.synth.spec import SlideSpec
from wsilocal.synth.variants import nucleus_sprites

CHUNK_ROWS, CHUNK_COLS = 256, 1024  # render at most this much at once: temporaries stay a few MB
_MATERIAL_TABLE = np.array([m for m in MATERIALS.values()], dtype=np.float32)


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
    sampled = sample_grid(spec.fields, xs, ys)
    tissue, lesion, density = sampled[:3]
    cover = _alpha(tissue + tile_lookup(t["edge"], txs, tys))  # ragged cut edge
    hem = np.zeros((h, w), np.float32)
    eos = np.zeros((h, w), np.float32)
    if cover.any():
        fibre = 0.5 * (tile_lookup(t["fibre_a"], txs, tys) + tile_lookup(t["fibre_b"], txs, tys))
        tex = [fibre, tile_lookup(t["grain"], txs, tys)]
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
    noise = 0.012 * tile_lookup(t["noise"], txs, tys)
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
    sprites, reach = nucleus_sprites(variant)
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
