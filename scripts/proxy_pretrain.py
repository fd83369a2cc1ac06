"""Supervised *proxy* pretraining for the context benchmark: the trunk learns tissue types, never the task's label.

The issue allows it as an additional option, clearly labelled: a supervised pretraining on generator classes the
benchmark does not use. Here the classes are the tissue types of each map cell — tumour focus (A), lymphoid
follicle (B), other tissue — read from the generator's masks of a *proxy cohort*: context slides of another
generator seed (none of the benchmark's slides, nor of its confirmation cohort). The near/far label of a proxy slide
is never read. The result plays the part ImageNet or a pathology foundation model plays for the paper: features in
which tumour and lymphoid tissue are told apart, nothing about where they lie relative to each other.

How: crops of the proxy slides' cached 5x images (half of them centred on an A or B pixel, so the rare classes are
seen), each one of the 8 flips/rotations and an H&E stain jitter; the trainable stride-3 trunk (ordinary BatchNorm);
a 1×1 classifier on the layer3 map and one on the layer4 map, class-balanced cross-entropy per cell (a cell is A or
B when 30 % of it is, other tissue when half of it is tissue; glass is ignored). At the end the BatchNorm statistics
are re-estimated on the whole images of the training slides (what our trunk and the MIL tiles then see), and the
trunk is written in torchvision names: ``--weights OUT/resnet34.safetensors`` feeds it to every method.

    .venv/bin/python scripts/proxy_pretrain.py PROXY_COHORT_DIR INIT_WEIGHTS_OR_random OUT_DIR [--steps N]
        [--batch-size N] [--crop PX] [--lr R] [--seed S]

PROXY_COHORT_DIR: a synthetic context cohort prepared at the benchmark's mpp (``cache/*.npy``, ``masks/*.png``).
Its ``test``-split slides are held out: the cell recall printed every 100 steps is theirs. Resumable: run it again
with the same arguments and it continues from ``OUT_DIR/checkpoint.pt`` (each step's crops come from a generator
seeded by (seed, step), so the result does not depend on where it stopped).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from wsilocal.atomic import atomic_output
from wsilocal.models.resnet import ResNetTrunk, file_sha256
from wsilocal.pretrain.augment import normalise, stain_jitter
from wsilocal.pretrain.trainer import plot_loss_curve
from wsilocal.synth import MASK_FOLLICLE, MASK_LESION

TUMOUR, FOLLICLE, OTHER, IGNORE = 0, 1, 2, -100
CELL_SHARE = 0.3  # a cell is A (B) when this share of it is A (B): the rule of scripts/context_probe.py
TISSUE_SHARE = 0.5  # a cell is other tissue when this share of it is tissue (and it is neither A nor B)
LAYER_STRIDE = {"layer3": 24, "layer4": 48}  # of the stride-3 trunk
CHECKPOINT = "checkpoint.pt"


def load_slides(cohort: Path, split: str | None = None, exclude: str | None = None) -> list[dict]:
    """The cohort's slides (id, split): pixels (H, W, 3) uint8 at the cached mpp and a label image of the same
    size (0 glass, 1 other tissue, 2 A, 3 B) from the generator's mask, which has the same extent."""
    with open(cohort / "cohort.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle)
                if (split is None or r["split"] == split) and (exclude is None or r["split"] != exclude)]
    slides = []
    for r in rows:
        image = np.load(cohort / "cache" / f"{r['slide_id']}.npy")
        mask = Image.open(cohort / "masks" / f"{r['slide_id']}.png").resize(image.shape[1::-1], Image.NEAREST)
        mask = np.asarray(mask)
        labels = np.where(mask > 0, 1, 0).astype(np.uint8)
        labels[mask == MASK_LESION], labels[mask == MASK_FOLLICLE] = 2, 3
        slides.append({"id": r["slide_id"], "image": image, "labels": labels,
                       "a": np.argwhere(labels == 2), "b": np.argwhere(labels == 3)})
    return slides


def cell_targets(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, h, w) cell classes of label images (N, H, W) on a grid of ``stride`` px cells (H, W multiples of it)."""
    parts = torch.stack([labels == 2, labels == 3, labels > 0], dim=1).float()
    share = F.avg_pool2d(parts, stride)
    target = torch.full(share[:, 0].shape, IGNORE, dtype=torch.long)
    target[share[:, 2] > TISSUE_SHARE] = OTHER
    target[share[:, 0] > CELL_SHARE] = TUMOUR
    target[share[:, 1] > CELL_SHARE] = FOLLICLE
    return target


def sample_batch(slides: list[dict], batch: int, crop: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` augmented crops (normalised (N, 3, crop, crop)) and their label crops (N, crop, crop): half
    centred near an A or a B pixel, half anywhere."""
    images, labels = [], []
    for k in range(batch):
        s = slides[int(torch.randint(len(slides), (1,), generator=gen))]
        h, w = s["labels"].shape
        centred = k % 2 == 0 and (len(s["a"]) or len(s["b"]))
        if centred:
            pool = s["a"] if (k // 2) % 2 == 0 and len(s["a"]) else (s["b"] if len(s["b"]) else s["a"])
            cy, cx = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            jitter = torch.randint(-crop // 3, crop // 3 + 1, (2,), generator=gen)
            y0, x0 = int(cy + jitter[0]) - crop // 2, int(cx + jitter[1]) - crop // 2
        else:
            y0 = int(torch.randint(max(1, h - crop + 1), (1,), generator=gen))
            x0 = int(torch.randint(max(1, w - crop + 1), (1,), generator=gen))
        y0, x0 = min(max(0, y0), h - crop), min(max(0, x0), w - crop)
        image = torch.from_numpy(s["image"][y0:y0 + crop, x0:x0 + crop]).permute(2, 0, 1)
        label = torch.from_numpy(s["labels"][y0:y0 + crop, x0:x0 + crop].astype(np.int64))
        turns, flip = int(torch.randint(4, (1,), generator=gen)), bool(torch.randint(2, (1,), generator=gen))
        image, label = torch.rot90(image, turns, (1, 2)), torch.rot90(label, turns, (0, 1))
        if flip:
            image, label = image.flip(2), label.flip(1)
        images.append(image)
        labels.append(label)
    x = torch.stack(images).float().div_(255)
    scale = 1 + (torch.rand(batch, 3, generator=gen) * 2 - 1) * 0.05
    shift = (torch.rand(batch, 3, generator=gen) * 2 - 1) * 0.05
    x = stain_jitter(x, scale, shift)
    x = x * (1 + (torch.rand(batch, 1, 1, 1, generator=gen) * 2 - 1) * 0.1)  # brightness
    return normalise(x.clamp(0, 1)).contiguous(), torch.stack(labels)


class ProxyNet(nn.Module):
    """The trainable trunk and a 1×1 tissue-type classifier on each of its layer3 and layer4 maps."""

    def __init__(self):
        super().__init__()
        self.trunk = ResNetTrunk(conv1_stride=3, trainable=True)
        self.heads = nn.ModuleDict({"layer3": nn.Conv2d(256, 3, 1), "layer4": nn.Conv2d(512, 3, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.trunk
        x = t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x))))))
        m3 = t.layer3(x)
        return {"layer3": self.heads["layer3"](m3), "layer4": self.heads["layer4"](t.layer4(m3))}


def balanced_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per cell, each class present in the batch weighted by the inverse of its count."""
    counts = torch.bincount(target[target >= 0], minlength=3).float()
    weight = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros(3))
    return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)


@torch.no_grad()
def held_out_recall(net: ProxyNet, slides: list[dict]) -> dict[str, list[float]]:
    """Recall of A, B and other tissue per layer on whole held-out slides (cropped to a multiple of 48 px)."""
    net.eval()
    hits = {name: torch.zeros(3) for name in LAYER_STRIDE}
    totals = {name: torch.zeros(3) for name in LAYER_STRIDE}
    for s in slides:
        h, w = (d // 48 * 48 for d in s["labels"].shape)
        x = normalise(torch.from_numpy(s["image"][:h, :w]).permute(2, 0, 1)[None].float().div(255))
        labels = torch.from_numpy(s["labels"][:h, :w].astype(np.int64))[None]
        for name, logits in net(x).items():
            target = cell_targets(labels, LAYER_STRIDE[name])[0]
            guess = logits[0].argmax(0)
            for c in range(3):
                hits[name][c] += float(((guess == c) & (target == c)).sum())
                totals[name][c] += float((target == c).sum())
    net.train()
    return {name: (hits[name] / totals[name].clamp(min=1)).tolist() for name in LAYER_STRIDE}


@torch.no_grad()
def reestimate_batchnorm(trunk: ResNetTrunk, slides: list[dict]) -> None:
    """Exact BatchNorm statistics over the whole images of ``slides`` (what the trunk sees in use)."""
    batchnorms = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average
    trunk.train()
    for s in slides:
        trunk(normalise(torch.from_numpy(s["image"]).permute(2, 0, 1)[None].float().div(255)))
    for bn in batchnorms:
        bn.momentum = 0.1
    trunk.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path)
    parser.add_argument("init", help="a torchvision ResNet34 state dict (safetensors) to start from, or 'random'")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=192, help="px at the cached mpp; a multiple of 48")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW peak rate (cosine, 5 %% warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.crop % 48:
        raise SystemExit(f"--crop {args.crop}: must be a multiple of 48 (layer4's stride)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    train, held_out = load_slides(args.cohort, exclude="test"), load_slides(args.cohort, split="test")
    net = ProxyNet()
    if args.init != "random":
        net.trunk.load_state_dict(load_file(args.init), strict=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    step, history, evaluations, seconds = 0, [], [], 0.0
    checkpoint = args.out / CHECKPOINT
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history, evaluations, seconds = saved["step"], saved["history"], saved["evaluations"], saved["seconds"]
        print(f"resumed at step {step}", flush=True)
    warmup = max(1, args.steps // 20)
    net.train()
    while step < args.steps:
        start = time.perf_counter()
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, labels = sample_batch(train, args.batch_size, args.crop, torch.Generator().manual_seed(args.seed * 10**6 + step))
        out = net(x)
        loss = sum(balanced_loss(logits, cell_targets(labels, LAYER_STRIDE[name])) for name, logits in out.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - start
        step += 1
        history.append([step, loss.item(), lr, args.batch_size / (time.perf_counter() - start)])
        if step % 100 == 0 or step == args.steps:
            recall = held_out_recall(net, held_out)
            evaluations.append({"step": step, "recall": recall})
            print(f"step {step} loss {np.mean([h[1] for h in history[-100:]]):.3f} {seconds:.0f} s; held-out recall "
                  + "; ".join(f"{n} A {r[0]:.3f} B {r[1]:.3f} other {r[2]:.3f}" for n, r in recall.items()), flush=True)
            with atomic_output(checkpoint) as tmp:
                torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "history": history, "evaluations": evaluations, "seconds": seconds}, tmp)
    reestimate_batchnorm(net.trunk, train)
    recall = held_out_recall(net, held_out)
    net.eval()
    weights = {k: v.detach().contiguous() for k, v in net.trunk.state_dict().items()}
    with atomic_output(args.out / "resnet34.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "torchvision resnet34 (no fc)",
                                               "producer": "scripts/proxy_pretrain.py (supervised proxy: tissue types)"})
    plot_loss_curve(history, args.out / "loss_curve.png", title="proxy pretraining (tissue types per cell)")
    summary = {"what": "supervised proxy pretraining on tissue-type masks (A, B, other tissue) of the proxy cohort; "
                       "the slides' near/far labels are never read",
               "args": {k: str(v) for k, v in vars(args).items()}, "train_slides": [s["id"] for s in train],
               "held_out_slides": [s["id"] for s in held_out], "steps": step, "train_seconds": round(seconds, 1),
               "final_loss": float(np.mean([h[1] for h in history[-50:]])), "evaluations": evaluations,
               "held_out_recall_after_bn_reestimate": recall,
               "weights_sha256": file_sha256(args.out / "resnet34.safetensors")}
    (args.out / "proxy.json").write_text(json.dumps(summary, indent=1))
    print("done:", json.dumps(recall), flush=True)


if __name__ == "__main__":
    main()
