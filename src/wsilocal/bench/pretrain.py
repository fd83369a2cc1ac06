"""``wsilocal bench pretrain``: does ``wsilocal pretrain`` learn features that tell tissue apart?

On a synthetic morphology cohort (the accuracy benchmark's own, so one ``OUT`` serves both) the generator knows
which pixels are lesion (:func:`wsilocal.synth.label_mask`). That gives every tile a class without any
slide label: a tile mostly inside the lesion takes the slide's arrangement (glandular, solid, papillary, …), a tile
of tissue with no lesion in it is ``other tissue``, and tiles in between are left out. So the tile task has
``classes + 1`` classes, and the look-alike structures the generator scatters over the normal tissue make
``other tissue`` hard to tell from the lesions.

The trunk is pretrained on the cohort's train and val slides (never the test split), then two probes read frozen
512-d features (global average pooling of ``layer4``, the MIL baselines' features) of tiles:

* a linear probe: multinomial logistic regression with class-balanced loss on standardised features, trained on
  the train split's tiles, its L2 weight chosen on the val split's tiles;
* a k-nearest-neighbour probe (cosine similarity, k = 20, majority vote), the train split's tiles as the bank.

Both are scored on the **test split's tiles** (held-out slides) by balanced accuracy, for random weights (the
initialisation every random row of the accuracy benchmark uses) and for the pretrained weights, in the same run.
Finished steps are reused when the command runs again (the cohort, the pretraining, the features).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wsilocal.atomic import write_text_atomic
from wsilocal.bench.accuracy import FULL as ACCURACY_FULL
from wsilocal.bench.accuracy import QUICK as ACCURACY_QUICK
from wsilocal.bench.accuracy import CohortSettings
from wsilocal.errors import ConfigError
from wsilocal.plotting import pyplot

OTHER_TISSUE = "other tissue"
KNN_K = 20
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # weights of the linear probe's L2 penalty, chosen on the val split


@dataclass(frozen=True)
class PretrainBenchSettings:
    """What ``bench pretrain`` runs.

    Attributes:
        cohort: the morphology cohort (the accuracy benchmark's by default, so its pretraining is reused there).
        pretrain: :class:`~wsilocal.config.PretrainConfig` fields of the pretraining (steps, batch size, ...).
        probe_tile: edge of a probe tile in px at the cohort's MPP.
        lesion_share: least lesion share of a tile that takes the slide's arrangement as its class.
        max_other_per_slide: at most this many ``other tissue`` tiles per slide (they outnumber lesion tiles).
    """

    cohort: CohortSettings
    pretrain: dict[str, Any] = field(default_factory=dict)
    probe_tile: int = 64
    lesion_share: float = 0.5
    max_other_per_slide: int = 8
    workers: int = 2


# The accuracy benchmark's cohort and pretraining: an OUT holding both benchmarks pretrains once.
FULL = PretrainBenchSettings(ACCURACY_FULL.cohort("morphology"), pretrain=ACCURACY_FULL.pretrain)
QUICK = PretrainBenchSettings(ACCURACY_QUICK.cohort("morphology"), probe_tile=32, pretrain=ACCURACY_QUICK.pretrain)


# --- labelled tiles ------------------------------------------------------------------------------------------


@dataclass
class LabelledTiles:
    """Tiles of a cohort with a class each: level-0 corners per slide, the class index and the split."""

    classes: list[str]
    slides: list[tuple[str, str, str]]  # (slide id, path, split)
    corners: list[np.ndarray]  # per slide, int64 (N, 2)
    labels: list[np.ndarray]  # per slide, int64 (N,)

    def counts(self, split: str) -> dict[str, int]:
        found = np.concatenate([lab for (_, _, s), lab in zip(self.slides, self.labels, strict=True) if s == split]
                               or [np.zeros(0, np.int64)])
        return {name: int((found == c).sum()) for c, name in enumerate(self.classes)}


def labelled_tiles(cohort_folder: Path, *, mpp: float, tile: int, lesion_share: float,
                   max_other_per_slide: int, seed: int = 0) -> LabelledTiles:
    """Every grid tile of the cohort's slides with a class from the generator's masks (see the module docstring)."""
    from PIL import Image

    from wsilocal.features.tiles import tile_grid, tile_size_level0
    from wsilocal.slide.reader import open_slide
    from wsilocal.slide.tissue import detect_tissue

    meta = json.loads((cohort_folder / "synth.json").read_text())
    classes = list(meta["classes"]) + [OTHER_TISSUE]
    rng = np.random.default_rng(seed)
    result = LabelledTiles(classes, [], [], [])
    for slide_id, info in meta["slides"].items():
        mask = np.asarray(Image.open(cohort_folder / info["mask"]))
        down = info["mask_downsample"]
        path = cohort_folder / "slides" / f"{slide_id}.svs"
        with open_slide(path) as slide:
            coords = np.array(tile_grid(slide, detect_tissue(slide), mpp, tile, min_tissue=0.5), np.int64)
            size = tile_size_level0(slide, mpp, tile)
        if len(coords) == 0:
            continue
        lesion, tissue = _mask_shares(mask, down, coords, size)
        labels = np.full(len(coords), -1, np.int64)
        labels[lesion >= lesion_share] = meta["classes"].index(info["label"])
        other = np.flatnonzero((lesion == 0) & (tissue >= 0.5))
        keep_other = rng.permutation(other)[:max_other_per_slide]
        labels[keep_other] = len(classes) - 1
        kept = labels >= 0
        result.slides.append((slide_id, str(path), info["split"]))
        result.corners.append(coords[kept])
        result.labels.append(labels[kept])
    return result


def _mask_shares(mask: np.ndarray, down: int, coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesion and tissue shares of each tile (level-0 corner, edge ``size``) on a mask of ``down`` px per pixel."""
    from wsilocal.synth import MASK_LESION, MASK_TISSUE

    lesion, tissue = [], []
    for x, y in coords:
        window = mask[y // down: math.ceil((y + size) / down), x // down: math.ceil((x + size) / down)]
        lesion.append(float((window == MASK_LESION).mean()) if window.size else 0.0)
        tissue.append(float((window >= MASK_TISSUE).mean()) if window.size else 0.0)
    return np.array(lesion), np.array(tissue)


# --- features and probes -------------------------------------------------------------------------------------


def tile_features_of(tiles: LabelledTiles, weights: str | None, *, mpp: float, tile: int,
                     progress: bool = True) -> list[np.ndarray]:
    """Per slide, float32 (N, 512) features of its labelled tiles with ``weights`` (None: random ResNet34)."""
    from tqdm import tqdm

    from wsilocal.features.extract import FeatureExtractor, tile_features
    from wsilocal.slide.reader import open_slide

    extractor = FeatureExtractor(weights)
    features = []
    with tqdm(total=len(tiles.slides), desc="features" + (" (random)" if weights is None else ""), unit="slide",
              leave=False, disable=not progress) as bar:
        for (_, path, _), corners in zip(tiles.slides, tiles.corners, strict=True):
            with open_slide(path) as slide:
                features.append(tile_features(slide, [tuple(c) for c in corners], extractor, mpp, tile)
                                if len(corners) else np.zeros((0, extractor.dim), np.float32))
            bar.update()
    return features


def _slides_of(tiles: LabelledTiles, split: str) -> list[int]:
    return [i for i, (_, _, s) in enumerate(tiles.slides) if s == split]


def _split_arrays(tiles: LabelledTiles, features: list[np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
    chosen = _slides_of(tiles, split)
    x = np.concatenate([features[i] for i in chosen] or [np.zeros((0, 512), np.float32)])
    y = np.concatenate([tiles.labels[i] for i in chosen] or [np.zeros(0, np.int64)])
    return x.astype(np.float64), y


def tile_slides(tiles: LabelledTiles, split: str) -> np.ndarray:
    """For each tile of ``split`` (in :func:`_split_arrays`' order), the number of its slide within the split."""
    chosen = _slides_of(tiles, split)
    return np.concatenate([np.full(len(tiles.labels[i]), k) for k, i in enumerate(chosen)] or [np.zeros(0, int)])


def slide_bootstrap(predicted: dict[str, np.ndarray], labels: np.ndarray, slide_of_tile: np.ndarray, n_classes: int,
                    *, resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95 % intervals of each predictor's balanced accuracy and of their paired differences, by bootstrap over the
    test *slides* (tiles of one slide are not independent): each resample draws the slides with replacement and
    scores every predictor on the tiles of the drawn slides, counted as often as their slide was drawn."""
    rng = np.random.default_rng(seed)
    n_slides = int(slide_of_tile.max()) + 1 if len(slide_of_tile) else 0
    names = list(predicted)
    draws = {name: [] for name in names}
    for _ in range(resamples):
        weight = np.bincount(rng.integers(0, n_slides, n_slides), minlength=n_slides)[slide_of_tile]
        for name in names:
            recalls = [weight[(labels == c) & (predicted[name] == c)].sum() / weight[labels == c].sum()
                       for c in range(n_classes) if weight[labels == c].sum() > 0]
            draws[name].append(float(np.mean(recalls)))
    values = {name: np.array(v) for name, v in draws.items()}
    interval = {name: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] for name, v in values.items()}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = values[b] - values[a]
            interval[f"{b} - {a}"] = [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))]
    return interval


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``labels``."""
    recalls = [float((predicted[labels == c] == c).mean()) for c in range(n_classes) if (labels == c).any()]
    return float(np.mean(recalls)) if recalls else math.nan


def fit_linear_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, iterations: int = 300):
    """Multinomial logistic regression, class-balanced cross-entropy + ``l2``·‖W‖², by L-BFGS; returns a predictor
    of class indices for new features (standardised with the training features' mean and std)."""
    import torch

    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weight = torch.from_numpy(np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0))
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt, weight=weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w_final, b_final = w.detach().numpy(), b.detach().numpy()
    return lambda features: np.argmax(((features - mean) / std) @ w_final + b_final, axis=1)


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, n_classes: int,
                k: int = KNN_K) -> np.ndarray:
    """Majority vote of the ``k`` most cosine-similar bank features (ties: the lower class index)."""
    a = bank / (np.linalg.norm(bank, axis=1, keepdims=True) + 1e-12)
    q = queries / (np.linalg.norm(queries, axis=1, keepdims=True) + 1e-12)
    k = min(k, len(a))
    nearest = np.argsort(-(q @ a.T), axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(q), n_classes), np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(q)), k), bank_labels[nearest].ravel()), 1)
    return votes.argmax(axis=1)


def probe_scores(tiles: LabelledTiles, features: list[np.ndarray]) -> dict[str, Any]:
    """Linear and k-NN probe balanced accuracy on the test split's tiles (the linear probe's L2 from val)."""
    n = len(tiles.classes)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        _split_arrays(tiles, features, s) for s in ("train", "val", "test"))
    if not (len(y_train) and len(y_val) and len(y_test)):
        raise ConfigError("bench pretrain: every split needs labelled tiles (a larger cohort, or smaller tiles)")
    by_l2 = {}
    for l2 in L2_GRID:
        predictor = fit_linear_probe(x_train, y_train, n, l2)
        by_l2[l2] = (balanced_accuracy(predictor(x_val), y_val, n), predictor)
    best_l2 = max(L2_GRID, key=lambda v: by_l2[v][0])  # ties: the first (weakest penalty) of the grid
    linear = by_l2[best_l2][1](x_test)
    knn = knn_predict(x_train, y_train, x_test, n)
    return {"predicted": {"linear": linear, "knn": knn}, "labels": y_test,
            "linear_balanced_accuracy": balanced_accuracy(linear, y_test, n),
            "linear_accuracy": float((linear == y_test).mean()), "linear_l2": best_l2,
            "linear_val_balanced_accuracy": by_l2[best_l2][0],
            "knn_balanced_accuracy": balanced_accuracy(knn, y_test, n), "knn_accuracy": float((knn == y_test).mean()),
            "n_test_tiles": int(len(y_test))}


# --- the benchmark -------------------------------------------------------------------------------------------


def run_pretrain_benchmark(out: str | Path, settings: PretrainBenchSettings = FULL, *,
                           accuracy_out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate (or reuse) the cohort, pretrain (or reuse), probe random and pretrained features; write the report
    into ``out``. The cohort and the pretraining live in ``accuracy_out`` (default ``out``): give the accuracy
    benchmark's OUT to share them with it."""
    from wsilocal.bench.accuracy import prepare_synthetic_cohort, pretraining_config
    from wsilocal.pretrain.trainer import pretrain

    out = Path(out)
    shared = Path(accuracy_out) if accuracy_out is not None else out
    started = time.perf_counter()
    cohort_csv = prepare_synthetic_cohort(settings.cohort, shared / "cohorts" / settings.cohort.task,
                                          workers=settings.workers, progress=progress)
    config = pretraining_config(settings.cohort, cohort_csv, shared, settings.pretrain)
    result = pretrain(config, progress=progress)
    tiles = labelled_tiles(cohort_csv.parent, mpp=settings.cohort.mpp, tile=settings.probe_tile,
                           lesion_share=settings.lesion_share, max_other_per_slide=settings.max_other_per_slide)
    weights = {"random": None, "pretrained": str(result.weights)}
    scores, predicted = {}, {}
    for name, path in weights.items():
        start = time.perf_counter()
        features = tile_features_of(tiles, path, mpp=settings.cohort.mpp, tile=settings.probe_tile,
                                    progress=progress)
        scores[name] = probe_scores(tiles, features)
        labels = scores[name].pop("labels")
        for probe, values in scores[name].pop("predicted").items():
            predicted[f"{probe} {name}"] = values
        scores[name]["seconds"] = round(time.perf_counter() - start, 1)
    slides = tile_slides(tiles, "test")
    intervals = {}
    for probe in ("linear", "knn"):
        pair = {name: predicted[f"{probe} {name}"] for name in weights}
        for key, value in slide_bootstrap(pair, labels, slides, len(tiles.classes)).items():
            intervals[f"{probe} {key}"] = value
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": asdict(settings),
        "classes": tiles.classes, "tiles": {s: tiles.counts(s) for s in ("train", "val", "test")},
        "pretrain": {k: result.summary.get(k) for k in ("steps", "tiles_seen", "train_seconds", "cpu_seconds",
                                                        "first_loss", "final_loss", "slides", "device", "processes")},
        "pretrain_folder": str(result.out), "scores": scores, "intervals_95": intervals,
        "n_test_slides": int(slides.max()) + 1 if len(slides) else 0,
        "gain": {m: scores["pretrained"][m] - scores["random"][m]
                 for m in ("linear_balanced_accuracy", "knn_balanced_accuracy")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_pretrain_report(report, out)
    return report


def format_pretrain_report(report: dict[str, Any]) -> str:
    """Markdown: tile counts, pretraining cost and the probes' balanced accuracy on held-out slides."""
    p, classes = report["pretrain"], report["classes"]
    counts = "; ".join(f"{split}: " + ", ".join(f"{name} {n}" for name, n in c.items())
                       for split, c in report["tiles"].items())
    lines = [f"Tile classes: {', '.join(classes)} (chance balanced accuracy {1 / len(classes):.2f}). Tiles: {counts}.",
             "", f"Pretraining: {p['steps']} steps, {p['tiles_seen']} tiles, {p['train_seconds'] / 60:.1f} min on "
                 f"{p['device']} × {p['processes']} ({p['cpu_seconds'] / 60:.0f} CPU-min), loss "
                 f"{p['first_loss']:.3f} → {p['final_loss']:.3f}, {p['slides']} slides (train and val splits).", "",
             "| weights | linear probe, balanced accuracy | linear probe, accuracy | k-NN (k=20), balanced accuracy | "
             "k-NN, accuracy |", "|---|---:|---:|---:|---:|"]
    ci = report.get("intervals_95", {})

    def cell(value: float, key: str) -> str:
        low_high = ci.get(key)
        return f"{value:.3f}" + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")

    for name, s in report["scores"].items():
        lines.append(f"| {name} | {cell(s['linear_balanced_accuracy'], f'linear {name}')} | "
                     f"{s['linear_accuracy']:.3f} | {cell(s['knn_balanced_accuracy'], f'knn {name}')} | "
                     f"{s['knn_accuracy']:.3f} |")
    gain = report["gain"]
    differences = {probe: ci.get(f"{probe} pretrained - random") for probe in ("linear", "knn")}
    shown = {p: f" [{d[0] * 100:+.1f}, {d[1] * 100:+.1f}]" if d else "" for p, d in differences.items()}
    lines += ["", f"Gain of pretraining: linear {gain['linear_balanced_accuracy'] * 100:+.1f}{shown['linear']} "
                  f"points, k-NN {gain['knn_balanced_accuracy'] * 100:+.1f}{shown['knn']} points of balanced "
                  f"accuracy ({report['scores']['random']['n_test_tiles']} tiles of "
                  f"{report.get('n_test_slides', 'the')} held-out test slides; [95 % interval, bootstrap over "
                  "test slides, paired]). Tile counts per class are uneven: balanced accuracy weighs each class "
                  "alike."]
    return "\n".join(lines)


def plot_pretrain_report(report: dict[str, Any], path: Path) -> None:
    """Bars: each probe's balanced accuracy for random and pretrained weights, with chance."""
    plt = pyplot()

    probes = (("linear_balanced_accuracy", "linear probe"), ("knn_balanced_accuracy", "k-NN (k=20)"))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for j, (name, s) in enumerate(report["scores"].items()):
        values = [s[key] for key, _ in probes]
        bars = ax.bar(np.arange(len(probes)) + (j - 0.5) * 0.38, values, 0.38, label=f"{name} weights")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1 / len(report["classes"]), color="gray", linestyle=":", label="chance")
    ax.set_xticks(range(len(probes)), [label for _, label in probes])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("balanced accuracy (test slides' tiles)")
    ax.set_title(f"tile class ({len(report['classes'])} classes) from frozen features")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_pretrain_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "pretrain.json", json.dumps(report, indent=1))
    title = f"# Pretraining benchmark ({report['date']}, {report['seconds'] / 60:.1f} min)"
    write_text_atomic(out / "pretrain.md", f"{title}\n\n{format_pretrain_report(report)}\n")
    plot_pretrain_report(report, out / "pretrain.png")


# --- command line --------------------------------------------------------------------------------------------


def pretrain_main(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    extra = {k: v for k in ("steps", "objective", "batch_size", "tile", "crop")
             if (v := getattr(args, k)) is not None}
    if extra:
        settings = replace(settings, pretrain={**settings.pretrain, **extra})
    report = run_pretrain_benchmark(args.out, settings, accuracy_out=args.accuracy_out)
    print(format_pretrain_report(report))
    print(f"wrote {Path(args.out) / 'pretrain.json'}, pretrain.md, pretrain.png "
          f"({report['seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0
