"""Session fixtures of the reliability suite: one folder of good and bad slides, cohorts, a trained run.

Everything is made once per session and shared: slides are small (768² px at 0.25 µm/px), the run trains a
K=2 model for two epochs on two slides. Tests that change files copy what they change.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rel_inputs import write_bad_slides, write_good_slide

from wsilocal.cli import main

GOOD = [("g0", "a", "train"), ("g1", "b", "train"), ("g2", "a", "val"), ("g3", "b", "val"),
        ("g4", "a", "test"), ("g5", "b", "test")]
#: The training run every test that needs one shares (and the interruption tests repeat in subprocesses).
TRAIN_OPTIONS = ["--k", "2", "--epochs", "2", "--accumulation", "1", "--rfr-patches", "2",
                 "--calibration-slides", "1", "--threads", "1", "--seed", "1"]
TILE = "32"  # feature tiles (px at 2 µm/px): a good slide's tissue box holds a few


def write_csv(path: Path, rows: list[tuple[str, str, str, str]], header: str = "slide_id,path,label,split") -> Path:
    path.write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return path


def call(argv: list[str]) -> tuple[int, str, str]:
    """``wsilocal ARGV`` in this process; (exit code, stdout, stderr). For fixtures (no capsys there)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One thread for torch in this process: on 2 shared cores, two threads are up to 10× slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> SimpleNamespace:
    """Good slides g0..g5 (train/val/test × classes a/b) and every bad slide, in one folder, with CSVs.

    ``good_csv`` lists the good slides; ``mixed_csv`` adds every bad slide but the missing one to the test
    split; ``all_csv`` adds the missing one too (for commands that skip missing files); ``train_bad_csv`` has
    every bad slide in the training split (for ``baseline``, which reads no slide, only feature files).
    """
    folder = tmp_path_factory.mktemp("reliability") / "cohort"
    folder.mkdir()
    for slide_id, label, _ in GOOD:
        write_good_slide(folder / f"{slide_id}.svs", label, seed=int(slide_id[1:]))
    bad = write_bad_slides(folder, folder / "g0.svs")
    good_rows = [(slide_id, f"{slide_id}.svs", label, split) for slide_id, label, split in GOOD]
    bad_rows = [(name, path.name, "ab"[i % 2], "test") for i, (name, (path, _)) in enumerate(bad.items())]
    present = [row for row in bad_rows if row[0] != "missing"]
    return SimpleNamespace(
        folder=folder, bad=bad, good_rows=good_rows,
        good_csv=write_csv(folder / "good.csv", good_rows),
        mixed_csv=write_csv(folder / "mixed.csv", good_rows + present),
        all_csv=write_csv(folder / "all.csv", good_rows + bad_rows),
        train_bad_csv=write_csv(folder / "train_bad.csv", good_rows + [(n, f, c, "train") for n, f, c, _ in bad_rows]),
        cache=folder.parent / "cache",
    )


@pytest.fixture(scope="session")
def trained(cohort) -> SimpleNamespace:
    """``wsilocal train`` on the mixed cohort (its bad slides skipped): the run, and what the command said."""
    run = cohort.folder.parent / "run"
    code, out, err = call(["train", "--cohort", str(cohort.mixed_csv), "--out", str(run),
                           "--cache", str(cohort.cache), *TRAIN_OPTIONS])
    assert (run / "checkpoint_last.pt").is_file(), err
    return SimpleNamespace(run=run, code=code, out=out, err=err)


@pytest.fixture(scope="session")
def features(cohort) -> SimpleNamespace:
    """``wsilocal features`` over every slide, bad ones included (they are skipped)."""
    out_dir = cohort.folder.parent / "features"
    code, out, err = call(["features", "--cohort", str(cohort.all_csv), "--out", str(out_dir), "--tile", TILE])
    return SimpleNamespace(dir=out_dir, code=code, out=out, err=err)


@pytest.fixture(scope="session")
def baseline(cohort, features) -> SimpleNamespace:
    """``wsilocal baseline`` (ABMIL, 2 epochs) on the features, bad slides in the training split."""
    run = cohort.folder.parent / "baseline"
    code, out, err = call(["baseline", "--model", "abmil", "--cohort", str(cohort.train_bad_csv), "--features",
                           str(features.dir), "--out", str(run), "--epochs", "2", "--min-epochs", "0",
                           "--threads", "1"])
    assert (run / "checkpoint_last.pt").is_file(), err
    return SimpleNamespace(run=run, code=code, out=out, err=err)
