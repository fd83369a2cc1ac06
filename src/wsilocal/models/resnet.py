"""The ResNet34 trunk of the method: torchvision layout, conv1 stride 3, every BatchNorm frozen.

Parameter and buffer names are exactly torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.1.running_mean``, ...) minus ``fc``, so a torchvision ``resnet34`` state dict
loads as is (:func:`load_resnet34_weights`).

Frozen BatchNorm is a fixed per-channel affine map ``y = x·s + t`` with ``s = γ/√(σ²+ε)`` and
``t = β − μ·s``. With ``fold_bn=True`` it is folded *on the fly* into the convolution before it: without
gradients, one convolution with weight ``W·s`` and bias ``t``; when training, ``conv(x)·s + t`` in one
fused op. The parameter stays the unfolded torchvision weight (same state dict, mathematically identical
gradients) but the BatchNorm no longer saves its input for backward, which roughly halves the
activation memory of a training step.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from wsilocal.errors import CheckpointError

LAYER_BLOCKS = (3, 4, 6, 3)
LAYER_CHANNELS = (64, 128, 256, 512)


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
    ``nn.BatchNorm2d`` for the trainable BatchNorm of pretraining)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 norm_layer: type[nn.BatchNorm2d] = FrozenBatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm_layer(out_channels)
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = conv_bn(out, self.conv2, self.bn2)
        identity = x if self.downsample is None else conv_bn(x, self.downsample[0], self.downsample[1])
        return self.relu(out + identity)


class Stem(nn.Module):
    """Unit U0: conv1 → bn1 → relu → maxpool. Holds the trunk's own layers (a view, not a copy)."""

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, relu: nn.ReLU, maxpool: nn.MaxPool2d):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = conv1, bn1, relu, maxpool
        self.in_channels, self.out_channels = conv1.in_channels, conv1.out_channels
        self.stride = conv1.stride[0] * maxpool.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(conv_bn(x, self.conv1, self.bn1)))


class ResNet34Trunk(nn.Module):
    """ResNet34 without ``avgpool``/``fc``: image (N,3,H,W) → 512-channel map at stride ``2·conv1_stride·8``.

    ``conv1_stride`` is 3 in the method (2 is torchvision's). The stem and every BatchNorm are frozen.
    ``fold_bn`` chooses folded (memory-lean) or conv-then-BatchNorm execution; it can be switched at
    any time through the ``fold_bn`` property and gives the same results either way.

    ``trainable=True`` is the plain torchvision network instead, for self-supervised pretraining
    (:mod:`wsilocal.pretrain`): ordinary ``nn.BatchNorm2d`` layers that learn and track statistics, and a
    trainable stem. Same parameter and buffer names, so its state dict loads into the frozen trunk.
    """

    def __init__(self, conv1_stride: int = 3, fold_bn: bool = True, trainable: bool = False):
        super().__init__()
        norm_layer = nn.BatchNorm2d if trainable else FrozenBatchNorm2d
        self.conv1 = nn.Conv2d(3, 64, 7, conv1_stride, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels = 64
        for index, (n_blocks, channels) in enumerate(zip(LAYER_BLOCKS, LAYER_CHANNELS, strict=True)):
            first_stride = 1 if index == 0 else 2
            blocks = [BasicBlock(in_channels, channels, first_stride, norm_layer)]
            blocks += [BasicBlock(channels, channels, norm_layer=norm_layer) for _ in range(n_blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = channels
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
        """The 17 blocks, in order: the stem (U0), then every BasicBlock of layer1..layer4."""
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        return [Stem(self.conv1, self.bn1, self.relu, self.maxpool)] + [b for layer in layers for b in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            x = block(x)
        return x


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load the tensors of a weights file, as a flat dict, or raise CheckpointError naming the cause."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe pickle, truncated zip, not a weights file at all, ...
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot load weights: {cause[:300]}") from exc
    if isinstance(obj, dict):
        for nested in ("state_dict", "model"):
            if isinstance(obj.get(nested), dict):
                obj = obj[nested]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items() if not k.removeprefix("module.").startswith("fc.")}


def _list_keys(keys: list[str], shown: int = 5) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_resnet34_weights(trunk: ResNet34Trunk, path: str | Path) -> None:
    """Load a torchvision-format ResNet34 state dict (``.pth``/``.pt`` or ``.safetensors``) into ``trunk``.

    Accepts a plain state dict or one nested under ``state_dict``/``model``, strips a ``module.``
    prefix (DataParallel) and ignores ``fc.*``. ``num_batches_tracked`` may be absent (old torchvision
    files). Pickles are read with ``weights_only=True``: a file that needs arbitrary code is refused.
    Any other missing or unexpected key, or a shape mismatch, raises :class:`CheckpointError`.
    """
    path = Path(path)
    weights = _read_state_dict(path)
    expected = trunk.state_dict()
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
        raise CheckpointError(f"{path}: not a ResNet34 state dict: {'; '.join(problems)}")
    trunk.load_state_dict(weights)


@torch.no_grad()
def calibrate_batchnorm(trunk: ResNet34Trunk, images: Iterable[torch.Tensor]) -> None:
    """Data-dependent initialisation of a randomly initialised trunk's BatchNorm statistics.

    Without pretrained weights, identity BatchNorms let activations grow through the 16 residual
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

