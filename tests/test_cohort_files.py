"""Cohort files as they come: a missing slide file is skipped and listed, the rest finish, exit code 1; ``--strict``
refuses the cohort before any work. Same rule for prepare, train, features, evaluate and predict --cohort. The run
trained here is a ResNet18 from a prefixed weights file: its run directory alone is what predict needs."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import torch

from wsilocal.cli import main
from wsilocal.models.resnet import ResNetTrunk
from wsilocal.synth import synthesize_cohort

pytestmark = pytest.mark.usefixtures("one_thread_everywhere")


@pytest.fixture(scope="module")
def cohort(module_tmp):
    """A small synthetic cohort whose CSV also names two slide files that do not exist (one train, one test)."""
    folder = module_tmp("cohort_files")
    csv_path = synthesize_cohort(folder, classes=2, slides_per_class=4, size=(1536, 1536), seed=3, progress=False,
                                 size_jitter=0.1)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = sorted({r["label"] for r in rows})
    rows += [{"slide_id": "gone_train", "path": "slides/gone_train.svs", "label": labels[0], "split": "train",
              "case_id": "gone_train"},
             {"slide_id": "gone_test", "path": "slides/gone_test.svs", "label": labels[1], "split": "test",
              "case_id": "gone_test"}]
    with_missing = folder / "with_missing.csv"
    with open(with_missing, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return with_missing


def _missing(path_fragment: str, text: str) -> bool:
    return f"{path_fragment}: file not found" in text


def test_prepare_skips_and_lists_missing_files_or_refuses_them_when_strict(cohort, capsys):
    cache = cohort.parent / "cache"
    assert main(["prepare", str(cohort), "--cache", str(cache)]) == 1
    out = capsys.readouterr().out
    for slide_id in ("gone_train", "gone_test"):
        assert f"skipped {slide_id}: {cohort.parent / 'slides' / slide_id}.svs: file not found" in out
    assert len(list(cache.glob("*.npy"))) == 8  # every other slide was prepared
    assert main(["prepare", str(cohort), "--cache", str(cohort.parent / "strict_cache"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slide file not found" in err and "gone_train" in err and "gone_test" in err
    assert not (cohort.parent / "strict_cache").exists()  # refused before any work


def test_features_follow_the_same_rule(cohort, capsys, tmp_path):
    assert main(["features", "--cohort", str(cohort), "--out", str(tmp_path / "f"), "--tile", "64",
                 "--arch", "resnet18", "--strict"]) == 2
    assert "slide file not found" in capsys.readouterr().err and not (tmp_path / "f").exists()
    assert main(["features", "--cohort", str(cohort), "--out", str(tmp_path / "f"), "--tile", "64",
                 "--arch", "resnet18"]) == 1
    out = capsys.readouterr().out
    assert "skipped gone_train: " in out and "gone_train.svs: file not found" in out
    assert len(list((tmp_path / "f").glob("*.h5"))) == 8


@pytest.fixture(scope="module")
def run(cohort, module_tmp):
    """A ResNet18 K=2 run from a DataParallel-prefixed weights file, on the cohort with its two missing files."""
    folder = module_tmp("resnet18_run")
    torch.manual_seed(7)
    weights = folder / "simclr_resnet18.pth"
    state = ResNetTrunk(arch="resnet18").state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, weights)
    run_dir = folder / "run"
    code = main(["train", "--cohort", str(cohort), "--out", str(run_dir), "--cache", str(cohort.parent / "cache"),
                 "--arch", "resnet18", "--weights", str(weights), "--k", "2", "--epochs", "1", "--accumulation", "2",
                 "--rfr-patches", "2", "--threads", "1"])
    return run_dir, weights, state, code


def test_train_finishes_the_rest_and_records_arch_and_weights(run, capsys):
    run_dir, weights, state, code = run
    assert code == 1  # finished, but not on every slide
    summary = json.loads((run_dir / "summary.json").read_text())
    assert any(w.startswith("skipped gone_train: ") and w.endswith("gone_train.svs: file not found")
               for w in summary["warnings"])
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["arch"] == "resnet18" and meta["block_boundaries"] == [5]
    assert meta["weights"] == {"path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                               "prefix": "module.", "ignored_keys": 0}


def test_evaluate_and_predict_need_only_the_run_directory(run, cohort, capsys, tmp_path):
    run_dir, weights, _, _ = run
    weights.unlink()  # the run keeps its own weights: the file it started from is no longer needed
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 1
    out = capsys.readouterr().out
    assert "skipped gone_test: " in out and "gone_test.svs: file not found" in out
    metrics = json.loads((run_dir / "metrics_test.json").read_text())
    assert list(metrics["skipped"]) == ["gone_test"] and metrics["n"] >= 1
    assert main(["evaluate", str(run_dir), "--split", "test", "--strict"]) == 2
    assert "slide file not found" in capsys.readouterr().err

    assert main(["predict", "--run", str(run_dir), "--cohort", str(cohort), "--split", "test",
                 "--out", str(tmp_path / "p")]) == 1
    with open(tmp_path / "p" / "predictions.csv", newline="") as handle:
        predicted = {row["slide_id"]: row for row in csv.DictReader(handle)}
    with open(run_dir / "predictions_test.csv", newline="") as handle:
        evaluated = {row["slide_id"]: row for row in csv.DictReader(handle)}
    assert set(predicted) == set(evaluated) and "gone_test" not in predicted
    for slide_id, row in evaluated.items():  # the slide files give what the cached images gave
        assert row["predicted"] == predicted[slide_id]["predicted"]
    assert "gone_test" in (tmp_path / "p" / "skipped.csv").read_text()
    assert main(["predict", "--run", str(run_dir), "--cohort", str(cohort), "--split", "test",
                 "--out", str(tmp_path / "q"), "--strict"]) == 2
    assert "slide file not found" in capsys.readouterr().err


def test_train_strict_refuses_before_any_work(cohort, capsys, tmp_path):
    assert main(["train", "--cohort", str(cohort), "--out", str(tmp_path / "r"), "--cache", str(tmp_path / "c"),
                 "--arch", "resnet18", "--strict", "--epochs", "1"]) == 2
    assert "slide file not found" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "r" / "checkpoint_last.pt").exists()
