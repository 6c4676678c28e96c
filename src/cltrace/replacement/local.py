"""The local replacement model of one prompt (Ameisen et al. 2025, §"The local replacement model").

One pass of the real model records, at every layer and position: the transcoder's read point, the true
MLP output, the token embeddings and the attention patterns / norm scales (`Frozen`). The local replacement
model then swaps every MLP for  transcoder(x) + error,  with

    error[l, p] = true_mlp_out[l, p] − reconstruction[l, p]          (a constant of the prompt)

and keeps patterns and norm denominators frozen, so it reproduces the model's logits exactly while every
non-linearity left is a transcoder feature. Following circuit-tracer, position 0 (BOS) carries no features
and a zero error: its MLP output is just the true one, a constant (like a bias) that attribution ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cltrace.models.adapter import Frozen, ModelAdapter
from cltrace.replacement.forward import frozen_forward
from cltrace.transcoders.io import check_fits
from cltrace.transcoders.transcoder import Transcoder


@dataclass
class ActiveFeatures:
    """Active (layer, pos, feature) triples, sorted in that order (circuit-tracer's node order)."""

    layer: Tensor  # [n] long
    pos: Tensor  # [n] long
    index: Tensor  # [n] long, feature index within its layer
    act: Tensor  # [n] activation value
    pre: Tensor  # [n] pre-activation without b_enc (what attribution explains)
    enc: Tensor | None = None  # [n, D] their encoder columns, kept when the encoder was read from disk (lazy)

    def __len__(self) -> int:
        return int(self.layer.numel())

    def select(self, keep: Tensor) -> ActiveFeatures:
        return ActiveFeatures(self.layer[keep], self.pos[keep], self.index[keep], self.act[keep], self.pre[keep],
                              None if self.enc is None else self.enc[keep])

    def layer_slices(self, n_layers: int) -> list[slice]:
        """slice of the features of each source layer (they are sorted by layer)."""
        bounds = torch.searchsorted(self.layer, torch.arange(n_layers + 1, device=self.layer.device)).tolist()
        return [slice(bounds[s], bounds[s + 1]) for s in range(n_layers)]


@dataclass
class LocalReplacement:
    model: ModelAdapter
    tc: Transcoder
    ids: Tensor  # [T]
    frozen: Frozen  # patterns [1,H,T,T] and norm scales [1,T,1] of the reference pass
    embed: Tensor  # [T, D] token (+ position) embeddings: the token nodes' output vectors
    inputs: Tensor  # [L, T, D] transcoder inputs of the reference pass
    mlp_out: Tensor  # [L, T, D] true MLP outputs
    skip: Tensor | None  # [L, T, D] skip term x @ W_skip at the reference inputs
    error: Tensor  # [L, T, D] true − reconstruction, 0 at position 0
    features: ActiveFeatures
    last_logits: Tensor  # [V] the model's own logits at the last position

    @property
    def n_pos(self) -> int:
        return int(self.ids.numel())

    @torch.no_grad()
    def forward(self, last_only: bool = False) -> Tensor:
        """Run the replacement model itself (features re-encoded from its own stream) -> logits [T, V]
        (or [1, V] for the last position only: the unembedding is the costly part for big vocabularies)."""
        tc = self.tc
        writes = torch.zeros_like(self.inputs, dtype=tc.b_dec.dtype)  # [L, T, D] decoder sums per target layer

        def mlp(layer: int, resid_mid: Tensor, mlp_in: Tensor) -> Tensor:
            x = tc.select_input(resid_mid, mlp_in)[0].to(tc.b_enc.dtype)  # [T, D]
            a = tc.activate(tc.pre_acts(x, layer), layer, training=False)  # [T, F]
            a[0] = 0
            writes[tc.target_layers(layer)] += decode_active(tc, layer, a).transpose(0, 1)
            out = writes[layer] + tc.b_dec[layer]
            if tc.W_skip is not None:
                out = out + x @ tc.W_skip[layer]
            out = out.to(self.error.dtype) + self.error[layer]
            out[0] = self.mlp_out[layer, 0]  # BOS: the true output, a constant
            return out[None]

        fp = frozen_forward(self.model, self.embed[None], self.frozen, mlp)
        final = fp.final_normed[0, -1:] if last_only else fp.final_normed[0]
        return self.model.unembed(final)


@torch.no_grad()
def encode_features(tc: Transcoder, inputs: Tensor) -> ActiveFeatures:
    """inputs [L, T, D] -> active features at positions ≥ 1, sorted by (layer, pos, feature).

    A lazy transcoder's encoder columns of the active features are kept (`enc`) while each layer's encoder is
    in memory, so that attribution does not read the encoders from disk again for its seeds."""
    parts, encs = [], []
    for s in range(tc.n_layers):
        x = inputs[s].to(tc.b_enc.dtype)
        W = tc.encoder(s)  # [D, F]
        pre = tc.pre_acts(x, s, W=W)  # [T, F]
        a = tc.activate(pre, s, training=False)
        a[0] = 0  # BOS: circuit-tracer's convention, its features are dropped
        pos, feat = a.nonzero(as_tuple=True)  # row-major: sorted by pos then feature
        layer = torch.full_like(pos, s)
        parts.append((layer, pos, feat, a[pos, feat], pre[pos, feat] - tc.b_enc[s, feat]))
        if tc.lazy:
            encs.append(W[:, feat].T)  # [n_s, D]
    feats = ActiveFeatures(*(torch.cat([p[i] for p in parts]) for i in range(5)))
    feats.enc = torch.cat(encs) if encs else None
    return feats


@torch.no_grad()
def reconstruct(tc: Transcoder, feats: ActiveFeatures, inputs: Tensor) -> Tensor:
    """Decode of the active features (+ b_dec, + skip) -> [L, T, D], summed as `LocalReplacement.forward` sums
    (source layer by source layer, `Transcoder.decode_source`), so that re-running the replacement model
    reproduces these outputs bit for bit."""
    L, T, D = inputs.shape
    writes = torch.zeros(L, T, D, dtype=tc.b_dec.dtype, device=inputs.device)
    for s, sl in enumerate(feats.layer_slices(L)):
        a = torch.zeros(T, tc.n_features, dtype=tc.b_enc.dtype, device=inputs.device)  # [T, F]
        a[feats.pos[sl], feats.index[sl]] = feats.act[sl]
        writes[tc.target_layers(s)] += decode_active(tc, s, a).transpose(0, 1)
    out = writes + tc.b_dec[:, None, :]
    if tc.W_skip is not None:
        out = out + skip_term(tc, inputs)
    return out


def decode_active(tc: Transcoder, layer: int, a: Tensor) -> Tensor:
    """a [T, F] -> [T, n_out, D]: the decoder rows of the features active at some position, only (a lazy
    transcoder reads just those), summed in one product whether the weights are in memory or on disk."""
    return tc.decode_source(layer, a, features=(a != 0).any(0).nonzero()[:, 0])


def skip_term(tc: Transcoder, inputs: Tensor) -> Tensor:
    """[L, T, D] -> x_l @ W_skip[l] per layer."""
    return torch.einsum("ltd,lde->lte", inputs.to(tc.W_skip.dtype), tc.W_skip)


@torch.no_grad()
def build_replacement(model: ModelAdapter, tc: Transcoder, ids: Tensor) -> LocalReplacement:
    """One reference pass of `model` on ids [T] -> the local replacement model of that prompt."""
    check_fits(tc, model)
    trace = model.forward(ids, compute_logits=False)
    reads = tc.select_input(trace.resid_mid, trace.mlp_in)
    inputs = torch.stack([r[0] for r in reads])  # [L, T, D]
    mlp_out = torch.stack([m[0] for m in trace.mlp_out])  # [L, T, D]
    feats = encode_features(tc, inputs)
    recon = reconstruct(tc, feats, inputs).to(mlp_out.dtype)
    error = mlp_out - recon
    error[:, 0] = 0
    skip = skip_term(tc, inputs).to(mlp_out.dtype) if tc.W_skip is not None else None
    return LocalReplacement(
        model=model, tc=tc, ids=ids, frozen=trace.frozen.detach(), embed=trace.embed[0],
        inputs=inputs, mlp_out=mlp_out, skip=skip, error=error, features=feats,
        last_logits=model.unembed(trace.final_normed[0, -1]),
    )
