"""What every slide of one variant shares: nuclear sprites and periodic texture tiles, each made once per process
(~0.5 s) and cached (:data:`~wsilocal.synth.params.VARIANTS` of them); a slide picks one and shifts its texture
coordinates."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

from wsilocal.synth.params import EDGE, NUCLEUS_KINDS, SPRITE_ANGLES, SPRITE_SHAPES, UM, VARIANTS
from wsilocal.synth.shapes import harmonics, periodic_noise


@functools.lru_cache(maxsize=VARIANTS)
def nucleus_sprites(variant: int) -> tuple[list[np.ndarray], int]:
    """SPRITE_SHAPES × SPRITE_ANGLES sprites per nucleus kind (kind k from SPRITE_OFFSET[k]): arrays
    (2, s, s) of (haematoxylin, coverage); and the largest half-size, how far a sprite reaches."""
    rng = np.random.default_rng([variant, 0x5B])
    sprites: list[np.ndarray] = []
    for kind in NUCLEUS_KINDS.values():
        for _ in range(SPRITE_SHAPES):
            a = rng.uniform(*kind.major) * UM / 2
            b = min(rng.uniform(*kind.minor) * UM / 2, a)
            harm = harmonics(rng, 1, kind.irregular)[0]
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


def _fibre_tile(rng: np.random.Generator, period: tuple[int, int]) -> np.ndarray:
    """A tileable collagen texture: wavy bundles (oriented streak noise, one direction dominating
    locally, domain-warped) with thin pale clefts along the streaks' zero lines. Mean 0."""
    weights = [np.exp(5.0 * periodic_noise(rng, period, 80, 80, 0)) for _ in range(3)]
    streaks = [periodic_noise(rng, period, 30, 3.0, a) for a in (0, np.pi / 3, 2 * np.pi / 3)]
    f = sum(w * s for w, s in zip(weights, streaks, strict=True)) / sum(weights)
    f /= f.std()
    yy, xx = np.mgrid[0 : period[0], 0 : period[1]].astype(np.float64)
    warp = [8.0 * periodic_noise(rng, period, 25, 25, 0) for _ in range(2)]
    f = ndimage.map_coordinates(f, [yy + warp[0], xx + warp[1]], order=1, mode="grid-wrap")
    tile = 0.4 * np.tanh(f) - 0.8 * np.exp(-((f / 0.22) ** 2))
    return (tile - tile.mean()).astype(np.float32)


@functools.lru_cache(maxsize=VARIANTS)
def texture_tiles(variant: int) -> dict[str, np.ndarray]:
    """Periodic texture tiles addressed by absolute pixel coordinates (so strips agree).

    ``fibre_a``/``fibre_b``: collagen, two tiles whose periods share no small factor (averaged, the
    pattern repeats only every few mm); ``grain``: granular cytoplasm; ``edge``: raggedness of tissue
    edges in px; ``noise``: per-pixel scanner noise.
    """
    rng = np.random.default_rng([variant, 0x7E])
    fine, coarse = periodic_noise(rng, (512, 520), 1.2, 1.2, 0), periodic_noise(rng, (512, 520), 5, 5, 0)
    return {
        "fibre_a": _fibre_tile(rng, (1024, 1000)),
        "fibre_b": _fibre_tile(rng, (972, 864)),
        "grain": np.tanh(0.6 * fine + 0.5 * coarse).astype(np.float32),
        "edge": (4.0 * periodic_noise(rng, (500, 506), 6, 6, 0)).astype(np.float32),
        "noise": rng.standard_normal((509, 511)).astype(np.float32),
    }
