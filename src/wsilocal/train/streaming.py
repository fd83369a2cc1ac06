"""Streaming training: exact gradients on a whole slide with compute memory bounded by a tile, not the slide.

Every BatchNorm of the trunk is frozen, so a run of trunk blocks is a local operator: the tile planner of
:mod:`wsilocal.stream.geometry` (the one inference uses) gives windows whose kept output parts are exact and
partition the output, each window carrying the receptive-field halo. Streaming runs a module over those windows
in three passes:

1. **forward, no graph** — window by window, keeping only the exact part of each window's output;
2. **loss on a small tensor** — the part that needs the whole map (attention pooling over every position)
   runs on a map much smaller than the activations: the trunk's final map (StreamingCNN), or the auxiliary
   classifier's conv output; that tensor is a leaf, so ``backward`` stops at it and leaves its gradient;
3. **backward, window by window** — each window's forward is recomputed *with* a graph and its exact part is
   back-propagated with the matching slice of that gradient. Parameter gradients are sums over output
   positions; the kept parts partition the output, so the windows' contributions add up to exactly the
   whole-image gradient.

:func:`streaming_end_to_end_step` is the StreamingCNN baseline (Pinckaers et al.): the whole trunk is the
module and the final map (1/48 of the side, 512 channels) the small tensor.

:func:`streaming_local_step` is the locally supervised step of :mod:`wsilocal.train.local_step`, streamed:

* module i's auxiliary classifier starts with a convolution whose kernel equals its stride (zero-padded
  symmetrically to cover the map). Appended to the module's layers, it is one more layer for the tile
  planner, so windows are aligned to its grid and it consumes x_i window by window: only its output
  (≥ 25× smaller than x_i) is kept for GroupNorm, attention and the loss;
* x_i goes to an :class:`~wsilocal.train.activation_store.ActivationStore` (host memory or a memory-mapped
  file), not to compute memory; module i+1 reads its windows from there;
* RFR: the patch locations are drawn exactly as :class:`~wsilocal.models.rfr.RandomFeatureReconstruction`
  draws them (same function, same generator); output patches are read from the store and the decoder loss
  gives their gradient, which joins the classification gradient in the same window backward: each window
  back-propagates the patches' gradient on its part of x_i along with its conv output's.

Peak compute memory: one window's graph plus the small maps (and, in the last module, the final map and its
gradient). Cost: one more forward than the plain step, plus the halos.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.models.heads import AuxiliaryClassifier, FinalClassifier, slide_cross_entropy
from wsilocal.models.local_net import AuxiliaryModel, LocalNet, auxiliary_cost
from wsilocal.models.rfr import PatchBox, sample_patch_boxes
from wsilocal.models.split import block_boundaries, module_saved_bytes
from wsilocal.runtime import trim_heap
from wsilocal.stream.geometry import AxisWindow, Layer, block_geometry, footprint, output_length, plan_axis
from wsilocal.stream.sources import ImageSource
from wsilocal.train.activation_store import ActivationStore, Where
from wsilocal.train.local_step import StepResult

#: Output block per window, in image pixels. Memory is bounded by it; larger tiles waste less on halos
#: (the last module of K=4 has a receptive field of 840 image px, the whole trunk 1345 px).
DEFAULT_TILE = 4096

Tail = Callable[[torch.Tensor], torch.Tensor]
#: A window along one axis at a module's output, with the same window at its auxiliary conv's output.
AxisPair = tuple[AxisWindow, AxisWindow | None]
#: ``gradients(x, row, col)``: the (tensor, gradient) pairs to back-propagate from a window's recomputed x_i.
Gradients = Callable[[torch.Tensor, AxisPair, AxisPair], list[tuple[torch.Tensor, torch.Tensor]]]



# --- windows -------------------------------------------------------------------------------------


def aux_conv_padding(size: int, kernel: int) -> int:
    """Zero padding on each side of an axis of ``size`` that :class:`AuxiliaryClassifier` gives its conv:
    half the shortfall to the next multiple of the kernel, rounded up."""
    return math.ceil((-size % kernel) / 2)


#: How much larger than ``tile`` a window may grow per axis to avoid one more window (see :func:`balanced_tile`).
TILE_SLACK = 0.1


def balanced_tile(length: int, tile: int, geometry: Sequence[Layer]) -> int:
    """The tile to plan an axis of ``length`` with so that its windows are equal and none is a sliver.

    :func:`~wsilocal.stream.geometry.plan_axis` keeps ``tile // S`` outputs per window and gives the remainder a
    window of its own, with a full halo to recompute: an image 3 % longer than the tile would take two windows.
    Here the number of windows is chosen first (allowing each up to ``TILE_SLACK`` longer than ``tile``), then
    the outputs are shared equally among them.
    """
    stride = footprint(geometry)[0]
    out_len = output_length(length, geometry)
    count = max(1, math.ceil(out_len / max(1, tile // stride) - TILE_SLACK))
    return math.ceil(out_len / count) * stride


def _kept(y: torch.Tensor, rows: AxisWindow, cols: AxisWindow) -> torch.Tensor:
    """The exact part of a window's output ``y``."""
    if tuple(y.shape[2:]) != (rows[3] - rows[2], cols[3] - cols[2]):
        raise RuntimeError(f"tile plan expected a {rows[3] - rows[2]}x{cols[3] - cols[2]} output, "
                           f"the network gave {tuple(y.shape[2:])}")
    return y[:, :, rows[4] - rows[2] : rows[5] - rows[2], cols[4] - cols[2] : cols[5] - cols[2]]


def _region(whole: torch.Tensor, rows: AxisWindow, cols: AxisWindow) -> torch.Tensor:
    """Where a window's exact part lies in the whole output map ``whole``."""
    return whole[:, :, rows[4] : rows[5], cols[4] : cols[5]]


def _between_windows(index: int, windows: list) -> None:
    """After window ``index`` of a pass: hand the freed heap back to the OS before the next window. Windows of
    different shapes one after another fragment the heap that :func:`~wsilocal.runtime.tune_cpu_allocator`
    keeps, and resident memory then grew with the number of windows, i.e. with the slide. After a pass's last
    window nothing is trimmed: a one-window pass (a slide no larger than the tile) keeps the fast path."""
    if index < len(windows) - 1:
        trim_heap()


class StreamedModule:
    """A run of trunk blocks (``stage``) computed window by window over ``source``.

    ``tile`` is the output block per window in the *stage's input* pixels (shared out equally along each axis
    by :func:`balanced_tile`, in whole strides).
    """

    def __init__(self, stage: nn.Sequential, source: ImageSource, tile: int):
        self.stage, self.source, self.tile = stage, source, tile
        self.geometry = block_geometry(list(stage))
        self.stride = footprint(self.geometry)[0]
        weight = next(stage.parameters())
        self.placement = {"device": weight.device, "dtype": weight.dtype}
        self.in_hw = (source.height, source.width)
        self.out_hw = tuple(output_length(n, self.geometry) for n in self.in_hw)

    def windows(self, aux_kernel: int | None = None) -> list[tuple[AxisPair, AxisPair]]:
        """The (row, column) windows, each axis as ``(x_i window, None)``, or with an auxiliary conv of
        ``aux_kernel`` appended, ``(x_i window, conv-output window)``: the planner then aligns windows to the
        conv's grid, and the x_i part of a window is what its kept conv outputs cover (these partition x_i)."""
        axes = []
        for length, size in zip(self.in_hw, self.out_hw, strict=True):
            if aux_kernel is None:
                plan = plan_axis(length, balanced_tile(length, self.tile, self.geometry), self.geometry)
                axes.append([(window, None) for window in plan])
                continue
            k, pad = aux_kernel, aux_conv_padding(size, aux_kernel)
            geometry = [*self.geometry, (k, k, pad)]
            pairs = []
            for z in plan_axis(length, balanced_tile(length, self.tile, geometry), geometry):
                in0, in1, _, _, keep0, keep1 = z
                out0 = in0 // self.stride
                x = (in0, in1, out0, out0 + output_length(in1 - in0, self.geometry),
                     max(0, keep0 * k - pad), min(size, keep1 * k - pad))
                pairs.append((x, z))
            axes.append(pairs)
        return list(itertools.product(*axes))

    def run(self, row: AxisPair, col: AxisPair) -> torch.Tensor:
        """The stage on the window's input (all of x_i the window computes); a graph if gradients are on."""
        rows, cols = row[0], col[0]
        x = self.source.read(rows[0], cols[0], rows[1] - rows[0], cols[1] - cols[0]).to(**self.placement)
        return self.stage(x)

    def forward(self, windows: list[tuple[AxisPair, AxisPair]], out: ActivationStore | torch.Tensor,
                conv: Tail | None = None, conv_out: torch.Tensor | None = None) -> None:
        """Without a graph: each window's exact x_i into ``out`` (a store, or the whole map as a tensor) and,
        given the auxiliary ``conv``, its exact conv output into ``conv_out`` (the whole conv-output map)."""
        with torch.no_grad():
            for index, (row, col) in enumerate(windows):
                x = self.run(row, col)
                kept = _kept(x, row[0], col[0])
                if isinstance(out, ActivationStore):
                    out.write(row[0][4], col[0][4], kept)
                else:
                    _region(out, row[0], col[0]).copy_(kept)
                if conv is not None and conv_out is not None:
                    _region(conv_out, row[1], col[1]).copy_(_kept(conv(x), row[1], col[1]))
                del x, kept
                _between_windows(index, windows)

    def backward(self, windows: list[tuple[AxisPair, AxisPair]], gradients: Gradients) -> None:
        """For each window: recompute its x_i with a graph, and back-propagate the ``(tensor, gradient)``
        pairs ``gradients(x, row, col)`` makes from it (its exact part, its conv output's, ...)."""
        for index, (row, col) in enumerate(windows):
            pairs = [(t, g) for t, g in gradients(self.run(row, col), row, col) if t.requires_grad]
            if pairs:  # a frozen stage (the stem alone) with no auxiliary conv has nothing to learn
                torch.autograd.backward(*zip(*pairs, strict=True))
            del pairs
            _between_windows(index, windows)


def _patch_gradient(boxes: list[PatchBox], gradients: torch.Tensor, rows: AxisWindow,
                    cols: AxisWindow) -> torch.Tensor | None:
    """The RFR loss's gradient on a window's exact part of x_i: each patch's gradient where the patch overlaps
    it, summed (patches may overlap); None where no patch does."""
    total = None
    for box, gradient in zip(boxes, gradients, strict=True):
        y0, y1 = max(rows[4], box.out_y), min(rows[5], box.out_y + box.out_size)
        x0, x1 = max(cols[4], box.out_x), min(cols[5], box.out_x + box.out_size)
        if y0 >= y1 or x0 >= x1:
            continue
        if total is None:
            total = gradients.new_zeros((1, gradients.shape[1], rows[5] - rows[4], cols[5] - cols[4]))
        total[0, :, y0 - rows[4] : y1 - rows[4], x0 - cols[4] : x1 - cols[4]] += \
            gradient[:, y0 - box.out_y : y1 - box.out_y, x0 - box.out_x : x1 - box.out_x]
    return total


# --- the pieces of a step ------------------------------------------------------------------------


def _final_loss(head: FinalClassifier, x: torch.Tensor, target: torch.Tensor,
                class_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits of the classifier H, computed as :func:`local_training_step` does for its last module."""
    logits, _ = head(x)
    return slide_cross_entropy(logits, target, class_weight), logits


def _aux_logits(classifier: AuxiliaryClassifier, conv_out: torch.Tensor) -> torch.Tensor:
    """What :class:`AuxiliaryClassifier` computes after its convolution."""
    pooled, _ = classifier.pool(F.relu(classifier.norm(conv_out)))
    return classifier.classifier(pooled)


def _train_final_module(module: StreamedModule, head: FinalClassifier, target: torch.Tensor,
                        class_weight: torch.Tensor | None, loss_scale: float) -> tuple[float, torch.Tensor]:
    """Forward to the final map, H's loss and backward (H's gradients, the map's gradient), then push the
    map's gradient through the stage window by window. Returns (loss, detached logits)."""
    windows, x = _final_map(module)
    x.requires_grad_()
    loss, logits = _final_loss(head, x, target, class_weight)
    (loss * loss_scale).backward()
    grad = x.grad
    del x  # only the gradient is needed from here on
    module.backward(windows, lambda x, row, col: [(_kept(x, row[0], col[0]), _region(grad, row[0], col[0]))])
    return float(loss.detach()), logits.detach()


def _forward_with_auxiliary_conv(module: StreamedModule, classifier: AuxiliaryClassifier, store: ActivationStore
                                 ) -> tuple[list[tuple[AxisPair, AxisPair]], Tail, torch.Tensor]:
    """Module i's forward without a graph, x_i into ``store`` and the auxiliary classifier's first convolution
    applied window by window. Returns the windows, that convolution and its whole output map."""
    kernel = classifier.kernel
    pads = [aux_conv_padding(size, kernel) for size in module.out_hw]

    def conv(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, classifier.conv.weight, classifier.conv.bias, stride=kernel, padding=pads)

    windows = module.windows(kernel)
    conv_hw = [output_length(size, [(kernel, kernel, pad)]) for size, pad in zip(module.out_hw, pads, strict=True)]
    conv_out = torch.empty(1, classifier.conv.out_channels, *conv_hw, **module.placement)
    module.forward(windows, store, conv, conv_out)
    return windows, conv, conv_out


def _final_map(module: StreamedModule) -> tuple[list[tuple[AxisPair, AxisPair]], torch.Tensor]:
    """The last module's windows and its whole output map (the trunk's final map), computed without a graph."""
    windows = module.windows()
    x = torch.empty(1, module.stage[-1].out_channels, *module.out_hw, **module.placement)
    module.forward(windows, x)
    return windows, x


def _train_auxiliary_module(module: StreamedModule, aux: AuxiliaryModel, store: ActivationStore,
                            target: torch.Tensor, *, alpha: float, class_weight: torch.Tensor | None,
                            loss_scale: float, generator: torch.Generator | None) -> tuple[float, float, torch.Tensor]:
    """Module i with its auxiliary model G_i, streamed; x_i ends up in ``store``.

    Returns (classification loss, RFR loss, detached logits), as :func:`local_training_step` records them.
    """
    classifier = aux.classifier
    windows, conv, conv_out = _forward_with_auxiliary_conv(module, classifier, store)

    conv_out.requires_grad_()
    logits = _aux_logits(classifier, conv_out)
    cls = slide_cross_entropy(logits, target, class_weight)
    rfr, boxes, patches = cls.new_zeros(()), [], None
    if aux.rfr is not None:
        # The draw RandomFeatureReconstruction.forward makes for maps of these shapes, from the same stream.
        boxes = sample_patch_boxes(module.out_hw, module.in_hw, aux.rfr.stride, aux.rfr.patch_size,
                                   aux.rfr.n_patches, generator)
        targets = torch.cat([module.source.read(b.in_y, b.in_x, b.in_size, b.in_size) for b in boxes])
        patches = torch.cat([store.read(b.out_y, b.out_x, b.out_size, b.out_size) for b in boxes])
        patches = patches.to(**module.placement).requires_grad_()
        rfr = F.l1_loss(aux.rfr.decoder(patches), targets.to(**module.placement))
    ((cls + alpha * rfr) * loss_scale).backward()

    def gradients(x: torch.Tensor, row: AxisPair, col: AxisPair) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Classification through the conv's exact outputs; RFR straight into the patches' part of x_i.
        pairs = [(_kept(conv(x), row[1], col[1]), _region(conv_out.grad, row[1], col[1]))]
        patch_grad = None if patches is None else _patch_gradient(boxes, patches.grad, row[0], col[0])
        if patch_grad is not None:
            pairs.append((_kept(x, row[0], col[0]), patch_grad))
        return pairs

    module.backward(windows, gradients)
    return float(cls.detach()), float(rfr.detach()), logits.detach()


# --- the steps -----------------------------------------------------------------------------------


def _target(net: nn.Module, label: int) -> torch.Tensor:
    return torch.tensor([label], device=next(net.parameters()).device)


def streaming_end_to_end_step(net: LocalNet, source: ImageSource, label: int, *, tile: int = DEFAULT_TILE,
                              class_weight: torch.Tensor | None = None, loss_scale: float = 1.0,
                              on_module_backward: Callable[[int], None] | None = None) -> StepResult:
    """StreamingCNN: one end-to-end step of trunk + H on the whole image in ``source``, exact gradients.

    The whole trunk is one module (whatever ``net``'s split; its auxiliary models are unused). Gradients
    accumulate in ``.grad`` scaled by ``loss_scale`` and equal those of ``CE(H(trunk(image)))``'s backward
    up to float rounding. ``tile``: output block per window in image pixels (each window adds the trunk's
    672-px halo on every interior side). ``on_module_backward(0)`` is called once the backward is over (for
    distributed training, as in :func:`~wsilocal.train.local_step.local_training_step`).
    """
    module = StreamedModule(nn.Sequential(*net.trunk.blocks()), source, tile)
    loss, logits = _train_final_module(module, net.head, _target(net, label), class_weight, loss_scale)
    if on_module_backward is not None:
        on_module_backward(0)
    return StepResult(cls_losses=[loss], logits=[logits])


def streaming_local_step(
    net: LocalNet,
    source: ImageSource,
    label: int,
    *,
    tile: int | Sequence[int] = DEFAULT_TILE,
    store: Where = "memory",
    store_dir: str | Path | None = None,
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
        tile: output block per window in image pixels, one for every module or one per module (module i
            plans in its input's pixels, ``tile // in_stride``). Memory grows with it, halo overhead
            shrinks: the deep modules' receptive fields are the widest in image pixels.
        store: where each module's output x_i waits for the next module: ``"memory"`` (host memory; on a
            GPU) or ``"disk"`` (an unnamed memory-mapped file in ``store_dir``; on CPU).
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
    result = StepResult()
    current: ImageSource = source
    stores: list[ActivationStore] = []
    try:
        for i in range(active.stop):
            spec = net.specs[i]
            module = StreamedModule(net.stages[i], current, max(1, tiles[i] // spec.in_stride))
            if i == k - 1:
                cls, logits = _train_final_module(module, net.head, target, class_weight, loss_scale)
            else:
                stores.append(ActivationStore.create((spec.c_out, *module.out_hw), module.placement["dtype"],
                                                     where=store, dir=store_dir))
                if i < active.start:  # frozen (greedy schedule): only its output is needed
                    module.forward(module.windows(), stores[-1])
                else:
                    cls, rfr, logits = _train_auxiliary_module(
                        module, net.aux[i], stores[-1], target, alpha=alpha, class_weight=class_weight,
                        loss_scale=loss_scale, generator=generator)
                    result.rfr_losses.append(rfr)
                if len(stores) > 1:  # x_{i-1} has served module i: free it
                    stores.pop(0).close()
                current = stores[-1]
            if i >= active.start:
                if on_module_backward is not None:
                    on_module_backward(i)
                result.cls_losses.append(cls)
                result.logits.append(logits)
    finally:
        for s in stores:
            s.close()
    return result


def streaming_forward_all_classifiers(net: LocalNet, source: ImageSource, *, upto: int | None = None,
                                      tile: int = DEFAULT_TILE, store: Where = "memory",
                                      store_dir: str | Path | None = None) -> list[torch.Tensor]:
    """:func:`~wsilocal.train.local_step.forward_all_classifiers`, streamed: the same logits (every auxiliary
    classifier's and H's; ``upto`` stops after that many modules) with memory bounded by one window, for
    evaluating slides too large to run whole. Runs without a graph; put ``net`` in eval mode first."""
    k = len(net.stages)
    upto = k if upto is None else upto
    outputs: list[torch.Tensor] = []
    current: ImageSource = source
    stores: list[ActivationStore] = []
    try:
        with torch.no_grad():
            for i in range(upto):
                module = StreamedModule(net.stages[i], current, max(1, tile // net.specs[i].in_stride))
                if i == k - 1:  # the last module: H on the trunk's final map
                    outputs.append(net.head(_final_map(module)[1])[0])
                    break
                stores.append(ActivationStore.create((net.specs[i].c_out, *module.out_hw), module.placement["dtype"],
                                                     where=store, dir=store_dir))
                conv_out = _forward_with_auxiliary_conv(module, net.aux[i].classifier, stores[-1])[2]
                outputs.append(_aux_logits(net.aux[i].classifier, conv_out))
                if len(stores) > 1:  # x_{i-1} has served module i
                    stores.pop(0).close()
                current = stores[-1]
    finally:
        for s in stores:
            s.close()
    return outputs


def resolve_store(configured: str, device: torch.device) -> Where:
    """Where streamed x_i wait: ``configured`` (``stream_store``), or for ``"auto"`` host memory next to a GPU
    and a memory-mapped file on CPU, where RAM is the very memory streaming saves."""
    if configured != "auto":
        return configured  # type: ignore[return-value]  # the config validates it
    return "memory" if device.type == "cuda" else "disk"


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
    """Per module, the tile (image px) whose window — the tile plus the module's receptive field — saves about
    ``window_bytes`` for backward (the per-pixel costs of :class:`StepMemoryModel`).

    Every module then streams in about the same memory, and the deep modules, whose receptive fields are the
    widest (K=4: 61, 114, 372, 840 px), get larger tiles, so their halos cost less recomputation than one tile
    for all would. For :func:`streaming_end_to_end_step`, use the first value of a K=1 network.
    """
    tiles = []
    for stage, spec, per_pixel in zip(net.stages, net.specs, memory_model(net).per_pixel, strict=True):
        _, first, last = footprint(block_geometry(list(stage)))
        side = math.isqrt(int(window_bytes / per_pixel))
        tiles.append(max(side - (last - first + 1) * spec.in_stride, spec.out_stride))
    return tiles


def should_stream(net: LocalNet, height: int, width: int, budget_bytes: int) -> bool:
    """Whether the plain step on a ``height``×``width`` slide would exceed ``budget_bytes``: the trainer then
    runs :func:`streaming_local_step` (same gradients, memory bounded by the tile) instead of failing.
    :func:`wsilocal.runtime.default_memory_budget` gives a budget from the free RAM or GPU memory."""
    return step_memory_estimate(net, height, width) > budget_bytes
