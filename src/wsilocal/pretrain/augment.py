"""Two random views of each tile: the augmentations of self-supervised pretraining, batched in torch.

Per view and tile (random parameters drawn on the CPU from a generator seeded by the step, so a run is
reproducible on any device; the pixel work runs on the tiles' device):

1. a random resized crop (``crop_scale`` of the tile's area, aspect ratio 3:4 to 4:3) to ``crop`` px, one of the
   8 flips/90° rotations, all in one bilinear ``grid_sample`` (histology has no up, no left);
2. H&E stain jitter (Tellez et al. 2018): the tile is unmixed into haematoxylin, eosin and residual optical
   densities with Ruifrok and Johnston's matrix, each scaled by U(1 ± σ) and shifted by U(± σ), and mixed back,
   the variation between labs and staining runs that a model must ignore;
3. brightness, contrast and saturation jitter (with probability 0.8), grayscale (0.2);
4. Gaussian blur (probability ``blur``, σ up to 1 px), focus variation of scanners.

Then the ImageNet normalisation that torchvision-layout weights expect (:data:`IMAGENET_MEAN`/``STD``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, residual/DAB) in optical density, as scikit-image's
# ``rgb_from_hed``; its inverse unmixes an RGB pixel's optical densities into the three stain concentrations.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
MIN_INTENSITY = 1.0 / 255  # optical density of a saturated pixel stays finite


@dataclass(frozen=True)
class Augmentation:
    """The strengths of the view augmentations (see the module docstring)."""

    crop: int = 96
    crop_scale: tuple[float, float] = (0.35, 1.0)
    stain_jitter: float = 0.05
    colour_jitter: float = 0.2
    grayscale: float = 0.2
    blur: float = 0.5


def _crop_grids(n: int, crop: int, scale: tuple[float, float], gen: torch.Generator,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Sampling grids (n, crop, crop, 2) of random resized crops, each also flipped and rotated by a multiple of 90°."""
    area = torch.empty(n, dtype=torch.float64).uniform_(*scale, generator=gen)
    log_ratio = torch.empty(n, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    ratio = log_ratio.exp()
    half_w = (area * ratio).sqrt().clamp(max=1.0)  # in units of the tile's half-width (grid coordinates are ±1)
    half_h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * (1 - half_w)
    cy = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * (1 - half_h)
    quarter_turns = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    angle = quarter_turns.double() * (math.pi / 2)
    cos, sin = angle.cos().round(), angle.sin().round()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * half_w * flip, -sin * half_h
    theta[:, 1, 0], theta[:, 1, 1] = sin * half_w * flip, cos * half_h
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    return F.affine_grid(theta.float(), [n, 3, crop, crop], align_corners=False)


def stain_jitter(rgb: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """HED jitter of (N, 3, H, W) RGB in [0, 1]: each stain's concentration × ``scale`` + ``shift`` (both (N, 3))."""
    od = -torch.log(rgb.clamp(min=MIN_INTENSITY))
    hed = torch.einsum("nchw,cs->nshw", od, HED_FROM_RGB.to(od))
    hed = hed * scale[:, :, None, None] + shift[:, :, None, None]
    od = torch.einsum("nshw,sc->nchw", hed, RGB_FROM_HED.to(od))
    return torch.exp(-od).clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _colour_jitter(x: torch.Tensor, strength: float, grayscale: float, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]

    def factor(p: float) -> torch.Tensor:  # U(1 ± strength) with probability p, else 1
        f = 1 + (torch.rand(n, generator=gen) * 2 - 1) * strength
        return torch.where(torch.rand(n, generator=gen) < p, f, torch.ones(n)).to(x)[:, None, None, None]

    x = x * factor(0.8)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor(0.8) + mean
    gray = _gray(x)
    x = (x - gray) * factor(0.8) + gray
    to_gray = (torch.rand(n, generator=gen) < grayscale).to(x)[:, None, None, None]
    x = x * (1 - to_gray) + _gray(x) * to_gray
    return x.clamp(0, 1)


def _blur(x: torch.Tensor, probability: float, gen: torch.Generator, max_sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur, each tile its own σ (a grouped convolution: one kernel per tile and channel)."""
    n, c, h, w = x.shape
    sigma = torch.empty(n).uniform_(0.1, max_sigma, generator=gen)
    blurred = torch.rand(n, generator=gen) < probability
    radius = math.ceil(2 * max_sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand(n, -1)
    kernel = torch.where(blurred[:, None], kernel, identity).to(x).repeat_interleave(c, dim=0)  # (n·c, k)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] → ImageNet-normalised input of a torchvision-layout ResNet."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std


def random_view(tiles: torch.Tensor, aug: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """One augmented, normalised view (N, 3, crop, crop) of uint8 tiles (N, H, W, 3) on any device."""
    x = tiles.permute(0, 3, 1, 2).float().div_(255)
    n = x.shape[0]
    grid = _crop_grids(n, aug.crop, aug.crop_scale, gen).to(x.device)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    sigma = aug.stain_jitter
    scale = 1 + (torch.rand(n, 3, generator=gen) * 2 - 1) * sigma
    shift = (torch.rand(n, 3, generator=gen) * 2 - 1) * sigma
    x = stain_jitter(x, scale.to(x), shift.to(x))
    x = _colour_jitter(x, aug.colour_jitter, aug.grayscale, gen)
    x = _blur(x, aug.blur, gen)
    return normalise(x).contiguous()


def two_views(tiles: torch.Tensor, aug: Augmentation, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmented views of the same tiles (the positive pairs of the objective)."""
    return random_view(tiles, aug, gen), random_view(tiles, aug, gen)
