"""Block by block over the whole map: exact forward *and backward* of a run of trunk blocks, with per-block halos.

Streamed training (:mod:`wsilocal.train.streaming`) runs each gradient-isolated module through this engine. The
module's blocks run one after the other over the whole map, each in 2-D windows of its *own* output, and every
map a backward needs — each block's input, its intermediate activations — waits in a store between blocks (host
memory or a memory-mapped file, :class:`MapStore`), never in compute memory:

* **forward** (no graph): a window of block b's output reads the input region its footprint needs from the
  store of b's input (zero padding beyond the map's edges — what the whole-image convolution sees there),
  runs the block's layers on it, and writes the block's output and (with ``keep``) its intermediate
  activations to their stores. The only work done twice is the block's *own* halo: one row and column of a
  3×3 convolution's output per interior window edge; the module's receptive field is never recomputed;
* **backward** (no graph either — nothing is recomputed): the same windows in reverse block order. A window
  reads its part of the block's output gradient, its output (for the last ReLU's mask) and its stored
  activations, and applies each layer's backward (``aten.convolution_backward``, the kernel autograd itself
  calls) from the output back to the input. Parameter gradients accumulate in ``.grad``; the window's input
  gradient, halo included, is *added* into a gradient store for the block below. Everything after the
  frozen masks is linear, so the windows' partial gradients add up to the whole-image gradient exactly.
  The module's first block computes no input gradient (modules are gradient-isolated).

Each layer works on an explicit window: a convolution over output region ``[o0, o1)`` reads input
``[o0·s − p, (o1−1)·s − p + k)``, zero-padded only where that runs past the map's edge, and convolves it without
padding — so its output is the whole-image output there, bit for bit the same arithmetic, and its backward is
the exact contribution of those outputs. A step therefore costs a plain forward, a plain backward and the
store's copies; memory is one window of one block (fixed by the tile) plus what the caller keeps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from wsilocal.models.resnet import BasicBlock, Bottleneck, FrozenBatchNorm2d, Stem
from wsilocal.runtime import trim_heap
from wsilocal.stream.geometry import Layer, layer_geometry, output_length
from wsilocal.stream.sources import ImageSource

#: One half-open interval per axis: ((row0, row1), (col0, col1)).
Region = tuple[tuple[int, int], tuple[int, int]]
#: How much larger than the tile a window may grow per axis to avoid one more window (see :func:`window_grid`).
TILE_SLACK = 0.1


class MapStore(Protocol):
    """A (C, H, W) map outside compute memory (:class:`~wsilocal.train.activation_store.ActivationStore`)."""

    channels: int
    height: int
    width: int

    def window(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """A (1, C, height, width) view: read it, ``copy_`` into it, ``add_`` into it."""
        ...

    def close(self) -> None:
        """Release the map."""
        ...


#: ``make_store((C, H, W), zero)``: a new store; ``zero`` for a gradient store that windows add into.
StoreFactory = Callable[[tuple[int, int, int], bool], MapStore]


# --- windows -------------------------------------------------------------------------------------


def _shares(length: int, per_window: int) -> list[tuple[int, int]]:
    """``[0, length)`` cut into equal windows of about ``per_window`` (each up to ``TILE_SLACK`` longer, so that a
    map slightly longer than the tile does not get a sliver window of its own)."""
    count = max(1, math.ceil(length / max(1, per_window) - TILE_SLACK))
    count = min(count, length)
    bounds = [index * length // count for index in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def window_grid(hw: tuple[int, int], tile: int) -> list[Region]:
    """The windows of a map of ``hw``: a grid of about ``tile``×``tile`` output positions each, partitioning it."""
    return list(itertools.product(*(_shares(n, tile) for n in hw)))


#: A layer's (kernel, stride, padding) along the rows and along the columns.
AxisLayers = tuple[Layer, Layer]


def _per_axis(geometry: Layer | AxisLayers) -> AxisLayers:
    return (geometry, geometry) if isinstance(geometry[0], int) else geometry  # type: ignore[return-value]


def footprint_region(region: Region, geometry: Layer | AxisLayers) -> Region:
    """The input a layer's outputs ``region`` read, unclipped: past the map's edge is the layer's padding.
    ``geometry``: one (kernel, stride, padding) for both axes, or one per axis."""
    return tuple((lo * stride - padding, (hi - 1) * stride - padding + kernel)  # type: ignore[return-value]
                 for (lo, hi), (kernel, stride, padding) in zip(region, _per_axis(geometry), strict=True))


def layer_output_hw(hw: tuple[int, int], geometry: Layer | AxisLayers) -> tuple[int, int]:
    """The output size of a layer for an input of ``hw`` (PyTorch's formula per axis)."""
    return tuple(output_length(n, [g]) for n, g in zip(hw, _per_axis(geometry), strict=True))  # type: ignore[return-value]


def clip_region(region: Region, hw: tuple[int, int]) -> Region:
    """``region`` inside a map of ``hw``."""
    return tuple((max(lo, 0), min(hi, n)) for (lo, hi), n in zip(region, hw, strict=True))  # type: ignore[return-value]


def _sizes(region: Region) -> tuple[int, int]:
    return region[0][1] - region[0][0], region[1][1] - region[1][0]


def read_region(source: MapStore | ImageSource, region: Region, placement: dict) -> torch.Tensor:
    """``region`` of a store (a view where placement allows) or of an image source, on the blocks' device/dtype."""
    (r0, _), (c0, _) = region
    reader = source.window if hasattr(source, "window") else source.read
    return reader(r0, c0, *_sizes(region)).to(**placement)


def _pad(x: torch.Tensor, have: Region, want: Region, value: float = 0.0) -> torch.Tensor:
    """``x`` (covering ``have``) extended to ``want`` with ``value`` — the part of ``want`` past the map's edge."""
    pads = (have[1][0] - want[1][0], want[1][1] - have[1][1], have[0][0] - want[0][0], want[0][1] - have[0][1])
    return _channels_last(F.pad(x, pads, value=value)) if any(pads) else _channels_last(x)


def _own_padding(have: Region, want: Region, geometry: Layer | AxisLayers) -> tuple[int, int] | None:
    """The symmetric padding per axis with which the layer itself, run over ``have``, gives exactly the outputs
    whose footprint is ``want`` — no padded copy needed (always so for a window covering the whole map);
    None where the edges need different padding (a window with one edge inside the map)."""
    pads = []
    for (h0, h1), (w0, w1), (kernel, stride, _) in zip(have, want, _per_axis(geometry), strict=True):
        top, bottom = h0 - w0, w1 - h1
        if bottom > top or (h1 - h0 + 2 * top - kernel) // stride != (w1 - w0 - kernel) // stride:
            return None
        pads.append(top)
    return pads[0], pads[1]


@dataclass(frozen=True)
class LayerInput:
    """A layer's input window, ready to run: ``tensor`` covers ``covers`` and the layer pads it by ``padding``."""

    tensor: torch.Tensor
    covers: Region
    padding: tuple[int, int]

    @classmethod
    def of(cls, x: torch.Tensor, have: Region, want: Region, geometry: Layer | AxisLayers,
           value: float = 0.0) -> LayerInput:
        """``x`` (covering ``have``, the map's part of the footprint ``want``) as the layer's input."""
        own = _own_padding(have, want, geometry)
        if own is not None:
            return cls(_channels_last(x), have, own)
        return cls(_pad(x, have, want, value), want, (0, 0))


def _crop(x: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    """The part ``want`` of ``x``, which covers ``have``."""
    (r0, r1), (c0, c1) = want
    return x[:, :, r0 - have[0][0] : r1 - have[0][0], c0 - have[1][0] : c1 - have[1][0]]


def _store_region(store: MapStore, region: Region) -> torch.Tensor:
    (r0, _), (c0, _) = region
    return store.window(r0, c0, *_sizes(region))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def accumulate_grad(parameter: nn.Parameter, gradient: torch.Tensor) -> None:
    """``parameter.grad += gradient``, as autograd's accumulation does (a new ``.grad`` when there is none)."""
    if parameter.grad is None:
        parameter.grad = gradient.contiguous()
    else:
        parameter.grad.add_(gradient)


# --- one convolution on an explicit window ---------------------------------------------------------


@dataclass(frozen=True)
class ConvStep:
    """A convolution (its own bias, if any) and the frozen affine map of the BatchNorm after it (if any).

    ``padding`` (rows, columns) replaces the convolution's own: the auxiliary classifiers pad per axis.
    """

    conv: nn.Conv2d
    scale: torch.Tensor | None = None  # (1, C, 1, 1)
    shift: torch.Tensor | None = None
    padding: tuple[int, int] | None = None

    @classmethod
    def of(cls, conv: nn.Conv2d, bn: nn.Module | None = None) -> ConvStep:
        """The step for ``conv`` followed by ``bn`` (a :class:`FrozenBatchNorm2d`, folded or not: the same map)."""
        if conv.groups != 1:
            raise ValueError("streaming needs ungrouped convolutions")
        layer_geometry(conv)  # square, undilated, numeric padding
        if bn is None:
            return cls(conv)
        if not isinstance(bn, FrozenBatchNorm2d):
            raise TypeError(f"streaming needs frozen BatchNorm (a purely local operator), got {type(bn).__name__}")
        scale, shift = (t.detach().view(1, -1, 1, 1) for t in bn.scale_shift())
        return cls(conv, scale, shift)

    @property
    def geometry(self) -> AxisLayers:
        """(kernel, stride, padding) along the rows and the columns."""
        kernel, stride, padding = layer_geometry(self.conv)
        pads = (padding, padding) if self.padding is None else self.padding
        return (kernel, stride, pads[0]), (kernel, stride, pads[1])

    def input(self, x: torch.Tensor, have: Region, want: Region) -> LayerInput:
        """``x`` (covering ``have`` of the footprint ``want``) as this layer's input."""
        return LayerInput.of(x, have, want, self.geometry)

    def forward(self, x: LayerInput) -> torch.Tensor:
        """The layer's outputs whose footprint ``x`` covers (with its padding)."""
        weight, bias = self.conv.weight, self.conv.bias
        if self.scale is not None:  # no graph here: fold the affine map into the conv, one pass less
            scale = self.scale.view(-1)
            bias = self.shift.view(-1) if bias is None else self.shift.view(-1) + bias * scale
            weight = weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x.tensor, weight, bias, self.conv.stride, x.padding)

    def backward(self, x: LayerInput, grad: torch.Tensor, input_grad: bool) -> torch.Tensor | None:
        """Given the input ``x`` and the gradient of :meth:`forward`'s output: accumulate the parameters'
        gradients and return the input gradient (over ``x.covers``) if ``input_grad``."""
        weight, bias = self.conv.weight, self.conv.bias
        if self.scale is not None:
            grad = grad * self.scale
        if not (input_grad or weight.requires_grad):
            return None
        # A window with no input gradient still owes the conv's weight gradient: ask for what is needed only.
        grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
            _channels_last(grad), x.tensor, weight, None, list(self.conv.stride), list(x.padding), [1, 1], False,
            [0, 0], 1, [input_grad, weight.requires_grad, False])
        if weight.requires_grad:
            accumulate_grad(weight, grad_w)
        if bias is not None and bias.requires_grad:
            accumulate_grad(bias, grad.sum(dim=(0, 2, 3)))
        return grad_in


def conv_forward_over(step: ConvStep, source: MapStore, out_hw: tuple[int, int], tile: int, placement: dict,
                      out: torch.Tensor) -> None:
    """``step`` over all of ``source`` (its own padding at the map's edges), window by window, into ``out``
    (the whole output map, (1, C, *out_hw)) — e.g. an auxiliary classifier's strided conv over x_i."""
    hw = (source.height, source.width)
    for region in window_grid(out_hw, tile):
        want = footprint_region(region, step.geometry)
        have = clip_region(want, hw)
        _crop(out, ((0, out_hw[0]), (0, out_hw[1])), region).copy_(
            step.forward(step.input(read_region(source, have, placement), have, want)))


def conv_backward_over(step: ConvStep, source: MapStore, grad_out: torch.Tensor, tile: int, placement: dict,
                       grad_in: MapStore) -> None:
    """The backward of :func:`conv_forward_over` for the output gradient ``grad_out`` (the whole map): parameter
    gradients into ``.grad``, the input gradient added into ``grad_in``."""
    hw, out_hw = (source.height, source.width), tuple(grad_out.shape[2:])
    for region in window_grid(out_hw, tile):
        want = footprint_region(region, step.geometry)
        have = clip_region(want, hw)
        x = step.input(read_region(source, have, placement), have, want)
        gradient = step.backward(x, _crop(grad_out, ((0, out_hw[0]), (0, out_hw[1])), region), input_grad=True)
        _store_region(grad_in, have).add_(_crop(gradient, x.covers, have))


# --- one block -----------------------------------------------------------------------------------


class BlockPlan:
    """One trunk block as explicit layers, with the sizes of its maps for an input of ``in_hw``.

    The stem: conv1 (+BN, ReLU) and max-pooling (forward only: it is frozen, and as the first block of module 1
    no gradient is wanted at its input). A residual block (Basic or Bottleneck): its main-path convolutions —
    ReLU after each but the last — and its shortcut (identity or a 1×1 projection), summed, then ReLU.
    """

    def __init__(self, block: nn.Module, in_hw: tuple[int, int]):
        self.block = block
        self.pool: Layer | None = None
        self.shortcut: ConvStep | None = None
        if isinstance(block, Stem):
            self.convs = [ConvStep.of(block.conv1, block.bn1)]
            self.pool = layer_geometry(block.maxpool)
        elif isinstance(block, (BasicBlock, Bottleneck)):
            pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
            if isinstance(block, Bottleneck):
                pairs.append((block.conv3, block.bn3))
            self.convs = [ConvStep.of(conv, bn) for conv, bn in pairs]
            if block.downsample is not None:
                self.shortcut = ConvStep.of(block.downsample[0], block.downsample[1])
        else:
            raise TypeError(f"cannot stream a {type(block).__name__}: expected the trunk's Stem and residual blocks")
        # hws[j]: the size of t_j, the j-th main-path activation (t_0 the input, t_n the last conv's output).
        self.hws = [tuple(in_hw)]
        for step in self.convs:
            self.hws.append(layer_output_hw(self.hws[-1], step.geometry))
        self.out_hw = self.hws[-1] if self.pool is None else layer_output_hw(self.hws[-1], self.pool)
        self.channels = [block.in_channels] + [step.conv.out_channels for step in self.convs]
        self.stride = math.prod(step.geometry[0][1] for step in self.convs) * (1 if self.pool is None else self.pool[1])

    @property
    def parameters_learn(self) -> bool:
        """Whether any of the block's parameters wants a gradient."""
        return any(p.requires_grad for p in self.block.parameters())

    def regions(self, out: Region) -> tuple[list[Region], list[Region]]:
        """For output window ``out``: ``have[j]``, the region of t_j the window computes (inside the map), and
        ``want[j]`` (j ≥ 1), conv_j's unclipped footprint over ``have[j]`` in t_{j−1}."""
        n = len(self.convs)
        have: list = [None] * (n + 1)
        want: list = [None] * (n + 1)
        have[n] = out if self.pool is None else clip_region(footprint_region(out, self.pool), self.hws[n])
        for j in range(n, 0, -1):
            want[j] = footprint_region(have[j], self.convs[j - 1].geometry)
            have[j - 1] = clip_region(want[j], self.hws[j - 1])
        return have, want

    def forward(self, x_src: MapStore | ImageSource, out: Region, placement: dict,
                mids: Sequence[MapStore] | None) -> torch.Tensor:
        """The block's output over ``out``; with ``mids`` (stores of t_1..t_{n−1}) their regions are written too."""
        have, want = self.regions(out)
        x = read_region(x_src, have[0], placement)
        t, n = x, len(self.convs)
        for j, step in enumerate(self.convs, 1):
            z = step.forward(step.input(t, have[j - 1], want[j]))
            if j == n:
                break
            t = F.relu_(z)
            if mids is not None:
                _store_region(mids[j - 1], have[j]).copy_(t)
        if self.pool is not None:  # the stem: ReLU, then max-pooling, padded as MaxPool2d pads (-inf)
            kernel, stride, _ = self.pool
            pooled = LayerInput.of(F.relu_(z), have[n], footprint_region(out, self.pool), self.pool, -math.inf)
            return F.max_pool2d(pooled.tensor, kernel, stride, pooled.padding)
        return F.relu_(z.add_(self._shortcut(x, have[0], out)))

    def _shortcut_region(self, out: Region) -> Region:
        return out if self.shortcut is None else footprint_region(out, self.shortcut.geometry)

    def _shortcut(self, x: torch.Tensor, x_region: Region, out: Region) -> torch.Tensor:
        """The shortcut over ``out`` from ``x`` (covering ``x_region``, which contains its footprint)."""
        part = _crop(x, x_region, self._shortcut_region(out))
        return part if self.shortcut is None else self.shortcut.forward(LayerInput(part, x_region, (0, 0)))

    def backward(self, x_src: MapStore | ImageSource, out: Region, y: MapStore, grad_y: MapStore,
                 mids: Sequence[MapStore], grad_x: MapStore | None, placement: dict) -> None:
        """The backward of window ``out``: parameter gradients into ``.grad``, and (with ``grad_x``) the input
        gradient of the window, halo included, added into ``grad_x``."""
        if self.pool is not None:
            raise ValueError("the stem is frozen and first: streaming never back-propagates through it")
        have, want = self.regions(out)
        n = len(self.convs)
        # The gradient at the last conv's output: the output's gradient through the final ReLU.
        g = read_region(grad_y, out, placement) * (read_region(y, out, placement) > 0)
        x = read_region(x_src, have[0], placement)
        gx = torch.zeros_like(x, memory_format=torch.channels_last) if grad_x is not None else None
        if self.shortcut is None:
            if gx is not None:
                _crop(gx, have[0], out).add_(g)
        else:
            part = self._shortcut_region(out)
            gin = self.shortcut.backward(LayerInput(_crop(x, have[0], part), part, (0, 0)), g,
                                         input_grad=gx is not None)
            if gx is not None:
                _crop(gx, have[0], part).add_(gin)
        for j in range(n, 0, -1):
            t = x if j == 1 else read_region(mids[j - 2], have[j - 1], placement)
            need = j > 1 or gx is not None
            step = self.convs[j - 1]
            inp = step.input(t, have[j - 1], want[j])
            gin = step.backward(inp, g, input_grad=need)
            if j > 1:
                g = _crop(gin, inp.covers, have[j - 1]).mul_(t > 0)  # through t_{j-1}'s ReLU
            elif gx is not None:
                gx.add_(_crop(gin, inp.covers, have[0]))
        if grad_x is not None:
            _store_region(grad_x, have[0]).add_(gx)


# --- a run of blocks -----------------------------------------------------------------------------


class StreamedBlocks:
    """A run of trunk blocks (one gradient-isolated module, or the whole trunk) over the whole map in ``source``.

    ``tile``: output block per window in the pixels of ``source`` (each block plans ``tile // stride`` of its
    own output pixels, its stride counted from ``source``). ``make_store`` makes the stores between blocks.
    With ``keep`` the forward keeps what the backward needs (every block's input and intermediate
    activations); without it, each block's input is released once the next block has its output.
    """

    def __init__(self, blocks: Sequence[nn.Module], source: MapStore | ImageSource, tile: int,
                 make_store: StoreFactory, *, keep: bool):
        if not blocks:
            raise ValueError("streaming needs at least one block")
        if tile < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        self.source, self.make_store, self.keep = source, make_store, keep
        weight = next(p for block in blocks for p in block.parameters())
        self.placement = {"device": weight.device, "dtype": weight.dtype}
        self.plans: list[BlockPlan] = []
        hw, stride = (source.height, source.width), 1
        self.tiles: list[int] = []
        for block in blocks:
            plan = BlockPlan(block, hw)
            stride *= plan.stride
            self.plans.append(plan)
            self.tiles.append(max(1, tile // stride))
            hw = plan.out_hw
        self.in_hw, self.out_hw = (source.height, source.width), hw
        self.out_channels = self.plans[-1].channels[-1]
        self.outputs: list[MapStore] = []  # each block's output store (the last: the module's output)
        self.mids: list[list[MapStore]] = []

    def windows(self, index: int) -> list[Region]:
        """The output windows of block ``index``."""
        return window_grid(self.plans[index].out_hw, self.tiles[index])

    def _input(self, index: int) -> MapStore | ImageSource:
        return self.source if index == 0 else self.outputs[index - 1]

    def forward(self) -> MapStore:
        """Run every block over the whole map (no graph); returns the store of the last block's output, which the
        caller owns (and closes)."""
        with torch.no_grad():
            for index, plan in enumerate(self.plans):
                out = self.make_store((plan.channels[-1], *plan.out_hw), False)
                mids = [self.make_store((c, *hw), False) for c, hw in zip(plan.channels[1:-1], plan.hws[1:-1],
                                                                          strict=True)] if self.keep else None
                windows = self.windows(index)
                for region in windows:
                    _store_region(out, region).copy_(plan.forward(self._input(index), region, self.placement, mids))
                self.outputs.append(out)
                self.mids.append(mids or [])
                if not self.keep and index > 0:  # the previous block's output has served
                    self.outputs[index - 1].close()
                if len(windows) > 1:  # windows of different shapes fragment the kept heap (runtime.tune_cpu_allocator)
                    trim_heap()
        return self.outputs[-1]

    def backward(self, grad_out: MapStore) -> None:
        """After :meth:`forward` with ``keep``: back-propagate ``grad_out`` (the gradient of the output, which
        the caller owns) block by block; parameter gradients accumulate in ``.grad``. Releases every store
        the forward made except the output."""
        if not self.keep or len(self.outputs) != len(self.plans):
            raise RuntimeError("StreamedBlocks.backward needs a forward with keep=True first")
        grad = grad_out
        try:
            with torch.no_grad():
                for index in range(len(self.plans) - 1, -1, -1):
                    plan = self.plans[index]
                    grad_x = None
                    if index > 0:
                        grad_x = self.make_store((plan.channels[0], *plan.hws[0]), True)
                    windows = self.windows(index) if grad_x is not None or plan.parameters_learn else []
                    for region in windows:
                        plan.backward(self._input(index), region, self.outputs[index], grad,
                                      self.mids[index], grad_x, self.placement)
                    self._release(index, grad if grad is not grad_out else None)
                    grad = grad_x
                    if len(windows) > 1:
                        trim_heap()
        finally:
            if grad is not None and grad is not grad_out:
                grad.close()
            self.close()

    def _release(self, index: int, grad: MapStore | None) -> None:
        for store in self.mids[index]:
            store.close()
        self.mids[index] = []
        if index < len(self.plans) - 1:
            self.outputs[index].close()
        if grad is not None:
            grad.close()

    def close(self) -> None:
        """Release every store made here except the module's output."""
        for mids in self.mids:
            for store in mids:
                store.close()
        for store in self.outputs[:-1]:
            store.close()


def window_bytes(blocks: Sequence[nn.Module], tile: int, itemsize: int = 4) -> int:
    """Compute memory of :class:`StreamedBlocks` over ``blocks`` at ``tile`` (their input's pixels), an estimate:
    the largest block window's backward — its input and each activation over the window's regions (halos
    included), the input's gradient beside the input and two tensors (gradient, mask or ReLU output) beside each
    activation — for an interior window of a map large enough that nothing is clipped."""
    peak, stride, hw = 0, 1, (2**24, 2**24)
    for block in blocks:
        plan = BlockPlan(block, hw)
        stride *= plan.stride
        side = max(1, tile // stride)
        middle = (plan.out_hw[0] // 2, plan.out_hw[0] // 2 + side)
        have, _ = plan.regions((middle, middle))
        numels = [c * math.prod(_sizes(region)) for c, region in zip(plan.channels, have, strict=True)]
        peak = max(peak, itemsize * (2 * numels[0] + 3 * sum(numels[1:])))
        hw = plan.out_hw
    return peak
