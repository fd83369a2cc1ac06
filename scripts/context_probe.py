"""Where does the context task fail? Six diagnostics on a prepared context cohort, train and val splits only (the
test split is never read). For docs/benchmarks.md, not a benchmark.

``cells``:  are the tumour focus (A) and the follicle (B) separable, map cell by map cell, in the frozen trunk's
            layer1/2/3 maps? A logistic regression on cells labelled from the generator's masks (train slides),
            scored on the val slides' cells (recall per class).
``oracle``: is the label reachable from those maps? The same cell probe at layer2 (privileged: it is trained on the
            masks), then near/far from the distance between the most A-like and the most B-like cell, the threshold
            fit on train, scored on val.
``head``:   can slide labels alone teach it? A small trainable head (1×1 conv, three 3×3 convs dilated 1, 2, 4:
            a 15-cell field at layer3, 360 px) on the frozen module-3 map of ours K=4, max-pooled, AdamW lr 1e-3,
            rot90/flip augmentation (``--no-augment``: none); val balanced accuracy and AUROC per epoch.
``pair``:   the same training with :class:`PairHead` (an A-score, a B-score, "A with B within 4 cells",
            log-sum-exp over the slide) instead of the dilated head.
``masks``:  the dilated head's training on ideal features instead: two channels per layer3-sized cell, the
            share of A and of B from the generator's masks, with ``--false-rate`` of the other tissue cells
            marked A or B at random (a detector with that false-positive rate). Can slide labels teach the
            relation when A and B are clean, and how clean must they be? WEIGHTS is not read (say ``random``).
``probed``: the same on the real detector: the layer3 cell probe of ``cells`` (trained on the train slides'
            masks: privileged) gives each cell its A and B probabilities, the dilated head learns from slide labels.

    .venv/bin/python scripts/context_probe.py cells|oracle|head|pair|masks|probed COHORT_DIR WEIGHTS_OR_random
        [--epochs N] [--extra-train DIR ...] [--false-rate P] [--hidden N] [--lr R] [--pair] [--reach N]
        [--head dilated|final|final-context|aux] [--module 3|4] [--context-width N]

``--head final|aux`` (head): ours' own H or auxiliary classifier instead of the dilated head; ``--module 4``:
on the frozen module-4 map (what H reads) instead of module 3's. ``--hidden``, ``--lr``: the dilated head's width
and rate; ``--pair`` (masks, probed): PairHead instead;
``--reach``: PairHead's reach in cells (the default 4 holds only ~15 % of the near pairs at layer3's grid).

``--extra-train DIR``: every slide of another prepared context cohort (another seed, so none of COHORT_DIR's) is
added to the training slides: does the head learn from more slide labels? Validation stays COHORT_DIR's.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD
from wsilocal.models.heads import AuxiliaryClassifier, FinalClassifier
from wsilocal.models.resnet import ResNetTrunk, load_trunk_weights
from wsilocal.models.split import split_trunk
from wsilocal.stream.sources import to_tensor
from wsilocal.synth import FIELD_STEP, MASK_FOLLICLE, MASK_LESION
from wsilocal.synth.masks import mask_of_region
from wsilocal.train.metrics import binary_auroc

LAYER_END = {"layer1": 3, "layer2": 7, "layer3": 13}  # ResNet34: index of the last block of each layer, stem = 0
TUMOUR, FOLLICLE, OTHER = 0, 1, 2
CELL_SHARE = 0.3  # a cell is A (B) when this share of it is A (B) in the mask
OTHER_SAMPLE = 0.05  # share of the other cells kept for the probe


def image_tensor(cohort: Path, slide_id: str) -> torch.Tensor:
    """The slide's cached 5x image, normalised as the pretrained trunk expects (1, 3, H, W)."""
    return to_tensor(np.load(cohort / "cache" / f"{slide_id}.npy"), list(IMAGENET_MEAN), list(IMAGENET_STD))


def mask_shares(cohort: Path, slide_id: str, map_hw: tuple[int, int]) -> torch.Tensor:
    """(3, h, w): the share of A, of B and of tissue in each cell of a map of ``map_hw`` of the cached image (the
    generator's mask cut to the cache entry's tissue box, then pooled)."""
    entry = json.loads((cohort / "cache" / f"{slide_id}.json").read_text())
    mask = mask_of_region(np.array(Image.open(cohort / "masks" / f"{slide_id}.png")), entry["bbox"],
                          FIELD_STEP, (entry["width"], entry["height"]))
    parts = torch.from_numpy(np.stack([mask == MASK_LESION, mask == MASK_FOLLICLE, mask > 0]).astype(np.float32))
    return F.adaptive_avg_pool2d(parts[None], map_hw)[0]


def cell_labels(cohort: Path, slide_id: str, map_hw: tuple[int, int]) -> torch.Tensor:
    """TUMOUR / FOLLICLE / OTHER per cell of a map of ``map_hw`` from the generator's mask (same extent)."""
    share = mask_shares(cohort, slide_id, map_hw)
    labels = torch.full(map_hw, OTHER, dtype=torch.long)
    labels[share[0] > CELL_SHARE] = TUMOUR
    labels[share[1] > CELL_SHARE] = FOLLICLE
    return labels


def layer_maps(trunk: ResNetTrunk, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    maps, last = {}, max(LAYER_END[name] for name in layers)
    for index, block in enumerate(trunk.blocks()[: last + 1]):
        x = block(x)
        maps.update({name: x[0] for name in layers if LAYER_END[name] == index})
    return maps


def fit_cell_probe(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, weights) of a class-balanced 3-class logistic regression (L-BFGS, L2 1e-3) on cells (n, C)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], 3, dtype=torch.float64, requires_grad=True)
    balance = torch.tensor([1 / max(1, int((y == c).sum())) for c in range(3)], dtype=torch.float64)
    opt = torch.optim.LBFGS([w], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w, y, weight=balance) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mu, sd, w.detach()


def balanced_accuracy(guess: np.ndarray, truth: np.ndarray) -> float:
    return 0.5 * (guess[truth].mean() + (~guess[~truth]).mean())


def run_cells(rows: list[dict], trunk: ResNetTrunk) -> None:
    layers = list(LAYER_END)
    cells = {name: ([], [], []) for name in layers}
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in rows:
            for name, m in layer_maps(trunk, image_tensor(r["cohort"], r["slide_id"]), layers).items():
                labels = cell_labels(r["cohort"], r["slide_id"], tuple(m.shape[1:]))
                keep = (labels != OTHER) | (torch.rand(labels.shape, generator=rng) < OTHER_SAMPLE)
                cells[name][0].append(m[:, keep].t().double())
                cells[name][1].append(labels[keep])
                cells[name][2].extend([r["split"] == "train"] * int(keep.sum()))
    for name, (xs, ys, is_train) in cells.items():
        x, y, train = torch.cat(xs), torch.cat(ys), torch.tensor(is_train)
        mu, sd, w = fit_cell_probe(x[train], y[train])
        guess = (((x[~train] - mu) / sd) @ w).argmax(1)
        recall = [float(((guess == c) & (y[~train] == c)).sum() / max(1, int((y[~train] == c).sum())))
                  for c in range(3)]
        print(f"{name}: train cells A/B/other {[int((y[train] == c).sum()) for c in range(3)]}; val recall "
              f"A {recall[0]:.3f}, B {recall[1]:.3f}, other {recall[2]:.3f}")


def run_oracle(rows: list[dict], trunk: ResNetTrunk) -> None:
    with torch.no_grad():
        maps = [layer_maps(trunk, image_tensor(r["cohort"], r["slide_id"]), ["layer2"])["layer2"].double()
                for r in rows]
    labels = [cell_labels(r["cohort"], r["slide_id"], tuple(m.shape[1:])) for r, m in zip(rows, maps, strict=True)]
    train = np.array([r["split"] == "train" for r in rows])
    near = np.array([r["label"] == "near" for r in rows])
    mu, sd, w = fit_cell_probe(torch.cat([maps[i].flatten(1).t() for i in np.flatnonzero(train)]),
                               torch.cat([labels[i].flatten() for i in np.flatnonzero(train)]))
    distance = []
    for m in maps:
        p = torch.softmax(((m.flatten(1).t() - mu) / sd) @ w, 1)
        a = np.unravel_index(int(p[:, TUMOUR].argmax()), m.shape[1:])
        b = np.unravel_index(int(p[:, FOLLICLE].argmax()), m.shape[1:])
        distance.append(float(np.hypot(a[0] - b[0], a[1] - b[1])))
    distance = np.array(distance)
    threshold = max(np.unique(distance[train]),
                    key=lambda t: balanced_accuracy(distance[train] <= t, near[train]))
    print(f"oracle (layer2 cells, distance A-B <= {threshold:.1f} cells is near): train balanced accuracy "
          f"{balanced_accuracy(distance[train] <= threshold, near[train]):.3f}, val "
          f"{balanced_accuracy(distance[~train] <= threshold, near[~train]):.3f}")


class DilatedHead(nn.Module):
    """1×1 conv to 64 channels, then 3×3 convs dilated 1, 2, 4 (a 15-cell field), max over positions, linear."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 1), nn.ReLU()]
        for dilation in (1, 2, 4):
            layers += [nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x).amax((2, 3)))


class PairHead(nn.Module):
    """The conjunction spelt out: an A-score and a B-score per cell (1×1 convs), then "near" evidence where an A
    cell has a B cell within ``reach`` cells (A-score + B-score max-pooled over a (2·reach+1)² window), pooled
    over the slide by log-sum-exp. Three scalars and two 1×1 convs: the inductive bias neither H nor the dilated
    head has. Not a method of the package: a diagnostic of whether slide labels can teach the pair at all."""

    def __init__(self, channels: int, reach: int = 4):
        super().__init__()
        self.a, self.b = nn.Conv2d(channels, 1, 1), nn.Conv2d(channels, 1, 1)
        self.reach = reach
        self.scale, self.bias = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b_near = F.max_pool2d(self.b(x), 2 * self.reach + 1, stride=1, padding=self.reach)
        near = torch.logsumexp((self.a(x) + b_near).flatten(1), dim=1)
        return torch.stack([torch.zeros_like(near), self.scale * near + self.bias], dim=1)


def module_maps(rows: list[dict], trunk: ResNetTrunk, module: int = 3) -> list[torch.Tensor]:
    """The frozen output map of ours K=4's ``module`` (3: layer3's grid, 1/24 of the image; 4: layer4's, 1/48, what
    H reads) per slide, (1, C, h, w)."""
    modules = split_trunk(trunk, 4)
    with torch.no_grad():
        maps = []
        for r in rows:
            x = image_tensor(r["cohort"], r["slide_id"])
            for stage in modules[:module]:
                x = stage(x)
            maps.append(x)
    return maps


class PackageHead(nn.Module):
    """Ours' own classifiers as a diagnostic head: H (:class:`FinalClassifier`, attention over positions, no
    convolution) or the auxiliary classifier (:class:`AuxiliaryClassifier`: a strided k×k conv, then attention)."""

    def __init__(self, channels: int, kind: str, context: int = 16):
        super().__init__()
        self.head = (FinalClassifier(channels, 2) if kind == "final" else
                     FinalClassifier(channels, 2, context=context) if kind == "final-context" else
                     AuxiliaryClassifier(channels, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)[0]


def mask_maps(rows: list[dict], false_rate: float, seed: int = 0) -> list[torch.Tensor]:
    """Ideal A/B features on layer3's grid: (1, 2, h, w) shares of A and B per cell from the masks; a share
    ``false_rate`` of the other tissue cells (over half tissue, no A or B) set to 1 in the A or the B channel."""
    rng = torch.Generator().manual_seed(seed)
    maps = []
    for r in rows:
        image_hw = np.load(r["cohort"] / "cache" / f"{r['slide_id']}.npy", mmap_mode="r").shape[:2]
        hw = (-(-image_hw[0] // 24), -(-image_hw[1] // 24))
        share = mask_shares(r["cohort"], r["slide_id"], hw)
        features = share[:2].clone()
        other = (share[2] > 0.5) & (share[:2].sum(0) == 0)
        false = other & (torch.rand(hw, generator=rng) < false_rate)
        which = torch.rand(hw, generator=rng) < 0.5
        features[0][false & which] = 1.0
        features[1][false & ~which] = 1.0
        maps.append(features[None])
    return maps


def probed_maps(rows: list[dict], trunk: ResNetTrunk) -> list[torch.Tensor]:
    """The real detector: the layer3 cell probe (fit on the train slides' masks) as (1, 2, h, w) probabilities of
    A and B per cell."""
    with torch.no_grad():
        maps = [layer_maps(trunk, image_tensor(r["cohort"], r["slide_id"]), ["layer3"])["layer3"].double()
                for r in rows]
    labels = [cell_labels(r["cohort"], r["slide_id"], tuple(m.shape[1:])) for r, m in zip(rows, maps, strict=True)]
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    mu, sd, w = fit_cell_probe(torch.cat([maps[i].flatten(1).t() for i in train]),
                               torch.cat([labels[i].flatten() for i in train]))
    with torch.no_grad():
        return [torch.softmax(((m.flatten(1).t() - mu) / sd) @ w, 1)[:, :2].t().reshape(2, *m.shape[1:])[None].float()
                for m in maps]


def run_head(rows: list[dict], maps: list[torch.Tensor], epochs: int, augment: bool, pair: bool = False,
             lr: float = 1e-3, reach: int = 4, hidden: int = 64, kind: str = "dilated", context: int = 16) -> None:
    labels = [int(r["label"] == "near") for r in rows]
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    val = [i for i, r in enumerate(rows) if r["split"] == "val"]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    channels = maps[0].shape[1]
    head = (PairHead(channels, reach) if pair else DilatedHead(channels, hidden) if kind == "dilated" else
            PackageHead(channels, kind, context))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-6)
    for epoch in range(epochs):
        head.train()
        total = 0.0
        for i in rng.permutation(train):
            x = maps[i]
            if augment:
                x = torch.rot90(x, int(rng.integers(4)), (2, 3))
                x = x.flip(3) if rng.random() < 0.5 else x
            loss = F.cross_entropy(head(x), torch.tensor([labels[i]]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        head.eval()
        with torch.no_grad():
            scores = np.array([torch.softmax(head(maps[i]), 1)[0, 1].item() for i in val])
        truth = np.array([labels[i] for i in val], bool)
        print(f"epoch {epoch}: train loss {total / len(train):.3f}, val balanced accuracy "
              f"{balanced_accuracy(scores > 0.5, truth):.3f}, AUROC {binary_auroc(scores, truth):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("cells", "oracle", "head", "pair", "masks", "probed"))
    parser.add_argument("--pair", action="store_true", help="masks, probed: train PairHead, not the dilated head")
    parser.add_argument("--reach", type=int, default=4,
                        help="PairHead: B within this many cells of A (Chebyshev; default 4, the first runs' — it "
                             "holds only ~15 %% of the near pairs at layer3's grid, 8 holds all)")
    parser.add_argument("--lr", type=float, default=1e-3, help="head's AdamW rate (default 1e-3)")
    parser.add_argument("--hidden", type=int, default=64, help="the dilated head's channels (default 64)")
    parser.add_argument("--head", choices=("dilated", "final", "final-context", "aux"), default="dilated",
                        help="head: the dilated head, or ours' own H (final), H with its context block "
                             "(final-context, --context-width channels) or auxiliary classifier (aux)")
    parser.add_argument("--context-width", type=int, default=16, help="final-context: the block's channels")
    parser.add_argument("--module", type=int, choices=(3, 4), default=3,
                        help="head: the frozen map of ours K=4's module 3 (default) or 4 (what H reads)")
    parser.add_argument("cohort", type=Path, help="folder with cohort.csv, masks/, cache/ (bench accuracy)")
    parser.add_argument("weights", help="a trunk state dict, or 'random'")
    parser.add_argument("--epochs", type=int, default=40, help="head: epochs (default 40)")
    parser.add_argument("--no-augment", action="store_true", help="head: no rot90/flip augmentation")
    parser.add_argument("--extra-train", type=Path, action="append", default=[],
                        help="another prepared context cohort whose slides all join the training slides")
    parser.add_argument("--false-rate", type=float, default=0.0,
                        help="masks: share of the other tissue cells marked A or B (default 0)")
    args = parser.parse_args()
    rows = [{**r, "cohort": args.cohort} for r in csv.DictReader(open(args.cohort / "cohort.csv"))
            if r["split"] in ("train", "val")]
    for extra in args.extra_train:
        rows += [{**r, "cohort": extra, "split": "train"} for r in csv.DictReader(open(extra / "cohort.csv"))]
    trunk = ResNetTrunk(3, fold_bn=True).eval()
    if args.weights != "random":
        load_trunk_weights(trunk, args.weights)
    if args.what == "cells":
        run_cells(rows, trunk)
    elif args.what == "oracle":
        run_oracle(rows, trunk)
    else:
        maps = (mask_maps(rows, args.false_rate) if args.what == "masks" else
                probed_maps(rows, trunk) if args.what == "probed" else module_maps(rows, trunk, args.module))
        run_head(rows, maps, args.epochs, not args.no_augment, pair=args.what == "pair" or args.pair, lr=args.lr,
                 reach=args.reach, hidden=args.hidden, kind=args.head, context=args.context_width)


if __name__ == "__main__":
    main()
