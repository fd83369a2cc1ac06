"""The whole model of the method: trunk cut into K modules, auxiliary models G_1..G_{K-1}, classifier H.

The training step (forward module i, its auxiliary loss, backward, detach, next module) lives in
``wsilocal.train``; this file only assembles the parts. Inference is ``trunk → H``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.errors import ConfigError
from wsilocal.models.heads import AUX_KERNEL_BY_LEVEL, AuxiliaryClassifier, FinalClassifier, slide_cross_entropy
from wsilocal.models.resnet import DEFAULT_ARCH, ResNetTrunk
from wsilocal.models.rfr import RandomFeatureReconstruction, rfr_patch_size
from wsilocal.models.split import (
    AuxCost,
    BlockBoundaries,
    ModuleSpec,
    Split,
    balanced_split,
    block_boundaries,
    module_specs,
    split_trunk,
)


class AuxiliaryModel(nn.Module):
    """G_i = auxiliary classifier A_i on the module's output + optional RFR unit; loss CE + α·L1."""

    def __init__(self, spec: ModuleSpec, n_classes: int, *, rfr: bool = True, rfr_patches: int = 10,
                 alpha: float = 1.0):
        super().__init__()
        self.classifier = AuxiliaryClassifier(spec.c_out, n_classes, kernel=AUX_KERNEL_BY_LEVEL[spec.level])
        self.rfr = (RandomFeatureReconstruction(spec.c_in, spec.c_out, spec.stride,
                                                rfr_patch_size(spec.out_stride), rfr_patches)
                    if rfr else None)
        self.alpha = alpha

    def forward(self, x_in: torch.Tensor, x_out: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None = None,
                class_weight: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses of module i from its (detached) input ``x_in``, its output ``x_out`` and label ``y`` (1,);
        ``mask``: bool tissue positions of ``x_out``'s map for the classifier (None: every position).

        Returns ``{"cls", "rfr", "total", "logits"}``; ``rfr`` is 0 without an RFR unit.
        """
        logits, _ = self.classifier(x_out, mask)
        cls = slide_cross_entropy(logits, y, class_weight)
        rfr = self.rfr(x_in, x_out, generator) if self.rfr is not None else cls.new_zeros(())
        return {"cls": cls, "rfr": rfr, "total": cls + self.alpha * rfr, "logits": logits}


def auxiliary_cost(n_classes: int, *, rfr: bool = True, rfr_patches: int = 10) -> AuxCost:
    """The ``aux_cost`` for :func:`~wsilocal.models.split.balanced_split` matching a LocalNet's own
    auxiliary models (and its classifier H for the last module)."""

    def loss(spec: ModuleSpec, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(1, dtype=torch.long, device=x_out.device)
        with torch.device(x_out.device):
            if spec.is_last:
                return F.cross_entropy(FinalClassifier(spec.c_out, n_classes)(x_out)[0], y)
            model = AuxiliaryModel(spec, n_classes, rfr=rfr, rfr_patches=rfr_patches)
        return model(x_in, x_out, y, torch.Generator().manual_seed(0))["total"]  # leave the global RNG alone

    return loss


class LocalNet(nn.Module):
    """ResNet trunk (``arch``: resnet18, resnet34, resnet50) split into K modules, with K−1 auxiliary models and
    the final classifier.

    ``split`` is any :data:`~wsilocal.models.split.Split` (K preset, unit or block boundaries, in ``arch``'s
    units). With ``input_hw_for_balance=(H, W)``, ``split`` must be K and the boundaries are chosen by
    :func:`~wsilocal.models.split.balanced_split` to even out the modules' memory at that input size. Either way
    ``self.split`` is the resolved :class:`~wsilocal.models.split.BlockBoundaries`.

    Attributes: ``trunk``; ``stages`` (the K module Sequentials, views of the trunk, not registered
    twice); ``specs`` (their :class:`ModuleSpec`); ``aux`` (K−1 :class:`AuxiliaryModel`); ``head`` (H).
    """

    def __init__(self, n_classes: int, split: Split = 4, *, conv1_stride: int = 3, fold_bn: bool = True,
                 rfr: bool = True, rfr_patches: int = 10, recompute: bool = False,
                 input_hw_for_balance: tuple[int, int] | None = None, arch: str = DEFAULT_ARCH,
                 head_context: int = 0):
        super().__init__()
        self.trunk = ResNetTrunk(conv1_stride, fold_bn, arch=arch)
        if input_hw_for_balance is not None:
            if not isinstance(split, int):
                raise ConfigError(f"split: a balanced split needs K (an integer), got {split!r}")
            split = balanced_split(self.trunk, split, input_hw_for_balance,
                                   auxiliary_cost(n_classes, rfr=rfr, rfr_patches=rfr_patches))
        self.split = BlockBoundaries(block_boundaries(split, self.trunk.arch))  # blocks of this arch, for anyone
        self.specs = module_specs(self.trunk, split)
        self.stages = split_trunk(self.trunk, split, recompute=recompute)  # a plain list: not registered
        self.aux = nn.ModuleList(AuxiliaryModel(spec, n_classes, rfr=rfr, rfr_patches=rfr_patches)
                                 for spec in self.specs[:-1])
        self.head = FinalClassifier(self.specs[-1].c_out, n_classes, context=head_context)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: ``(logits (1, n), attention (h, w))`` of trunk + H (auxiliary models unused); ``mask``: bool
        tissue positions of the trunk's map (None: every position)."""
        return self.head(self.trunk(x), mask)

    def param_groups(self, lr_trunk: float, lr_aux: float) -> list[dict]:
        """AdamW parameter groups: trainable trunk parameters at ``lr_trunk``; auxiliary models and
        classifier at ``lr_aux``. Frozen parameters (stem, BatchNorm) are left out."""
        trunk = [p for p in self.trunk.parameters() if p.requires_grad]
        others = [p for module in (self.aux, self.head) for p in module.parameters() if p.requires_grad]
        return [{"params": trunk, "lr": lr_trunk}, {"params": others, "lr": lr_aux}]

    def describe(self) -> str:
        """One line per module: its units/blocks, channels, strides, auxiliary kernel and RFR patch."""
        batchnorm = "folded into convs" if self.trunk.fold_bn else "run separately"
        lines = [f"{self.trunk.arch.title}, K={len(self.specs)} modules, conv1 stride {self.trunk.conv1.stride[0]}, "
                 f"BatchNorm {batchnorm}"]
        for spec in self.specs:
            head = f"module {spec.index + 1}: {spec.label()}, {spec.c_in}→{spec.c_out} ch, stride {spec.stride} "
            head += f"(output at 1/{spec.out_stride} of the image)"
            if spec.is_last:
                context = self.head.context
                lines.append(f"{head}; classifier H: " + (
                    f"gated attention on {spec.c_out} ch" if context is None else
                    f"context block ({spec.c_out}→{context.body[0].out_channels} ch, dilations "
                    f"{', '.join(map(str, context.DILATIONS))}), gated attention"))
                continue
            aux = self.aux[spec.index]
            text = f"{head}; aux conv {aux.classifier.kernel}×{aux.classifier.kernel}"
            if aux.rfr is not None:
                p_out = math.ceil(aux.rfr.patch_size / spec.stride)  # before shrinking to a small map
                text += (f"; RFR {aux.rfr.n_patches} patches of {aux.rfr.patch_size} input px "
                         f"({p_out} output px)")
            lines.append(text)
        return "\n".join(lines)
