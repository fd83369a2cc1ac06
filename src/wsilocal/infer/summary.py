"""One picture of a whole run: where the model looked on a few slides, and how it learnt.

:func:`write_summary` draws, from the files the pipeline writes (nothing is recomputed):

- for each chosen slide, its thumbnail with the reference outline of the lesion (a label mask, e.g. the one the
  synthetic generator writes: ``masks/<slide_id>.png``, 255 lesion, 128 other tissue, 0 glass, one pixel per
  ``mask_downsample`` level-0 px) and, beside it, the attention heatmap of ``wsilocal predict --heatmap``
  (``<id>_attention.npy`` and its ``<id>_attention.json`` sidecar) with the predicted class, its probability and
  the share of the attention that falls on the lesion;
- the ROC curves of the test split (``predictions_test.csv`` of ``wsilocal evaluate``);
- the training curves (``metrics.json`` of ``wsilocal train``);
- the pretraining loss (``pretrain_log.csv`` of ``wsilocal pretrain``).

:func:`attention_per_mask_pixel` spreads a heatmap's attention over a label mask's pixels by the exact overlap of
each map cell with each mask pixel (level-0 rectangles), and :func:`attention_shares` says how much of the
attention lies on each kind of pixel; the demo prints these shares and a test checks them against the lesion's
share of the tissue.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsilocal.atomic import atomic_output
from wsilocal.infer.heatmap import interval_overlaps, tissue_attention
from wsilocal.plotting import pyplot

MASK_GLASS, MASK_TISSUE, MASK_LESION = 0, 128, 255  # values of a label mask (as wsilocal.synth writes them)


@dataclass(frozen=True)
class SlideHeatmap:
    """One slide of the summary: its file, true label, prediction, attention and (optional) reference mask."""

    slide_id: str
    path: Path
    label: str | None
    predicted: str
    probability: float
    attention: np.ndarray  # (h, w), sums to 1
    column_edges: np.ndarray  # level-0 x of the w + 1 cell boundaries
    row_edges: np.ndarray  # level-0 y of the h + 1 cell boundaries
    mask: np.ndarray | None = None  # uint8 label mask (MASK_* values): the truth, where one is known
    mask_downsample: float = 1.0  # level-0 px per mask pixel
    tissue: np.ndarray | None = None  # the tissue the slide's tissue detection finds (bool), as predict finds it
    tissue_downsample: float = 1.0  # level-0 px per tissue-mask pixel

    def shown_attention(self) -> np.ndarray:
        """What the heatmap draws: the attention on the detected tissue (glass left out), else H's own map."""
        if self.tissue is None:
            return self.attention
        return tissue_attention(self.attention, self.column_edges, self.row_edges, self.tissue,
                                self.tissue_downsample)

    def shares(self) -> dict[str, float] | None:
        """:func:`attention_shares` of this slide, or None without a mask."""
        if self.mask is None:
            return None
        return attention_shares(self.attention, self.column_edges, self.row_edges, self.mask, self.mask_downsample)


def attention_per_mask_pixel(attention: np.ndarray, column_edges: np.ndarray, row_edges: np.ndarray,
                             mask_shape: tuple[int, int], downsample: float) -> np.ndarray:
    """The attention held by each pixel of a mask of ``mask_shape`` (one pixel per ``downsample`` level-0 px).

    A map cell's attention is spread evenly over its level-0 rectangle (``column_edges``, ``row_edges``, as
    :func:`~wsilocal.infer.heatmap.cell_edges` gives them), and each mask pixel holds the part of every cell it
    overlaps: exact, and summing to the attention's total where the mask covers the cells. Empty cells (NaN) hold
    nothing.
    """
    attention = np.nan_to_num(np.asarray(attention, np.float64))
    xs, ys = np.asarray(column_edges, np.float64), np.asarray(row_edges, np.float64)
    if attention.shape != (len(ys) - 1, len(xs) - 1):
        raise ValueError(f"attention map {attention.shape} does not match {len(ys) - 1}×{len(xs) - 1} cell edges")
    area = np.outer(np.diff(ys), np.diff(xs))
    density = np.divide(attention, area, out=np.zeros_like(attention), where=area > 0)  # per level-0 px²
    rows, columns = interval_overlaps(ys, mask_shape[0], downsample), interval_overlaps(xs, mask_shape[1], downsample)
    return rows @ density @ columns.T


def attention_shares(attention: np.ndarray, column_edges: np.ndarray, row_edges: np.ndarray, mask: np.ndarray,
                     downsample: float) -> dict[str, float]:
    """Where the attention lies on a label mask (:func:`attention_per_mask_pixel`), and how large the lesion is.

    Returns:
        ``lesion``: the share of the attention on the mask's tissue that lies on its lesion (the attention restricted
        to the tissue and renormalised, as :func:`~wsilocal.infer.heatmap.tissue_attention` draws it);
        ``lesion_area``: the lesion's share of the tissue's area — what ``lesion`` is when attention is spread
        evenly over the tissue, so ``lesion > lesion_area`` means the model looked at the lesion more than at the
        rest of the tissue; ``glass``: the share of all the attention on glass (mask value 0);
        ``lesion_unrestricted``: the share of all the attention on the lesion (glass's share included in the whole).
    """
    mask = np.asarray(mask)
    held = attention_per_mask_pixel(attention, column_edges, row_edges, mask.shape, downsample)
    lesion, tissue = mask == MASK_LESION, mask >= MASK_TISSUE
    total, on_tissue = held.sum(), held[tissue].sum()
    return {"lesion": float(held[lesion].sum() / on_tissue) if on_tissue > 0 else 0.0,
            "lesion_area": float(lesion.sum() / max(1, tissue.sum())),
            "glass": float(held[~tissue].sum() / total), "lesion_unrestricted": float(held[lesion].sum() / total)}


def load_heatmap(predictions_dir: str | Path, slide_id: str, *, label: str | None = None,
                 mask_path: str | Path | None = None, mask_downsample: float = 1.0,
                 detect_tissue: bool = True) -> SlideHeatmap:
    """A slide's heatmap as ``wsilocal predict --heatmap`` wrote it into ``predictions_dir``, its reference mask
    (``mask_path``, optional) and, with ``detect_tissue``, the tissue found on the slide file (the detection
    ``predict`` runs, at its default overview resolution)."""
    from PIL import Image

    from wsilocal.slide.reader import open_slide
    from wsilocal.slide.tissue import detect_tissue as find_tissue

    folder = Path(predictions_dir)
    sidecar = json.loads((folder / f"{slide_id}_attention.json").read_text())
    mask = tissue = None
    tissue_downsample = 1.0
    if mask_path is not None:
        with Image.open(mask_path) as image:
            mask = np.asarray(image.convert("L"))
    if detect_tissue:
        with open_slide(sidecar["slide"]) as slide:
            region = find_tissue(slide)
        tissue, tissue_downsample = region.mask, region.downsample
    predicted = sidecar["predicted"]
    return SlideHeatmap(slide_id=slide_id, path=Path(sidecar["slide"]), label=label, predicted=predicted,
                        probability=float(sidecar["probabilities"][predicted]),
                        attention=np.load(folder / f"{slide_id}_attention.npy"),
                        column_edges=np.asarray(sidecar["column_edges"], np.float64),
                        row_edges=np.asarray(sidecar["row_edges"], np.float64), mask=mask,
                        mask_downsample=mask_downsample, tissue=tissue, tissue_downsample=tissue_downsample)


def read_predictions_csv(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(classes, labels, probabilities)`` of a ``predictions_<split>.csv`` that ``wsilocal evaluate`` wrote."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    classes = [h[2:] for h in header[3:]]
    labels = np.array([classes.index(r[1]) for r in rows[1:]], int)
    probabilities = np.array([[float(v) for v in r[3:]] for r in rows[1:]], np.float64).reshape(-1, len(classes))
    return classes, labels, probabilities


def read_pretrain_log(path: str | Path) -> np.ndarray:
    """(steps, 2) array of ``step, loss`` from a ``pretrain_log.csv`` of ``wsilocal pretrain``."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([[float(r["step"]), float(r["loss"])] for r in rows], np.float64).reshape(-1, 2)


def _thumbnail(path: Path, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    from wsilocal.slide.reader import open_slide, read_region_downsampled

    with open_slide(path) as slide:
        size = slide.level_dimensions[0]
        return read_region_downsampled(slide, max(1.0, max(size) / max_side)), size


def _outline(ax, mask: np.ndarray, downsample: float, where: np.ndarray, **style) -> None:
    if not where.any():
        return
    xs = (np.arange(mask.shape[1]) + 0.5) * downsample
    ys = (np.arange(mask.shape[0]) + 0.5) * downsample
    ax.contour(xs, ys, where.astype(float), levels=[0.5], **style)


def _slide_panels(ax_slide, ax_heat, item: SlideHeatmap, max_side: int) -> None:
    thumbnail, (width, height) = _thumbnail(item.path, max_side)
    extent = (0, width, height, 0)
    shares = item.shares()
    truth = "" if item.label is None else f", true {item.label}"
    ax_slide.imshow(thumbnail, extent=extent)
    if item.mask is not None:
        _outline(ax_slide, item.mask, item.mask_downsample, item.mask >= MASK_TISSUE, colors="0.45",
                 linewidths=0.6)
        _outline(ax_slide, item.mask, item.mask_downsample, item.mask == MASK_LESION, colors="lime", linewidths=1.4)
    ax_slide.set_title(f"{item.slide_id}{truth}" + ("\n(green: the lesion, known)" if item.mask is not None else ""),
                       fontsize=8)
    ax_heat.imshow(thumbnail, extent=extent, alpha=0.6)
    shown = item.shown_attention()
    relative = np.ma.masked_invalid(shown * np.isfinite(shown).sum())  # 1 = what a uniform attention gives a cell
    ax_heat.pcolormesh(item.column_edges, item.row_edges, relative, cmap="jet", alpha=0.5, vmin=0,
                       vmax=max(1.0, float(relative.max())))
    if item.mask is not None:
        _outline(ax_heat, item.mask, item.mask_downsample, item.mask == MASK_LESION, colors="white", linewidths=1.0)
    verdict = "" if item.label is None else ("  ✓" if item.predicted == item.label else "  ✗")
    title = f"predicted {item.predicted} (p = {item.probability:.2f}){verdict}"
    if shares is not None:
        title += (f"\nlesion: {shares['lesion_area']:.0%} of the tissue, {shares['lesion']:.0%} of its attention"
                  f"\nglass: {shares['glass']:.0%} of H's attention (not drawn)")
    ax_heat.set_title(title, fontsize=8)
    for ax in (ax_slide, ax_heat):
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])


def _roc_panel(ax, predictions_csv: Path) -> None:
    from wsilocal.train.metrics import draw_roc_curves

    classes, labels, probabilities = read_predictions_csv(predictions_csv)
    draw_roc_curves(ax, probabilities, labels, classes, digits=2, legend_size=7)
    ax.set_title(f"ROC, test split ({len(labels)} slides, one vs rest)", fontsize=9)


def _training_panels(ax_loss, ax_acc, history: list[dict]) -> None:
    epochs = np.arange(1, len(history) + 1)  # the history's rows, in order (one per epoch)

    def plot(ax, key, label):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)

    plot(ax_loss, "train_loss", "train")
    plot(ax_loss, "val_loss", "validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy (final classifier)")
    ax_loss.set_title("training: loss", fontsize=9)
    ax_loss.legend(fontsize=7)
    plot(ax_acc, "train_accuracy", "train (accuracy)")
    plot(ax_acc, "val_balanced_accuracy", "validation (balanced accuracy)")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("training: accuracy", fontsize=9)
    ax_acc.legend(fontsize=7)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)


def _pretrain_panel(ax, log: np.ndarray) -> None:
    steps, loss = log[:, 0] + 1, log[:, 1]
    window = max(1, len(loss) // 20)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
    if len(loss) >= window:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("self-supervised pretraining: loss", fontsize=9)
    ax.legend(fontsize=7)


def write_summary(path: str | Path, slides: list[SlideHeatmap], *, predictions_csv: str | Path | None = None,
                  history: list[dict] | None = None, pretrain_log: str | Path | None = None, title: str = "",
                  per_row: int = 2, max_side: int = 480) -> Path:
    """Write the summary PNG (see the module docs): ``per_row`` slides a row, each as a (thumbnail + lesion,
    heatmap) pair, then one row with the ROC curves, the training curves and the pretraining loss (each only
    when its file is given)."""
    plt = pyplot()

    rows = -(-len(slides) // per_row) if slides else 0
    curves = [p for p in (predictions_csv, history, pretrain_log) if p is not None]
    columns = max(2 * per_row, len(curves) + (history is not None))
    fig = plt.figure(figsize=(3.6 * columns, 3.7 * (rows + (1 if curves else 0)) + 0.6))
    grid = fig.add_gridspec(rows + (1 if curves else 0), columns)
    for i, item in enumerate(slides):
        r, c = divmod(i, per_row)
        _slide_panels(fig.add_subplot(grid[r, 2 * c]), fig.add_subplot(grid[r, 2 * c + 1]), item, max_side)
    column = 0
    if predictions_csv is not None:
        _roc_panel(fig.add_subplot(grid[rows, column]), Path(predictions_csv))
        column += 1
    if history is not None:
        _training_panels(fig.add_subplot(grid[rows, column]), fig.add_subplot(grid[rows, column + 1]), history)
        column += 2
    if pretrain_log is not None:
        _pretrain_panel(fig.add_subplot(grid[rows, column]), read_pretrain_log(pretrain_log))
    lines = [title] if title else []
    if slides:
        lines.append("each pair: the slide with its lesion outlined (green) | where the model looked on the tissue: "
                     "attention relative to uniform, on each slide's own scale (blue low, red high), lesion in white")
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
