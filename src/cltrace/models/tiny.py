"""Tiny random models of every supported family, built offline from a config (for tests and demos).

Weights are randomized beyond HF's init (norm weights, biases) so that a forward pass that forgets a
norm weight, a bias or Gemma's (1 + w) is caught by the comparison against the HF forward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cltrace.models.adapter import ModelAdapter

FAMILY_NAMES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")


def byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges (256 bytes + <bos>, <eos>, <pad>), needing no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_config(family: str, *, n_layers: int = 4, d_model: int = 64, vocab_size: int = 264):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if family == "gemma2":
        return Gemma2Config(
            **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, layer_types=alternating,
        )
    if family == "gemma3":
        return Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=3, layer_types=alternating,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=512,
            bos_token_id=256, eos_token_id=257, tie_word_embeddings=False,
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILY_NAMES}")


def tiny_hf_model(family: str, seed: int = 0, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights and biases: make them matter
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(dtype))
            else:  # larger weights than HF's 0.02 init so that attention patterns are not uniform
                p.mul_(4.0)
    return model.eval()


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    """A `ModelAdapter` over a tiny random model of `family` with the byte tokenizer."""
    return ModelAdapter(tiny_hf_model(family, seed, dtype, **kw), byte_tokenizer(), f"tiny-{family}")


def save_tiny(family: str, folder: str | Path, seed: int = 0, **kw) -> Path:
    """Write a tiny model as a HF folder (config.json, model.safetensors, tokenizer) loadable by path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_hf_model(family, seed, **kw).save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return folder
