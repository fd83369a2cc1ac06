"""Does a trunk's pooled map separate a cohort's classes? A diagnostic for docs/benchmarks.md (not a benchmark).

Per slide of a prepared cohort (``wsilocal prepare`` cache), the layer3 and layer4 maps of the stride-3 trunk, mean-
and max-pooled; a logistic regression (L-BFGS, L2 strength ``lam``) fit on the train split, scored on the val split
(the test split is never read). Two classes only.

    .venv/bin/python scripts/slide_probe.py COHORT_DIR WEIGHTS_OR_random
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD
from wsilocal.models.resnet import ResNetTrunk, load_trunk_weights
from wsilocal.stream.sources import to_tensor
from wsilocal.train.metrics import binary_auroc


def pooled_maps(trunk: ResNetTrunk, image: np.ndarray) -> dict[str, torch.Tensor]:
    x = to_tensor(image, list(IMAGENET_MEAN), list(IMAGENET_STD))
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
        x = getattr(trunk, name)(x)
    maps = {"layer3": x, "layer4": trunk.layer4(x)}
    return {k: torch.cat([m.mean((2, 3)), m.amax((2, 3))], 1)[0].double() for k, m in maps.items()}


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, val: torch.Tensor, lam: float) -> tuple[float, ...]:
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z[train] @ w + b, y[train]) + lam * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        fit = (((z[train] @ w + b) > 0).double() == y[train]).double().mean().item()
        scores = z[val] @ w + b
        guess, truth = (scores > 0).double(), y[val]
        balanced = 0.5 * (guess[truth == 1].mean() + (1 - guess[truth == 0]).mean()).item()
        auroc = binary_auroc(scores.numpy(), truth.numpy().astype(bool))
    return fit, balanced, auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path, help="folder with cohort.csv and cache/ (as bench accuracy writes)")
    parser.add_argument("weights", help="a trunk state dict, or 'random'")
    args = parser.parse_args()
    rows = [r for r in csv.DictReader(open(args.cohort / "cohort.csv")) if r["split"] in ("train", "val")]
    classes = sorted({r["label"] for r in rows})
    trunk = ResNetTrunk(3, fold_bn=True).eval()
    if args.weights != "random":
        load_trunk_weights(trunk, args.weights)
    with torch.no_grad():
        pooled = [pooled_maps(trunk, np.load(args.cohort / "cache" / f"{r['slide_id']}.npy")) for r in rows]
    y = torch.tensor([r["label"] == classes[1] for r in rows], dtype=torch.float64)
    split = np.array([r["split"] for r in rows])
    train, val = torch.from_numpy(split == "train"), torch.from_numpy(split == "val")
    for layer in ("layer3", "layer4"):
        x = torch.stack([p[layer] for p in pooled])
        for lam in (1e-3, 1e-2, 1e-1, 1.0):
            fit, balanced, auroc = probe(x, y, train, val, lam)
            print(f"{layer} lam={lam:g}: train accuracy {fit:.3f}, val balanced accuracy {balanced:.3f}, "
                  f"val AUROC {auroc:.3f}")


if __name__ == "__main__":
    main()
