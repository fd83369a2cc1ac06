"""ResNet18/34/50 trunks: torchvision names and outputs, the weight files users have, splits and footprints per arch."""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wsilocal.config import TrainConfig, load_config
from wsilocal.errors import CheckpointError
from wsilocal.models.heads import FinalClassifier
from wsilocal.models.local_net import LocalNet
from wsilocal.models.resnet import ARCHS, ResNetTrunk, load_trunk_weights
from wsilocal.models.split import (
    BlockBoundaries,
    balanced_split,
    block_boundaries,
    module_channels,
    module_saved_bytes,
    module_specs,
    split_trunk,
)
from wsilocal.pretrain.objectives import PretrainNet
from wsilocal.pretrain.trainer import WEIGHTS_FILE, weights_file_name
from wsilocal.stream.bands import band_forward
from wsilocal.stream.forward import forward_bytes_estimate
from wsilocal.stream.geometry import block_geometry, footprint, output_length, plan_axis
from wsilocal.stream.sources import ArraySource
from wsilocal.train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- a torchvision-layout reference, written out plainly -------------------------------------------------------


class RefBasic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or c_in != planes:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefBottleneck(nn.Module):
    """torchvision's Bottleneck, v1.5: the stride on the 3×3 conv."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or c_in != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


REF_LAYOUT = {"resnet18": (RefBasic, (2, 2, 2, 2)), "resnet34": (RefBasic, (3, 4, 6, 3)),
              "resnet50": (RefBottleneck, (3, 4, 6, 3))}


class RefResNet(nn.Module):
    def __init__(self, arch: str, conv1_stride: int = 2):
        super().__init__()
        block, counts = REF_LAYOUT[arch]
        self.conv1 = nn.Conv2d(3, 64, 7, conv1_stride, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, n in enumerate(counts):
            planes = 64 * 2**i
            blocks = [block(c_in, planes, 1 if i == 0 else 2)]
            c_in = planes * block.expansion
            blocks += [block(c_in, planes, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, 1000)

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@functools.cache
def random_state(arch: str) -> dict[str, torch.Tensor]:
    """A torchvision state dict of ``arch`` (``fc`` included) with random values and valid BatchNorm statistics."""
    g = torch.Generator().manual_seed(len(arch) + int(arch[6:]))
    state = {}
    for key, value in RefResNet(arch).state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 1000, (), generator=g)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        elif value.dim() == 4:  # conv weights: He-scaled, so activations stay finite through 16 blocks
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=g) * (1 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.2 + (1.0 if key.endswith("weight") else 0.0)
    return state


# torchvision's state-dict sizes (fc included): resnet18 122, resnet34 218, resnet50 320 entries.
TORCHVISION_KEYS = {"resnet18": 122, "resnet34": 218, "resnet50": 320}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trunk_has_torchvision_names_and_channels(arch):
    trunk = ResNetTrunk(arch=arch)
    ref_keys = [k for k in RefResNet(arch).state_dict() if not k.startswith("fc.")]
    assert list(trunk.state_dict()) == ref_keys and len(ref_keys) + 2 == TORCHVISION_KEYS[arch]
    assert trunk.out_channels == {"resnet50": 2048}.get(arch, 512)
    assert len(trunk.blocks()) == ARCHS[arch].n_blocks == {"resnet18": 9}.get(arch, 17)
    if arch == "resnet50":  # a few shapes as torchvision has them
        shapes = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
        assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
        assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
        assert shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
        assert trunk.layer2[0].conv2.stride == (2, 2) and trunk.layer2[0].conv1.stride == (1, 1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stride, fold_bn", [(3, True), (2, False)])
def test_loaded_weights_reproduce_the_reference_network(tmp_path, arch, stride, fold_bn):
    ref = RefResNet(arch, stride).double().eval()
    ref.load_state_dict(random_state(arch))
    torch.save(random_state(arch), tmp_path / "w.pth")
    trunk = ResNetTrunk(stride, fold_bn, arch=arch)
    load_trunk_weights(trunk, tmp_path / "w.pth")
    image = torch.randn(1, 3, 80, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected, got = ref.features(image), trunk.double()(image)
    assert got.shape == expected.shape == (1, trunk.out_channels, *expected.shape[2:])
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-12


# --- the files users have: nesting and prefixes ------------------------------------------------------------------


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _head(dim: int) -> dict:
    """A projection head of a self-supervised model (left out when loading the backbone)."""
    return {"weight": torch.zeros(128, dim), "bias": torch.zeros(128)}


def layouts(arch: str) -> dict[str, tuple[str, object, str, int]]:
    """name → (file suffix, object saved, prefix stripped, keys left out), as the frameworks write them."""
    state = random_state(arch)
    dim = RefResNet(arch).fc.in_features
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    moco = {**_prefixed(state, "module.encoder_q."), **_prefixed(state, "module.encoder_k."),
            "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    lightning = {**_prefixed(state, "model.resnet."), **_prefixed(_head(dim), "model.projector.0.")}
    dino_teacher = {**_prefixed(backbone, "backbone."), **_prefixed(_head(dim), "head.mlp.0.")}
    return {
        "torchvision .pth": (".pth", state, "", 2),
        "timm .safetensors": (".safetensors", backbone, "", 0),
        "DataParallel .pt under state_dict": (".pt", {"state_dict": _prefixed(state, "module."), "epoch": 9},
                                              "module.", 2),
        "MoCo v2 .pth.tar-like under state_dict": (".pth", {"arch": arch, "epoch": 200, "state_dict": moco},
                                                   "module.encoder_q.", len(moco) - len(backbone)),
        "SimCLR Lightning .ckpt under state_dict": (".pt", {"state_dict": lightning, "hyper_parameters": {"lr": 1}},
                                                    "model.resnet.", len(lightning) - len(backbone)),
        "DINO .pth under teacher": (".pth", {"teacher": dino_teacher, "student": dino_teacher, "epoch": 100},
                                    "backbone.", 2),
        "HF .bin under model, encoder.": (".bin", {"model": _prefixed(backbone, "encoder.")}, "encoder.", 0),
        "safetensors named .bin": (".bin", _prefixed(backbone, "backbone."), "backbone.", 0),
    }


def _write(path, obj) -> None:
    if path.suffix == ".safetensors" or path.name.startswith("safetensors"):
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("name", list(layouts("resnet18")))
def test_weight_files_of_each_layout_load_exactly(tmp_path, arch, name):
    suffix, obj, prefix, ignored = layouts(arch)[name]
    path = tmp_path / (name.split()[0] + suffix)
    _write(path, obj)
    trunk = ResNetTrunk(arch=arch)
    loaded = load_trunk_weights(trunk, path)
    state = random_state(arch)
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert (loaded.prefix, loaded.ignored) == (prefix, ignored)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.record() == {"path": str(path), "sha256": loaded.sha256, "prefix": prefix, "ignored_keys": ignored}


MISMATCH_34_50 = r"shape mismatch in 31 keys: layer1\.0\.conv1\.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\)"
MISMATCH_50_18 = r"shape mismatch in 23 keys: layer1\.0\.conv1\.weight \(64, 64, 3, 3\) vs \(64, 64, 1, 1\)"


@pytest.mark.parametrize("arch, file_arch, problems, looks_like", [
    ("resnet34", "resnet50", [r"unexpected 102 keys: layer1\.0\.conv3\.weight, ", MISMATCH_34_50],
     "resnet50 (Bottleneck blocks 3-4-6-3)"),
    ("resnet50", "resnet18", [r"missing 165 keys: layer1\.0\.conv3\.weight, ", MISMATCH_50_18],
     "resnet18 (BasicBlock blocks 2-2-2-2)"),
    ("resnet18", "resnet34", [r"unexpected 96 keys: layer1\.2\.conv1\.weight, "],
     "resnet34 (BasicBlock blocks 3-4-6-3)"),
])
def test_another_architecture_is_named_in_one_line(tmp_path, arch, file_arch, problems, looks_like):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": _prefixed(random_state(file_arch), "module.")}, path)
    with pytest.raises(CheckpointError) as info:
        load_trunk_weights(ResNetTrunk(arch=arch), path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a {ARCHS[arch].title} state dict under 'module.': ")
    for problem in problems:
        assert re.search(problem, message), (problem, message)
    kinds = [kind for kind in ("missing", "unexpected", "shape mismatch") if kind in message]
    assert len(kinds) == len(problems)  # and no other kind of problem
    assert message.endswith(f"the file holds {looks_like}") and "\n" not in message


def test_unknown_prefix_and_foreign_files_are_described(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(_prefixed(random_state("resnet18"), "net.body."), path)  # a prefix we do not strip
    with pytest.raises(CheckpointError, match=r"missing 100 keys: conv1\.weight, .*; unexpected 122 keys: "
                                              r"net\.body\.conv1\.weight, .*the file holds resnet18 \(BasicBlock "
                                              r"blocks 2-2-2-2\) under the prefix 'net\.body\.'$"):
        load_trunk_weights(ResNetTrunk(arch="resnet18"), path)
    vit = tmp_path / "vit.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, str(vit))
    with pytest.raises(CheckpointError, match=r"the file holds no ResNet \(no layer1\.\.layer4 blocks; first key "
                                              r"'blocks\.0\.attn\.qkv\.weight'\)$"):  # safetensors sorts its keys
        load_trunk_weights(ResNetTrunk(arch="resnet50"), vit)


# --- splits per architecture ----------------------------------------------------------------------------------

# (c_in, c_out, stride) of each module of the presets, conv1 stride 3.
PRESET_CHANNELS = {
    "resnet18": {1: [(3, 512, 48)], 2: [(3, 128, 12), (128, 512, 4)],
                 4: [(3, 64, 6), (64, 128, 2), (128, 256, 2), (256, 512, 2)],
                 8: [(3, 64, 6), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                     (256, 512, 2), (512, 512, 1)]},
    "resnet50": {1: [(3, 2048, 48)], 2: [(3, 512, 12), (512, 2048, 4)],
                 4: [(3, 256, 6), (256, 512, 2), (512, 1024, 2), (1024, 2048, 2)],
                 8: [(3, 256, 6), (256, 256, 1), (256, 256, 1), (256, 512, 2), (512, 512, 1), (512, 1024, 2),
                     (1024, 1024, 1), (1024, 2048, 2)]},
}


@functools.cache
def double_trunk(arch: str) -> ResNetTrunk:
    torch.manual_seed(0)
    trunk = ResNetTrunk(arch=arch)
    trunk.load_state_dict({k: v for k, v in random_state(arch).items() if not k.startswith("fc.")})
    return trunk.double().eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_presets_follow_the_papers_rule_and_run_as_the_trunk(arch):
    trunk = double_trunk(arch)
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        whole = trunk(image)
    unit_starts = {"resnet18": (3, 5, 7), "resnet50": (3, 6, 11)}[arch]
    assert block_boundaries(4, arch) == unit_starts
    for k, channels in PRESET_CHANNELS[arch].items():
        modules = split_trunk(trunk, k)
        assert module_channels(modules) == channels, k
        specs = module_specs(trunk, k)
        assert specs[0].first_block == 0 and [s.label().split(" ")[0] for s in specs][0].startswith("U0")
        x = image
        with torch.no_grad():
            for module in modules:
                x = module(x)
        assert torch.equal(x, whole), k
    net = LocalNet(2, 4, arch=arch)
    assert [aux.classifier.kernel for aux in net.aux] == [9, 7, 5]  # by resolution, as for ResNet34's 64/128/256
    assert isinstance(net.head, FinalClassifier) and net.head.classifier[0].in_features == trunk.out_channels
    assert net.describe().startswith(f"{ARCHS[arch].title}, K=4 modules")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_balanced_split_per_arch_is_no_worse_than_the_preset(arch, hw=(512, 512)):
    trunk = ResNetTrunk(arch=arch)
    for k in (2, 4, 8):
        balanced = balanced_split(trunk, k, hw)
        assert len(balanced.blocks) == k - 1 and max(balanced.blocks) < ARCHS[arch].n_blocks
        assert max(module_saved_bytes(trunk, balanced, hw)) <= max(module_saved_bytes(trunk, k, hw))
    net = LocalNet(2, 4, arch=arch, input_hw_for_balance=hw, rfr=False)
    assert isinstance(net.split, BlockBoundaries) and len(net.stages) == 4


def test_config_and_checkpoints_made_before_arch_load_as_resnet34(tmp_path):
    (tmp_path / "config.yaml").write_text("cohort: c.csv\nout: run\nk: 4\n")
    assert load_config(tmp_path / "config.yaml").arch == "resnet34"
    config = TrainConfig(cohort="c.csv", out="run", arch="resnet50")
    with pytest.raises(Exception, match=r"arch must be one of resnet18, resnet34, resnet50, got 'vgg16'"):
        TrainConfig(cohort="c.csv", out="run", arch="vgg16").validate()
    old = tmp_path / "old.pt"
    save_checkpoint({"model": {}, "signature": {"method": "local"}}, old)
    load_checkpoint(old, expected_signature={"arch": "resnet34", "method": "local"})
    with pytest.raises(CheckpointError, match=r"arch: checkpoint 'resnet34' vs model 'resnet50'"):
        load_checkpoint(old, expected_signature={"arch": config.arch, "method": "local"})


# --- footprints: tile-exact against a whole-image forward (float64) ------------------------------------------------


def _windowed(blocks, image: torch.Tensor, tile: int) -> torch.Tensor:
    """The blocks over windows along the width (the plan's halos), kept parts stitched."""
    geometry = block_geometry(blocks)
    parts = []
    with torch.no_grad():
        for in0, in1, out0, _out1, keep0, keep1 in plan_axis(image.shape[3], tile, geometry):
            x = image[:, :, :, in0:in1]
            for block in blocks:
                x = block(x)
            parts.append(x[:, :, :, keep0 - out0 : keep1 - out0])
    return torch.cat(parts, dim=3)


@pytest.mark.parametrize("arch, blocks, width", [
    ("resnet18", 9, 1400), ("resnet50", 17, 1200), ("resnet50", 5, 400),
])
def test_footprints_are_tile_exact(arch, blocks, width):
    trunk = double_trunk(arch)
    chain = trunk.blocks()[:blocks]
    stride, first, last = footprint(block_geometry(chain))
    image = torch.randn(1, 3, 32, width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        whole = nn.Sequential(*chain)(image)
    assert whole.shape[3] == output_length(width, block_geometry(chain))
    tile = 2 * stride
    assert len(plan_axis(width, tile, block_geometry(chain))) >= 3  # windows with interior edges on both sides
    tiled = _windowed(chain, image, tile)
    assert float((tiled - whole).abs().max() / whole.abs().max()) < 1e-13
    # The footprint is exact: the output column in the middle depends on the input columns
    # [o·S + first, o·S + last] and on no other.
    o = whole.shape[3] // 2
    column = image.clone().requires_grad_(True)
    nn.Sequential(*chain)(column)[:, :, :, o].sum().backward()
    touched = (column.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero().flatten()
    assert (int(touched.min()), int(touched.max())) == (o * stride + first, o * stride + last)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_band_streaming_gives_the_whole_image_map(arch):
    """Inference streams the trunk in bands of rows, each block with its own footprint's halo: exact for both
    block types on an image taller than the trunk's receptive field (649 px for ResNet18, 637 for ResNet50)."""
    trunk = double_trunk(arch)
    image = np.random.default_rng(4).integers(0, 256, (760, 48, 3), dtype=np.uint8)
    source = ArraySource(image, [0.8, 0.6, 0.75], [0.15, 0.2, 0.15])
    with torch.no_grad():
        whole = trunk(source.read(0, 0, source.height, source.width).double())
        streamed = band_forward(trunk.blocks(), source, band=4)
    assert streamed.shape == whole.shape == (1, trunk.out_channels, 16, 1)
    assert float((streamed - whole).abs().max() / whole.abs().max()) < 1e-13
    # the whole-image estimate that chooses streaming counts each arch's own maps (ResNet50's are 4× wider)
    estimates = {a: forward_bytes_estimate(ResNetTrunk(arch=a), 2048, 2048) for a in ("resnet18", "resnet50")}
    assert estimates["resnet50"] > 1.4 * estimates["resnet18"]


def test_pretraining_builds_the_arch_and_names_its_file():
    net = PretrainNet("vicreg", (16, 16), "resnet50")
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 16) and net.projector[0].in_features == 2048
    frozen = ResNetTrunk(arch="resnet50")
    frozen.load_state_dict(net.trunk.state_dict())  # the trainable trunk's weights load into the method's
    assert weights_file_name("resnet18") == "resnet18.safetensors" and WEIGHTS_FILE == weights_file_name("resnet34")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_streamed_local_step_gives_the_local_steps_gradients(arch):
    """Streamed training (windows planned from each module's footprint) of both block types: the same losses and
    gradients as the plain step, float64, on an image whose first modules are cut into windows both ways."""
    from wsilocal.train.local_step import local_training_step
    from wsilocal.train.streaming import streaming_local_step

    torch.manual_seed(0)
    net = LocalNet(3, 4, rfr=True, rfr_patches=2, arch=arch).double().train()
    image = np.random.default_rng(5).integers(0, 256, (200, 180, 3), dtype=np.uint8)
    source = ArraySource(image, [0.7, 0.55, 0.7], [0.2, 0.25, 0.2])
    torch.manual_seed(3)
    plain = local_training_step(net, source.read(0, 0, 200, 180).double(), 2,
                                generator=torch.Generator().manual_seed(5))
    reference = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    streamed = streaming_local_step(net, source, 2, tile=(48, 48, 96, 4096), generator=torch.Generator().manual_seed(5))
    assert streamed.cls_losses == pytest.approx(plain.cls_losses, rel=1e-12)
    assert streamed.rfr_losses == pytest.approx(plain.rfr_losses, rel=1e-12)
    top = max(float(g.norm()) for g in reference.values())
    for name, g in reference.items():
        got = dict(net.named_parameters())[name].grad
        assert float((got - g).norm()) <= 1e-9 * max(float(g.norm()), top * 1e-6), name


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_streaming_cnn_step_gives_the_end_to_end_gradients(arch, tmp_path):
    """StreamingCNN (the whole trunk one streamed module, H on its map) of both block types: the loss, logits and
    every trunk and H gradient of ``CE(H(trunk(image)))``'s backward, float64, every block in several windows."""
    import torch.nn.functional as F

    from wsilocal.train.streaming import streaming_end_to_end_step

    torch.manual_seed(0)
    net = LocalNet(3, 1, arch=arch).double().train()
    image = np.random.default_rng(6).integers(0, 256, (230, 170, 3), dtype=np.uint8)
    source = ArraySource(image, [0.7, 0.55, 0.7], [0.2, 0.25, 0.2])
    torch.manual_seed(4)  # the same dropout mask in H for both
    logits, _ = net.head(net.trunk(source.read(0, 0, 230, 170).double()))
    loss = F.cross_entropy(logits, torch.tensor([2]))
    loss.backward()
    reference = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    streamed = streaming_end_to_end_step(net, source, 2, tile=96, store="disk", store_dir=tmp_path)
    assert streamed.cls_losses == [pytest.approx(float(loss.detach()), rel=1e-12)]
    torch.testing.assert_close(streamed.logits[0], logits.detach(), rtol=1e-12, atol=0)
    assert {name.split(".")[0] for name in reference} == {"trunk", "head"}
    top = max(float(g.norm()) for g in reference.values())
    for name, g in reference.items():
        got = dict(net.named_parameters())[name].grad
        assert float((got - g).norm()) <= 1e-9 * max(float(g.norm()), top * 1e-6), name
    assert list(tmp_path.iterdir()) == []  # the stores between blocks are gone
