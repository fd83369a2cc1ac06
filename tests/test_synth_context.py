"""The context task of the synthetic cohorts: the label (near/far) is only the distance between a tumour focus
(A) and a lymphoid follicle (B). Checked on real files written by ``wsilocal synth --task context``: the class
rule on the recorded and re-measured gaps, no tile holding both structures, matched A/B areas and tile
colours across classes, near/far slides of one seed differing only where B lies, determinism, and errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage, stats
from scipy.spatial import cKDTree

from wsilocal import synth
from wsilocal.cli import main
from wsilocal.errors import ConfigError
from wsilocal.models.resnet import ResNetTrunk
from wsilocal.slide.cohort import load_cohort
from wsilocal.stream.geometry import footprint, trunk_geometry

PIXEL_UM = synth.FIELD_STEP * synth.MPP  # µm per mask pixel (8)


@dataclass
class SmallContext(synth.SynthParams):
    """The context layout scaled down 8× (64 µm tiles), so that a slide is ~4000×2100 px; one staining."""

    task: str = "context"
    stain_variation: float = 0.0
    context_tile_um: float = 64.0
    context_tumour_um: tuple[float, float] = (80.0, 110.0)
    context_follicle_um: tuple[float, float] = (60.0, 80.0)
    context_near_um: tuple[float, float] = (120.0, 160.0)
    context_far_um: tuple[float, float] = (400.0, 480.0)


SIZE = (4000, 2100)
TILE = round(SmallContext().context_tile_um / PIXEL_UM)  # a tile's edge in mask pixels (8)


@pytest.fixture(scope="module")
def cohort(module_tmp) -> Path:
    """A 2 × 3-slide context cohort written by the command line, with the small layout."""
    out = module_tmp("context")
    with pytest.MonkeyPatch.context() as patch:  # the CLI builds its params from synth.SynthParams
        patch.setattr(synth, "SynthParams", SmallContext)
        assert main(["synth", "--out", str(out), "--task", "context", "--slides-per-class", "3",
                     "--size", f"{SIZE[0]}x{SIZE[1]}", "--seed", "7"]) == 0
    return out


def _slides(out: Path) -> list[dict]:
    return list(json.loads((out / "synth.json").read_text())["slides"].values())


def _masks(out: Path, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tumour focus, follicle and glass of a slide's mask PNG."""
    mask = np.asarray(Image.open(out / info["mask"]))
    return mask == synth.MASK_LESION, mask == synth.MASK_FOLLICLE, mask == synth.MASK_GLASS


def _gap_um(a: np.ndarray, b: np.ndarray) -> float:
    """Least distance between pixel centres of two masks, by a k-d tree (independent of the generator's EDT)."""
    distances, _ = cKDTree(np.argwhere(a)).query(np.argwhere(b))
    return float(distances.min()) * PIXEL_UM


def _box(mask: np.ndarray, size: list[int]) -> list[int]:
    rows, cols = np.nonzero(mask)
    step = synth.FIELD_STEP
    return [cols.min() * step, rows.min() * step, min((cols.max() + 1) * step, size[0]),
            min((rows.max() + 1) * step, size[1])]


def test_cli_cohort_loads_with_balanced_stratified_splits(cohort: Path) -> None:
    loaded = load_cohort(cohort / "cohort.csv")
    assert loaded.classes == ("far", "near") and len(loaded.slides) == 6
    for split in ("train", "val", "test"):
        assert sorted(s.label for s in loaded.split(split)) == ["far", "near"]
    meta = json.loads((cohort / "synth.json").read_text())
    assert meta["params"]["task"] == "context" and meta["classes"] == ["near", "far"]
    assert meta["mask_values"]["follicle"] == synth.MASK_FOLLICLE
    for slide in loaded.slides:
        with openslide.OpenSlide(slide.path) as reader:
            assert reader.properties["openslide.vendor"] == "aperio"
            width, height = reader.dimensions  # jitter only enlarges: the layout needs at least SIZE
            assert SIZE[0] <= width <= 1.25 * SIZE[0] and SIZE[1] <= height <= 1.25 * SIZE[1]


def test_recorded_gaps_boxes_and_areas_match_the_masks_and_the_class_rule(cohort: Path) -> None:
    params = SmallContext()
    rule = {"near": params.context_near_um, "far": params.context_far_um}
    for info in _slides(cohort):
        a, b, _ = _masks(cohort, info)
        assert ndimage.label(a)[1] == 1 and ndimage.label(b)[1] == 1  # one focus, one follicle
        assert info["gap_um"] == pytest.approx(_gap_um(a, b), abs=1e-3)
        lo, hi = rule[info["label"]]
        assert lo <= info["gap_um"] <= hi, info
        assert info["tumour_bbox"] == _box(a, info["size"]) == info["lesion_bboxes"][0]
        assert info["follicle_bbox"] == _box(b, info["size"])
        assert info["tumour_area_um2"] == a.sum() * PIXEL_UM**2
        assert info["follicle_area_um2"] == b.sum() * PIXEL_UM**2


def test_no_tile_at_any_offset_holds_both_structures_or_one_and_glass(cohort: Path) -> None:
    """A tile of TILE mask pixels at any level-0 offset touches at most TILE + 1 pixels a side: every such
    window is checked (sliding maximum), which covers the 5x grid and every shifted grid."""
    window = TILE + 1
    for info in _slides(cohort):
        a, b, glass = _masks(cohort, info)
        has_a, has_b = (ndimage.maximum_filter(m, size=window, mode="constant", cval=False) for m in (a, b))
        has_glass = ndimage.maximum_filter(glass, size=window, mode="constant", cval=True)  # off the slide: glass
        assert not (has_a & has_b).any() and not (has_a & has_glass).any() and not (has_b & has_glass).any()
        assert has_a.any() and has_b.any()
        # The check has teeth: a window just wider than the gap does hold both.
        wide = int(info["gap_um"] / PIXEL_UM) + 2
        both = ndimage.maximum_filter(a, size=wide) & ndimage.maximum_filter(b, size=wide)
        assert both.any()


def _z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-channel two-sample z-score of the means of two sets of RGB values (Welch)."""
    return (x.mean(axis=0) - y.mean(axis=0)) / np.sqrt(x.var(axis=0, ddof=1) / len(x) + y.var(axis=0, ddof=1) / len(y))


def test_tile_colours_do_not_depend_on_the_class(cohort: Path) -> None:
    """Mean RGB of the 5x-grid tiles holding A and holding B (read by OpenSlide), each less its slide's mean
    stroma-only tile: neither kind differs between the classes (|z| < 3 per channel), while both differ from
    stroma. (Relative to the slide's own stroma: slides differ in stroma density and distractors, so with three
    slides per class raw tile colours would compare slides, not classes; stroma itself is the same in both
    classes by construction, see test_near_and_far_of_one_seed_differ_only_where_the_follicle_lies.)"""
    tiles: dict[tuple[str, str], list[np.ndarray]] = {}
    for info in _slides(cohort):
        a, b, _ = _masks(cohort, info)
        tissue_only = np.asarray(Image.open(cohort / info["mask"])) == synth.MASK_TISSUE
        with openslide.OpenSlide(cohort / "slides" / f"{info['slide_id']}.svs") as reader:
            scale = synth.FIELD_STEP // round(reader.level_downsamples[1])  # level-1 px per mask pixel
            image = np.asarray(reader.read_region((0, 0), 1, reader.level_dimensions[1]).convert("RGB"), float)
        kinds: dict[str, list[np.ndarray]] = {"A": [], "B": [], "stroma": []}
        for i in range(a.shape[0] // TILE):
            for j in range(a.shape[1] // TILE):
                cell = (slice(i * TILE, (i + 1) * TILE), slice(j * TILE, (j + 1) * TILE))
                kind = "A" if a[cell].any() else "B" if b[cell].any() else "stroma" if tissue_only[cell].all() else None
                if kind:
                    pixels = image[cell[0].start * scale : cell[0].stop * scale,
                                   cell[1].start * scale : cell[1].stop * scale]
                    kinds[kind].append(pixels.mean(axis=(0, 1)))
        stroma = np.mean(kinds["stroma"], axis=0)
        for kind in ("A", "B"):
            tiles.setdefault((kind, info["label"]), []).extend(np.array(kinds[kind]) - stroma)
    rgb = {key: np.array(values) for key, values in tiles.items()}
    for kind in ("A", "B"):
        assert min(len(rgb[kind, "near"]), len(rgb[kind, "far"])) >= 5, kind
        assert np.abs(_z(rgb[kind, "near"], rgb[kind, "far"])).max() < 3, kind
        both = np.concatenate([rgb[kind, "near"], rgb[kind, "far"]])  # the same test tells the kinds apart
        assert np.abs(both.mean(axis=0) / (both.std(axis=0, ddof=1) / np.sqrt(len(both)))).max() > 4, kind


def test_areas_have_the_same_distribution_in_both_classes() -> None:
    """Sizes come from the slide's seed, never from its label: the same for one seed, matched across seeds."""
    areas: dict[str, list[tuple[int, int]]] = {"near": [], "far": []}
    for k, label in enumerate(["near", "far"] * 25):
        spec = synth.make_slide(SmallContext(size=SIZE, seed=1000 + k), label)
        areas[label].append((synth.lesion_mask(spec).sum(), synth.follicle_mask(spec).sum()))
    near, far = np.array(areas["near"]) * PIXEL_UM**2, np.array(areas["far"]) * PIXEL_UM**2
    for column, (lo, hi) in enumerate([SmallContext().context_tumour_um, SmallContext().context_follicle_um]):
        # Harmonics keep a blob's radius within 0.4..1.6 of the drawn one (plus a mask pixel).
        bounds = (np.pi * (0.4 * lo / 2) ** 2, np.pi * (1.6 * hi / 2 + PIXEL_UM) ** 2)
        assert bounds[0] <= min(near[:, column].min(), far[:, column].min())
        assert max(near[:, column].max(), far[:, column].max()) <= bounds[1]
        assert stats.ks_2samp(near[:, column], far[:, column]).pvalue > 0.05
        assert abs(_z(near[:, column], far[:, column])) < 3


def test_near_and_far_of_one_seed_differ_only_where_the_follicle_lies() -> None:
    """Pixel for pixel. Dense distractors (vessels, ducts, fat), so that a background that made way for B
    would show here."""
    params = SmallContext(size=SIZE, seed=8, distractors=12.0)
    specs = {label: synth.make_slide(params, label) for label in synth.CONTEXT_CLASSES}
    masks = {label: synth.label_mask(spec) for label, spec in specs.items()}
    follicle = {label: synth.follicle_mask(spec) for label, spec in specs.items()}
    # Same tissue and focus; the follicle is the same mask, moved (each lies on plain tissue in the other).
    elsewhere = ~(follicle["near"] | follicle["far"])
    assert np.array_equal(masks["near"][elsewhere], masks["far"][elsewhere])
    assert (masks["far"][follicle["near"]] == synth.MASK_TISSUE).all()
    assert (masks["near"][follicle["far"]] == synth.MASK_TISSUE).all()
    assert np.array_equal(synth.lesion_mask(specs["near"]), synth.lesion_mask(specs["far"]))
    (r0, c0), (r1, c1) = (np.argwhere(follicle[label]).min(axis=0) for label in synth.CONTEXT_CLASSES)
    assert np.array_equal(np.roll(follicle["near"], (r1 - r0, c1 - c0), axis=(0, 1)), follicle["far"])
    images = {label: synth.render_region(spec, 0, 0, *SIZE) for label, spec in specs.items()}
    differs = (images["near"] != images["far"]).any(axis=2)
    step = synth.FIELD_STEP
    allowed = np.kron(ndimage.binary_dilation(follicle["near"] | follicle["far"]), np.ones((step, step), bool))
    assert not differs[~allowed[: SIZE[1], : SIZE[0]]].any()
    for label in synth.CONTEXT_CLASSES:
        inner = np.kron(ndimage.binary_erosion(follicle[label]), np.ones((step, step), bool))[: SIZE[1], : SIZE[0]]
        assert differs[inner].mean() > 0.9


def test_same_seed_same_pixels_and_region_cuts_do_not_matter() -> None:
    params = SmallContext(size=SIZE, seed=3)
    spec = synth.make_slide(params, "near")
    layout = synth.context_layout(spec)
    x0 = min(layout["tumour_bbox"][0], layout["follicle_bbox"][0]) - 40  # both structures and their edges
    y0 = min(layout["tumour_bbox"][1], layout["follicle_bbox"][1]) - 40
    x1 = max(layout["tumour_bbox"][2], layout["follicle_bbox"][2]) + 40
    y1 = max(layout["tumour_bbox"][3], layout["follicle_bbox"][3]) + 40
    whole = synth.render_region(spec, x0, y0, x1 - x0, y1 - y0)
    assert np.array_equal(whole, synth.render_region(synth.make_slide(params, "near"), x0, y0, x1 - x0, y1 - y0))
    pieces = np.zeros_like(whole)
    xs = [x0, x0 + 7, (x0 + x1) // 2 + 1, x0 + 1030, x1]  # odd cuts, one across the 1024-column chunks
    ys = [y0, y0 + 97, (y0 + y1) // 2, y1]
    for ya, yb in zip(ys[:-1], ys[1:], strict=True):
        for xa, xb in zip(sorted(xs)[:-1], sorted(xs)[1:], strict=True):
            if xb > xa:
                pieces[ya - y0 : yb - y0, xa - x0 : xb - x0] = synth.render_region(spec, xa, ya, xb - xa, yb - ya)
    assert np.array_equal(whole, pieces)
    other = synth.render_region(synth.make_slide(SmallContext(size=SIZE, seed=4), "near"), x0, y0, x1 - x0, y1 - y0)
    assert not np.array_equal(whole, other)


def test_default_layout_against_the_receptive_field() -> None:
    """Default sizes: a far gap exceeds the whole receptive field of the trunk's last layer at 2 µm/px (no
    single feature sees both), a near gap is under half of it (a feature between them sees into both)."""
    stride, first, last = footprint(trunk_geometry(ResNetTrunk()))
    field_um = (last - first + 1) * 2.0
    assert (stride, last - first + 1) == (48, 1345)
    params = synth.SynthParams(task="context", seed=2)
    assert params.size == synth.DEFAULT_SIZE["context"]
    assert params.context_far_um[0] > field_um and params.context_near_um[1] < field_um / 2
    for label, (lo, hi) in (("near", params.context_near_um), ("far", params.context_far_um)):
        spec = synth.make_slide(params, label)
        a, b = synth.lesion_mask(spec), synth.follicle_mask(spec)
        assert lo <= _gap_um(a, b) <= hi
        to_glass = ndimage.distance_transform_edt(np.pad(synth.tissue_mask(spec), 1))[1:-1, 1:-1] * PIXEL_UM
        assert to_glass[a | b].min() >= params.context_margin_um


def test_bad_context_parameters_raise_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="context_near_um must start at >= 740 µm"):
        synth.make_slide(synth.SynthParams(task="context", context_near_um=(600.0, 1200.0)), "near")
    with pytest.raises(ConfigError, match="must lie beyond context_near_um"):
        synth.make_slide(synth.SynthParams(task="context", context_far_um=(1000.0, 3000.0)), "far")
    with pytest.raises(ConfigError, match="unknown class 'solid' of the context task; choose from near, far"):
        synth.make_slide(synth.SynthParams(task="context"), "solid")
    with pytest.raises(ConfigError, match="task must be one of morphology, context, not 'spatial'"):
        synth.SynthParams(task="spatial").validate()
    with pytest.raises(ConfigError, match="slide 8192x8192 px is too small for the context layout"):
        synth.make_slide(synth.SynthParams(task="context", size=(8192, 8192)), "far")
    with pytest.raises(ConfigError, match=r"the context task has two classes \(near, far\), not 3"):
        synth.synthesize_cohort(tmp_path / "c", classes=3, params=synth.SynthParams(task="context"), progress=False)
    assert not (tmp_path / "c").exists()


def test_cli_reports_context_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "c"), "--task", "context", "--classes", "3"]) == 2
    assert capsys.readouterr().err == "error: the context task has two classes (near, far), not 3\n"
    assert main(["synth", "--out", str(tmp_path / "c"), "--task", "context", "--slides-per-class", "3",
                 "--size", "8000x4000", "--seed", "1"]) == 2
    assert "too small for the context layout" in capsys.readouterr().err
