"""TransMIL: a two-layer Nyström-attention transformer over the bag with a pyramid position encoding.

Shao, Bian, Chen, Wang, Zhang, Ji and Zhang, "TransMIL: Transformer based Correlated Multiple Instance
Learning for Whole Slide Image Classification", NeurIPS 2021 (code: szc19990412/TransMIL ``models/TransMIL.py``,
``Camelyon/TransMIL.yaml``). Nyström attention: Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for
Approximating Self-Attention", AAAI 2021 — implemented here (no external package).

Network: Linear(in_dim, 512) → ReLU; the bag (N tokens) is padded to a square of side ⌈√N⌉ by repeating its
first tokens; a learned class token is prepended; TransLayer → PPEG → TransLayer → LayerNorm → the class
token → Linear(512, n_classes). TransLayer: x + NystromAttention(LayerNorm(x)) with 8 heads of 64, 256
landmarks (dim/2), 6 pseudo-inverse iterations, a depth-wise residual convolution (kernel 33) over the value
sequence, dropout 0.1 on the output projection. PPEG: the patch tokens as a ⌈√N⌉×⌈√N⌉ map plus depth-wise
convolutions 7×7, 5×5 and 3×3 of it (class token untouched).

Landmarks are the means of ``landmarks`` nearly equal contiguous segments of the sequence (adaptive average
pooling; the reference package instead zero-pads the sequence to a multiple of the landmark count). A
sequence shorter than the landmark count uses one landmark per token, which makes the approximation exact up
to the iterative pseudo-inverse.

Not permutation invariant: PPEG and the residual convolution see token order. ``attention`` is None.

Optimiser (``TransMIL.yaml``): RAdam wrapped in Lookahead, lr 2e-4, weight decay 1e-5, 200 epochs. We give
plain RAdam (torch has no Lookahead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.models.mil.base import MILModel, MILOutput


def iterative_pinv(matrix: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) ``matrix`` by the iteration of Razavi et al. (2014).

    Z₀ = Aᵀ / (‖A‖₁‖A‖∞); Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))). Converges to A⁺ (cubically near it).
    """
    absolute = matrix.abs()
    norm_1 = absolute.sum(dim=-2).amax(dim=-1)  # max column sum
    norm_inf = absolute.sum(dim=-1).amax(dim=-1)  # max row sum
    z = matrix.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        az = matrix @ z
        z = 0.25 * z @ (13 * identity - az @ (15 * identity - az @ (7 * identity - az)))
    return z


def segment_means(x: torch.Tensor, segments: int) -> torch.Tensor:
    """Means of ``segments`` nearly equal contiguous pieces of the sequence axis of ``x`` (..., n, d)."""
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    pooled = F.adaptive_avg_pool1d(x.reshape(-1, n, d).transpose(1, 2), segments)  # (B, d, segments)
    return pooled.transpose(1, 2).reshape(*lead, segments, d)


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, landmarks: int,
                      pinv_iterations: int = 6) -> torch.Tensor:
    """Nyström approximation of softmax(q kᵀ) v for (..., n, d) tensors (q already scaled by 1/√d).

    softmax(q k̃ᵀ) · pinv(softmax(q̃ k̃ᵀ)) · softmax(q̃ kᵀ) v with q̃, k̃ the segment-mean landmarks; at most one
    landmark per token.
    """
    m = min(landmarks, q.shape[-2])
    q_landmarks, k_landmarks = segment_means(q, m), segment_means(k, m)
    kernel_1 = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)  # (n, m)
    kernel_2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1)  # (m, m)
    kernel_3 = torch.softmax(q_landmarks @ k.transpose(-1, -2), dim=-1)  # (m, n)
    return (kernel_1 @ iterative_pinv(kernel_2, pinv_iterations)) @ (kernel_3 @ v)


class NystromAttention(nn.Module):
    """Multi-head self-attention with Nyström-approximated softmax and a depth-wise residual conv on values."""

    def __init__(self, dim: int = 512, heads: int = 8, landmarks: int = 256, pinv_iterations: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = (t.reshape(batch, n, self.heads, self.head_dim).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))  # each (B, heads, n, head_dim)
        out = nystrom_attention(q / math.sqrt(self.head_dim), k, v, self.landmarks, self.pinv_iterations)
        out = out + self.residual(v)
        return self.to_out(out.transpose(1, 2).reshape(batch, n, dim))


class TransLayer(nn.Module):
    """Pre-norm residual attention block: x + NystromAttention(LayerNorm(x))."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads, landmarks, pinv_iterations, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: patch tokens as a square map + depth-wise 7×7, 5×5, 3×3 convs."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim) for size in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    """TransMIL (Shao et al. 2021)."""

    name = "transmil"
    paper = "TransMIL (Shao et al. 2021)"
    permutation_invariant = False
    default_optim = {"optimizer": "radam", "lr": 2e-4, "weight_decay": 1e-5, "epochs": 200}

    def __init__(self, n_classes: int, in_dim: int = 512, dim: int = 512, heads: int = 8,
                 landmarks: int | None = None, pinv_iterations: int = 6, dropout: float = 0.1,
                 class_weights: list[float] | None = None):
        super().__init__(n_classes, in_dim, class_weights)
        landmarks = dim // 2 if landmarks is None else landmarks
        self.embedding = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, landmarks, pinv_iterations, dropout)
        self.position = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, pinv_iterations, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def bag_forward(self, features: torch.Tensor) -> MILOutput:
        h = self.embedding(features)  # (N, dim)
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[torch.arange(side * side - n, device=h.device) % n]])  # pad to a square
        x = torch.cat([self.cls_token, h.unsqueeze(0)], dim=1)  # (1, 1 + side², dim)
        x = self.layer2(self.position(self.layer1(x), side))
        logits = self.classifier(self.norm(x)[:, 0])
        return MILOutput(logits=logits, attention=None)
