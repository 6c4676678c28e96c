"""The model's forward with attention patterns and norm scales frozen, and the MLPs handed to a callback.

With `Frozen` patterns and 1/rms scales every block is an affine map of the residual stream, so the whole
pass is affine in (embeddings, MLP outputs): this is the skeleton of the local replacement model and of
attribution. It differs from `ModelAdapter.forward` in two ways that matter here: the callback also sees
`resid_mid` (circuit-tracer's CLTs read there, before the MLP norm), and the real MLP is never run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from cltrace.models.adapter import Frozen, ModelAdapter

# (layer, resid_mid [B,T,D], mlp_in [B,T,D]) -> what the block adds to the residual stream [B,T,D]
MlpFn = Callable[[int, Tensor, Tensor], Tensor]


@dataclass
class FrozenPass:
    resid_mid: list[Tensor]  # [B, T, D] per layer
    mlp_in: list[Tensor]  # [B, T, D] per layer
    final_normed: Tensor | None  # [B, T, D]; None when stopped early


def frozen_prefix(frozen: Frozen, n_pos: int) -> Frozen:
    """The frozen patterns/scales of positions < n_pos: by causality, the pass of the prefix ids[:n_pos]."""
    if frozen.patterns and frozen.patterns[0].shape[-1] == n_pos:
        return frozen
    patterns = [p[..., :n_pos, :n_pos] for p in frozen.patterns]
    return Frozen(patterns, {k: v[:, :n_pos] for k, v in frozen.scales.items()})


def frozen_forward(model: ModelAdapter, embed: Tensor, frozen: Frozen, mlp: MlpFn,
                   stop_at_layer: int | None = None) -> FrozenPass:
    """embed [B, T, D] (what enters block 0) -> every layer's MLP read points and the final-normed stream.

    embed may be a prefix (T smaller than the frozen pass's) when `frozen` is `frozen_prefix(.., T)`.
    stop_at_layer: stop once the read points of that layer are computed (its MLP and later blocks are not
    run, `mlp` is called for earlier layers only, final_normed is None).
    """
    fam, record = model.family, Frozen()  # `record` is required by the adapter's pieces; unused here
    x = embed
    resid_mid, mlp_in = [], []
    for layer, block in enumerate(model.blocks):
        norms = fam.norms(block)
        h = model.norm(norms["attn_in"], x, f"{layer}.attn_in", frozen, record)
        a = model.attention(layer, h, None, frozen, record)  # frozen: rope and q/k are not needed
        if "attn_out" in norms:
            a = model.norm(norms["attn_out"], a, f"{layer}.attn_out", frozen, record)
        x = x + a
        m_in = model.norm(norms["mlp_in"], x, f"{layer}.mlp_in", frozen, record)
        resid_mid.append(x)
        mlp_in.append(m_in)
        if layer == stop_at_layer:
            return FrozenPass(resid_mid, mlp_in, None)
        x = x + mlp(layer, x, m_in)
    final = model.norm(fam.final_norm(model.body), x, "final", frozen, record)
    return FrozenPass(resid_mid, mlp_in, final)
