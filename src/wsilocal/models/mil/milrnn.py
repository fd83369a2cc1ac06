"""MIL-RNN: max-instance MIL tile classifier, then an RNN over the top-ranked tiles. Binary tasks only.

Campanella, Hanna, Geneslaw, Miraflor, Werneck Krauss Silva, Busam, Brogi, Reuter, Klimstra and Fuchs,
"Clinical-grade computational pathology using weakly supervised deep learning on whole slide images",
Nature Medicine 2019 (code: MSKCC-Computational-Pathology/MIL-nature-medicine-2019 ``MIL_train.py``,
``RNN_train.py``).

Two training stages, run by the trainer one after the other (``training_stages = ["instance", "rnn"]``,
``set_stage(name)`` before each; build a new optimiser per stage with ``make_optimizer()``):

1. ``instance``: a tile classifier trained by max-instance MIL (the paper's k = 1): the bag's prediction is the
   logits of its tile with the highest positive-class (index 1) probability, trained with CE on the slide label.
   The paper fine-tunes a ResNet34 on tiles; on our frozen 512-d tile features the tile classifier is an MLP
   Linear(512, 512) → ReLU → Dropout(0.25) → Linear(512, 2), its 512-d hidden layer standing in for the CNN's
   penultimate features. Optimiser: Adam, lr 1e-4, weight decay 1e-4, 100 epochs.
2. ``rnn``: the tile classifier is frozen (eval mode, no grad); the S = 10 tiles with the highest positive
   probability, in decreasing order, feed their 512-d embeddings to a recurrent aggregator with hidden size 128:
   s_t = ReLU(W_in x_t + W_s s_{t-1}), s_0 = 0, logits = W_out s_S. Bags with fewer than 10 tiles use all of
   them. Optimiser: SGD, momentum 0.9, Nesterov, weight decay 1e-4, 100 epochs, as published, but lr
   0.1/128: the published lr 0.1 is for batches of 128 slides, and with one slide per step (our trainers)
   it diverges within an epoch; we scale it linearly to the batch size (Goyal et al. 2017).

``forward`` gives the current stage's prediction; after training (stage ``rnn``) that is the RNN's. The stage
is saved in the state dict, so a loaded checkpoint predicts with the stage it was saved in. The bag output is
permutation invariant: tiles enter the RNN ordered by score, not by position (barring exact score ties).
``attention`` is a score, not a softmax: each tile's positive-class probability.
"""

from __future__ import annotations

import torch
from torch import nn

from wsilocal.models.mil.base import InstanceMLP, MILModel, MILOutput

INSTANCE_OPTIM = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "epochs": 100}
RNN_OPTIM = {"optimizer": "sgd", "lr": 0.1 / 128, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
             "epochs": 100}


class MILRNN(MILModel):
    """MIL-RNN (Campanella et al. 2019): max-instance tile classifier + RNN over the top-k tiles."""

    name = "milrnn"
    paper = "MIL-RNN (Campanella et al. 2019)"
    binary_only = True
    default_optim = INSTANCE_OPTIM
    stage_optim = {"instance": INSTANCE_OPTIM, "rnn": RNN_OPTIM}
    training_stages = ["instance", "rnn"]

    def __init__(self, n_classes: int, in_dim: int = 512, embed_dim: int = 512, top_k: int = 10,
                 rnn_dim: int = 128, dropout: float = 0.25, class_weights: list[float] | None = None):
        super().__init__(n_classes, in_dim, class_weights)
        self.top_k = top_k
        self.instance_classifier = InstanceMLP(in_dim, 2, embed_dim, dropout)
        self.rnn_input = nn.Linear(embed_dim, rnn_dim)
        self.rnn_state = nn.Linear(rnn_dim, rnn_dim)
        self.rnn_output = nn.Linear(rnn_dim, 2)
        self.set_stage(self.stage)

    def set_stage(self, name: str) -> None:
        """Switch stage; only the stage's own parameters require grad afterwards."""
        super().set_stage(name)
        for module in (self.rnn_input, self.rnn_state, self.rnn_output):
            module.requires_grad_(name == "rnn")
        self.instance_classifier.requires_grad_(name == "instance")
        self.train(self.training)

    def train(self, mode: bool = True) -> MILRNN:
        super().train(mode)
        if self.stage == "rnn":  # the tile classifier is a fixed feature extractor in the RNN stage
            self.instance_classifier.eval()
        return self

    def get_extra_state(self) -> dict:
        return {"stage": self.stage}

    def set_extra_state(self, state: dict) -> None:
        self.set_stage(state["stage"])

    def bag_forward(self, features: torch.Tensor) -> MILOutput:
        embedded = self.instance_classifier.embed(features)  # (N, embed_dim)
        instance_logits = self.instance_classifier.classifier(embedded)  # (N, 2)
        positive = torch.softmax(instance_logits, dim=1)[:, 1]
        if self.stage == "instance":
            logits = instance_logits[positive.argmax()].unsqueeze(0)
        else:
            order = positive.topk(min(self.top_k, len(positive))).indices  # decreasing probability
            state = embedded.new_zeros(1, self.rnn_state.in_features)
            for x in embedded[order]:
                state = torch.relu(self.rnn_input(x) + self.rnn_state(state))
            logits = self.rnn_output(state)
        return MILOutput(logits=logits, attention=positive, instance_logits=instance_logits)
