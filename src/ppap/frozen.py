"""Running a caller's module as a fixed function, without changing it.

ppap evaluates the user's own networks (the diffusion UNet, the off-the-shelf guide) in eval mode
and takes gradients with respect to their inputs only. The modules may be the ones the user is
training: ``frozen`` sets eval mode and stops weight gradients for the duration of a call, then
puts back every module's ``training`` flag and every parameter's ``requires_grad`` as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .errors import PPAPError


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


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device (an index left out is the first one)."""
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def check_device(module: nn.Module, device: torch.device, what: str) -> None:
    """A module given at call time runs where the sample is; ppap does not move it (diffusers
    never moves what the caller passes to ``__call__``)."""
    first: Tensor | None = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    if first is not None and not same_device(first.device, device):
        raise PPAPError(f"the {what} is on {first.device} but the pipeline samples on {device}: move it there first (.to({str(device)!r}))")


def snapshot_modes(*modules: Any) -> Callable[[], None]:
    """A function that hands the caller's ``modules`` back as they came: the train/eval mode of
    every submodule and ``requires_grad`` of every parameter (guidance runs them frozen, in
    eval mode, and wrapping a plain net in a ``GuideModel`` freezes it)."""
    given = [(m, m.training) for m in modules if isinstance(m, nn.Module)]
    modes = [(sub, sub.training) for m, _ in given for sub in m.modules()]
    flags = [(p, p.requires_grad) for m, _ in given for p in m.parameters()]

    def restore() -> None:
        for m, mode in given:
            m.train(mode)  # a module's own train() (an expert bank unmerges its adapters), then every flag exactly
        for sub, mode in modes:
            sub.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)

    return restore
