"""Where each output of a run of trunk blocks comes from, and windows that compute it exactly.

Every BatchNorm of the trunk is frozen, so the trunk is a stack of local operators (convolutions,
fixed affine maps, ReLU, max-pooling, residual adds). Output position ``o`` of such a stack depends only
on the input interval ``[o·S + first, o·S + last]`` (its footprint; ``S`` is the total stride). An image
can therefore be cut into overlapping windows, each run through the blocks on its own, keeping from each
window only the output positions that the whole-image forward would compute identically:

* A window starts at a multiple of ``S``, so every layer's stride grid coincides with the whole image's.
* Zero padding is the subtle point. At a true image edge the window's padding *is* the whole-image
  computation; at an interior window edge it is wrong, so an output position is kept only when its
  footprint lies inside the window or runs past a true image edge. Since every intermediate
  dependency's footprint lies inside the output's, that is exactly the condition for the whole chain
  of layers to see real pixels.

:func:`plan_axis` and :class:`TilePlan` make such windows. Band streaming (:mod:`.bands`) plans each block
on its own (small halos, never recomputed across blocks); streamed training (:mod:`wsilocal.train.streaming`)
plans a whole module, whose backward needs every window's graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsilocal.models.resnet import BasicBlock, Bottleneck, ResNetTrunk, Stem
from wsilocal.slide.tissue import ImageTissueMask

#: (kernel, stride, padding) of one layer along one axis.
Layer = tuple[int, int, int]
#: One window along one axis: (in_start, in_stop, out_start, out_stop, keep_start, keep_stop), all global.
AxisWindow = tuple[int, int, int, int, int, int]


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


def _check_shortcut(block: BasicBlock | Bottleneck, main: list[Layer]) -> None:
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
    if isinstance(block, (BasicBlock, Bottleneck)):  # a Bottleneck adds its 1×1 conv3; its stride is on conv2
        layers = [block.conv1, block.conv2, *([block.conv3] if isinstance(block, Bottleneck) else [])]
        _check_shortcut(block, [layer_geometry(layer) for layer in layers])
        return layers
    raise TypeError(f"cannot tile a {type(block).__name__}: expected the trunk's Stem, BasicBlocks and Bottlenecks")


def block_geometry(blocks: Sequence[nn.Module]) -> list[Layer]:
    """(kernel, stride, padding) of each layer on the main path of ``blocks``, in forward order."""
    return [layer_geometry(layer) for block in blocks for layer in _main_path(block)]


def trunk_geometry(trunk: ResNetTrunk) -> list[Layer]:
    """(kernel, stride, padding) of each main-path layer of the trunk: conv1, maxpool, each block's convs (two
    per BasicBlock, three per Bottleneck).

    Read from the modules (conv1 stride 2 or 3 both work); every block's shortcut (identity or 1×1
    downsample) is verified to lie inside its main path's footprint.
    """
    return block_geometry(trunk.blocks())


def map_cells(blocks: Sequence[nn.Module]) -> tuple[int, int]:
    """(stride, offset): position ``o`` of the blocks' output map stands for the input pixels
    ``[o·stride + offset, (o+1)·stride + offset)``, the cell of ``stride`` pixels centred on its receptive field."""
    stride, first, last = footprint(block_geometry(blocks))
    return stride, (first + last + 1 - stride) // 2


def tissue_positions(blocks: Sequence[nn.Module], tissue: ImageTissueMask, map_hw: tuple[int, int]) -> torch.Tensor:
    """bool (h, w): which positions of the ``map_hw`` map that ``blocks`` make of the image are tissue
    (:meth:`~wsilocal.slide.tissue.ImageTissueMask.grid` on the map's cells)."""
    stride, offset = map_cells(blocks)
    return torch.from_numpy(tissue.grid(stride, offset, map_hw))


def module_tissue_positions(stages: Sequence[Sequence[nn.Module]], tissue: ImageTissueMask) -> list[torch.Tensor]:
    """The tissue positions of each module's output map (``stages``: the modules' blocks, in order)."""
    masks: list[torch.Tensor] = []
    blocks: list[nn.Module] = []
    height, width = tissue.shape
    for stage in stages:
        geometry = block_geometry(list(stage))
        height, width = output_length(height, geometry), output_length(width, geometry)
        blocks += list(stage)
        masks.append(tissue_positions(blocks, tissue, (height, width)))
    return masks


def pull_back(needed: np.ndarray, geometry: Sequence[Layer], in_shape: tuple[int, int]) -> np.ndarray:
    """bool ``in_shape``: the input positions some ``needed`` output position (bool (h, w)) of the stack depends on.

    Output ``o`` of an axis depends on input ``[o·S + first, o·S + last]`` (:func:`footprint`); both axes alike.
    """
    stride, first, last = footprint(geometry)
    result = needed
    for axis, length in enumerate(in_shape):
        position = np.arange(length)
        n_out = result.shape[axis]
        # The outputs whose footprint holds input x: ceil((x − last) / S) ≤ o ≤ floor((x − first) / S).
        low = np.clip(-((last - position) // stride), 0, n_out)
        high = np.clip((position - first) // stride + 1, 0, n_out)
        counts = np.cumsum(result, axis=axis, dtype=np.int64)
        counts = np.concatenate([np.zeros_like(np.take(counts, [0], axis=axis)), counts], axis=axis)
        covered = np.take(counts, high, axis=axis) - np.take(counts, np.minimum(low, high), axis=axis)
        result = covered > 0
    return result


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


def forward_peak_numel(blocks: Sequence[nn.Module], height: int, width: int, *, folded: bool = True,
                       in_channels: int = 3) -> int:
    """The most float32 elements alive at once during a no-grad forward of ``blocks`` on a ``height``×``width``
    input, the input itself left out (the caller holds it throughout). ``folded``: BatchNorm folded into the
    convolutions; unfolded, each convolution's output and its BatchNorm's output are alive together.

    What a block holds, in the order its ``forward`` runs (the ReLUs are in place):

    * the stem: conv1's output, then it beside the max-pooling's output and that one's int64 indices (two
      float32 elements each; CPU's max-pooling makes them even without gradients);
    * a residual block: its input all along (the shortcut needs it); each main-path convolution's output beside
      the previous one; at the end the last output, the shortcut (the 1×1 ``downsample`` convolution's output,
      or the input itself) and their sum.

    ``tests/test_stream.py`` checks this against the tensors a real forward allocates.
    """
    copies = 1 if folded else 2
    peak, channels = 0, in_channels
    for index, block in enumerate(blocks):
        size_in = channels * height * width if index else 0  # the first block's input is the caller's
        residual = isinstance(block, (BasicBlock, Bottleneck))
        previous = size_in
        for position, layer in enumerate(_main_path(block)):
            kernel, stride, padding = layer_geometry(layer)
            height, width = (output_length(n, [(kernel, stride, padding)]) for n in (height, width))
            channels = getattr(layer, "out_channels", channels)  # max-pooling keeps the channels
            size = channels * height * width
            if isinstance(layer, nn.MaxPool2d):
                peak = max(peak, previous + 3 * size)  # its output and its int64 indices
            else:  # after the first convolution a residual block still holds its input for the shortcut
                held = size_in if residual and position else 0
                peak = max(peak, held + previous + copies * size)
            previous = size
        if residual:
            out = previous
            if block.downsample is not None:
                peak = max(peak, size_in + out + copies * out, size_in + 3 * out)  # shortcut conv, then the sum
            else:
                peak = max(peak, size_in + 2 * out)  # the sum beside its two terms (the shortcut is the input)
    return peak
