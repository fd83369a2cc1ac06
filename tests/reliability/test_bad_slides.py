"""Every entry point fed every bad slide, as a user would: one-line errors, skip reports, good slides finish.

Single-slide commands (``inspect``, ``predict SLIDE``) refuse a bad file with ``error: PATH: cause`` and a
non-zero exit. Cohort commands (``prepare``, ``features``, ``train``, ``evaluate``, ``predict --cohort``,
``baseline``) finish the good slides, list every bad one with its cause, and exit 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import GOOD
from rel_inputs import BAD_SLIDES, UNOPENABLE, assert_one_line_error, run_wsilocal, tissue_pixels

from wsilocal.cli import main
from wsilocal.features.h5 import read_features
from wsilocal.slide.tiff_writer import write_pyramidal_tiff

CONTENT_PROBLEMS = [name for name in BAD_SLIDES if name not in UNOPENABLE]  # they open, then fail on content
GOOD_IDS = [slide_id for slide_id, _, _ in GOOD]


def assert_skip_report(text: str, cohort, names) -> None:
    """Each named bad slide is listed as ``skipped NAME: PATH: cause`` in ``text``."""
    for name in names:
        path, cause = cohort.bad[name]
        lines = [line for line in text.splitlines() if line.startswith(f"skipped {name}: ")]
        assert len(lines) == 1, f"{name} not reported once in:\n{text}"
        assert str(path) in lines[0] and cause in lines[0], lines[0]


@pytest.mark.parametrize("name", UNOPENABLE)
def test_inspect_refuses_an_unreadable_slide_in_one_line(name, cohort, tmp_path, capsys):
    path, cause = cohort.bad[name]
    assert main(["inspect", str(path), "--thumbnail", str(tmp_path / "t.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, path, cause)
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("name", CONTENT_PROBLEMS)
def test_inspect_describes_a_slide_without_tissue_or_mpp(name, cohort, tmp_path, capsys):
    """``inspect`` is the diagnostic tool: it reports what it finds instead of refusing."""
    path, _ = cohort.bad[name]
    assert main(["inspect", str(path), "--thumbnail", str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    if name == "no_mpp":
        assert "unknown (pass --assume-mpp to set it)" in out and "% of the slide" in out
    else:
        assert "tissue        none found" in out
    assert (tmp_path / "t.png").is_file()


def test_prepare_caches_the_good_slides_and_lists_every_bad_one(cohort, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", str(cohort.mixed_csv), "--cache", str(cache)]) == 1
    out = capsys.readouterr().out
    present = [name for name in BAD_SLIDES if name != "missing"]
    assert_skip_report(out, cohort, present)
    assert f"built {len(GOOD)}, reused 0, skipped {len(present)}" in out
    assert sorted(p.stem for p in cache.glob("*.npy")) == sorted(GOOD_IDS)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    stats = json.loads((cache / "stats.json").read_text())
    assert stats["n_slides"] == 2 and stats["classes"] == ["a", "b"]


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_strict_makes_a_missing_slide_file_stop_the_command_before_any_work(command, cohort, tmp_path, capsys):
    """With ``--strict``, ``prepare`` and ``train`` validate the whole CSV before any work: a missing file is a CSV
    error (every problem of the CSV listed at once)."""
    args = ([command, str(cohort.all_csv), "--cache", str(tmp_path / "cache")] if command == "prepare" else
            [command, "--cohort", str(cohort.all_csv), "--out", str(tmp_path / "run"), "--cache", str(tmp_path)])
    assert main([*args, "--strict"]) == 2
    path = cohort.bad["missing"][0]
    assert_one_line_error(capsys.readouterr().err, cohort.all_csv, f"(missing): slide file not found: {path}")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_a_missing_slide_file_is_skipped_and_listed_like_an_unreadable_one(cohort, tmp_path, capsys):
    """Without ``--strict`` a missing file is one more bad slide: the others finish, it is listed, exit code 1."""
    cache = tmp_path / "cache"
    assert main(["prepare", str(cohort.all_csv), "--cache", str(cache)]) == 1
    out = capsys.readouterr().out
    assert_skip_report(out, cohort, BAD_SLIDES)
    assert f"built {len(GOOD)}, reused 0, skipped {len(BAD_SLIDES)}" in out
    assert sorted(p.stem for p in cache.glob("*.npy")) == sorted(GOOD_IDS)


def test_features_are_written_for_the_good_slides_and_every_bad_one_is_listed(cohort, features):
    assert features.code == 1
    assert_skip_report(features.out, cohort, BAD_SLIDES)
    assert f"computed {len(GOOD)}, reused 0, skipped {len(BAD_SLIDES)}" in features.out
    for slide_id in GOOD_IDS:
        values, coords, _ = read_features(features.dir / f"{slide_id}.h5")
        assert values.shape[1] == 512 and len(coords) == len(values) > 0
    assert sorted(p.name for p in features.dir.iterdir()) == sorted(f"{i}.h5" for i in GOOD_IDS)


def test_train_skips_the_bad_slides_lists_them_and_exits_1(cohort, trained):
    present = [name for name in BAD_SLIDES if name != "missing"]
    assert_skip_report(trained.out, cohort, present)
    summary = json.loads((trained.run / "summary.json").read_text())
    assert sorted(summary["skipped"]) == sorted(present)
    assert summary["epochs_run"] == 2
    assert trained.code == 1, "train finished with skipped slides: the exit code must say so (as prepare's does)"


def test_evaluate_scores_the_good_test_slides_lists_the_bad_and_exits_1(cohort, trained, capsys):
    code = main(["evaluate", str(trained.run), "--split", "test"])
    out = capsys.readouterr().out
    metrics = json.loads((trained.run / "metrics_test.json").read_text())
    assert metrics["n"] == 2 and sorted(metrics["skipped"]) == sorted(n for n in BAD_SLIDES if n != "missing")
    predictions = (trained.run / "predictions_test.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in predictions[1:]] == ["g4", "g5"]
    assert "skipped blank: " in out and "skipped bomb: " in out
    assert code == 1, "evaluate skipped slides: the exit code must say so"


def test_predict_a_cohort_finishes_the_good_slides_and_lists_the_bad(cohort, trained, tmp_path, capsys):
    out_dir = tmp_path / "pred"
    assert main(["predict", "--run", str(trained.run), "--cohort", str(cohort.mixed_csv), "--split", "test",
                 "--out", str(out_dir)]) == 1
    out = capsys.readouterr().out
    assert_skip_report(out, cohort, [n for n in BAD_SLIDES if n != "missing"])
    rows = (out_dir / "predictions.csv").read_text().splitlines()
    assert sorted(row.split(",")[0] for row in rows[1:]) == ["g4", "g5"]
    skipped = (out_dir / "skipped.csv").read_text().splitlines()
    assert len(skipped) == 1 + len(BAD_SLIDES) - 1


@pytest.mark.parametrize("name", ["truncated50", "bomb", "blank", "no_mpp"])
def test_predict_named_slides_refuses_a_bad_one_and_says_why(name, cohort, trained, tmp_path, capsys):
    path, cause = cohort.bad[name]
    good = cohort.folder / "g4.svs"
    assert main(["predict", "--run", str(trained.run), str(good), str(path), "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    line = [row for row in out.splitlines() if row.startswith("skipped ")]
    assert len(line) == 1 and str(path) in line[0] and cause in line[0]
    assert (tmp_path / "predictions.csv").read_text().count("\n") == 2  # header + the good slide


def test_baseline_trains_on_the_good_slides_and_lists_the_bad(cohort, baseline):
    summary = json.loads((baseline.run / "summary.json").read_text())
    assert sorted(summary["skipped"]) == sorted(BAD_SLIDES)
    assert all("no features file" in summary["skipped"][name] for name in BAD_SLIDES)
    assert all(f"skipped {name}: " in baseline.out for name in BAD_SLIDES)
    assert summary["epochs_run"] == 2
    assert baseline.code == 1, "baseline skipped slides: the exit code must say so"


def test_no_mpp_slide_is_read_like_its_twin_with_mpp_when_assume_mpp_is_given(cohort, tmp_path, capsys):
    path, _ = cohort.bad["no_mpp"]
    twin = write_pyramidal_tiff(tmp_path / "twin.svs", tissue_pixels("a", 7), mpp=0.25) and tmp_path / "twin.svs"
    csv = tmp_path / "one.csv"
    csv.write_text(f"slide_id,path,label,split\nn,{path},a,train\nt,{twin},b,train\n")
    assert main(["prepare", str(csv), "--cache", str(tmp_path / "c"), "--assume-mpp", "0.25"]) == 0
    assert np.array_equal(np.load(tmp_path / "c" / "n.npy"), np.load(tmp_path / "c" / "t.npy"))


def test_cli_errors_in_a_real_process_are_one_line_with_the_exit_code(cohort, tmp_path):
    """The real console: exit code 2, one line on stderr, no traceback (also for errors outside the library)."""
    path, cause = cohort.bad["truncated50"]
    result = run_wsilocal(["inspect", str(path), "--thumbnail", str(tmp_path / "t.png")])
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line_error(result.stderr, path, cause)
