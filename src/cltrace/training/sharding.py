"""Feature-sharded transcoders: each rank owns a slice of every layer's features.

Rank j of n owns features [lo_j, hi_j) of every layer (contiguous, lo_j = j·F // n): their encoder columns
W_enc[:, :, lo:hi], b_enc and thresholds [:, lo:hi] and decoder rows W_dec[s][lo:hi]. The shard is an
ordinary `Transcoder` with n_features = hi − lo, so every method of the module (pre_acts, activate,
decode_partial) works on it unchanged; the few things that see all features are here:

    pre_j   = x @ W_enc_j + b_enc_j                       [N, L, F_j]   local
    a_j     = σ(pre_j)                                    local for JumpReLU/ReLU; TopK/BatchTopK need a
                                                          global k-th value (`sharded_activate`)
    ŷ       = Σ_j decode_partial(a_j) + b_dec (+ skip)    one all-reduce [N, L, D] per step; b_dec once
    penalty = Σ_j Σ_{f ∈ j} ...                           one scalar all-reduce

Shared parameters (b_dec, W_skip) are replicated on the shards; every shard computes the same loss from
the same ŷ, so their gradients agree without any reduction.

Checkpoints: a folder with the global config.json, shards.json and one shard-JJJJJ-of-NNNNN.safetensors per
feature shard (shared parameters in shard 0 only). `merge_shards` writes the single-file format of
`cltrace.transcoders.io`; `load_sharded` reads the shards directly.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.training.distributed import Dist
from cltrace.training.sparse import (
    Listing,
    decode_listed,
    decode_mask,
    decode_partial,
    finish_decode,
    listed_pre_acts,
    should_decode_sparse,
)
from cltrace.transcoders.activations import batch_topk_mask
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

SHARDS = "shards.json"
FEATURE_PARAMS = ("W_enc", "b_enc", "log_threshold")  # sliced on their last dim; W_dec[s] on its first
SHARED_PARAMS = ("b_dec", "W_skip")


def shard_bounds(n_features: int, n_shards: int) -> list[tuple[int, int]]:
    """[(lo, hi)] per shard: contiguous, sizes differ by at most one."""
    if not 1 <= n_shards <= n_features:
        raise CltraceError(f"cannot split {n_features} features into {n_shards} shards")
    cuts = [j * n_features // n_shards for j in range(n_shards + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def shard_config(cfg: TranscoderConfig, shard: int, n_shards: int) -> TranscoderConfig:
    """The config of shard `shard`: n_features = its slice; the global shape is kept in extra."""
    lo, hi = shard_bounds(cfg.n_features, n_shards)[shard]
    local = copy.deepcopy(cfg)
    local.n_features = hi - lo
    local.extra = {**cfg.extra, "shard": {"index": shard, "of": n_shards, "lo": lo, "hi": hi,
                                          "n_features": cfg.n_features}}
    return local


def global_config(local: TranscoderConfig) -> TranscoderConfig:
    """Inverse of shard_config."""
    info = local.extra.get("shard")
    if info is None:
        return local
    cfg = copy.deepcopy(local)
    cfg.n_features = info["n_features"]
    cfg.extra = {k: v for k, v in local.extra.items() if k != "shard"}
    return cfg


# ---------------------------------------------------------------------- making shards
@torch.no_grad()
def shard_transcoder(tc: Transcoder, shard: int, n_shards: int) -> Transcoder:
    """Copy out the slice a rank owns from a full transcoder (tests; resharding a small model)."""
    lo, hi = shard_bounds(tc.n_features, n_shards)[shard]
    local = Transcoder(shard_config(tc.cfg, shard, n_shards), device=tc.W_enc.device, dtype=tc.W_enc.dtype,
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
    from cltrace.training.losses import auxk_acts

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


@dataclass
class Forward:
    """One training forward: pre-activations of this shard's features, the whole reconstruction, and on the
    sparse TopK/BatchTopK path the active entries with their values (the trainer's statistics read those
    instead of scanning [N, L, F] again; the dense activations are then built only if asked for)."""

    pre: Tensor  # [N, L, F_j]
    recon: Tensor  # [N, L, D]
    listing: Listing | None = None
    vals: Tensor | None = None  # [nnz] the listed activations (detached)
    dense_acts: Tensor | None = None  # [N, L, F_j] (the dense path's activations)

    @property
    def acts(self) -> Tensor:
        """[N, L, F_j] activations of this shard's features."""
        if self.dense_acts is None:
            self.dense_acts = self.listing.scatter(self.vals, self.pre)
        return self.dense_acts


def sharded_active_mask(tc: Transcoder, pre: Tensor, d: Dist) -> Tensor:
    """bool [N, L, F_j]: the entries TopK/BatchTopK keep in training, without building the activations."""
    if d.fp_size == 1 and tc.cfg.activation == "batchtopk":
        return batch_topk_mask(pre, tc.cfg.k)
    return sharded_activate(tc, pre, d, training=True) != 0


def sharded_forward(tc: Transcoder, x: Tensor, d: Dist, *, sparse: str = "auto") -> Forward:
    """x [N, L, D] -> pre [N, L, F_j], acts [N, L, F_j], reconstruction [N, L, D] of the *whole* transcoder.

    One all-reduce of the partial reconstruction; b_dec and the skip term are added after it (once).
    TopK and BatchTopK, decoded sparsely, take the gradient of the encoder at their active entries only
    (`listed_pre_acts`): pre and acts then come back without autograd history.
    """
    if tc.cfg.activation in ("topk", "batchtopk") and torch.is_grad_enabled():
        density = tc.cfg.k / global_config(tc.cfg).n_features  # known in advance: k per token and layer
        if should_decode_sparse(density, x.device, sparse):
            with torch.no_grad():
                pre = tc.pre_acts(x)
                listing = Listing.of(sharded_active_mask(tc, pre, d))
            vals = listed_pre_acts(tc, x, pre, listing)  # [nnz]: an active feature's activation is its pre-act
            partial = decode_listed(tc, listing, vals)  # [N, L, D] this shard's features only
            return Forward(pre, finish_decode(tc, d.sum_over_features(partial), x), listing, vals.detach())
    pre = tc.pre_acts(x)
    acts = sharded_activate(tc, pre, d)
    mask = decode_mask(tc, acts, pre)
    use_sparse = should_decode_sparse(mask.float().mean().item(), x.device, sparse)
    partial = decode_partial(tc, acts, mask, sparse=use_sparse)  # [N, L, D] this shard's features only
    return Forward(pre, finish_decode(tc, d.sum_over_features(partial), x), dense_acts=acts)


# ---------------------------------------------------------------------- checkpoints
def shard_file(shard: int, n_shards: int) -> str:
    return f"shard-{shard:05d}-of-{n_shards:05d}.safetensors"


def save_shard(tc: Transcoder, folder: str | Path, *, metadata: dict | None = None) -> Path:
    """Write this rank's shard atomically (temp file + os.replace); shard 0 also writes the configs."""
    from safetensors.torch import save_file

    info = tc.cfg.extra.get("shard") or {"index": 0, "of": 1, "lo": 0, "hi": tc.n_features,
                                         "n_features": tc.n_features}
    j, n = info["index"], info["of"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "log_threshold": tc.log_threshold,
               **{f"W_dec_{s}": w for s, w in enumerate(tc.W_dec)}}
    if j == 0:
        tensors["b_dec"] = tc.b_dec
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "cltrace-transcoder-shard", "index": str(j), "of": str(n), "lo": str(info["lo"]),
            "hi": str(info["hi"])}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = folder / shard_file(j, n)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    if j == 0:
        _write_json(folder / "config.json", global_config(tc.cfg).to_dict())
        _write_json(folder / SHARDS, {"format": "cltrace-sharded-transcoder", "n_shards": n,
                                      "bounds": shard_bounds(info["n_features"], n)})
    return path


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def is_sharded_folder(folder: str | Path) -> bool:
    return (Path(folder) / SHARDS).exists()


def _read_index(folder: Path) -> tuple[TranscoderConfig, int, list[tuple[int, int]]]:
    try:
        cfg = TranscoderConfig(**json.loads((folder / "config.json").read_text()))
        index = json.loads((folder / SHARDS).read_text())
        n, bounds = int(index["n_shards"]), [tuple(b) for b in index["bounds"]]
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise CltraceError(f"{folder} is not a readable sharded transcoder ({e})") from e
    missing = [shard_file(j, n) for j in range(n) if not (folder / shard_file(j, n)).exists()]
    if missing:
        raise CltraceError(f"{folder}: shard files {missing} are missing (was training interrupted before the "
                           "first checkpoint finished on every rank?)")
    return cfg, n, bounds


def load_shard(folder: str | Path, shard: int, *, device="cpu", dtype=torch.float32) -> Transcoder:
    """One rank's shard (resuming with the same number of feature shards)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg, n, _ = _read_index(folder)
    state = load_file(str(folder / shard_file(shard, n)))
    if shard != 0:  # shared parameters live in shard 0
        shared = load_file(str(folder / shard_file(0, n)))
        state.update({k: shared[k] for k in SHARED_PARAMS if k in shared})
    return Transcoder.from_state_dict(shard_config(cfg, shard, n), {_param_name(k): v for k, v in state.items()},
                                      device=device, dtype=dtype)


def load_sharded(folder: str | Path, *, device="cpu", dtype=torch.float32) -> Transcoder:
    """All shards of a folder, concatenated into the full transcoder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg, n, bounds = _read_index(folder)
    parts = [load_file(str(folder / shard_file(j, n))) for j in range(n)]
    state = {
        "W_enc": torch.cat([p["W_enc"] for p in parts], dim=-1),
        "b_enc": torch.cat([p["b_enc"] for p in parts], dim=-1),
        "log_threshold": torch.cat([p["log_threshold"] for p in parts], dim=-1),
        **{f"W_dec.{s}": torch.cat([p[f"W_dec_{s}"] for p in parts], dim=0) for s in range(cfg.n_layers)},
        **{k: parts[0][k] for k in SHARED_PARAMS if k in parts[0]},
    }
    if state["W_enc"].shape[-1] != cfg.n_features or bounds[-1][1] != cfg.n_features:
        raise CltraceError(f"{folder}: shards hold {state['W_enc'].shape[-1]} features, config says "
                           f"{cfg.n_features}")
    try:
        return Transcoder.from_state_dict(cfg, state, device=device, dtype=dtype)
    except RuntimeError as e:
        raise CltraceError(f"{folder}: shards do not fit the config ({e})") from e


def merge_shards(folder: str | Path, out: str | Path) -> Path:
    """Sharded folder -> the single-file folder `load_transcoder` and attribution read."""
    from cltrace.transcoders.io import save_transcoder

    return save_transcoder(load_sharded(folder), out)


def _param_name(key: str) -> str:
    return f"W_dec.{key[6:]}" if key.startswith("W_dec_") else key
