"""Supervised *proxy* pretraining on tissue-type masks: an option of the accuracy benchmark, labelled as such.

Not self-supervised, and not for users' slides: it needs the synthetic generator's masks. The trunk learns the
tissue type of each map cell — lesion (the context task's tumour focus A), lymphoid follicle (the context task's
B), other tissue — on a *proxy cohort*: slides of the task's generator with another seed, none of the benchmark's.
The proxy slides' class labels are never read, so the weights know what tumour and lymphoid tissue look like (what
ImageNet or a pathology foundation model gives the paper's methods) and nothing about the task's label. The issue
that asked for the benchmark admits exactly this ("a supervised proxy pretraining on generator classes the
benchmark does not use ... clearly labelled"); ``docs/benchmarks.md`` says why the context task needs it.

Data flow: the proxy cohort's cached 5x images (:mod:`wsilocal.prepare`) and the generator's masks cropped to each
image's box (:func:`~wsilocal.synth.masks.mask_of_region`) → crops (half centred on a lesion or follicle pixel, so
the rare classes are seen), each one of the 8 flips/rotations with an H&E stain jitter → the trainable stride-3
trunk (ordinary BatchNorm) → a 1×1 classifier on the layer3 map and one on the layer4 map → class-balanced
cross-entropy per cell (a cell is lesion or follicle when 30 % of it is, other tissue when half of it is tissue;
glass is ignored) → BatchNorm statistics re-estimated on the training slides' whole images (what our trunk and the
MIL tiles then see) → ``<arch>.safetensors`` in torchvision names, ``proxy.json``, ``proxy_log.csv``,
``loss_curve.png``.

Each step's crops come from a generator seeded by (seed, step), so a run stopped and continued from its checkpoint
ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from wsilocal.atomic import atomic_output, write_text_atomic
from wsilocal.errors import ConfigError
from wsilocal.models.resnet import DEFAULT_ARCH, ResNetTrunk, file_sha256, load_trunk_weights
from wsilocal.pretrain.augment import normalise, stain_jitter
from wsilocal.pretrain.trainer import (
    learning_rate,
    plot_loss_curve,
    reestimate_batchnorm,
    seeded_generator,
    weights_file_name,
)
from wsilocal.synth.masks import MASK_FOLLICLE, MASK_LESION, mask_of_region

LESION, FOLLICLE, OTHER, IGNORE = 0, 1, 2, -100  # cell classes (IGNORE: glass)
TISSUE_TYPES = ("lesion", "follicle", "other tissue")
CELL_SHARE = 0.3  # a cell is lesion (follicle) when this share of it is
TISSUE_SHARE = 0.5  # a cell is other tissue when this share of it is tissue and it is neither
LAYER_STRIDE = {"layer3": 24, "layer4": 48}  # px of the stride-3 trunk's map cells
SUMMARY_FILE = "proxy.json"
LOG_FILE = "proxy_log.csv"
CHECKPOINT_FILE = "checkpoint.pt"
STAIN_JITTER, BRIGHTNESS = 0.05, 0.1
CROP_STREAM = 0x5052  # "PR": the per-step stream of crops and their augmentation


@dataclass(frozen=True)
class ProxyConfig:
    """Settings of a proxy pretraining (all in ``proxy.json``).

    Attributes:
        steps: optimiser steps of ``batch_size`` crops.
        crop: crop edge in px at the cohort's cached mpp; a multiple of 48 (a layer4 cell), at most the smallest
            image side.
        lr: AdamW's peak rate (linear warm-up over 5 % of the steps, then a half cosine); ``weight_decay`` its decay.
        seed: the crops, their augmentation and the classifiers' initial weights.
        eval_every: steps between the held-out evaluations (and checkpoints).
        arch: the trunk: ``resnet18``, ``resnet34`` or ``resnet50``.
    """

    steps: int = 800
    batch_size: int = 8
    crop: int = 192
    lr: float = 3e-4
    weight_decay: float = 1e-4
    seed: int = 0
    eval_every: int = 100
    arch: str = DEFAULT_ARCH

    @property
    def warmup_steps(self) -> int:
        """Steps of the linear warm-up: 5 % of the run."""
        return max(1, self.steps // 20)

    def validate(self) -> ProxyConfig:
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"proxy pretraining: {name} must be at least 1, got {getattr(self, name)}")
        if self.crop < 48 or self.crop % 48:
            raise ConfigError(f"proxy pretraining: crop must be a positive multiple of 48 px (a layer4 cell), "
                              f"got {self.crop}")
        if not self.lr > 0:
            raise ConfigError(f"proxy pretraining: lr must be positive, got {self.lr}")
        return self


@dataclass
class ProxySlide:
    """One proxy slide: its cached image (H, W, 3) uint8, tissue types per pixel (0 glass, 1 other tissue,
    2 lesion, 3 follicle) and where its lesion and follicle pixels lie ((n, 2) rows, cols)."""

    slide_id: str
    image: np.ndarray
    labels: np.ndarray
    lesion: np.ndarray
    follicle: np.ndarray


def load_proxy_slides(cohort_dir: str | Path, splits: tuple[str, ...]) -> list[ProxySlide]:
    """The slides of ``splits`` of a synthetic cohort prepared by the benchmark (``cohort.csv``, ``synth.json``,
    ``masks/``, ``cache/``), each image with the generator's mask of the same box.

    Raises:
        ConfigError: the folder is not a prepared synthetic cohort, or a slide's mask or cache entry is missing
            (naming the file).
    """
    from wsilocal.prepare.cache import load_entry
    from wsilocal.slide.cohort import load_cohort

    cohort_dir = Path(cohort_dir)
    meta_file = cohort_dir / "synth.json"
    if not meta_file.is_file():
        raise ConfigError(f"{meta_file}: not found; proxy pretraining needs a synthetic cohort (the generator's "
                          "masks)")
    meta = json.loads(meta_file.read_text())["slides"]
    slides = []
    for slide in load_cohort(cohort_dir / "cohort.csv", check_files=False).slides:
        if slide.split not in splits:
            continue
        entry = load_entry(cohort_dir / "cache", slide.slide_id)
        if entry is None:
            raise ConfigError(f"{cohort_dir / 'cache' / slide.slide_id}.json: no complete cache entry of slide "
                              f"{slide.slide_id}; prepare the cohort first")
        info = meta.get(slide.slide_id)
        mask_path = cohort_dir / info["mask"] if info else cohort_dir / "masks" / f"{slide.slide_id}.png"
        if info is None or not mask_path.is_file():
            raise ConfigError(f"{mask_path}: no generator mask of slide {slide.slide_id}")
        mask = mask_of_region(np.asarray(Image.open(mask_path)), entry.bbox, info["mask_downsample"],
                              (entry.width, entry.height))
        labels = np.where(mask > 0, 1, 0).astype(np.uint8)
        labels[mask == MASK_LESION], labels[mask == MASK_FOLLICLE] = 2, 3
        slides.append(ProxySlide(slide.slide_id, np.array(entry.image()), labels,
                                 np.argwhere(labels == 2), np.argwhere(labels == 3)))
    return slides


def pad_to_crop(slide: ProxySlide, crop: int) -> ProxySlide:
    """``slide`` with its image padded with white glass (labels 0: ignored) to at least ``crop`` px a side."""
    h, w = slide.labels.shape
    pad = ((0, max(0, crop - h)), (0, max(0, crop - w)))
    if pad == ((0, 0), (0, 0)):
        return slide
    return ProxySlide(slide.slide_id, np.pad(slide.image, (*pad, (0, 0)), constant_values=255),
                      np.pad(slide.labels, pad), slide.lesion, slide.follicle)


def cell_targets(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, h, w) cell classes of label images (N, H, W) on a grid of ``stride``-px cells (H, W multiples of it)."""
    parts = torch.stack([labels == 2, labels == 3, labels > 0], dim=1).float()
    share = F.avg_pool2d(parts, stride)
    target = torch.full(share[:, 0].shape, IGNORE, dtype=torch.long)
    target[share[:, 2] > TISSUE_SHARE] = OTHER
    target[share[:, 0] > CELL_SHARE] = LESION
    target[share[:, 1] > CELL_SHARE] = FOLLICLE
    return target


def sample_batch(slides: list[ProxySlide], batch_size: int, crop: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented, normalised crops (N, 3, crop, crop) and their label crops (N, crop, crop): even-numbered crops
    centred (± a third of the crop) on a lesion or, alternately, a follicle pixel where the slide has one."""
    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=gen))

    images, labels = [], []
    for k in range(batch_size):
        s = slides[draw(len(slides))]
        h, w = s.labels.shape
        pool = (s.lesion if len(s.lesion) and (k // 2) % 2 == 0 or not len(s.follicle) else s.follicle)
        if k % 2 == 0 and len(pool):
            cy, cx = pool[draw(len(pool))]
            jitter = torch.randint(-(crop // 3), crop // 3 + 1, (2,), generator=gen)
            y0, x0 = int(cy + jitter[0]) - crop // 2, int(cx + jitter[1]) - crop // 2
        else:
            y0, x0 = draw(max(1, h - crop + 1)), draw(max(1, w - crop + 1))
        y0, x0 = min(max(0, y0), h - crop), min(max(0, x0), w - crop)
        image = torch.from_numpy(np.ascontiguousarray(s.image[y0:y0 + crop, x0:x0 + crop])).permute(2, 0, 1)
        label = torch.from_numpy(s.labels[y0:y0 + crop, x0:x0 + crop].astype(np.int64))
        turns, flip = draw(4), draw(2) == 1
        image, label = torch.rot90(image, turns, (1, 2)), torch.rot90(label, turns, (0, 1))
        if flip:
            image, label = image.flip(2), label.flip(1)
        images.append(image)
        labels.append(label)
    x = torch.stack(images).float().div_(255)
    scale = 1 + (torch.rand(batch_size, 3, generator=gen) * 2 - 1) * STAIN_JITTER
    shift = (torch.rand(batch_size, 3, generator=gen) * 2 - 1) * STAIN_JITTER
    x = stain_jitter(x, scale, shift)
    x = x * (1 + (torch.rand(batch_size, 1, 1, 1, generator=gen) * 2 - 1) * BRIGHTNESS)
    return normalise(x.clamp(0, 1)).contiguous(), torch.stack(labels)


class ProxyNet(nn.Module):
    """The trainable stride-3 trunk and a 1×1 tissue-type classifier on each of its layer3 and layer4 maps."""

    def __init__(self, arch: str = DEFAULT_ARCH):
        super().__init__()
        self.trunk = ResNetTrunk(conv1_stride=3, trainable=True, arch=arch)
        self.heads = nn.ModuleDict({name: nn.Conv2d(getattr(self.trunk, name)[-1].out_channels, 3, 1)
                                    for name in LAYER_STRIDE})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.trunk
        layer3 = t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x)))))))
        return {"layer3": self.heads["layer3"](layer3), "layer4": self.heads["layer4"](t.layer4(layer3))}


def balanced_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per cell, each class present in the batch weighted by the inverse of its count of cells."""
    counts = torch.bincount(target[target >= 0], minlength=3).float()
    weight = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros(3))
    return F.cross_entropy(logits, target.to(logits.device), weight=weight.to(logits.device), ignore_index=IGNORE)


def _whole_image(slide: ProxySlide, device: torch.device, multiple: int = 1) -> torch.Tensor:
    h, w = (d // multiple * multiple for d in slide.labels.shape)
    return normalise(torch.from_numpy(np.ascontiguousarray(slide.image[:h, :w])).permute(2, 0, 1)[None]
                     .to(device).float().div(255))


@torch.no_grad()
def held_out_recall(net: ProxyNet, slides: list[ProxySlide]) -> dict[str, list[float | None]]:
    """Per layer, the recall of lesion, follicle and other tissue cells on whole slides (cut to a multiple of 48
    px); None for a class no slide holds."""
    was_training = net.training
    net.eval()
    hits = {name: torch.zeros(3) for name in LAYER_STRIDE}
    totals = {name: torch.zeros(3) for name in LAYER_STRIDE}
    device = next(net.parameters()).device
    for s in slides:
        x = _whole_image(s, device, 48)
        labels = torch.from_numpy(s.labels[: x.shape[2], : x.shape[3]].astype(np.int64))[None]
        for name, logits in net(x).items():
            target = cell_targets(labels, LAYER_STRIDE[name])[0]
            guess = logits[0].argmax(0).cpu()
            for c in range(3):
                hits[name][c] += float(((guess == c) & (target == c)).sum())
                totals[name][c] += float((target == c).sum())
    net.train(was_training)
    return {name: [float(h / t) if t else None for h, t in zip(hits[name], totals[name], strict=True)]
            for name in LAYER_STRIDE}


def _signature(config: ProxyConfig, init: str | None, train: list[ProxySlide]) -> dict:
    """What the result depends on: the settings, the initial weights' bytes and the training slides' pixels and
    labels (so an edited cohort is not taken for the old one)."""
    digest = hashlib.sha256()
    for s in train:
        digest.update(s.slide_id.encode())
        digest.update(hashlib.sha256(s.image.tobytes()).digest())
        digest.update(hashlib.sha256(s.labels.tobytes()).digest())
    return {"config": asdict(config), "init_sha256": file_sha256(init) if init else None,
            "train_slides_sha256": digest.hexdigest()}


def finished_proxy(out: str | Path, signature: dict) -> Path | None:
    """The weights of a finished proxy pretraining in ``out`` with this signature, else None."""
    summary_file = Path(out) / SUMMARY_FILE
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    weights = Path(out) / summary["weights"]
    if summary.get("signature") != signature or not weights.is_file():
        raise ConfigError(f"{summary_file}: a proxy pretraining with other settings, initial weights or slides is "
                          "there; give another folder")
    return weights


def proxy_pretrain(cohort_dir: str | Path, init: str | None, out: str | Path, config: ProxyConfig = ProxyConfig(),
                   *, device: str | torch.device = "cpu", progress: bool = True, stop_at: int | None = None) -> Path:
    """Pretrain the trunk on the tissue types of a synthetic cohort's train and val slides (the test split is held
    out: its cell recall is reported) from the weights file ``init`` (None: random weights); returns the weights
    file. A finished run in ``out`` with the same signature is reused; an unfinished one continues from its
    checkpoint. ``stop_at``: stop after that step as an interrupted run would (tests).

    Raises:
        ConfigError: bad settings, a folder that is not a prepared synthetic cohort, or ``out`` holding another
            run.
    """
    config = config.validate()
    out, device = Path(out), torch.device(device)
    train = load_proxy_slides(cohort_dir, ("train", "val"))
    held_out = load_proxy_slides(cohort_dir, ("test",))
    if not train:
        raise ConfigError(f"{cohort_dir}: no train or val slides to pretrain on")
    train = [pad_to_crop(s, config.crop) for s in train]
    signature = _signature(config, init, train)
    done = finished_proxy(out, signature)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the classifiers' (and a random trunk's) initial weights: the seed's
        torch.manual_seed(config.seed)
        net = ProxyNet(config.arch)
    if init is not None:
        load_trunk_weights(net.trunk, init)
    net.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, history, evaluations, seconds = 0, [], [], 0.0
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        if saved["signature"] != json.dumps(signature, sort_keys=True):
            raise ConfigError(f"{checkpoint}: a checkpoint of a proxy pretraining with other settings, initial "
                              "weights or slides; give another folder")
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history, evaluations, seconds = saved["step"], saved["history"], saved["evaluations"], saved["seconds"]
    bar = tqdm(total=config.steps, initial=step, desc="proxy pretraining", unit="step", disable=not progress)
    try:
        while step < config.steps:
            start = time.perf_counter()
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, labels = sample_batch(train, config.batch_size, config.crop,
                                     seeded_generator(config.seed, CROP_STREAM, step))
            loss = sum(balanced_loss(logits, cell_targets(labels, LAYER_STRIDE[name]))
                       for name, logits in net(x.to(device)).items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - start
            step += 1
            history.append([step, loss.item(), lr, config.batch_size / (time.perf_counter() - start)])
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1][1]:.3f}")
            if step % config.eval_every == 0 or step == config.steps:
                evaluations.append({"step": step, "held_out_recall": held_out_recall(net, held_out)})
                with atomic_output(checkpoint, fsync=True) as tmp:
                    torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                "history": history, "evaluations": evaluations, "seconds": seconds,
                                "signature": json.dumps(signature, sort_keys=True)}, tmp)
            if stop_at is not None and step >= stop_at and step < config.steps:
                from wsilocal.errors import TrainingInterrupted

                raise TrainingInterrupted(f"proxy pretraining stopped after step {step}; run it again to continue")
    finally:
        bar.close()
    reestimate_batchnorm(net.trunk, (_whole_image(s, device) for s in train))
    weights_file = out / weights_file_name(config.arch)
    with atomic_output(weights_file) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.trunk.state_dict().items()}, str(tmp),
                  metadata={"format": f"torchvision {config.arch} (no fc)",
                            "producer": "wsilocal proxy pretraining (supervised: tissue-type masks)"})
    with atomic_output(out / LOG_FILE) as tmp:
        np.savetxt(tmp, np.array(history), delimiter=",", header="step,loss,lr,crops_per_s", comments="", fmt="%.6g")
    plot_loss_curve(history, out / "loss_curve.png", title="proxy pretraining (supervised: tissue type per cell)")
    summary = {
        "what": "SUPERVISED proxy pretraining on the generator's tissue-type masks (lesion, follicle, other tissue) "
                "of a proxy cohort; the slides' class labels are never read",
        "cohort": str(Path(cohort_dir).resolve()), "init": str(init) if init else None, "signature": signature,
        "train_slides": [s.slide_id for s in train], "held_out_slides": [s.slide_id for s in held_out],
        "tissue_types": list(TISSUE_TYPES), "steps": step, "train_seconds": round(seconds, 1),
        "first_loss": history[0][1],
        "final_loss": float(np.mean([h[1] for h in history[-max(1, len(history) // 20):]])),
        "evaluations": evaluations, "held_out_recall": held_out_recall(net, held_out),
        "weights": weights_file.name, "weights_sha256": file_sha256(weights_file), "torch": torch.__version__,
    }
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1))
    checkpoint.unlink(missing_ok=True)
    return weights_file
