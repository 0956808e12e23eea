"""Architectures of the zoo's small off-the-shelf models. Every model takes images in [-1, 1],
[B, 1, 32, 32], and does its own input normalisation (one convention for teacher and student).

These are ordinary ``nn.Module`` factories: a user's own model plugs in the same way, as
``package.module:function`` plus a safetensors file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016) with BatchNorm, like torchvision's."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """The off-the-shelf classifier: a stem plus one strided ResNet block per stage
    (32 -> 16 -> 8 -> 4 px), BatchNorm, global average pooling, linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128), in_channels: int = 1, stem: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        blocks, cin = [], stem
        for w in widths:
            blocks.append(BasicBlock(cin, w, 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: Tensor) -> Tensor:
        # Fashion-MNIST statistics in [-1, 1] units (mean 0.286, std 0.353 of [0, 1] pixels)
        x = (x - (2 * 0.286 - 1)) / (2 * 0.353)
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class Evaluator(nn.Module):
    """The independent judge: a plain VGG-style net (no residuals, max-pooling, dropout; a
    different design from the guide). ``features`` is the 256-d embedding for FID/KID/PR."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()

        def stage(cin, cout, convs):
            layers = []
            for k in range(convs):
                layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(in_channels, 32, 1), stage(32, 64, 2), stage(64, 128, 2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 16, 256), nn.GELU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(256, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def fashion_classifier() -> SmallResNet:
    return SmallResNet(num_classes=10)


def fashion_evaluator() -> Evaluator:
    return Evaluator(num_classes=10)


def tiny_classifier(num_classes: int = 10, in_channels: int = 1) -> SmallResNet:
    """A randomly initialised miniature for tests and smoke runs."""
    return SmallResNet(num_classes=num_classes, widths=(8, 16), in_channels=in_channels, stem=8)
