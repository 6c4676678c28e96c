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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


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


class _TiledSparseDecode(torch.autograd.Function):
    """Σ_{s ≤ t} A_s W_dec[s→t] for every target layer t, one (source, target) decoder tile at a time.

    A_s [N, F] is source layer s's sparse activation matrix, listed by `rows[s]`, `feats[s]` (sorted by row)
    and `vals` [nnz]. Decoding tile by tile keeps one [F, D] block (5 MB at F=2048, D=640) in cache while all
    the tokens that use it read it; a whole source at once ([F, n·D] rows, 94 MB for s=0) reads each active
    row from memory again per token: 1.9 against 8.3 ms per tile on this 2-core CPU. Transcoder stores W_dec
    target-major, so a tile is a contiguous view, not a copy.

        out[:, t]   += embedding_bag(feats_s, W[s→t], bags = rows,      weights = vals_s)     [N, D]
        ∂vals_s     += (g_t W[s→t]ᵀ) at A_s's nonzeros only               (sampled_addmm)     [nnz_s]
        ∂W[s→t]      = A_sᵀ g_t = embedding_bag(rows_s, g_t, bags = features, weights = vals_s) [F, D]
    """

    @staticmethod
    def forward(ctx, listing: Listing, vals: Tensor, *W_dec: Tensor) -> Tensor:
        N, L, D = listing.n_tokens, len(W_dec), W_dec[0].shape[-1]
        rows, feats, vals_s = listing.by_layer(listing.rows), listing.by_layer(listing.feats), listing.by_layer(vals)
        out = vals.new_zeros(L, N, D)  # target-major, the layout of the trainer's x and y
        for s, W in enumerate(W_dec):  # W [F, n_out, D]
            if len(rows[s]) == 0:
                continue
            offsets = _bag_offsets(rows[s], N)
            for j in range(W.shape[1]):
                out[s + j] += F.embedding_bag(feats[s], W[:, j].contiguous(), offsets, mode="sum",
                                              per_sample_weights=vals_s[s])
        ctx.listing = listing
        ctx.save_for_backward(vals, *W_dec)
        return out.transpose(0, 1)  # [N, L, D]

    @staticmethod
    def backward(ctx, grad: Tensor):
        vals, *W_dec = ctx.saved_tensors
        lst = ctx.listing
        rows, feats, vals_s = lst.by_layer(lst.rows), lst.by_layer(lst.feats), lst.by_layer(vals)
        N = grad.shape[0]
        g = grad.transpose(0, 1).contiguous()  # [L, N, D] each target's gradient contiguous (usually a view)
        dvals, dW = [], []
        for s, W in enumerate(W_dec):
            Fn, n_out = W.shape[0], W.shape[1]
            dv = vals_s[s].new_zeros(len(rows[s]))
            gW = torch.empty_like(W) if ctx.needs_input_grad[2 + s] else None  # W's strides: tiles contiguous
            if len(rows[s]) == 0 and gW is not None:
                gW.zero_()
            elif len(rows[s]):
                crow = torch.cat([_bag_offsets(rows[s], N), rows[s].new_tensor([len(rows[s])])])
                with warnings.catch_warnings():  # "CSR support is in beta": nothing a user can act on
                    warnings.simplefilter("ignore")
                    pattern = torch.sparse_csr_tensor(crow, feats[s], vals_s[s], (N, Fn))  # for sampled_addmm
                by_feat, rows_f, feat_offsets = lst.by_feature(s, Fn)  # the same nonzeros grouped by feature
                vals_f = vals_s[s][by_feat]
                for j in range(n_out):
                    t = s + j
                    if ctx.needs_input_grad[1]:
                        dv += torch.sparse.sampled_addmm(pattern, g[t], W[:, j].contiguous().t(), beta=0.0).values()
                    if gW is not None:
                        gW[:, j] = F.embedding_bag(rows_f, g[t], feat_offsets, mode="sum", per_sample_weights=vals_f)
            dvals.append(dv)
            dW.append(gW)
        return (None, torch.cat(dvals), *dW)


def _bag_offsets(sorted_ids: Tensor, n: int) -> Tensor:
    """[n] start of each id's run in a sorted id list (empty runs allowed): embedding_bag offsets, CSR rows."""
    counts = torch.bincount(sorted_ids, minlength=n)
    return torch.cumsum(counts, 0) - counts


@dataclass
class Listing:
    """The (token, feature) pairs a sparse decode lists: grouped by source layer, then sorted by token."""

    lay: Tensor  # [nnz] source layer of each entry
    rows: Tensor  # [nnz] token
    feats: Tensor  # [nnz] feature
    per_layer: list[int]  # entries per source layer
    n_tokens: int
    _by_feature: dict = field(default_factory=dict, repr=False)  # (layer, F) -> by_feature(layer, F), once

    @staticmethod
    def of(mask: Tensor) -> Listing:
        """mask [N, L, F] bool -> its nonzeros, in the order the tiled decode and the encoder backward need."""
        lay, rows, feats = mask.transpose(0, 1).nonzero(as_tuple=True)  # sorted by layer, then row, then feature
        return Listing(lay, rows, feats, torch.bincount(lay, minlength=mask.shape[1]).tolist(), mask.shape[0])

    def gather(self, t: Tensor) -> Tensor:
        """t [N, L, F] -> [nnz]. Indexed through the layer-major view, so that the gradient of t is laid out as
        the encoder's bmm lays out pre-activations: mixed memory layouts cost [N, L, F] copies in the backward."""
        return t.transpose(0, 1)[self.lay, self.rows, self.feats]

    def scatter(self, vals: Tensor, like: Tensor) -> Tensor:
        """vals [nnz] -> a dense [N, L, F] tensor shaped like `like`, zero where nothing is listed; laid out
        layer-major ([L, N, F] in memory), the layout of the encoder's pre-activations."""
        dense = like.new_zeros(like.shape[1], like.shape[0], like.shape[2], dtype=vals.dtype)  # [L, N, F]
        dense[self.lay, self.rows, self.feats] = vals
        return dense.transpose(0, 1)

    def by_layer(self, t: Tensor) -> tuple[Tensor, ...]:
        return t.split(self.per_layer)

    def by_feature(self, layer: int, n_features: int) -> tuple[Tensor, Tensor, Tensor]:
        """Layer `layer`'s entries grouped by feature, for the ∂W products (decoder and encoder backward):
        (order [nnz_l] into the layer's entries, their tokens in that order, [F] embedding_bag offsets)."""
        if (layer, n_features) not in self._by_feature:
            rows, feats = self.by_layer(self.rows)[layer], self.by_layer(self.feats)[layer]
            order = feats.argsort(stable=True)
            self._by_feature[layer, n_features] = (order, rows[order], _bag_offsets(feats[order], n_features))
        return self._by_feature[layer, n_features]


class _ListedPreActs(torch.autograd.Function):
    """The pre-activations at the listed entries, differentiable in W_enc and b_enc only there: [nnz].

    For TopK and BatchTopK an active feature's activation *is* its pre-activation, and an inactive one gets no
    gradient, so ∂L/∂W_enc[l] = x_lᵀ G_l with G_l [N, F] nonzero only at the listed entries: a sparse product
    (embedding_bag over x_l, one bag per feature), where the dense bmm backward multiplies 98% zeros.

        ∂W_enc[l][:, f] = Σ_{listed (n, f)} ∂vals · x[n, l]        ∂b_enc[l, f] = Σ_{listed (n, f)} ∂vals
    """

    @staticmethod
    def forward(ctx, x: Tensor, pre: Tensor, listing: Listing, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        ctx.listing, ctx.n_features = listing, W_enc.shape[-1]
        ctx.save_for_backward(x)
        return listing.gather(pre).to(W_enc.dtype)

    @staticmethod
    def backward(ctx, dvals: Tensor):
        (x,) = ctx.saved_tensors
        lst, Fn = ctx.listing, ctx.n_features
        x_layers = x.transpose(0, 1).contiguous()  # [L, N, D] each layer's rows contiguous (the trainer's x is)
        gW = x.new_empty(x.shape[1], Fn, x.shape[2])  # [L, F, D], one embedding_bag per layer
        for l, dv in enumerate(lst.by_layer(dvals)):
            by_feat, rows_f, feat_offsets = lst.by_feature(l, Fn)
            gW[l] = F.embedding_bag(rows_f, x_layers[l], feat_offsets, mode="sum",
                                    per_sample_weights=dv[by_feat].to(x.dtype))
        gb = dvals.new_zeros(x.shape[1], Fn).index_put_((lst.lay, lst.feats), dvals, accumulate=True)
        return None, None, None, gW.transpose(1, 2), gb  # [L, D, F] (autograd lays it out as W_enc, one copy)


def decode_listed(W_dec: Sequence[Tensor], listing: Listing, vals: Tensor) -> Tensor:
    """The listed activations vals [nnz] -> Σ_s a_s W_dec[s] placed on target layers: [N, L, D], no bias."""
    return _TiledSparseDecode.apply(listing, vals, *W_dec)


def listed_pre_acts(W_enc: Tensor, b_enc: Tensor, x: Tensor, pre: Tensor, listing: Listing) -> Tensor:
    """pre [N, L, F] computed without autograd -> its listed values [nnz], differentiable in W_enc and b_enc."""
    return _ListedPreActs.apply(x, pre, listing, W_enc, b_enc)


def decode_dense(W_dec: Sequence[Tensor], acts: Tensor, d_model: int) -> Tensor:
    """acts [N, L, F] -> Σ_s a_s W_dec[s] placed on target layers: [N, L, D], no bias; one matmul per source."""
    Fn = acts.shape[2]
    contribs = [acts[:, s].to(W.dtype) @ W.reshape(Fn, -1) for s, W in enumerate(W_dec)]  # [N, n_out·D]
    return _PlaceOnLayers.apply(len(W_dec), d_model, *contribs)


def decode_rows(W: Tensor, a: Tensor) -> Tensor:
    """One source layer: a [N, F] (mostly zeros) -> Σ_i a_i W[i] per row, W [F, n_out, D] -> [N, n_out, D].

    `embedding_bag` sums the active rows without materializing the [nnz, n_out·D] gathered copy."""
    N, Fn = a.shape
    rows, feats = a.nonzero(as_tuple=True)  # sorted by row
    out = F.embedding_bag(feats, W.reshape(Fn, -1), _bag_offsets(rows, N), mode="sum",
                          per_sample_weights=a[rows, feats].to(W.dtype))
    return out.view(N, *W.shape[1:])


def should_decode_sparse(density: float, device: torch.device, setting: str = "auto",
                         max_density: float = 0.05) -> bool:
    """'auto': sparse when at most `max_density` of the (listed) features are nonzero, except on a GPU under
    bf16/fp16 autocast, where tensor-core matmuls beat `embedding_bag` however sparse the features
    (H200, CLT F=2048 on Gemma-3-270M, 1.6% active, batch 4096: 35 ms a step dense against 114 ms sparse;
    in fp32 sparse still wins, 121 against 142 ms). On a CPU the gather wins (docs/training.md)."""
    if setting in ("always", "sparse", True):
        return True
    if setting in ("never", "dense", False):
        return False
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return False
    return density <= max_density
