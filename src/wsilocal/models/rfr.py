"""Random feature reconstruction (RFR): reconstruct random patches of a module's input from its output.

For module i with input x_{i-1} and output x_i (which is ``stride`` times smaller), a patch of
``p`` output pixels at output position (y, x) corresponds to the input patch of ``p·stride`` pixels at
(y·stride, x·stride). A small decoder upsamples the output patch back by ``stride`` and must rebuild
the (detached) input patch; the L1 error regularises the module to keep what its input carried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def rfr_patch_size(out_stride: int) -> int:
    """RFR patch size, in input pixels of the module, for a module whose *output* is at ``out_stride``
    (relative to the image, conv1 stride 3): 128 up to stride 6, 64 up to 12, 32 beyond.

    This reproduces the authors' per-module sizes: K=4 → 128, 64, 32; K=8 → 128,128,128,64,64,32,32.
    """
    if out_stride <= 6:
        return 128
    return 64 if out_stride <= 12 else 32


@dataclass(frozen=True)
class PatchBox:
    """One sampled location: the output patch (top-left ``out_y, out_x``, side ``out_size``) and the
    input patch it comes from (top-left ``in_y, in_x``, side ``in_size``)."""

    out_y: int
    out_x: int
    out_size: int
    stride: int

    @property
    def in_y(self) -> int:
        return self.out_y * self.stride

    @property
    def in_x(self) -> int:
        return self.out_x * self.stride

    @property
    def in_size(self) -> int:
        return self.out_size * self.stride


def fitting_patch_size(out_hw: tuple[int, int], in_hw: tuple[int, int], stride: int, patch_size: int) -> int:
    """Output-patch side actually used: ``ceil(patch_size / stride)``, shrunk so that both the output
    patch and its input patch fit inside their maps. Raises ValueError if not even one pixel fits."""
    fits = min(out_hw[0], out_hw[1], in_hw[0] // stride, in_hw[1] // stride)
    if fits < 1:
        raise ValueError(f"feature maps too small for RFR: output {out_hw}, input {in_hw}, stride {stride}")
    return min(math.ceil(patch_size / stride), fits)


def sample_patch_boxes(out_hw: tuple[int, int], in_hw: tuple[int, int], stride: int, patch_size: int,
                       n_patches: int, generator: torch.Generator | None = None) -> list[PatchBox]:
    """Draw ``n_patches`` patch locations, uniformly among those where both patches fit in their maps."""
    size = fitting_patch_size(out_hw, in_hw, stride, patch_size)
    # Largest valid top-left output coordinate, so that the input patch stays inside too.
    max_y = min(out_hw[0], in_hw[0] // stride) - size
    max_x = min(out_hw[1], in_hw[1] // stride) - size
    ys = torch.randint(0, max_y + 1, (n_patches,), generator=generator).tolist()
    xs = torch.randint(0, max_x + 1, (n_patches,), generator=generator).tolist()
    return [PatchBox(y, x, size, stride) for y, x in zip(ys, xs, strict=True)]


def crop_patches(x_in: torch.Tensor, x_out: torch.Tensor,
                 boxes: list[PatchBox]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the boxes' patches of (1, C, H, W) maps: (input patches (n, C_in, P, P), output patches)."""
    inputs = torch.cat([x_in[:, :, b.in_y:b.in_y + b.in_size, b.in_x:b.in_x + b.in_size] for b in boxes])
    outputs = torch.cat([x_out[:, :, b.out_y:b.out_y + b.out_size, b.out_x:b.out_x + b.out_size]
                         for b in boxes])
    return inputs, outputs


class RandomFeatureReconstruction(nn.Module):
    """RFR unit U_i: L1 loss of reconstructing ``n_patches`` random input patches from output patches.

    Decoder: bilinear upsample ×stride (skipped at stride 1) → Conv3×3(c_out→c_out) → BatchNorm (batch =
    the patches) → ReLU → Conv3×3(c_out→c_in). ``patch_size`` is in input pixels of the module.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, patch_size: int, n_patches: int = 10):
        super().__init__()
        self.stride, self.patch_size, self.n_patches = stride, patch_size, n_patches
        upsample = [nn.Upsample(scale_factor=stride, mode="bilinear", align_corners=False)] if stride > 1 else []
        self.decoder = nn.Sequential(
            *upsample,
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_in, 3, padding=1),
        )

    def forward(self, x_in: torch.Tensor, x_out: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        boxes = sample_patch_boxes(tuple(x_out.shape[2:]), tuple(x_in.shape[2:]), self.stride,
                                   self.patch_size, self.n_patches, generator)
        targets, sources = crop_patches(x_in.detach(), x_out, boxes)
        return F.l1_loss(self.decoder(sources), targets)
