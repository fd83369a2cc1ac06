"""ResNet34 trunk: torchvision layout and weights, frozen/folded BatchNorm, calibration, channels-last."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from wsilocal.errors import CheckpointError
from wsilocal.models.memory import saved_tensor_bytes
from wsilocal.models.resnet import (
    FrozenBatchNorm2d,
    ResNetTrunk,
    calibrate_batchnorm,
    conv_bn,
    load_trunk_weights,
)

# --- a reference torchvision-layout ResNet34, written out plainly ------------------------------------


class RefBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class RefResNet34(nn.Module):
    def __init__(self, conv1_stride: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, conv1_stride, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (n, c) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
            blocks = [RefBlock(c_in, c, 1 if i == 0 else 2)] + [RefBlock(c, c, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, 1000)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def weights_dir(module_tmp):
    return module_tmp("weights")


@functools.cache
def reference_model(stride: int) -> RefResNet34:
    """A reference model in eval mode with random weights and random BatchNorm statistics."""
    torch.manual_seed(stride)
    ref = RefResNet34(stride)
    randomise_batchnorm(ref, seed=stride)
    return ref.eval()


def saved_reference(stride: int, folder) -> tuple[RefResNet34, object]:
    """The reference model and the folder holding its state dict as .pth and .safetensors."""
    ref = reference_model(stride)
    if not (folder / f"s{stride}.pth").exists():
        state = ref.state_dict()
        torch.save(state, folder / f"s{stride}.pth")
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"s{stride}.safetensors"))
    return ref, folder


IMAGE = torch.randn(1, 3, 96, 112, generator=torch.Generator().manual_seed(0))


# --- layout and loading ---------------------------------------------------------------------------


def test_trunk_has_torchvision_names_without_fc():
    trunk_keys = list(ResNetTrunk().state_dict())
    ref_keys = [k for k in RefResNet34().state_dict() if not k.startswith("fc.")]
    assert trunk_keys == ref_keys


@pytest.mark.parametrize("stride, suffix, fold_bn", [
    (3, ".pth", False), (3, ".pth", True), (3, ".safetensors", False), (3, ".safetensors", True),
    (2, ".pth", True), (2, ".safetensors", False),
])
def test_loaded_weights_reproduce_reference_features(weights_dir, stride, suffix, fold_bn):
    ref, folder = saved_reference(stride, weights_dir)
    trunk = ResNetTrunk(conv1_stride=stride, fold_bn=fold_bn)
    load_trunk_weights(trunk, folder / f"s{stride}{suffix}")
    with torch.no_grad():
        expected = ref.features(IMAGE)
        got = trunk(IMAGE)
    assert got.shape == expected.shape
    assert rel_error(got, expected) <= 1e-4
    for key, value in ref.state_dict().items():  # parameters stay the unfolded torchvision ones
        if not key.startswith("fc."):
            assert torch.equal(trunk.state_dict()[key], value), key


def test_loads_nested_prefixed_legacy_state_dict(tmp_path):
    """DataParallel prefix, nesting under 'state_dict', fc kept, num_batches_tracked absent (old files)."""
    stride, ref = 3, reference_model(3)
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    trunk = ResNetTrunk(conv1_stride=stride)
    load_trunk_weights(trunk, tmp_path / "wrapped.pt")
    with torch.no_grad():
        assert rel_error(trunk(IMAGE), ref.features(IMAGE)) <= 1e-4


def test_wrong_keys_and_shapes_are_listed(tmp_path):
    state = reference_model(3).state_dict()
    del state["layer4.2.bn2.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(3)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_trunk_weights(ResNetTrunk(), path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a ResNet34 state dict: ")
    assert "missing 1 keys: layer4.2.bn2.running_var" in message
    assert "unexpected 1 keys: layer5.0.conv1.weight" in message
    assert "shape mismatch in 1 keys: layer1.0.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)" in message
    assert "\n" not in message


def test_many_missing_keys_are_summarised(tmp_path):
    state = {k: v for k, v in reference_model(3).state_dict().items() if not k.startswith("layer3.")}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    # num_batches_tracked may be absent (old torchvision files): not reported as missing
    n_missing = sum(k.startswith("layer3.") and "num_batches" not in k for k in ResNetTrunk().state_dict())
    with pytest.raises(CheckpointError, match=rf"missing {n_missing} keys: layer3\.0\.conv1\.weight, .*"
                                              rf"\({n_missing} in all\)"):
        load_trunk_weights(ResNetTrunk(), path)


class Payload:
    """A pickled object that would write a file when unpickled — weights_only must refuse it."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    Payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot load weights: "):
        load_trunk_weights(ResNetTrunk(), path)
    assert not Payload.marker.exists()


@pytest.mark.parametrize("name", ["s3.pth", "s3.safetensors"])
def test_truncated_missing_and_foreign_files_raise_checkpoint_error(weights_dir, tmp_path, name):
    _, folder = saved_reference(3, weights_dir)
    data = (folder / name).read_bytes()
    truncated = tmp_path / name
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / f"notes{truncated.suffix}"
    text.write_text("not weights\n")
    for path in (truncated, text):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot load weights: \S"):
            load_trunk_weights(ResNetTrunk(), path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'absent.pth'))}: no such file$"):
        load_trunk_weights(ResNetTrunk(), tmp_path / "absent.pth")
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_trunk_weights(ResNetTrunk(), tensor_only)


# --- initialisation, frozen and folded BatchNorm --------------------------------------------------


def test_torchvision_initialisation_and_frozen_parameters():
    torch.manual_seed(0)
    trunk = ResNetTrunk()
    conv = trunk.layer4[2].conv2.weight  # 2.4 M weights: the sample std is precise
    assert float(conv.detach().std()) == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.01)
    for bn in trunk.batchnorms():
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
    assert len(trunk.batchnorms()) == 36
    trainable = {name for name, p in trunk.named_parameters() if p.requires_grad}
    convs = {f"{name}.weight" for name, m in trunk.named_modules() if isinstance(m, nn.Conv2d)}
    assert trainable == convs - {"conv1.weight"}


def test_frozen_batchnorm_keeps_the_state_dict_keys_of_batchnorm():
    assert list(FrozenBatchNorm2d(8).state_dict()) == list(nn.BatchNorm2d(8).state_dict())


def test_batchnorm_and_stem_stay_frozen_through_training():
    torch.manual_seed(1)
    trunk = ResNetTrunk()
    randomise_batchnorm(trunk, seed=5)
    frozen = {k: v.clone() for k, v in trunk.state_dict().items() if "bn" in k or "downsample.1" in k}
    frozen["conv1.weight"] = trunk.conv1.weight.detach().clone()
    trained_before = trunk.layer1[0].conv1.weight.detach().clone()
    trunk.train()
    assert all(not bn.training for bn in trunk.batchnorms()) and trunk.layer1.training
    # All parameters go to the optimizer, with weight decay: frozen ones must still not move.
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.1, weight_decay=0.1)
    for step in range(2):
        optimizer.zero_grad()
        trunk(torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        optimizer.step()
    state = trunk.state_dict()
    for key, value in frozen.items():
        assert torch.equal(state[key], value), key
    assert trunk.conv1.weight.grad is None
    assert all(bn.weight.grad is None and bn.bias.grad is None for bn in trunk.batchnorms())
    assert not torch.equal(trunk.layer1[0].conv1.weight, trained_before)


def _outputs_and_grads(trunk: ResNetTrunk, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trunk.zero_grad(set_to_none=True)
    out = trunk(image)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in trunk.named_parameters() if p.requires_grad}


def test_folding_gives_the_same_outputs_and_gradients_and_saves_less():
    torch.manual_seed(2)
    trunk = ResNetTrunk(fold_bn=False)
    randomise_batchnorm(trunk, seed=3)
    image = torch.randn(1, 3, 112, 96, generator=torch.Generator().manual_seed(4))
    out_plain, grads_plain = _outputs_and_grads(trunk, image)
    bytes_plain = saved_tensor_bytes(lambda: trunk(image))
    trunk.fold_bn = True
    out_folded, grads_folded = _outputs_and_grads(trunk, image)
    bytes_folded = saved_tensor_bytes(lambda: trunk(image))
    assert rel_error(out_folded, out_plain) <= 1e-5
    assert grads_folded.keys() == grads_plain.keys() and len(grads_plain) == 35
    for name, grad in grads_plain.items():
        assert rel_error(grads_folded[name], grad) <= 1e-4, name
    assert bytes_folded < 0.75 * bytes_plain
    with torch.no_grad():  # inference folds into the weights instead
        assert rel_error(trunk(image), out_plain) <= 1e-5


def test_folding_drops_exactly_the_batchnorm_inputs_from_the_saved_tensors():
    """Exact accounting on one block: the two BatchNorms' inputs (conv outputs) are no longer saved.
    Also, each BatchNorm saved its running mean and var where the folded form saves only the scale."""
    block = ResNetTrunk(fold_bn=False).layer1[1]
    x = torch.randn(1, 64, 20, 24, requires_grad=True)
    plain = saved_tensor_bytes(lambda: block(x))
    for bn in (block.bn1, block.bn2):
        bn.fold = True
    folded = saved_tensor_bytes(lambda: block(x))
    conv_output, channel_vector = 64 * 20 * 24 * 4, 64 * 4
    assert plain - folded == 2 * conv_output + 2 * channel_vector


def test_channels_last_gives_the_same_results():
    torch.manual_seed(3)
    trunk = ResNetTrunk()
    randomise_batchnorm(trunk, seed=8)
    image = torch.randn(1, 3, 64, 72, generator=torch.Generator().manual_seed(9))
    out, grads = _outputs_and_grads(trunk, image)
    trunk.to(memory_format=torch.channels_last)
    out_cl, grads_cl = _outputs_and_grads(trunk, image.to(memory_format=torch.channels_last))
    assert trunk.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(out_cl, out) <= 1e-5
    for name, grad in grads.items():
        assert rel_error(grads_cl[name], grad) <= 1e-4, name


def test_output_size_and_stride():
    trunk = ResNetTrunk()
    with torch.no_grad():
        out = trunk(torch.zeros(1, 3, 200, 150))
    # conv1 stride 3 → ceil(/3), then four halvings (ceil): 200 → 67 → 34 → 17 → 9 → 5; 150 → 50 → 25 → 13 → 7 → 4
    assert out.shape == (1, 512, 5, 4)


# --- calibration of a random trunk -----------------------------------------------------------------


def test_calibration_normalises_every_batchnorm_output():
    torch.manual_seed(4)
    trunk = ResNetTrunk()
    g = torch.Generator().manual_seed(10)
    images = [torch.randn(1, 3, 128, 112, generator=g), torch.randn(3, 96, 96, generator=g) * 2 + 1]
    calibrate_batchnorm(trunk, iter(images))
    assert trunk.fold_bn  # restored
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [bn.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, []).append(out.clone()))
             for i, bn in enumerate(trunk.batchnorms())]
    trunk.fold_bn = False  # run the BatchNorm modules so the hooks see their outputs
    with torch.no_grad():
        for image in images:
            trunk(image if image.dim() == 4 else image[None])
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 36
    for i, outs in outputs.items():
        flat = torch.cat([o.transpose(0, 1).flatten(1) for o in outs], dim=1).double()  # (C, all positions)
        assert flat.mean(1).abs().max() < 1e-3, i
        assert (flat.std(1, correction=0) - 1).abs().max() < 1e-2, i
    trunk.fold_bn = True
    for bn in trunk.batchnorms():
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    with torch.no_grad():
        final = trunk(images[0])
    assert torch.isfinite(final).all()
    assert 0.1 < float(final.std()) < 10 and float(final.abs().max()) < 100


def test_calibration_needs_images():
    with pytest.raises(ValueError, match="at least one image"):
        calibrate_batchnorm(ResNetTrunk(), [])


def test_folded_convolution_matches_conv_then_batchnorm():
    """The folding identity itself, on one layer with a conv bias."""
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = FrozenBatchNorm2d(6)
    randomise_batchnorm(nn.Sequential(bn), seed=11)
    x = torch.randn(2, 4, 9, 9)
    bn.fold = False
    expected = conv_bn(x, conv, bn)
    bn.fold = True
    assert rel_error(conv_bn(x, conv, bn), expected) <= 1e-6
    scale, shift = bn.scale_shift()
    manual = (F.conv2d(x, conv.weight, conv.bias, padding=1) - bn.running_mean[:, None, None]) / torch.sqrt(
        bn.running_var[:, None, None] + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
    assert rel_error(expected, manual) <= 1e-6
