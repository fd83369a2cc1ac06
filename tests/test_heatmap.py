"""Heatmaps: attention files, QuPath GeoJSON polygons, and their alignment with a known lesion in level-0 pixels."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.path import Path as GeometryPath
from PIL import Image
from scipy import ndimage

from wsilocal import synth
from wsilocal.infer.heatmap import (
    attention_geojson,
    attention_relative_to_uniform,
    high_attention_cells,
    save_heatmap,
)
from wsilocal.infer.predict import Predictor
from wsilocal.infer.prediction import Prediction
from wsilocal.models.heads import FinalClassifier
from wsilocal.models.resnet import FrozenBatchNorm2d, ResNetTrunk
from wsilocal.prepare.cache import PrepareSettings

MEAN, STD = [0.8, 0.7, 0.8], [0.2, 0.2, 0.2]


def fake_prediction(attention: np.ndarray, bbox=(1000, 2000, 640, 550), origin=(980.0, 1980.0),
                    cell=(100.0, 100.0)) -> Prediction:
    """A prediction with a given attention map; 100-px cells starting 20 px before the tissue box."""
    return Prediction(slide="fake.svs", predicted="a", probabilities={"a": 0.6, "b": 0.4}, seconds=1.0,
                      peak_memory_bytes=0, mode="whole", feature_shape=attention.shape, bbox=bbox, mpp=2.0,
                      cell_origin=origin, cell_size=cell, attention=attention / attention.sum())


def inside(polygon: list, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which points (xs, ys) lie in a GeoJSON polygon (outer ring minus holes), by matplotlib's geometry."""
    points = np.column_stack([xs, ys])
    result = GeometryPath(polygon[0]).contains_points(points)
    for hole in polygon[1:]:
        result &= ~GeometryPath(hole).contains_points(points)
    return result


def ring_area(ring: list) -> float:
    """Shoelace area, positive for rings running clockwise on screen (y down)."""
    x, y = np.array(ring).T
    return float((x[:-1] * y[1:] - x[1:] * y[:-1]).sum() / 2)


def test_attention_relative_to_uniform_counts_only_the_cells_h_may_attend_to():
    """A run that masks glass: a uniform attention over its tissue cells reads 1 on each of them, glass is left out
    (NaN, drawn clear); unmasked, every cell counts; a baseline's cells without a tile (NaN) never count."""
    attended = np.zeros((4, 5), bool)
    attended[1:3, 1:4] = True  # 6 tissue cells of 20
    masked = dataclasses.replace(fake_prediction(attended.astype(float)), attended=attended)
    relative = attention_relative_to_uniform(masked)
    np.testing.assert_allclose(relative[attended], 1.0)
    assert np.isnan(relative[~attended]).all()
    unmasked = attention_relative_to_uniform(fake_prediction(np.ones((4, 5))))
    np.testing.assert_allclose(unmasked, 1.0)
    tiles = np.where(attended, 1.0, np.nan)
    baseline = dataclasses.replace(fake_prediction(np.ones((4, 5))), attention=tiles / np.nansum(tiles))
    np.testing.assert_allclose(attention_relative_to_uniform(baseline)[attended], 1.0)


def test_high_attention_cells_hold_the_requested_mass():
    attention = np.array([[0.5, 0.3], [0.1, 0.1]])
    assert high_attention_cells(attention, 0.5).tolist() == [[True, False], [False, False]]
    assert high_attention_cells(attention, 0.6).tolist() == [[True, True], [False, False]]
    assert high_attention_cells(attention, 0.85).all()  # the two tied cells come together
    with pytest.raises(ValueError, match="mass"):
        high_attention_cells(attention, 0)


def test_polygons_trace_the_cells_of_each_region():
    high = np.zeros((6, 7), bool)
    high[0:3, 0:3] = True
    high[1, 1] = False  # a ring of 8 cells around a hole
    high[0, 5] = True  # a lone cell
    high[4, 4] = high[5, 5] = True  # touching only at a corner: two regions under 4-connectivity
    attention = np.where(high, 10.0, 1.0)
    attention[0, 5] = 30.0  # the lone cell holds more attention than the diagonal pair
    prediction = fake_prediction(attention)
    mass = prediction.attention[high].sum()
    features = attention_geojson(prediction, mass=mass)["features"]
    assert len(features) == 4
    assert [f["properties"]["cells"] for f in features] == [8, 1, 1, 1]
    assert [f["properties"]["name"] for f in features] == [f"high attention {i}" for i in range(1, 5)]
    assert features[1]["properties"]["attention"] == pytest.approx(prediction.attention[0, 5])
    assert sum(f["properties"]["attention"] for f in features) == pytest.approx(mass)

    x0, y0, w, h = prediction.bbox
    # Cell boundaries by hand: every 100 px from the origin (980, 1980), the outer ones on the box's edges.
    cell_x = np.array([1000, 1080, 1180, 1280, 1380, 1480, 1580, 1640])
    cell_y = np.array([2000, 2080, 2180, 2280, 2380, 2480, 2550])
    centres_x, centres_y = np.meshgrid((cell_x[:-1] + cell_x[1:]) / 2, (cell_y[:-1] + cell_y[1:]) / 2)
    covered = np.zeros_like(high)
    for feature in features:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"]["name"] == "high attention"
        assert properties["measurements"] == [{"name": k, "value": properties[k]}
                                              for k in ("attention", "max_attention", "cells")]
        rings = feature["geometry"]["coordinates"]
        for ring in rings:
            assert ring[0] == ring[-1] and len(ring) >= 5
            xs, ys = np.array(ring).T
            assert xs.min() >= x0 and xs.max() <= x0 + w and ys.min() >= y0 and ys.max() <= y0 + h
        # Area of the traced polygon = the summed area of its cells, clipped to the tissue box.
        cells = inside(rings, centres_x.ravel(), centres_y.ravel()).reshape(high.shape)
        cell_areas = np.outer(np.diff(cell_y), np.diff(cell_x))
        assert ring_area(rings[0]) + sum(ring_area(r) for r in rings[1:]) == pytest.approx(cell_areas[cells].sum())
        assert ring_area(rings[0]) > 0 and all(ring_area(r) < 0 for r in rings[1:])  # outer, then holes
        assert cells.sum() == properties["cells"]
        covered |= cells
    assert (covered == high).all()
    ring_feature = features[0]["geometry"]["coordinates"]
    assert len(ring_feature) == 2 and ring_area(ring_feature[1]) == pytest.approx(-100 * 100)
    # All cells together tile the tissue box exactly.
    (everything,) = attention_geojson(prediction, mass=1.0)["features"]
    assert everything["geometry"]["coordinates"] == [[[1000, 2000], [1640, 2000], [1640, 2550], [1000, 2550],
                                                      [1000, 2000]]]


def lesion_detector() -> tuple[ResNetTrunk, FinalClassifier]:
    """A trunk whose channel 0 measures how much of a neighbourhood is nuclear-dark, and an H attending to it.

    conv1 + bn1 give ``relu(s · (200 − R))`` with R the red value (0–255) averaged over the conv's central
    3×3 pixels (nuclei are dark in red); every later block box-filters (and subsamples) channel 0 and leaves
    the other channels at zero. H's attention score is ``4 · tanh(channel 0)``; its classifier is zero.
    On the synthetic slides, tumour nuclei crowd the lesion, so attention peaks there.
    """
    trunk = ResNetTrunk(conv1_stride=3)
    head = FinalClassifier(512, 2)
    with torch.no_grad():
        for parameter in [*trunk.parameters(), *head.parameters()]:
            parameter.zero_()
        for bn in trunk.batchnorms():  # identity affine maps
            bn.weight.fill_(1)
            bn.running_var.fill_(1 - bn.eps)
            bn.running_mean.zero_()
        s = 1 / 20
        trunk.conv1.weight[0, 0, 2:5, 2:5] = -s * 255 * STD[0] / 9  # normalised input back to 0–255
        trunk.bn1.bias[0] = s * (200 - 255 * MEAN[0])
        for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
            for block in layer:
                if block.downsample is None:  # both convs zero: out = relu(0 + x) = x
                    continue
                else:  # the shortcut is off; conv1 box-filters with stride 2, conv2 passes it on
                    block.conv1.weight[0, 0] = 1 / 9
                    block.conv2.weight[0, 0, 1, 1] = 1
        head.pool.V[0].weight[0, 0] = 1
        head.pool.U[0].bias[0] = 30  # gate open
        head.pool.w.weight[0, 0] = 4
    assert all(isinstance(bn, FrozenBatchNorm2d) for bn in trunk.batchnorms())
    return trunk, head


@pytest.fixture(scope="module")
def lesion_slide(module_tmp) -> SimpleNamespace:
    """A 3072² px synthetic slide (0.25 µm/px) with one lesion, its prediction at 1 µm/px and heatmap files
    whose GeoJSON outlines the cells holding 30 % of the attention."""
    root = module_tmp("heatmap")
    params = synth.SynthParams(classes=2, size=(3072, 3072), seed=5, distractors=0.0, stain_variation=0.0,
                               lesion_regions=(1, 1), lesion_fraction=(0.15, 0.2), tissue_pieces=(1, 1),
                               tissue_cover=(0.3, 0.35))
    spec = synth.make_slide(params, "solid")
    path = root / "lesion.svs"
    synth.write_slide(spec, path)
    trunk, head = lesion_detector()
    predictor = Predictor(trunk, head, ["glandular", "solid"], MEAN, STD, PrepareSettings(mpp=1.0),
                          device=torch.device("cpu"), memory_budget=2**40)
    prediction = predictor.predict(path, heatmap=True)
    files = save_heatmap(prediction, path, root / "out", mass=0.3)
    return SimpleNamespace(spec=spec, path=path, prediction=prediction, files=files)


def test_heatmap_files_are_written_and_valid(lesion_slide):
    prediction, files = lesion_slide.prediction, lesion_slide.files
    h, w = prediction.feature_shape
    assert {k: p.name for k, p in files.items()} == {
        "png": "lesion_heatmap.png", "attention": "lesion_attention.npy", "evidence": "lesion_evidence.npy",
        "json": "lesion_attention.json", "geojson": "lesion_attention.geojson"}
    with Image.open(files["png"]) as png:
        assert png.format == "PNG" and min(png.size) > 300
    attention = np.load(files["attention"])
    assert attention.dtype == np.float32 and attention.shape == (h, w) and h * w >= 80
    np.testing.assert_allclose(attention, prediction.attention, rtol=1e-6)
    evidence = np.load(files["evidence"])
    assert evidence.shape == (2, h, w)
    for class_map in evidence:  # H's classifier is zero: every cell is ½ of each class
        np.testing.assert_allclose(class_map, attention / 2, rtol=1e-5)
    sidecar = json.loads(files["json"].read_text())
    assert sidecar["bbox"] == list(prediction.bbox) and sidecar["map_shape"] == [h, w] and sidecar["mpp"] == 1.0
    assert sidecar["cell_origin"] == list(prediction.cell_origin) and sidecar["evidence_classes"] == ["glandular",
                                                                                                       "solid"]
    assert sidecar["cell_size"] == pytest.approx([48 * 4, 48 * 4], rel=0.01)  # 48 px at 1 µm/px, 4 level-0 px each
    geojson = json.loads(files["geojson"].read_text())
    assert geojson["type"] == "FeatureCollection" and geojson["features"]
    x0, y0, bw, bh = prediction.bbox
    for feature in geojson["features"]:
        assert feature["properties"]["classification"] == {"name": "high attention", "color": [255, 48, 0]}
        for ring in feature["geometry"]["coordinates"]:
            xs, ys = np.array(ring).T
            assert ring[0] == ring[-1]
            assert xs.min() >= x0 and xs.max() <= x0 + bw and ys.min() >= y0 and ys.max() <= y0 + bh


def test_high_attention_region_lies_on_the_known_lesion(lesion_slide):
    """The GeoJSON's level-0 polygons, rasterised on the lesion mask's grid, must fall on the lesion."""
    spec, prediction = lesion_slide.spec, lesion_slide.prediction
    lesion = synth.lesion_mask(spec)  # one pixel per 32 level-0 px
    step = spec.mask_downsample
    ys, xs = np.mgrid[: lesion.shape[0], : lesion.shape[1]]
    xs, ys = (xs.ravel() + 0.5) * step, (ys.ravel() + 0.5) * step

    def rasterise(features, shift=(0, 0)):
        region = np.zeros(lesion.size, bool)
        for feature in features:
            rings = [[(x + shift[0], y + shift[1]) for x, y in ring] for ring in feature["geometry"]["coordinates"]]
            region |= inside(rings, xs, ys)
        return region.reshape(lesion.shape)

    def on_lesion(region):
        return (region & lesion).sum() / region.sum()

    features = json.loads(lesion_slide.files["geojson"].read_text())["features"]
    region = rasterise(features)
    assert region.sum() >= 3 * 36  # at least three map cells (of 6×6 mask pixels)
    assert on_lesion(region) >= 0.8
    in_boxes = np.zeros_like(lesion)
    for x0, y0, x1, y1 in synth.lesion_boxes(spec):
        in_boxes[y0 // step : y1 // step, x0 // step : x1 // step] = True
    assert (region & in_boxes).sum() / region.sum() >= 0.9
    # Nothing farther than one map cell (192 level-0 px = 6 mask pixels) from the lesion.
    near_lesion = ndimage.binary_dilation(lesion, iterations=6)
    assert not (region & ~near_lesion).any()
    # The check is sensitive to the transform: the region shifted by two cells, or without the tissue box's
    # offset, falls mostly off the lesion.
    x, y = prediction.bbox[:2]
    assert x > 0 and y > 0
    for shift in ((384, 0), (-384, 0), (0, 384), (0, -384), (-x, -y)):
        assert on_lesion(rasterise(features, shift)) < 0.6, shift
