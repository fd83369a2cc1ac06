"""Classification metrics for slide-level predictions, and the pictures people look at.

``classification_metrics`` computes accuracy, balanced accuracy, macro one-vs-rest AUROC, per-class
precision/recall/AUROC and the confusion matrix from class probabilities. AUROC is the Mann–Whitney
statistic with tie handling (equal to the area under the empirical ROC curve).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from wsilocal.atomic import write_text_atomic
from wsilocal.plotting import pyplot
from wsilocal.run.directory import EvaluationFiles


def selection_score(metrics: dict, loss: float, best_by: str) -> tuple[float, float]:
    """How good an epoch is on the validation split (higher is better): ``best_by``'s figure, then, for ties,
    the lower loss (or, for ``best_by="loss"``, the higher balanced accuracy)."""
    if best_by == "loss":
        return (-loss, metrics["balanced_accuracy"] or 0.0)
    return (metrics[best_by] or 0.0, -loss)  # AUROC is None on a one-class split


def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``; None if one class is absent."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), np.float64)
    # average ranks over ties, 1-based
    i = 0
    while i < len(sorted_scores):
        j = i
        while j + 1 < len(sorted_scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (from (0,0) to (1,1))."""
    positive = np.asarray(positive, bool)
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, p = np.asarray(scores)[order], positive[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(p)[distinct]
    fp = np.cumsum(~p)[distinct]
    tpr = np.r_[0, tp / max(p.sum(), 1)]
    fpr = np.r_[0, fp / max((~p).sum(), 1)]
    return fpr, tpr


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Slide-level metrics from an (N, C) probability array and N integer labels."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    n_classes = len(classes)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    recalls, aurocs = [], []
    for c, name in enumerate(classes):
        support = int(confusion[c].sum())
        called = int(confusion[:, c].sum())
        recall = float(confusion[c, c] / support) if support else None
        precision = float(confusion[c, c] / called) if called else None
        auroc = binary_auroc(probabilities[:, c], labels == c)
        per_class[name] = {"precision": precision, "recall": recall, "auroc": auroc, "support": support}
        if recall is not None:
            recalls.append(recall)
        if auroc is not None:
            aurocs.append(auroc)
    if n_classes == 2:  # the usual binary AUROC, on the positive class's score
        auroc_value = binary_auroc(probabilities[:, 1], labels == 1)
    else:
        auroc_value = float(np.mean(aurocs)) if aurocs else None
    return {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "auroc": auroc_value,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
    }


def plot_learning_curves(history: list[dict], path: str | Path) -> None:
    """Loss and balanced accuracy per epoch (train and validation) as a PNG."""
    plt = pyplot()

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss (final classifier)"), ("val_loss", "validation loss")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    for key, label in (("train_balanced_accuracy", "train"), ("val_balanced_accuracy", "validation")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax_acc.plot(epochs, values, marker="o", label=label)
    aux_keys = sorted({k for h in history for k in h if k.startswith("val_aux") and k.endswith("_accuracy")})
    for key in aux_keys:
        ax_acc.plot(epochs, [h.get(key) for h in history], linestyle="--", alpha=0.6,
                    label=key.replace("val_", "validation ").replace("_accuracy", " accuracy"))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("balanced accuracy / accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_roc_curves(ax, probabilities: np.ndarray, labels: np.ndarray, classes: list[str], *, digits: int = 3,
                    legend_size: float = 8) -> None:
    """On matplotlib axes ``ax``: the one-vs-rest ROC curve of every class present with both outcomes (its AUROC,
    ``digits`` decimals, in the legend), the chance diagonal and the axis labels."""
    for c, name in enumerate(classes):
        positive = np.asarray(labels) == c
        auroc = binary_auroc(probabilities[:, c], positive)
        if auroc is None:
            continue
        fpr, tpr = roc_curve(probabilities[:, c], positive)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.{digits}f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(loc="lower right", fontsize=legend_size)


def plot_roc_curves(probabilities: np.ndarray, labels: np.ndarray, classes: list[str], path: str | Path,
                    title: str = "") -> None:
    """One-vs-rest ROC curve per class as a PNG."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 5))
    draw_roc_curves(ax, probabilities, labels, classes)
    ax.set_title(title or "ROC (one vs rest)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_evaluation(files: EvaluationFiles, metrics: dict, slide_ids: list[str], labels: list[int],
                     probabilities: np.ndarray, classes: list[str]) -> None:
    """Write an evaluated split's ``metrics_<split>.json``, ``predictions_<split>.csv`` (one row per slide: id,
    label, predicted class, the class probabilities at full precision) and ``roc_<split>.png`` into ``files``."""
    files.folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(files.metrics, json.dumps(metrics, indent=1))
    rows = [["slide_id", "label", "predicted", *[f"p_{c}" for c in classes]]]
    rows += [[slide_id, classes[label], classes[int(probs.argmax())], *[repr(float(p)) for p in probs]]
             for slide_id, label, probs in zip(slide_ids, labels, probabilities, strict=True)]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    write_text_atomic(files.predictions, buffer.getvalue())
    plot_roc_curves(probabilities, np.asarray(labels), classes, files.roc,
                    title=f"ROC on the {files.split} split ({len(slide_ids)} slides)")
