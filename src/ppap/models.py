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
        # activations are modules (not F.relu) so a calibration can swap them (EluCD's Softplus)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(y)) + self.shortcut(x))


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


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class EncoderDecoder(nn.Module):
    """A small U-Net-like dense predictor (the off-the-shelf segmenter and edge estimator):
    two strided stages down (32 -> 16 -> 8 px), bilinear upsampling with skip connections back
    to full resolution, BatchNorm, a 1x1 head. Output [B, out_channels, H, W]."""

    def __init__(self, out_channels: int, widths: tuple[int, int, int] = (16, 32, 64), in_channels: int = 1):
        super().__init__()
        w1, w2, w3 = widths
        self.enc1 = _conv_bn(in_channels, w1)
        self.enc2 = nn.Sequential(_conv_bn(w1, w2, 2), _conv_bn(w2, w2))
        self.enc3 = nn.Sequential(_conv_bn(w2, w3, 2), _conv_bn(w3, w3))
        self.dec2 = _conv_bn(w3 + w2, w2)
        self.dec1 = _conv_bn(w2 + w1, w1)
        self.head = nn.Conv2d(w1, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - (2 * 0.286 - 1)) / (2 * 0.353)
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="bilinear", align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        return self.head(d1)


# --- the dense tasks' ground truth, computed from clean images -----------------------------

FOREGROUND_THRESHOLD = -0.8  # in [-1, 1] units: pixel > 0.1 of full intensity is garment


def segmentation_labels(x: Tensor, y: Tensor) -> Tensor:
    """[B, 1, H, W] clean images in [-1, 1] and [B] classes -> [B, H, W] labels: 0 on
    background, 1 + class on foreground (pixel above a fixed threshold)."""
    fg = x[:, 0] > FOREGROUND_THRESHOLD
    return torch.where(fg, y.view(-1, 1, 1) + 1, torch.zeros_like(y).view(-1, 1, 1)).long()


def sobel_magnitude(x: Tensor) -> Tensor:
    """Analytic Sobel gradient magnitude of [B, 1, H, W] images in [-1, 1], computed on [0, 1]
    intensities with replicated borders and divided by 4 (so a step edge of height 1 gives 1)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    k = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(F.pad((x + 1) / 2, (1, 1, 1, 1), mode="replicate"), k)
    return g.square().sum(1, keepdim=True).add(1e-12).sqrt() / 4


def fashion_classifier() -> SmallResNet:
    return SmallResNet(num_classes=10)


def fashion_evaluator() -> Evaluator:
    return Evaluator(num_classes=10)


def fashion_segmenter() -> EncoderDecoder:
    return EncoderDecoder(out_channels=11)


def fashion_edges() -> EncoderDecoder:
    return EncoderDecoder(out_channels=1)


def tiny_dense(out_channels: int = 1, in_channels: int = 1) -> EncoderDecoder:
    """A randomly initialised miniature dense net for tests."""
    return EncoderDecoder(out_channels, widths=(4, 8, 8), in_channels=in_channels)


def tiny_segmenter(num_classes: int = 3) -> EncoderDecoder:
    """A randomly initialised miniature segmenter (``num_classes`` per pixel) for tests."""
    return tiny_dense(num_classes)


def tiny_classifier(num_classes: int = 10, in_channels: int = 1) -> SmallResNet:
    """A randomly initialised miniature for tests and smoke runs."""
    return SmallResNet(num_classes=num_classes, widths=(8, 16), in_channels=in_channels, stem=8)


def tiny_rgb_classifier(num_classes: int = 10) -> SmallResNet:
    """``tiny_classifier`` for 3-channel images (tests of RGB / grey mismatches)."""
    return tiny_classifier(num_classes, in_channels=3)
