"""prepare: real slides → cached 5x tissue images; skipping, reporting, idempotence, invalidation."""

import json
import os

import numpy as np
import pytest

from wsilocal.cli import main
from wsilocal.errors import WsilocalError
from wsilocal.prepare.cache import PrepareSettings, channel_stats, load_entry, prepare_cohort
from wsilocal.slide.cohort import load_cohort
from wsilocal.slide.reader import open_slide, read_region_at_mpp
from wsilocal.slide.tissue import detect_tissue, image_tissue_mask


@pytest.fixture
def cohort_dir(tmp_path, make_slide, he_image):
    """Four good slides (tissue boxes at known places) and one corrupt one, in a cohort CSV."""
    rows = []
    for i, (label, split) in enumerate([("a", "train"), ("b", "train"), ("a", "val"), ("b", "test")]):
        image = he_image(1600, 1200, [(200 + 40 * i, 240, 800, 560)], seed=i)
        make_slide(image, f"s{i}.svs")
        rows.append(f"s{i},s{i}.svs,{label},{split},case{i}")
    data = (tmp_path / "s0.svs").read_bytes()
    (tmp_path / "broken.svs").write_bytes(data[: len(data) // 2])
    rows.append("broken,broken.svs,a,train,case9")
    (tmp_path / "cohort.csv").write_text("slide_id,path,label,split,case_id\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_prepare_caches_tissue_at_target_mpp_and_reports_the_bad_slide(cohort_dir):
    cohort = load_cohort(cohort_dir / "cohort.csv")
    cache = cohort_dir / "cache"
    result, stats = prepare_cohort(cohort, cache, PrepareSettings(mpp=1.0), progress=False)
    assert sorted(result.built) == ["s0", "s1", "s2", "s3"]
    assert list(result.skipped) == ["broken"]
    assert str(cohort_dir / "broken.svs") in result.skipped["broken"]
    assert "truncated or corrupt" in result.skipped["broken"]

    entry = result.entries["s1"]
    x, y, w, h = entry.bbox
    # The tissue box (240..1000 px wide at level 0) is inside the cached box, which is not much larger.
    assert x <= 240 and y <= 240 and x + w >= 1040 and y + h >= 800
    # Margin: one 16 µm/px overview pixel (64 px) per side plus 5 % of the box.
    assert w <= 800 + 2 * 64 + 0.15 * 800 and h <= 560 + 2 * 64 + 0.15 * 560
    image = entry.image()
    assert image.shape == (round(h * 0.25), round(w * 0.25), 3)
    with open_slide(cohort_dir / "s1.svs") as slide:
        expected = read_region_at_mpp(slide, 1.0, region=tuple(entry.bbox))
    np.testing.assert_array_equal(image, expected)

    # Training-split statistics equal a direct computation over the cached training images.
    train_pixels = np.concatenate([result.entries[s].image().reshape(-1, 3) / 255.0 for s in ("s0", "s1")])
    np.testing.assert_allclose(stats["mean"], train_pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], train_pixels.std(0), rtol=1e-4)
    assert json.loads((cache / "stats.json").read_text())["mean"] == stats["mean"]
    assert not [p for p in os.listdir(cache) if ".tmp" in p]  # nothing half-written


def test_second_run_does_no_work_and_changes_invalidate(cohort_dir):
    cohort = load_cohort(cohort_dir / "cohort.csv")
    cache = cohort_dir / "cache"
    settings = PrepareSettings(mpp=1.0)
    prepare_cohort(cohort, cache, settings, progress=False)
    again, _ = prepare_cohort(cohort, cache, settings, progress=False)
    assert again.built == [] and sorted(again.reused) == ["s0", "s1", "s2", "s3"]

    changed, _ = prepare_cohort(cohort, cache, PrepareSettings(mpp=2.0), progress=False)
    assert sorted(changed.built) == ["s0", "s1", "s2", "s3"]  # new parameters → rebuilt
    assert changed.entries["s0"].image().shape[0] == round(changed.entries["s0"].bbox[3] * 0.125)

    stat = (cohort_dir / "s2.svs").stat()
    os.utime(cohort_dir / "s2.svs", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    touched, _ = prepare_cohort(cohort, cache, PrepareSettings(mpp=2.0), progress=False)
    assert touched.built == ["s2"]


def test_incomplete_entry_is_not_trusted(cohort_dir):
    cohort = load_cohort(cohort_dir / "cohort.csv")
    cache = cohort_dir / "cache"
    prepare_cohort(cohort, cache, PrepareSettings(mpp=2.0), progress=False)
    (cache / "s0.npy").unlink()
    assert load_entry(cache, "s0") is None
    result, _ = prepare_cohort(cohort, cache, PrepareSettings(mpp=2.0), progress=False)
    assert "s0" in result.built


def test_pixel_limit_refuses_with_clear_reason(cohort_dir):
    cohort = load_cohort(cohort_dir / "cohort.csv")
    result, _ = prepare_cohort(cohort, cohort_dir / "cache", PrepareSettings(mpp=1.0, max_pixels=1000),
                               progress=False)
    assert not result.entries
    assert "above the limit of 1,000 px" in result.skipped["s0"]


def test_channel_stats_needs_pixels():
    with pytest.raises(ValueError, match="no pixels"):
        channel_stats([])


def test_prepare_cli_prints_summary_and_skip(cohort_dir, capsys):
    code = main(["prepare", str(cohort_dir / "cohort.csv"), "--mpp", "2.0"])
    out = capsys.readouterr().out
    assert code == 1  # a slide was skipped
    assert "built 4, reused 0, skipped 1" in out
    assert "skipped broken:" in out and "broken.svs" in out
    assert "train mean" in out


def test_prepare_cli_bad_csv_is_one_line(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("slide_id,label\nx,y\n")
    assert main(["prepare", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "missing column(s) path, split" in err


def test_entries_hold_their_images_tissue_mask_and_older_entries_are_rebuilt(cohort_dir):
    cohort = load_cohort(cohort_dir / "cohort.csv")
    cache = cohort_dir / "cache"
    result, _ = prepare_cohort(cohort, cache, PrepareSettings(mpp=1.0), progress=False)
    entry = result.entries["s1"]
    tissue = entry.tissue()
    with open_slide(cohort_dir / "s1.svs") as slide:
        region = detect_tissue(slide)
        expected = image_tissue_mask(region, slide.level_dimensions[0], (entry.width, entry.height))
    np.testing.assert_array_equal(tissue.pixels(), expected.pixels())
    pixels = tissue.pixels()
    assert pixels.shape == (entry.height, entry.width) and pixels.any() and not pixels.all()
    # The tissue rectangle (level-0 x 240..1040, y 240..800) is tissue; the box's top row, an overview pixel and
    # the margin above it, is glass.
    x, y = entry.bbox[:2]
    assert y <= 240 - 64 and pixels[round((520 - y) / 4), round((640 - x) / 4)]
    assert not pixels[0, round((640 - x) / 4)]

    # An entry of the previous cache version (no mask file, no field) is stale and built again.
    meta = json.loads((cache / "s1.json").read_text())
    del meta["tissue_path"]
    (cache / "s1.json").write_text(json.dumps(meta))
    (cache / "s1.tissue.npz").unlink()
    again, _ = prepare_cohort(cohort, cache, PrepareSettings(mpp=1.0), progress=False)
    assert again.built == ["s1"] and again.entries["s1"].tissue().pixels().sum() == pixels.sum()
    # A damaged mask file is a one-line error naming it.
    (cache / "s1.tissue.npz").write_bytes(b"not a mask")
    with pytest.raises(WsilocalError, match=r"s1\.tissue\.npz: unreadable tissue mask of cached slide s1"):
        again.entries["s1"].tissue()
