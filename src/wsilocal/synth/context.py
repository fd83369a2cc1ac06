"""The context task (:data:`~wsilocal.synth.params.CONTEXT_CLASSES`): one tumour focus (A) and one lymphoid
follicle (B) on an elongated strip of tissue; the label is only their distance (``near`` or ``far``). A and B are
drawn over a background generated without knowledge of them and clipped to their own regions, so every tile that
holds neither is independent of the label, and no tile holds both."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from wsilocal.errors import ConfigError
from wsilocal.synth.morphology import ARRANGEMENTS, LESION_GROUND, common_structures, stroma_nuclei
from wsilocal.synth.params import CONTEXT_CLASSES, FIELD_STEP, MATERIAL_IDS, MPP, UM, VARIANTS, SynthParams
from wsilocal.synth.shapes import NucleusList, ShapeList, harmonics, lattice, smooth_noise
from wsilocal.synth.spec import Builder, Front, SlideSpec, draw_stain, outside_holes


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
    strip = ShapeList()
    for a, b in zip(spine[:-1], spine[1:], strict=True):
        strip.capsule(0, "stroma", a, b, half, half)
    pieces = strip.finish()
    depth = np.max([pieces.inside(i, *grid) for i in range(len(pieces))], axis=0)
    return depth + smooth_noise(rng, depth.shape, 0.15 * half / FIELD_STEP) * 0.04 * half


def _draw_blob(rng: np.random.Generator, diameter_um: tuple[float, float],
               irregular: float) -> tuple[float, np.ndarray]:
    """Radius (px) and boundary harmonics of a roundish structure whose diameter is drawn from ``diameter_um``."""
    return rng.uniform(*diameter_um) * UM / 2, harmonics(rng, 1, irregular)[0]


def _blob_depth(centre: Sequence[float], radius: float, harm: np.ndarray,
                grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Depth (px, > 0 inside) of a blob at the points of ``grid``."""
    return ShapeList().blobs(0, "stroma", centre[0], centre[1], radius, harm[None]).inside(0, *grid)


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


def _follicle(rng: np.random.Generator, shapes: ShapeList, nuclei: NucleusList, centre: np.ndarray,
              radius: float, harm: np.ndarray) -> None:
    """Lymphoid follicle B: a mantle of packed small lymphocytes around a paler, off-centre germinal centre
    of larger vesicular cells (a dark ring around a pale core at 5x)."""
    mantle = shapes.blobs(1, "lymphoid", centre[0], centre[1], radius, harm[None])
    core_centre = centre + rng.normal(0, 0.06, 2) * radius
    core = shapes.blobs(2, "germinal", core_centre[0], core_centre[1], radius * rng.uniform(0.5, 0.62),
                        harmonics(rng, 1, 0.06))
    pts = lattice(rng, mantle.bbox[0], 7.0 * UM, 0.25)
    keep = (mantle.inside(0, pts[:, 0], pts[:, 1]) > 2 * UM) & (core.inside(0, pts[:, 0], pts[:, 1]) < -1 * UM)
    nuclei.add("lymphocyte", pts[keep])
    pts = lattice(rng, core.bbox[0], 11.0 * UM, 0.3)
    nuclei.add("centroblast", pts[core.inside(0, pts[:, 0], pts[:, 1]) > 3 * UM])


def make_context_slide(params: SynthParams, label: str, stain_seed: int | None) -> SlideSpec:
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
    density = 1.0 + 0.12 * smooth_noise(layout, tissue.shape, 120 * UM / FIELD_STEP)
    tumour = _draw_blob(layout, params.context_tumour_um, 0.15)
    follicle = _draw_blob(layout, params.context_follicle_um, 0.08)
    a_centre, b_places = _place_context(layout, params, tissue, grid, tumour, follicle)
    lesion = _blob_depth(a_centre, *tumour, grid)
    b_centre = b_places[label][0]
    fields = np.stack([tissue, lesion, density, _blob_depth(b_centre, *follicle, grid)]).astype(np.float32)

    # Background: the tissue as it would be without A and B (no lesion anywhere to keep away from); no
    # lymphoid aggregates, so that B is the only lymphoid structure.
    no_lesion = np.full_like(fields[1], -1e9)
    ctx = Builder(background, params.size, np.stack([fields[0], no_lesion, fields[2]]), ShapeList(),
                  NucleusList(background))
    common_structures(ctx, params.distractors, aggregates=False)
    shapes = ctx.shapes.finish()
    stroma_nuclei(ctx, None, shapes)

    # Front: A filled with its arrangement (and stroma nuclei where it lies in stroma), then B.
    front = Builder(inside_a, params.size, fields[:3], ShapeList(), NucleusList(inside_a))
    ARRANGEMENTS[params.context_tumour](front)
    ground = LESION_GROUND.get(params.context_tumour)
    if ground is None:
        stroma_nuclei(front, None, front.shapes.finish(), only_lesion=True)
    follicle_nuclei = NucleusList(inside_b)
    _follicle(inside_b, front.shapes, follicle_nuclei, b_centre, *follicle)
    front_shapes = front.shapes.finish()
    front.nuclei.parts += follicle_nuclei.parts

    stain, glass = draw_stain(np.random.default_rng([params.seed if stain_seed is None else stain_seed, 0x57A]),
                              params.stain_variation)
    return SlideSpec(
        label=label, size=(width, height), seed=params.seed,
        lesion_fraction=float((lesion > 0).sum() / (tissue > 0).sum()), fields=fields, shapes=shapes,
        nuclei=outside_holes(shapes, ctx.nuclei.finish()), stain=stain, glass=glass, lesion_ground=-1,
        variant=int(layout.integers(VARIANTS)), texture_shift=tuple(layout.integers(0, 10**6, 2)),
        front=Front(front_shapes, outside_holes(front_shapes, front.nuclei.finish()),
                    MATERIAL_IDS[ground] if ground else -1),
    )
