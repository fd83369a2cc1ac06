"""Cutting the trunk into K gradient-isolated modules.

The trunk is a chain of 17 *blocks*: the stem, then the 16 BasicBlocks of layer1..layer4. The paper
groups them into 9 *units* (DESIGN.md §1)::

    U0 = stem  U1..U3 = layer1[0..2]  U4 = layer2[0:2]  U5 = layer2[2:4]
    U6 = layer3[0:3]  U7 = layer3[3:6]  U8 = layer4

A split says where modules 2..K start. It is given as one of

* an int K ∈ {1, 2, 4, 8}: the authors' presets (see ``PRESETS``);
* a list of unit indices, e.g. ``[3, 5, 7]`` = modules start at units 0, 3, 5, 7 (that is K=4);
* ``BlockBoundaries([...])``: block indices (1..16), finer — what :func:`balanced_split` returns.

Modules are ``nn.Sequential``\\ s of the trunk's own blocks (references, not copies): the trunk's state
dict stays the single source of truth.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wsilocal.errors import ConfigError
from wsilocal.models.memory import SavedTensorMeter
from wsilocal.models.resnet import LAYER_BLOCKS, ResNet34Trunk

N_UNITS = 9
N_BLOCKS = 1 + sum(LAYER_BLOCKS)
UNIT_FIRST_BLOCK = (0, 1, 2, 3, 4, 6, 8, 11, 14)  # the block each unit U0..U8 starts at
PRESETS = {1: (), 2: (5,), 4: (3, 5, 7), 8: (2, 3, 4, 5, 6, 7, 8)}  # K → unit boundaries


@dataclass(frozen=True)
class BlockBoundaries:
    """Module boundaries at block granularity: the first block (1..16) of modules 2..K."""

    blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))


Split = int | Sequence[int] | BlockBoundaries


def _check_increasing(values: Sequence[int], low: int, high: int, what: str) -> tuple[int, ...]:
    values = tuple(values)
    valid = (all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values)
             and all(a < b for a, b in zip(values, values[1:], strict=False)))
    if not valid:
        raise ConfigError(f"split: {what} must be strictly increasing integers in {low}..{high}, "
                          f"got {list(values)}")
    return values


def block_boundaries(split: Split) -> tuple[int, ...]:
    """The first block of modules 2..K for any form of ``split`` (validated, ConfigError if invalid)."""
    if isinstance(split, BlockBoundaries):
        return _check_increasing(split.blocks, 1, N_BLOCKS - 1, "block boundaries")
    if isinstance(split, int) and not isinstance(split, bool):
        if split not in PRESETS:
            raise ConfigError(f"split: K must be one of {sorted(PRESETS)} (or give explicit boundaries), "
                              f"got {split}")
        return tuple(UNIT_FIRST_BLOCK[u] for u in PRESETS[split])
    if isinstance(split, Sequence) and not isinstance(split, str):
        units = _check_increasing(split, 1, N_UNITS - 1, "unit boundaries")
        return tuple(UNIT_FIRST_BLOCK[u] for u in units)
    raise ConfigError(f"split: expected K, a list of unit boundaries or BlockBoundaries, got {split!r}")


def block_name(index: int) -> str:
    """``stem`` for block 0, else ``layerL[i]``."""
    if index == 0:
        return "stem"
    rest = index - 1
    for layer, n_blocks in enumerate(LAYER_BLOCKS, start=1):
        if rest < n_blocks:
            return f"layer{layer}[{rest}]"
        rest -= n_blocks
    raise IndexError(index)


@dataclass(frozen=True)
class ModuleSpec:
    """What the auxiliary models need to know about module ``index`` (0-based) of a split."""

    index: int
    first_block: int
    stop_block: int  # exclusive
    c_in: int
    c_out: int
    stride: int  # of its output relative to its input
    in_stride: int  # of its input relative to the image
    is_last: bool

    @property
    def out_stride(self) -> int:
        """Stride of the module's output relative to the image."""
        return self.in_stride * self.stride

    @property
    def units(self) -> tuple[int, ...] | None:
        """The units U_i it consists of, or None if its boundaries fall inside a unit."""
        bounds = UNIT_FIRST_BLOCK + (N_BLOCKS,)
        if self.first_block not in bounds or self.stop_block not in bounds:
            return None
        return tuple(range(bounds.index(self.first_block), bounds.index(self.stop_block)))

    def label(self) -> str:
        """E.g. ``U3+U4 (layer1[2]..layer2[1])``."""
        first, last = block_name(self.first_block), block_name(self.stop_block - 1)
        blocks = first if first == last else f"{first}..{last}"
        units = self.units
        return blocks if units is None else "+".join(f"U{u}" for u in units) + f" ({blocks})"


def module_specs(trunk: ResNet34Trunk, split: Split) -> list[ModuleSpec]:
    """Channels, strides and block ranges of each module of ``split``."""
    blocks = trunk.blocks()
    bounds = (0,) + block_boundaries(split) + (len(blocks),)
    specs, in_stride = [], 1
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        c_in, c_out, stride = module_channels([nn.Sequential(*blocks[start:stop])])[0]
        specs.append(ModuleSpec(index, start, stop, c_in, c_out, stride, in_stride, stop == len(blocks)))
        in_stride *= stride
    return specs


class CheckpointedSequential(nn.Sequential):
    """A module that keeps only each block's input for backward and recomputes the block then
    (activation checkpointing per block): less memory for about one extra forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return x


def split_trunk(trunk: ResNet34Trunk, split: Split, *, recompute: bool = False) -> list[nn.Sequential]:
    """The K modules of ``split`` as Sequentials referencing ``trunk``'s blocks.

    Running them one after the other equals ``trunk(x)``. ``recompute=True`` gives
    :class:`CheckpointedSequential`\\ s (same results and gradients, fewer saved bytes).
    """
    blocks = trunk.blocks()
    bounds = (0,) + block_boundaries(split) + (len(blocks),)
    kind = CheckpointedSequential if recompute else nn.Sequential
    return [kind(*blocks[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def module_channels(modules: Sequence[nn.Sequential]) -> list[tuple[int, int, int]]:
    """``(c_in, c_out, stride)`` of each module, stride being its output's relative to its input."""
    result = []
    for module in modules:
        stride = 1
        for block in module:
            stride *= block.stride
        result.append((module[0].in_channels, module[-1].out_channels, stride))
    return result


AuxCost = Callable[[ModuleSpec, torch.Tensor, torch.Tensor], torch.Tensor]
"""``aux_cost(spec, x_in, x_out) -> loss``: runs the auxiliary model (or, for the last module, the
classifier) of a module on its input and output; its saved bytes are counted with the module's."""


class ModuleCostTable:
    """Saved-for-backward bytes of every candidate module ``blocks[start:stop]`` plus its auxiliary model
    at one input size, measured on the ``meta`` device: exact shapes, nothing computed, any size.

    One pass per ``start`` runs the blocks from there on under a :class:`SavedTensorMeter`; after each
    block the meter holds exactly what module ``[start, stop)`` saves. What its auxiliary model adds
    on top depends only on shapes and strides, so it is measured once per distinct case.
    """

    def __init__(self, trunk: ResNet34Trunk, input_hw: tuple[int, int], aux_cost: AuxCost | None):
        self.blocks = copy.deepcopy(trunk).to("meta").blocks()
        self.aux_cost = aux_cost
        self.inputs = [torch.empty(1, 3, *input_hw, device="meta")]
        with torch.no_grad():
            for block in self.blocks:
                self.inputs.append(block(self.inputs[-1]))
        self.in_strides = [1]
        for block in self.blocks:
            self.in_strides.append(self.in_strides[-1] * block.stride)
        self.aux_extra: dict[tuple, int] = {}
        self.costs_from = cache(self._costs_from)

    def cost(self, start: int, stop: int) -> int:
        """Saved bytes of the module made of blocks ``start..stop-1`` (+ its auxiliary model)."""
        return self.costs_from(start)[stop]

    def _costs_from(self, start: int) -> dict[int, int]:
        costs, x_in = {}, self.inputs[start]
        with SavedTensorMeter() as meter:
            x = x_in
            for stop in range(start + 1, len(self.blocks) + 1):
                x = self.blocks[stop - 1](x)
                costs[stop] = meter.current + self._aux_extra(meter, start, stop, x_in, x)
        return costs

    def _aux_extra(self, meter: SavedTensorMeter, start: int, stop: int, x_in: torch.Tensor,
                   x_out: torch.Tensor) -> int:
        if self.aux_cost is None:
            return 0
        stride = self.in_strides[stop] // self.in_strides[start]
        spec = ModuleSpec(0, start, stop, x_in.shape[1], x_out.shape[1], stride, self.in_strides[start],
                          stop == len(self.blocks))
        key = (tuple(x_in.shape), tuple(x_out.shape), stride, spec.in_stride, spec.is_last, meter.holds(x_out))
        if key not in self.aux_extra:
            before = meter.current
            loss = self.aux_cost(spec, x_in, x_out)
            self.aux_extra[key] = meter.current - before
            del loss  # frees the auxiliary graph: the meter is back to the module's own bytes
        return self.aux_extra[key]


def module_saved_bytes(trunk: ResNet34Trunk, split: Split, input_hw: tuple[int, int],
                       aux_cost: AuxCost | None = None) -> list[int]:
    """Bytes each module of ``split`` (plus its ``aux_cost`` model) saves for backward at ``input_hw``.

    This is each module's peak of a training step (modules are trained, and their graphs freed, one
    after another). Measured on the meta device, so it is exact and instant at any slide size.
    """
    table = ModuleCostTable(trunk, input_hw, aux_cost)
    bounds = (0,) + block_boundaries(split) + (N_BLOCKS,)
    return [table.cost(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def balanced_split(trunk: ResNet34Trunk, k: int, input_hw: tuple[int, int],
                   aux_cost: AuxCost | None = None) -> BlockBoundaries:
    """Block boundaries of the K-module split whose largest module (saved bytes of the module plus its
    auxiliary model, as :func:`module_saved_bytes` counts them at ``input_hw``) is as small as possible.

    Exact minimax over all contiguous partitions of the 17 blocks (dynamic programming). Without
    ``aux_cost`` only the trunk's own saved bytes count. The costs assume ``recompute=False``.
    """
    if not (isinstance(k, int) and 1 <= k <= N_BLOCKS):
        raise ConfigError(f"split: K must be an integer in 1..{N_BLOCKS} for a balanced split, got {k!r}")
    cost = ModuleCostTable(trunk, input_hw, aux_cost).cost
    # best[m][j]: (smallest max cost, boundaries) splitting blocks[0:j] into m modules.
    best: list[dict[int, tuple[int, tuple[int, ...]]]] = [{0: (0, ())}]
    for m in range(1, k + 1):
        stops = [N_BLOCKS] if m == k else range(m, N_BLOCKS - (k - m) + 1)
        best.append({
            stop: min((max(best[m - 1][start][0], cost(start, stop)), best[m - 1][start][1] + (start,))
                      for start in best[m - 1] if start < stop)
            for stop in stops
        })
    return BlockBoundaries(best[k][N_BLOCKS][1][1:])
