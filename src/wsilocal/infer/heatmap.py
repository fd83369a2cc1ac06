"""Attention heatmaps of a prediction: a PNG over the slide's thumbnail, the raw maps, and QuPath-ready polygons.

The final classifier H gives one attention weight per cell of the trunk's output map; a cell stands for a
square of ``stride`` pixels (48 at conv1 stride 3) of the tissue image at the run's resolution, centred on its
receptive field. :class:`~wsilocal.infer.prediction.Prediction` carries where the cells lie in level-0 pixels
(``cell_origin``, ``cell_size``), and :func:`cell_edges` turns that into cell boundaries that tile the tissue
box exactly; the PNG, the GeoJSON and the JSON sidecar all use that one transform.

A tile-based MIL baseline (``wsilocal predict`` on a ``wsilocal baseline`` run) has one attention weight or score
per tile instead; :func:`tile_attention_map` lays them on the regular grid of the tiles (one cell = one tile,
NaN where the grid has no tile), and the same files are drawn from it.

H's softmax runs over every cell of the tissue box, glass between and around the tissue pieces included, so
part of the attention lies on glass (with attention spread evenly, the glass's share of the box). Where a picture
should show where on the *tissue* the model looked, :func:`tissue_attention` restricts the map to a tissue mask and
renormalises it (each cell keeps the part of its attention that lies on tissue); ``wsilocal demo``'s summary draws
that map. The files below keep H's attention as the model computed it.

``save_heatmap`` writes, for slide ``ID``::

    ID_heatmap.png          thumbnail + attention (relative to uniform) + high-attention outlines + colour bar
    ID_attention.npy        float32 (h, w): H's attention, summing to 1 (class-agnostic); NaN = no tile there
    ID_evidence.npy         float32 (n_classes, h, w): attention × each cell's own class probabilities (method only)
    ID_attention.json       bbox, MPP, map shape, the cell → level-0 transform, classes, prediction
    ID_attention.geojson    FeatureCollection of polygons (level-0 px) around the high-attention cells
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsilocal.errors import WsilocalError
from wsilocal.infer.prediction import Prediction
from wsilocal.plotting import pyplot
from wsilocal.slide.reader import open_slide, read_region_downsampled

HIGH_ATTENTION = {"name": "high attention", "color": [255, 48, 0]}  # QuPath class of the exported polygons
Vertex = tuple[int, int]  # (column, row) of a cell corner


def high_attention_cells(attention: np.ndarray, mass: float = 0.1) -> np.ndarray:
    """The cells of highest attention that together hold at least ``mass`` of the total attention.

    Cells are taken in decreasing order of attention until the running sum reaches ``mass``; every cell tied
    with the last one taken is included too, so the result does not depend on the order of equal values.
    Empty cells (NaN: no tile there) are never taken.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    values = np.sort(attention[np.isfinite(attention)])[::-1]
    taken = int(np.searchsorted(np.cumsum(values), mass * values.sum() * (1 - 1e-9)))  # float-sum slack
    return attention >= values[min(taken, values.size - 1)]  # NaN >= anything is False


def tile_attention_map(coords: np.ndarray, scores: np.ndarray, tile_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Per-tile attention or scores on the regular grid of the tiles: ``(map (h, w) float32, origin (x0, y0))``.

    ``coords`` (N, 2) are the tiles' level-0 top-left corners, all on one grid of ``tile_size`` px (as
    ``wsilocal features`` lays them). Cell (i, j) is the tile at level-0 ``(x0 + j·tile_size, y0 + i·tile_size)``
    with ``(x0, y0)`` the smallest x and y of the tiles; the map spans the tiles' extent, and cells without a
    tile (background, too little tissue) are NaN — empty, not zero attention.

    Raises:
        WsilocalError: the tiles are not on such a grid, two share a cell, or coords and scores differ in length.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(coords) != len(scores) or not len(coords):
        raise WsilocalError(f"{len(coords)} tile positions but {len(scores)} attention values")
    origin = coords.min(axis=0)
    offsets = coords - origin
    if tile_size < 1 or (offsets % tile_size).any():
        raise WsilocalError(f"the tiles do not lie on a grid of {tile_size}-px tiles (level-0 px)")
    cols, rows = (offsets // tile_size).T
    grid = np.full((rows.max() + 1, cols.max() + 1), np.nan, np.float32)
    if np.unique(rows * grid.shape[1] + cols).size != len(coords):
        raise WsilocalError("two tiles share one grid cell")
    grid[rows, cols] = scores
    return grid, (int(origin[0]), int(origin[1]))


def _trace_rings(component: np.ndarray) -> list[list[Vertex]]:
    """Closed rings of cell corners along the boundary of the True cells (one 4-connected component).

    Each cell side facing a False cell is a directed edge with the component on its right (on screen, y
    down: clockwise around the component, anticlockwise around its holes). Edges are chained into rings; where
    two cells touch only at a corner, the walk turns right, keeping them apart as 4-connectivity says.
    Returns the rings' corner vertices (collinear points dropped), outer ring first.
    """
    padded = np.pad(component, 1)
    successors: dict[Vertex, list[Vertex]] = defaultdict(list)
    for r, c in zip(*np.nonzero(component), strict=True):
        r, c = int(r), int(c)
        if not padded[r, c + 1]:  # above
            successors[(c, r)].append((c + 1, r))
        if not padded[r + 1, c + 2]:  # right
            successors[(c + 1, r)].append((c + 1, r + 1))
        if not padded[r + 2, c + 1]:  # below
            successors[(c + 1, r + 1)].append((c, r + 1))
        if not padded[r + 1, c]:  # left
            successors[(c, r + 1)].append((c, r))

    def turn_order(edge: tuple[Vertex, Vertex], end: Vertex) -> int:
        (ax, ay), (bx, by) = edge
        dx, dy = bx - ax, by - ay
        step = (end[0] - bx, end[1] - by)
        return [(-dy, dx), (dx, dy), (dy, -dx)].index(step)  # right turn, straight on, left turn

    used: set[tuple[Vertex, Vertex]] = set()
    rings = []
    for start in sorted(successors, key=lambda v: (v[1], v[0])):  # top-left corner first: the outer ring
        for first_end in successors[start]:
            edge = (start, first_end)
            if edge in used:
                continue
            ring = []
            while edge not in used:
                used.add(edge)
                ring.append(edge[0])
                end = edge[1]
                edge = (end, min(successors[end], key=lambda e, current=edge: turn_order(current, e)))
            rings.append(_corners(ring))
    return rings


def _corners(ring: list[Vertex]) -> list[Vertex]:
    """The vertices of a closed ring where its direction changes."""
    n = len(ring)
    keep = []
    for i, (x, y) in enumerate(ring):
        (px, py), (nx, ny) = ring[i - 1], ring[(i + 1) % n]
        if (x - px, y - py) != (nx - x, ny - y):
            keep.append((x, y))
    return keep


def cell_edges(prediction: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 x of the map's w + 1 column boundaries and y of its h + 1 row boundaries.

    Inner boundaries lie halfway between neighbouring cells' receptive-field centres
    (``cell_origin + k · cell_size``); the outer ones are the tissue box's edges, so the first and last row
    and column take up the part of the box beyond the half-cell (their receptive fields cover it).
    """
    h, w = _attention(prediction).shape
    bx, by, bw, bh = prediction.bbox
    (x0, y0), (cw, ch) = prediction.cell_origin, prediction.cell_size
    xs = np.clip(np.r_[bx, x0 + cw * np.arange(1, w), bx + bw], bx, bx + bw)
    ys = np.clip(np.r_[by, y0 + ch * np.arange(1, h), by + bh], by, by + bh)
    return xs.astype(float), ys.astype(float)


def interval_overlaps(edges: np.ndarray, n_pixels: int, downsample: float) -> np.ndarray:
    """(n_pixels, n_cells) lengths of the overlap of mask pixel k, ``[k·d, (k+1)·d)`` in level-0 px, with cell j,
    ``[edges[j], edges[j+1])``: one axis of the exact overlap of a mask's pixels with a map's cells."""
    pixel_lo = np.arange(n_pixels)[:, None] * float(downsample)
    lo = np.maximum(pixel_lo, np.asarray(edges, np.float64)[None, :-1])
    hi = np.minimum(pixel_lo + downsample, np.asarray(edges, np.float64)[None, 1:])
    return np.clip(hi - lo, 0, None)


def cell_tissue_fraction(column_edges: np.ndarray, row_edges: np.ndarray, tissue: np.ndarray,
                         downsample: float) -> np.ndarray:
    """(h, w) share of each map cell's level-0 area that a tissue mask covers. The mask's pixel (i, j) spans
    level-0 ``[j·d, (j+1)·d) × [i·d, (i+1)·d)`` with d = ``downsample`` (a
    :class:`~wsilocal.slide.tissue.TissueRegion`'s ``mask`` and ``downsample``, or a synthetic slide's mask)."""
    tissue = np.asarray(tissue, np.float64)
    covered = (interval_overlaps(row_edges, tissue.shape[0], downsample).T @ tissue
               @ interval_overlaps(column_edges, tissue.shape[1], downsample))
    area = np.outer(np.diff(row_edges), np.diff(column_edges))
    return np.divide(covered, area, out=np.zeros_like(covered), where=area > 0)


def tissue_attention(attention: np.ndarray, column_edges: np.ndarray, row_edges: np.ndarray, tissue: np.ndarray,
                     downsample: float) -> np.ndarray:
    """H's attention restricted to the tissue: each cell's attention times the share of its area that is tissue
    (:func:`cell_tissue_fraction`), renormalised to sum 1; NaN on cells without tissue.

    It answers "where on the tissue did the model look": the attention H put on glass is left out (its share is
    ``1 - Σ attention × fraction``), which H's own map (what the prediction used) keeps. Raises ValueError when
    no attention lies on the tissue.
    """
    fraction = cell_tissue_fraction(column_edges, row_edges, tissue, downsample)
    kept = np.nan_to_num(np.asarray(attention, np.float64)) * fraction
    total = kept.sum()
    if not total > 0:
        raise ValueError("no attention lies on the tissue mask")
    return np.where(fraction > 0, kept / total, np.nan)


def attention_geojson(prediction: Prediction, mass: float = 0.1) -> dict:
    """A GeoJSON FeatureCollection of the high-attention regions (see :func:`high_attention_cells`).

    One Polygon per 4-connected region of high-attention cells, tracing the cells' boundaries (holes
    included) in level-0 pixel coordinates, with QuPath's annotation properties and the region's
    ``attention`` (the share of the slide's attention — or of a baseline's summed tile scores — it holds),
    ``max_attention`` and ``cells`` — repeated
    as QuPath ``measurements`` (the name/value list every QuPath version reads), since QuPath ignores other
    properties. Features are ordered by decreasing ``attention``.
    """
    attention = _attention(prediction)
    total = float(np.nansum(attention))  # 1 for an attention map; the summed scores of a score map
    xs, ys = cell_edges(prediction)
    labels, _ = ndimage.label(high_attention_cells(attention, mass))
    features = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[rows, cols] == index  # the region, within its bounding box
        rings = [[[float(xs[cols.start + c]), float(ys[rows.start + r])] for c, r in ring]
                 for ring in _trace_rings(component)]
        weights = attention[rows, cols][component]
        values = {"attention": float(weights.sum()) / total, "max_attention": float(weights.max()),
                  "cells": int(component.sum())}
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1] for ring in rings]},
            "properties": {"objectType": "annotation", "classification": HIGH_ATTENTION, **values,
                           "measurements": [{"name": name, "value": value} for name, value in values.items()]},
        })
    features.sort(key=lambda f: -f["properties"]["attention"])
    for rank, feature in enumerate(features, start=1):
        feature["properties"]["name"] = f"high attention {rank}"
    return {"type": "FeatureCollection", "features": features}


def attention_relative_to_uniform(prediction: Prediction) -> np.ndarray:
    """H's attention × the number of cells it may attend to: 1 is what each would get from a uniform attention.
    Cells it may not attend to (glass, for a run that masks it; cells without a tile) are NaN."""
    attention = _attention(prediction).astype(np.float64)
    if prediction.attended is not None:
        attention = np.where(prediction.attended, attention, np.nan)
    return attention * np.count_nonzero(~np.isnan(attention))


def _attention(prediction: Prediction) -> np.ndarray:
    if prediction.attention is None:
        raise ValueError(f"{prediction.slide}: the prediction has no attention map; predict with heatmap=True")
    return prediction.attention


def save_heatmap(prediction: Prediction, slide_path: str | Path, out_dir: str | Path, *,
                 slide_id: str | None = None, mass: float = 0.1, max_side: int = 2048) -> dict[str, Path]:
    """Write the heatmap PNG, raw maps, JSON sidecar and GeoJSON of one prediction (see the module docs).

    Args:
        prediction: made with ``heatmap=True`` (of the method, or of a baseline: see :func:`tile_attention_map`).
        slide_path: the slide file, for the thumbnail (read at a downsample making its longer side at most
            ``max_side`` px).
        out_dir: folder for the files (created).
        slide_id: file name prefix; default the slide file's name without extension.
        mass: share of the attention the GeoJSON regions and PNG outlines cover.

    Returns:
        The written files by kind: ``png``, ``attention``, ``evidence``, ``json``, ``geojson``.
    """
    attention = _attention(prediction)
    slide_id = slide_id or Path(slide_path).stem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: out / f"{slide_id}_{suffix}" for kind, suffix in (
        ("png", "heatmap.png"), ("attention", "attention.npy"), ("evidence", "evidence.npy"),
        ("json", "attention.json"), ("geojson", "attention.geojson"))}
    if prediction.evidence is None:
        del files["evidence"]
    else:
        np.save(files["evidence"], prediction.evidence.astype(np.float32))
    np.save(files["attention"], attention.astype(np.float32))
    geojson = attention_geojson(prediction, mass)
    files["geojson"].write_text(json.dumps(geojson))
    with open_slide(slide_path) as slide:
        slide_size = slide.level_dimensions[0]
        thumbnail = read_region_downsampled(slide, max(1.0, max(slide_size) / max_side))
    what = "attention" if prediction.attention_is_softmax else "summed tile scores"
    _plot(files["png"], thumbnail, slide_size, prediction, geojson, f"{slide_id}: predicted {prediction.predicted} "
          f"(p = {prediction.probabilities[prediction.predicted]:.3f}); white: cells holding {mass:.0%} of the "
          f"{what}")
    xs, ys = cell_edges(prediction)
    sidecar = {
        "slide": prediction.slide,
        "slide_id": slide_id,
        "predicted": prediction.predicted,
        "probabilities": prediction.probabilities,
        "bbox": list(prediction.bbox),
        "mpp": prediction.mpp,
        "map_shape": list(attention.shape),
        "cell_origin": list(prediction.cell_origin),
        "cell_size": list(prediction.cell_size),
        "transform": "map cell (row i, column j) covers level-0 pixels x in [cell_origin[0] + j*cell_size[0], "
                     "cell_origin[0] + (j+1)*cell_size[0]) and y in [cell_origin[1] + i*cell_size[1], "
                     "cell_origin[1] + (i+1)*cell_size[1]); the first and last row and column are cut or "
                     "extended to the edges of bbox (x, y, width, height), so the cells tile it",
        "column_edges": xs.tolist(),
        "row_edges": ys.tolist(),
        "attention_is_softmax": prediction.attention_is_softmax,
        "empty_cells": int(np.isnan(attention).sum()),
        **({"evidence": "evidence[c, i, j] = attention[i, j] * softmax(H.classifier(feature[i, j]))[c]",
            "evidence_classes": list(prediction.probabilities)} if prediction.evidence is not None else {}),
        "high_attention_mass": mass,
        "high_attention_regions": len(geojson["features"]),
        "files": {kind: path.name for kind, path in files.items()},
    }
    files["json"].write_text(json.dumps(sidecar, indent=1))
    return files


def _plot(path: Path, thumbnail: np.ndarray, slide_size: tuple[int, int], prediction: Prediction,
          geojson: dict, title: str) -> None:
    """The thumbnail in level-0 coordinates, attention over the tissue box, outlines of the GeoJSON regions."""
    plt = pyplot()
    from matplotlib.patches import Polygon, Rectangle

    attention = np.ma.masked_invalid(_attention(prediction))  # empty cells (no tile) stay transparent
    width, height = slide_size
    bx, by, bw, bh = prediction.bbox
    fig, ax = plt.subplots(figsize=(9, max(3.0, min(12.0, 7.5 * height / width))))
    ax.imshow(thumbnail, extent=(0, width, height, 0))
    if prediction.attention_is_softmax:
        values = np.ma.masked_invalid(attention_relative_to_uniform(prediction))  # glass of a masked run: clear
        limits, label = {"vmin": 0}, "attention relative to uniform"
    else:  # a baseline's per-tile scores (probabilities), shown as they are
        values, limits, label = attention, {"vmin": 0, "vmax": 1}, "tile score (the model's own, not attention)"
    overlay = ax.pcolormesh(*cell_edges(prediction), values, cmap="jet", alpha=0.45, **limits)
    ax.add_patch(Rectangle((bx, by), bw, bh, fill=False, edgecolor="0.35", linestyle="--", linewidth=0.8))
    for feature in geojson["features"]:
        for ring in feature["geometry"]["coordinates"]:
            ax.add_patch(Polygon(ring, closed=True, fill=False, edgecolor="white", linewidth=1.2))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xlabel("level-0 x (px)")
    ax.set_ylabel("level-0 y (px)")
    fig.colorbar(overlay, ax=ax, shrink=0.8, label=label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
