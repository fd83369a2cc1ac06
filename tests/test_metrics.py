import numpy as np
import pytest

from wsilocal.train.metrics import binary_auroc, classification_metrics, plot_roc_curves, roc_curve, selection_score


def pairwise_auroc(scores, positive):
    """Reference: probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_pairwise_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    assert binary_auroc(scores, positive) == pytest.approx(pairwise_auroc(scores, positive), abs=1e-12)
    fpr, tpr = roc_curve(scores, positive)
    assert np.trapezoid(tpr, fpr) == pytest.approx(pairwise_auroc(scores, positive), abs=1e-12)


def test_auroc_undefined_with_one_class():
    assert binary_auroc(np.array([0.1, 0.2]), np.array([True, True])) is None


def test_classification_metrics_three_classes(tmp_path):
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    labels = np.array([0, 1, 1, 2, 2])
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == pytest.approx(0.5)
    expected_auroc = np.mean([pairwise_auroc(probs[:, c], labels == c) for c in range(3)])
    assert m["auroc"] == pytest.approx(expected_auroc)
    plot_roc_curves(probs, labels, ["a", "b", "c"], tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_binary_auroc_uses_positive_class_score():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 0])
    m = classification_metrics(probs, labels, ["neg", "pos"])
    assert m["auroc"] == pytest.approx(pairwise_auroc(probs[:, 1], labels == 1))


def test_selection_score_ranks_epochs_by_the_chosen_figure_then_breaks_ties():
    lucky = ({"balanced_accuracy": 0.9, "auroc": 0.8}, 0.9)  # (validation metrics, validation loss) of an epoch
    steady = ({"balanced_accuracy": 0.8, "auroc": 0.95}, 0.5)
    tie = ({"balanced_accuracy": 0.9, "auroc": 0.8}, 0.7)
    def best(best_by, *epochs):
        return max(epochs, key=lambda e: selection_score(*e, best_by))
    assert best("balanced_accuracy", lucky, steady) is lucky
    assert best("balanced_accuracy", lucky, tie) is tie  # same balanced accuracy: the lower loss
    assert best("loss", lucky, steady, tie) is steady
    assert best("auroc", lucky, steady) is steady
    assert selection_score({"balanced_accuracy": 0.5, "auroc": None}, 1.0, "auroc") == (0.0, -1.0)
