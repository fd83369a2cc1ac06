"""What every tile-based MIL baseline shares: its output, its contract with the trainer, its optimiser defaults.

A model sees one bag at a time: ``features`` of shape (N, in_dim), one row per tile, N >= 1. It returns a
:class:`MILOutput` and knows its own full training loss (``loss``), because several baselines add terms to
the bag cross-entropy (CLAM's instance clustering, DSMIL's max-instance stream).

Trainer contract
----------------
- ``training_stages``: the stages to run one after another (``["main"]`` for single-stage models; MIL-RNN
  has ``["instance", "rnn"]``). Call ``set_stage(name)`` before each; it may freeze parameters, so build a
  fresh optimiser for each stage over the parameters that still require grad: ``make_optimizer()`` does it.
- ``default_optim``: the optimiser the model's paper / released code uses, a dict with ``optimizer``
  (``adam``, ``adamw``, ``radam`` or ``sgd``), ``lr``, ``weight_decay`` and, where published, ``epochs``,
  ``betas``, ``momentum``, ``nesterov``. ``optim_settings(stage)`` gives the settings of one stage.
- ``class_weights`` (constructor): optional per-class weights of the bag-level cross-entropy.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.errors import ConfigError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam,
              "sgd": torch.optim.SGD}
# Keys of ``default_optim`` that are passed to the optimiser's constructor (the rest are hints for the trainer).
_OPTIMIZER_ARGS = ("lr", "weight_decay", "betas", "momentum", "nesterov")


@dataclass
class MILOutput:
    """The prediction for one bag.

    ``logits`` (1, n_classes). ``attention`` (N,): per-instance attention or score for heatmaps, None if the
    model has none (for multi-branch models the predicted class's branch; see each model's
    ``attention_is_softmax``). ``instance_logits`` (N, n_classes) where the model predicts instances.
    ``extras``: intermediate tensors the model's own ``loss`` needs (not for callers).
    """

    logits: torch.Tensor
    attention: torch.Tensor | None
    instance_logits: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class MILModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of the MIL baselines. Subclasses implement ``bag_forward`` and, if needed, ``loss``."""

    name: ClassVar[str]
    paper: ClassVar[str]  # short citation used in messages, e.g. "MIL-RNN (Campanella et al. 2019)"
    binary_only: ClassVar[bool] = False
    permutation_invariant: ClassVar[bool] = True  # bag output independent of instance order (checked by tests)
    attention_is_softmax: ClassVar[bool] = False  # attention is a softmax over instances (sums to 1)
    default_optim: ClassVar[dict]
    stage_optim: ClassVar[dict[str, dict]] = {}  # per-stage overrides of default_optim (MIL-RNN)
    training_stages: ClassVar[list[str]] = ["main"]

    def __init__(self, n_classes: int, in_dim: int = 512, class_weights: list[float] | None = None):
        super().__init__()
        if self.binary_only and n_classes != 2:
            raise ConfigError(f"{self.name}: {self.paper} is defined for binary tasks only; got {n_classes} classes")
        if n_classes < 2:
            raise ConfigError(f"{self.name}: needs at least 2 classes; got {n_classes}")
        if in_dim < 1:
            raise ConfigError(f"{self.name}: in_dim must be positive; got {in_dim}")
        if class_weights is not None and len(class_weights) != n_classes:
            raise ConfigError(f"{self.name}: {len(class_weights)} class weights given for {n_classes} classes")
        self.n_classes = n_classes
        self.in_dim = in_dim
        # Not persistent: the weights are a training option, not part of the model a checkpoint restores.
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.stage = self.training_stages[0]

    def forward(self, features: torch.Tensor) -> MILOutput:
        """Predict one bag of ``features`` (N, in_dim), N >= 1."""
        if features.dim() != 2 or features.shape[0] < 1 or features.shape[1] != self.in_dim:
            raise ValueError(f"{self.name}: expected one bag of shape (N, {self.in_dim}) with N >= 1, "
                             f"got {tuple(features.shape)}")
        return self.bag_forward(features)

    @abc.abstractmethod
    def bag_forward(self, features: torch.Tensor) -> MILOutput:
        """The model itself, on a checked bag: every family in ``MIL_MODELS`` defines it."""

    def bag_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of bag-level ``logits`` (1, n_classes) against ``label``, times the label's class weight.

        (Not ``F.cross_entropy(weight=...)``: its mean over a one-bag batch divides the weight out again.)
        """
        label = label.reshape(1).long()
        loss = F.cross_entropy(logits, label)
        return loss if self.class_weights is None else loss * self.class_weights[label[0]]

    def loss(self, output: MILOutput, label: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The model's full training loss for one bag (here: the bag cross-entropy)."""
        return self.bag_loss(output.logits, label)

    def set_stage(self, name: str) -> None:
        """Switch to training stage ``name`` (one of ``training_stages``)."""
        if name not in self.training_stages:
            stages = ", ".join(self.training_stages)
            raise ConfigError(f"{self.name}: unknown training stage '{name}' (stages: {stages})")
        self.stage = name

    def optim_settings(self, stage: str | None = None) -> dict:
        """The published optimiser settings of ``stage`` (default: the current stage)."""
        return dict(self.stage_optim.get(stage or self.stage, self.default_optim))

    def make_optimizer(self, lr: float | None = None, weight_decay: float | None = None) -> torch.optim.Optimizer:
        """The current stage's default optimiser over the parameters that require grad; lr/weight_decay override."""
        settings = self.optim_settings()
        if lr is not None:
            settings["lr"] = lr
        if weight_decay is not None:
            settings["weight_decay"] = weight_decay
        kwargs = {key: settings[key] for key in _OPTIMIZER_ARGS if key in settings}
        params = [p for p in self.parameters() if p.requires_grad]
        return OPTIMIZERS[settings["optimizer"]](params, **kwargs)


class InstanceMLP(nn.Module):
    """Per-tile classifier: Linear(in_dim, hidden) → ReLU → Dropout → Linear(hidden, n_out).

    ``embed`` gives the hidden representation (MIL-RNN feeds it to its RNN).
    """

    def __init__(self, in_dim: int, n_out: int, hidden: int = 512, dropout: float = 0.25):
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, n_out)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(x))
