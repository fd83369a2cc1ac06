"""CLAM-SB and CLAM-MB: clustering-constrained attention MIL.

Lu, Williamson, Chen, Chen, Barbieri and Mahmood, "Data-efficient and weakly supervised computational
pathology on whole-slide images", Nature Biomedical Engineering 2021 (code: mahmoodlab/CLAM
``models/model_clam.py``, ``main.py``, ``utils/core_utils.py``).

Network, the "small" size with our 512-d tile features as input: Linear(512, 512) → ReLU → Dropout(0.25),
then gated attention (hidden 256, dropout 0.25 after tanh and sigmoid branches) with one branch (CLAM-SB)
or one branch per class (CLAM-MB); softmax over instances; bag classifier Linear(512, n_classes) on the
single pooled vector (SB) or one Linear(512, 1) per class on that class's pooled vector (MB).

Instance-level clustering (training loss only). Each class c has an instance classifier Linear(512, 2).
For the bag's true class (in-class): the k_sample = 8 instances with the highest attention are pseudo-labelled
1 and the 8 with the lowest 0. With ``subtyping`` (all classes present in every slide type, as in NSCLC/RCC
subtyping) every other class is out-of-class: its 8 highest-attended instances are pseudo-labelled 0; the
instance loss is then averaged over classes. CLAM-MB uses each class's own attention branch. Total loss:
bag_weight · CE(bag) + (1 − bag_weight) · instance loss with bag_weight 0.7.

The instance loss defaults to the smooth top-1 SVM of Berrada et al. (ICLR 2018, the ``topk`` package CLAM's
README runs with ``--inst_loss svm``; α = 1, τ = 1): τ·log Σ_j exp((s_j + α[j ≠ y] − s_y)/τ). The package
switches to the hard hinge where the margin is so large that the smooth value equals it to float
precision; the log-sum-exp here is computed stably and needs no switch. ``instance_loss="ce"`` selects CE.

Bags smaller than 2·k_sample: k is reduced to ⌊N/2⌋ for the in-class term so that no instance is both a
positive and a negative (and to N for out-of-class terms); a one-instance bag has no in-class term. (CLAM's
code fails on such bags.)

Optimiser (README commands, ``main.py``): Adam, lr 2e-4, weight decay 1e-5, at most 200 epochs with early
stopping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.errors import ConfigError
from wsilocal.models.mil.abmil import AttentionScores
from wsilocal.models.mil.base import MILModel, MILOutput
from wsilocal.models.mil.pooling import CLAM_OPTIM


def smooth_top1_svm_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
                         tau: float = 1.0) -> torch.Tensor:
    """Mean smooth top-1 SVM loss (Berrada et al. 2018) of ``logits`` (M, C) against ``target`` (M,)."""
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    shifted = logits + margin - logits.gather(1, target[:, None])
    return (tau * torch.logsumexp(shifted / tau, dim=1)).mean()


class CLAMSB(MILModel):
    """CLAM with a single attention branch (Lu et al. 2021)."""

    name = "clam_sb"
    paper = "CLAM-SB (Lu et al. 2021)"
    attention_is_softmax = True
    default_optim = CLAM_OPTIM
    multi_branch = False

    def __init__(self, n_classes: int, in_dim: int = 512, hidden: int = 512, attention_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7, instance_loss: str = "svm",
                 subtyping: bool = True, class_weights: list[float] | None = None):
        super().__init__(n_classes, in_dim, class_weights)
        if instance_loss not in ("svm", "ce"):
            raise ConfigError(f"{self.name}: instance_loss must be 'svm' or 'ce'; got '{instance_loss}'")
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.instance_loss_fn = smooth_top1_svm_loss if instance_loss == "svm" else F.cross_entropy
        branches = n_classes if self.multi_branch else 1
        self.embedding = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = AttentionScores(hidden, attention_dim, gated=True, dropout=dropout, branches=branches)
        if self.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))
        else:
            self.classifiers = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def bag_forward(self, features: torch.Tensor) -> MILOutput:
        h = self.embedding(features)  # (N, hidden)
        attention = torch.softmax(self.attention(h).t(), dim=1)  # (branches, N)
        pooled = attention @ h  # (branches, hidden)
        if self.multi_branch:
            logits = torch.cat([classifier(pooled[c]) for c, classifier in enumerate(self.classifiers)]).unsqueeze(0)
        else:
            logits = self.classifiers(pooled)
        branch = int(logits.argmax(dim=1)) if self.multi_branch else 0
        return MILOutput(logits=logits, attention=attention[branch], extras={"embedded": h, "attention": attention})

    def instance_loss(self, attention: torch.Tensor, h: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM's clustering loss for one bag: in-class term for ``label``, out-of-class terms if subtyping."""
        n = h.shape[0]
        terms = []
        for c, classifier in enumerate(self.instance_classifiers):
            scores = attention[c if self.multi_branch else 0]
            if c == label:
                k = min(self.k_sample, n // 2)
                if k == 0:
                    continue
                top, bottom = scores.topk(k).indices, (-scores).topk(k).indices
                instances = h[torch.cat([top, bottom])]
                targets = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            elif self.subtyping:
                k = min(self.k_sample, n)
                instances = h[scores.topk(k).indices]
                targets = torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            terms.append(self.instance_loss_fn(classifier(instances), targets))
        if not terms:
            return h.new_zeros(())
        total = torch.stack(terms).sum()
        return total / self.n_classes if self.subtyping else total

    def loss(self, output: MILOutput, label: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """bag_weight · bag CE + (1 − bag_weight) · instance clustering loss."""
        label_index = int(label.reshape(-1)[0])
        clustering = self.instance_loss(output.extras["attention"], output.extras["embedded"], label_index)
        return self.bag_weight * self.bag_loss(output.logits, label) + (1 - self.bag_weight) * clustering


class CLAMMB(CLAMSB):
    """CLAM with one attention branch per class (Lu et al. 2021)."""

    name = "clam_mb"
    paper = "CLAM-MB (Lu et al. 2021)"
    multi_branch = True
