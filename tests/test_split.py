"""Units, modules and balanced splits of the trunk; the saved-bytes meter; LocalNet assembly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wsilocal.errors import ConfigError
from wsilocal.models.local_net import LocalNet, auxiliary_cost
from wsilocal.models.memory import SavedTensorMeter, saved_tensor_bytes
from wsilocal.models.resnet import ResNetTrunk
from wsilocal.models.split import (
    BlockBoundaries,
    ModuleCostTable,
    balanced_split,
    block_boundaries,
    module_channels,
    module_saved_bytes,
    module_specs,
    split_trunk,
)

IMAGE = torch.randn(1, 3, 112, 128, generator=torch.Generator().manual_seed(1))

# --- the saved-bytes meter --------------------------------------------------------------------------


def test_meter_counts_each_saved_storage_once_and_tracks_release():
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000)
    with SavedTensorMeter() as meter:
        y = a * b  # saves b (for a's gradient), not a (b needs no gradient)
        assert meter.current == 4000
        z = torch.exp(a)  # saves its result
        w = a[:500] * b[500:]  # a view of b: same storage, not counted again
        assert meter.current == 8000 and meter.holds(b) and meter.holds(z)
        del y, w
        assert meter.current == 4000  # b released when both graphs that saved it are gone
        z.sum().backward()
        assert meter.current == 0  # backward frees what the graph saved
    assert meter.peak == 8000
    meter.reset()
    assert meter.peak == 0


def test_meter_skips_parameters_and_counts_checkpointed_inputs():
    linear = nn.Linear(256, 256, bias=False)
    x = torch.randn(8, 256, requires_grad=True)
    # The weight (a parameter, resident anyway) is not counted; the input is.
    assert saved_tensor_bytes(lambda: linear(x)) == x.nbytes
    inner = saved_tensor_bytes(lambda: torch.relu(linear(x)))
    # Checkpointing keeps only the input and recomputes the rest during backward.
    assert saved_tensor_bytes(lambda: checkpoint(lambda t: torch.relu(linear(t)), x, use_reentrant=False)) \
        == x.nbytes < inner


def test_meter_works_on_the_meta_device():
    x = torch.empty(1, 64, 500, 400, device="meta")
    conv = nn.Conv2d(64, 64, 3, padding=1).to("meta")
    # conv saves x; relu saves its output; the second conv saves that same output again.
    assert saved_tensor_bytes(lambda: conv(torch.relu(conv(x)))) == 2 * 64 * 500 * 400 * 4


# --- units and presets ------------------------------------------------------------------------------


PRESET_UNITS = {
    1: [(0, 1, 2, 3, 4, 5, 6, 7, 8)],
    2: [(0, 1, 2, 3, 4), (5, 6, 7, 8)],
    4: [(0, 1, 2), (3, 4), (5, 6), (7, 8)],
    8: [(0, 1), (2,), (3,), (4,), (5,), (6,), (7,), (8,)],
}
PRESET_CHANNELS = {
    1: [(3, 512, 48)],
    2: [(3, 128, 12), (128, 512, 4)],
    4: [(3, 64, 6), (64, 128, 2), (128, 256, 2), (256, 512, 2)],
    8: [(3, 64, 6), (64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
        (256, 512, 2)],
}


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_presets_have_the_authors_units_channels_and_strides(trunk, k):
    specs = module_specs(trunk, k)
    assert [s.units for s in specs] == PRESET_UNITS[k]
    assert module_channels(split_trunk(trunk, k)) == PRESET_CHANNELS[k]
    assert [(s.c_in, s.c_out, s.stride) for s in specs] == PRESET_CHANNELS[k]
    assert [s.is_last for s in specs] == [False] * (k - 1) + [True]
    assert specs[-1].out_stride == 48 and specs[0].in_stride == 1


def test_unit_blocks_are_the_design_ones(trunk):
    modules = split_trunk(trunk, list(range(1, 9)))  # one module per unit
    layers = (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
    expected = [[trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool],
                [layers[0][0]], [layers[0][1]], [layers[0][2]], list(layers[1][0:2]), list(layers[1][2:4]),
                list(layers[2][0:3]), list(layers[2][3:6]), list(layers[3])]
    stem = modules[0][0]
    assert [stem.conv1, stem.bn1, stem.relu, stem.maxpool] == expected[0]
    for module, blocks in zip(modules[1:], expected[1:], strict=True):
        assert all(a is b for a, b in zip(module, blocks, strict=True)) and len(module) == len(blocks)


@pytest.mark.parametrize("split", [1, 2, 4, 8, [3, 5, 7], BlockBoundaries([2, 5, 7, 12, 16])])
def test_modules_compose_to_the_trunk_and_share_its_parameters(trunk, split):
    modules = split_trunk(trunk, split)
    with torch.no_grad():
        x = IMAGE
        for module in modules:
            x = module(x)
        assert torch.equal(x, trunk(IMAGE))
    module_params = [p for m in modules for p in m.parameters()]
    assert len(module_params) == len(list(trunk.parameters()))
    assert {id(p) for p in module_params} == {id(p) for p in trunk.parameters()}


def test_unit_and_block_boundaries(trunk):
    assert block_boundaries([3, 5, 7]) == block_boundaries(4) == (3, 4 + 2, 8 + 3)
    assert block_boundaries(8) == (2, 3, 4, 6, 8, 11, 14)
    assert block_boundaries([]) == block_boundaries(1) == ()
    specs = module_specs(trunk, BlockBoundaries([2, 5, 9]))
    assert [(s.first_block, s.stop_block) for s in specs] == [(0, 2), (2, 5), (5, 9), (9, 17)]
    assert [s.units for s in specs] == [(0, 1), None, None, None]
    assert [s.label() for s in specs] == ["U0+U1 (stem..layer1[0])", "layer1[1]..layer2[0]",
                                         "layer2[1]..layer3[0]", "layer3[1]..layer4[2]"]
    assert [(s.c_in, s.c_out, s.stride, s.in_stride) for s in specs] == [
        (3, 64, 6, 1), (64, 128, 2, 6), (128, 256, 2, 12), (256, 512, 2, 24)]


@pytest.mark.parametrize("split, message", [
    (3, "split: K must be one of [1, 2, 4, 8]"),
    (0, "split: K must be one of"),
    ([0, 3], "split: unit boundaries must be strictly increasing integers in 1..8, got [0, 3]"),
    ([9], "got [9]"),
    ([5, 3], "got [5, 3]"),
    ([3, 3], "got [3, 3]"),
    ([2.5], "got [2.5]"),
    ([True], "got [True]"),
    ("4", "split: expected K, a list of unit boundaries or BlockBoundaries, got '4'"),
    (BlockBoundaries([17]), "split: block boundaries must be strictly increasing integers in 1..16, got [17]"),
    (BlockBoundaries([4, 2]), "got [4, 2]"),
])
def test_bad_splits_raise_config_error(trunk, split, message):
    with pytest.raises(ConfigError) as info:
        split_trunk(trunk, split)
    assert str(info.value).startswith(message) if message.startswith("split:") else message in str(info.value)


# --- recompute ----------------------------------------------------------------------------------------


def test_recompute_gives_identical_outputs_and_gradients_with_fewer_saved_bytes(trunk):
    plain, recomputed = split_trunk(trunk, 4)[1], split_trunk(trunk, 4, recompute=True)[1]  # [U3, U4]
    x = torch.randn(1, 64, 24, 20, generator=torch.Generator().manual_seed(3))
    results = []
    for module in (plain, recomputed):
        trunk.zero_grad(set_to_none=True)
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads, saved_tensor_bytes(lambda m=module: m(x))))
    (out_p, grads_p, bytes_p), (out_r, grads_r, bytes_r) = results
    assert torch.equal(out_p, out_r)
    assert len(grads_p) == 7 and grads_p.keys() == grads_r.keys()  # 2 + 3 + 2 convs
    for name in grads_p:
        torch.testing.assert_close(grads_r[name], grads_p[name], rtol=1e-5, atol=1e-7, msg=name)
    # Only the three block inputs stay: x (64 ch) and two 24×20 / 12×10 maps.
    assert bytes_r == x.nbytes + 64 * 24 * 20 * 4 + 128 * 12 * 10 * 4 < bytes_p / 2


# --- memory of modules, balanced split ---------------------------------------------------------------

HW = (160, 192)


def measured_module_bytes(split, rfr_patches: int) -> list[int]:
    """Saved bytes of each module + auxiliary model (or H) of a real LocalNet training step at HW."""
    torch.manual_seed(2)
    net = LocalNet(2, split, rfr_patches=rfr_patches)
    y = torch.tensor([1])
    result, x = [], torch.randn(1, 3, *HW)
    for i, stage in enumerate(net.stages):
        def step(stage=stage, x_in=x, i=i):
            x_out = stage(x_in)
            if i < len(net.aux):
                return net.aux[i](x_in, x_out, y, torch.Generator().manual_seed(i))["total"]
            return nn.functional.cross_entropy(net.head(x_out)[0], y)
        result.append(saved_tensor_bytes(step))
        with torch.no_grad():
            x = stage(x)
    return result


def test_balanced_split_is_no_worse_than_the_preset_and_meta_costs_are_exact(trunk, k=4):
    aux = auxiliary_cost(2, rfr_patches=2)
    boundaries = balanced_split(trunk, k, HW, aux)
    assert len(boundaries.blocks) == k - 1 and block_boundaries(boundaries) == boundaries.blocks
    balanced, preset = measured_module_bytes(boundaries, 2), measured_module_bytes(k, 2)
    assert max(balanced) <= max(preset)
    # The meta-device estimate the split is chosen from is exactly what a real step saves.
    assert module_saved_bytes(trunk, boundaries, HW, aux) == balanced
    assert module_saved_bytes(trunk, k, HW, aux) == preset


def test_balanced_split_minimises_the_largest_module(trunk):
    table = ModuleCostTable(trunk, HW, aux_cost=None)
    boundaries = balanced_split(trunk, 3, HW)
    a, b = boundaries.blocks
    found = max(table.cost(0, a), table.cost(a, b), table.cost(b, 17))
    assert found == max(module_saved_bytes(trunk, boundaries, HW))
    brute_force = min(max(table.cost(0, a), table.cost(a, b), table.cost(b, 17))
                      for a in range(1, 16) for b in range(a + 1, 17))
    assert found == brute_force
    assert balanced_split(trunk, 1, HW) == BlockBoundaries(())
    with pytest.raises(ConfigError, match=r"split: K must be an integer in 1\.\.17"):
        balanced_split(trunk, 18, HW)


def test_module_memory_relative_to_end_to_end_matches_design_figures():
    """DESIGN.md §5 (2048², stride-3 conv1, stem and BN frozen): K=4 32 %, K=8 19 % of end-to-end;
    folding BatchNorm brings end-to-end down to (now) half."""
    trunk = ResNetTrunk(fold_bn=False)
    end_to_end = module_saved_bytes(trunk, 1, (2048, 2048))[0]
    assert max(module_saved_bytes(trunk, 4, (2048, 2048))) / end_to_end == pytest.approx(0.32, abs=0.01)
    assert max(module_saved_bytes(trunk, 8, (2048, 2048))) / end_to_end == pytest.approx(0.19, abs=0.01)
    trunk.fold_bn = True
    assert module_saved_bytes(trunk, 1, (2048, 2048))[0] / end_to_end == pytest.approx(0.50, abs=0.01)


# --- LocalNet ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 8])
def test_local_net_assembly(k):
    net = LocalNet(3, k)
    assert len(net.stages) == k and len(net.aux) == k - 1
    assert {key.split(".")[0] for key in net.state_dict()} == ({"trunk", "head", "aux"} if k > 1 else {"trunk", "head"})
    assert list(net.trunk.state_dict()) == list(ResNetTrunk().state_dict())
    groups = net.param_groups(1e-5, 2e-5)
    assert [g["lr"] for g in groups] == [1e-5, 2e-5]
    trunk_ids = {id(p) for p in groups[0]["params"]}
    other_ids = {id(p) for p in groups[1]["params"]}
    assert not trunk_ids & other_ids
    assert trunk_ids | other_ids == {id(p) for p in net.parameters() if p.requires_grad}
    assert trunk_ids == {id(p) for p in net.trunk.parameters() if p.requires_grad} and len(trunk_ids) == 35
    net.eval()
    with torch.no_grad():
        logits, attention = net(IMAGE)
        x = IMAGE
        for stage in net.stages:
            x = stage(x)
        assert torch.equal(net.head(x)[0], logits)
    assert logits.shape == (1, 3) and attention.shape == (3, 3)
    assert float(attention.sum()) == pytest.approx(1.0, abs=1e-6)


def test_local_net_describe_and_balanced_construction():
    text = LocalNet(2, 4).describe().splitlines()
    assert text[0] == "ResNet34, K=4 modules, conv1 stride 3, BatchNorm folded into convs"
    assert text[1] == ("module 1: U0+U1+U2 (stem..layer1[1]), 3→64 ch, stride 6 (output at 1/6 of the image); "
                       "aux conv 9×9; RFR 10 patches of 128 input px (22 output px)")
    assert text[4].startswith("module 4: U7+U8 (layer3[3]..layer4[2]), 256→512 ch, stride 2 (output at 1/48")
    net = LocalNet(2, 2, rfr=False, input_hw_for_balance=(96, 96))
    assert isinstance(net.split, BlockBoundaries) and len(net.stages) == 2
    assert all(aux.rfr is None for aux in net.aux) and "RFR" not in net.describe()
    with pytest.raises(ConfigError, match="a balanced split needs K"):
        LocalNet(2, [3, 5, 7], input_hw_for_balance=(96, 96))
