"""Whole-slide training samples from the 5x cache, with the paper's augmentations.

One sample is one whole tissue image (batch size 1). Augmentations — a random crop of up to
``edge_crop`` from each edge, flips, 90° rotations and colour jitter — draw from a ``torch.Generator``
seeded by (run seed, augmentation, epoch, slide position), so a resumed run sees exactly the samples an
uninterrupted run would.

Random streams. Every random draw of a run after its initial weights (``torch.manual_seed(seed)``) comes from
a stream named by the run's seed, a *purpose*
(:class:`Purpose`: data order, augmentation, RFR locations, dropout, instance sub-sampling) and that
purpose's keys (epoch, slide position): :func:`stream_seed` hashes the whole tuple with numpy's
``SeedSequence``, so no two tuples share a stream by construction — seed s's RFR stream is not seed s+1's
augmentation stream, as it was when purposes were told apart by adding 1 or 2 to the seed. (torch's CPU
generator, mt19937, keeps only the low 32 bits of a seed: two given tuples still meet by chance with
probability 2⁻³², with no pattern to it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from wsilocal.prepare.cache import CacheEntry
from wsilocal.slide.tissue import ImageTissueMask
from wsilocal.stream.sources import to_tensor


@dataclass(frozen=True)
class Augmentation:
    """Augmentation strengths; ``enabled=False`` gives the plain normalised image."""

    enabled: bool = True
    edge_crop: float = 0.1
    color_jitter: float = 0.05


class Purpose(IntEnum):
    """What a random stream is for; part of every stream's name (:func:`stream_seed`). Never renumber: the
    numbers are part of every run's results."""

    ORDER = 1  # the order of the samples in an epoch (keys: epoch)
    AUGMENT = 2  # a slide's augmentation (keys: epoch, slide)
    RFR = 3  # a slide's RFR patch locations (keys: epoch, slide)
    DROPOUT = 4  # dropout and models' own draws, through torch's global generator (keys: epoch[, slide])
    SUBSAMPLE = 5  # a MIL bag's instance sub-sampling (keys: epoch, slide)


def stream_seed(seed: int, purpose: Purpose, *keys: int) -> int:
    """The 64-bit seed of the stream of (``seed``, ``purpose``, ``keys``): numpy's ``SeedSequence`` of the
    whole tuple, so streams of different tuples are independent — whatever the seeds, purposes and keys.

    The number of keys is one of the words (``SeedSequence`` pads short entropy with zeros: ``[s, p, e]`` and
    ``[s, p, e, 0]`` would be one stream), and every value must be in 0..2³²−1 (one word each: a larger one
    would read as two words).
    """
    words = [int(seed), int(purpose), len(keys), *(int(k) for k in keys)]
    if any(not 0 <= w < 2**32 for w in words):
        raise ValueError(f"random stream keys must be in 0..2**32-1, got {words}")
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def sample_generator(seed: int, purpose: Purpose, epoch: int, index: int) -> torch.Generator:
    """The random stream of one (purpose, epoch, slide), independent of what ran before it."""
    return torch.Generator().manual_seed(stream_seed(seed, purpose, epoch, index))



def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


@dataclass(frozen=True)
class Geometry:
    """The geometric part of one augmentation: edge crop (top, bottom, left, right px), flips, quarter turns."""

    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    flip_columns: bool = False
    flip_rows: bool = False
    quarter_turns: int = 0


def draw_geometry(height: int, width: int, aug: Augmentation, generator: torch.Generator) -> Geometry:
    """The crop, flips and rotation of an image of ``height``×``width``: the first draws of its stream, so the
    image (:func:`augment_image`) and its tissue mask (:meth:`CachedSlides.tissue`) get the same ones."""
    crop = (0, 0, 0, 0)
    if aug.edge_crop > 0:
        crop = tuple(int(_uniform(generator, 0, aug.edge_crop) * side) for side in (height, height, width, width))
    flip_columns = float(torch.rand((), generator=generator)) < 0.5
    flip_rows = float(torch.rand((), generator=generator)) < 0.5
    return Geometry(crop, flip_columns, flip_rows, int(torch.randint(0, 4, (), generator=generator)))


def augment_image(image: np.ndarray, aug: Augmentation, generator: torch.Generator) -> np.ndarray:
    """Apply edge crop, flips, rot90 and colour jitter to a uint8 (H, W, 3) image."""
    if not aug.enabled:
        return np.asarray(image)
    h, w = image.shape[:2]
    geometry = draw_geometry(h, w, aug, generator)
    top, bottom, left, right = geometry.crop
    image = np.asarray(image[top : h - bottom, left : w - right])
    if geometry.flip_columns:
        image = image[:, ::-1]
    if geometry.flip_rows:
        image = image[::-1]
    image = np.rot90(image, k=geometry.quarter_turns)
    if aug.color_jitter > 0:
        j = aug.color_jitter
        brightness, contrast, saturation = (_uniform(generator, 1 - j, 1 + j) for _ in range(3))
        x = image.astype(np.float32)
        grey = x.mean(axis=2, keepdims=True)
        x = grey + (x - grey) * saturation  # saturation around each pixel's grey value
        x = (x - x.mean()) * contrast + x.mean()  # contrast around the image mean
        image = np.clip(x * brightness, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def augment_tissue(tissue: ImageTissueMask, geometry: Geometry) -> ImageTissueMask:
    """The tissue mask of the image :func:`augment_image` makes with ``geometry``."""
    top, bottom, left, right = geometry.crop
    tissue = tissue.crop(top, bottom, left, right)
    if geometry.flip_columns:
        tissue = tissue.flip(1)
    if geometry.flip_rows:
        tissue = tissue.flip(0)
    return tissue.rot90(geometry.quarter_turns)


class CachedSlides:
    """Training/evaluation samples: (image tensor (1,3,H,W), label index, slide id) from cache entries.

    With ``mask_glass`` :meth:`tissue` gives each sample's tissue mask, augmented as its image is; without, None
    (every map position is attended to, as runs trained before the mask were).
    """

    def __init__(self, entries: list[CacheEntry], labels: list[int], mean: list[float], std: list[float],
                 augmentation: Augmentation | None = None, seed: int = 0, *, mask_glass: bool = False):
        if len(entries) != len(labels):
            raise ValueError("entries and labels differ in length")
        self.entries = entries
        self.labels = labels
        self.mean, self.std = mean, std
        self.augmentation = augmentation or Augmentation(enabled=False)
        self.seed = seed
        self.mask_glass = mask_glass

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, int, str]:
        entry = self.entries[index]
        image = entry.image()
        if self.augmentation.enabled:
            image = augment_image(image, self.augmentation,
                                  sample_generator(self.seed, Purpose.AUGMENT, epoch, index))
        return to_tensor(image, self.mean, self.std), self.labels[index], entry.slide_id

    def tissue(self, index: int, epoch: int = 0) -> ImageTissueMask | None:
        """The tissue mask of the image :meth:`get` gives for (``index``, ``epoch``); None without ``mask_glass``."""
        if not self.mask_glass:
            return None
        entry = self.entries[index]
        tissue = entry.tissue()
        if not self.augmentation.enabled:
            return tissue
        generator = sample_generator(self.seed, Purpose.AUGMENT, epoch, index)
        return augment_tissue(tissue, draw_geometry(entry.height, entry.width, self.augmentation, generator))

    def epoch_order(self, epoch: int) -> list[int]:
        """A shuffled order of the samples for one epoch (deterministic given seed and epoch)."""
        return epoch_order(len(self), self.seed, epoch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of ``n`` samples (slides or bags), fixed by (seed, epoch) alone so that a resumed run
    replays it exactly."""
    generator = torch.Generator().manual_seed(stream_seed(seed, Purpose.ORDER, epoch))
    return torch.randperm(n, generator=generator).tolist()


def balanced_class_weights(labels: list[int], n_classes: int, device: torch.device) -> torch.Tensor:
    """Per-class loss weights ``n / (n_classes · count)``: every class weighs as much as the others in total
    (``--class-weights``). A class without slides gets the weight of a class with one."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weight = counts.sum() / (n_classes * np.maximum(counts, 1))
    return torch.tensor(weight, dtype=torch.float32, device=device)
