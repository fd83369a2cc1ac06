"""`wsilocal bench accuracy` and `wsilocal bench all` end to end through the command line, on a tiny cohort:
records against the run directories' own evaluations, mean/std against numpy, reuse of finished runs,
the binary-only row, settings conflicts, and the report with every section."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsilocal.bench import accuracy, options, report, stats
from wsilocal.bench.accuracy import AccuracyBenchSettings, CohortSettings, run_accuracy_benchmark
from wsilocal.cli import main
from wsilocal.config import TrainConfig
from wsilocal.demo import QUICK as DEMO_QUICK
from wsilocal.errors import ConfigError
from wsilocal.models.resnet import ResNetTrunk

# 3 classes × 3 slides of ~190² px at 5x (one slide per class in each split), 64-px tiles, 1 epoch, 2 seeds.
TINY = AccuracyBenchSettings(
    cohorts=(CohortSettings("morphology", slides_per_class=3, mpp=2.0, tile=64, size=(1536, 1536)),),
    seeds=2, epochs=1, mil_epochs=2, demo=DEMO_QUICK, workers=1)
ROWS = ["abmil", "ours_k2", "milrnn"]
RUN_ROWS = ["abmil", "ours_k2"]  # milrnn is binary only: not run on 3 classes
QUICK_ARGS = {
    "accuracy": ["--quick", "--rows", *ROWS],
    "memory": ["--sizes", "128", "--k", "4", "--variants", "paper", "--repeats", "0", "--no-rfr"],
    "speed": ["--quick"],
}  # scaling is not run below: even its smallest configuration costs ~15 s here


pytestmark = pytest.mark.usefixtures("one_thread_everywhere")


def bench_accuracy(out: Path) -> int:
    """`wsilocal bench accuracy --quick` with the tiny settings as its quick preset."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accuracy, "QUICK", TINY)
        return main(["bench", "accuracy", "--out", str(out), "--quick", "--rows", *ROWS])


@pytest.fixture(scope="module")
def bench(module_tmp) -> Path:
    """One real benchmark run; returns OUT of `bench all` (the accuracy benchmark is in OUT/accuracy)."""
    out = module_tmp("bench")
    assert bench_accuracy(out / "accuracy") == 0
    return out


def load(out: Path) -> dict:
    return json.loads((out / "accuracy" / "accuracy.json").read_text())


def run_files(out: Path) -> dict[Path, int]:
    """Modification times of what training and evaluation write, in every run directory."""
    names = ("checkpoint_best.pt", "metrics_test.json", accuracy.RUN_MARKER)
    return {path: path.stat().st_mtime_ns for name in names for path in (out / "accuracy" / "runs").rglob(name)}


def test_records_are_the_run_directories_own_test_evaluations(bench):
    from wsilocal.slide.cohort import load_cohort
    from wsilocal.train.metrics import classification_metrics

    data = load(bench)
    test_ids = [s.slide_id for s in load_cohort(bench / "accuracy" / "cohorts" / "morphology" / "cohort.csv")
                .split("test")]
    assert [(r["row"], r["seed"]) for r in data["records"]] == [(row, s) for row in RUN_ROWS for s in (0, 1)]
    for record in data["records"]:
        run_dir = Path(record["run_dir"])
        assert run_dir == bench / "accuracy" / "runs" / "morphology" / record["row"] / f"seed{record['seed']}"
        evaluated = json.loads((run_dir / "metrics_test.json").read_text())  # written by `wsilocal evaluate`
        for metric in accuracy.METRICS:
            assert record[metric] == evaluated[metric]
        assert record["n_test"] == evaluated["n"] == 3 and record["reused"] is False
        # The per-slide test predictions are the run's own predictions_test.csv, and give its metrics.
        predictions = record["test_predictions"]
        assert predictions == accuracy.read_test_predictions(run_dir)
        assert sorted(predictions["classes"]) == sorted(data["tasks"]["morphology"]["classes"])  # the run's order
        assert sorted(predictions["slide_ids"]) == sorted(test_ids)
        again = classification_metrics(np.array(predictions["probabilities"]), np.array(predictions["labels"]),
                                       predictions["classes"])
        for metric in accuracy.METRICS:  # 6 decimals tie saturated probabilities, which can move AUROC only
            assert again[metric] == pytest.approx(record[metric], abs=1e-6) or (
                metric == "auroc" and accuracy.has_tied_scores(predictions)), metric
        assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoint_best.pt").is_file()
        assert not (run_dir / "checkpoint_last.pt").exists()  # optimizer state, dropped once the run is finished
    seeds = {r["seed"]: r for r in data["records"] if r["row"] == "ours_k2"}
    config = {s: (Path(seeds[s]["run_dir"]) / "config.yaml").read_text() for s in (0, 1)}
    assert "seed: 0" in config[0] and "seed: 1" in config[1] and "k: 2" in config[0]
    assert f"lr_trunk: {DEMO_QUICK.lr_trunk}" in config[0]  # the demo's optimiser settings
    # The cohort: 3 classes, one slide each per split, as the tiny settings ask.
    assert data["tasks"]["morphology"]["slides"] == {"train": 3, "val": 3, "test": 3}
    assert len(list((bench / "accuracy" / "cohorts" / "morphology" / "features").glob("*.h5"))) == 9


def test_aggregates_are_mean_and_sample_std_over_seeds(bench):
    from wsilocal.train.metrics import classification_metrics

    data = load(bench)
    table = (bench / "accuracy" / "accuracy.md").read_text()
    for row in RUN_ROWS:
        (agg,) = [a for a in data["aggregates"] if a["row"] == row]
        assert agg["status"] == "done"
        for metric in accuracy.METRICS:
            values = np.array([r[metric] for r in data["records"] if r["row"] == row])
            assert agg[metric]["n"] == 2
            assert agg[metric]["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert agg[metric]["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        # One test slide per class: every stratified resample is the split itself, so the interval is the point.
        # the estimate is the seed mean of the recorded per-slide predictions (6 decimals: see the † note).
        boot = agg["bootstrap"]
        assert (boot["n_slides"], boot["seeds"], boot["resamples"]) == (3, 2, stats.RESAMPLES)
        records = [r for r in data["records"] if r["row"] == row]
        for metric in accuracy.METRICS:
            again = [classification_metrics(np.array(r["test_predictions"]["probabilities"]),
                                            np.array(r["test_predictions"]["labels"]),
                                            r["test_predictions"]["classes"])[metric] for r in records]
            assert boot[metric]["estimate"] == pytest.approx(np.mean(again), abs=1e-12)
            assert boot[metric]["low"] == pytest.approx(boot[metric]["estimate"], abs=1e-12)
            assert boot[metric]["high"] == pytest.approx(boot[metric]["estimate"], abs=1e-12)
        label = accuracy.ROWS[row].label
        cells = " | ".join(f"{agg[m]['mean']:.3f} ± {agg[m]['std']:.3f} [{boot[m]['low']:.3f}, {boot[m]['high']:.3f}]"
                           + ("†" if abs(boot[m]["estimate"] - agg[m]["mean"]) >= 5e-4 else "")
                           for m in accuracy.METRICS)
        assert f"| {label} | {cells} | 2 |" in table
    assert "paper accuracy (TCGA-RCC, GPU)" in table and "| 0.8495 | 0.9423 |" in table  # ABMIL, Table 1
    with Image.open(bench / "accuracy" / "accuracy.png") as png:
        assert png.format == "PNG" and png.size[0] > 500


def test_milrnn_is_binary_only_on_three_classes(bench):
    data = load(bench)
    (agg,) = [a for a in data["aggregates"] if a["row"] == "milrnn"]
    assert agg["status"] == "n/a: binary only" and agg["accuracy"]["n"] == 0
    assert not any(r["row"] == "milrnn" for r in data["records"])
    assert not (bench / "accuracy" / "runs" / "morphology" / "milrnn").exists()
    assert "| MIL-RNN | n/a: binary only |" in (bench / "accuracy" / "accuracy.md").read_text()


def test_a_second_invocation_reuses_finished_runs(bench):
    before, first = run_files(bench), load(bench)
    slides = {p: p.stat().st_mtime_ns for p in (bench / "accuracy" / "cohorts").rglob("*.svs")}
    assert len(before) == 3 * len(RUN_ROWS) * 2 and len(slides) == 9
    assert bench_accuracy(bench / "accuracy") == 0
    assert run_files(bench) == before  # nothing trained or evaluated again
    assert {p: p.stat().st_mtime_ns for p in slides} == slides  # nor generated again
    second = load(bench)
    assert all(r["reused"] for r in second["records"])
    strip = [{k: v for k, v in r.items() if k != "reused"} for r in first["records"]]
    assert [{k: v for k, v in r.items() if k != "reused"} for r in second["records"]] == strip


def test_runs_or_cohorts_made_with_other_settings_are_refused(bench):
    out = bench / "accuracy"
    with pytest.raises(ConfigError, match=r"ours_k2/seed0: finished with other settings \(epochs\)"):
        run_accuracy_benchmark(out, AccuracyBenchSettings(TINY.cohorts, epochs=2, mil_epochs=2, demo=DEMO_QUICK),
                               rows=["ours_k2"], seeds=1, progress=False)
    other = CohortSettings("morphology", slides_per_class=4, mpp=2.0, tile=64, size=(1536, 1536))
    with pytest.raises(ConfigError, match=r"cohorts/morphology: holds a morphology cohort generated with other "
                                          r"slides_per_class; use another --out"):
        run_accuracy_benchmark(out, AccuracyBenchSettings((other,)), rows=["abmil"], progress=False)
    with pytest.raises(ConfigError, match="tiles of 64 px at 8 µm/px are larger than the layout's 128 µm"):
        CohortSettings("context", slides_per_class=2, mpp=8.0, tile=64, layout_scale=0.25).synth_params()


def test_bench_all_writes_one_report_with_every_section(bench, monkeypatch):
    monkeypatch.setattr(accuracy, "QUICK", TINY)
    monkeypatch.setattr(report, "QUICK_ARGS", QUICK_ARGS)
    # `wsilocal bench all --out OUT --quick`, with the speed benchmark as if it were not there yet (parsing the
    # command line imports no benchmark).
    monkeypatch.setitem(sys.modules, "wsilocal.bench.speed", None)
    before = run_files(bench)
    assert main(["bench", "all", "--out", str(bench), "--quick", "--sections", "accuracy", "memory", "speed"]) == 0
    assert run_files(bench) == before  # the accuracy section reused its finished runs
    text = (bench / "report.md").read_text()
    data = json.loads((bench / "report.json").read_text())
    status = {name: section["status"] for name, section in data["sections"].items()}
    assert status == {"accuracy": "done", "pretrain": "not run", "memory": "done",
                      "speed": "pending: wsilocal.bench.speed is not there yet", "scaling": "not run"}
    for name in options.SECTIONS:
        assert f"## {report.TITLES[name]}\n\nStatus: **{status[name]}**" in text
    for png in ("accuracy/accuracy.png", "memory/memory.png"):
        assert (bench / png).is_file() and f"]({png})" in text
    assert "| ABMIL | " in text and "| 128×128 | resnet34 | paper | 4 |" in text  # the accuracy and memory tables
    # The paper's numbers beside ours, and the claims with a place to say why where we disagree.
    assert text.count(report.PAPER_LABEL) >= 3 and "| 8698×7496 | 2.9 | 0.3 | 9.7× |" in text
    memory = json.loads((bench / "memory" / "memory.json").read_text())
    (k4,) = [r for r in memory["records"] if r["k"] == 4]
    (claim,) = [c for c in data["claims"] if c["claim"].startswith("K=4 needs")]
    assert claim["ours"].startswith(f"{k4['ratio_saved_paper_style']:.1%} of paper-style K=1")
    paper_k4 = max(report.paper_memory_shares(4))  # 5.35 / 17.89 GB
    assert claim["verdict"] == ("agrees" if k4["ratio_saved_paper_style"] <= paper_k4 + 0.05 else "disagrees")
    pending = [c for c in data["claims"] if c["verdict"] == "pending"]
    assert {c["claim"] for c in pending} >= {"`morphology`: RFR improves the accuracy of K=4",
                                             "whole-slide inference is 7–10× faster than the tile pipeline (GABMIL)"}
    for claim in data["claims"]:  # every disagreement or inconclusive verdict says why; nothing else does
        assert bool(claim["why"]) == (claim["verdict"] in ("disagrees", "inconclusive")), claim
        assert claim["why"] in text
    machine = data["machine"]
    assert machine["cores"] >= 1 and machine["torch"] == torch.__version__ and machine["ram_gib"] > 0
    assert f"{machine['cores']} cores" in text
    # --report-only runs nothing and writes the same claims from the files the sections left.
    parser = argparse.ArgumentParser()
    options.add_all_arguments(parser)
    (bench / "report.md").unlink()
    assert report.all_main(parser.parse_args(["--out", str(bench), "--report-only"])) == 0
    assert run_files(bench) == before and (bench / "report.md").is_file()
    again = json.loads((bench / "report.json").read_text())
    assert again["claims"] == data["claims"]
    assert {name: s["status"] for name, s in again["sections"].items()} == {
        "accuracy": "done", "pretrain": "not run", "memory": "done", "speed": "not run", "scaling": "not run"}
    with pytest.raises(ConfigError, match=f"^{bench / 'none'}: no such folder"):
        report.all_main(parser.parse_args(["--out", str(bench / "none"), "--report-only"]))
    assert not (bench / "none").exists()


def test_budget_options_set_epochs_and_cohort_sizes_and_refuse_bad_values(bench, tmp_path, capsys):
    settings = accuracy.FULL.with_budget(epochs=9, mil_epochs=7, slides_per_class=5)
    assert (settings.epochs, settings.mil_epochs, settings.seeds) == (9, 7, accuracy.FULL.seeds)
    assert settings.cohorts == tuple(replace(c, slides_per_class=5) for c in accuracy.FULL.cohorts)
    assert accuracy.FULL.with_budget() == accuracy.FULL
    # The option reaches the runs: the finished 1-epoch runs are not reused for 2 epochs.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accuracy, "QUICK", TINY)
        assert main(["bench", "accuracy", "--out", str(bench / "accuracy"), "--quick", "--rows", "ours_k2",
                     "--seeds", "1", "--epochs", "2"]) == 2
    assert "ours_k2/seed0: finished with other settings (epochs)" in capsys.readouterr().err
    for option, value, least in (("--epochs", "0", 1), ("--mil-epochs", "-1", 1), ("--slides-per-class", "2", 3)):
        assert main(["bench", "accuracy", "--out", str(tmp_path / "o"), option, value]) == 2
        assert capsys.readouterr().err.strip() == f"error: bench accuracy: {option} must be at least {least}, " \
                                                  f"got {value}"
    assert not (tmp_path / "o").exists()


def test_weights_give_every_method_those_weights_and_their_own_features(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "resnet34.pth"
    torch.save(ResNetTrunk(conv1_stride=2).state_dict(), weights)  # torchvision names, as an ImageNet file
    settings = replace(TINY, seeds=1, weights=str(weights))
    report_data = run_accuracy_benchmark(tmp_path / "out", settings, rows=["abmil"], progress=False)
    assert [a["status"] for a in report_data["aggregates"]] == ["done"]
    folder = tmp_path / "out" / "cohorts" / "morphology"
    features = accuracy.features_folder(folder, str(weights))
    assert features.name.startswith("features-") and any(features.glob("*.h5"))
    assert not (folder / "features").exists()  # random-weight features are neither made nor reused
    assert f"ResNet34 features from the weights in {weights}" in (tmp_path / "out" / "accuracy.md").read_text()
    # Our network fine-tunes the same weights, at the paper's trunk rate.
    cohort = accuracy.prepare_benchmark_cohort(settings.cohorts[0], folder, workers=1, weights=str(weights),
                                               progress=False)
    config = accuracy.run_config(accuracy.ROWS["ours_k4"], cohort, 0, tmp_path / "run", settings)
    assert (config.weights, config.lr_trunk, config.k) == (str(weights), TrainConfig.lr_trunk, 4)
    assert main(["bench", "accuracy", "--out", str(tmp_path / "o2"), "--weights", str(tmp_path / "none.pth")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.pth'}: no such file"
    assert not (tmp_path / "o2").exists()  # refused before any cohort was generated


def test_shortcut_check_of_the_matched_cohort_and_of_a_cohort_with_one(bench, tmp_path):
    shortcuts = load(bench)["tasks"]["morphology"]["shortcuts"]
    # Generator 1.2 gives every class the same slide sizes in every split: size alone ranks nothing.
    assert [shortcuts[k] for k in ("slide width (mm)", "slide height (mm)", "slide area (mm²)")] == [0.5] * 3
    assert set(shortcuts) == {"slide width (mm)", "slide height (mm)", "slide area (mm²)", "tissue area (mm²)",
                              "lesion fraction"}
    assert "Shortcut check:" in (bench / "accuracy" / "accuracy.md").read_text()
    # The chance levels are those of this test split's labels, and the tables say them.
    from wsilocal.slide.cohort import load_cohort

    info = load(bench)["tasks"]["morphology"]
    cohort = load_cohort(bench / "accuracy" / "cohorts" / "morphology" / "cohort.csv")
    test_labels = [info["classes"].index(s.label) for s in cohort.split("test")]
    assert info["chance_95"] == accuracy.chance_levels(test_labels, 3)
    assert (f"random scores reach balanced accuracy {info['chance_95']['balanced_accuracy']:.2f} and AUROC "
            f"{info['chance_95']['auroc']:.2f} one time in 20") in (bench / "accuracy" / "accuracy.md").read_text()
    # A cohort where tissue area grows with the class on both splits: a one-number rule learnt on the training
    # split (per class: larger or smaller than the rest) ranks the test split as far as the order allows.
    (tmp_path / "masks").mkdir()
    slides = {}
    for i, (split, label, tissue_rows) in enumerate([("train", "a", 2), ("train", "b", 4), ("train", "c", 6),
                                                     ("test", "a", 1), ("test", "b", 3), ("test", "c", 5)]):
        mask = np.zeros((8, 8), np.uint8)
        mask[:tissue_rows] = 128
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
        slides[str(i)] = {"split": split, "label": label, "size": [256, 256], "mask": f"masks/{i}.png",
                          "mask_downsample": 32, "lesion_fraction": 0.1}
    (tmp_path / "synth.json").write_text(json.dumps({"slides": slides}))
    # a: smallest on train, so "smaller" ranks it first on test (1.0); c: largest (1.0); b: in the middle (0.5).
    got = accuracy.shortcut_aurocs(tmp_path, ["a", "b", "c"])["tissue area (mm²)"]
    assert got == pytest.approx(np.mean([1.0, 0.5, 1.0]))
    assert accuracy.shortcut_aurocs(tmp_path, ["a", "b", "c"])["slide area (mm²)"] == 0.5


@pytest.mark.parametrize("labels", [[0, 1, 1, 0, 1, 0, 0, 1, 1], [2, 0, 1, 1, 2, 0, 0, 2, 1, 1]])
def test_random_score_metrics_are_classification_metrics_draw_by_draw(labels):
    from wsilocal.train.metrics import classification_metrics

    n_classes = max(labels) + 1
    draws = np.random.default_rng(3).dirichlet(np.ones(n_classes), (25, len(labels)))
    got = accuracy.random_score_metrics(draws, np.array(labels))
    classes = [str(c) for c in range(n_classes)]
    for name in ("balanced_accuracy", "auroc"):
        expected = [classification_metrics(p, np.array(labels), classes)[name] for p in draws]
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-12)


def _exact_95th(distribution: dict[float, float]) -> float:
    """The smallest value v with P(X <= v) >= 0.95 of a {value: probability} distribution."""
    total = 0.0
    for value in sorted(distribution):
        total += distribution[value]
        if total >= 0.95 - 1e-12:
            return value
    raise AssertionError("probabilities do not sum to 1")


def _exact_chance(counts: list[int]) -> dict[str, float]:
    """Exact 95th percentiles of random scores on a split with ``counts`` slides per class: each slide's argmax
    is a uniform class, so the per-class recalls are independent binomials; with two classes the AUROC is
    Mann-Whitney U over all equally likely rank orders of the slides."""
    from itertools import combinations
    from math import comb

    n_classes = len(counts)
    balanced = {0.0: 1.0}
    for n in counts:  # add each class's recall / n_classes
        merged: dict[float, float] = {}
        for total, p_total in balanced.items():
            for k in range(n + 1):
                value = round(total + k / n / n_classes, 12)
                p_k = comb(n, k) * (1 / n_classes) ** k * (1 - 1 / n_classes) ** (n - k)
                merged[value] = merged.get(value, 0.0) + p_total * p_k
        balanced = merged
    result = {"balanced_accuracy": _exact_95th(balanced)}
    if n_classes == 2:
        n_neg, n_pos = counts
        orders = list(combinations(range(1, n_neg + n_pos + 1), n_pos))  # the positives' ranks
        auroc: dict[float, float] = {}
        for ranks in orders:
            value = round((sum(ranks) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), 12)
            auroc[value] = auroc.get(value, 0.0) + 1 / len(orders)
        result["auroc"] = _exact_95th(auroc)
    return result


@pytest.mark.parametrize("counts", [[4, 4], [5, 3], [6, 2], [4, 4, 4], [3, 5, 2]])
def test_chance_levels_are_the_exact_95th_percentiles_of_random_scores(counts):
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    got = accuracy.chance_levels(labels, len(counts))
    expected = _exact_chance(counts)
    assert got["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"], abs=1e-9)
    if len(counts) == 2:  # 4 + 4: AUROC 0.875, as on the context task's test split
        assert got["auroc"] == pytest.approx(expected["auroc"], abs=1e-9)
    else:  # macro one-vs-rest AUROC has no closed form: random scores, but above 0.5 and below a perfect ranking
        assert 0.5 < got["auroc"] < 1.0


def test_pretrained_init_gives_every_method_the_weights_of_a_pretraining_on_train_and_val(tmp_path):
    from safetensors.torch import load_file

    pretraining = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "bn_tiles": 8, "tile": 48, "crop": 32,
                   "projector_dims": [32, 16], "workers": 1, "min_tissue": 0.3}
    settings = replace(TINY, seeds=1, init="pretrained", pretrain=pretraining)
    report_data = run_accuracy_benchmark(tmp_path / "out", settings, rows=["abmil", "ours_k2"], progress=False)
    assert [a["status"] for a in report_data["aggregates"]] == ["done", "done"]
    info = report_data["tasks"]["morphology"]
    weights = Path(info["weights"])
    assert info["init"] == "pretrained" and weights.name == "resnet34.safetensors"
    assert weights.parent.parent == tmp_path / "out" / "pretrain"
    summary = json.loads((weights.parent / "pretrain.json").read_text())
    assert summary["slides"] == 6 and summary["steps"] == 2  # 9 slides: the 3 test slides were never seen
    for record in report_data["records"]:
        run_dir = Path(record["run_dir"])
        assert run_dir.parts[-4] == f"runs-{accuracy.weights_digest(weights)}"
    import yaml

    config = yaml.safe_load((tmp_path / "out" / f"runs-{accuracy.weights_digest(weights)}" / "morphology" / "ours_k2"
                             / "seed0" / "config.yaml").read_text())
    assert (config["weights"], config["lr_trunk"]) == (str(weights), TrainConfig.lr_trunk)
    features = accuracy.features_folder(tmp_path / "out" / "cohorts" / "morphology", str(weights))
    assert any(features.glob("*.h5"))  # the MIL rows read features of the same weights
    assert "wsilocal pretrain" in (tmp_path / "out" / "accuracy.md").read_text()
    # a second run reuses the pretraining (its weights file is not rewritten)
    before = weights.stat().st_mtime_ns
    run_accuracy_benchmark(tmp_path / "out", settings, rows=["abmil"], progress=False)
    assert weights.stat().st_mtime_ns == before
    assert load_file(str(weights))["conv1.weight"].shape == (64, 3, 7, 7)


def test_runs_before_a_config_field_existed_are_reused_and_other_trunks_have_their_folders(tmp_path):
    config = TrainConfig(cohort="c.csv", out=str(tmp_path), k=4, mask_glass=False)
    old = {k: v for k, v in accuracy._settings_of(config).items() if k not in ("arch", "strict", "mask_glass")}
    (tmp_path / accuracy.RUN_MARKER).write_text(json.dumps({"settings": old, "result": {"auroc": 0.5}}))
    assert accuracy.finished_run(tmp_path, config) == {"auroc": 0.5, "reused": True}  # resnet34, not strict
    with pytest.raises(ConfigError, match=r"finished with other settings \(arch\)"):
        accuracy.finished_run(tmp_path, replace(config, arch="resnet18"))
    # a run from before glass masking existed attended to every position: not the masked run asked for now
    with pytest.raises(ConfigError, match=r"finished with other settings \(mask_glass\)"):
        accuracy.finished_run(tmp_path, replace(config, mask_glass=True))
    assert accuracy.features_folder(tmp_path, None) == tmp_path / "features"
    assert accuracy.features_folder(tmp_path, None, "resnet18") == tmp_path / "features-resnet18"
    assert accuracy.runs_folder(tmp_path, None, "resnet50") == tmp_path / "runs-resnet50"


def test_an_interrupted_pretraining_continues_when_the_benchmark_is_run_again(tmp_path):
    """A long benchmark stopped during pretraining picks it up from its checkpoint on the next run."""
    from safetensors.torch import load_file

    from wsilocal.errors import TrainingInterrupted
    from wsilocal.pretrain.trainer import CHECKPOINT_FILE, pretrain

    pretraining = {"steps": 3, "batch_size": 4, "warmup_steps": 1, "bn_tiles": 8, "tile": 48, "crop": 32,
                   "projector_dims": [32, 16], "workers": 1, "min_tissue": 0.3}
    settings = replace(TINY, seeds=1, init="pretrained", pretrain=pretraining)
    cohort_settings = settings.cohorts[0]
    cohort_csv = accuracy.prepare_synthetic_cohort(cohort_settings, tmp_path / "cohort", progress=False)
    out = tmp_path / "out"
    config = accuracy.pretraining_config(cohort_settings, cohort_csv, out, {**pretraining, "arch": settings.arch})
    with pytest.raises(TrainingInterrupted):
        pretrain(config, progress=False, stop_at=1)  # as a session ending after step 1
    assert (Path(config.out) / CHECKPOINT_FILE).is_file()
    weights = accuracy.task_weights(settings, cohort_settings, cohort_csv, out, progress=False)
    assert json.loads((Path(weights).parent / "pretrain.json").read_text())["steps"] == 3
    # The same weights as a pretraining that was never interrupted.
    straight = pretrain(replace(config, out=str(tmp_path / "straight")), progress=False).weights
    resumed, reference = load_file(weights), load_file(str(straight))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)


def test_confirmation_scores_every_finished_run_on_fresh_slides_as_predict_does(bench, tmp_path, capsys):
    import csv
    import shutil

    out = tmp_path / "accuracy"
    shutil.copytree(bench / "accuracy", out)  # the module's benchmark stays as it was for the other tests
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accuracy, "QUICK", TINY)
        assert main(["bench", "accuracy", "--out", str(out), "--quick", "--rows", *ROWS, "--confirm", "2"]) == 0
    printed = capsys.readouterr().out
    assert "## Confirmation: every finished run scored on 2 fresh test slides per class" in printed
    data = json.loads((out / "accuracy.json").read_text())
    section = data["confirmation"]
    confirm_csv = Path(section["tasks"]["morphology"]["csv"])
    assert confirm_csv == out / "cohorts" / "morphology-confirm-2" / "cohort.csv"
    assert section["tasks"]["morphology"]["seed"] == TINY.cohorts[0].seed + 1000
    cohort_rows = list(csv.DictReader(confirm_csv.open()))
    assert len(cohort_rows) == 6 and {r["split"] for r in cohort_rows} == {"test"}
    # Fresh slides: none is a file of the benchmark's own cohort.
    own = {p.read_bytes() for p in (out / "cohorts" / "morphology").glob("*.svs")}
    assert not own & {p.read_bytes() for p in confirm_csv.parent.glob("*.svs")}
    assert len(section["records"]) == len(data["records"]) == len(RUN_ROWS) * 2
    for record in section["records"]:
        # The run as it is, on those slides: the probabilities `wsilocal predict` gives from the slide files.
        assert main(["predict", "--run", record["run_dir"], "--cohort", str(confirm_csv), "--out",
                     str(tmp_path / "p")]) == 0
        predicted = {r["slide_id"]: [float(r[f"p_{c}"]) for c in record["test_predictions"]["classes"]]
                     for r in csv.DictReader((tmp_path / "p" / "predictions.csv").open())}
        assert sorted(record["test_predictions"]["slide_ids"]) == sorted(predicted) == sorted(
            r["slide_id"] for r in cohort_rows)
        for slide_id, probabilities in zip(record["test_predictions"]["slide_ids"],
                                           record["test_predictions"]["probabilities"], strict=True):
            np.testing.assert_allclose(probabilities, predicted[slide_id], atol=1e-4)
    aggregates = {a["row"]: a for a in section["aggregates"]}
    assert set(aggregates) == set(RUN_ROWS) and aggregates["abmil"]["bootstrap"]["n_slides"] == 6
    assert (out / "accuracy_confirmation.png").is_file()
    assert "## Confirmation" in (out / "accuracy.md").read_text()
    # Run again: every confirmation reused, nothing evaluated again.
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("confirm.json")}
    assert len(markers) == len(RUN_ROWS) * 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accuracy, "QUICK", TINY)
        assert main(["bench", "accuracy", "--out", str(out), "--quick", "--rows", *ROWS, "--confirm", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("confirm.json")} == markers
    assert all(r["reused"] for r in json.loads((out / "accuracy.json").read_text())["confirmation"]["records"])
    capsys.readouterr()
    assert main(["bench", "accuracy", "--out", str(out), "--quick", "--confirm", "0"]) == 2
    assert capsys.readouterr().err == "error: bench accuracy: --confirm must be at least 1 slide per class, got 0\n"
