"""Tiny randomly initialised transformers vision models (image_size 32, RGB, well under 100k
parameters), seeded so every call builds the same weights. Shared by tests that need an
off-the-shelf model of a real transformers class without a hub.

At transformers' default initializer_range (0.02) such tiny nets give near-constant outputs
(SegFormer logits std ~4e-4, ViT logits the same for every image), useless as teachers, so the
ViT, SegFormer and DPT use a wider init (0.15-0.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _labels(num_labels: int, labels: Sequence[str] | None) -> dict:
    if labels is None:
        return {"num_labels": num_labels}
    assert len(labels) == num_labels, (labels, num_labels)
    return {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}


def tiny_resnet(num_labels: int = 10, labels: Sequence[str] | None = None, seed: int = 0):
    """ResNetForImageClassification, ~6k params: logits [B, num_labels]; any input size."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **_labels(num_labels, labels))
    )


def tiny_vit(num_labels: int = 10, labels: Sequence[str] | None = None, seed: int = 0):
    """ViTForImageClassification, ~6k params, patch 8: input must be 32 x 32; logits [B, num_labels].
    Attention projections are named q_proj/k_proj/v_proj/o_proj in transformers 5 (LoRA targets)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            initializer_range=0.2,
            **_labels(num_labels, labels),
        )
    )


def tiny_segformer(num_labels: int = 4, labels: Sequence[str] | None = None, seed: int = 0):
    """SegformerForSemanticSegmentation, ~7k params: logits [B, num_labels, H/4, W/4]."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    return SegformerForSemanticSegmentation(
        SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=16,
            initializer_range=0.2,
            **_labels(num_labels, labels),
        )
    )


def tiny_dpt(seed: int = 0):
    """DPTForDepthEstimation (ViT backbone, 2 layers, patch 8), ~36k params: predicted_depth [B, H, W]
    (no channel dim) at the input size. The head ends in ReLU, so depth >= 0; at the default
    initializer_range (0.02) the depth is ~1e-10 and mostly exactly 0 (no gradient), so the init
    is wider and the last conv's bias lifts ~95% of pixels above 0 (depth ~0.4 +- 0.2)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    model = DPTForDepthEstimation(
        DPTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            backbone_out_indices=[0, 1],
            neck_hidden_sizes=[8, 16],
            reassemble_factors=[2, 1],
            fusion_hidden_size=16,
            head_hidden_size=8,
            initializer_range=0.15,
        )
    )
    with torch.no_grad():
        model.head.head[4].bias.fill_(0.5)  # head: conv, upsample, conv, ReLU, conv(-> 1), ReLU
    return model
