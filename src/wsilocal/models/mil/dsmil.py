"""DSMIL: dual-stream MIL with a max-instance stream and a critical-instance attention stream.

Li, Li and Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image Classification
with Self-supervised Contrastive Learning", CVPR 2021 (code: binli123/dsmil-wsi ``dsmil.py``,
``train_tcga.py``).

- Instance stream: a linear instance classifier c_i = W h_i (N, n_classes); its per-class maximum over the
  bag is the max-instance prediction.
- Bag stream, per class k: the critical instance m_k = argmax_i c_ik; queries q_i = q(h_i) with
  q = Linear(in_dim, 128) → ReLU → Linear(128, 128) → Tanh (the released default ``--non_linearity 1``);
  attention a_ik = softmax_i(⟨q_i, q_{m_k}⟩ / √128); bag embedding b_k = Σ_i a_ik v_i with v_i = h_i (the
  released default passes the features through unchanged; ``passing_v=True`` adds Dropout → Linear → ReLU);
  bag logits = Conv1d(n_classes, n_classes, kernel = in_dim) over [b_1 … b_K].
- Loss: 0.5·CE(bag logits) + 0.5·CE(max-instance logits). The released code uses BCE-with-logits on one-hot
  labels; we use softmax cross-entropy for both terms, as for every other baseline here.

``logits`` is the bag stream; ``instance_logits`` the instance stream (the released evaluation may average
the two streams' probabilities); ``attention`` the predicted class's column of a (a softmax, sums to 1).

Optimiser (``train_tcga.py`` defaults): Adam, lr 2e-4, betas (0.5, 0.9), weight decay 5e-3, 200 epochs with
cosine annealing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsilocal.models.mil.base import MILModel, MILOutput


class DSMIL(MILModel):
    """Dual-stream MIL (Li et al. 2021)."""

    name = "dsmil"
    paper = "DSMIL (Li et al. 2021)"
    attention_is_softmax = True
    default_optim = {"optimizer": "adam", "lr": 2e-4, "weight_decay": 5e-3, "betas": (0.5, 0.9), "epochs": 200}

    def __init__(self, n_classes: int, in_dim: int = 512, query_dim: int = 128, passing_v: bool = False,
                 dropout_v: float = 0.0, class_weights: list[float] | None = None):
        super().__init__(n_classes, in_dim, class_weights)
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        self.query = nn.Sequential(nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        if passing_v:
            self.value = nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
        else:
            self.value = nn.Identity()
        # One kernel per (output class, input class) spanning the whole embedding: a linear read-out of all
        # class embeddings at once.
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)

    def bag_forward(self, features: torch.Tensor) -> MILOutput:
        instance_logits = self.instance_classifier(features)  # (N, C)
        queries = self.query(features)  # (N, Q)
        critical = instance_logits.argmax(dim=0)  # (C,) index of each class's highest-scoring instance
        scores = queries @ queries[critical].t() / math.sqrt(queries.shape[1])  # (N, C)
        attention = torch.softmax(scores, dim=0)
        bag_embedding = attention.t() @ self.value(features)  # (C, V)
        logits = self.bag_classifier(bag_embedding.unsqueeze(0)).view(1, -1)
        predicted = int(logits.argmax(dim=1))
        return MILOutput(logits=logits, attention=attention[:, predicted], instance_logits=instance_logits)

    def loss(self, output: MILOutput, label: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """0.5 · bag-stream CE + 0.5 · CE of the per-class maximum instance logits."""
        max_instance = output.instance_logits.max(dim=0, keepdim=True).values
        return 0.5 * self.bag_loss(output.logits, label) + 0.5 * self.bag_loss(max_instance, label)
