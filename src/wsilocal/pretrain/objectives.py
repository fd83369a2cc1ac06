"""The network pretrained and its self-supervised objectives.

:class:`PretrainNet` is the trainable torchvision ResNet (ResNet34 by default; conv1 stride 2, ordinary BatchNorm)
with global average pooling and a projector MLP; only the trunk is kept afterwards. Two objectives, both on the
projections ``z1``, ``z2`` of two views of the same tiles:

* ``simclr`` — NT-Xent (Chen et al. 2020): each view must pick its partner out of the other ``2B − 2`` views of
  the batch, by cosine similarity at temperature τ. Needs negatives, so it weakens at small batches.
* ``vicreg`` — Bardes et al. 2022: the views' projections agree (mean squared error), every projection dimension
  keeps a standard deviation of at least 1 over the batch (a hinge), and dimensions are decorrelated (the
  off-diagonal covariance is pushed to 0). No negatives, so it suits the small batches of a CPU.

``docs/pretraining.md`` gives the measurement that chose the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.config import PRETRAIN_OBJECTIVES
from wsilocal.models.resnet import DEFAULT_ARCH, ResNetTrunk

OBJECTIVES = PRETRAIN_OBJECTIVES


class PretrainNet(nn.Module):
    """Trunk (torchvision names, trainable) → global average pooling → projector (Linear-BN-ReLU, …, Linear)."""

    def __init__(self, objective: str, projector_dims: tuple[int, ...], arch: str = DEFAULT_ARCH):
        super().__init__()
        self.trunk = ResNetTrunk(conv1_stride=2, trainable=True, arch=arch)
        layers: list[nn.Module] = []
        dims = (self.trunk.out_channels, *projector_dims)
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out, bias=i == len(dims) - 2))
            if i < len(dims) - 2:
                layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        self.projector = nn.Sequential(*layers)
        self.objective = objective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.trunk(x).mean(dim=(2, 3)))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: cross-entropy of each view's partner among all other views, cosine similarity / τ."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def vicreg(z1: torch.Tensor, z2: torch.Tensor, invariance: float = 25.0, variance: float = 25.0,
           covariance: float = 1.0) -> torch.Tensor:
    """VICReg's loss with its published weights (25, 25, 1)."""
    n, d = z1.shape
    loss = invariance * F.mse_loss(z1, z2)
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        cov = (z.T @ z) / (n - 1)
        off_diagonal = cov - torch.diag(torch.diag(cov))
        loss = loss + variance * F.relu(1 - std).mean() / 2 + covariance * off_diagonal.pow(2).sum() / d
    return loss


def objective_loss(objective: str, z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss of ``objective`` (one of :data:`OBJECTIVES`) on two batches of projections."""
    if objective == "simclr":
        return nt_xent(z1, z2, temperature)
    if objective == "vicreg":
        return vicreg(z1, z2)
    raise ValueError(f"unknown objective {objective!r}")
