"""Bootstrap confidence intervals over test slides, for one method and for the difference between two.

The accuracy benchmark decides the paper's claims on these, not on the spread over seeds: every seed is scored
on the same few dozen test slides, so seeds agreeing says nothing about how the slides happened to fall. The
interval is a 95 % percentile bootstrap over test slides:

* resamples draw, per class, as many slides as the class has, with replacement (stratified: every class stays
  present, so balanced accuracy and AUROC are defined on every resample and the class shares stay those of the
  split);
* on each resample the metric is computed per seed and averaged over seeds, so the estimate is the seed mean
  and the interval covers slide sampling (seeds are not pooled into one prediction);
* a *paired* difference between two methods scores both on the same resampled slides, so what the slides
  share (an easy slide is easy for both) cancels out.

Metrics are those of :func:`wsilocal.train.metrics.classification_metrics`: balanced accuracy (mean recall of
the classes present), AUROC (Mann–Whitney with ties counted 1/2: binary on the positive class's score for two
classes, macro one-vs-rest otherwise) and accuracy. A resample is held as counts per slide, shape (B, N), and the
metrics of all resamples come from a few matrix products: 5000 resamples of 100 slides in well under a second.

Per-slide predictions are plain dicts, as the benchmark records them: ``{"classes": [...], "slide_ids": [...],
"labels": [int, ...], "probabilities": [[float, ...], ...]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESAMPLES = 5000
SEED = 0  # of the resampling: the same OUT gives the same intervals
LEVEL = 0.95
METRICS = ("accuracy", "balanced_accuracy", "auroc")

Predictions = Mapping[str, Any]


def stratified_counts(labels: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """How often each slide is drawn in each of ``resamples`` stratified bootstrap resamples, shape (B, N).

    Per class, each resample draws the class's n_c slides n_c times with replacement, so every row's counts sum to
    n_c over each class's slides. The same ``labels`` and ``seed`` give the same counts, which is what pairs two
    methods' resamples.
    """
    labels = np.asarray(labels, int)
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, len(labels)), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        drawn = rng.integers(0, n, size=(resamples, n))
        flat = (np.arange(resamples)[:, None] * n + drawn).ravel()
        counts[:, members] = np.bincount(flat, minlength=resamples * n).reshape(resamples, n)
    return counts


def resample_indices(counts: np.ndarray) -> list[np.ndarray]:
    """The slide indices of each resample (``counts`` of :func:`stratified_counts`), e.g. to score them one by one."""
    return [np.repeat(np.arange(counts.shape[1]), row) for row in counts]


def resampled_metrics(probabilities: np.ndarray, labels: Sequence[int],
                      counts: np.ndarray) -> dict[str, np.ndarray | None]:
    """Accuracy, balanced accuracy and AUROC of one (N, C) probability array on every resample of ``counts``
    (B, N), as ``classification_metrics`` computes them on the resampled slides; each (B,), NaN on a resample
    where the metric is undefined, None where it is undefined on the slides themselves (AUROC with one class).

    ``counts`` of ones, shape (1, N), scores the slides as they are.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    weights = np.asarray(counts, np.float64)
    n_classes = probabilities.shape[1]
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = weights @ correct / total
        recalls = []
        for c in np.unique(labels):
            members = labels == c
            support = weights[:, members].sum(axis=1)
            recalls.append(np.where(support > 0, weights[:, members] @ correct[members] / support, np.nan))
        balanced = _nanmean(recalls)
        aurocs = []
        for c in [1] if n_classes == 2 else range(n_classes):  # binary: the positive class, as metrics.py
            positive = labels == c
            if not positive.any() or positive.all():
                continue
            score = probabilities[:, c]
            above = score[positive][:, None] - score[~positive][None, :]
            wins = (above > 0) + 0.5 * (above == 0)  # (n_pos, n_neg): Mann–Whitney, ties count 1/2
            w_pos, w_neg = weights[:, positive], weights[:, ~positive]
            pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
            aurocs.append(np.where(pairs > 0, ((w_pos @ wins) * w_neg).sum(axis=1) / pairs, np.nan))
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "auroc": _nanmean(aurocs) if aurocs else None}


def _nanmean(arrays: list[np.ndarray]) -> np.ndarray:
    stacked = np.vstack(arrays)
    present = ~np.isnan(stacked)
    with np.errstate(invalid="ignore"):
        return np.where(present.any(axis=0), np.nansum(stacked, axis=0) / present.sum(axis=0), np.nan)


def common_slides(predictions: Sequence[Predictions]) -> tuple[list[str], np.ndarray]:
    """The slides every one of ``predictions`` scored (in the first one's order) and their labels (indices into the
    first one's classes; the others' columns are put in that order by :func:`aligned_probabilities`).

    Raises ValueError when they disagree on the classes or on a slide's label (not the same test split).
    """
    first = predictions[0]
    classes = list(first["classes"])
    shared = set(first["slide_ids"])
    for p in predictions[1:]:
        if sorted(p["classes"]) != sorted(classes):
            raise ValueError(f"predictions of other classes: {list(p['classes'])} vs {classes}")
        shared &= set(p["slide_ids"])
    slide_ids = [s for s in first["slide_ids"] if s in shared]
    label_of = {s: classes[label] for s, label in zip(first["slide_ids"], first["labels"], strict=True)}
    for p in predictions[1:]:
        if any(label_of[s] != p["classes"][label] for s, label in zip(p["slide_ids"], p["labels"], strict=True)
               if s in shared):
            raise ValueError("predictions with other labels for the same slide")
    return slide_ids, np.array([classes.index(label_of[s]) for s in slide_ids], int)


def aligned_probabilities(p: Predictions, slide_ids: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """The (N, C) probabilities of ``p`` for ``slide_ids``, columns in the order of ``classes``."""
    row_of = {s: i for i, s in enumerate(p["slide_ids"])}
    columns = [list(p["classes"]).index(c) for c in classes]
    return np.asarray(p["probabilities"], np.float64)[[row_of[s] for s in slide_ids]][:, columns]


def seed_mean_metrics(seeds: Sequence[Predictions], slide_ids: Sequence[str], labels: np.ndarray,
                      counts: np.ndarray, classes: Sequence[str]) -> dict[str, tuple[float, np.ndarray] | None]:
    """Per metric: the seed mean on ``slide_ids`` (with ``labels``, indices into ``classes``) as they are, and the
    seed mean on each resample of ``counts`` (B,); None where the metric is undefined."""
    ones = np.ones((1, len(slide_ids)))
    probabilities = [aligned_probabilities(p, slide_ids, classes) for p in seeds]
    full = [resampled_metrics(p, labels, ones) for p in probabilities]
    boot = [resampled_metrics(p, labels, counts) for p in probabilities]
    result: dict[str, tuple[float, np.ndarray] | None] = {}
    for metric in METRICS:
        if full[0][metric] is None:
            result[metric] = None
            continue
        result[metric] = (float(_seed_mean(np.array([f[metric] for f in full]))[0]),
                          _seed_mean(np.array([b[metric] for b in boot])))
    return result


def _seed_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the seeds (axis 0), summed in sorted order: the same runs in any order give the same bits, so the
    paired difference of a method with itself is exactly 0."""
    return np.sort(values, axis=0).mean(axis=0)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap ``values`` (NaNs, resamples where the metric is undefined, left out)."""
    tail = (1 - level) / 2
    low, high = np.nanquantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_row(seeds: Sequence[Predictions], *, resamples: int = RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> dict[str, Any]:
    """Point estimate (seed mean) and percentile interval of each metric of one method, over its test slides.

    ``seeds``: the per-slide predictions of each seed's run. Returns ``{"n_slides", "seeds", "resamples",
    "level", <metric>: {"estimate", "low", "high"} or None}``.
    """
    slide_ids, labels = common_slides(seeds)
    counts = stratified_counts(labels, resamples, seed)
    result: dict[str, Any] = {"n_slides": len(slide_ids), "seeds": len(seeds), "resamples": resamples,
                              "level": level}
    for metric, value in seed_mean_metrics(seeds, slide_ids, labels, counts, seeds[0]["classes"]).items():
        if value is None:
            result[metric] = None
            continue
        low, high = percentile_interval(value[1], level)
        result[metric] = {"estimate": value[0], "low": low, "high": high}
    return result


def paired_difference(a: Sequence[Predictions], b: Sequence[Predictions], metric: str, *,
                      resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, Any] | None:
    """The difference metric(A) − metric(B) of two methods' seed means on the slides both scored, with the
    percentile interval of that difference over resamples that draw the same slides for both.

    Returns ``{"n_slides", "resamples", "level", "estimate", "low", "high", "a", "b"}`` (``a``, ``b``: each
    method's seed mean on those slides), or None where the metric is undefined there.
    """
    slide_ids, labels = common_slides([*a, *b])
    counts = stratified_counts(labels, resamples, seed)
    of_a = seed_mean_metrics(a, slide_ids, labels, counts, a[0]["classes"])[metric]
    of_b = seed_mean_metrics(b, slide_ids, labels, counts, a[0]["classes"])[metric]
    if of_a is None or of_b is None:
        return None
    low, high = percentile_interval(of_a[1] - of_b[1], level)
    return {"n_slides": len(slide_ids), "resamples": resamples, "level": level, "estimate": of_a[0] - of_b[0],
            "low": low, "high": high, "a": of_a[0], "b": of_b[0]}


def reading(difference: Mapping[str, float]) -> str:
    """What a paired interval says: ``higher`` (A above B: the lower bound above 0), ``lower`` (the upper bound
    below 0) or ``unclear`` (the interval holds 0)."""
    if difference["low"] > 0:
        return "higher"
    if difference["high"] < 0:
        return "lower"
    return "unclear"
