"""Max-pooling and mean-pooling MIL: classify every tile, pool the tile logits over the bag.

The instance classifier is the MLP of CLAM's ``mil`` baseline (Lu et al., "Data-efficient and weakly
supervised computational pathology on whole-slide images", Nature Biomedical Engineering 2021;
mahmoodlab/CLAM ``models/model_mil.py``): Linear(in_dim, 512) → ReLU → Dropout(0.25) → Linear(512, n_classes).
The bag logits are the per-class maximum (``maxpool``) or mean (``meanpool``) of the instance logits over the
bag (CLAM's ``mil`` instead takes the one tile with the highest positive-class probability; the per-class max
is the max-pooling of mi-Net — Wang, Yan, Tang, Bai and Liu, "Revisiting multiple instance neural networks",
Pattern Recognition 2018 — and is also defined for more than two classes).

Optimiser: CLAM's recipe (``main.py``, README commands): Adam, lr 2e-4, weight decay 1e-5, at most 200
epochs with early stopping.

``attention`` is a score, not a softmax: each tile's probability of the predicted class, for heatmaps.
"""

from __future__ import annotations

import torch

from wsilocal.models.mil.base import InstanceMLP, MILModel, MILOutput

CLAM_OPTIM = {"optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5, "epochs": 200}


class InstancePoolingMIL(MILModel):
    """Instance classifier + a pooling of its logits over the bag (``pool`` is ``"max"`` or ``"mean"``)."""

    pool: str
    default_optim = CLAM_OPTIM

    def __init__(self, n_classes: int, in_dim: int = 512, hidden: int = 512, dropout: float = 0.25,
                 class_weights: list[float] | None = None):
        super().__init__(n_classes, in_dim, class_weights)
        self.instance_classifier = InstanceMLP(in_dim, n_classes, hidden, dropout)

    def bag_forward(self, features: torch.Tensor) -> MILOutput:
        instance_logits = self.instance_classifier(features)  # (N, n_classes)
        if self.pool == "max":
            logits = instance_logits.max(dim=0, keepdim=True).values
        else:
            logits = instance_logits.mean(dim=0, keepdim=True)
        predicted = int(logits.argmax(dim=1))
        score = torch.softmax(instance_logits, dim=1)[:, predicted]
        return MILOutput(logits=logits, attention=score, instance_logits=instance_logits)


class MaxPoolMIL(InstancePoolingMIL):
    """Max-pooling MIL (bag logit of a class = its highest tile logit)."""

    name = "maxpool"
    paper = "max-pooling MIL"
    pool = "max"


class MeanPoolMIL(InstancePoolingMIL):
    """Mean-pooling MIL (bag logit of a class = its mean tile logit)."""

    name = "meanpool"
    paper = "mean-pooling MIL"
    pool = "mean"
