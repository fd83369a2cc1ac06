"""The morphology task: a slide's class is the arrangement of its tumour nuclei. One builder per class
(:data:`ARRANGEMENTS`), the structures common to every class (lymphoid aggregates, vessels, fat, benign ducts,
stroma nuclei), the tissue and lesion fields, and :func:`make_morphology_slide`."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.spatial import Voronoi

from wsilocal.errors import ConfigError
from wsilocal.synth.params import CLASS_NAMES, FIELD_STEP, MATERIAL_IDS, MPP, UM, VARIANTS, SynthParams
from wsilocal.synth.shapes import (
    NucleusList,
    ShapeList,
    Shapes,
    covered,
    harmonics,
    lattice,
    sample_points,
    smooth_noise,
)
from wsilocal.synth.spec import Builder, SlideSpec, draw_stain, outside_holes


def _blob_radius(harm: np.ndarray, radius: float) -> Callable[[np.ndarray], np.ndarray]:
    """The radius function r(θ) of a blob."""
    return lambda theta: radius * (1 + sum((c * np.exp(1j * (k + 2) * theta)).real for k, c in enumerate(harm)))


def _between(inner: Callable, outer: Callable, depth: float) -> Callable[[np.ndarray], np.ndarray]:
    """The curve ``depth`` of the way from radius function ``inner`` to ``outer``."""
    return lambda theta: inner(theta) + depth * (outer(theta) - inner(theta))


# --- arrangements: one builder per class, all drawing the same tumour nuclei and epithelium ---------


def _glands(ctx: Builder, centres: np.ndarray, radius: np.ndarray, lumen_ratio: np.ndarray,
            irregular: float, kind: str, layers_of_nuclei: np.ndarray) -> None:
    """Glands: epithelial blobs around a white lumen, nuclei lined up at the basal side."""
    n = len(centres)
    outer, inner = harmonics(ctx.rng, n, irregular), harmonics(ctx.rng, n, irregular * 0.6)
    ctx.shapes.blobs(1, "epithelium", centres[:, 0], centres[:, 1], radius, outer)
    ctx.shapes.blobs(2, "lumen", centres[:, 0], centres[:, 1], radius * lumen_ratio, inner)
    for i in range(n):
        r_out, r_in = _blob_radius(outer[i], radius[i]), _blob_radius(inner[i], radius[i] * lumen_ratio[i])
        for depth in np.linspace(0.62, 0.38, layers_of_nuclei[i]):  # 1 layer, or 2 where stratified
            ctx.ring_nuclei(kind, centres[i], _between(r_in, r_out, depth), 7.5 * UM, radial=True)


def _glandular(ctx: Builder) -> None:
    """Back-to-back glands 60–150 µm across, rings of (partly stratified) nuclei around white lumens."""
    rng = ctx.rng
    spacing = rng.uniform(100, 130) * UM
    centres = ctx.sites(spacing, 0.18)
    n = len(centres)
    radius = spacing / 2 * rng.uniform(0.62, 0.9, n)
    _glands(ctx, centres, radius, rng.uniform(0.42, 0.58, n), 0.14, "tumour", rng.integers(1, 3, n))


def _septa(ctx: Builder, spacing: float, width_um: tuple[float, float]) -> Shapes:
    """Thin stromal septa splitting the lesion's epithelial sheet into nests ~``spacing`` across: the
    ridges of the Voronoi diagram of jittered nest centres (each bent once, about a third left out)."""
    rng = ctx.rng
    centres = lattice(rng, ctx.lesion_bbox(pad=spacing), spacing, 0.25)
    septa = ShapeList()  # collected apart, so they can be returned together
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


def _sheet_nuclei(ctx: Builder, spacing: float, *avoid: Shapes) -> None:
    """Tumour nuclei packed on a jittered lattice over the whole lesion, except on the ``avoid`` shapes."""
    pts = lattice(ctx.rng, ctx.lesion_bbox(), spacing, 0.28)
    pts = pts[ctx.lesion_at(pts) > 2.5 * UM]
    for shapes in avoid:
        pts = pts[~covered(shapes, pts[:, 0], pts[:, 1], margin=-4 * UM)]
    ctx.nuclei.add("tumour", pts)


def _solid(ctx: Builder) -> None:
    """Sheets of packed nuclei filling the lesion, split into ~100–200 µm nests by septa; no lumens."""
    septa = _septa(ctx, ctx.rng.uniform(100, 200) * UM, (10, 20))
    _sheet_nuclei(ctx, ctx.rng.uniform(12.5, 13.5) * UM, septa)


def _cribriform(ctx: Builder) -> None:
    """Sheets like the solid class but punched by many small round lumens (14–26 µm) every ~40 µm."""
    rng = ctx.rng
    septa = _septa(ctx, rng.uniform(250, 350) * UM, (5, 10))
    pts = ctx.sites(rng.uniform(34, 44) * UM, 0.15, depth=14 * UM)
    pts = pts[~covered(septa, pts[:, 0], pts[:, 1], margin=-14 * UM)]
    harm = harmonics(rng, len(pts), 0.06)
    lumens = ctx.shapes.blobs(2, "lumen", pts[:, 0], pts[:, 1], rng.uniform(7, 13, len(pts)) * UM, harm)
    _sheet_nuclei(ctx, rng.uniform(11, 12.5) * UM, septa, lumens)


def _papillary(ctx: Builder) -> None:
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


def _micropapillary(ctx: Builder) -> None:
    """Small clusters of cells (30–50 µm) floating in clear clefts (45–70 µm) of the stroma, nuclei at
    their rim (inside-out polarity)."""
    rng = ctx.rng
    centres = ctx.sites(rng.uniform(60, 75) * UM, 0.2)
    n = len(centres)
    cleft = rng.uniform(22, 34, n) * UM
    ctx.shapes.blobs(1, "lumen", centres[:, 0], centres[:, 1], cleft, harmonics(rng, n, 0.15))
    cluster = cleft * rng.uniform(0.62, 0.76, n)
    shift = rng.normal(0, 0.03, (n, 2)) * cleft[:, None]
    harm = harmonics(rng, n, 0.12)
    ctx.shapes.blobs(2, "epithelium", centres[:, 0] + shift[:, 0], centres[:, 1] + shift[:, 1], cluster, harm)
    for i in range(n):
        r_of = _blob_radius(harm[i], cluster[i] * 0.7)
        ctx.ring_nuclei("tumour", centres[i] + shift[i], r_of, 8 * UM, radial=True)


ARRANGEMENTS: dict[str, Callable[[Builder], None]] = {
    "glandular": _glandular,
    "solid": _solid,
    "papillary": _papillary,
    "cribriform": _cribriform,
    "micropapillary": _micropapillary,
}
# What fills the lesion between its structures: a cyst for papillary, epithelial sheets for solid and
# cribriform; glandular and micropapillary lesions sit in stroma.
LESION_GROUND = {"papillary": "fluid", "solid": "epithelium", "cribriform": "epithelium"}


# --- structures common to every class ------------------------------------------------------------


def _distractor_sites(ctx: Builder, count: int, radius_um: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` centres (n, 2) and radii (n,) in px: inside tissue, away from the lesion."""
    pts = ctx.rng.random((count * 20, 2)) * ctx.size  # candidates; most land on glass or the lesion
    r = ctx.rng.uniform(*radius_um, len(pts)) * UM
    ok = (ctx.tissue_at(pts) > r * 0.8) & (ctx.lesion_at(pts) < -r - 20 * UM)
    return pts[ok][:count], r[ok][:count]


def common_structures(ctx: Builder, density: float, aggregates: bool = True) -> None:
    """Lymphoid aggregates, vessels, fat and benign ducts: present regardless of class, outside the lesion.

    ``aggregates=False`` leaves out the lymphoid aggregates (the context task's follicle is the only one).
    """
    rng = ctx.rng
    tissue_mm2 = float((ctx.fields[0] > 0).sum()) * (FIELD_STEP * MPP / 1000) ** 2

    def count(per_mm2: float) -> int:
        return int(rng.poisson(per_mm2 * tissue_mm2 * density))

    if aggregates:
        sites, r = _distractor_sites(ctx, count(0.6), (80, 200))
        blobs = ctx.shapes.blobs(1, "lymphoid", sites[:, 0], sites[:, 1], r, harmonics(rng, len(sites), 0.15))
        for i in range(len(blobs)):
            pts = lattice(rng, blobs.bbox[i], 8.5 * UM, 0.25)
            ctx.nuclei.add("lymphocyte", pts[blobs.inside(i, pts[:, 0], pts[:, 1]) > 2 * UM])

    sites, r = _distractor_sites(ctx, count(0.3), (150, 320))  # fat lobules
    for centre, lobule in zip(sites, r, strict=True):
        cell = rng.uniform(22, 32) * UM
        pts = lattice(rng, (*(centre - lobule), *(centre + lobule)), 2 * cell, 0.08)
        pts = pts[np.hypot(*(pts - centre).T) < lobule]
        ctx.shapes.blobs(1, "fat", pts[:, 0], pts[:, 1], cell * 0.94, harmonics(rng, len(pts), 0.06))

    sites, r = _distractor_sites(ctx, count(5.0), (12, 45))  # vessels, with blood or empty
    n = len(sites)
    wall_h, lumen_h = harmonics(rng, n, 0.1), harmonics(rng, n, 0.2)
    lumen_r = r * rng.uniform(0.6, 0.8, n)
    ctx.shapes.blobs(1, "wall", sites[:, 0], sites[:, 1], r, wall_h)
    for i in range(n):
        ctx.shapes.blobs(2, "blood" if rng.random() < 0.6 else "lumen", sites[i, 0], sites[i, 1], lumen_r[i],
                         lumen_h[i : i + 1])
        ctx.ring_nuclei("spindle", sites[i], _blob_radius(lumen_h[i], lumen_r[i] + 1.5 * UM), 16 * UM, radial=False)

    sites, r = _distractor_sites(ctx, count(1.2), (18, 32))  # benign ducts: one layer of small nuclei
    n = len(sites)
    _glands(ctx, sites, r, rng.uniform(0.3, 0.45, n), 0.05, "benign", np.ones(n, np.int64))


def stroma_nuclei(ctx: Builder, ground: str | None, shapes: Shapes, only_lesion: bool = False) -> None:
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
        pts = pts[~covered(shapes, pts[:, 0], pts[:, 1], margin=-4 * UM)]
        # Spindles follow a smooth local orientation, like the fibres they lie in.
        angles = sample_points(ctx.fields[2], pts[:, 0], pts[:, 1]) * 40.0
        ctx.nuclei.add(kind, pts, angles)


# --- tissue and lesion fields ----------------------------------------------------------------------


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
        harm = harmonics(rng, 1, 0.35)
        harm *= min(1.0, 0.3 / max(float(np.abs(harm).sum()), 1e-9))  # stays inside its band
        piece = ShapeList().blobs(0, "stroma", cx, cy, radius * rng.uniform(0.8, 1.05), harm)
        out = np.maximum(out, piece.inside(0, gx, gy))
    ragged = smooth_noise(rng, gx.shape, 0.15 * radius / FIELD_STEP) * 0.06 * radius
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
    bumps += 0.25 * smooth_noise(rng, gx.shape, max(1.5, 0.4 * sigma / FIELD_STEP))
    values = np.sort(bumps[interior])[::-1]
    threshold = (values[target - 1] + values[target]) / 2 if target < len(values) else values[-1] - 1e-6
    # Scale to px: divide by the field's slope at the boundary, so edges anti-alias like the others.
    gy_, gx_ = np.gradient(bumps, FIELD_STEP)
    slope = np.hypot(gx_, gy_)[interior & (np.abs(bumps - threshold) < 0.1)]
    slope = float(np.median(slope)) if slope.size else 1.0 / sigma
    # Both terms are smooth, so the interpolated edge is smooth; > 0 exactly on `target` interior nodes.
    lesion = np.minimum((bumps - threshold) / max(slope, 1e-9), tissue - margin)
    return lesion, float((lesion > 0).sum() / n_tissue)


def make_morphology_slide(params: SynthParams, label: str, stain_seed: int | None = None) -> SlideSpec:
    """Describe one morphology slide of class ``label`` from ``params.seed`` (stain from ``stain_seed`` if given,
    so slides of one case can share a staining run); ``params`` validated by
    :func:`~wsilocal.synth.cohort.make_slide`."""
    if label not in ARRANGEMENTS:
        raise ConfigError(f"unknown class {label!r}; choose from {', '.join(CLASS_NAMES)}")
    rng = np.random.default_rng([params.seed, 0x5E7])
    width, height = params.size
    hc, wc = -(-height // FIELD_STEP), -(-width // FIELD_STEP)
    grid = np.meshgrid((np.arange(wc) + 0.5) * FIELD_STEP, (np.arange(hc) + 0.5) * FIELD_STEP)
    tissue = _tissue_field(rng, params, grid)
    lesion, fraction = _lesion_field(rng, params, tissue, grid)
    density = 1.0 + 0.12 * smooth_noise(rng, tissue.shape, 120 * UM / FIELD_STEP)
    fields = np.stack([tissue, lesion, density]).astype(np.float32)

    ctx = Builder(rng, params.size, fields, ShapeList(), NucleusList(rng))
    ARRANGEMENTS[label](ctx)
    common_structures(ctx, params.distractors)
    shapes = ctx.shapes.finish()
    ground = LESION_GROUND.get(label)
    stroma_nuclei(ctx, ground, shapes)

    stain, glass = draw_stain(np.random.default_rng([params.seed if stain_seed is None else stain_seed, 0x57A]),
                              params.stain_variation)
    return SlideSpec(
        label=label, size=(width, height), seed=params.seed, lesion_fraction=fraction, fields=fields,
        shapes=shapes, nuclei=outside_holes(shapes, ctx.nuclei.finish()), stain=stain, glass=glass,
        lesion_ground=MATERIAL_IDS[ground] if ground else -1,
        variant=int(rng.integers(VARIANTS)), texture_shift=tuple(rng.integers(0, 10**6, 2)),
    )
