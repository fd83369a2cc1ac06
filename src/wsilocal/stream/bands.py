"""Band streaming: the trunk over an image of any height, exact, without recomputing the trunk's halo.

The window forward (:mod:`.geometry`'s plans, which streamed training uses) gives every window the halo of the
*whole* run of blocks: 672 px each side for the stride-3 trunk, recomputed by every window. Here the image
goes through the trunk in horizontal bands instead, each block on its own:

* the image is read ``band`` stem rows at a time (:func:`_read_steps`), and every block runs, on the steps that
  give it about ``band`` new output rows (:class:`_RowPlan`), windows over every output row its input so far
  determines exactly (at most ``band`` rows each, the same formulas as :func:`~.geometry.plan_axis`); the
  window's exact rows go on to the next block, and the block keeps only its halo;
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
tested in float64 against the whole-image forward. Peak memory: about one block window (input rows × width ×
channels, bounded by ``band``) with what its forward makes, the rows waiting in the other blocks, two image
bands and the output map — :func:`band_memory_terms` replays the plan to count them, and
:func:`band_forward_bytes` adds the heap's overhead, measured.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
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
from wsilocal.stream.sources import ImageSource, read_bytes

FLOAT_BYTES = 4
#: Output rows per window of every block, unless a memory budget asks for fewer (:func:`band_for_budget`).
DEFAULT_BAND = 64
#: The smallest band a budget may choose: below it the per-block halos are a large part of the work.
MIN_BAND = 8
#: Windows the stem runs per read band (see :func:`_row_plans`).
STEM_SPLIT = 2


class _RowPlan:
    """The row bookkeeping of one block's stream, without tensors: which windows run as its input rows arrive.

    Input rows arrive in order (``receive``); every ``period`` read steps, and once the whole input has arrived,
    the block runs windows over every output row its rows so far determine exactly (``windows``), at most
    ``band`` output rows each, and drops the rows no later window reads. ``period`` is the block's output stride
    over the stem's: the stem gives ``band`` rows per read step, so a layer2 block runs every second step, a
    layer4 block every eighth, each on about ``band`` output rows — the halo's share stays that of a ``band``-row
    window in every block. Running on *everything* computable, not on a fixed grid, keeps each block only its
    own halo behind the block before it: a grid of fixed ``band``-row windows makes every block wait for one more
    window of its input (two windows held) because of the previous block's halo lag.

    The engine (:class:`_BlockStream`) and the memory count (:func:`band_memory_terms`) both run this plan, so
    the rows the count adds up are those the engine holds.
    """

    def __init__(self, geometry: Sequence[tuple[int, int, int]], length: int, band: int, period: int):
        self.geometry = list(geometry)
        self.stride, self.first, self.last = footprint(self.geometry)
        self.length, self.out_length = length, output_length(length, self.geometry)
        self.band, self.period = band, period
        self.arrived = 0  # input rows received
        self.start = 0  # the first input row still held
        self.kept = 0  # output rows given out

    def receive(self, rows: int) -> None:
        """``rows`` more input rows arrived."""
        self.arrived += rows
        if self.arrived > self.length:
            raise RuntimeError(f"{self.arrived} input rows arrived for an input of {self.length}")

    def windows(self, step: int) -> list[AxisWindow]:
        """The windows to run after read step ``step`` (from 1): on the block's steps, every exact output row not
        given out yet, in windows of at most ``band`` rows of about equal size; then the rows before the next
        window's first input row are dropped."""
        done = self.arrived >= self.length
        if not done and step % self.period:
            return []
        stop = self.out_length if done else min(self.out_length,
                                                max(0, (self.arrived - 1 - self.last) // self.stride + 1))
        windows: list[AxisWindow] = []
        count = -(-(stop - self.kept) // self.band)  # windows of at most `band` rows, sizes as equal as can be
        for index in range(count):
            keep0 = self.kept + (stop - self.kept) * index // count
            keep1 = self.kept + (stop - self.kept) * (index + 1) // count
            # As plan_axis: the first kept row's footprint starts inside the window (the window starting on the
            # stride grid), the last one's ends inside it, or the window reaches the input's edge.
            in0 = max(0, (keep0 * self.stride + self.first) // self.stride * self.stride)
            in1 = min(self.length, (keep1 - 1) * self.stride + self.last + 1)
            out0 = in0 // self.stride
            windows.append((in0, in1, out0, out0 + output_length(in1 - in0, self.geometry), keep0, keep1))
        self.kept = max(self.kept, stop)
        self.start = (self.arrived if self.kept >= self.out_length
                      else max(self.start, (self.kept * self.stride + self.first) // self.stride * self.stride))
        return windows


def _halo_rows(plan: _RowPlan, rows: int) -> int:
    """Rows of a block's halo storage: the most a block keeps after a run (its footprint's span and one
    stride: :class:`_RowPlan` runs every exact row), or ``rows`` if more."""
    return max(rows, plan.last - plan.first + plan.stride)


class _Scratch:
    """One storage that the blocks' joined input rows take turns in (one block runs at a time)."""

    def __init__(self, placement: dict):
        self.placement = placement
        self.storage: torch.Tensor | None = None

    def rows(self, channels: int, rows: int, width: int) -> torch.Tensor:
        """An uninitialised channels-last (1, channels, rows, width) tensor on the storage (grown if short)."""
        numel = channels * rows * width
        if self.storage is None or self.storage.numel() < numel:
            self.storage = None
            self.storage = torch.empty(numel, **self.placement)
        return self.storage[:numel].view(1, rows, width, channels).permute(0, 3, 1, 2)


class _BlockStream:
    """One block, run window by window over the rows of its input as they arrive (:class:`_RowPlan` says which).

    Between its windows a block holds only the rows a later window reads again (its halo, a few rows, copied
    into a small storage of its own) and the rows that arrived since (the previous block's outputs, as they
    came). When its windows run those are joined into ``scratch``, one channels-last storage that all blocks take
    turns in: so at any moment only the running block holds a full window's input, not every block of the trunk,
    and the heap sees no new buffer per run (one storage reused keeps glibc's heap from fragmenting the way
    buffers of a dozen sizes allocated and freed in turn do: the peak resident memory then varied by up to 1.6×
    between identical runs).

    ``needed`` (bool (h, w) of the block's output, None: all) limits the work to the output positions later
    blocks need: a window computes only the column segments its kept rows need (each with its own column halo,
    as a row window has), and a window needing none is not run; the rest of its output is zeros.
    """

    def __init__(self, block: nn.Module, plan: _RowPlan, placement: dict, needed: np.ndarray | None = None,
                 scratch: _Scratch | None = None):
        self.block, self.plan, self.placement = block, plan, placement
        self.scratch = scratch if scratch is not None else _Scratch(placement)
        self.halo: torch.Tensor | None = None
        self.stride, self.first, self.last = plan.stride, plan.first, plan.last
        self.pending: list[torch.Tensor] = []  # the rows from plan.start on, in order: the halo, then arrivals
        self.needed = needed
        # A gap of fewer columns than a segment's halo is computed rather than cut: cutting costs the halo again.
        self.min_gap = -(-(plan.last - plan.first + 1) // plan.stride)

    def receive(self, rows: torch.Tensor) -> None:
        """Append ``rows`` (the input's next rows, (1, C, n, W)); they are kept as they are until the block runs."""
        self.plan.receive(rows.shape[2])
        self.pending.append(rows)

    def run(self, step: int, sink: Callable[[torch.Tensor], None]) -> None:
        """Run the windows :meth:`_RowPlan.windows` gives after read step ``step``, each window's exact output
        rows handed to ``sink`` as soon as computed; then keep only the rows a later window reads."""
        start, arrived = self.plan.start, self.plan.arrived
        windows = self.plan.windows(step)
        if not windows:
            return
        first = self.pending[0]
        # channels-last: a band of rows is then one contiguous block, so a window is a view of it, and oneDNN's
        # convolutions run in their native layout. copy_ converts device, dtype and layout on the way.
        buffer = self.scratch.rows(first.shape[1], arrived - start, first.shape[3])
        offset = 0
        for rows in self.pending:
            buffer[:, :, offset : offset + rows.shape[2]].copy_(rows)
            offset += rows.shape[2]
        self.pending, rows, first = [], None, None  # the pieces are in the buffer: free them before the windows run
        for in0, in1, out0, out1, keep0, keep1 in windows:
            x = buffer[:, :, in0 - start : in1 - start]
            if self.needed is None:
                y = self.block(x)
                if y.shape[2] != out1 - out0:
                    raise RuntimeError(f"band plan expected {out1 - out0} output rows, the block gave {y.shape[2]}")
                sink(y[:, :, keep0 - out0 : keep1 - out0])
            else:
                sink(self._needed_rows(x, self.needed, out0, keep0, keep1))
            y = None  # the window's output is the next block's now (or written into the map): drop this reference
        if self.plan.start < arrived:  # the halo, copied out: the scratch is the next block's
            halo = buffer[:, :, self.plan.start - start :]
            if self.halo is None or self.halo.shape[2] < halo.shape[2]:  # allocated once, at the first run
                self.halo = torch.empty((1, halo.shape[1], _halo_rows(self.plan, halo.shape[2]), halo.shape[3]),
                                        **self.placement, memory_format=torch.channels_last)
            self.halo[:, :, : halo.shape[2]].copy_(halo)
            self.pending = [self.halo[:, :, : halo.shape[2]]]

    def _needed_rows(self, x: torch.Tensor, needed: np.ndarray, out0: int, keep0: int, keep1: int) -> torch.Tensor:
        """Output rows ``[keep0, keep1)`` of the window input ``x`` (its first output row ``out0``), computed
        where ``needed`` asks for them and zero elsewhere."""
        out_width = needed.shape[1]
        segments = _segments(needed[keep0:keep1].any(axis=0), self.min_gap)
        if segments == [(0, out_width)]:  # the whole width: one plain window
            return self.block(x)[:, :, keep0 - out0 : keep1 - out0]
        result = torch.empty((1, self.block.out_channels, keep1 - keep0, out_width), dtype=x.dtype, device=x.device,
                             memory_format=torch.channels_last).zero_()
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
    if not segments:
        return torch.zeros((1, 3, rows, source.width), dtype=dtype)
    band = None
    for c0, c1 in segments:  # each piece written into the band as soon as read: one piece alive at a time
        piece = source.read(top, c0, rows, c1 - c0)
        if band is None:
            band = piece.new_zeros((1, piece.shape[1], rows, source.width))
        band[:, :, :, c0:c1] = piece
    return band


def block_input_lengths(blocks: Sequence[nn.Module], height: int) -> list[int]:
    """The input length of each block along an axis of ``height`` pixels (the last entry: the output's)."""
    heights = [height]
    for block in blocks:
        heights.append(output_length(heights[-1], block_geometry([block])))
    return heights


def _periods(blocks: Sequence[nn.Module]) -> list[int]:
    """Per block, the read steps between its windows: its output stride over the stem's (see :class:`_RowPlan`)."""
    strides = [footprint(block_geometry(list(blocks[: index + 1])))[0] for index in range(len(blocks))]
    return [max(1, stride // strides[0]) for stride in strides]


def _read_steps(blocks: Sequence[nn.Module], height: int, band: int) -> list[int]:
    """Image rows read per step: up to the last input row of the stem's next ``band``-row window (the first
    read a little more, the rest ``band`` × the stem's stride), so that every read lets the stem run one window
    and the stem holds no more than that window's input. The last read reaches the image's end."""
    geometry = block_geometry([blocks[0]])
    stops = [window[1] for window in plan_axis(height, band * footprint(geometry)[0], geometry)]
    stops[-1] = height
    return [stop - previous for previous, stop in zip([0, *stops], stops, strict=False) if stop > previous]


def _row_plans(blocks: Sequence[nn.Module], height: int, band: int) -> list[_RowPlan]:
    """A fresh :class:`_RowPlan` per block for an image of ``height`` rows.

    The stem runs each read band in :data:`STEM_SPLIT` windows (of at least :data:`MIN_BAND` rows): its window
    would otherwise be the largest of the trunk by far (conv1's output has 4× the elements per image row of any
    later block's tensors, and its max-pooling keeps int64 indices beside its output); the extra halo is one row
    of conv1's output per window.
    """
    lengths = block_input_lengths(blocks, height)
    bands = [min(band, max(MIN_BAND, band // STEM_SPLIT))] + [band] * (len(blocks) - 1)
    return [_RowPlan(block_geometry([block]), length, rows, period)
            for block, length, rows, period in zip(blocks, lengths, bands, _periods(blocks), strict=False)]


def band_forward(blocks: Sequence[nn.Module], source: ImageSource, *, band: int = DEFAULT_BAND,
                 progress: bool = False, needed: np.ndarray | None = None) -> torch.Tensor:
    """Run ``blocks`` (trunk blocks, in order, eval mode, no gradients wanted) over ``source`` band by band.

    Returns the (1, C, h, w) map the blocks give on the whole image, equal to it up to float rounding. Each
    band is moved to the device and dtype of the blocks' weights; the next band is read in a background
    thread while this one computes. ``band``: output rows per window of every block (at most).

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
    scratch = _Scratch(placement)
    streams = [_BlockStream(block, plan, placement, n, scratch)
               for block, plan, n in zip(blocks, _row_plans(blocks, source.height, band), per_block, strict=False)]
    reads = _read_steps(blocks, source.height, band)
    tops = [sum(reads[:index]) for index in range(len(reads))]
    out: torch.Tensor | None = None
    filled = 0
    stem = block_geometry([blocks[0]])

    def read(top: int, rows: int) -> torch.Tensor:
        if per_block[0] is None:
            return source.read(top, 0, rows, source.width)
        return _read_needed_columns(source, top, rows, needed_columns(per_block[0], stem, top, rows, source.width),
                                    placement["dtype"])

    def write_out(chunk: torch.Tensor) -> None:
        nonlocal out, filled
        if out is None:
            out = chunk.new_empty((1, chunk.shape[1], heights[-1], chunk.shape[3]))
        out[:, :, filled : filled + chunk.shape[2]] = chunk
        filled += chunk.shape[2]

    sinks = [stream.receive for stream in streams[1:]] + [write_out]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="band-reader") as reader, \
            tqdm(total=source.height, desc="rows", unit="row", disable=not progress) as bar:
        pending: Future = reader.submit(read, tops[0], reads[0])
        for index in range(len(reads)):
            rows = pending.result()
            if index + 1 < len(reads):  # read ahead while this band computes
                pending = reader.submit(read, tops[index + 1], reads[index + 1])
            streams[0].receive(rows)
            rows = None  # the stem's now: freed once the stem has copied it into its buffer
            for stream, sink in zip(streams, sinks, strict=True):
                stream.run(index + 1, sink)
            bar.update(reads[index])
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


def band_memory_terms(blocks: Sequence[nn.Module], height: int, width: int, band: int, *,
                      folded: bool = True, masked: bool = False,
                      source: ImageSource | None = None) -> dict[str, int]:
    """The bytes of the tensors :func:`stream_along_longer_side` holds at its peak over a ``height``×``width``
    image, by term (float32; bands span the shorter side).

    A replay of the engine without tensors: the same row plans (:class:`_RowPlan`) run step by step, and at every
    moment where memory can peak (a band read, a block's buffer joined, each window's forward, its halo copied
    out) the live tensors are added up; the terms of the largest moment are returned:

    * ``pending``: the rows that arrived at each block since it last ran (the previous block's window outputs,
      each with its recomputed halo rows; the stem: the band just read). The stride-2 blocks that start
      layer2–4 gather about ``band`` of their output rows' worth of input (2 ``band`` rows) over several read
      steps; the other blocks run as soon as their rows arrive;
    * ``halos``: every block's halo, the few rows a later window reads again, in a storage of its own;
    * ``buffer``: the one storage the running block's rows are joined in (the largest join so far);
    * ``window``: what the running window's forward holds beyond its input (:func:`~.geometry.forward_peak_numel`,
      its output included); ``masked`` (glass skipped): plus the window's input copied per column segment and
      its full-width output rows;
    * ``folded_weight``: the running convolution's weight with BatchNorm folded in (a tensor made per call;
      folded only), the block's largest;
    * ``onednn_weight``: oneDNN's copy of a convolution's weight in its blocked layout, made per call (not a
      tensor), counted throughout as the trunk's largest;
    * ``image``: the next image band, read in the reader thread meanwhile: what reading it holds at its peak
      (:func:`~.sources.read_bytes` of ``source``, e.g. a slide's resampler at work; without a ``source``, an
      in-memory image's uint8 copy beside the float32 band); ``masked``: plus the zeroed band its column
      segments are written into;
    * ``out_map``: the trunk's output map (allocated at the first output rows, counted throughout);
    * ``needed``: ``masked``, the bool maps of the positions each block computes (one byte each);
    * ``transposed``: for an image wider than tall, the transposed copies of the blocks' weights — unless the
      peak is the end, where the map is transposed back beside the streamed one (``out_map`` then counts both).

    :func:`band_forward_bytes` turns the count into resident memory (:data:`HEAP_OVERHEAD`, :data:`FIXED_OVERHEAD`).
    """
    blocks = list(blocks)
    count = len(blocks)
    wide = width > height
    height, width = max(height, width), min(height, width)
    plans = _row_plans(blocks, height, band)
    heights, widths = block_input_lengths(blocks, height), block_input_lengths(blocks, width)
    channels = [3]
    for block in blocks:
        channels.append(getattr(block, "out_channels", channels[-1]))
    row = [c * w for c, w in zip(channels, widths, strict=True)]  # elements per input row of each block
    # Each convolution call makes a weight-sized copy, BatchNorm folded in (folded only), and oneDNN reorders the
    # weight into its blocked layout (not a tensor: invisible to a count of tensors, visible in the heap).
    weights = [max((m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d)), default=0)
               for block in blocks]
    reads = _read_steps(blocks, height, band)
    rows = max(reads)
    # A wide image is read through its transpose: a read of `rows` columns of the source, over its whole height.
    reading = read_bytes(source, width, rows) if wide else read_bytes(source, rows, width)
    pixels = 3 * rows * width
    constant = {"onednn_weight": max(weights),
                "image": -(-reading // FLOAT_BYTES) + (pixels if masked else 0),
                "out_map": row[-1] * heights[-1],
                "needed": sum(h * w for h, w in zip(heights[1:], widths[1:], strict=True)) // FLOAT_BYTES
                if masked else 0,
                "transposed": sum(p.numel() for block in blocks for p in block.parameters()) if wide else 0}
    pending = [0] * count  # per block, the rows arrived since it last ran, as they are stored
    halos = [0] * count  # per block, its halo's storage, from its first run on
    scratch = 0  # the storage the running block's rows are joined in: the largest join so far
    peak: dict[str, int] = {}

    def moment(**transient: int) -> None:
        terms = {"pending": sum(pending), "halos": sum(halos), "buffer": scratch, "window": 0, "folded_weight": 0,
                 **constant, **transient}
        if sum(terms.values()) > sum(peak.values(), -1):
            peak.clear()
            peak.update(terms)

    for step, rows in enumerate(reads, start=1):
        plans[0].receive(rows)
        pending[0] += rows * row[0]
        moment()  # the band just read beside the next one
        for index, (block, plan) in enumerate(zip(blocks, plans, strict=True)):
            start, arrived = plan.start, plan.arrived
            windows = plan.windows(step)
            if not windows:
                continue
            scratch = max(scratch, (arrived - start) * row[index])
            moment()  # joined beside its pieces
            pending[index] = 0
            for in0, in1, out0, out1, keep0, keep1 in windows:
                work = forward_peak_numel([block], in1 - in0, widths[index], folded=folded,
                                          in_channels=channels[index])
                if masked:
                    work += (in1 - in0) * row[index] + (keep1 - keep0) * row[index + 1]
                moment(window=work, folded_weight=weights[index] if folded else 0)
                if index + 1 < count:  # the window's output waits in the next block
                    plans[index + 1].receive(keep1 - keep0)
                    pending[index + 1] += (out1 - out0) * row[index + 1]
            if plan.start < plan.arrived:
                halos[index] = max(halos[index], _halo_rows(plan, plan.arrived - plan.start) * row[index])
                moment()
    if any(plan.kept != plan.out_length for plan in plans):
        raise RuntimeError("band plan left output rows uncomputed")
    if wide:  # the end: the map transposed back beside the streamed one, nothing else left
        end = {name: 0 for name in peak}
        end["out_map"] = 2 * constant["out_map"]
        if sum(end.values()) > sum(peak.values()):
            peak = end
    return {name: FLOAT_BYTES * numel for name, numel in peak.items()}


#: Resident memory per byte that :func:`band_memory_terms` counts, measured: glibc's heap, which
#: ``tune_cpu_allocator`` keeps from handing freed memory back, grows past what is live (a freed block is reused only
#: where a later one fits), in the main thread's arena and the reader's. 2.2 is the largest ratio of peak RSS added
#: to the count measured in fresh processes (ResNet34, 2048²–8192² in memory and from slide files, bands 8–64), with
#: :data:`FIXED_OVERHEAD` beside it: docs/benchmarks.md, *Band streaming memory*.
HEAP_OVERHEAD = 2.2
#: Resident memory a streamed prediction adds that does not grow with the band, measured with
#: :data:`HEAP_OVERHEAD`: oneDNN's primitives and JIT code for the windows' shapes, the first prediction's thread
#: pools, what the tissue detection before the forward leaves in the heap.
FIXED_OVERHEAD = 96 * 2**20


def band_forward_bytes(blocks: Sequence[nn.Module], height: int, width: int, band: int, *,
                       folded: bool = True, masked: bool = False, source: ImageSource | None = None) -> int:
    """Peak bytes of :func:`stream_along_longer_side` over a ``height``×``width`` image (float32, an estimate of
    the resident memory it adds): the count of :func:`band_memory_terms` (``masked``: glass skipped; ``source``:
    what is read, for what reading costs) times :data:`HEAP_OVERHEAD` — the transposed weights of a wide image,
    allocated once before the bands, at face value — plus :data:`FIXED_OVERHEAD`."""
    terms = band_memory_terms(blocks, height, width, band, folded=folded, masked=masked, source=source)
    once = terms["transposed"]
    return round(HEAP_OVERHEAD * (sum(terms.values()) - once)) + once + FIXED_OVERHEAD


def band_for_budget(blocks: Sequence[nn.Module], height: int, width: int, memory_budget: int, *,
                    folded: bool = True, masked: bool = False, source: ImageSource | None = None) -> int:
    """The largest band (a power of two, at most :data:`DEFAULT_BAND`, at least :data:`MIN_BAND`) whose
    :func:`band_forward_bytes` fits ``memory_budget`` bytes."""
    band = DEFAULT_BAND
    while band > MIN_BAND and band_forward_bytes(blocks, height, width, band, folded=folded, masked=masked,
                                                 source=source) > memory_budget:
        band //= 2
    return max(band, MIN_BAND)
