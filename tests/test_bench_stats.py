"""Bootstrap intervals over test slides (wsilocal.bench.stats) and the accuracy claims decided on them: the
vectorised metrics against metrics.py resample by resample, stratification, paired differences of identical,
better and random predictors, the report's verdicts, and benchmarks whose runs predate per-slide predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from wsilocal.bench import accuracy, report, stats
from wsilocal.train.metrics import classification_metrics


def predictions(labels, strength: float, rng: np.random.Generator, n_classes: int | None = None,
                decimals: int | None = None, ids=None) -> dict:
    """Per-slide predictions as the benchmark records them: softmax of ``strength`` on the true class plus
    standard normal noise (strength 0: scores unrelated to the class)."""
    labels = np.asarray(labels)
    n_classes = n_classes or int(labels.max()) + 1
    logits = strength * np.eye(n_classes)[labels] + rng.normal(size=(len(labels), n_classes))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if decimals is not None:  # coarse scores: many ties within a class's column
        probabilities = probabilities.round(decimals)
    return {"classes": [f"c{c}" for c in range(n_classes)],
            "slide_ids": list(ids) if ids is not None else [f"slide{i}" for i in range(len(labels))],
            "labels": labels.tolist(), "probabilities": probabilities.tolist()}


def balanced_labels(n: int, n_classes: int) -> np.ndarray:
    return np.arange(n) % n_classes


# --- the statistics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes, n, decimals", [(2, 60, 1), (2, 60, None), (3, 90, 1), (3, 31, None)])
def test_resampled_metrics_are_classification_metrics_resample_by_resample(n_classes, n, decimals):
    rng = np.random.default_rng(n + n_classes)
    labels = balanced_labels(n, n_classes)
    p = predictions(labels, 1.0, rng, decimals=decimals)
    probabilities, classes = np.array(p["probabilities"]), p["classes"]
    counts = stats.stratified_counts(labels, 30, seed=4)
    got = stats.resampled_metrics(probabilities, labels, counts)
    for b, index in enumerate(stats.resample_indices(counts)):
        expected = classification_metrics(probabilities[index], labels[index], classes)
        for metric in stats.METRICS:
            assert got[metric][b] == pytest.approx(expected[metric], abs=1e-12), (metric, b)
    # The slides as they are: counts of ones.
    whole = stats.resampled_metrics(probabilities, labels, np.ones((1, n)))
    expected = classification_metrics(probabilities, labels, classes)
    for metric in stats.METRICS:
        assert whole[metric][0] == pytest.approx(expected[metric], abs=1e-12)


def test_auroc_is_undefined_where_a_class_is_missing_as_in_metrics_py():
    probabilities = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    got = stats.resampled_metrics(probabilities, [1, 1, 1], np.ones((1, 3)))
    assert got["auroc"] is None and classification_metrics(probabilities, np.array([1, 1, 1]), ["a", "b"])["auroc"] \
        is None
    assert got["balanced_accuracy"][0] == pytest.approx(2 / 3)


def test_stratified_resampling_keeps_every_class_with_its_count():
    labels = np.array([0] * 30 + [1] * 2 + [2] * 9)  # a class of two slides too
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    counts = stats.stratified_counts(labels, 2000, seed=7)
    assert counts.shape == (2000, len(labels)) and counts.min() >= 0
    for c in range(3):  # every resample draws as many slides of each class as the split holds, from that class
        assert (counts[:, labels == c].sum(axis=1) == (labels == c).sum()).all()
    # and really resamples: slides are left out and drawn twice, each about once per resample on average
    assert (counts == 0).any() and (counts >= 2).any()
    assert counts.mean(axis=0) == pytest.approx(np.ones(len(labels)), abs=0.1)
    np.testing.assert_array_equal(counts, stats.stratified_counts(labels, 2000, seed=7))  # reproducible
    assert not np.array_equal(counts, stats.stratified_counts(labels, 2000, seed=8))
    for index in stats.resample_indices(counts[:5]):
        assert sorted(set(labels[index])) == [0, 1, 2]


def test_paired_interval_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(1)
    labels = balanced_labels(60, 3)
    seeds = [predictions(labels, 1.0, rng, decimals=2) for _ in range(3)]
    for metric in ("balanced_accuracy", "auroc", "accuracy"):
        d = stats.paired_difference(seeds, seeds[::-1], metric)  # the same runs, in another order
        assert (d["estimate"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
        assert d["a"] == d["b"] and d["n_slides"] == 60
        assert stats.reading(d) == "unclear"


def test_a_clearly_better_predictor_excludes_zero_and_random_ones_contain_it():
    rng = np.random.default_rng(2)
    labels = balanced_labels(60, 2)
    good = [predictions(labels, 2.5, rng) for _ in range(3)]  # AUROC ~0.95
    random = [predictions(labels, 0.0, rng) for _ in range(3)]
    for metric in ("balanced_accuracy", "auroc"):
        d = stats.paired_difference(good, random, metric)
        assert d["low"] > 0 and stats.reading(d) == "higher", (metric, d)
        assert d["estimate"] == pytest.approx(d["a"] - d["b"], abs=1e-12)
        flipped = stats.paired_difference(random, good, metric)
        assert stats.reading(flipped) == "lower"
        assert (flipped["low"], flipped["high"]) == pytest.approx((-d["high"], -d["low"]), abs=1e-12)
    # Two predictors that learnt nothing: the interval holds 0 about 19 times in 20.
    held = [stats.reading(stats.paired_difference([predictions(labels, 0.0, rng)], [predictions(labels, 0.0, rng)],
                                                  "auroc", resamples=2000)) == "unclear" for _ in range(40)]
    assert sum(held) >= 34


def test_row_interval_is_around_the_seed_mean_on_the_slides_every_seed_scored():
    rng = np.random.default_rng(3)
    labels = balanced_labels(61, 3)
    seeds = [predictions(labels, 1.0, rng) for _ in range(3)]
    order = rng.permutation(61)  # seed 2 wrote its slides in another order, and one slide fewer
    seeds[2] = {**seeds[2], "slide_ids": [seeds[2]["slide_ids"][i] for i in order[1:]],
                "labels": [seeds[2]["labels"][i] for i in order[1:]],
                "probabilities": [seeds[2]["probabilities"][i] for i in order[1:]]}
    row = stats.bootstrap_row(seeds)
    assert (row["n_slides"], row["seeds"], row["resamples"], row["level"]) == (60, 3, stats.RESAMPLES, 0.95)
    kept = [i for i in range(61) if i != order[0]]
    for metric in stats.METRICS:
        expected = np.mean([classification_metrics(np.array(s["probabilities"])[kept], labels[kept],
                                                   s["classes"])[metric] for s in seeds[:2]]
                           + [classification_metrics(np.array(seeds[2]["probabilities"]),
                                                     np.array(seeds[2]["labels"]), seeds[2]["classes"])[metric]])
        interval = row[metric]
        assert interval["estimate"] == pytest.approx(expected, abs=1e-12)
        assert interval["low"] < interval["estimate"] < interval["high"]
        assert 0.02 < interval["high"] - interval["low"] < 0.4  # 60 slides: a few tenths wide, not a point
    assert stats.bootstrap_row(seeds) == row  # a fixed resampling seed


def test_predictions_of_another_split_are_refused():
    rng = np.random.default_rng(4)
    a = predictions(balanced_labels(10, 2), 1.0, rng)
    b = {**a, "labels": [1 - v for v in a["labels"]]}
    with pytest.raises(ValueError, match="other labels"):
        stats.paired_difference([a], [b], "auroc")
    with pytest.raises(ValueError, match="other classes"):
        stats.paired_difference([a], [{**a, "classes": ["x", "y"]}], "auroc")


# --- the benchmark's records, tables and claims ----------------------------------------------------------------


def record(task: str, row: str, seed: int, p: dict) -> dict:
    """A finished run's record as the benchmark keeps it, with its per-slide predictions ``p``."""
    metrics = classification_metrics(np.array(p["probabilities"]), np.array(p["labels"]), p["classes"])
    result = {"task": task, "row": row, "seed": seed, **{m: metrics[m] for m in accuracy.METRICS},
              "n_test": metrics["n"], "seconds": 10.0, "reused": False}
    return {**result, "test_predictions": p}


def benchmark(strengths: dict[str, float], *, seed: int = 0, old: tuple[str, ...] = (), n: int = 60) -> dict:
    """An accuracy report of the binary context task, ``n`` test slides, 3 seeds per row, rows scoring with the
    given strengths; ``old`` rows' records have no per-slide predictions."""
    rng = np.random.default_rng(seed)
    labels = balanced_labels(n, 2)
    records = []
    for row, strength in strengths.items():
        for s in range(3):
            records.append(record("context", row, s, predictions(labels, strength, rng)))
            if row in old:
                del records[-1]["test_predictions"]
    aggregates = [{"task": "context", "row": row, "label": accuracy.ROWS[row].label, "status": "done",
                   **accuracy.aggregate([r for r in records if r["row"] == row])} for row in strengths]
    classes = ["near", "far"]
    tasks = {"context": {"classes": classes, "slides": {"train": 80, "val": 30, "test": n}, "feature_skipped": {},
                         "paper_dataset": "TCGA-NSCLC", "chance_95": CHANCE_60}}
    demo = {"lr_trunk": 1e-3, "lr_aux": 1e-3, "accumulation": 1, "rfr_patches": 4}
    return {"settings": {"epochs": 6, "mil_epochs": 50, "cohorts": [], "demo": demo}, "seeds": [0, 1, 2],
            "rows": list(strengths), "tasks": tasks, "records": records, "aggregates": aggregates}


CHANCE_60 = accuracy.chance_levels(balanced_labels(60, 2), 2, draws=20_000)
K4_MIL = "`context`: ours K=4 is more accurate than every tile-based MIL baseline"
K4_MIL_AUROC = "`context`: ours K=4 ranks slides (AUROC) better than every tile-based MIL baseline"
K4_STREAMING = "`context`: ours K=4 is more accurate than StreamingCNN"


def claims_of(data: dict) -> dict[str, dict]:
    return {c["claim"]: c for c in report.paper_claims({"accuracy": data})}


def test_the_verdict_follows_the_paired_interval():
    data = benchmark({"ours_k4": 2.5, "abmil": 0.0, "maxpool": 0.5, "streaming": 2.5, "ours_k4_norfr": 2.5})
    paired = {(p["claim"], p["other"]): p["difference"] for p in accuracy.paired_comparisons(data)}
    claims = claims_of(data)
    # Above both MIL rows on the same 60 slides: agrees, and "ours" shows the closest comparison's interval.
    c = claims[K4_MIL]
    closest = min(("abmil", "maxpool"), key=lambda r: paired[(K4_MIL.split(": ")[1], r)]["low"])
    d = paired[(K4_MIL.split(": ")[1], closest)]
    assert d["low"] > 0 and (c["verdict"], c["why"]) == ("agrees", "")
    assert c["ours"] == (f"balanced accuracy {d['a']:.3f} vs closest MIL ({closest}) {d['b']:.3f}: "
                         f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] (paired 95 % interval, 60 test "
                         "slides; above 2 of 2 MIL rows)")
    assert claims[K4_MIL_AUROC]["verdict"] == "agrees"
    # As good as StreamingCNN and as without RFR: the interval holds 0 and the reason states it.
    for text, other in ((K4_STREAMING, "streaming"), ("`context`: RFR improves the accuracy of K=4", "ours_k4_norfr")):
        d = paired[(text.split(": ")[1], other)]
        assert d["low"] <= 0 <= d["high"]
        c = claims[text]
        assert c["verdict"] == "inconclusive"
        assert c["why"] == (f"the difference to {accuracy.ROWS[other].label} is {d['estimate']:+.3f} "
                            f"[{d['low']:+.3f}, {d['high']:+.3f}] (balanced accuracy, paired 95 % bootstrap interval "
                            "over 60 test slides): the interval holds 0, so these 60 test slides cannot tell the two "
                            "apart.")
    # K=8 did not run: pending.
    assert claims["`context`: ours K=8 is more accurate than every tile-based MIL baseline"]["verdict"] == "pending"


def test_a_row_above_ours_on_the_same_slides_makes_it_disagree_and_chance_still_gates():
    data = benchmark({"ours_k4": 0.6, "abmil": 3.0, "maxpool": 0.6})
    c = claims_of(data)[K4_MIL]
    (d,) = [p["difference"] for p in accuracy.paired_comparisons(data)
            if p["other"] == "abmil" and p["metric"] == "balanced_accuracy"]
    assert d["high"] < 0 and c["verdict"] == "disagrees"
    assert c["why"].startswith(f"ABMIL scores higher on the same slides: {d['estimate']:+.3f} [{d['low']:+.3f}, "
                               f"{d['high']:+.3f}] (balanced accuracy, paired 95 % bootstrap interval over 60 test "
                               "slides). Our trunk learns its features end to end in 6 epochs")
    assert c["ours"].startswith(f"balanced accuracy {d['a']:.3f} vs best MIL (abmil) {d['b']:.3f}: ")
    # Rows that learnt nothing: even a difference whose interval excludes 0 says nothing about the methods.
    nothing = benchmark({"ours_k4": 0.0, "abmil": 0.0}, seed=5)
    c = claims_of(nothing)[K4_MIL]
    assert c["verdict"] == "inconclusive" and c["why"].startswith(
        "neither learnt the task: both at or below what random scores reach on this test split one time in 20 "
        f"(balanced accuracy {CHANCE_60['balanced_accuracy']:.2f})")
    assert "(difference " in c["why"] and "paired 95 % bootstrap interval over 60 test slides" in c["why"]


def test_a_shortcut_still_makes_an_agreement_inconclusive():
    data = benchmark({"ours_k4": 1.5, "abmil": 0.0})
    assert claims_of(data)[K4_MIL]["verdict"] == "agrees"
    ours_auroc = [a for a in data["aggregates"] if a["row"] == "ours_k4"][0]["auroc"]["mean"]
    data["tasks"]["context"]["shortcuts"] = {"slide area (mm²)": ours_auroc}  # ranks the slides as well as ours
    c = claims_of(data)[K4_MIL]
    assert c["verdict"] == "inconclusive" and c["why"].startswith("slide area (mm²) alone ranks the test slides")
    # and, as the bar a row must clear to have learnt anything, it makes the AUROC claim say nothing was learnt
    assert claims_of(data)[K4_MIL_AUROC]["why"].startswith("neither learnt the task: both at or below what slide "
                                                          "area (mm²) alone reaches here")


def test_old_runs_without_per_slide_predictions_still_report_by_the_seed_spread(tmp_path):
    data = benchmark({"ours_k4": 2.5, "abmil": 0.0, "maxpool": 0.5}, old=("abmil",))
    (abmil,) = [a for a in data["aggregates"] if a["row"] == "abmil"]
    assert abmil["bootstrap"] is None and abmil["bootstrap_note"] == accuracy.NO_PREDICTIONS
    claims = claims_of(data)
    c = claims[K4_MIL]  # one MIL row lacks predictions: the whole claim falls back to today's rule, and says so
    assert c["ours"].endswith(f"; {report.SEED_SPREAD_NOTE})") and c["verdict"] == "agrees"
    assert claims[K4_MIL_AUROC]["ours"].endswith(f"; {report.SEED_SPREAD_NOTE})")
    # accuracy.md, .json and .png are written: intervals where there are predictions, a note where there are none.
    accuracy.write_accuracy_report({**data, "seconds": 60.0}, tmp_path)
    text = (tmp_path / "accuracy.md").read_text()
    (ours,) = [a for a in data["aggregates"] if a["row"] == "ours_k4"]
    boot = ours["bootstrap"]["balanced_accuracy"]
    assert (f"| ours K=4 | {ours['accuracy']['mean']:.3f} ± {ours['accuracy']['std']:.3f} "
            f"[{ours['bootstrap']['accuracy']['low']:.3f}, {ours['bootstrap']['accuracy']['high']:.3f}] | "
            f"{ours['balanced_accuracy']['mean']:.3f} ± {ours['balanced_accuracy']['std']:.3f} "
            f"[{boot['low']:.3f}, {boot['high']:.3f}] |") in text
    assert (f"| ABMIL | {abmil['accuracy']['mean']:.3f} ± {abmil['accuracy']['std']:.3f} | "
            f"{abmil['balanced_accuracy']['mean']:.3f} ± {abmil['balanced_accuracy']['std']:.3f} | ") in text
    assert f"No interval for ABMIL ({accuracy.NO_PREDICTIONS}): ± is the seed spread alone" in text
    assert f"| ours K=4 is more accurate than every tile-based MIL baseline | ABMIL | balanced accuracy | | — | " \
           f"{accuracy.NO_PREDICTIONS} |" in text
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    (maxpool,) = [p for p in saved["paired"] if p["other"] == "maxpool" and p["metric"] == "balanced_accuracy"
                  and p["row"] == "ours_k4"]
    d = maxpool["difference"]
    assert (f"| ours K=4 is more accurate than every tile-based MIL baseline | max-pooling | balanced accuracy | 60 | "
            f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | ours K=4 higher |") in text
    with Image.open(tmp_path / "accuracy.png") as png:
        assert png.format == "PNG"
    # The report reads the same claims from accuracy.json; and an accuracy.json from before the intervals (no
    # "paired", records without predictions) still gives every claim, by the seed spread.
    assert claims_of(saved) == claims
    for r in saved["records"]:
        r.pop("test_predictions", None)
    del saved["paired"]
    assert all(c["ours"].endswith(f"; {report.SEED_SPREAD_NOTE})") for c in claims_of(saved).values()
               if c["verdict"] != "pending")


def test_reused_runs_take_their_predictions_from_the_run_directory_when_they_agree(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Config:
        epochs: int = 1

    rng = np.random.default_rng(6)
    p = predictions(balanced_labels(12, 3), 1.0, rng, decimals=6)
    metrics = classification_metrics(np.array(p["probabilities"]), np.array(p["labels"]), p["classes"])
    result = {**{m: metrics[m] for m in accuracy.METRICS}, "n_test": 12, "seconds": 1.0}
    (tmp_path / accuracy.RUN_MARKER).write_text(json.dumps({"settings": {"epochs": 1}, "result": result}))
    assert "test_predictions" not in accuracy.finished_run(tmp_path, Config())  # no predictions_test.csv
    lines = ["slide_id,label,predicted," + ",".join(f"p_{c}" for c in p["classes"])]
    for slide_id, label, probs in zip(p["slide_ids"], p["labels"], p["probabilities"], strict=True):
        lines.append(f"{slide_id},{p['classes'][label]},{p['classes'][int(np.argmax(probs))]},"
                     + ",".join(f"{v:.6f}" for v in probs))
    (tmp_path / accuracy.PREDICTIONS_FILE).write_text("\n".join(lines) + "\n")
    reused = accuracy.finished_run(tmp_path, Config())
    assert reused["reused"] and reused["test_predictions"] == accuracy.read_test_predictions(tmp_path)
    np.testing.assert_allclose(reused["test_predictions"]["probabilities"], p["probabilities"], atol=1e-12)
    # A file from a later evaluation (other metrics than the marker's) is not taken for the run's.
    result["auroc"] -= 0.1
    (tmp_path / accuracy.RUN_MARKER).write_text(json.dumps({"settings": {"epochs": 1}, "result": result}))
    assert "test_predictions" not in accuracy.finished_run(tmp_path, Config())
