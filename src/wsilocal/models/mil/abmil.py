"""ABMIL and gated ABMIL: attention-based MIL pooling.

Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018
(code: AMLab-Amsterdam/AttentionDeepMIL ``model.py``, ``main.py``).

Dimensions as in the paper's networks: a fully connected embedding in_dim (512) → L = 500 with ReLU,
attention hidden size D = 128, one attention branch (K = 1):
- ``abmil``:  a = w·tanh(V h)
- ``gabmil``: a = w·(tanh(V h) ⊙ sigmoid(U h))
softmax over the bag's instances, bag embedding z = Σ a_i h_i, classifier Linear(500, n_classes) (the paper
has one sigmoid output for binary bags; a softmax over n_classes covers the multi-class tasks). No dropout.

Optimiser: the authors' code defaults: Adam, lr 5e-4, betas (0.9, 0.999), weight decay 1e-4 (``--reg 10e-5``).
They publish no WSI epoch count; the hint uses CLAM's 200 epochs with early stopping.

:class:`AttentionScores` is also CLAM's attention network (one branch per class in CLAM-MB).
"""

from __future__ import annotations

import torch
from torch import nn

from wsilocal.models.mil.base import MILModel, MILOutput


class AttentionScores(nn.Module):
    """Unnormalised attention scores (N, branches) of instances (N, in_dim).

    ``gated=False``: w(tanh(V h)); ``gated=True``: w(tanh(V h) ⊙ sigmoid(U h)). Dropout after each branch's
    non-linearity (CLAM's placement).
    """

    def __init__(self, in_dim: int, hidden: int, gated: bool, dropout: float = 0.0, branches: int = 1):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(hidden, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        hidden = self.V(h)
        if self.U is not None:
            hidden = hidden * self.U(h)
        return self.w(hidden)


class ABMIL(MILModel):
    """Attention-based MIL pooling (Ilse et al. 2018), ungated."""

    name = "abmil"
    paper = "ABMIL (Ilse et al. 2018)"
    attention_is_softmax = True
    default_optim = {"optimizer": "adam", "lr": 5e-4, "weight_decay": 1e-4, "betas": (0.9, 0.999), "epochs": 200}
    gated = False

    def __init__(self, n_classes: int, in_dim: int = 512, embed_dim: int = 500, attention_dim: int = 128,
                 class_weights: list[float] | None = None):
        super().__init__(n_classes, in_dim, class_weights)
        self.embedding = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.attention = AttentionScores(embed_dim, attention_dim, gated=self.gated)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def bag_forward(self, features: torch.Tensor) -> MILOutput:
        h = self.embedding(features)  # (N, L)
        attention = torch.softmax(self.attention(h)[:, 0], dim=0)  # (N,)
        logits = self.classifier(attention @ h).unsqueeze(0)
        return MILOutput(logits=logits, attention=attention)


class GatedABMIL(ABMIL):
    """Gated attention-based MIL pooling (Ilse et al. 2018)."""

    name = "gabmil"
    paper = "gated ABMIL (Ilse et al. 2018)"
    gated = True
