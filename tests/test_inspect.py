"""wsilocal.slide.inspect: reports and thumbnails of real slide files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsilocal.errors import SlideError, WsilocalError
from wsilocal.slide.inspect import format_report, inspect_slide
from wsilocal.slide.reader import open_slide
from wsilocal.slide.tissue import detect_tissue

BLOB = (1500, 1000, 1200, 800)  # tissue of a 4000 x 3000 px slide, level-0 px


def test_report_of_a_known_slide(make_slide, he_image, tmp_path):
    path = make_slide(he_image(4000, 3000, [BLOB]), mpp=0.25, app_mag=40)
    thumbnail = tmp_path / "out" / "thumb.png"
    report = inspect_slide(path, thumbnail=thumbnail)
    with open_slide(path) as slide:
        tissue = detect_tissue(slide)
    assert report.path == path
    assert (report.backend, report.vendor) == ("openslide", "aperio")
    assert report.levels == [(4000, 3000, 1.0, 0.25), (1000, 750, 4.0, 1.0)]
    assert report.mpp == pytest.approx(0.25) and report.objective_power == 40
    assert report.tissue_bbox == tissue.bbox
    assert report.tissue_fraction == pytest.approx(tissue.tissue_fraction)
    x, y, w, h = report.tissue_bbox
    assert x <= 1500 and y <= 1000 and x + w >= 2700 and y + h >= 1800
    assert report.size_at_training_mpp == (round(w * 0.25 / 2.0), round(h * 0.25 / 2.0))

    text = format_report(report)
    lines = text.splitlines()
    assert lines[0] == f"slide         {path}"
    assert lines[1] == "reader        openslide (format aperio)"
    assert lines[2] == "resolution    0.25 µm/px, objective 40x"
    assert lines[3] == "levels        0: 4000 x 3000 px, downsample 1, 0.25 µm/px"
    assert lines[4] == "              1: 1000 x 750 px, downsample 4, 1 µm/px"
    assert lines[5] == (f"tissue        {100 * report.tissue_fraction:.1f} % of the slide; "
                        f"box at ({x}, {y}), {w} x {h} px (level 0)")
    assert lines[6] == "at 2 µm/px    tissue box is {} x {} px".format(*report.size_at_training_mpp)


def test_thumbnail_shows_the_overview_with_box_and_outline(make_slide, he_image, tmp_path):
    path = make_slide(he_image(4000, 3000, [BLOB]))
    thumbnail = tmp_path / "thumb.png"
    report = inspect_slide(path, thumbnail=thumbnail)
    with Image.open(thumbnail) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (round(4000 / 64), round(3000 / 64))  # the 16 µm/px overview, landscape
        pixels = np.asarray(image)
    x, y, w, h = (round(v / 64) for v in report.tissue_bbox)
    assert tuple(pixels[y + h // 2, x]) == (0, 160, 0)  # left edge of the tissue box
    assert tuple(pixels[y, x + w // 2]) == (0, 160, 0)  # top edge
    outline = np.all(pixels == (0, 60, 255), axis=-1)
    rows, cols = np.nonzero(outline)  # the mask outline runs along the blob's edge
    assert abs(cols.min() - 1500 / 64) <= 1.5 and abs(cols.max() - 2700 / 64) <= 1.5
    assert abs(rows.min() - 1000 / 64) <= 1.5 and abs(rows.max() - 1800 / 64) <= 1.5
    assert np.all(np.abs(pixels[2, 2].astype(int) - (242, 240, 243)) <= 4)  # glass left as it is


def test_slide_without_mpp_is_inspected_with_mpp_unknown(make_slide, he_image, tmp_path):
    path = make_slide(he_image(4000, 3000, [BLOB]), mpp=None, layout="generic")
    report = inspect_slide(path, thumbnail=tmp_path / "t.png")
    assert report.mpp is None and report.vendor == "generic-tiff"
    assert report.levels == [(4000, 3000, 1.0, None), (1000, 750, 4.0, None)]
    assert report.tissue_bbox is not None and report.size_at_training_mpp is None
    text = format_report(report)
    assert "resolution    unknown (pass --assume-mpp to set it), objective unknown" in text
    assert "at 2 µm/px" not in text
    assumed = inspect_slide(path, assume_mpp=0.5)
    assert assumed.mpp == 0.5 and assumed.levels[1] == (1000, 750, 4.0, 2.0)
    w, h = assumed.tissue_bbox[2:]
    assert assumed.size_at_training_mpp == (round(w / 4), round(h / 4))


def test_slide_without_tissue_is_reported_not_raised(make_slide, he_image, tmp_path):
    report = inspect_slide(make_slide(he_image(4000, 3000)), thumbnail=tmp_path / "t.png")
    assert report.tissue_bbox is None and report.size_at_training_mpp is None
    assert report.tissue_fraction == 0.0
    assert format_report(report).splitlines()[-1] == "tissue        none found"
    assert Image.open(tmp_path / "t.png").size == (62, 47)


def test_unreadable_slide_and_unwritable_thumbnail(make_slide, he_image, tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        inspect_slide(tmp_path / "missing.svs")
    path = make_slide(he_image(4000, 3000, [BLOB]))
    (tmp_path / "taken").mkdir()
    with pytest.raises(WsilocalError) as error:
        inspect_slide(path, thumbnail=tmp_path / "taken")  # a directory is in the way
    assert str(error.value).startswith(f"{tmp_path / 'taken'}: cannot write the thumbnail (")
