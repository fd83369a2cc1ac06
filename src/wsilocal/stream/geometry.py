"""Tile-exact, bounded-memory forward of the trunk over an image too big to run whole.

Every BatchNorm of the trunk is frozen, so the trunk is a stack of local operators (convolutions,
fixed affine maps, ReLU, max-pooling, residual adds). Output position ``o`` of such a stack depends only
on the input interval ``[o·S + first, o·S + last]`` (its footprint; ``S`` is the total stride). The image
is therefore cut into overlapping windows, each run through the network on its own, and from each
window only the output positions that the whole-image forward would compute identically are kept:

* A window starts at a multiple of ``S``, so every layer's stride grid coincides with the whole image's.
* Zero padding is the subtle point. At a true image edge the window's padding *is* the whole-image
  computation; at an interior window edge it is wrong, so an output position is kept only when its
  footprint lies inside the window or runs past a true image edge. Since every intermediate
  dependency's footprint lies inside the output's, that is exactly the condition for the whole chain
  of layers to see real pixels.

``tile`` is the edge of the block of output that each window contributes, in input pixels; the window
adds the footprint's reach on each side (the halo, 672 px for the stride-3 trunk whose receptive field
is 1345 px). Peak memory is one window's forward plus the output map. One engine,
:func:`tiled_forward`, serves any sequence of trunk blocks (a whole trunk or a run of its units).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from wsilocal.models.resnet import LAYER_CHANNELS, BasicBlock, ResNet34Trunk, Stem
from wsilocal.stream.sources import ImageSource

#: (kernel, stride, padding) of one layer along one axis.
Layer = tuple[int, int, int]
#: One window along one axis: (in_start, in_stop, out_start, out_stop, keep_start, keep_stop), all global.
AxisWindow = tuple[int, int, int, int, int, int]

FLOAT_BYTES = 4
#: The default tile, and the smallest one a memory budget picks: below it the 672-px halos would be most of
#: every window's work.
MIN_TILE = 1536


# --- geometry ----------------------------------------------------------------------------------


def _square(value: int | tuple[int, ...], what: str) -> int:
    values = (value,) * 2 if isinstance(value, int) else tuple(value)
    if len(set(values)) != 1:
        raise ValueError(f"tiling needs the same {what} along both axes, got {values}")
    return int(values[0])


def layer_geometry(layer: nn.Module) -> Layer:
    """(kernel, stride, padding) of a square, undilated ``Conv2d`` or ``MaxPool2d``."""
    if isinstance(layer, nn.Conv2d):
        kernel, stride, padding = layer.kernel_size, layer.stride, layer.padding
        dilation = layer.dilation
    elif isinstance(layer, nn.MaxPool2d):
        if layer.ceil_mode:
            raise ValueError("tiling does not support MaxPool2d(ceil_mode=True)")
        kernel, padding, dilation = layer.kernel_size, layer.padding, layer.dilation
        stride = layer.stride if layer.stride is not None else kernel
    else:
        raise TypeError(f"no tiling geometry for {type(layer).__name__}")
    if isinstance(padding, str):
        raise ValueError(f"tiling needs numeric padding, got {padding!r}")
    if _square(dilation, "dilation") != 1:
        raise ValueError("tiling does not support dilated layers")
    return _square(kernel, "kernel size"), _square(stride, "stride"), _square(padding, "padding")


def footprint(geometry: Sequence[Layer]) -> tuple[int, int, int]:
    """(S, first, last): output position ``o`` of the stack sees input ``[o·S + first, o·S + last]``."""
    first = last = 0
    stride = 1
    for kernel, layer_stride, padding in reversed(geometry):
        first, last = first * layer_stride - padding, last * layer_stride - padding + kernel - 1
        stride *= layer_stride
    return stride, first, last


def output_length(length: int, geometry: Sequence[Layer]) -> int:
    """Length along one axis of the stack's output for an input of ``length`` (PyTorch's formula)."""
    for kernel, stride, padding in geometry:
        length = (length + 2 * padding - kernel) // stride + 1
    return length


def _check_shortcut(block: BasicBlock, main: list[Layer]) -> None:
    """The residual shortcut must add nothing to the main path's footprint, on the same stride grid."""
    shortcut = [(1, 1, 0)] if block.downsample is None else [layer_geometry(block.downsample[0])]
    main_stride, main_first, main_last = footprint(main)
    stride, first, last = footprint(shortcut)
    if stride != main_stride or first < main_first or last > main_last:
        raise ValueError(f"the shortcut's footprint {shortcut} is not inside the main path's {main}")


def _main_path(block: nn.Module) -> list[nn.Module]:
    """The spatial layers of a block, in order; the residual shortcut is checked to be covered by them."""
    if isinstance(block, Stem):
        return [block.conv1, block.maxpool]
    if isinstance(block, BasicBlock):
        layers = [block.conv1, block.conv2]
        _check_shortcut(block, [layer_geometry(layer) for layer in layers])
        return layers
    raise TypeError(f"cannot tile a {type(block).__name__}: expected the trunk's Stem and BasicBlocks")


def block_geometry(blocks: Sequence[nn.Module]) -> list[Layer]:
    """(kernel, stride, padding) of each layer on the main path of ``blocks``, in forward order."""
    return [layer_geometry(layer) for block in blocks for layer in _main_path(block)]


def trunk_geometry(trunk: ResNet34Trunk) -> list[Layer]:
    """(kernel, stride, padding) of each main-path layer of the trunk: conv1, maxpool, each block's two convs.

    Read from the modules (conv1 stride 2 or 3 both work); every block's shortcut (identity or 1×1
    downsample) is verified to lie inside its main path's footprint.
    """
    return block_geometry(trunk.blocks())


# --- planning ----------------------------------------------------------------------------------


def plan_axis(length: int, tile: int, geometry: Sequence[Layer]) -> list[AxisWindow]:
    """Windows along one axis of ``length`` input pixels, each contributing ``tile`` pixels' worth of output.

    Returns one ``(in_start, in_stop, out_start, out_stop, keep_start, keep_stop)`` per window, all in
    whole-image coordinates: the window reads input ``[in_start, in_stop)`` (clipped to the image;
    ``in_start`` a multiple of the total stride S), its forward yields output positions
    ``[out_start, out_stop)``, of which ``[keep_start, keep_stop)`` are exact and kept. The kept ranges
    partition ``[0, output_length(length))``. ``tile`` is rounded down to a multiple of S (at least S).
    """
    if length < 1 or tile < 1:
        raise ValueError(f"length and tile must be positive, got length={length}, tile={tile}")
    stride, first, last = footprint(geometry)
    out_len = output_length(length, geometry)
    per_window = max(1, tile // stride)
    windows = []
    for keep_start in range(0, out_len, per_window):
        keep_stop = min(keep_start + per_window, out_len)
        # The first kept position's footprint starts inside the window (or before the image: true edge);
        # the last one's ends inside it (or after the image).
        in_start = max(0, (keep_start * stride + first) // stride * stride)
        in_stop = min(length, (keep_stop - 1) * stride + last + 1)
        out_start = in_start // stride
        out_stop = out_start + output_length(in_stop - in_start, geometry)
        windows.append((in_start, in_stop, out_start, out_stop, keep_start, keep_stop))
    return windows


@dataclass(frozen=True)
class TilePlan:
    """The windows of a 2-D image: every (row window, column window) pair is one tile.

    ``rows`` and ``cols`` are :func:`plan_axis` results, ``(in_start, in_stop, out_start, out_stop,
    keep_start, keep_stop)`` per window, for the height and the width.
    """

    rows: tuple[AxisWindow, ...]
    cols: tuple[AxisWindow, ...]
    out_height: int
    out_width: int

    @classmethod
    def build(cls, height: int, width: int, tile: int, geometry: Sequence[Layer]) -> TilePlan:
        """The plan for a ``height``×``width`` image; see :func:`plan_axis` for ``tile``."""
        return cls(tuple(plan_axis(height, tile, geometry)), tuple(plan_axis(width, tile, geometry)),
                   output_length(height, geometry), output_length(width, geometry))

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)


# --- running -----------------------------------------------------------------------------------


@contextmanager
def _inference(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """No gradients and eval mode for the duration; each module's training flag is restored after."""
    flags = [(module, module.training) for block in blocks for module in block.modules()]
    for block in blocks:
        block.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def _placement(blocks: Sequence[nn.Module]) -> dict:
    """Device and dtype of the blocks' weights: where (and in what precision) their input must be."""
    for block in blocks:
        for parameter in block.parameters():
            return {"device": parameter.device, "dtype": parameter.dtype}
    return {"device": torch.device("cpu"), "dtype": torch.float32}


def tiled_forward(blocks: Sequence[nn.Module], source: ImageSource, *, tile: int = MIN_TILE,
                  progress: bool = False) -> torch.Tensor:
    """Run ``blocks`` (a run of trunk blocks, in order) over ``source`` window by window, stitched exactly.

    Returns the (1, C, h, w) map the blocks give on the whole image, computed without ever holding more
    than one window's activations (plus the output map). Gradients are off and the blocks in eval mode;
    each window is moved to the device and dtype of the blocks' weights.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("tiled_forward needs at least one block")
    plan = TilePlan.build(source.height, source.width, tile, block_geometry(blocks))
    placement = _placement(blocks)
    out: torch.Tensor | None = None
    with _inference(blocks), tqdm(total=len(plan), desc="tiles", unit="tile", disable=not progress) as bar:
        for (r_in0, r_in1, r_out0, r_out1, r_keep0, r_keep1), (c_in0, c_in1, c_out0, c_out1, c_keep0, c_keep1) \
                in itertools.product(plan.rows, plan.cols):
            x = source.read(r_in0, c_in0, r_in1 - r_in0, c_in1 - c_in0).to(**placement)
            for block in blocks:
                x = block(x)
            if tuple(x.shape[2:]) != (r_out1 - r_out0, c_out1 - c_out0):
                raise RuntimeError(f"tile plan expected a {r_out1 - r_out0}x{c_out1 - c_out0} output, "
                                   f"the network gave {tuple(x.shape[2:])}")
            if out is None:
                out = x.new_empty((1, x.shape[1], plan.out_height, plan.out_width))
            out[:, :, r_keep0:r_keep1, c_keep0:c_keep1] = \
                x[:, :, r_keep0 - r_out0 : r_keep1 - r_out0, c_keep0 - c_out0 : c_keep1 - c_out0]
            bar.update()
    assert out is not None  # the plan has at least one window
    return out


def tiled_trunk_forward(trunk: ResNet34Trunk, source: ImageSource, *, tile: int = MIN_TILE,
                        progress: bool = False) -> torch.Tensor:
    """The trunk's (1, 512, h, w) map of the whole image in ``source``, computed tile by tile.

    Equal to ``trunk(whole image)`` up to float rounding. ``tile`` is the output block per window in input
    pixels (rounded down to a multiple of the trunk's stride); each window adds the receptive-field halo.
    """
    return tiled_forward(trunk.blocks(), source, tile=tile, progress=progress)


# --- choosing the mode -------------------------------------------------------------------------


def _activation_numels(trunk: ResNet34Trunk, height: int, width: int) -> list[int]:
    """Elements of each activation along the trunk's main path, in the order a forward creates them."""
    numels = []
    channels = 3
    for block in trunk.blocks():
        for layer in _main_path(block):
            kernel, stride, padding = layer_geometry(layer)
            height, width = (output_length(n, [(kernel, stride, padding)]) for n in (height, width))
            channels = getattr(layer, "out_channels", channels)  # max-pooling keeps the channels
            # Unfolded, a conv's BatchNorm writes a second tensor of the conv's size (ReLU is in place).
            copies = 2 if isinstance(layer, nn.Conv2d) and not trunk.fold_bn else 1
            numels += [channels * height * width] * copies
        if isinstance(block, BasicBlock):
            numels.append(channels * height * width)  # the residual sum
    return numels


def forward_bytes_estimate(trunk: ResNet34Trunk, height: int, width: int) -> int:
    """Peak bytes of a plain no-grad forward of a ``height``×``width`` image (float32).

    The input plus the largest pair of consecutive activations on the main path (a layer's input and
    output are alive together). An estimate for choosing the mode, not an allocator measurement.
    """
    numels = _activation_numels(trunk, height, width)
    pairs = [a + b for a, b in itertools.pairwise(numels)] or numels
    return FLOAT_BYTES * (3 * height * width + max(pairs))


def window_forward_bytes(trunk: ResNet34Trunk, height: int, width: int, tile: int) -> int:
    """Peak bytes of :func:`tiled_trunk_forward` over a ``height``×``width`` image: the largest window's
    :func:`forward_bytes_estimate` plus the stitched (1, 512, h, w) output map."""
    geometry = trunk_geometry(trunk)
    stride, first, last = footprint(geometry)
    span = (max(1, tile // stride) - 1) * stride + last - first + 1  # input of a window with a full halo

    def window(length: int) -> int:
        return min(length, span)

    out_map = FLOAT_BYTES * LAYER_CHANNELS[-1] * output_length(height, geometry) * output_length(width, geometry)
    return forward_bytes_estimate(trunk, window(height), window(width)) + out_map


def tile_for_budget(trunk: ResNet34Trunk, height: int, width: int, memory_budget: int) -> int:
    """The largest tile (a multiple of the trunk's stride, at least :data:`MIN_TILE`) whose tiled forward fits
    ``memory_budget`` bytes (:func:`window_forward_bytes`).

    Each window recomputes the halo around its block, so the larger the tile the less work is repeated: a
    1536-px tile does about 3.5× the work of its block, a 6144-px one about 1.5×.
    """
    stride = footprint(trunk_geometry(trunk))[0]
    low, high = MIN_TILE // stride, max(MIN_TILE, height, width) // stride + 1  # in strides
    if window_forward_bytes(trunk, height, width, low * stride) > memory_budget:
        return low * stride
    while high - low > 1:  # low fits; high does not, or covers the image anyway
        middle = (low + high) // 2
        if window_forward_bytes(trunk, height, width, middle * stride) <= memory_budget:
            low = middle
        else:
            high = middle
    return low * stride


def trunk_forward(trunk: ResNet34Trunk, source: ImageSource, *, memory_budget: int | None = None,
                  tile: int | None = None, progress: bool = False) -> tuple[torch.Tensor, str]:
    """The trunk's map of the image in ``source`` and the mode used, ``"whole"`` or ``"tiled"``.

    Whole-image forward when :func:`forward_bytes_estimate` fits ``memory_budget`` bytes (None: always);
    otherwise :func:`tiled_trunk_forward` with ``tile``, by default the largest tile whose windows fit the
    budget (:func:`tile_for_budget`).
    """
    if memory_budget is None or forward_bytes_estimate(trunk, source.height, source.width) <= memory_budget:
        with _inference([trunk]):
            image = source.read(0, 0, source.height, source.width).to(**_placement([trunk]))
            return trunk(image), "whole"
    if tile is None:
        tile = tile_for_budget(trunk, source.height, source.width, memory_budget)
    return tiled_trunk_forward(trunk, source, tile=tile, progress=progress), "tiled"
