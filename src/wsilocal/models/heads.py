"""Attention heads: the auxiliary classifiers A_i after modules 1..K-1 and the final classifier H.

All work on one slide at a time: a feature map of shape (1, C, H, W), every position an instance of
a gated-attention MIL pooling (Ilse et al. 2018).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Auxiliary-classifier kernel (= stride) per input channel count. 64/128/256 are the authors'; the 512
# value (only reached by a block-level split ending inside layer4) keeps the window growing in image
# pixels: 9·6 = 54, 7·12 = 84, 5·24 = 120, 3·48 = 144 px at conv1 stride 3.
AUX_KERNEL = {64: 9, 128: 7, 256: 5, 512: 3}
# The same kernels by resolution level of the map (0 = layer1's, 3 = layer4's): what a ResNet50 module uses,
# whose maps are 4× wider than ResNet34's at the same resolution (256 channels at layer1's).
AUX_KERNEL_BY_LEVEL = (9, 7, 5, 3)


def slide_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                        class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of one slide's logits (1, n), scaled by its class's weight when given.

    ``F.cross_entropy(weight=...)`` divides by the weights of the batch, which for a batch of one slide
    cancels the weight exactly; multiplying instead makes class weights act across accumulated slides.
    """
    loss = F.cross_entropy(logits, target)
    return loss if class_weight is None else loss * class_weight[target].mean()


def aux_kernel_size(channels: int) -> int:
    """Kernel size and stride of the auxiliary classifier's convolution for a ``channels``-channel map."""
    if channels not in AUX_KERNEL:
        raise ValueError(f"no auxiliary-classifier kernel for {channels} channels (known: {sorted(AUX_KERNEL)})")
    return AUX_KERNEL[channels]


class GatedAttentionPool(nn.Module):
    """Gated attention pooling over the positions of a (1, C, H, W) map, or over its tissue positions.

    ``a = w(tanh(V h) ⊙ sigmoid(U h))``, softmax over positions, pooled = Σ a·h. Dropout acts on the
    two gate branches (as in CLAM). Returns (pooled (1, C), attention (H, W) summing to 1).

    With a bool (H, W) ``mask`` only its True positions are instances: the others (glass) get attention exactly
    0 and add nothing to the pooled vector — as if their logits were −∞, without computing them.
    """

    def __init__(self, channels: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(channels, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"expected one feature map of shape (1, C, H, W), got {tuple(x.shape)}")
        instances = x.flatten(2)[0].t()  # (H·W, C)
        if mask is None:
            pooled, attention = self.pool_instances(instances)
            return pooled, attention.view(x.shape[2:])
        index = mask_index(mask, tuple(x.shape[2:]), x.device)
        pooled, attention = self.pool_instances(instances[index])
        return pooled, scatter_positions(attention, index, tuple(x.shape[2:]))

    def pool_instances(self, instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (1, C), attention (n,)) of ``n`` instances (n, C)."""
        scores = self.w(self.V(instances) * self.U(instances))  # (n, 1)
        attention = torch.softmax(scores[:, 0], dim=0)
        return (attention @ instances).unsqueeze(0), attention


def mask_index(mask: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The flat indices of a bool position mask's True entries; a mask not of the map's ``shape`` is an error."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"position mask of shape {tuple(mask.shape)} for a map of {tuple(shape)} positions")
    return mask.reshape(-1).to(device).nonzero()[:, 0]


def scatter_positions(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The (H, W) map holding ``values`` at the flat positions ``index`` and exactly 0 elsewhere."""
    return values.new_zeros(shape[0] * shape[1]).index_put((index,), values).view(shape)


class AuxiliaryClassifier(nn.Module):
    """A_i: Conv(k=s) → GroupNorm → ReLU → gated attention → Linear(C,128) → ReLU → Linear(128, n).

    ``kernel`` (k = s) defaults to :data:`AUX_KERNEL`'s for ``channels``; a module names it by its output's
    resolution level (:data:`AUX_KERNEL_BY_LEVEL`), which is what the authors' sizes follow for any width.

    The strided convolution is zero-padded (about equally on both sides) so its windows cover every
    position of the map: nothing at the bottom/right edge is dropped, and a map smaller than the
    kernel gives one window instead of an error. Returns (logits (1, n), attention over the windows). With a
    position mask, glass windows take part neither in the GroupNorm statistics nor in the attention.
    """

    def __init__(self, channels: int, n_classes: int, dropout: float = 0.2, kernel: int | None = None):
        super().__init__()
        self.kernel = aux_kernel_size(channels) if kernel is None else kernel
        self.conv = nn.Conv2d(channels, channels, self.kernel, stride=self.kernel)
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.pool = GatedAttentionPool(channels, channels // 2, dropout)
        self.classifier = nn.Sequential(nn.Linear(channels, 128), nn.ReLU(), nn.Linear(128, n_classes))

    def padding(self, map_hw: tuple[int, int]) -> list[int]:
        """The convolution's zero padding per axis for a map of ``map_hw``: half the shortfall to the next
        multiple of k, rounded up (symmetric conv padding costs no copy)."""
        return [math.ceil((-size % self.kernel) / 2) for size in map_hw]

    def output_mask(self, mask: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
        """The tissue positions of the convolution's output from those of its ``map_hw`` input map: a window is
        tissue when any position it covers is. The map's cells tile the image, so this is exactly "the window's
        cell of the image holds tissue"."""
        pooled = F.max_pool2d(mask.to(torch.float32)[None, None], self.kernel, self.kernel,
                              padding=self.padding(map_hw))
        return pooled[0, 0] > 0

    def head(self, conv_out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What follows the convolution, on its output (1, C, h, w): GroupNorm, ReLU, attention, classifier.

        With ``mask`` (bool (h, w), the output's tissue positions) glass positions take no part at all: the
        GroupNorm statistics are those of the tissue positions, and the attention is 0 there.
        """
        if mask is None:
            pooled, attention = self.pool(F.relu(self.norm(conv_out)))
            return self.classifier(pooled), attention
        shape = tuple(conv_out.shape[2:])
        index = mask_index(mask, shape, conv_out.device)
        tokens = conv_out.flatten(2)[0][:, index]  # (C, n): the tissue positions only
        channels, groups = tokens.shape[0], self.norm.num_groups
        grouped = tokens.reshape(groups, -1)
        mean = grouped.mean(dim=1, keepdim=True)
        variance = grouped.var(dim=1, unbiased=False, keepdim=True)
        normed = ((grouped - mean) / torch.sqrt(variance + self.norm.eps)).reshape(channels, -1)
        normed = normed * self.norm.weight[:, None] + self.norm.bias[:, None]
        pooled, attention = self.pool.pool_instances(F.relu(normed).t())
        return self.classifier(pooled), scatter_positions(attention, index, shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, attention over the windows); ``mask``: bool tissue positions of ``x``'s map (None: all)."""
        map_hw = tuple(x.shape[2:])
        conv_out = F.conv2d(x, self.conv.weight, self.conv.bias, stride=self.kernel, padding=self.padding(map_hw))
        return self.head(conv_out, None if mask is None else self.output_mask(mask, map_hw))


class ContextBlock(nn.Module):
    """Spatial mixing before H's attention (beyond the paper): 1×1 conv to ``channels_out``, then 3×3 convs dilated
    1, 2 and 4 (a field of 15 map cells), each followed by ReLU.

    H's attention pools positions as a bag: it can weigh what each position holds, not how positions lie relative
    to each other, so a label that is a relation between two structures (the context task's distance) has to be
    encoded inside each position's feature by the trunk. This block lets H read such relations from the trunk's
    map directly (``docs/benchmarks.md``: measured on the context task). Glass positions are zeroed first, so what
    the block sees does not depend on whether glass was computed or skipped.
    """

    DILATIONS = (1, 2, 4)

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels_in, channels_out, 1), nn.ReLU()]
        for dilation in self.DILATIONS:
            layers += [nn.Conv2d(channels_out, channels_out, 3, padding=dilation, dilation=dilation), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask.to(device=x.device, dtype=x.dtype)
        return self.body(x)


class FinalClassifier(nn.Module):
    """H: gated attention (hidden 128) on the trunk's map → Linear(C,128) → ReLU → Linear(128, n); C = 512
    (ResNet18/34) or 2048 (ResNet50).

    No convolution before the pooling (the paper's H), unless ``context`` > 0: then a :class:`ContextBlock` of that
    many channels mixes neighbouring positions first and the attention pools its output. Dropout 0.2 in the
    attention branch, as in the auxiliary classifiers. Returns (logits (1, n), attention (H, W)).
    """

    def __init__(self, channels: int = 512, n_classes: int = 2, hidden: int = 128, dropout: float = 0.2,
                 context: int = 0):
        super().__init__()
        self.context = ContextBlock(channels, context) if context > 0 else None
        pooled = context if context > 0 else channels
        self.pool = GatedAttentionPool(pooled, hidden, dropout)
        self.classifier = nn.Sequential(nn.Linear(pooled, 128), nn.ReLU(), nn.Linear(128, n_classes))

    def instances(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The map whose positions the attention pools: ``x`` itself, or the context block's output."""
        return x if self.context is None else self.context(x, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, attention); ``mask``: bool (H, W) tissue positions of ``x`` (None: every position)."""
        pooled, attention = self.pool(self.instances(x, mask), mask)
        return self.classifier(pooled), attention
