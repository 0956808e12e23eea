"""Small text encoders for text-conditional diffusion models, in transformers' formats.

* a word-level tokenizer built with ``tokenizers`` (lower-cased words split on whitespace and
  punctuation, ``[PAD]`` / ``[UNK]``, padded or truncated to a fixed length) wrapped as
  transformers' ``PreTrainedTokenizerFast``;
* a ``CLIPTextModel`` from a small ``CLIPTextConfig``, whose last hidden states [B, L, D] are the
  UNet's ``encoder_hidden_states``, as in Stable Diffusion.

Both save with ``save_pretrained`` as a pipeline's ``tokenizer/`` and ``text_encoder/``, so
that diffusers' ``DiffusionPipeline.from_pretrained`` reloads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .io import PPAPError

PAD, UNK = "[PAD]", "[UNK]"


def build_word_tokenizer(words: Sequence[str], max_length: int):
    """A ``PreTrainedTokenizerFast`` over ``words`` (ids: ``[PAD]`` 0, ``[UNK]`` 1, then the
    words in order); prompts are lower-cased and always padded / truncated to ``max_length``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, UNK: 1}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(pad_id=0, pad_token=PAD, length=max_length)
    tok.enable_truncation(max_length=max_length)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, model_max_length=max_length, padding_side="right", truncation_side="right"
    )


def build_text_encoder(vocab_size: int, max_length: int, width: int = 64, layers: int = 2, heads: int = 2) -> nn.Module:
    """A ``CLIPTextModel`` with a ``width``-wide, ``layers``-deep transformer (MLP 2x wide) over
    ``vocab_size`` tokens and ``max_length`` positions; random weights (the global RNG)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        pad_token_id=0,
        bos_token_id=0,  # no BOS / EOS tokens: the pooled output is unused
        eos_token_id=0,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer, prompts: Sequence[str]) -> Tensor:
    """Token ids [B, L] of ``prompts``, padded / truncated to the tokenizer's ``model_max_length``."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise PPAPError(f"prompts must be a list of strings, got {prompts!r}")
    return tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def encode_text(text_encoder: nn.Module, input_ids: Tensor) -> Tensor:
    """The text encoder's last hidden states [B, L, D] for token ids [B, L] (no attention mask:
    padding is part of the prompt, as in Stable Diffusion's CLIP)."""
    return text_encoder(input_ids.to(next(text_encoder.parameters()).device)).last_hidden_state


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> Tensor:
    """``encode_text`` of ``tokenize(prompts)``, without gradients, in the encoder's dtype."""
    return encode_text(text_encoder, tokenize(tokenizer, prompts))


def load_text_components(folder) -> tuple[nn.Module | None, object]:
    """A pipeline folder's ``text_encoder/`` and ``tokenizer/`` (safetensors weights), of the
    transformers classes its ``model_index.json`` names; ``(None, None)`` when it has neither."""
    from pathlib import Path

    import transformers

    from .io import read_json

    folder = Path(folder)
    index_file = folder / "model_index.json"
    index = read_json(index_file, "pipeline index") if index_file.exists() else {}
    entries = {k: index.get(k) for k in ("text_encoder", "tokenizer")}
    if not any(isinstance(v, list) and len(v) == 2 and v[1] for v in entries.values()):
        return None, None
    names = {k: v[1] for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[0] == "transformers" and v[1]}
    if len(names) != 2:
        raise PPAPError(f"{index_file}: text_encoder and tokenizer must both be transformers classes, got {entries}")
    classes = {k: getattr(transformers, name, None) for k, name in names.items()}
    missing = [names[k] for k, c in classes.items() if c is None]
    if missing:
        raise PPAPError(f"{index_file}: transformers has no class {missing[0]!r}")
    try:
        text_encoder = classes["text_encoder"].from_pretrained(folder / "text_encoder", use_safetensors=True)  # type: ignore[union-attr]
        tokenizer = classes["tokenizer"].from_pretrained(folder / "tokenizer")  # type: ignore[union-attr]
    except (OSError, ValueError) as e:
        raise PPAPError(f"cannot load the text encoder in {folder} ({str(e).splitlines()[0][:200]})") from None
    return text_encoder, tokenizer
