"""Limits: decompression bombs and pixel limits refused before any large read; read-only and full disks
reported in one line, without half-written files.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from conftest import GOOD, TILE, write_csv
from rel_inputs import (
    assert_one_line_error,
    read_only_folder,
    run_measured,
    run_view,
    tissue_pixels,
    write_tiled_claim_tiff,
)

from wsilocal.cli import main
from wsilocal.slide.tiff_writer import write_pyramidal_tiff

# --- decompression bombs and pixel limits ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def claims(module_tmp) -> dict[str, tuple[Path, str]]:
    """Small flat TIFFs claiming huge sizes (all tiles share one stored tile): name → (path, cause).

    They have no MPP; the tests give ``--assume-mpp 0.25`` (else the cohort commands refuse them for that).
    """
    folder = module_tmp("claims")
    return {
        "flat_1e10_px": (write_tiled_claim_tiff(folder / "flat.tif", 100_000, 100_000),
                         "finding the tissue on a 16 µm/px overview means decoding 10,000,000,000 px of level 0 of 1 "
                         "(100000x100000 px, 0.25 µm/px), above the limit of 1,600,000,000 px"),
        "flat_1e12_px": (write_tiled_claim_tiff(folder / "huge.tif", 1_000_000, 1_000_000, tile=4096),
                         "implausibly large: 1000000x1000000 px at 0.25 µm/px would make a 15625x15625 px "
                         "overview at 16 µm/px (limit 64,000,000 px)"),
    }


@pytest.mark.parametrize("name", ["flat_1e10_px", "flat_1e12_px"])
@pytest.mark.parametrize("command", ["inspect", "prepare", "features", "predict"])
def test_every_command_refuses_a_huge_slide_before_reading_it(command, name, claims, cohort, trained, tmp_path,
                                                              capsys):
    """Reading either file would decode 10¹⁰–10¹² pixels (minutes to hours, or an out-of-memory kill)."""
    path, cause = claims[name]
    csv = write_csv(tmp_path / "c.csv", [("huge", str(path), "a", "test"), *[
        (i, str(cohort.folder / f"{i}.svs"), label, split) for i, label, split in GOOD]])
    argv = {
        "inspect": ["inspect", str(path), "--thumbnail", str(tmp_path / "t.png"), "--assume-mpp", "0.25"],
        "prepare": ["prepare", str(csv), "--cache", str(tmp_path / "cache"), "--assume-mpp", "0.25"],
        "features": ["features", "--cohort", str(csv), "--out", str(tmp_path / "f"), "--tile", TILE,
                     "--assume-mpp", "0.25"],
        "predict": ["predict", "--run", str(trained.run), str(path), "--out", str(tmp_path / "p"),
                    "--assume-mpp", "0.25"],
    }[command]
    code = main(argv)
    captured = capsys.readouterr()
    if command == "inspect":
        assert code == 2
        assert_one_line_error(captured.err, path, cause)
    else:  # cohort commands: that slide skipped with the reason, the others done
        assert code == 1
        skipped = [line for line in captured.out.splitlines() if line.startswith("skipped huge: ")
                   or line.startswith(f"skipped {path.stem}: ")]
        assert len(skipped) == 1 and cause in skipped[0], captured.out


def test_a_bomb_is_refused_without_allocating_its_pixels(cohort, tmp_path):
    """Peak memory of the real process: the bomb costs no more than a tiny good slide (decoding it: +412 MiB)."""
    bomb, cause = cohort.bad["bomb"]
    code, err, bomb_rss = run_measured(["inspect", str(bomb), "--thumbnail", str(tmp_path / "b.png")], tmp_path)
    assert code == 2
    assert_one_line_error(err, bomb, cause)
    code, _, good_rss = run_measured(["inspect", str(cohort.folder / "g0.svs"), "--thumbnail",
                                      str(tmp_path / "g.png")], tmp_path)
    assert code == 0
    assert bomb_rss < good_rss + 100 * 2**20, (bomb_rss, good_rss)


@pytest.fixture(scope="module")
def flat_and_pyramid(module_tmp) -> tuple[Path, Path]:
    """The same 2048² px as a flat tiled TIFF (one level, with MPP) and as a pyramid (levels 1 and 4×)."""
    folder = module_tmp("flat")
    pixels = tissue_pixels("b", 5, 2048, 2048)
    flat = folder / "flat.tif"
    tifffile.imwrite(flat, pixels, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    return flat, write_pyramidal_tiff(folder / "pyramid.svs", pixels) and folder / "pyramid.svs"


def test_a_small_flat_tiff_is_accepted_and_read_like_its_pyramid(flat_and_pyramid, tmp_path, capsys):
    flat, pyramid = flat_and_pyramid
    csv = write_csv(tmp_path / "c.csv", [("flat", str(flat), "a", "train"), ("pyramid", str(pyramid), "b", "train")])
    assert main(["prepare", str(csv), "--cache", str(tmp_path / "cache")]) == 0
    a, b = np.load(tmp_path / "cache" / "flat.npy"), np.load(tmp_path / "cache" / "pyramid.npy")
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3  # JPEG of different levels: close, not equal


def test_the_pixel_limit_counts_pixels_decoded_not_only_the_image_made(flat_and_pyramid, tmp_path, capsys):
    """With --max-pixels 500000 the pyramid is read (its 4× smaller level: 262,144 px for the overview); the
    flat file, which must decode all its 2048² px for the same results, is refused before reading."""
    flat, pyramid = flat_and_pyramid
    csv = write_csv(tmp_path / "c.csv", [("flat", str(flat), "a", "train"), ("pyramid", str(pyramid), "b", "train")])
    assert main(["prepare", str(csv), "--cache", str(tmp_path / "cache"), "--max-pixels", "500000"]) == 1
    out = capsys.readouterr().out
    assert (tmp_path / "cache" / "pyramid.npy").is_file() and not (tmp_path / "cache" / "flat.npy").exists()
    assert "skipped flat: " in out and "means decoding 4,194,304 px of level 0 of 1 (2048x2048 px, 0.25 µm/px), " \
        "above the limit of 500,000 px" in out


def test_predict_counts_pixels_decoded_against_the_runs_limit(flat_and_pyramid, trained, tmp_path, capsys):
    """The same two files through ``predict`` on a run whose max_pixels is 500,000: the flat one is refused
    before its 2048² px are decoded, the pyramid is predicted."""
    flat, pyramid = flat_and_pyramid
    view = run_view(trained.run, tmp_path / "view", config={"max_pixels": 500_000})
    assert main(["predict", "--run", str(view), str(flat), str(pyramid), "--out", str(tmp_path / "p")]) == 1
    out = capsys.readouterr().out
    assert f"skipped flat: {flat}: reading the tissue region at 2.0 µm/px means decoding " in out
    assert "px of level 0 of 1 (2048x2048 px, 0.25 µm/px), above the limit of 500,000 px" in out
    predicted = (tmp_path / "p" / "predictions.csv").read_text().splitlines()
    assert len(predicted) == 2 and predicted[1].startswith("pyramid,")


def test_the_pixel_limit_refuses_a_large_tissue_image(cohort, tmp_path, capsys):
    """At 0.125 µm/px (enlarged 2×) each good slide's tissue image is about 1 Mpx: above a 700,000 px limit."""
    assert main(["prepare", str(cohort.good_csv), "--cache", str(tmp_path / "cache"), "--mpp", "0.125",
                 "--max-pixels", "700000"]) == 1
    out = capsys.readouterr().out
    assert out.count("above the limit of 700,000 px (raise --max-pixels if this is intended)") == len(GOOD)
    assert out.count("skipped g") == len(GOOD) and "tissue region at 0.125 µm/px is " in out
    assert not list((tmp_path / "cache").glob("*.npy"))


# --- read-only output folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prepare", "features", "train", "baseline", "predict", "evaluate"])
def test_a_read_only_output_folder_is_one_line_error_and_nothing_is_written(command, cohort, trained, features,
                                                                           tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    if command == "evaluate":  # the run directory is the output
        run_view(trained.run, folder)
    argv = {
        "prepare": ["prepare", str(cohort.good_csv), "--cache", str(folder)],
        "features": ["features", "--cohort", str(cohort.good_csv), "--out", str(folder), "--tile", TILE],
        "train": ["train", "--cohort", str(cohort.good_csv), "--out", str(folder), "--cache", str(cohort.cache)],
        "baseline": ["baseline", "--model", "abmil", "--cohort", str(cohort.good_csv), "--features",
                     str(features.dir), "--out", str(folder)],
        "predict": ["predict", "--run", str(trained.run), str(cohort.folder / "g4.svs"), "--out", str(folder)],
        "evaluate": ["evaluate", str(folder), "--split", "val"],
    }[command]
    before = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    with read_only_folder(folder, monkeypatch) as how:
        assert main(argv) == 2, how
    err = capsys.readouterr().err
    cause = "Operation not permitted" if how == "immutable" else "Permission denied"
    assert_one_line_error(err, folder, cause)
    assert sorted(p.name for p in folder.iterdir()) == before


# --- a full disk ----------------------------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_prepare_on_a_full_disk_skips_the_slide_and_leaves_no_partial_entry(cohort, tmp_path, capsys, monkeypatch):
    """The cache reserves an entry's blocks before writing pixels: a full disk is an OSError to report, not a
    SIGBUS in the middle of a memory-mapped write (which killed ``prepare`` before). Here it is full at g2."""
    reserve = os.posix_fallocate
    calls = []

    def fallocate(fd, offset, length):
        calls.append(length)
        return no_space() if len(calls) == 3 else reserve(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    cache = tmp_path / "cache"
    assert main(["prepare", str(cohort.good_csv), "--cache", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "skipped g2: OSError: [Errno 28] No space left on device" in out
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f"{i}.{ext}" for i, _, _ in GOOD if i != "g2" for ext in ("npy", "tissue.npz", "json")] + ["stats.json"])


def test_a_cache_entry_whose_facts_cannot_be_written_leaves_no_pixels(cohort, tmp_path, capsys, monkeypatch):
    write_text = Path.write_text

    def failing(self, text, *args, **kwargs):
        if self.name.startswith(".g1.json.tmp-"):
            write_text(self, text[:10])  # part of it reached the disk
            no_space()
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    cache = tmp_path / "cache"
    assert main(["prepare", str(cohort.good_csv), "--cache", str(cache)]) == 1
    assert "skipped g1: OSError: [Errno 28] No space left on device" in capsys.readouterr().out
    assert not any(p.name.startswith(("g1.", ".g1.")) for p in cache.iterdir())


def test_features_on_a_full_disk_skip_the_slide_and_leave_no_partial_file(cohort, tmp_path, capsys, monkeypatch):
    create = h5py.Group.create_dataset

    def failing(self, name, *args, **kwargs):
        if name == "coords" and os.path.basename(self.file.filename).startswith(".g3.h5.tmp-"):
            no_space()  # after the features were written
        return create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    out_dir = tmp_path / "f"
    assert main(["features", "--cohort", str(cohort.good_csv), "--out", str(out_dir), "--tile", TILE]) == 1
    assert "No space left on device" in [line for line in capsys.readouterr().out.splitlines()
                                         if line.startswith("skipped g3: ")][0]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{i}.h5" for i, _, _ in GOOD if i != "g3")


def test_train_on_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(cohort, trained, tmp_path, capsys,
                                                                             monkeypatch):
    run = run_view(trained.run, tmp_path / "run", config={"cohort": str(cohort.good_csv)})  # no skip warnings
    last = (run / "checkpoint_last.pt").read_bytes()
    save = torch.save

    def failing(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")  # the first bytes made it, then the disk was full
        no_space()

    monkeypatch.setattr(torch, "save", failing)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    monkeypatch.setattr(torch, "save", save)
    err = capsys.readouterr().err
    assert_one_line_error(err, run / "checkpoint_", "cannot write the checkpoint (No space left on device); the "
                          "previous one, if any, is unchanged")
    assert (run / "checkpoint_last.pt").read_bytes() == last
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 2  # the completed run's summary
