"""Decoding only the features that fire, with exact gradients.

A CLT's dense decode costs O(N · F · L² · D / 2) per batch; with L0 active features per layer the sparse one
costs O(N · L0 · L² · D / 2). `torch.nn.functional.embedding_bag` with `per_sample_weights` computes
Σ_i a_i · W[i] per row without materializing the [nnz, n_out·D] gathered rows, and its backward gives the
decoder a (dense) gradient and the activations a gradient at every listed feature.

JumpReLU subtlety: the threshold's straight-through gradient reaches features whose pre-activation is just
*below* θ (inside the kernel window), where a = 0. Their ∂L/∂a = W_dec_i · ∂L/∂ŷ is not zero, so a sparse
decode that lists only active features would silently drop those gradients. `decode_mask` therefore also
lists the features inside the window (weight 0 in the forward, exact gradient in the backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cltrace.transcoders.transcoder import Transcoder


def decode_mask(tc: Transcoder, acts: Tensor, pre: Tensor | None) -> Tensor:
    """[N, L, F] bool: the features a decode must list to be exact in value and gradient."""
    mask = acts != 0
    if pre is not None and tc.cfg.activation == "jumprelu" and torch.is_grad_enabled():
        window = tc.threshold - tc.cfg.bandwidth / 2  # [L, F] lower edge of the STE kernel
        mask = mask | (pre.detach() > window.detach())
    return mask


class _PlaceOnLayers(torch.autograd.Function):
    """contribs[s] [N, n_s·D] -> [N, L, D], source layer s's contribution added to layers s .. s+n_s−1.

    The same sum written as `out[:, s:s+n] += c` under autograd would copy the whole [N, L, D] gradient once
    per source layer in the backward; here each source gets a view of the output gradient instead.
    """

    @staticmethod
    def forward(ctx, n_layers: int, d_model: int, *contribs: Tensor) -> Tensor:
        N = contribs[0].shape[0]
        out = contribs[0].new_zeros(N, n_layers, d_model)
        for s, c in enumerate(contribs):
            n = c.shape[1] // d_model
            out[:, s : s + n] += c.view(N, n, d_model)
        ctx.widths = [c.shape[1] // d_model for c in contribs]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        N = grad.shape[0]
        return (None, None, *(grad[:, s : s + n].reshape(N, -1) for s, n in enumerate(ctx.widths)))


def decode_partial(tc: Transcoder, acts: Tensor, mask: Tensor | None = None, *, sparse: bool = True) -> Tensor:
    """acts [N, L, F] -> Σ_s a_s W_dec[s] placed on target layers: [N, L, D], *without* b_dec and skip.

    Returning the feature part alone lets feature-sharded training all-reduce it across ranks before the
    bias is added once. `mask` [N, L, F] lists the features to decode (default: the nonzero ones).
    """
    N, L, Fn = acts.shape
    D = tc.d_model
    dtype = tc.b_dec.dtype
    if sparse:
        # one nonzero and one gather for all layers, grouped by layer then row (per-layer slicing of a
        # grad-carrying [N, L, F] tensor would allocate a full-size zero gradient per layer in the backward)
        m = (acts != 0) if mask is None else mask
        lay, rows, feats = m.transpose(0, 1).nonzero(as_tuple=True)  # sorted by layer, then row
        vals = acts[rows, lay, feats].to(dtype)  # [nnz]
        per_layer = torch.bincount(lay, minlength=L).tolist()
        rows, feats, vals = rows.split(per_layer), feats.split(per_layer), vals.split(per_layer)
    contribs = []
    for s in range(L):
        W = tc.W_dec[s].reshape(Fn, tc.n_out(s) * D)  # [F, n_out·D] (a view)
        if sparse:
            counts = torch.bincount(rows[s], minlength=N)
            offsets = torch.cumsum(counts, 0) - counts  # [N] start of each token's bag
            contribs.append(F.embedding_bag(feats[s], W, offsets, mode="sum", per_sample_weights=vals[s]))
        else:
            contribs.append(acts[:, s].to(W.dtype) @ W)  # [N, n·D]
    return _PlaceOnLayers.apply(L, D, *contribs)


def finish_decode(tc: Transcoder, partial: Tensor, x: Tensor | None) -> Tensor:
    """Add b_dec and the skip term to a (reduced) feature reconstruction: [N, L, D]."""
    out = partial + tc.b_dec
    if tc.W_skip is not None and x is not None:
        out = out + torch.einsum("nld,lde->nle", x, tc.W_skip)
    return out


def should_decode_sparse(mask: Tensor, setting: str = "auto", max_density: float = 0.05) -> bool:
    """'auto': sparse when at most `max_density` of the (listed) features are nonzero, except on a GPU under
    bf16/fp16 autocast, where tensor-core matmuls beat `embedding_bag` however sparse the features
    (H200, CLT F=2048 on Gemma-3-270M, 1.6% active, batch 4096: 35 ms a step dense against 114 ms sparse;
    in fp32 sparse still wins, 121 against 142 ms). On a CPU the gather wins (docs/training.md)."""
    if setting in ("always", "sparse", True):
        return True
    if setting in ("never", "dense", False):
        return False
    if mask.is_cuda and torch.is_autocast_enabled("cuda"):
        return False
    return mask.float().mean().item() <= max_density
