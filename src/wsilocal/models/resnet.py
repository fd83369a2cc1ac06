"""The method's trunks: torchvision's ResNet18, ResNet34 (the paper's), ResNet50; conv1 stride 3, BatchNorm frozen.

Parameter and buffer names are exactly torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.1.running_mean``, ``layer1.0.conv3.weight`` for ResNet50's Bottleneck blocks, ...) minus
``fc``, so a torchvision (or timm) state dict of the same architecture loads as is (:func:`load_trunk_weights`,
which also unwraps the nesting and key prefixes of self-supervised checkpoints).

Frozen BatchNorm is a fixed per-channel affine map ``y = x·s + t`` with ``s = γ/√(σ²+ε)`` and
``t = β − μ·s``. With ``fold_bn=True`` it is folded *on the fly* into the convolution before it: without
gradients, one convolution with weight ``W·s`` and bias ``t``; when training, ``conv(x)·s + t`` in one
fused op. The parameter stays the unfolded torchvision weight (same state dict, mathematically identical
gradients) but the BatchNorm no longer saves its input for backward, which roughly halves the
activation memory of a training step.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from wsilocal.errors import CheckpointError

# ResNet34's layout (the paper's trunk); other architectures: ``ARCHS[name].layer_blocks`` / ``.layer_channels``.
LAYER_BLOCKS = (3, 4, 6, 3)
LAYER_CHANNELS = (64, 128, 256, 512)
DEFAULT_ARCH = "resnet34"


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never trains.

    Same state-dict keys as ``nn.BatchNorm2d`` (weight, bias, running_mean, running_var,
    num_batches_tracked). ``.train()`` leaves it in eval mode and its weight/bias have
    ``requires_grad=False``. ``fold`` tells :func:`conv_bn` to fold it into the preceding
    convolution instead of running it (a flag, not state: it is not saved).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.fold = True
        self.training = False

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine map ``(s, t)`` this layer applies."""
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``; with a frozen ``bn`` whose ``fold`` is set, its affine map is folded into the convolution."""
    if not getattr(bn, "fold", False):  # a trainable BatchNorm (pretraining) always runs as itself
        return bn(conv(x))
    scale, shift = bn.scale_shift()
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        # Autograd records: scale the conv *output*. It then saves only what the conv alone saves; a
        # folded weight ``W·s`` would be one more weight-sized tensor saved per conv (85 MB for the trunk).
        return torch.addcmul(shift.view(-1, 1, 1), conv(x), scale.view(-1, 1, 1))
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), shift,
                    conv.stride, conv.padding, conv.dilation, conv.groups)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (two 3×3 convs and a residual), with frozen BatchNorm (``norm_layer``:
    ``nn.BatchNorm2d`` for the trainable BatchNorm of pretraining). ``planes`` is its output width."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 norm_layer: type[nn.BatchNorm2d] = FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = _downsample(in_channels, planes, stride, norm_layer)
        self.in_channels, self.out_channels, self.stride = in_channels, planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = conv_bn(out, self.conv2, self.bn2)
        identity = x if self.downsample is None else conv_bn(x, self.downsample[0], self.downsample[1])
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3×3 conv): 1×1 → 3×3 → 1×1 to
    ``planes·4`` channels, and a residual; frozen BatchNorm as in :class:`BasicBlock`."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1,
                 norm_layer: type[nn.BatchNorm2d] = FrozenBatchNorm2d):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride, norm_layer)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = self.relu(conv_bn(out, self.conv2, self.bn2))
        out = conv_bn(out, self.conv3, self.bn3)
        identity = x if self.downsample is None else conv_bn(x, self.downsample[0], self.downsample[1])
        return self.relu(out + identity)


def _downsample(in_channels: int, out_channels: int, stride: int,
                norm_layer: type[nn.BatchNorm2d]) -> nn.Sequential | None:
    """The 1×1 projection shortcut where a block changes resolution or width (torchvision's ``downsample``)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm_layer(out_channels))


class Stem(nn.Module):
    """Unit U0: conv1 → bn1 → relu → maxpool. Holds the trunk's own layers (a view, not a copy)."""

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, relu: nn.ReLU, maxpool: nn.MaxPool2d):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = conv1, bn1, relu, maxpool
        self.in_channels, self.out_channels = conv1.in_channels, conv1.out_channels
        self.stride = conv1.stride[0] * maxpool.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(conv_bn(x, self.conv1, self.bn1)))


@dataclass(frozen=True)
class Arch:
    """One torchvision ResNet: its block type and the number of blocks of layer1..layer4."""

    name: str  # torchvision's function name: "resnet34"
    title: str  # for messages: "ResNet34"
    block: type[BasicBlock] | type[Bottleneck]
    layer_blocks: tuple[int, int, int, int]

    @property
    def layer_channels(self) -> tuple[int, ...]:
        """Output channels of layer1..layer4 (the block widths × the block's expansion)."""
        return tuple(width * self.block.expansion for width in (64, 128, 256, 512))

    @property
    def out_channels(self) -> int:
        """Channels of the trunk's output map (what the classifier H pools)."""
        return self.layer_channels[-1]

    @property
    def n_blocks(self) -> int:
        """The stem plus every residual block."""
        return 1 + sum(self.layer_blocks)


ARCHS = {arch.name: arch for arch in (
    Arch("resnet18", "ResNet18", BasicBlock, (2, 2, 2, 2)),
    Arch("resnet34", "ResNet34", BasicBlock, (3, 4, 6, 3)),
    Arch("resnet50", "ResNet50", Bottleneck, (3, 4, 6, 3)),
)}


def get_arch(name: str) -> Arch:
    """The :class:`Arch` called ``name`` (ValueError naming the known ones otherwise; configs check it first)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHS)}")
    return ARCHS[name]


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``: image (N,3,H,W) → map at stride ``2·conv1_stride·8``
    with ``arch``'s channels (512 for ResNet18/34, 2048 for ResNet50).

    ``conv1_stride`` is 3 in the method (2 is torchvision's). The stem and every BatchNorm are frozen.
    ``fold_bn`` chooses folded (memory-lean) or conv-then-BatchNorm execution; it can be switched at
    any time through the ``fold_bn`` property and gives the same results either way.

    ``trainable=True`` is the plain torchvision network instead, for self-supervised pretraining
    (:mod:`wsilocal.pretrain`): ordinary ``nn.BatchNorm2d`` layers that learn and track statistics, and a
    trainable stem. Same parameter and buffer names, so its state dict loads into the frozen trunk.
    """

    def __init__(self, conv1_stride: int = 3, fold_bn: bool = True, trainable: bool = False, *,
                 arch: str = DEFAULT_ARCH):
        super().__init__()
        self.arch = get_arch(arch)
        norm_layer = nn.BatchNorm2d if trainable else FrozenBatchNorm2d
        self.conv1 = nn.Conv2d(3, 64, 7, conv1_stride, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels = 64
        for index, n_blocks in enumerate(self.arch.layer_blocks):
            planes = 64 * 2**index
            first_stride = 1 if index == 0 else 2
            blocks = [self.arch.block(in_channels, planes, first_stride, norm_layer)]
            in_channels = blocks[0].out_channels
            blocks += [self.arch.block(in_channels, planes, norm_layer=norm_layer) for _ in range(n_blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.out_channels = in_channels
        self._init_torchvision()
        if not trainable:
            self.conv1.weight.requires_grad_(False)  # the stem is frozen (its BatchNorm already is)
            self.fold_bn = fold_bn

    def _init_torchvision(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def fold_bn(self) -> bool:
        return getattr(self.bn1, "fold", False)

    @fold_bn.setter
    def fold_bn(self, value: bool) -> None:
        for bn in self.batchnorms():
            bn.fold = bool(value)

    def batchnorms(self) -> list[FrozenBatchNorm2d]:
        """All BatchNorm layers, in forward order."""
        return [m for m in self.modules() if isinstance(m, FrozenBatchNorm2d)]

    def blocks(self) -> list[nn.Module]:
        """The stem (U0), then every residual block of layer1..layer4, in order (17 for ResNet34/50, 9 for 18)."""
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        return [Stem(self.conv1, self.bn1, self.relu, self.maxpool)] + [b for layer in layers for b in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            x = block(x)
        return x



# --- weights files ---------------------------------------------------------------------------------

#: Dictionary keys that wrap a state dict in training checkpoints (Lightning, MoCo, DINO, ...), in preference order.
NESTING_KEYS = ("state_dict", "model", "teacher")
#: Key prefixes that frameworks put before a backbone's own names; stripped (in any combination) when the rest
#: matches: DataParallel's ``module.``, ``backbone.`` (DINO, mmselfsup), ``model.resnet.`` (SimCLR
#: histopathology), ``module.encoder_q.`` (MoCo), ``encoder.``. Not ``trunk.``: a wsilocal run's checkpoint is a
#: trained model, not initial weights, and is refused (its trunk is under that prefix).
KNOWN_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "encoder_q.", "resnet.")
_BLOCK_KEY = re.compile(r"^(.*?)layer([1-4])\.(\d+)\.(conv[123])\.weight$")


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_trunk_weights` loaded: the file, its SHA-256, the prefix stripped from its keys and how
    many keys outside that prefix (projection heads, a momentum encoder, ``fc``) were left out."""

    path: Path
    sha256: str
    prefix: str
    ignored: int

    def record(self) -> dict:
        """For a run's ``model.json``."""
        return {"path": str(self.path), "sha256": self.sha256, "prefix": self.prefix, "ignored_keys": self.ignored}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte header length and a JSON header; pickles and zips do not."""
    with open(path, "rb") as file:
        head = file.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The flat dict of tensors in a weights file (``.safetensors``, or a ``.pth``/``.pt``/``.bin`` pickle read with
    ``weights_only=True``), unwrapped from :data:`NESTING_KEYS`; CheckpointError naming the cause otherwise."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = load_file(str(path), device="cpu") if _is_safetensors(path) else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe pickle, truncated zip, not a weights file at all, ...
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot load weights: {cause[:300]}") from exc
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((obj[key] for key in NESTING_KEYS if isinstance(obj.get(key), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def _is_known_prefix(prefix: str) -> bool:
    while prefix:
        part = next((p for p in KNOWN_PREFIXES if prefix.startswith(p)), None)
        if part is None:
            return False
        prefix = prefix[len(part):]
    return True


def _backbone_prefix(keys: Iterable[str], expected: Iterable[str]) -> str:
    """The prefix (made of :data:`KNOWN_PREFIXES`, possibly empty) before the trunk's names in ``keys``: of the
    prefixes seen before a stem ``conv1.weight``, the one under which most of ``expected`` is found."""
    keys, expected = set(keys), list(expected)
    candidates = {key[: -len("conv1.weight")] for key in keys if key.endswith("conv1.weight")}
    candidates = [p for p in candidates if _is_known_prefix(p)] or [""]
    return max(candidates, key=lambda p: (sum(p + k in keys for k in expected), -len(p)))


def describe_layout(keys: Iterable[str]) -> str:
    """What state-dict ``keys`` hold, for error messages: a torchvision name with its block type and counts
    (``resnet50 (Bottleneck blocks 3-4-6-3)``), ``a ResNet of ...`` for other counts, the prefix in front of the
    names when there is one, or ``no ResNet (...)``."""
    keys = list(keys)
    counts, bottleneck, prefixes = [0, 0, 0, 0], False, set()
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            prefix, layer, index, conv = match[1], int(match[2]), int(match[3]), match[4]
            prefixes.add(prefix)
            counts[layer - 1] = max(counts[layer - 1], index + 1)
            bottleneck = bottleneck or conv == "conv3"
    if not all(counts):
        first = f"; first key {keys[0]!r}" if keys else ""
        return f"no ResNet (no layer1..layer4 blocks{first})"
    block = Bottleneck if bottleneck else BasicBlock
    named = [a.name for a in ARCHS.values() if a.block is block and a.layer_blocks == tuple(counts)]
    known = {(Bottleneck, (3, 4, 23, 3)): "resnet101", (Bottleneck, (3, 8, 36, 3)): "resnet152"}
    name = named[0] if named else known.get((block, tuple(counts)), "a ResNet")
    under = f" under the prefix {min(prefixes)!r}" if prefixes != {""} else ""
    return f"{name} ({block.__name__} blocks {'-'.join(map(str, counts))}){under}"


def _list_keys(keys: list[str], shown: int = 5) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_trunk_weights(trunk: ResNetTrunk, path: str | Path) -> LoadedWeights:
    """Load the weights of a trunk of ``trunk``'s architecture from a file users have: torchvision, timm or a
    self-supervised checkpoint.

    Reads ``.safetensors`` (recognised by content too) or a pickle (``.pth``/``.pt``/``.bin``) with
    ``weights_only=True``: a file that needs arbitrary code is refused. Unwraps a state dict nested under
    :data:`NESTING_KEYS`, strips a key prefix made of :data:`KNOWN_PREFIXES` (``module.``, ``backbone.``,
    ``model.resnet.``, ``module.encoder_q.``, ...) when the rest holds the trunk's names; keys outside that prefix
    (a projector, a momentum encoder) and ``fc.*`` are left out. ``num_batches_tracked`` may be absent (old
    torchvision files). Any other missing or unexpected key, or a shape mismatch, raises :class:`CheckpointError`:
    one line naming the file, the first keys of each kind and the architecture the file's keys look like.
    """
    path = Path(path)
    tensors = _read_tensors(path)
    expected = trunk.state_dict()
    prefix = _backbone_prefix(tensors, expected)
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    for key in expected:
        if key.endswith("num_batches_tracked"):
            weights.setdefault(key, torch.zeros((), dtype=torch.long))
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in weights and weights[k].shape != v.shape]
    problems = [f"{label} {len(keys)} keys: {_list_keys(keys)}"
                for label, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatch in", mismatched)) if keys]
    if problems:
        where = f" under {prefix!r}" if prefix else ""
        raise CheckpointError(f"{path}: not a {trunk.arch.title} state dict{where}: {'; '.join(problems)}; "
                              f"the file holds {describe_layout(weights)}")
    trunk.load_state_dict(weights)
    used = sum(prefix + k in tensors for k in expected)
    return LoadedWeights(path, file_sha256(path), prefix, len(tensors) - used)



@torch.no_grad()
def calibrate_batchnorm(trunk: ResNetTrunk, images: Iterable[torch.Tensor]) -> None:
    """Data-dependent initialisation of a randomly initialised trunk's BatchNorm statistics.

    Without pretrained weights, identity BatchNorms let activations grow through the residual
    blocks. Here every BatchNorm gets the per-channel mean and variance of the activations it sees on
    ``images`` (each a (N,3,H,W) or (3,H,W) tensor, pooled over all of them) and γ=1, β=0, so its output
    has mean 0 and std 1 on that data. Blocks are processed in order, and BatchNorms inside a block in
    forward order, so each one is measured on inputs already normalised upstream. All stay frozen.
    The activations of all images at one block are held at once: give a few images or crops.
    Do not call this on pretrained weights: it overwrites their statistics.
    """
    xs = [image if image.dim() == 4 else image.unsqueeze(0) for image in images]
    if not xs:
        raise ValueError("calibrate_batchnorm needs at least one image")
    was_folded = trunk.fold_bn
    trunk.fold_bn = False  # BatchNorm modules must actually run to be observed by the hook
    try:
        for block in trunk.blocks():
            for bn in [m for m in block.modules() if isinstance(m, FrozenBatchNorm2d)]:
                _set_statistics(bn, block, xs)
            xs = [block(x) for x in xs]
    finally:
        trunk.fold_bn = was_folded


def _set_statistics(bn: FrozenBatchNorm2d, block: nn.Module, xs: list[torch.Tensor]) -> None:
    """Run ``block`` on every input, accumulate the statistics of what enters ``bn``, and store them."""
    sums = torch.zeros(bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
    squares = torch.zeros_like(sums)
    count = 0

    def observe(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal sums, squares, count
        x = args[0]
        sums += x.sum(dim=(0, 2, 3), dtype=torch.float64)
        squares += (x * x).sum(dim=(0, 2, 3), dtype=torch.float64)
        count += x.numel() // x.shape[1]

    handle = bn.register_forward_pre_hook(observe)
    try:
        for x in xs:
            block(x)
    finally:
        handle.remove()
    mean = sums / count
    bn.running_mean.copy_(mean)
    bn.running_var.copy_((squares / count - mean * mean).clamp_min(0))
    bn.weight.fill_(1.0)
    bn.bias.zero_()

