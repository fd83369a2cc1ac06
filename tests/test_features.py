"""Tile feature extraction: the tile grid, the features themselves, the HDF5 files, resume and bad slides."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import wsilocal.features.extract as extract_module
from wsilocal.cli import main
from wsilocal.errors import CheckpointError, WsilocalError
from wsilocal.features.extract import RANDOM_INIT_WARNING, extract_features
from wsilocal.features.h5 import read_features, write_features
from wsilocal.features.tiles import tile_grid, tile_size_level0
from wsilocal.models.resnet import ResNetTrunk, calibrate_batchnorm
from wsilocal.slide.cohort import CohortSlide
from wsilocal.slide.reader import open_slide, read_region_at_mpp
from wsilocal.slide.tissue import detect_tissue

# Slides at 1 µm/px; tiles of 64 px at 2 µm/px are 128 level-0 px and 8 pixels of the 16 µm/px mask.
SLIDE_MPP, MPP, TILE, TILE0 = 1.0, 2.0, 64, 128
TISSUE = (128, 160, 512, 384)  # x, y, w, h of the stained area, level-0 pixels; the right part is glass
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def slide_path(make_slide, he_image) -> Path:
    return make_slide(he_image(1024, 768, [TISSUE]), "tissue.svs", mpp=SLIDE_MPP)


@pytest.fixture
def slides(make_slide, he_image) -> list[CohortSlide]:
    """Three small slides with tissue in different places."""
    boxes = [TISSUE, (320, 64, 384, 320), (64, 320, 448, 256)]
    return [CohortSlide(f"s{i}", make_slide(he_image(1024, 768, [box], seed=i), f"s{i}.svs", mpp=SLIDE_MPP),
                        "a" if i % 2 else "b", "train", f"s{i}") for i, box in enumerate(boxes)]


@pytest.fixture(scope="module")
def weights_file(module_tmp) -> Path:
    """A torchvision-named ResNet34 state dict (with ``fc``) whose BatchNorms keep activations near 1."""
    torch.manual_seed(1)
    trunk = ResNetTrunk(conv1_stride=2)
    calibrate_batchnorm(trunk, [(torch.rand(4, 3, 64, 64) - MEAN) / STD])
    state = dict(trunk.state_dict(), **{"fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)})
    path = module_tmp("weights") / "resnet34.pth"
    torch.save(state, path)
    return path


def reference_features(trunk: ResNetTrunk, slide_file: Path, coords: np.ndarray) -> np.ndarray:
    """Each tile read on its own with the slide reader, through the trunk one at a time, averaged."""
    rows = []
    with open_slide(slide_file) as slide, torch.no_grad():
        for x, y in coords:
            pixels = read_region_at_mpp(slide, MPP, (int(x), int(y), TILE0, TILE0))
            image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float() / 255
            rows.append(trunk((image - MEAN) / STD).mean(dim=(2, 3))[0].numpy())
    return np.stack(rows)


def extract(slides, out, **kwargs):
    return extract_features(slides, out, mpp=MPP, tile=TILE, progress=False, **kwargs)


# --- tiles -----------------------------------------------------------------------------------


def _fraction(tissue, x: int, y: int) -> float:
    """Tissue share of the tile at (x, y), counted pixel by pixel: mask pixels whose centre is in the tile."""
    mask = tissue.mask
    scale_x, scale_y = 1024 / mask.shape[1], 768 / mask.shape[0]
    rows = [r for r in range(mask.shape[0]) if y <= (r + 0.5) * scale_y < y + TILE0]
    cols = [c for c in range(mask.shape[1]) if x <= (c + 0.5) * scale_x < x + TILE0]
    return float(mask[np.ix_(rows, cols)].mean())


@pytest.mark.parametrize("min_tissue", [0.25, 1.0])
def test_tile_grid_keeps_tissue_tiles_by_mask_fraction(slide_path, min_tissue):
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide)
        assert tile_size_level0(slide, MPP, TILE) == TILE0
        coords = tile_grid(slide, tissue, MPP, TILE, min_tissue=min_tissue)

    bx, by, bw, bh = tissue.bbox
    grid = [(x, y) for y in range(by, min(by + bh, 768 - TILE0 + 1), TILE0)
            for x in range(bx, min(bx + bw, 1024 - TILE0 + 1), TILE0)]
    assert coords == [(x, y) for x, y in grid if _fraction(tissue, x, y) >= min_tissue]

    tx, ty, tw, th = TISSUE
    within = [(x, y) for x, y in grid if tx <= x and x + TILE0 <= tx + tw and ty <= y and y + TILE0 <= ty + th]
    assert len(within) >= 6 and set(within) <= set(coords)  # tiles wholly on the stain are all kept
    for x, y in coords:  # and every kept tile overlaps the stain: none lies on the glass around it
        assert x < tx + tw and x + TILE0 > tx and y < ty + th and y + TILE0 > ty


# --- features --------------------------------------------------------------------------------


def test_features_are_resnet34_average_pooled_over_each_tile(slides, weights_file, tmp_path):
    result = extract(slides[:1], tmp_path / "out", weights=weights_file, batch_size=1)
    assert result.skipped == {} and result.warnings == []
    features, coords, attrs = read_features(result.written["s0"])
    assert features.dtype == np.float32 and features.shape == (result.n_tiles["s0"], 512)
    assert coords.dtype == np.int64 and len(coords) == 17
    with open_slide(slides[0].path) as slide:
        assert [tuple(c) for c in coords] == tile_grid(slide, detect_tissue(slide), MPP, TILE)
    assert (attrs["mpp"], attrs["tile"], attrs["tile_level0"], attrs["slide_mpp"], attrs["n_tiles"]) == (
        MPP, TILE, TILE0, SLIDE_MPP, 17)

    trunk = ResNetTrunk(conv1_stride=2)
    state = torch.load(weights_file, weights_only=True)
    trunk.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    expected = reference_features(trunk.eval(), slides[0].path, coords)
    assert np.abs(expected).mean() > 0.1  # features of a real size, so the tolerance below means something
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5)

    # Batches and reader threads: the same tiles, to float32 accuracy. Through 36 convolutions a batch of 4
    # and single tiles round differently (both differ from a float64 forward by up to ~1e-4 here).
    batched = extract(slides[:1], tmp_path / "batched", weights=weights_file, workers=2, batch_size=4)
    np.testing.assert_allclose(read_features(batched.written["s0"])[0], features, rtol=0, atol=5e-4)
    assert "sha256:" in attrs["extractor"] and attrs["weights"] == str(weights_file)


def test_weights_that_are_not_resnet34_are_refused(slides, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(CheckpointError, match="bad.pth: not a ResNet34 state dict: missing"):
        extract(slides[:1], tmp_path / "out", weights=bad)


# --- files -----------------------------------------------------------------------------------


def test_h5_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((7, 512)).astype(np.float32)
    coords = rng.integers(0, 10**6, (7, 2))
    write_features(tmp_path / "a.h5", features, coords, {"mpp": 2.0, "tile": 256, "source": "x.svs", "n": None})
    got_features, got_coords, attrs = read_features(tmp_path / "a.h5", dim=512)
    np.testing.assert_array_equal(got_features, features)
    np.testing.assert_array_equal(got_coords, coords)
    assert got_coords.dtype == np.int64
    assert attrs == {"mpp": 2.0, "tile": 256, "source": "x.svs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]
    with pytest.raises(ValueError, match=r"coords must be integer \(7, 2\)"):
        write_features(tmp_path / "b.h5", features, coords[:6], {})


def test_reads_a_clam_file_with_float16_and_a_batch_axis(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((1, 9, 512)).astype(np.float16)
    coords = rng.integers(0, 50_000, (1, 9, 2)).astype(np.int32)
    with h5py.File(tmp_path / "clam.h5", "w") as file:
        file.create_dataset("features", data=features)
        file.create_dataset("coords", data=coords)
    got_features, got_coords, attrs = read_features(tmp_path / "clam.h5")
    assert got_features.dtype == np.float32 and got_features.shape == (9, 512)
    np.testing.assert_array_equal(got_features, features[0].astype(np.float32))
    assert got_coords.dtype == np.int64
    np.testing.assert_array_equal(got_coords, coords[0])
    assert attrs == {}


def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as file:
        for name, data in datasets.items():
            file.create_dataset(name, data=data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _h5(p, features=np.zeros((3, 512), np.float32)), r"no 'coords' dataset \(found: features\)"),
    (lambda p: _h5(p, feats=np.zeros((3, 512)), coords=np.zeros((3, 2), int)), "no 'features' dataset"),
    (lambda p: _h5(p, features=np.zeros((3, 512)), coords=np.zeros((4, 2), int)),
     r"'coords' must have shape \(3, 2\) to match 'features' \(3, 512\), got \(4, 2\)"),
    (lambda p: _h5(p, features=np.zeros(512), coords=np.zeros((1, 2), int)), r"must have shape \(N, D\)"),
    (lambda p: _h5(p, features=np.zeros((0, 512)), coords=np.zeros((0, 2), int)), "with N >= 1"),
    (lambda p: _h5(p, features=np.full((2, 512), np.nan), coords=np.zeros((2, 2), int)), "NaN or infinite"),
    (lambda p: _h5(p, features=np.zeros((2, 512)), coords=np.full((2, 2), 0.5)), "whole pixel positions"),
    (lambda p: _h5(p, features=np.zeros((2, 1024)), coords=np.zeros((2, 2), int)), "1024 dimensions, expected 512"),
    (lambda p: p.write_text("slide_id,features\n") and p, "not a readable HDF5 file"),
    (lambda p: p, "feature file not found"),
])
def test_malformed_feature_files_name_the_file_and_the_cause(tmp_path, make, message):
    path = make(tmp_path / "bad.h5")
    with pytest.raises(WsilocalError, match=message) as info:
        read_features(path, dim=512)
    assert str(info.value).startswith(f"{path}: ")


# --- resume, stale files, interruptions, bad slides ------------------------------------------


def test_resume_recomputes_only_the_missing_slide(slides, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = extract(slides, out)
    assert sorted(first.written) == ["s0", "s1", "s2"] and first.reused == []
    before = {i: (p.stat().st_mtime_ns, read_features(p)[0]) for i, p in first.written.items()}
    first.written["s1"].unlink()

    real_open = extract_module.open_slide

    def open_only_s1(path, **kwargs):
        assert Path(path).name == "s1.svs", f"finished slide {path} was opened again"
        return real_open(path, **kwargs)

    monkeypatch.setattr(extract_module, "open_slide", open_only_s1)
    second = extract(slides, out)
    assert second.reused == ["s0", "s2"] and second.skipped == {} and sorted(second.written) == ["s0", "s1", "s2"]
    for i in ("s0", "s2"):
        assert second.written[i].stat().st_mtime_ns == before[i][0]
    np.testing.assert_array_equal(read_features(second.written["s1"])[0], before["s1"][1])  # same random net
    assert second.n_tiles == first.n_tiles


def test_a_file_made_with_other_parameters_is_recomputed(slides, tmp_path):
    out = tmp_path / "out"
    extract(slides[:1], out)
    rerun = extract_features(slides[:1], out, mpp=MPP, tile=32, progress=False)
    assert rerun.reused == [] and rerun.skipped == {}
    features, coords, attrs = read_features(out / "s0.h5")
    assert (attrs["tile"], attrs["tile_level0"]) == (32, 64) and len(coords) == rerun.n_tiles["s0"] > 17
    assert extract_features(slides[:1], out, mpp=MPP, tile=32, progress=False).reused == ["s0"]


def test_an_interrupted_slide_leaves_no_file_and_is_redone(slides, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_read = extract_module.read_tile
    calls = {"s1.svs": 0}

    def read_then_interrupt(slide, xy, mpp, tile):
        if slide.path.name == "s1.svs":
            calls["s1.svs"] += 1
            if calls["s1.svs"] == 6:  # mid-slide, after a first batch of 4 tiles went through the network
                raise KeyboardInterrupt
        return real_read(slide, xy, mpp, tile)

    monkeypatch.setattr(extract_module, "read_tile", read_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        extract(slides, out, batch_size=4)
    assert sorted(p.name for p in out.iterdir()) == ["s0.h5"]  # no s1.h5, no temporary file

    monkeypatch.setattr(extract_module, "read_tile", real_read)
    resumed = extract(slides, out, batch_size=4)
    assert resumed.reused == ["s0"] and sorted(resumed.written) == ["s0", "s1", "s2"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "a.h5"
    write_features(path, np.ones((2, 512)), np.zeros((2, 2), int), {"tile": 256})
    real_create = h5py.Group.create_dataset

    def fail_on_coords(self, name, *args, **kwargs):
        if name == "coords":
            raise OSError(28, "No space left on device")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_coords)
    with pytest.raises(OSError, match="No space left"):
        write_features(path, np.zeros((5, 512)), np.zeros((5, 2), int), {"tile": 128})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]
    features, _, attrs = read_features(path)
    assert features.shape == (2, 512) and attrs == {"tile": 256}


def test_cli_skips_bad_slides_with_their_reason_and_finishes_the_rest(slides, make_slide, he_image, weights_file,
                                                                       tmp_path, capsys):
    blank = make_slide(he_image(1024, 768), "blank.svs", mpp=SLIDE_MPP)
    no_mpp = make_slide(he_image(1024, 768, [TISSUE]), "nompp.tiff", mpp=None, layout="generic")
    (tmp_path / "corrupt.svs").write_text("not a slide")
    rows = [("good", slides[0].path.name, "a", "train"), ("good2", slides[1].path.name, "b", "train"),
            ("blank", blank.name, "a", "val"), ("nompp", no_mpp.name, "b", "val"),
            ("corrupt", "corrupt.svs", "a", "test"), ("missing", "missing.svs", "b", "test")]
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("slide_id,path,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    out = tmp_path / "features"
    code = main(["features", "--cohort", str(cohort), "--out", str(out), "--tile", str(TILE), "--min-tissue", "0.5",
                 "--batch-size", "8"])
    printed = capsys.readouterr().out
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.h5", "good2.h5"]
    assert f"skipped blank: {blank}: no tissue found" in printed
    assert f"skipped nompp: {no_mpp}: no resolution metadata (MPP)" in printed
    assert f"skipped corrupt: {tmp_path / 'corrupt.svs'}: not a slide format" in printed
    assert f"skipped missing: {tmp_path / 'missing.svs'}: file not found" in printed
    assert "computed 2, reused 0, skipped 4" in printed and RANDOM_INIT_WARNING in printed
    header, train_a = printed.splitlines()[0].split(), printed.splitlines()[1].split()
    assert header == ["split", "class", "slides", "done", "skipped", "tiles"]
    assert train_a == ["train", "a", "1", "1", "0", str(len(read_features(out / "good.h5")[1]))]

    assert "random projections" in RANDOM_INIT_WARNING
    # With --assume-mpp the slide without metadata works; --weights changes every file's features.
    random_features, _, random_attrs = read_features(out / "good.h5")
    assert "random init" in random_attrs["extractor"] and random_attrs["weights"] == ""
    code = main(["features", "--cohort", str(cohort), "--out", str(out), "--tile", str(TILE), "--min-tissue", "0.5",
                 "--assume-mpp", str(SLIDE_MPP), "--weights", str(weights_file)])
    printed = capsys.readouterr().out
    assert code == 1 and "skipped nompp" not in printed  # blank, corrupt and missing are still skipped
    assert "computed 3, reused 0, skipped 3" in printed and RANDOM_INIT_WARNING not in printed
    features, _, attrs = read_features(out / "good.h5")
    assert attrs["weights"] == str(weights_file) and np.abs(features - random_features).max() > 0.1
    assert read_features(out / "nompp.h5")[2]["slide_mpp"] == SLIDE_MPP
