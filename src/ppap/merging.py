"""Merging a LoRA expert into weights: W + scaling * B A written in one fused op, and the check
that a merged tensor may be written again (no autograd graph holds it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def merged_weight(layer: Any, adapter: str, out: Tensor | None = None) -> Tensor:
    """W + scaling * B A: the base weight W of the peft LoRA ``layer`` (plain LoRA, as the bank
    configures it) with ``adapter`` merged in, written into ``out`` (a new tensor when None); W
    itself is only read. For a Linear ([out, r] @ [r, in]) and an ungrouped Conv2d, whose B is 1x1
    ([out, r] @ [r, in * kh * kw]), one fused ``addmm``; for other layer kinds, W plus peft's delta."""
    base = layer.get_base_layer()
    w, a, b = base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    out = torch.empty_like(w, memory_format=torch.contiguous_format) if out is None else out
    half_on_cpu = w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16)  # peft merges those in float32
    matrix = isinstance(base, nn.Linear) or (isinstance(base, nn.Conv2d) and b.shape[2:] == (1, 1))
    if getattr(layer, "fan_in_fan_out", False) or half_on_cpu or not matrix:
        return torch.add(w, layer.get_delta_weight(adapter), out=out)
    torch.addmm(w.reshape(len(w), -1), b.reshape(len(b), -1), a.reshape(len(a), -1), alpha=layer.scaling[adapter], out=out.view(len(w), -1))
    return out


def held_elsewhere(t: Tensor) -> bool:
    """Whether anything besides its one tensor holds ``t``'s memory: an autograd graph that saved
    it (its use count) or a view of it (its storage's: that tensor, and the storage object asked).
    Where torch cannot tell, it counts as held."""
    try:
        return t._use_count() > 1 or torch._C._storage_Use_Count(t.untyped_storage()._cdata) > 2  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return True
