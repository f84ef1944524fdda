"""W3: a CIFAR-style ResNet-18 (BatchNorm, residual blocks, 11M parameters), written out
here so that no torchvision is needed, and its 3x32x32 inputs made from the digits.

The network is the usual one for 32x32 inputs: a 3x3 stem convolution with 64 channels
(no max-pool), four stages of two basic blocks (64, 128, 256, 512 channels; stride 2 from
the second stage on, with a 1x1 convolution and BatchNorm on the shortcut where the shape
changes), global average pooling and a linear head. It is an ``nn.Sequential`` whose last
module is the head, like the other workloads, so the peers' last-layer runs can split it.
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
SIDE = 32


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(n_classes: int = 10) -> nn.Sequential:
    """ResNet-18 for 3x32x32 inputs."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, STAGES[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(STAGES[0]),
        nn.ReLU(),
    ]
    c_in = STAGES[0]
    for i, c_out in enumerate(STAGES):
        for j in range(BLOCKS_PER_STAGE):
            stride = 2 if i > 0 and j == 0 else 1
            layers.append(BasicBlock(c_in, c_out, stride))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    return nn.Sequential(*layers)


def colour_images(X: torch.Tensor, seed: int) -> torch.Tensor:
    """Digits rows ``(N, 64)`` in [0, 1] as 3x32x32 images: upsampled bilinearly, each
    image tinted with its own seeded colour and given a little seeded pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    grey = nn.functional.interpolate(
        X.reshape(-1, 1, 8, 8), size=(SIDE, SIDE), mode="bilinear", align_corners=False
    )
    tint = 0.5 + 0.5 * torch.rand(len(X), 3, 1, 1, generator=gen)
    noise = 0.05 * torch.randn(len(X), 3, SIDE, SIDE, generator=gen)
    return grey * tint + noise
