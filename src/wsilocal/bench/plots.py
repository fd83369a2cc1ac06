"""Plots of the benchmark reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsilocal.plotting import pyplot

plt = pyplot()

K_COLOURS = {1: "tab:gray", 2: "tab:green", 4: "tab:blue", 8: "tab:red"}
VARIANT_STYLES = {"paper": ("o", ":"), "folded": ("s", "--"), "recompute": ("^", "-."),
                  "balanced": ("v", (0, (3, 1, 1, 1, 1, 1))), "balanced-recompute": ("D", "-")}
PAPER_RATIOS = {4: 0.30, 8: 0.20}  # "around 30 % (K=4) and 20 % (K=8)" of end-to-end, the paper's Table 2


def _lines(records: Sequence[dict[str, Any]], key: str) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """(variant, K) → [(input megapixels, value)] sorted by size, skipping missing values."""
    lines: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in records:
        if r.get(key) is not None:
            lines.setdefault((r["variant"], r["k"]), []).append((r["height"] * r["width"] / 1e6, r[key]))
    return {name: sorted(points) for name, points in lines.items()}


def memory_line_label(records: Sequence[dict[str, Any]], variant: str, k: int) -> str:
    """The legend entry of a (variant, K) line: with where its streamed maps waited (``--stream-store``) when the
    records say, since the peak RSS counts them only in host memory."""
    stores = sorted({r["store"] for r in records if (r["variant"], r["k"]) == (variant, k) and r.get("store")})
    return f"{variant} K={k}" + (f" (maps in {'/'.join(stores)})" if stores else "")


def plot_memory(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Left: saved bytes of each (variant, K) as a share of the paper-style K=1, against input size, with the
    paper's ratios and the goal. Right: peak RSS of the step's process against input area."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, scale in ((left, "ratio_saved_paper_style", 100), (right, "peak_rss_bytes", 2.0**-30)):
        for (variant, k), points in _lines(records, key).items():
            if key.startswith("ratio") and k == 1 and variant == "paper":
                continue  # 100 % by definition
            marker, style = VARIANT_STYLES.get(variant, ("x", "-"))
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, [y * scale for y in ys], marker=marker, linestyle=style,
                    color=K_COLOURS.get(k, "black"), label=memory_line_label(records, variant, k))
        ax.set_xscale("log")
        sizes = sorted({(r["height"] * r["width"], r["width"], r["height"]) for r in records})
        ax.set_xticks([area / 1e6 for area, *_ in sizes], [f"{w}×{h}" for _, w, h in sizes])
        ax.minorticks_off()
        ax.set_xlabel("input size (log scale of the area)")
        ax.grid(True, alpha=0.3)
    for k, share in PAPER_RATIOS.items():
        left.axhline(100 * share, color=K_COLOURS[k], alpha=0.35, linewidth=4,
                     label=f"paper K={k} (GPU, TCGA)")
    for k, share in ((4, 0.15), (8, 0.08)):
        left.axhline(100 * share, color=K_COLOURS[k], linestyle=(0, (1, 1)), linewidth=1.5,
                     label=f"goal K={k}")
    left.set_ylabel("saved-for-backward bytes, % of paper-style K=1")
    left.set_title("Saved bytes vs end-to-end (paper-style) at the same input")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    right.set_ylabel("peak RSS of a fresh process, GiB")
    right.set_title("Peak RSS of one training step (CPU)")
    for ax in (left, right):
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
