"""Models: torchvision's ResNets, a small ResNet for 28x28 inputs, and an MLP without batch norm (for tests).

torchvision ResNets are built with ``zero_init_residual=True`` by default: the last BN of each residual block
starts with gamma = 0 (Goyal et al. sec. 5.1), so the final ``model.pt`` loads straight into
``torchvision.models.<arch>(num_classes=...)``.
"""

from __future__ import annotations

import torch
from torch import nn

# torchvision's ResNet family (torchvision.models.list_models, pinned torchvision 0.29; tests/test_data.py checks the
# list against it). Named here rather than asked for at import: importing torchvision imports torch._dynamo, about
# 1.8 CPU-seconds, which a process that builds only the small models never needs.
TORCHVISION_ARCHS = ("resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d",
                     "resnext101_64x4d", "resnext50_32x4d", "wide_resnet101_2", "wide_resnet50_2")
# resnet_small_narrow: the same network at half the width (16, 32, 64 channels, about 0.08M parameters), 2x the
# images/s of resnet_small on one CPU thread; the tuned study (docs/study/) runs 80 of them on 2 cores.
SMALL_RESNETS = {"resnet_small": (32, 64, 128), "resnet_small_narrow": (16, 32, 64)}
SMALL_ARCHS = (*SMALL_RESNETS, "mlp")
ARCHS = TORCHVISION_ARCHS + SMALL_ARCHS


class BasicBlock(nn.Module):
    """The basic residual block of He et al., "Deep Residual Learning" (2016), fig. 2, in torchvision's form
    (``torchvision.models.resnet.BasicBlock``, groups 1, no dilation): conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the
    input (through ``downsample`` where given), then ReLU. The same modules, names, creation order and arithmetic as
    torchvision's, so the same seed gives the same weights and outputs bit for bit (tests/test_train_e2e.py). Our
    own so that a small-ResNet process does not import torchvision (and with it torch._dynamo)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """A ResNet for 28x28 inputs: 3x3 stride-2 stem, three stages of one BasicBlock (32, 64, 128 channels at
    14x14, 7x7, 4x4), global pool, linear. About 0.3M parameters; an epoch of Fashion-MNIST takes about 40 s on
    2 CPU cores (2 ranks) and three reach about 90% test accuracy.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
                 zero_init_residual: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != w:
                down = nn.Sequential(nn.Conv2d(cin, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
            blocks.append(BasicBlock(cin, w, stride=stride, downsample=down))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for b in blocks:
                nn.init.zeros_(b.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int,
                zero_init_residual: bool = True) -> nn.Module:
    """Build ``arch`` for inputs of ``in_channels`` x ``image_size``^2 and ``num_classes`` outputs."""
    if arch in SMALL_RESNETS:
        return SmallResNet(in_channels, num_classes, widths=SMALL_RESNETS[arch], zero_init_residual=zero_init_residual)
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 128), nn.ReLU(),
                             nn.Linear(128, num_classes))
    if arch in TORCHVISION_ARCHS:
        import torchvision

        return torchvision.models.get_model(arch, num_classes=num_classes, zero_init_residual=zero_init_residual)
    raise ValueError(f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")


def input_channels(arch: str, data_channels: int) -> int:
    """torchvision ResNets take 3 channels (grey images are repeated); the small models take the data's own."""
    return data_channels if arch in SMALL_ARCHS else 3
