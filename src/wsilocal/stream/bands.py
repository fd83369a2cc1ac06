"""Band streaming: the trunk over an image of any height, exact, without recomputing the trunk's halo.

The window forward (:mod:`.geometry`'s plans, which streamed training uses) gives every window the halo of the
*whole* run of blocks: 672 px each side for the stride-3 trunk, recomputed by every window. Here the image
goes through the trunk in horizontal bands instead, each block on its own:

* every block keeps a buffer of its input rows (full width). As soon as the buffer holds the input of the
  block's next window (:func:`~.geometry.plan_axis` with the block's own geometry, ``band`` output rows per
  window), the block runs on it, the window's exact rows go on to the next block, and the rows no later
  window needs are dropped;
* so a block recomputes only its *own* halo — 2 rows of its first convolution's output per window for a
  BasicBlock, 1 for the stem's max-pooling — about 1–3 % of the trunk's work at ``band`` 32–64, where the
  window forward repeats 1.5–3.5× the work;
* columns are never cut: the full width runs at once, so the column edges are the image's own. A slide wider
  than tall is streamed along its width instead (:func:`stream_along_longer_side`: the image and every kernel
  transposed, the map transposed back — exact, as every layer is square and symmetric in its padding), so
  memory follows the *shorter* side;
* the image is read band by band in a reader thread while the trunk computes the band before;
* given the map positions that are ``needed`` (H's tissue cells), each block computes only the output positions
  those depend on (:func:`needed_positions`): column segments of a window, or nothing; the rest stays zero.
  The image, too, is read only where those positions of the first block look (:func:`needed_columns`).

Exactness follows from the window plan (kept rows of each block are exactly the whole-image rows) and is
tested in float64 against the whole-image forward. Peak memory: the largest block window (input rows ×
width × channels, bounded by ``band``), two read-ahead bands of the image, and the output map.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsilocal.stream.geometry import (
    AxisWindow,
    block_geometry,
    footprint,
    forward_peak_numel,
    output_length,
    plan_axis,
    pull_back,
)
from wsilocal.stream.sources import ImageSource

FLOAT_BYTES = 4
#: Output rows per window of every block, unless a memory budget asks for fewer (:func:`band_for_budget`).
DEFAULT_BAND = 64
#: The smallest band a budget may choose: below it the per-block halos are a large part of the work.
MIN_BAND = 8


class _BlockStream:
    """One block, run window by window over the rows of its input as they arrive.

    ``needed`` (bool (h, w) of the block's output, None: all) limits the work to the output positions later
    blocks need: a window computes only the column segments its kept rows need (each with its own column halo,
    as a row window has), and a window needing none is not run; the rest of its output is zeros.
    """

    def __init__(self, block: nn.Module, height: int, band: int, needed: np.ndarray | None = None):
        geometry = block_geometry([block])
        self.stride, self.first, self.last = footprint(geometry)
        self.block = block
        self.windows: deque[AxisWindow] = deque(plan_axis(height, band * self.stride, geometry))
        self.buffer: torch.Tensor | None = None
        self.start = 0  # the image row of the buffer's first row
        self.needed = needed
        # A gap of fewer columns than a segment's halo is computed rather than cut: cutting costs the halo again.
        self.min_gap = -(-(self.last - self.first + 1) // self.stride)

    def push(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Append ``rows`` (the input's next rows, (1, C, n, W)); return the exact output rows now computable."""
        self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows], dim=2)
        outputs = []
        while self.windows and self.windows[0][1] <= self.start + self.buffer.shape[2]:
            in0, in1, out0, out1, keep0, keep1 = self.windows.popleft()
            x = self.buffer[:, :, in0 - self.start : in1 - self.start]
            if self.needed is None:
                y = self.block(x)
                if y.shape[2] != out1 - out0:
                    raise RuntimeError(f"band plan expected {out1 - out0} output rows, the block gave {y.shape[2]}")
                outputs.append(y[:, :, keep0 - out0 : keep1 - out0])
            else:
                outputs.append(self._needed_rows(x, self.needed, out0, keep0, keep1))
            # Later windows start at or after the next one's first row: drop what lies before it.
            next_start = self.windows[0][0] if self.windows else in1
            self.buffer = self.buffer[:, :, next_start - self.start :]
            self.start = next_start
        return outputs

    def _needed_rows(self, x: torch.Tensor, needed: np.ndarray, out0: int, keep0: int, keep1: int) -> torch.Tensor:
        """Output rows ``[keep0, keep1)`` of the window input ``x`` (its first output row ``out0``), computed
        where ``needed`` asks for them and zero elsewhere."""
        out_width = needed.shape[1]
        segments = _segments(needed[keep0:keep1].any(axis=0), self.min_gap)
        if segments == [(0, out_width)]:  # the whole width: one plain window
            return self.block(x)[:, :, keep0 - out0 : keep1 - out0]
        result = x.new_zeros((1, self.block.out_channels, keep1 - keep0, out_width)).contiguous(
            memory_format=torch.channels_last)
        for k0, k1 in segments:
            # The columns that hold the footprints of outputs k0..k1-1, from a multiple of the stride (so that the
            # segment's stride grid is the whole row's), as plan_axis does for rows.
            c0 = max(0, (k0 * self.stride + self.first) // self.stride * self.stride)
            c1 = min(x.shape[3], (k1 - 1) * self.stride + self.last + 1)
            y = self.block(x[:, :, :, c0:c1])
            first_column = c0 // self.stride
            result[:, :, :, k0:k1] = y[:, :, keep0 - out0 : keep1 - out0, k0 - first_column : k1 - first_column]
        return result


def _segments(columns: np.ndarray, min_gap: int) -> list[tuple[int, int]]:
    """The runs ``[start, stop)`` of True in ``columns``, runs less than ``min_gap`` apart merged."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], columns.astype(np.int8), [0]])))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    merged: list[tuple[int, int]] = []
    for start, stop in runs:
        if merged and start - merged[-1][1] < min_gap:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def needed_positions(blocks: Sequence[nn.Module], height: int, width: int,
                     final: np.ndarray) -> list[np.ndarray]:
    """Per block, the output positions that the ``final`` (bool (h, w)) positions of the last block's map depend
    on: ``final`` pulled back through each later block's footprint."""
    heights, widths = block_input_lengths(blocks, height), block_input_lengths(blocks, width)
    if tuple(final.shape) != (heights[-1], widths[-1]):
        raise ValueError(f"needed positions of shape {final.shape} for a map of {(heights[-1], widths[-1])}")
    needed = [np.asarray(final, bool)]
    for index in range(len(blocks) - 1, 0, -1):
        needed.append(pull_back(needed[-1], block_geometry([blocks[index]]), (heights[index], widths[index])))
    return needed[::-1]


#: Unread columns between two read segments of a band, below which the gap is read too: each read has a cost of
#: its own (the slide's tiles at the segment edges are decoded twice).
MIN_READ_GAP = 64


def needed_columns(needed: np.ndarray, geometry: Sequence[tuple[int, int, int]], top: int, rows: int,
                   width: int) -> list[tuple[int, int]]:
    """The image columns ``[c0, c1)`` that image rows ``[top, top + rows)`` must be read in: the footprints of the
    first block's ``needed`` (bool (h, w)) outputs whose footprint rows meet those rows. ``geometry`` is the first
    block's (:func:`~.geometry.block_geometry`); segments closer than :data:`MIN_READ_GAP` are merged."""
    stride, first, last = footprint(geometry)
    # Output rows o whose footprint [o·S + first, o·S + last] meets [top, top + rows).
    low = max(0, -((last - top) // stride))
    high = min(needed.shape[0], (top + rows - 1 - first) // stride + 1)
    if low >= high:
        return []
    # Those rows' needed outputs as one row, pulled back to the image's columns (input row 0 lies in every
    # output row-0 footprint, so the row axis passes through).
    columns = pull_back(needed[low:high].any(axis=0)[None], geometry, (1, width))[0]
    return _segments(columns, MIN_READ_GAP)


def _read_needed_columns(source: ImageSource, top: int, rows: int, segments: list[tuple[int, int]],
                         dtype: torch.dtype) -> torch.Tensor:
    """Image rows ``[top, top + rows)``, read only in the column ``segments``; zeros elsewhere (no needed output
    depends on those pixels, so their values do not matter)."""
    if segments == [(0, source.width)]:
        return source.read(top, 0, rows, source.width)
    pieces = [(c0, source.read(top, c0, rows, c1 - c0)) for c0, c1 in segments]
    band = (pieces[0][1].new_zeros((1, pieces[0][1].shape[1], rows, source.width)) if pieces
            else torch.zeros((1, 3, rows, source.width), dtype=dtype))
    for c0, piece in pieces:
        band[:, :, :, c0 : c0 + piece.shape[3]] = piece
    return band


def block_input_lengths(blocks: Sequence[nn.Module], height: int) -> list[int]:
    """The input length of each block along an axis of ``height`` pixels (the last entry: the output's)."""
    heights = [height]
    for block in blocks:
        heights.append(output_length(heights[-1], block_geometry([block])))
    return heights


def _read_rows(blocks: Sequence[nn.Module], band: int) -> int:
    """Image rows read per step: about what the first block consumes per window."""
    return band * footprint(block_geometry([blocks[0]]))[0]


def band_forward(blocks: Sequence[nn.Module], source: ImageSource, *, band: int = DEFAULT_BAND,
                 progress: bool = False, needed: np.ndarray | None = None) -> torch.Tensor:
    """Run ``blocks`` (trunk blocks, in order, eval mode, no gradients wanted) over ``source`` band by band.

    Returns the (1, C, h, w) map the blocks give on the whole image, equal to it up to float rounding. Each
    band is moved to the device and dtype of the blocks' weights; the next band is read in a background
    thread while this one computes. ``band``: output rows per window of every block.

    ``needed`` (bool (h, w), e.g. the tissue positions H attends to): only those positions of the map are
    computed (and, in every block, what they depend on: :func:`needed_positions`), and the image is read only in
    the columns the first block's needed outputs look at; the rest of the map is not exact (mostly zeros).
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("band_forward needs at least one block")
    if band < 1:
        raise ValueError(f"band must be a positive number of rows, got {band}")
    placement = weights_placement(blocks)
    heights = block_input_lengths(blocks, source.height)
    per_block = (needed_positions(blocks, source.height, source.width, needed) if needed is not None
                 else [None] * len(blocks))
    streams = [_BlockStream(block, h, band, n) for block, h, n in zip(blocks, heights, per_block, strict=False)]
    step = _read_rows(blocks, band)
    starts = list(range(0, source.height, step))
    out: torch.Tensor | None = None
    filled = 0
    stem = block_geometry([blocks[0]])

    def read(top: int) -> torch.Tensor:
        rows = min(step, source.height - top)
        if per_block[0] is None:
            return source.read(top, 0, rows, source.width)
        return _read_needed_columns(source, top, rows, needed_columns(per_block[0], stem, top, rows, source.width),
                                    placement["dtype"])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="band-reader") as reader, \
            tqdm(total=source.height, desc="rows", unit="row", disable=not progress) as bar:
        pending: Future = reader.submit(read, starts[0])
        for index in range(len(starts)):
            rows = pending.result()
            if index + 1 < len(starts):  # read ahead while this band computes
                pending = reader.submit(read, starts[index + 1])
            # channels-last: a band of rows is then one contiguous block, so slicing and joining rows copy
            # nothing they need not, and oneDNN's convolutions run in their native layout.
            chunks = [rows.to(**placement).contiguous(memory_format=torch.channels_last)]
            for stream in streams:
                chunks = [y for chunk in chunks for y in stream.push(chunk)]
            for chunk in chunks:
                if out is None:
                    out = chunk.new_empty((1, chunk.shape[1], heights[-1], chunk.shape[3]))
                out[:, :, filled : filled + chunk.shape[2]] = chunk
                filled += chunk.shape[2]
            bar.update(rows.shape[2])
    if out is None or filled != out.shape[2]:
        raise RuntimeError(f"band streaming produced {filled} output rows, expected "
                           f"{None if out is None else out.shape[2]}")
    return out


class _TransposedSource:
    """``source`` with its two axes swapped: rows of this one are columns of the slide."""

    def __init__(self, source: ImageSource):
        self.source, self.height, self.width = source, source.width, source.height

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        return self.source.read(left, top, width, height).transpose(2, 3)


def _transposed_blocks(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """Copies of ``blocks`` with every convolution kernel transposed: ``f_T(x.T) == f(x).T``."""
    copies = [copy.deepcopy(block) for block in blocks]
    with torch.no_grad():
        for block in copies:
            for module in block.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.copy_(module.weight.transpose(2, 3).contiguous())
    return copies


def stream_along_longer_side(blocks: Sequence[nn.Module], source: ImageSource, *, band: int = DEFAULT_BAND,
                             progress: bool = False, needed: np.ndarray | None = None) -> torch.Tensor:
    """:func:`band_forward` along the image's longer side: for a wide image, over the columns (transposed
    image and kernels, the map transposed back), so that a band spans the shorter side."""
    if source.width <= source.height:
        return band_forward(blocks, source, band=band, progress=progress, needed=needed)
    out = band_forward(_transposed_blocks(blocks), _TransposedSource(source), band=band, progress=progress,
                       needed=None if needed is None else np.ascontiguousarray(needed.T))
    return out.transpose(2, 3).contiguous()


def weights_placement(blocks: Sequence[nn.Module]) -> dict:
    """Device and dtype of the blocks' weights: where (and in what precision) their input must be."""
    for block in blocks:
        for parameter in block.parameters():
            return {"device": parameter.device, "dtype": parameter.dtype}
    return {"device": torch.device("cpu"), "dtype": torch.float32}


def band_forward_bytes(blocks: Sequence[nn.Module], height: int, width: int, band: int, *,
                       folded: bool = True) -> int:
    """Peak bytes of :func:`stream_along_longer_side` over a ``height``×``width`` image (float32, an estimate).

    Two read-ahead bands of the image, the output map, and the largest block window: its input buffer plus
    what the block holds at once (:func:`~.geometry.forward_peak_numel`). Bands span the shorter side.
    """
    blocks = list(blocks)
    height, width = max(height, width), min(height, width)
    step = _read_rows(blocks, band)
    heights = block_input_lengths(blocks, height)
    widths = block_input_lengths(blocks, width)
    peak_window = 0
    channels = 3
    for block, h, w in zip(blocks, heights, widths, strict=False):
        geometry = block_geometry([block])
        stride, first, last = footprint(geometry)
        rows = min(h, (band - 1) * stride + last - first + 1 + stride)  # a window's input and a pushed chunk
        held = forward_peak_numel([block], rows, w, folded=folded, in_channels=channels)
        peak_window = max(peak_window, FLOAT_BYTES * (2 * channels * rows * w + held))
        channels = getattr(block, "out_channels", channels)
    image_bands = 2 * FLOAT_BYTES * 3 * min(height, step) * width
    out_map = FLOAT_BYTES * channels * heights[-1] * widths[-1]
    return image_bands + peak_window + out_map


def band_for_budget(blocks: Sequence[nn.Module], height: int, width: int, memory_budget: int, *,
                    folded: bool = True) -> int:
    """The largest band (at most :data:`DEFAULT_BAND`, at least :data:`MIN_BAND`) whose
    :func:`band_forward_bytes` fits ``memory_budget`` bytes."""
    band = DEFAULT_BAND
    while band > MIN_BAND and band_forward_bytes(blocks, height, width, band, folded=folded) > memory_budget:
        band //= 2
    return max(band, MIN_BAND)
