"""Bootstrap intervals over test slides (wsilocal.bench.stats): the vectorised metrics against metrics.py resample
by resample, stratification, paired differences of identical, better and random predictors."""

from __future__ import annotations

import numpy as np
import pytest

from wsilocal.bench import stats
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
