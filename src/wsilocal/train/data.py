"""Whole-slide training samples from the 5x cache, with the paper's augmentations.

One sample is one whole tissue image (batch size 1). Augmentations — a random crop of up to
``edge_crop`` from each edge, flips, 90° rotations and colour jitter — draw from a ``torch.Generator``
seeded by (run seed, epoch, slide position), so a resumed run sees exactly the samples an uninterrupted
run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wsilocal.slide.cache import CacheEntry


@dataclass(frozen=True)
class Augmentation:
    """Augmentation strengths; ``enabled=False`` gives the plain normalised image."""

    enabled: bool = True
    edge_crop: float = 0.1
    color_jitter: float = 0.05


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one (epoch, slide) pair, independent of what ran before it."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 10_007 + int(index))


def to_tensor(image: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (H, W, 3) → normalised float32 (1, 3, H, W)."""
    x = torch.from_numpy(np.array(image, copy=True))  # a private, writable copy of the (memory-mapped) pixels
    x = x.permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean_t) / std_t).unsqueeze(0)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment_image(image: np.ndarray, aug: Augmentation, generator: torch.Generator) -> np.ndarray:
    """Apply edge crop, flips, rot90 and colour jitter to a uint8 (H, W, 3) image."""
    if not aug.enabled:
        return np.asarray(image)
    h, w = image.shape[:2]
    if aug.edge_crop > 0:
        top, bottom, left, right = (int(_uniform(generator, 0, aug.edge_crop) * side) for side in (h, h, w, w))
        image = image[top : h - bottom, left : w - right]
    image = np.asarray(image)
    if float(torch.rand((), generator=generator)) < 0.5:
        image = image[:, ::-1]
    if float(torch.rand((), generator=generator)) < 0.5:
        image = image[::-1]
    image = np.rot90(image, k=int(torch.randint(0, 4, (), generator=generator)))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        brightness, contrast, saturation = (_uniform(generator, 1 - j, 1 + j) for _ in range(3))
        x = image.astype(np.float32)
        grey = x.mean(axis=2, keepdims=True)
        x = grey + (x - grey) * saturation  # saturation around each pixel's grey value
        x = (x - x.mean()) * contrast + x.mean()  # contrast around the image mean
        image = np.clip(x * brightness, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


class CachedSlides:
    """Training/evaluation samples: (image tensor (1,3,H,W), label index, slide id) from cache entries."""

    def __init__(self, entries: list[CacheEntry], labels: list[int], mean: list[float], std: list[float],
                 augmentation: Augmentation | None = None, seed: int = 0):
        if len(entries) != len(labels):
            raise ValueError("entries and labels differ in length")
        self.entries = entries
        self.labels = labels
        self.mean, self.std = mean, std
        self.augmentation = augmentation or Augmentation(enabled=False)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, int, str]:
        entry = self.entries[index]
        image = entry.image()
        if self.augmentation.enabled:
            image = augment_image(image, self.augmentation, sample_generator(self.seed, epoch, index))
        return to_tensor(image, self.mean, self.std), self.labels[index], entry.slide_id

    def epoch_order(self, epoch: int) -> list[int]:
        """A shuffled order of the samples for one epoch (deterministic given seed and epoch)."""
        generator = torch.Generator().manual_seed(int(self.seed) * 7919 + int(epoch))
        return torch.randperm(len(self), generator=generator).tolist()
