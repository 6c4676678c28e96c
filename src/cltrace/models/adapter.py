"""One interface over HuggingFace causal LMs: the forward pass written out, block by block.

Everything downstream (activation harvesting, the replacement model, attribution, interventions) calls
`ModelAdapter.forward`. Writing the forward ourselves over the HF modules' weights, instead of hooking
HF's own forward, gives three things that hooks make fragile:

* the transcoder's read point (`mlp_in`, the normalized MLP input) and write point (`mlp_out`, exactly what
  the block adds to the residual stream; for Gemma after the post-feedforward norm) are plain variables;
* `mlp_hook(layer, mlp_in, mlp_out) -> mlp_out` replaces, patches, records or detaches any MLP output;
* *frozen* mode: attention patterns and normalization scales (1/rms, 1/std) are taken from a reference
  pass (`Frozen`), so the map from MLP outputs and embeddings to later MLP inputs and logits is linear.

Shapes: B batch, T positions, D d_model, H query heads, K key/value heads, Dh head dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.models.families import FAMILIES, Family

MlpHook = Callable[[int, Tensor, Tensor], Tensor]  # (layer, mlp_in [B,T,D], mlp_out [B,T,D]) -> mlp_out


@dataclass
class Frozen:
    """Attention patterns and normalization scales of one reference pass.

    patterns[l]: [B, H, T, T] softmax attention of layer l. scales[name]: [B, T, 1] the 1/rms (or 1/std)
    factor of each norm, keyed "{layer}.{norm}" or "final".
    """

    patterns: list[Tensor] = field(default_factory=list)
    scales: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> Frozen:
        return Frozen([p.detach() for p in self.patterns], {k: v.detach() for k, v in self.scales.items()})


@dataclass
class Trace:
    """What one forward pass saw. Lists are indexed by layer; each tensor is [B, T, D]."""

    embed: Tensor  # [B, T, D] what enters the residual stream before block 0 (token + position)
    resid_pre: list[Tensor]
    resid_mid: list[Tensor]  # after attention, before the MLP
    mlp_in: list[Tensor]  # what a transcoder reads
    mlp_out: list[Tensor]  # what a transcoder reconstructs (after any hook)
    resid_final: Tensor  # after the last block, before the final norm
    final_normed: Tensor  # [B, T, D] input of the unembedding
    logits: Tensor | None  # [B, T, V] (None when stopped early)
    frozen: Frozen


class ModelAdapter:
    """A HF causal LM seen as embed -> blocks (attention, MLP) -> final norm -> unembed."""

    def __init__(self, hf_model: torch.nn.Module, tokenizer, name: str):
        config = hf_model.config
        model_type = getattr(config, "model_type", "?")
        if model_type not in FAMILIES:
            supported = ", ".join(sorted(FAMILIES))
            raise CltraceError(f"unsupported architecture {model_type!r}: cltrace supports {supported}")
        self.family: Family = FAMILIES[model_type]
        self.hf = hf_model.eval()
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.body = self.family.body(hf_model)
        self.blocks = list(self.family.blocks(self.body))
        self.n_layers = len(self.blocks)
        self.d_model = int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd)
        self.vocab_size = int(config.vocab_size)
        self.n_ctx = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        )
        layer_types = getattr(config, "layer_types", None)
        self.layer_types: list[str] = list(layer_types) if layer_types else ["full_attention"] * self.n_layers
        self.sliding_window = getattr(config, "sliding_window", None)
        self.n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.tokenizer is not None else None

    # ------------------------------------------------------------------ tokens
    def tokenize(self, prompt: str, *, max_len: int | None = None) -> Tensor:
        """Prompt -> [T] token ids with BOS first (added if the tokenizer does not add it)."""
        if not prompt or not prompt.strip():
            raise CltraceError("the prompt is empty: give some text to run the model on")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = self.bos_token_id
        if bos is None:  # GPT-2 style: use the end-of-text token as the start token
            bos = self.tokenizer.eos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + list(ids)
        limit = max_len or self.n_ctx
        if len(ids) > limit:
            raise CltraceError(
                f"the prompt has {len(ids)} tokens but the model takes at most {limit}: shorten it"
            )
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def decode(self, ids) -> list[str]:
        """Each token id as its own string (for display)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # ------------------------------------------------------------------ pieces of the forward
    def embed(self, ids: Tensor) -> Tensor:
        """[B, T] ids -> [B, T, D] residual stream entering block 0."""
        return self.family.embed(self.body, ids)

    def unembed(self, final_normed: Tensor) -> Tensor:
        """[.., D] -> [.., V] logits, with Gemma's final soft-capping where the config asks for it."""
        logits = self.hf.get_output_embeddings()(final_normed)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def W_U(self) -> Tensor:
        """[V, D] unembedding matrix (logits = final_normed @ W_U.T before any soft-cap)."""
        return self.hf.get_output_embeddings().weight

    def norm(self, module, x: Tensor, key: str, frozen: Frozen | None, record: Frozen) -> Tensor:
        """Apply a norm whose 1/rms (or 1/std) factor is taken from `frozen` when given.

        With the factor frozen the norm is a linear map of x, which is what attribution needs.
        """
        kind = self.family.norm_kind
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # HF norms compute in >= fp32
        if kind == "layernorm":
            centered = xf - xf.mean(-1, keepdim=True)
            scale = frozen.scales[key] if frozen is not None else torch.rsqrt(
                centered.pow(2).mean(-1, keepdim=True) + module.eps
            )
            record.scales[key] = scale
            return ((centered * scale).to(x.dtype)) * module.weight + module.bias
        scale = frozen.scales[key] if frozen is not None else torch.rsqrt(
            xf.pow(2).mean(-1, keepdim=True) + _eps(module)
        )
        record.scales[key] = scale
        if kind == "rms_gemma":  # Gemma: (1 + w), multiplied in float32
            return ((xf * scale) * (1.0 + module.weight.to(xf.dtype))).type_as(x)
        return module.weight * (xf * scale).to(x.dtype)

    def attention(
        self, layer: int, h: Tensor, rope: tuple[Tensor, Tensor] | None, frozen: Frozen | None,
        record: Frozen,
    ) -> Tensor:
        """[B, T, D] normalized input -> [B, T, D] attention output (before any post-attention norm)."""
        attn = self.family.attn_module(self.blocks[layer])
        q, k, v = self.family.qkv(attn, h, frozen is None)  # [B, H|K, T, Dh]; q, k unused when frozen
        B, K, T, _ = v.shape
        n_rep = self.n_heads // K
        if frozen is not None:
            pattern = frozen.patterns[layer]
        else:
            if rope is not None:
                q, k = _apply_rope(q, k, *rope)
            k = _repeat_kv(k, n_rep)
            scores = (q @ k.transpose(2, 3)) * attn.scaling  # [B, H, T, T]
            cap = getattr(self.config, "attn_logit_softcapping", None)
            if cap:
                scores = torch.tanh(scores / cap) * cap
            window = self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
            scores = scores + _causal_mask(T, window, scores.device, scores.dtype)
            pattern = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
            pattern = pattern.to(q.dtype)
        record.patterns.append(pattern)
        out = pattern @ _repeat_kv(v, n_rep)  # [B, H, T, Dh]
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.family.attn_out(attn, out)

    # ------------------------------------------------------------------ the forward pass
    def forward(
        self,
        ids: Tensor,
        *,
        mlp_hook: MlpHook | None = None,
        frozen: Frozen | None = None,
        embed_hook: Callable[[Tensor], Tensor] | None = None,
        stop_at_layer: int | None = None,
        compute_logits: bool = True,
    ) -> Trace:
        """Run the model on ids [T] or [B, T].

        mlp_hook: sees (layer, mlp_in, true mlp_out) and returns what is added to the residual stream.
        frozen: attention patterns and norm scales to use instead of computing them (see `Frozen`).
        embed_hook: replaces the embedding output (attribution uses it to make it a gradient leaf).
        stop_at_layer: run only blocks < stop_at_layer (no logits); harvesting activations needs no more.
        """
        if ids.dim() == 1:
            ids = ids[None]
        record = Frozen()
        x = self.embed(ids)
        if embed_hook is not None:
            x = embed_hook(x)
        embed = x
        T = ids.shape[1]
        ropes = self.family.rope(self, x, T)
        fam = self.family
        resid_pre, resid_mid, mlp_ins, mlp_outs = [], [], [], []
        n_run = self.n_layers if stop_at_layer is None else stop_at_layer
        for layer in range(n_run):
            block = self.blocks[layer]
            resid_pre.append(x)
            norms = fam.norms(block)
            h = self.norm(norms["attn_in"], x, f"{layer}.attn_in", frozen, record)
            a = self.attention(layer, h, ropes[self.layer_types[layer]] if ropes else None, frozen, record)
            if "attn_out" in norms:
                a = self.norm(norms["attn_out"], a, f"{layer}.attn_out", frozen, record)
            x = x + a
            resid_mid.append(x)
            m_in = self.norm(norms["mlp_in"], x, f"{layer}.mlp_in", frozen, record)
            m_out = fam.mlp(block, m_in)
            if "mlp_out" in norms:  # Gemma's post-feedforward norm belongs to the MLP (it is replaced)
                m_out = self.norm(norms["mlp_out"], m_out, f"{layer}.mlp_out", None, record)
            if mlp_hook is not None:
                m_out = mlp_hook(layer, m_in, m_out)
            mlp_ins.append(m_in)
            mlp_outs.append(m_out)
            x = x + m_out
        logits = None
        final_normed = x
        if stop_at_layer is None:
            final_normed = self.norm(fam.final_norm(self.body), x, "final", frozen, record)
            if compute_logits:
                logits = self.unembed(final_normed)
        return Trace(embed, resid_pre, resid_mid, mlp_ins, mlp_outs, x, final_normed, logits, record)

    @torch.no_grad()
    def logits(self, ids: Tensor) -> Tensor:
        """[T] or [B, T] -> [B, T, V]; the plain HF forward (the reference everything is tested against)."""
        if ids.dim() == 1:
            ids = ids[None]
        return self.hf(input_ids=ids).logits


# ---------------------------------------------------------------------- helpers
def _eps(norm_module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm_module, name):
            return float(getattr(norm_module, name))
    raise AttributeError(f"cannot find epsilon of {type(norm_module).__name__}")


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, K, T, Dh] -> [B, K*n_rep, T, Dh] for grouped-query attention."""
    if n_rep == 1:
        return x
    B, K, T, Dh = x.shape
    return x[:, :, None].expand(B, K, n_rep, T, Dh).reshape(B, K * n_rep, T, Dh)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_MASKS: dict = {}


def _causal_mask(T: int, window: int | None, device, dtype) -> Tensor:
    """[T, T] additive mask: 0 where key j is visible from query i (j <= i, and i - j < window)."""
    key = (T, window, str(device), dtype)
    if key not in _MASKS:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        visible = j <= i
        if window is not None:
            visible &= j > i - window
        if len(_MASKS) > 16:
            _MASKS.clear()
        _MASKS[key] = torch.zeros(T, T, device=device, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return _MASKS[key]

