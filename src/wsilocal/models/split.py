"""Cutting the trunk into K gradient-isolated modules.

The trunk is a chain of *blocks*: the stem, then the residual blocks of layer1..layer4 (17 for ResNet34 and
ResNet50, whose layers both have 3-4-6-3 blocks; 9 for ResNet18's 2-2-2-2). The paper groups ResNet34's into
9 *units* (DESIGN.md §1), and ResNet50's Bottleneck blocks are grouped the same way::

    U0 = stem  U1..U3 = layer1[0..2]  U4 = layer2[0:2]  U5 = layer2[2:4]
    U6 = layer3[0:3]  U7 = layer3[3:6]  U8 = layer4

ResNet18's 9 blocks are its 9 units, one each (U0 = stem, U1 = layer1[0], ..., U8 = layer4[1]), so the same
unit presets give it the same shape of split: K=4 is then one module per stage (the stem in the first).

A split says where modules 2..K start. It is given as one of

* an int K ∈ {1, 2, 4, 8}: the authors' presets (see ``PRESETS``), in units of the trunk's architecture;
* a list of unit indices, e.g. ``[3, 5, 7]`` = modules start at units 0, 3, 5, 7 (that is K=4);
* ``BlockBoundaries([...])``: block indices (1..16; 1..8 for ResNet18), finer — what :func:`balanced_split`
  returns.

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
from wsilocal.models.resnet import DEFAULT_ARCH, Arch, ResNetTrunk, get_arch

N_UNITS = 9
#: The block each unit U0..U8 starts at, per architecture (see the module docstring).
UNIT_FIRST_BLOCKS = {
    "resnet18": (0, 1, 2, 3, 4, 5, 6, 7, 8),
    "resnet34": (0, 1, 2, 3, 4, 6, 8, 11, 14),
    "resnet50": (0, 1, 2, 3, 4, 6, 8, 11, 14),
}
UNIT_FIRST_BLOCK = UNIT_FIRST_BLOCKS[DEFAULT_ARCH]  # ResNet34's, the paper's
N_BLOCKS = get_arch(DEFAULT_ARCH).n_blocks
PRESETS = {1: (), 2: (5,), 4: (3, 5, 7), 8: (2, 3, 4, 5, 6, 7, 8)}  # K → unit boundaries


def _arch(arch: str | Arch) -> Arch:
    return arch if isinstance(arch, Arch) else get_arch(arch)


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


def block_boundaries(split: Split, arch: str | Arch = DEFAULT_ARCH) -> tuple[int, ...]:
    """The first block of modules 2..K of ``arch``'s trunk for any form of ``split`` (validated, ConfigError if
    invalid)."""
    arch = _arch(arch)
    unit_first_block = UNIT_FIRST_BLOCKS[arch.name]
    if isinstance(split, BlockBoundaries):
        return _check_increasing(split.blocks, 1, arch.n_blocks - 1, "block boundaries")
    if isinstance(split, int) and not isinstance(split, bool):
        if split not in PRESETS:
            raise ConfigError(f"split: K must be one of {sorted(PRESETS)} (or give explicit boundaries), "
                              f"got {split}")
        return tuple(unit_first_block[u] for u in PRESETS[split])
    if isinstance(split, Sequence) and not isinstance(split, str):
        units = _check_increasing(split, 1, N_UNITS - 1, "unit boundaries")
        return tuple(unit_first_block[u] for u in units)
    raise ConfigError(f"split: expected K, a list of unit boundaries or BlockBoundaries, got {split!r}")


def block_position(index: int, arch: str | Arch = DEFAULT_ARCH) -> tuple[int, int]:
    """``(layer, i)`` of block ``index`` of ``arch``'s trunk: ``(0, 0)`` for the stem, else ``layerL[i]``."""
    if index == 0:
        return 0, 0
    rest = index - 1
    for layer, n_blocks in enumerate(_arch(arch).layer_blocks, start=1):
        if rest < n_blocks:
            return layer, rest
        rest -= n_blocks
    raise IndexError(index)


def block_name(index: int, arch: str | Arch = DEFAULT_ARCH) -> str:
    """``stem`` for block 0, else ``layerL[i]``."""
    layer, i = block_position(index, arch)
    return "stem" if layer == 0 else f"layer{layer}[{i}]"


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
    arch: str = DEFAULT_ARCH  # the trunk's architecture, whose blocks the indices count

    @property
    def out_stride(self) -> int:
        """Stride of the module's output relative to the image."""
        return self.in_stride * self.stride

    @property
    def level(self) -> int:
        """Resolution level of its output: 0 at layer1's resolution (the stem's too), up to 3 at layer4's."""
        return max(0, block_position(self.stop_block - 1, self.arch)[0] - 1)

    @property
    def units(self) -> tuple[int, ...] | None:
        """The units U_i it consists of, or None if its boundaries fall inside a unit."""
        bounds = UNIT_FIRST_BLOCKS[self.arch] + (get_arch(self.arch).n_blocks,)
        if self.first_block not in bounds or self.stop_block not in bounds:
            return None
        return tuple(range(bounds.index(self.first_block), bounds.index(self.stop_block)))

    def label(self) -> str:
        """E.g. ``U3+U4 (layer1[2]..layer2[1])``."""
        first, last = block_name(self.first_block, self.arch), block_name(self.stop_block - 1, self.arch)
        blocks = first if first == last else f"{first}..{last}"
        units = self.units
        return blocks if units is None else "+".join(f"U{u}" for u in units) + f" ({blocks})"


def module_specs(trunk: ResNetTrunk, split: Split) -> list[ModuleSpec]:
    """Channels, strides and block ranges of each module of ``split``."""
    blocks = trunk.blocks()
    bounds = (0,) + block_boundaries(split, trunk.arch) + (len(blocks),)
    specs, in_stride = [], 1
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        c_in, c_out, stride = module_channels([nn.Sequential(*blocks[start:stop])])[0]
        specs.append(ModuleSpec(index, start, stop, c_in, c_out, stride, in_stride, stop == len(blocks),
                                trunk.arch.name))
        in_stride *= stride
    return specs


class CheckpointedSequential(nn.Sequential):
    """A module that keeps only each block's input for backward and recomputes the block then
    (activation checkpointing per block): less memory for about one extra forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return x


def split_trunk(trunk: ResNetTrunk, split: Split, *, recompute: bool = False) -> list[nn.Sequential]:
    """The K modules of ``split`` as Sequentials referencing ``trunk``'s blocks.

    Running them one after the other equals ``trunk(x)``. ``recompute=True`` gives
    :class:`CheckpointedSequential`\\ s (same results and gradients, fewer saved bytes).
    """
    blocks = trunk.blocks()
    bounds = (0,) + block_boundaries(split, trunk.arch) + (len(blocks),)
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

    def __init__(self, trunk: ResNetTrunk, input_hw: tuple[int, int], aux_cost: AuxCost | None):
        self.arch = trunk.arch.name
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
                          stop == len(self.blocks), self.arch)
        key = (tuple(x_in.shape), tuple(x_out.shape), stride, spec.in_stride, spec.is_last, spec.level,
               meter.holds(x_out))
        if key not in self.aux_extra:
            before = meter.current
            loss = self.aux_cost(spec, x_in, x_out)
            self.aux_extra[key] = meter.current - before
            del loss  # frees the auxiliary graph: the meter is back to the module's own bytes
        return self.aux_extra[key]


def module_saved_bytes(trunk: ResNetTrunk, split: Split, input_hw: tuple[int, int],
                       aux_cost: AuxCost | None = None) -> list[int]:
    """Bytes each module of ``split`` (plus its ``aux_cost`` model) saves for backward at ``input_hw``.

    This is each module's peak of a training step (modules are trained, and their graphs freed, one
    after another). Measured on the meta device, so it is exact and instant at any slide size.
    """
    table = ModuleCostTable(trunk, input_hw, aux_cost)
    bounds = (0,) + block_boundaries(split, trunk.arch) + (trunk.arch.n_blocks,)
    return [table.cost(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def balanced_split(trunk: ResNetTrunk, k: int, input_hw: tuple[int, int],
                   aux_cost: AuxCost | None = None) -> BlockBoundaries:
    """Block boundaries of the K-module split whose largest module (saved bytes of the module plus its
    auxiliary model, as :func:`module_saved_bytes` counts them at ``input_hw``) is as small as possible.

    Exact minimax over all contiguous partitions of the trunk's blocks (dynamic programming). Without
    ``aux_cost`` only the trunk's own saved bytes count. The costs assume ``recompute=False``.
    """
    n_blocks = trunk.arch.n_blocks
    if not (isinstance(k, int) and 1 <= k <= n_blocks):
        raise ConfigError(f"split: K must be an integer in 1..{n_blocks} for a balanced split, got {k!r}")
    cost = ModuleCostTable(trunk, input_hw, aux_cost).cost
    # best[m][j]: (smallest max cost, boundaries) splitting blocks[0:j] into m modules.
    best: list[dict[int, tuple[int, tuple[int, ...]]]] = [{0: (0, ())}]
    for m in range(1, k + 1):
        stops = [n_blocks] if m == k else range(m, n_blocks - (k - m) + 1)
        best.append({
            stop: min((max(best[m - 1][start][0], cost(start, stop)), best[m - 1][start][1] + (start,))
                      for start in best[m - 1] if start < stop)
            for stop in stops
        })
    return BlockBoundaries(best[k][n_blocks][1][1:])
