"""Measurements: classifier accuracy, and FID / KID / precision-recall in evaluator features."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def predict(net: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Logits of ``net`` (eval mode) over x [N, C, H, W] in batches."""
    net.eval()
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    return (predict(net, x, batch_size).argmax(-1) == y).float().mean().item()
