"""The trunk's map of a whole image: one plain forward when it fits the memory budget and is the faster mode,
band streaming otherwise.

:func:`trunk_forward` is what prediction calls. Both modes give the same map up to float rounding; the mode
only changes memory and time: see :mod:`.bands` and ``docs/benchmarks.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from wsilocal.models.resnet import ResNetTrunk
from wsilocal.stream.bands import (
    DEFAULT_BAND,
    FIXED_OVERHEAD,
    FLOAT_BYTES,
    band_for_budget,
    stream_along_longer_side,
    weights_placement,
)
from wsilocal.stream.geometry import forward_peak_numel
from wsilocal.stream.sources import ImageSource, read_bytes

#: Resident memory per byte that a whole-image forward holds (its activations and the read of the image),
#: measured: the heap keeps what the read and the early layers freed where later, differently sized tensors do not
#: fit. 1.45 is the largest ratio of peak RSS added to that count measured in fresh processes (ResNet18/34/50,
#: 1024²–8192², in memory and from slide files), :data:`~.bands.FIXED_OVERHEAD` beside it: docs/benchmarks.md,
#: *Whole-image memory*.
WHOLE_HEAP_OVERHEAD = 1.45

#: On a CPU the band-streamed forward is the faster one from about a megapixel up — 0.58–0.95× the whole-image
#: forward's time at 1024²–4096² px for ResNet18/34/50, 1.2× at 512² (its memory is always lower): where a whole
#: forward's maps outgrow the caches, bands of 64 rows stay in them. docs/benchmarks.md, *Whole or streamed*.
CPU_STREAM_FROM_PIXELS = 1024 * 1024


def stream_from_pixels(device: torch.device) -> int | None:
    """The image size (pixels) from which :func:`trunk_forward` streams on ``device`` even when the whole image
    fits: :data:`CPU_STREAM_FROM_PIXELS` on a CPU; None (only over the memory budget) elsewhere — on a GPU one
    large forward uses the device best (not measured here)."""
    return CPU_STREAM_FROM_PIXELS if device.type == "cpu" else None


@contextmanager
def inference(blocks: Sequence[nn.Module]) -> Iterator[None]:
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


def forward_bytes_estimate(trunk: ResNetTrunk, height: int, width: int) -> int:
    """Peak bytes of a plain no-grad forward of a ``height``×``width`` image (float32).

    The input plus the most activations alive at once (:func:`~.geometry.forward_peak_numel`: the tensors the
    forward allocates, the residual shortcuts included; not the convolutions' scratch space or the allocator's
    caching): the live tensors, which :func:`whole_forward_bytes` turns into resident memory.
    """
    return FLOAT_BYTES * (3 * height * width + forward_peak_numel(trunk.blocks(), height, width,
                                                                  folded=trunk.fold_bn))


def whole_forward_bytes(trunk: ResNetTrunk, height: int, width: int, *, source: ImageSource | None = None) -> int:
    """Peak resident bytes a whole-image forward of a ``height``×``width`` image adds (an estimate, what chooses
    the mode): the activations of :func:`forward_bytes_estimate` beside what reading the whole image from
    ``source`` holds (:func:`~.sources.read_bytes`, the float32 image included; no ``source``: an image in
    memory), times :data:`WHOLE_HEAP_OVERHEAD`, plus :data:`~.bands.FIXED_OVERHEAD` — the terms
    :func:`~.bands.band_forward_bytes` counts for a band."""
    activations = forward_bytes_estimate(trunk, height, width) - FLOAT_BYTES * 3 * height * width
    return round(WHOLE_HEAP_OVERHEAD * (activations + read_bytes(source, height, width))) + FIXED_OVERHEAD


def trunk_forward(trunk: ResNetTrunk, source: ImageSource, *, memory_budget: int | None = None,
                  band: int | None = None, stream_from: int | None = None, progress: bool = False,
                  needed: np.ndarray | None = None) -> tuple[torch.Tensor, str]:
    """The trunk's map of the image in ``source`` and the mode used, ``"whole"`` or ``"streamed"``.

    Whole-image forward when :func:`whole_forward_bytes` fits ``memory_budget`` bytes (None: always), no
    ``band`` is asked for and the image has fewer than ``stream_from`` pixels (None: any size; a prediction
    passes :func:`stream_from_pixels`, where streaming is the faster mode); otherwise
    :func:`~.bands.stream_along_longer_side` with ``band`` output rows per block window, by default the largest
    that fits the budget (:func:`~.bands.band_for_budget`, with glass skipping and what reading ``source`` holds
    counted: :func:`~.bands.band_memory_terms`; no budget: :data:`~.bands.DEFAULT_BAND`). Streamed, ``needed``
    (bool (h, w) of the map, e.g. H's tissue positions) skips what no needed position depends on (zeros there);
    the whole-image forward computes everything.
    """
    blocks = trunk.blocks()
    whole_fits = memory_budget is None or \
        whole_forward_bytes(trunk, source.height, source.width, source=source) <= memory_budget
    streaming_is_faster = stream_from is not None and source.height * source.width >= stream_from
    with inference([trunk]):
        if whole_fits and band is None and not streaming_is_faster:
            image = source.read(0, 0, source.height, source.width).to(**weights_placement([trunk]))
            return trunk(image), "whole"
        if band is None:
            band = DEFAULT_BAND if memory_budget is None else band_for_budget(
                blocks, source.height, source.width, memory_budget, folded=trunk.fold_bn,
                masked=needed is not None, source=source)
        return stream_along_longer_side(blocks, source, band=band, progress=progress, needed=needed), "streamed"
