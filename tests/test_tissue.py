"""wsilocal.slide.tissue: the H&E tissue detector and tissue boxes on real slide files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wsilocal.errors import SlideError
from wsilocal.slide.reader import open_slide
from wsilocal.slide.tissue import TissueRegion, detect_tissue, otsu_threshold, tissue_mask_from_rgb


def box_mask(shape, boxes):
    mask = np.zeros(shape, bool)
    for x, y, w, h in boxes:
        mask[y : y + h, x : x + w] = True
    return mask


# --- the detector on arrays ---------------------------------------------------------------


def test_otsu_threshold_maximises_between_class_variance():
    rng = np.random.default_rng(0)
    values = np.clip(np.concatenate([rng.normal(0.05, 0.02, 3000), rng.normal(0.4, 0.08, 1000)]), 0, 1)
    threshold = otsu_threshold(values)
    # Brute force over the same 256 bin edges: weight_low * weight_high * (mean_high - mean_low)^2.
    centres = (np.floor(values * 256).clip(0, 255) + 0.5) / 256  # the histogram's view of each value

    def between(cut):
        low, high = centres[centres < cut], centres[centres >= cut]
        if not len(low) or not len(high):
            return 0.0
        return len(low) * len(high) * (high.mean() - low.mean()) ** 2

    edges = np.arange(1, 256) / 256
    assert threshold == pytest.approx(edges[np.argmax([between(c) for c in edges])])
    assert 0.1 < threshold < 0.3


def test_mask_covers_a_stained_blob_and_nothing_else(he_image):
    blob = (100, 80, 150, 120)
    mask = tissue_mask_from_rgb(he_image(400, 300, [blob]))
    expected = box_mask((300, 400), [blob])
    assert mask.dtype == bool and mask.shape == (300, 400)
    assert (mask & expected).sum() / (mask | expected).sum() > 0.97  # intersection over union


@pytest.mark.parametrize("name", ["white", "noisy glass", "black", "glass with black padding", "grey"])
def test_blank_images_give_an_empty_mask(he_image, name):
    image = {
        "white": np.full((200, 300, 3), 255, np.uint8),
        "noisy glass": he_image(300, 200),
        "black": np.zeros((200, 300, 3), np.uint8),
        "grey": np.full((200, 300, 3), 128, np.uint8),
    }.get(name)
    if name == "glass with black padding":
        image = he_image(300, 200)
        image[:, 220:] = 0  # the scanner pads the slide's edge with black
        image[:, 218:220] = (60, 20, 40)  # a thin, dark, coloured JPEG fringe where glass meets padding
    assert not tissue_mask_from_rgb(image).any()


def test_holes_are_filled_and_specks_removed(he_image):
    image = he_image(400, 300, [(100, 80, 150, 120), (350, 30, 3, 3)])  # the 3x3 box is dust
    image[120:150, 150:190] = (242, 240, 243)  # a lumen inside the tissue: glass-coloured
    mask = tissue_mask_from_rgb(image, min_object_fraction=0.001)  # 120 px minimum here
    np.testing.assert_array_equal(mask[120:150, 150:190], True)
    np.testing.assert_array_equal(mask[20:45, 340:365], False)


def test_tissue_touching_the_image_border_is_kept(he_image):
    mask = tissue_mask_from_rgb(he_image(200, 150, [(0, 0, 60, 50)]))
    expected = box_mask((150, 200), [(0, 0, 60, 50)])
    # Exact but for the corners, which the opening with a disk rounds off (a few pixels each).
    assert (mask != expected).sum() <= 16 and not (mask & ~expected).any()
    assert mask[0, 3:57].all() and mask[3:47, 0].all()  # not eroded along the image border


def test_tinted_background_is_not_tissue(he_image):
    image = he_image(300, 200, [(50, 40, 100, 80)])
    glass = ~box_mask((200, 300), [(50, 40, 100, 80)])
    image[glass] = (236, 226, 233)  # slightly pink glass: saturation 0.04
    mask = tissue_mask_from_rgb(image)
    assert not (mask & glass).any()
    assert (~mask & ~glass).sum() <= 16  # the four rounded corners


# --- tissue boxes on slides ---------------------------------------------------------------

BLOB = (1500, 1000, 1200, 800)  # x, y, w, h in level-0 px of a 4000 x 3000 slide


def assert_box_fits(bbox, blob, downsample, margin=0.05):
    """bbox contains the blob and exceeds it by at most the margin plus two mask pixels a side."""
    x, y, w, h = bbox
    bx, by, bw, bh = blob
    assert x <= bx and y <= by and x + w >= bx + bw and y + h >= by + bh, (bbox, blob)
    slack_x, slack_y = margin * bw * 1.1 + 2 * downsample, margin * bh * 1.1 + 2 * downsample
    assert bx - x <= slack_x and (x + w) - (bx + bw) <= slack_x, (bbox, blob)
    assert by - y <= slack_y and (y + h) - (by + bh) <= slack_y, (bbox, blob)


def test_detect_tissue_box_contains_the_blob_and_is_not_much_larger(make_slide, he_image):
    with open_slide(make_slide(he_image(4000, 3000, [BLOB]))) as slide:
        region = detect_tissue(slide)
    assert isinstance(region, TissueRegion)
    assert region.downsample == pytest.approx(64, rel=0.01)  # 16 µm/px over 0.25 µm/px
    assert region.mask.shape == (round(3000 / 64), round(4000 / 64))
    assert_box_fits(region.bbox, BLOB, region.downsample)
    assert region.tissue_fraction == pytest.approx(region.mask.mean())
    assert region.tissue_fraction == pytest.approx(1200 * 800 / (4000 * 3000), abs=0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        region.bbox = (0, 0, 1, 1)


def test_detect_tissue_box_spans_separate_pieces_and_honours_the_margin(make_slide, he_image):
    pieces = [(900, 700, 500, 400), (2400, 1700, 600, 500)]
    with open_slide(make_slide(he_image(4000, 3000, pieces, seed=1))) as slide:
        tight = detect_tissue(slide, margin=0.0)
        wide = detect_tissue(slide, margin=0.1)
    assert_box_fits(tight.bbox, (900, 700, 2100, 1500), tight.downsample, margin=0.0)
    assert_box_fits(wide.bbox, (900, 700, 2100, 1500), wide.downsample, margin=0.1)
    x, y, w, h = tight.bbox  # 10 % of the box's width / height added on each side
    assert np.abs(np.subtract(wide.bbox, (x - 0.1 * w, y - 0.1 * h, 1.2 * w, 1.2 * h))).max() <= 2


def test_box_is_clipped_to_the_slide(make_slide, he_image):
    corner = (3400, 2500, 600, 500)  # tissue up to the bottom-right corner
    with open_slide(make_slide(he_image(4000, 3000, [corner], seed=2))) as slide:
        x, y, w, h = detect_tissue(slide, margin=0.5).bbox
    assert (x + w, y + h) == (4000, 3000)
    assert x <= 3400 - 250 and y <= 2500 - 200


def test_slide_without_mpp_gives_the_same_box(make_slide, he_image):
    image = he_image(4000, 3000, [BLOB], seed=3)
    without_path = make_slide(image, mpp=None, layout="generic")
    with open_slide(make_slide(image)) as with_mpp, open_slide(without_path) as without:
        assert without.mpp_or_none is None
        a, b = detect_tissue(with_mpp), detect_tissue(without)
    assert b.downsample == pytest.approx(64, rel=0.01)  # as if scanned at 0.25 µm/px
    assert_box_fits(b.bbox, BLOB, b.downsample)
    assert np.abs(np.subtract(a.bbox, b.bbox)).max() <= 2 * a.downsample


def test_blank_slide_has_no_tissue(make_slide, he_image):
    path = make_slide(he_image(4000, 3000, seed=4))
    with open_slide(path) as slide, pytest.raises(SlideError) as error:
        detect_tissue(slide)
    assert str(error.value) == (f"{path}: no tissue found (nothing coloured like stained tissue on the "
                                "62x47 px overview)")
