"""Running a caller's module as a fixed function, without changing it.

ppap evaluates the user's own networks (the diffusion UNet, the off-the-shelf guide) in eval mode
and takes gradients with respect to their inputs only. The modules may be the ones the user is
training: ``frozen`` sets eval mode and stops weight gradients for the duration of a call, then
puts back every module's ``training`` flag and every parameter's ``requires_grad`` as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode with no parameter requiring grad, for the ``with`` block only.

    The flags are set directly (not through ``train()``, which a subclass may override), and only
    those that differ are touched and restored. Gradients with respect to the inputs still flow
    (``torch.autograd.grad(out, x)``); none reach the weights, and the forward saves nothing for them.
    """
    training = [m for m in module.modules() if m.training]
    # under torch.no_grad nothing is recorded: the weights' flags need no change (and cost none)
    trainable = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    for m in training:
        m.training = False
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for m in training:
            m.training = True
        for p in trainable:
            p.requires_grad_(True)
