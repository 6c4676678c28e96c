"""Where each supported architecture keeps its pieces, and the few ways the blocks differ.

A `Family` is a table of small functions; `ModelAdapter.forward` calls them in the same order for every
model, so the block structure lives in one place:

    x = embed(ids)
    for each block:  h = norm_attn_in(x); a = attention(h); [a = norm_attn_out(a)]; x += a
                     m = mlp(norm_mlp_in(x)); [m = norm_mlp_out(m)]; x += m
    logits = unembed(final_norm(x))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Family:
    name: str
    norm_kind: str  # "rms" (Llama, Qwen), "rms_gemma" ((1 + w), float32), "layernorm" (GPT-2)
    body: Callable  # hf model -> base model holding embeddings and blocks
    blocks: Callable  # base -> list of blocks
    embed: Callable  # (base, ids [B,T]) -> [B,T,D]
    norms: Callable  # block -> {"attn_in", "mlp_in", optional "attn_out", "mlp_out"} modules
    attn_module: Callable  # block -> attention module
    qkv: Callable  # (attn, h [B,T,D], need_qk) -> q [B,H,T,Dh] | None, k [B,K,T,Dh] | None, v [B,K,T,Dh]
    attn_out: Callable  # (attn, [B,T,H*Dh]) -> [B,T,D]
    mlp: Callable  # (block, mlp_in) -> raw MLP output
    final_norm: Callable  # base -> final norm module
    rope: Callable  # (adapter, x, T) -> {layer_type: (cos, sin)} or None


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, T, n*Dh] -> [B, n, T, Dh]."""
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


# ---------------------------------------------------------------------- Llama, Qwen 2/3, Gemma 2/3
def _hf_qkv(attn, h: Tensor, need_qk: bool):
    hd = attn.head_dim
    v = _split_heads(attn.v_proj(h), hd)
    if not need_qk:
        return None, None, v
    B, T, _ = h.shape
    q = attn.q_proj(h).view(B, T, -1, hd)
    k = attn.k_proj(h).view(B, T, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen 3, Gemma 3: per-head RMSNorm on queries and keys
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v


def _hf_rope(adapter, x: Tensor, T: int):
    pos = torch.arange(T, device=x.device)[None].expand(x.shape[0], T)
    rotary = adapter.body.rotary_emb
    if adapter.family.name == "gemma3":  # local (sliding) and global layers use different RoPE bases
        return {t: rotary(x, pos, t) for t in set(adapter.layer_types)}
    cos_sin = rotary(x, pos)
    return {t: cos_sin for t in set(adapter.layer_types)}


def _llama_like(name: str, norm_kind: str, gemma: bool) -> Family:
    def norms(block):
        if gemma:
            return {
                "attn_in": block.input_layernorm,
                "attn_out": block.post_attention_layernorm,
                "mlp_in": block.pre_feedforward_layernorm,
                "mlp_out": block.post_feedforward_layernorm,
            }
        return {"attn_in": block.input_layernorm, "mlp_in": block.post_attention_layernorm}

    return Family(
        name=name,
        norm_kind=norm_kind,
        body=lambda hf: hf.model,
        blocks=lambda base: base.layers,
        embed=lambda base, ids: base.embed_tokens(ids),  # Gemma's module includes the sqrt(D) scale
        norms=norms,
        attn_module=lambda block: block.self_attn,
        qkv=_hf_qkv,
        attn_out=lambda attn, o: attn.o_proj(o),
        mlp=lambda block, x: block.mlp(x),
        final_norm=lambda base: base.norm,
        rope=_hf_rope,
    )


# ---------------------------------------------------------------------- GPT-2
def _gpt2_qkv(attn, h: Tensor, need_qk: bool):
    q, k, v = attn.c_attn(h).split(attn.split_size, dim=2)
    hd = attn.head_dim
    if not need_qk:
        return None, None, _split_heads(v, hd)
    return _split_heads(q, hd), _split_heads(k, hd), _split_heads(v, hd)


def _gpt2_embed(base, ids: Tensor) -> Tensor:
    pos = torch.arange(ids.shape[1], device=ids.device)
    return base.wte(ids) + base.wpe(pos)[None]


GPT2 = Family(
    name="gpt2",
    norm_kind="layernorm",
    body=lambda hf: hf.transformer,
    blocks=lambda base: base.h,
    embed=_gpt2_embed,
    norms=lambda block: {"attn_in": block.ln_1, "mlp_in": block.ln_2},
    attn_module=lambda block: block.attn,
    qkv=_gpt2_qkv,
    attn_out=lambda attn, o: attn.c_proj(o),
    mlp=lambda block, x: block.mlp(x),
    final_norm=lambda base: base.ln_f,
    rope=lambda adapter, x, T: None,
)

# config.model_type -> family
FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama", "rms", gemma=False),
    "qwen2": _llama_like("qwen2", "rms", gemma=False),
    "qwen3": _llama_like("qwen3", "rms", gemma=False),
    "gemma2": _llama_like("gemma2", "rms_gemma", gemma=True),
    "gemma3_text": _llama_like("gemma3", "rms_gemma", gemma=True),
    "gpt2": GPT2,
}
