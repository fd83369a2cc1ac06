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
    """Gated attention pooling over all positions of a (1, C, H, W) map.

    ``a = w(tanh(V h) ⊙ sigmoid(U h))``, softmax over positions, pooled = Σ a·h. Dropout acts on the
    two gate branches (as in CLAM). Returns (pooled (1, C), attention (H, W) summing to 1).
    """

    def __init__(self, channels: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(channels, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"expected one feature map of shape (1, C, H, W), got {tuple(x.shape)}")
        height, width = x.shape[2:]
        instances = x.flatten(2)[0].t()  # (H·W, C)
        scores = self.w(self.V(instances) * self.U(instances))  # (H·W, 1)
        attention = torch.softmax(scores[:, 0], dim=0)
        pooled = (attention @ instances).unsqueeze(0)
        return pooled, attention.view(height, width)


class AuxiliaryClassifier(nn.Module):
    """A_i: Conv(k=s) → GroupNorm → ReLU → gated attention → Linear(C,128) → ReLU → Linear(128, n).

    ``kernel`` (k = s) defaults to :data:`AUX_KERNEL`'s for ``channels``; a module names it by its output's
    resolution level (:data:`AUX_KERNEL_BY_LEVEL`), which is what the authors' sizes follow for any width.

    The strided convolution is zero-padded (about equally on both sides) so its windows cover every
    position of the map: nothing at the bottom/right edge is dropped, and a map smaller than the
    kernel gives one window instead of an error. Returns (logits (1, n), attention over the windows).
    """

    def __init__(self, channels: int, n_classes: int, dropout: float = 0.2, kernel: int | None = None):
        super().__init__()
        self.kernel = aux_kernel_size(channels) if kernel is None else kernel
        self.conv = nn.Conv2d(channels, channels, self.kernel, stride=self.kernel)
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.pool = GatedAttentionPool(channels, channels // 2, dropout)
        self.classifier = nn.Sequential(nn.Linear(channels, 128), nn.ReLU(), nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Pad by half the shortfall to the next multiple of k: conv padding is symmetric and costs no copy.
        padding = [math.ceil((-size % self.kernel) / 2) for size in x.shape[2:]]
        x = F.conv2d(x, self.conv.weight, self.conv.bias, stride=self.kernel, padding=padding)
        pooled, attention = self.pool(F.relu(self.norm(x)))
        return self.classifier(pooled), attention


class FinalClassifier(nn.Module):
    """H: gated attention (hidden 128) on the trunk's map → Linear(C,128) → ReLU → Linear(128, n); C = 512
    (ResNet18/34) or 2048 (ResNet50).

    No convolution before the pooling. Dropout 0.2 in the attention branch, as in the auxiliary
    classifiers. Returns (logits (1, n), attention (H, W)).
    """

    def __init__(self, channels: int = 512, n_classes: int = 2, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.pool = GatedAttentionPool(channels, hidden, dropout)
        self.classifier = nn.Sequential(nn.Linear(channels, 128), nn.ReLU(), nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.pool(x)
        return self.classifier(pooled), attention
