"""One locally supervised training step on one whole slide, and the matching evaluation forward.

The step walks the K modules in order. Module i receives ``x_{i-1}.detach()``, computes
``x_i``, its loss ``L_i = CE(A_i(x_i), y) + α·RFR(x_i, x_{i-1})`` (the last module: ``CE(H(x_K), y)``), and
runs its backward at once, so only one module's graph is alive at a time and no gradient crosses a
module boundary. Modules before the first *active* one run without a graph (greedy schedule: they are
frozen); modules after the last active one are not run at all.

With a tissue mask (``tissue``, ``mask_glass``) every classifier attends to the tissue positions of its map only
(:func:`~wsilocal.stream.geometry.module_tissue_positions`): the same masks in the streamed steps, in evaluation
and in prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wsilocal.models.heads import slide_cross_entropy
from wsilocal.models.local_net import LocalNet
from wsilocal.slide.tissue import ImageTissueMask
from wsilocal.stream.geometry import module_tissue_positions


@dataclass
class StepResult:
    """Losses of one step: per module (auxiliary classifiers, then the final classifier)."""

    cls_losses: list[float] = field(default_factory=list)
    rfr_losses: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # detached, one per module that ran


def local_training_step(
    net: LocalNet,
    image: torch.Tensor,
    label: int,
    *,
    tissue: ImageTissueMask | None = None,
    active: range | None = None,
    alpha: float = 1.0,
    class_weight: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    generator: torch.Generator | None = None,
    on_module_backward: Callable[[int], None] | None = None,
) -> StepResult:
    """Forward/loss/backward module by module; gradients accumulate in ``.grad`` (scaled by ``loss_scale``).

    Args:
        net: the model; its trainable modules must be in train mode.
        image: (1, 3, H, W) normalised tensor on the model's device.
        label: class index.
        tissue: the image's tissue mask; each classifier then attends to its map's tissue positions only.
        active: indices of modules that learn (default all). Earlier modules run under ``no_grad``.
        alpha: weight of the RFR loss.
        class_weight: optional per-class CE weights.
        loss_scale: multiplies every loss before backward (1 / gradient-accumulation steps).
        generator: random stream for the RFR patch locations.
        on_module_backward: called with ``i`` as soon as module i's backward is over, while module i+1 has
            not started: distributed training starts the all-reduce of module i's gradients there.
    """
    k = len(net.stages)
    active = active if active is not None else range(k)
    target = torch.tensor([label], device=image.device)
    result = StepResult()
    masks = module_masks(net, tissue)
    x = image
    for i in range(active.stop):
        x_in = x.detach()
        if i < active.start:
            with torch.no_grad():
                x = net.stages[i](x_in)
            continue
        x_out = net.stages[i](x_in)
        if i < k - 1:
            aux = net.aux[i](x_in, x_out, target, generator, class_weight, masks[i])
            cls_loss, logits = aux["cls"], aux["logits"]
            loss = cls_loss + alpha * aux["rfr"]  # rfr is 0 without an RFR unit (the --no-rfr ablation)
            result.rfr_losses.append(float(aux["rfr"].detach()))
        else:
            logits, _ = net.head(x_out, masks[i])
            cls_loss = slide_cross_entropy(logits, target, class_weight)
            loss = cls_loss
        (loss * loss_scale).backward()
        if on_module_backward is not None:
            on_module_backward(i)
        result.cls_losses.append(float(cls_loss.detach()))
        result.logits.append(logits.detach())
        x = x_out.detach()  # the graph of module i is freed here; module i+1 starts a new one
        del x_out, loss, logits
    return result


@torch.no_grad()
def forward_all_classifiers(net: LocalNet, image: torch.Tensor, upto: int | None = None, *,
                            tissue: ImageTissueMask | None = None) -> list[torch.Tensor]:
    """Logits of every auxiliary classifier and of the final classifier (evaluation, no RFR).

    ``upto`` stops after that many modules (the last one's classifier is then an auxiliary one); ``tissue``: as
    for :func:`local_training_step`.
    """
    k = len(net.stages)
    upto = k if upto is None else upto
    masks = module_masks(net, tissue)
    outputs = []
    x = image
    for i in range(upto):
        x = net.stages[i](x)
        if i < k - 1:
            outputs.append(net.aux[i].classifier(x, masks[i])[0])
        else:
            outputs.append(net.head(x, masks[i])[0])
    return outputs


def module_masks(net: LocalNet, tissue: ImageTissueMask | None) -> list[torch.Tensor | None]:
    """Per module, the tissue positions of its output map (all None without a tissue mask: no masking)."""
    if tissue is None:
        return [None] * len(net.stages)
    return list(module_tissue_positions(net.stages, tissue))
