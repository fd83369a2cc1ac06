"""Synthetic cohorts: real slide files, exact determinism, cohort bookkeeping, lesion geometry, a class
signal carried by the arrangement of nuclei rather than by colour, and bounded memory when writing."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage

from wsilocal import synth
from wsilocal.errors import ConfigError
from wsilocal.slide.tiff_writer import write_pyramidal_tiff

CLASSES = ["glandular", "solid", "papillary"]


@pytest.fixture(scope="module")
def cohort(module_tmp) -> Path:
    out = module_tmp("cohort")
    # Long sides >= 2160 px after ±10 % jitter, so every slide has a reduced level.
    csv_path = synth.synthesize_cohort(out, classes=3, slides_per_class=4, size=(2400, 1200), seed=3,
                                       size_jitter=0.1, progress=False)
    assert csv_path == out / "cohort.csv"
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "cohort.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_slides_open_in_openslide_as_aperio_with_mpp(cohort: Path) -> None:
    meta = json.loads((cohort / "synth.json").read_text())
    for row in _rows(cohort):
        with openslide.OpenSlide(cohort / row["path"]) as slide:
            assert slide.properties["openslide.vendor"] == "aperio"
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
            assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25)
            assert slide.properties["openslide.objective-power"] == "40"
            assert slide.level_count > 1
            assert list(slide.dimensions) == meta["slides"][row["slide_id"]]["size"]


def test_cohort_csv_cases_and_splits(cohort: Path) -> None:
    with open(cohort / "cohort.csv", newline="") as f:
        assert next(csv.reader(f)) == ["slide_id", "path", "label", "split", "case_id"]
    rows = _rows(cohort)
    assert len(rows) == 12 and len({r["slide_id"] for r in rows}) == 12
    assert {r["label"] for r in rows} == set(CLASSES)
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == set(CLASSES)
    by_case: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_case.setdefault(r["case_id"], []).append(r)
        assert not Path(r["path"]).is_absolute() and (cohort / r["path"]).is_file()
    assert all(len({r["split"] for r in case}) == 1 for case in by_case.values())  # no case in two splits
    assert all(len({r["label"] for r in case}) == 1 for case in by_case.values())
    assert sorted(len(case) for case in by_case.values()).count(2) == 3  # one two-slide case per class
    meta = json.loads((cohort / "synth.json").read_text())["slides"]
    sizes = {tuple(meta[r["slide_id"]]["size"]) for r in rows}
    assert len(sizes) == 4 and all(2160 <= w <= 2640 and 1080 <= h <= 1320 for w, h in sizes)  # jittered
    # Matched classes: within each split every class holds the same slide sizes and staining runs, so neither
    # tells the classes apart.
    for split in ("train", "val", "test"):
        per_class = [sorted((tuple(meta[r["slide_id"]]["size"]), meta[r["slide_id"]]["stain_seed"])
                            for r in rows if r["split"] == split and r["label"] == label) for label in CLASSES]
        assert per_class[0] and all(other == per_class[0] for other in per_class[1:])


def test_synth_json_masks_and_lesion_fraction(cohort: Path) -> None:
    meta = json.loads((cohort / "synth.json").read_text())
    assert meta["version"] == synth.GENERATOR_VERSION and meta["params"]["classes"] == 3
    lo, hi = meta["params"]["lesion_fraction"]
    ds = meta["mask_downsample"]
    for row in _rows(cohort):
        info = meta["slides"][row["slide_id"]]
        assert info["label"] == row["label"] and info["split"] == row["split"]
        mask = np.asarray(Image.open(cohort / info["mask"]))
        width, height = info["size"]
        assert mask.shape == (-(-height // ds), -(-width // ds))
        assert set(np.unique(mask)) <= {0, 128, 255}
        lesion, tissue = mask == 255, mask >= 128
        fraction = lesion.sum() / tissue.sum()
        assert fraction == pytest.approx(info["lesion_fraction"], abs=1e-4)
        assert lo - 1 / tissue.sum() <= fraction <= hi + 1 / tissue.sum()
        # Boxes are exactly those of the mask's connected lesion regions, in level-0 px.
        labels, n = ndimage.label(lesion)
        assert len(info["lesion_bboxes"]) == n >= 1
        for (x0, y0, x1, y1), sl in zip(info["lesion_bboxes"], ndimage.find_objects(labels), strict=True):
            assert (x0, y0) == (sl[1].start * ds, sl[0].start * ds)
            assert (x1, y1) == (min(sl[1].stop * ds, width), min(sl[0].stop * ds, height))


def test_masks_match_the_slide_image(cohort: Path) -> None:
    """The lesion lies on tissue in the written slide (read by OpenSlide), glass on empty glass. (A gland's
    lumen is pale but belongs to the lesion: tissue is what stains, holes enclosed by it included.)"""
    meta = json.loads((cohort / "synth.json").read_text())
    ds = meta["mask_downsample"]
    for row in _rows(cohort):
        mask = np.asarray(Image.open(cohort / meta["slides"][row["slide_id"]]["mask"]))
        with openslide.OpenSlide(cohort / row["path"]) as slide:
            level = min(1, slide.level_count - 1)  # a small slide may have no level 1
            factor = round(slide.level_downsamples[level])
            image = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
        cell = ds // factor  # px of that level per mask pixel
        h, w = mask.shape
        padded = np.pad(image, ((0, h * cell - image.shape[0]), (0, w * cell - image.shape[1]), (0, 0)), mode="edge")
        od = -np.log(np.maximum(padded, 1) / 255.0).sum(axis=2)
        cell_od = od.reshape(h, cell, w, cell).mean(axis=(1, 3))
        glass = np.median(cell_od[mask == 0])  # this slide's empty glass
        tissue = ndimage.binary_fill_holes(cell_od > glass + 0.08)
        assert tissue[mask == 255].mean() > 0.99
        away_from_tissue = ndimage.binary_erosion(mask == 0, border_value=1)  # cells wholly on glass
        assert (cell_od[away_from_tissue] < glass + 0.08).mean() > 0.99


def test_same_seed_same_pixels_and_strip_cuts_do_not_matter() -> None:
    params = synth.SynthParams(size=(2100, 1200), seed=11, lesion_fraction=(0.3, 0.3))
    for label in synth.CLASS_NAMES:
        spec = synth.make_slide(params, label)
        whole = synth.render_region(spec, 0, 0, 2100, 1200)
        again = synth.render_region(synth.make_slide(params, label), 0, 0, 2100, 1200)
        assert np.array_equal(whole, again)
        pieces = np.zeros_like(whole)
        # Cuts at odd offsets, through nuclei and shapes, and across the internal 1024-column chunks.
        ys, xs = [0, 97, 300, 301, 777, 1200], [0, 5, 1000, 2047, 2100]
        for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
            for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
                pieces[y0:y1, x0:x1] = synth.render_region(spec, x0, y0, x1 - x0, y1 - y0)
        assert np.array_equal(whole, pieces), label
    other = synth.render_region(synth.make_slide(synth.SynthParams(size=(2100, 1200), seed=12), label),
                                0, 0, 2100, 1200)
    assert not np.array_equal(whole[..., 0], other[..., 0])


def test_written_slide_is_reproducible(tmp_path: Path) -> None:
    params = synth.SynthParams(size=(1500, 1100), seed=5)
    images = []
    for name in ("a.svs", "b.svs"):
        synth.write_slide(synth.make_slide(params, "cribriform"), tmp_path / name)
        with openslide.OpenSlide(tmp_path / name) as slide:
            images.append(np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")))
    assert np.array_equal(images[0], images[1])
    expected = synth.render_region(synth.make_slide(params, "cribriform"), 0, 0, 1500, 1100)
    assert np.abs(images[0].astype(int) - expected).mean() < 3  # JPEG q90 of the same pixels


def test_parallel_workers_write_the_same_cohort(tmp_path: Path) -> None:
    args = {"classes": 2, "slides_per_class": 2, "size": (800, 700), "seed": 9, "splits": (1, 0, 0),
            "progress": False}
    synth.synthesize_cohort(tmp_path / "serial", workers=1, **args)
    synth.synthesize_cohort(tmp_path / "pool", workers=2, **args)
    assert (tmp_path / "serial/cohort.csv").read_text() == (tmp_path / "pool/cohort.csv").read_text()
    for row in _rows(tmp_path / "serial"):
        images = []
        for run in ("serial", "pool"):
            with openslide.OpenSlide(tmp_path / run / row["path"]) as slide:
                images.append(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
        assert np.array_equal(images[0], images[1])


def _lesion_signature(spec: synth.SlideSpec) -> tuple[np.ndarray, dict[str, float]]:
    """Mean RGB of the lesion and spatial statistics of its level-0 pixels: the share of empty
    (lumen-like) pixels, the typical area of empty regions (µm²), nuclear blobs per mm² and the share of
    tissue floating in empty space (wholly surrounded by it)."""
    rows, cols = np.nonzero(synth.lesion_mask(spec))
    step = synth.FIELD_STEP
    x0, y0 = cols.min() * step, rows.min() * step
    x1, y1 = min((cols.max() + 1) * step, spec.size[0]), min((rows.max() + 1) * step, spec.size[1])
    image = synth.render_region(spec, x0, y0, x1 - x0, y1 - y0)
    mask = np.kron(synth.lesion_mask(spec), np.ones((step, step), bool))[y0:y1, x0:x1]
    od = -np.log(np.maximum(image, 1) / 255.0)
    # Colour deconvolution with the slide's own stain vectors: haematoxylin and eosin per pixel.
    conc = od @ np.linalg.pinv(spec.stain)
    smooth = ndimage.uniform_filter(conc, size=(9, 9, 1))  # over ~2 µm: lumens are empty, not speckled
    empty = (smooth[..., 0] < 0.1) & (smooth[..., 1] < 0.15) & mask
    labels, n = ndimage.label(empty)
    areas = np.asarray(ndimage.sum(empty, labels, range(1, n + 1))) * synth.MPP**2
    areas = areas[areas > 20]
    _, nuclei = ndimage.label((conc[..., 0] > 0.5) & mask)
    floating = ndimage.binary_fill_holes(empty) & ~empty  # tissue wholly surrounded by empty space...
    floating = ndimage.binary_opening(floating, iterations=12)  # ...big enough to be cells, not specks
    lesion_mm2 = mask.sum() * synth.MPP**2 / 1e6
    typical = float((areas**2).sum() / areas.sum()) if areas.size else 0.0  # area-weighted: fragments count little
    stats = {"empty": empty.sum() / mask.sum(), "lumen_um2": typical,
             "nuclei_mm2": nuclei / lesion_mm2, "floating": floating.sum() / mask.sum()}
    return image[mask].mean(axis=0), stats


def test_classes_differ_by_arrangement_not_colour() -> None:
    means, stats = {}, {}
    for label in synth.CLASS_NAMES:
        params = synth.SynthParams(size=(3072, 3072), seed=21, lesion_fraction=(0.3, 0.3), stain_variation=0)
        means[label], stats[label] = _lesion_signature(synth.make_slide(params, label))
    # Colour: under one staining the lesions' mean colours lie within 30 grey levels, about the spread that
    # stain variation alone gives between slides of one class (whole slides: see the next test).
    assert np.ptp(np.array(list(means.values())), axis=0).max() < 30
    # Arrangement: each class has its own spatial signature.
    assert stats["solid"]["empty"] < 0.001 and stats["papillary"]["empty"] < 0.01  # no lumens; the cyst holds fluid
    assert min(stats[k]["empty"] for k in ("glandular", "cribriform", "micropapillary")) > 0.05
    sparser = [stats[k] for k in ("glandular", "papillary", "micropapillary")]  # cribriform: a punched sheet
    assert all(stats["solid"]["nuclei_mm2"] > 1.15 * s["nuclei_mm2"] for s in sparser)
    assert stats["glandular"]["lumen_um2"] > 2 * stats["cribriform"]["lumen_um2"]  # big lumens vs small holes
    assert stats["micropapillary"]["floating"] > 0.03  # cell clusters floating in clefts...
    assert max(s["floating"] for k, s in stats.items() if k != "micropapillary") < 0.01  # ...and only there
    for a in synth.CLASS_NAMES:
        for b in synth.CLASS_NAMES:
            if a < b:
                ratios = [(stats[a][k] + 1e-3) / (stats[b][k] + 1e-3) for k in stats[a]]
                assert max(max(r, 1 / r) for r in ratios) > 1.4, (a, b)


def test_stain_varies_more_between_slides_than_colour_between_classes() -> None:
    """Whole-tissue mean colour: five classes (same tissue, same stain) vs one slide under six stains."""
    params = synth.SynthParams(size=(1600, 1600), seed=4, lesion_fraction=(0.15, 0.15))

    def tissue_mean(spec: synth.SlideSpec) -> np.ndarray:
        image = synth.render_region(spec, 0, 0, *spec.size)
        tissue = np.kron(synth.tissue_mask(spec), np.ones((synth.FIELD_STEP,) * 2, bool))
        return image[tissue[: image.shape[0], : image.shape[1]]].mean(axis=0)

    by_class = np.array([tissue_mean(synth.make_slide(params, label)) for label in synth.CLASS_NAMES])
    by_stain = np.array([tissue_mean(synth.make_slide(params, "glandular", stain_seed=s)) for s in range(6)])
    assert np.ptp(by_class, axis=0).max() < 0.5 * np.ptp(by_stain, axis=0).max()


def test_writing_a_large_slide_keeps_memory_bounded(tmp_path: Path) -> None:
    """The slide streams through the writer: rendering holds one strip at a time, and the whole write
    peaks well below the full image (the writer's own reduction of level 1 is most of that peak)."""
    size = (12000, 6000)
    spec = synth.make_slide(synth.SynthParams(size=size, seed=2), "glandular")
    assert spec.textures  # built once per process and cached: not per-strip memory
    render_peaks: list[int] = []  # memory each strip's rendering added
    overall: list[int] = []  # peaks of the whole process, since the peak is reset per strip

    def source(x: int, y: int, w: int, h: int) -> np.ndarray:
        _, peak_so_far = tracemalloc.get_traced_memory()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        strip = synth.render_region(spec, x, y, w, h)
        render_peaks.append(tracemalloc.get_traced_memory()[1] - before)
        overall.append(max(peak_so_far, tracemalloc.get_traced_memory()[1]))
        return strip

    tracemalloc.start()
    try:
        write_pyramidal_tiff(tmp_path / "large.svs", source, size, mpp=synth.MPP, app_mag=synth.APP_MAG)
        peak = max(tracemalloc.get_traced_memory()[1], *overall)
    finally:
        tracemalloc.stop()
    full_image = size[0] * size[1] * 3
    strip = size[0] * 256 * 3
    assert len(render_peaks) == -(-size[1] // 256)
    # One strip of output plus chunk temporaries of a fixed size (chunks are at most 256 x 1024 px).
    assert max(render_peaks) < strip + 20e6, f"rendering one strip took {max(render_peaks) / 1e6:.0f} MB"
    assert peak < 0.4 * full_image, f"peak {peak / 1e6:.0f} MB for a {full_image / 1e6:.0f} MB image"
    with openslide.OpenSlide(tmp_path / "large.svs") as slide:
        assert slide.dimensions == size and slide.level_count == 3


def test_bad_parameters_raise_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="classes must be 2..5, not 6"):
        synth.synthesize_cohort(tmp_path, classes=6, progress=False)
    with pytest.raises(ConfigError, match="2 cases per class cannot fill 3 splits"):
        synth.synthesize_cohort(tmp_path, slides_per_class=2, size=(600, 600), progress=False)
    with pytest.raises(ConfigError, match="unknown class 'tubular'"):
        synth.make_slide(synth.SynthParams(), "tubular")
    with pytest.raises(ConfigError, match="lesion_fraction"):
        synth.make_slide(synth.SynthParams(lesion_fraction=(0.4, 0.2)), "solid")
    with pytest.raises(ValueError, match="not inside the 1000x800 slide"):
        synth.render_region(synth.make_slide(synth.SynthParams(size=(1000, 800)), "solid"), 900, 0, 200, 10)


def test_slide_measurements_are_the_slides_own_sizes_and_mask_areas(cohort: Path) -> None:
    meta = json.loads((cohort / "synth.json").read_text())
    measured = synth.slide_measurements(cohort)
    assert measured.keys() == meta["slides"].keys()
    for slide_id, info in meta["slides"].items():
        with openslide.OpenSlide(cohort / "slides" / f"{slide_id}.svs") as slide:
            width, height = slide.dimensions
        mask = np.asarray(Image.open(cohort / info["mask"]))
        tissue_px = np.count_nonzero(mask) * info["mask_downsample"] ** 2  # every non-glass mask value is tissue
        got = measured[slide_id]
        assert got["slide area (mm²)"] == pytest.approx(width * height * 0.25**2 / 1e6, rel=1e-12)
        assert (got["slide width (mm)"], got["slide height (mm)"]) == pytest.approx((width / 4000, height / 4000))
        assert got["tissue area (mm²)"] == pytest.approx(tissue_px * 0.25**2 / 1e6, rel=1e-12)
        assert got["lesion fraction"] == info["lesion_fraction"]
