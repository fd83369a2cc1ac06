"""Streaming training: exact gradients on a whole slide with compute memory bounded by a tile, not the slide.

Every BatchNorm of the trunk is frozen, so each trunk block is a local operator. The block engine of
:mod:`wsilocal.stream.blocks` runs a module block by block over the whole map, in windows of each block's own
output, with the maps the backward needs (every block's input and intermediate activations) in stores between
blocks (host memory or a memory-mapped file, :class:`~wsilocal.train.activation_store.ActivationStore`):

1. **forward, no graph** — block by block; only each block's own 1–2-pixel halo is computed twice;
2. **loss on a small tensor** — the part that needs the whole map (attention pooling over every position)
   runs on a map much smaller than the activations: the trunk's final map (StreamingCNN, the last module), or
   the auxiliary classifier's conv output; that tensor is a leaf, so ``backward`` stops at it and leaves its
   gradient (and the heads' parameter gradients);
3. **backward, block by block in reverse** — each window applies its layers' backward to its stored
   activations (nothing is recomputed), parameter gradients accumulate in ``.grad``, and its input gradient is
   added into a gradient store for the block below. The windows' contributions add up to exactly the
   whole-image gradient.

:func:`streaming_end_to_end_step` is the StreamingCNN baseline (Pinckaers et al.): the whole trunk is the
module and the final map (1/48 of the side, 512 channels) the small tensor.

:func:`streaming_local_step` is the locally supervised step of :mod:`wsilocal.train.local_step`, streamed:

* module i's auxiliary classifier starts with a convolution whose kernel equals its stride (zero-padded
  symmetrically to cover the map): it runs window by window over x_i's store, and only its output (≥ 25×
  smaller than x_i) is kept for GroupNorm, attention and the loss; its backward adds x_i's gradient into a
  gradient store;
* x_i stays in its store for module i+1 and the RFR patches;
* RFR: the patch locations are drawn exactly as :class:`~wsilocal.models.rfr.RandomFeatureReconstruction`
  draws them (same function, same generator); output patches are read from the store and the decoder loss
  gives their gradient, which is added into x_i's gradient store beside the classification gradient.

Peak compute memory: one window of one block plus the small maps (and, in the last module, the final map and
its gradient). Cost: a plain forward and backward, the halos of each block (~1–3 %) and the stores' copies.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.models.heads import AuxiliaryClassifier, FinalClassifier, slide_cross_entropy
from wsilocal.models.local_net import AuxiliaryModel, LocalNet, auxiliary_cost
from wsilocal.models.rfr import sample_patch_boxes
from wsilocal.models.split import block_boundaries, module_saved_bytes
from wsilocal.slide.tissue import ImageTissueMask
from wsilocal.stream.blocks import (
    ConvStep,
    MapStore,
    StoreFactory,
    StreamedBlocks,
    conv_backward_over,
    conv_forward_over,
    layer_output_hw,
)
from wsilocal.stream.blocks import window_bytes as block_window_bytes
from wsilocal.stream.geometry import tissue_positions
from wsilocal.stream.sources import ImageSource
from wsilocal.train.activation_store import ActivationStore, Where
from wsilocal.train.local_step import StepResult, module_masks

#: Output block per window, in image pixels. Memory grows with it (one window of one block); the per-block
#: halos it saves are small either way (1–2 pixels of a block's output per window edge).
DEFAULT_TILE = 4096


def store_factory(where: Where, dtype: torch.dtype, store_dir: str | Path | None = None, *,
                  memory_bytes: int | None = None) -> StoreFactory:
    """The engine's stores: :class:`ActivationStore` of ``dtype`` in host memory or unnamed files in ``store_dir``.

    ``where="disk"`` with ``memory_bytes``: a store goes to host memory while the open ones there hold at most
    ``memory_bytes`` with it, to a file beyond (``stream_store: auto`` on a CPU — memory is the faster store, and
    files keep a large slide's maps out of RAM).
    """
    # Weak references: a store the engine has closed (0×0) or dropped holds nothing here, nor is kept alive by it.
    in_memory: weakref.WeakSet[ActivationStore] = weakref.WeakSet()

    def make(shape: tuple[int, int, int], zero: bool) -> MapStore:
        if where == "disk" and memory_bytes is not None:
            held = sum(store.array.nbytes for store in in_memory)
            if held + math.prod(shape) * dtype.itemsize <= memory_bytes:
                store = ActivationStore.create(shape, dtype, where="memory", zero=zero)
                in_memory.add(store)
                return store
        return ActivationStore.create(shape, dtype, where=where, dir=store_dir, zero=zero)

    return make


def _whole(store: MapStore, placement: dict) -> torch.Tensor:
    """All of a (small) store as a private tensor on the model's device."""
    return store.window(0, 0, store.height, store.width).to(**placement).clone()


def _store_of(tensor: torch.Tensor, make_store: StoreFactory) -> MapStore:
    """A (1, C, H, W) tensor as a store (the final map's gradient, for the engine's backward)."""
    store = make_store(tuple(tensor.shape[1:]), False)
    store.window(0, 0, store.height, store.width).copy_(tensor)
    return store


# --- the auxiliary convolution -----------------------------------------------------------------------


class _AuxConv:
    """An auxiliary classifier's first convolution (kernel = stride, padded per axis as the classifier pads),
    window by window over x_i's store; ``tile``: output block per window in x_i pixels."""

    def __init__(self, classifier: AuxiliaryClassifier, x: MapStore, tile: int, placement: dict):
        kernel = classifier.kernel
        pads = tuple(classifier.padding((x.height, x.width)))
        self.step = ConvStep(classifier.conv, padding=pads)  # type: ignore[arg-type]
        self.x, self.placement = x, placement
        self.tile = max(1, tile // kernel)
        self.out_hw = layer_output_hw((x.height, x.width), self.step.geometry)

    def forward(self) -> torch.Tensor:
        """The whole conv-output map, without a graph."""
        out = torch.empty(1, self.step.conv.out_channels, *self.out_hw, **self.placement)
        with torch.no_grad():
            conv_forward_over(self.step, self.x, self.out_hw, self.tile, self.placement, out)
        return out

    def backward(self, grad_out: torch.Tensor, grad_x: MapStore) -> None:
        """The conv's parameter gradients into ``.grad``; x_i's gradient added into ``grad_x``."""
        with torch.no_grad():
            conv_backward_over(self.step, self.x, grad_out, self.tile, self.placement, grad_x)


# --- the pieces of a step ------------------------------------------------------------------------


def _final_loss(head: FinalClassifier, x: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits of the classifier H, computed as :func:`local_training_step` does for its last module."""
    logits, _ = head(x, mask)
    return slide_cross_entropy(logits, target, class_weight), logits


def _aux_logits(classifier: AuxiliaryClassifier, conv_out: torch.Tensor, x_hw: tuple[int, int],
                mask: torch.Tensor | None) -> torch.Tensor:
    """What :class:`AuxiliaryClassifier` computes after its convolution (``mask``: tissue positions of its
    ``x_hw`` input map)."""
    return classifier.head(conv_out, None if mask is None else classifier.output_mask(mask, x_hw))[0]


def _train_final_module(module: StreamedBlocks, head: FinalClassifier, target: torch.Tensor,
                        class_weight: torch.Tensor | None, loss_scale: float,
                        mask: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """Forward to the final map, H's loss and backward (H's gradients, the map's gradient), then push the
    map's gradient back through the blocks. Returns (loss, detached logits)."""
    out = module.forward()
    try:
        x = _whole(out, module.placement).requires_grad_()
        loss, logits = _final_loss(head, x, target, class_weight, mask)
        (loss * loss_scale).backward()
        grad = _store_of(x.grad, module.make_store)
        del x  # only the gradient is needed from here on
        try:
            module.backward(grad)
        finally:
            grad.close()
    finally:
        module.close()
        out.close()
    return float(loss.detach()), logits.detach()


def _train_auxiliary_module(module: StreamedBlocks, aux: AuxiliaryModel, tile: int, target: torch.Tensor, *,
                            alpha: float, class_weight: torch.Tensor | None, loss_scale: float,
                            generator: torch.Generator | None,
                            mask: torch.Tensor | None) -> tuple[MapStore, float, float, torch.Tensor]:
    """Module i with its auxiliary model G_i, streamed (``tile`` in x_i pixels).

    Returns x_i's store (the caller closes it) and (classification loss, RFR loss, detached logits), as
    :func:`local_training_step` records them.
    """
    classifier = aux.classifier
    x = module.forward()
    try:
        conv = _AuxConv(classifier, x, tile, module.placement)
        conv_out = conv.forward().requires_grad_()
        logits = _aux_logits(classifier, conv_out, module.out_hw, mask)
        cls = slide_cross_entropy(logits, target, class_weight)
        rfr, boxes, patches = cls.new_zeros(()), [], None
        if aux.rfr is not None:
            # The draw RandomFeatureReconstruction.forward makes for maps of these shapes, from the same stream.
            boxes = sample_patch_boxes(module.out_hw, module.in_hw, aux.rfr.stride, aux.rfr.patch_size,
                                       aux.rfr.n_patches, generator)
            targets = torch.cat([module.source.read(b.in_y, b.in_x, b.in_size, b.in_size) for b in boxes])
            patches = torch.cat([x.read(b.out_y, b.out_x, b.out_size, b.out_size) for b in boxes])
            patches = patches.to(**module.placement).requires_grad_()
            rfr = F.l1_loss(aux.rfr.decoder(patches), targets.to(**module.placement))
        ((cls + alpha * rfr) * loss_scale).backward()

        # x_i's gradient: the classification part through the conv, the RFR part straight into the patches.
        grad = module.make_store((module.out_channels, *module.out_hw), True)
        try:
            conv.backward(conv_out.grad, grad)
            del conv_out
            if patches is not None:
                for box, gradient in zip(boxes, patches.grad, strict=True):
                    grad.window(box.out_y, box.out_x, box.out_size, box.out_size).add_(gradient.unsqueeze(0))
            module.backward(grad)
        finally:
            grad.close()
    except BaseException:
        module.close()
        x.close()
        raise
    return x, float(cls.detach()), float(rfr.detach()), logits.detach()


# --- the steps -----------------------------------------------------------------------------------


def _target(net: nn.Module, label: int) -> torch.Tensor:
    return torch.tensor([label], device=next(net.parameters()).device)


def streaming_end_to_end_step(net: LocalNet, source: ImageSource, label: int, *,
                              tissue: ImageTissueMask | None = None, tile: int = DEFAULT_TILE,
                              class_weight: torch.Tensor | None = None, loss_scale: float = 1.0,
                              on_module_backward: Callable[[int], None] | None = None,
                              store: Where | None = None, store_dir: str | Path | None = None) -> StepResult:
    """StreamingCNN: one end-to-end step of trunk + H on the whole image in ``source``, exact gradients.

    The whole trunk is one module (whatever ``net``'s split; its auxiliary models are unused). Gradients
    accumulate in ``.grad`` scaled by ``loss_scale`` and equal those of ``CE(H(trunk(image)))``'s backward
    up to float rounding. ``tile``: output block per window in image pixels (each block plans ``tile //
    stride`` of its own output). The trunk's activations wait for the backward in stores (``store``, as for
    :func:`streaming_local_step`; None: :func:`resolve_store`'s ``"auto"`` choice — a file on CPU, where the whole
    trunk's activations in RAM would be the very memory streaming saves). ``on_module_backward(0)`` is called
    once the backward is over (for distributed training, as in
    :func:`~wsilocal.train.local_step.local_training_step`). ``tissue``: H attends to the tissue positions of
    the trunk's map only.
    """
    weight = next(net.trunk.parameters())
    where = resolve_store("auto", weight.device) if store is None else store
    module = StreamedBlocks(net.trunk.blocks(), source, tile, store_factory(where, weight.dtype, store_dir),
                            keep=True)
    mask = None if tissue is None else tissue_positions(net.trunk.blocks(), tissue, module.out_hw)
    loss, logits = _train_final_module(module, net.head, _target(net, label), class_weight, loss_scale, mask)
    if on_module_backward is not None:
        on_module_backward(0)
    return StepResult(cls_losses=[loss], logits=[logits])


def streaming_local_step(
    net: LocalNet,
    source: ImageSource,
    label: int,
    *,
    tissue: ImageTissueMask | None = None,
    tile: int | Sequence[int] = DEFAULT_TILE,
    store: Where = "memory",
    store_dir: str | Path | None = None,
    store_memory_bytes: int | None = None,
    active: range | None = None,
    alpha: float = 1.0,
    class_weight: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    generator: torch.Generator | None = None,
    on_module_backward: Callable[[int], None] | None = None,
) -> StepResult:
    """:func:`~wsilocal.train.local_step.local_training_step`, streamed: the same losses and gradients.

    Args:
        net: the model; trainable modules in train mode.
        source: the normalised image, read window by window (:class:`TensorSource` for a tensor in memory).
        label: class index.
        tissue: the image's tissue mask: every classifier attends to its map's tissue positions only.
        tile: output block per window in image pixels, one for every module or one per module (each block
            plans ``tile // stride`` of its own output pixels). Memory grows with it.
        store: where the maps wait (each block's input and activations, x_i, their gradients): ``"memory"``
            (host memory; on a GPU) or ``"disk"`` (unnamed memory-mapped files in ``store_dir``; on CPU).
        store_memory_bytes: with ``store="disk"``, keep maps in host memory up to this many bytes at a time
            (:func:`store_factory`; the trainer's ``stream_store: auto`` on a CPU); None: all on disk.
        active, alpha, class_weight, loss_scale, generator, on_module_backward: as for
            :func:`~wsilocal.train.local_step.local_training_step` (RFR patches are drawn from ``generator``
            exactly as there; dropout draws from the global RNG in the same order).
    """
    k = len(net.stages)
    tiles = [tile] * k if isinstance(tile, int) else list(tile)
    if len(tiles) != k:
        raise ValueError(f"streaming: expected one tile or {k} (one per module), got {tiles}")
    active = active if active is not None else range(k)
    target = _target(net, label)
    make_store = store_factory(store, next(net.trunk.parameters()).dtype, store_dir, memory_bytes=store_memory_bytes)
    result = StepResult()
    masks = module_masks(net, tissue)
    current: ImageSource | MapStore = source
    try:
        for i in range(active.stop):
            spec = net.specs[i]
            in_tile = max(1, tiles[i] // spec.in_stride)
            module = StreamedBlocks(list(net.stages[i]), current, in_tile, make_store, keep=i >= active.start)
            if i < active.start:  # frozen (greedy schedule): only its output is needed
                x = module.forward()
            elif i == k - 1:
                cls, logits = _train_final_module(module, net.head, target, class_weight, loss_scale, masks[i])
            else:
                x, cls, rfr, logits = _train_auxiliary_module(
                    module, net.aux[i], max(1, tiles[i] // spec.out_stride), target, alpha=alpha,
                    class_weight=class_weight, loss_scale=loss_scale, generator=generator, mask=masks[i])
                result.rfr_losses.append(rfr)
            if current is not source:  # x_{i-1} has served module i
                current.close()
            current = x if i < k - 1 else source
            if i >= active.start:
                if on_module_backward is not None:
                    on_module_backward(i)
                result.cls_losses.append(cls)
                result.logits.append(logits)
    finally:
        if current is not source:
            current.close()
    return result


def streaming_forward_all_classifiers(net: LocalNet, source: ImageSource, *, upto: int | None = None,
                                      tissue: ImageTissueMask | None = None, tile: int = DEFAULT_TILE,
                                      store: Where = "memory",
                                      store_dir: str | Path | None = None) -> list[torch.Tensor]:
    """:func:`~wsilocal.train.local_step.forward_all_classifiers`, streamed: the same logits (every auxiliary
    classifier's and H's; ``upto`` stops after that many modules, ``tissue`` masks the glass as there) with memory
    bounded by one window, for evaluating slides too large to run whole. Runs without a graph; put ``net`` in
    eval mode first."""
    k = len(net.stages)
    upto = k if upto is None else upto
    masks = module_masks(net, tissue)
    make_store = store_factory(store, next(net.trunk.parameters()).dtype, store_dir)
    outputs: list[torch.Tensor] = []
    current: ImageSource | MapStore = source
    try:
        with torch.no_grad():
            for i in range(upto):
                module = StreamedBlocks(list(net.stages[i]), current, max(1, tile // net.specs[i].in_stride),
                                        make_store, keep=False)
                x = module.forward()
                module.close()
                if current is not source:  # x_{i-1} has served module i
                    current.close()
                current = x
                if i == k - 1:  # the last module: H on the trunk's final map
                    outputs.append(net.head(_whole(x, module.placement), masks[i])[0])
                    break
                conv = _AuxConv(net.aux[i].classifier, x, max(1, tile // net.specs[i].out_stride), module.placement)
                outputs.append(_aux_logits(net.aux[i].classifier, conv.forward(), module.out_hw, masks[i]))
    finally:
        if current is not source:
            current.close()
    return outputs


#: The share of the memory budget that ``stream_store: auto`` on a CPU lets a streamed training step keep in host
#: memory (the rest is for its windows): the memory store makes the step 5–13 % faster than files
#: (docs/benchmarks.md, *Streaming*), and files keep the maps of a slide too large for it out of RAM.
AUTO_STORE_MEMORY_SHARE = 0.5


def resolve_store(configured: str, device: torch.device) -> Where:
    """Where streamed maps wait: ``configured`` (``stream_store``), or for ``"auto"`` host memory next to a GPU
    and a memory-mapped file on CPU, where RAM is the very memory streaming saves (a training step keeps
    :data:`AUTO_STORE_MEMORY_SHARE` of the budget's worth in memory even there: :func:`auto_store_memory_bytes`)."""
    if configured != "auto":
        return configured  # type: ignore[return-value]  # the config validates it
    return "memory" if device.type == "cuda" else "disk"


def auto_store_memory_bytes(configured: str, memory_budget: int) -> int | None:
    """Bytes of maps a streamed training step keeps in host memory before it takes files: with
    ``stream_store: auto``, :data:`AUTO_STORE_MEMORY_SHARE` of ``memory_budget``; None for a store the user chose."""
    return int(AUTO_STORE_MEMORY_SHARE * memory_budget) if configured == "auto" else None


# --- when to stream ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMemoryModel:
    """Bytes the non-streaming step of a network needs, as ``fixed + per_pixel · H · W`` per module.

    Saved-for-backward bytes (module plus its auxiliary model) are counted exactly on the meta device by
    :func:`~wsilocal.models.split.module_saved_bytes` at two reference sizes; they are linear in the area
    there (the RFR decoders are the fixed part), so the line through them predicts any large slide in
    microseconds instead of seconds. The input image (which module 1 reads but does not save) is added.
    """

    fixed: tuple[float, ...]
    per_pixel: tuple[float, ...]
    image_bytes_per_pixel: int

    REFERENCE_SIDES = (2048, 4096)

    @classmethod
    def of(cls, net: LocalNet) -> StepMemoryModel:
        """Measure ``net``'s modules at the reference sizes (a few seconds)."""
        rfr = next((aux.rfr for aux in net.aux if aux.rfr is not None), None)
        cost = auxiliary_cost(net.head.classifier[-1].out_features, rfr=rfr is not None,
                              rfr_patches=rfr.n_patches if rfr is not None else 1)
        small, large = (module_saved_bytes(net.trunk, net.split, (side, side), cost) for side in cls.REFERENCE_SIDES)
        areas = [side * side for side in cls.REFERENCE_SIDES]
        per_pixel = tuple((b - a) / (areas[1] - areas[0]) for a, b in zip(small, large, strict=True))
        fixed = tuple(a - p * areas[0] for a, p in zip(small, per_pixel, strict=True))
        itemsize = next(net.trunk.parameters()).element_size()
        return cls(fixed, per_pixel, 3 * itemsize)

    def estimate(self, height: int, width: int) -> int:
        """Peak bytes of the plain step at a ``height``×``width`` input: the largest module plus the image."""
        area = height * width
        saved = max(f + p * area for f, p in zip(self.fixed, self.per_pixel, strict=True))
        return int(saved + self.image_bytes_per_pixel * area)


_models: dict[tuple, StepMemoryModel] = {}


def _architecture(net: LocalNet) -> tuple:
    """What the memory model depends on: shapes and split, not weights."""
    rfr = next((aux.rfr for aux in net.aux if aux.rfr is not None), None)
    weight = next(net.trunk.parameters())
    return (block_boundaries(net.split), net.trunk.conv1.stride, net.trunk.bn1.fold, weight.dtype,
            net.head.classifier[-1].out_features, rfr.n_patches if rfr is not None else 0)


def memory_model(net: LocalNet) -> StepMemoryModel:
    """``net``'s :class:`StepMemoryModel`, measured on first use of its architecture and remembered."""
    key = _architecture(net)
    if key not in _models:
        _models[key] = StepMemoryModel.of(net)
    return _models[key]


def step_memory_estimate(net: LocalNet, height: int, width: int) -> int:
    """Estimated peak bytes (saved activations + input) of :func:`local_training_step` on ``net`` at
    ``height``×``width`` (see :class:`StepMemoryModel`). With ``recompute`` the step saves less than this: the
    estimate errs towards streaming."""
    return memory_model(net).estimate(height, width)


def tiles_for_budget(net: LocalNet, window_bytes: int) -> list[int]:
    """Per module, the largest tile (image px, a multiple of the module's output stride) whose largest block
    window needs at most about ``window_bytes`` of compute memory (:func:`~wsilocal.stream.blocks.window_bytes`;
    the smallest tile, one output pixel per window, where none fits).

    Every module then streams in about the same memory: the deep modules, whose maps are smaller per image
    pixel, get the larger tiles (fewer windows, fewer stores' copies). For :func:`streaming_end_to_end_step`,
    use the first value of a K=1 network.
    """
    itemsize = next(net.trunk.parameters()).element_size()
    tiles = []
    for stage, spec in zip(net.stages, net.specs, strict=True):
        blocks, ratio = list(stage), spec.out_stride // spec.in_stride

        def fits(units: int, blocks: list = blocks, ratio: int = ratio) -> bool:
            return block_window_bytes(blocks, units * ratio, itemsize) <= window_bytes

        low, high = 1, 1
        while fits(high) and high < 2**16:  # the tile in output pixels: double, then bisect
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        tiles.append(low * spec.out_stride)
    return tiles


def should_stream(net: LocalNet, height: int, width: int, budget_bytes: int) -> bool:
    """Whether the plain step on a ``height``×``width`` slide would exceed ``budget_bytes``: the trainer then
    runs :func:`streaming_local_step` (same gradients, memory bounded by the tile) instead of failing.
    :func:`wsilocal.runtime.default_memory_budget` gives a budget from the free RAM or GPU memory."""
    return step_memory_estimate(net, height, width) > budget_bytes
