"""Feature-sharded transcoders: each rank owns a slice of every layer's features.

Rank j of n owns features [lo_j, hi_j) of every layer (contiguous, lo_j = j·F // n): their encoder columns
W_enc[:, :, lo:hi], b_enc and thresholds [:, lo:hi] and decoder rows W_dec[s][lo:hi]. The shard is an
ordinary `Transcoder` with n_features = hi − lo, so every method of the module (pre_acts, activate,
decode_features, train_forward) works on it unchanged; the few things that see all features are here:

    pre_j   = x @ W_enc_j + b_enc_j                       [N, L, F_j]   local
    a_j     = σ(pre_j)                                    local for JumpReLU/ReLU; TopK/BatchTopK need a
                                                          global k-th value (`sharded_activate`)
    ŷ       = Σ_j decode_features(a_j) + b_dec (+ skip)    one all-reduce [N, L, D] per step; b_dec once
    penalty = Σ_j Σ_{f ∈ j} ...                           one scalar all-reduce

Shared parameters (b_dec, W_skip) are replicated on the shards; every shard computes the same loss from
the same ŷ, so their gradients agree without any reduction.

The sharded folder format (save, load, merge) is `cltrace.transcoders.sharded`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cltrace.training.distributed import Dist
from cltrace.training.losses import auxk_acts
from cltrace.transcoders.sharded import global_config, shard_bounds, shard_config
from cltrace.transcoders.transcoder import TrainForward, Transcoder, TranscoderConfig

FEATURE_PARAMS = ("W_enc", "b_enc", "log_threshold")  # sliced on their last dim; W_dec[s] on its first


# ---------------------------------------------------------------------- making shards
@torch.no_grad()
def shard_transcoder(tc: Transcoder, shard: int, n_shards: int) -> Transcoder:
    """Copy out the slice a rank owns from a full transcoder (tests; resharding a small model)."""
    lo, hi = shard_bounds(tc.n_features, n_shards)[shard]
    local = Transcoder(shard_config(tc.cfg, shard, n_shards), device=tc.b_enc.device, dtype=tc.b_enc.dtype,
                       init=False)
    local.W_enc.copy_(tc.W_enc[:, :, lo:hi])
    local.b_enc.copy_(tc.b_enc[:, lo:hi])
    local.log_threshold.copy_(tc.log_threshold[:, lo:hi])
    for s in range(tc.n_layers):
        local.W_dec[s].copy_(tc.W_dec[s][lo:hi])
    local.b_dec.copy_(tc.b_dec)
    if tc.W_skip is not None:
        local.W_skip.copy_(tc.W_skip)
    return local


@torch.no_grad()
def init_shard(cfg: TranscoderConfig, shard: int, n_shards: int, *, seed: int = 0, device=None,
               dtype=torch.float32) -> Transcoder:
    """Initialize only this rank's slice (a 10M-feature CLT never exists whole on one device).

    Same distributions as `Transcoder.reset_parameters` for the *global* F (the encoder bound is 1/√F,
    not 1/√F_j); each shard draws from its own generator seeded by (seed, shard).
    """
    local = Transcoder(shard_config(cfg, shard, n_shards), device=device, dtype=dtype, init=False)
    g = torch.Generator(device=local.W_enc.device).manual_seed(seed * 100_003 + shard)
    L, D, F = cfg.n_layers, cfg.d_model, cfg.n_features
    bound = 1.0 / math.sqrt(F)
    local.W_enc.uniform_(-bound, bound, generator=g)
    for s in range(L):
        fan = local.n_out(s) * D if cfg.kind == "clt" else D
        local.W_dec[s].uniform_(-1 / math.sqrt(fan), 1 / math.sqrt(fan), generator=g)
    local.b_enc.zero_()
    local.b_dec.zero_()
    return local


def is_sharded(tc: Transcoder) -> bool:
    return "shard" in tc.cfg.extra


def shared_parameters(tc: Transcoder) -> list[torch.nn.Parameter]:
    return [p for p in (tc.b_dec, tc.W_skip) if p is not None]


# ---------------------------------------------------------------------- forward across shards
def sharded_activate(tc: Transcoder, pre: Tensor, d: Dist, *, training: bool | None = None) -> Tensor:
    """σ(pre) for this shard's features, pre [N, L, F_j] -> [N, L, F_j], equal to the unsharded σ's slice.

    JumpReLU and ReLU act per feature: local. TopK (k per token and layer) and BatchTopK (k·N per layer in
    training) keep the globally largest values: each shard all-gathers its own top candidates, every shard
    finds the same global k-th value and keeps its pre-activations ≥ it. Exact up to ties at the k-th value.
    """
    act = tc.cfg.activation
    training = tc.training if training is None else training
    if d.fp_size == 1 or act in ("jumprelu", "relu") or (act == "batchtopk" and not training):
        return tc.activate(pre, training=training)
    N, L, Fj = pre.shape
    k = tc.cfg.k
    if act == "topk":
        cand = pre.detach().topk(min(k, Fj), dim=-1).values  # [N, L, k]
        kth = d.gather_features(cand).topk(k, dim=-1).values[..., -1:]  # [N, L, 1]
    else:  # batchtopk: one budget of k·N per layer
        flat = pre.detach().transpose(0, 1).reshape(L, N * Fj)  # [L, N·F_j]
        cand = flat.topk(min(k * N, N * Fj), dim=-1).values  # [L, m]
        every = d.gather_features(cand)  # [L, Σ m]
        kth = every.topk(min(k * N, every.shape[-1]), dim=-1).values[:, -1][None, :, None]  # [1, L, 1]
    keep = (pre.detach() >= kth).to(pre.dtype)
    return torch.relu(pre) * keep


def sharded_auxk_acts(pre: Tensor, dead: Tensor, k_aux: int, d: Dist) -> Tensor:
    """AuxK's activations across shards: each token's k_aux largest positive pre-activations among the dead
    features of *all* shards. pre [N, L, F_j], dead [L, F_j] bool -> [N, L, F_j]. One shard: `auxk_acts`."""
    if d.fp_size == 1:
        return auxk_acts(pre, dead, k_aux)
    masked = pre.detach().masked_fill(~dead, float("-inf"))  # [N, L, F_j]
    cand = masked.topk(min(k_aux, masked.shape[-1]), dim=-1).values  # [N, L, k]
    kth = d.gather_features(cand).topk(k_aux, dim=-1).values[..., -1:]  # [N, L, 1] (−inf: fewer dead than k)
    keep = (masked >= kth) & dead
    return torch.relu(pre) * keep.to(pre.dtype)


def make_transcoder(cfg: TranscoderConfig, d: Dist, *, seed: int = 0, device=None,
                    dtype=torch.float32) -> Transcoder:
    """The transcoder this rank trains: the whole one, or with feature shards only its own slice."""
    if d.fp_size == 1:
        torch.manual_seed(seed)
        return Transcoder(cfg, device=device, dtype=dtype)
    return init_shard(cfg, d.fp_rank, d.fp_size, seed=seed, device=device, dtype=dtype)


def sharded_forward(tc: Transcoder, x: Tensor, d: Dist, *, sparse: str = "auto") -> TrainForward:
    """x [N, L, D] -> `Transcoder.train_forward` of this shard's features, reconstruction of the *whole*
    transcoder: one all-reduce of the partial reconstruction, b_dec and the skip term added after it (once)."""
    if d.fp_size == 1:
        return tc.train_forward(x, sparse=sparse)
    return tc.train_forward(
        x, sparse=sparse, activate=lambda pre: sharded_activate(tc, pre, d),
        active_mask=lambda pre: sharded_activate(tc, pre, d, training=True) != 0,
        sum_features=d.sum_over_features, density=tc.cfg.k / global_config(tc.cfg).n_features,
    )
