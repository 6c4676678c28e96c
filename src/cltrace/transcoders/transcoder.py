"""Cross-layer (CLT) and per-layer (PLT) transcoders: one module for both.

A feature of layer s reads that layer's MLP input and writes to MLP outputs:

    pre_s  = x_s @ W_enc[s] + b_enc[s]                      x_s: [N, D]     pre_s: [N, F]
    a_s    = σ(pre_s)                                       σ: JumpReLU, TopK, BatchTopK or ReLU
    ŷ_t    = Σ_{s ≤ t} a_s @ W_dec[s][:, t − s] + b_dec[t]   (CLT: every s ≤ t;  PLT: s = t only)
           (+ x_t @ W_skip[t] for a skip transcoder)

W_dec[s] is [F, n_out(s), D] with n_out(s) = L − s for a CLT and 1 for a PLT, so the decoder of source
layer s into target layer t is W_dec[s][:, t − s]. The module always acts on raw model activations:
training normalizes per layer by scalars and `fold_normalization` folds them into the weights.

This module is the one place that encodes and decodes. Every caller (training, single-process and
feature-sharded; evaluation's splice; the local replacement model; interventions; attribution) uses:

    encode / pre_acts / activate       x -> pre-activations -> activations
    decode(acts, x)                    [N, L, F] -> [N, L, D]: the whole reconstruction
    decode_features(acts, mask)        the same without b_dec and skip (sharded training sums it first)
    decode_source(s, a_s)              one source layer's writes [N, n_out(s), D] (layer-by-layer passes)
    feature_writes(s, f, a)            a·W_dec[s][f] for listed features [n, n_out(s), D] (attribution)
    train_forward(x)                   the training forward with exact sparse gradients

Dense or sparse is chosen in one place, `sparse.should_decode_sparse`, by device, autocast dtype and density;
the sparse kernels (tiled `embedding_bag` decode, listed encoder gradient) live in `transcoders/sparse.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from cltrace.errors import CltraceError
from cltrace.transcoders.activations import batch_topk, batch_topk_mask, jumprelu, topk
from cltrace.transcoders.sparse import (
    Listing,
    decode_dense,
    decode_listed,
    decode_rows,
    listed_pre_acts,
    should_decode_sparse,
)

ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")
READ_POINTS = ("mlp_in", "resid_mid")


@dataclass
class TranscoderConfig:
    """Shape and kind of a transcoder (saved as config.json beside the weights)."""

    kind: str = "clt"  # "clt": features write to their layer and every later one; "plt": own layer only
    n_layers: int = 0  # L, the model's layer count
    d_model: int = 0  # D
    n_features: int = 0  # F, features per layer
    activation: str = "jumprelu"  # one of ACTIVATIONS
    k: int = 0  # active features per token and layer, for topk / batchtopk
    skip: bool = False  # add a linear skip term x @ W_skip (a "skip transcoder")
    bandwidth: float = 1.0  # JumpReLU straight-through kernel width (training only)
    model_name: str = ""  # the model it was trained on (checked when loading)
    # where features read the model: "mlp_in", the normalized MLP input (cltrace's default), or "resid_mid",
    # the residual stream before the MLP norm (circuit-tracer's CLTs)
    reads: str = "mlp_in"
    extra: dict = field(default_factory=dict)  # free-form provenance (training run, scan id, ...)

    def validate(self) -> None:
        if self.kind not in ("clt", "plt"):
            raise ValueError(f"kind must be 'clt' or 'plt', not {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {self.activation!r}")
        if self.activation in ("topk", "batchtopk") and self.k <= 0:
            raise ValueError(f"activation {self.activation} needs k > 0")
        if min(self.n_layers, self.d_model, self.n_features) <= 0:
            raise ValueError("n_layers, d_model and n_features must be positive")
        if self.reads not in READ_POINTS:
            raise ValueError(f"reads must be one of {READ_POINTS}, not {self.reads!r}")

    @classmethod
    def from_dict(cls, d: dict) -> TranscoderConfig:
        """From a saved config.json; files written before `reads` existed kept it in extra["input_hook"]."""
        d = dict(d)
        extra = dict(d.get("extra") or {})
        if "reads" not in d and "input_hook" in extra:
            d["reads"] = extra.pop("input_hook")
        d["extra"] = extra
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Transcoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig, *, device=None, dtype=torch.float32, init: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, D, F = cfg.n_layers, cfg.d_model, cfg.n_features
        kw = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(torch.empty(L, D, F, **kw))  # [L, D, F]
        self.b_enc = nn.Parameter(torch.zeros(L, F, **kw))  # [L, F]
        # JumpReLU / BatchTopK-at-inference threshold θ = exp(log_threshold), per feature
        self.log_threshold = nn.Parameter(torch.full((L, F), math.log(0.1), **kw))
        # W_dec[s]: [F, n_out(s), D], stored target-major ([n_out, F, D] in memory) so that each (source, target)
        # tile W_dec[s][:, j] is one contiguous [F, D] block: the unit of the sparse decode (transcoders/sparse.py)
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(self.n_out(s), F, D, **kw).transpose(0, 1)) for s in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, D, **kw))  # [L, D]
        self.W_skip = nn.Parameter(torch.zeros(L, D, D, **kw)) if cfg.skip else None  # [L, D, D]
        # a `transcoders.lazy.LazyStore` when W_enc and W_dec stay on disk (`load_transcoder(lazy=True)`): they are
        # then meta tensors and every read goes through `encoder` / `decoder_vectors` below
        self.store = None
        if init:
            self.reset_parameters()

    @classmethod
    def from_state_dict(cls, cfg: TranscoderConfig, state: dict, *, device=None,
                        dtype=torch.float32) -> Transcoder:
        """A transcoder holding `state`, copied into the module's own memory layout (target-major W_dec), so
        that a loaded transcoder computes bit for bit as the one that was saved."""
        tc = cls(cfg, device=device, dtype=dtype, init=False)
        tc.load_state_dict(state)
        return tc

    # ------------------------------------------------------------------ shape
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    def select_input(self, resid_mid, mlp_in):
        """Of a forward's two candidate read points, the one this transcoder reads (`cfg.reads`)."""
        return resid_mid if self.cfg.reads == "resid_mid" else mlp_in

    def n_out(self, s: int) -> int:
        """How many output layers a feature of layer s writes to."""
        return self.cfg.n_layers - s if self.cfg.kind == "clt" else 1

    @property
    def lazy(self) -> bool:
        """True when W_enc and W_dec are read from disk on demand (see `transcoders.lazy`)."""
        return self.store is not None

    def _require_eager(self, what: str) -> None:
        if self.store is not None:
            raise CltraceError(f"{what} needs the whole transcoder in memory: load it with lazy=False")

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def reset_parameters(self) -> None:
        """The paper's init: encoder U(±1/√F), decoder U(±1/√(L·D)) (for a CLT, over the layers written)."""
        self._require_eager("reset_parameters")
        L, D, F = self.cfg.n_layers, self.cfg.d_model, self.cfg.n_features
        with torch.no_grad():
            bound = 1.0 / math.sqrt(F)
            self.W_enc.uniform_(-bound, bound)
            for s in range(L):
                fan = self.n_out(s) * D if self.cfg.kind == "clt" else D
                b = 1.0 / math.sqrt(fan)
                self.W_dec[s].uniform_(-b, b)
            self.b_enc.zero_()
            self.b_dec.zero_()

    # ------------------------------------------------------------------ weights by layer / feature
    def encoder(self, layer: int) -> Tensor:
        """W_enc[layer]: [D, F] (read from disk when lazy)."""
        return self.W_enc[layer] if self.store is None else self.store.encoder(layer)

    def encoder_vectors(self, layers: Tensor, features: Tensor) -> Tensor:
        """Listed features' encoder columns: layers [n], features [n] -> W_enc[layers, :, features] [n, D].
        Lazy: each layer's encoder is read once."""
        if self.store is None:
            return self.W_enc[layers, :, features]
        out = torch.empty(layers.numel(), self.cfg.d_model, dtype=self.b_enc.dtype, device=self.b_enc.device)
        for layer in layers.unique().tolist():
            sel = (layers == layer).nonzero()[:, 0]
            out[sel] = self.encoder(layer)[:, features[sel]].T
        return out

    def decoder(self, layer: int) -> Tensor:
        """W_dec[layer]: [F, n_out(layer), D], every feature's writes (read from disk when lazy)."""
        return self.W_dec[layer] if self.store is None else self.store.decoder(layer)

    def decoder_vectors(self, layer: int, features: Tensor) -> Tensor:
        """[n] features of `layer` -> W_dec[layer][features]: [n, n_out(layer), D]; target layers are
        layer .. layer+n_out−1. Lazy: only those rows are read."""
        if self.store is None:
            return self.W_dec[layer][features]
        return self.store.decoder_rows(layer, features)

    # ------------------------------------------------------------------ encode
    def pre_acts(self, x: Tensor, layer: int | None = None, *, matmul_dtype: torch.dtype | None = None,
                 W: Tensor | None = None) -> Tensor:
        """x [N, L, D] -> [N, L, F] (or, for one layer, x [N, D] -> [N, F]).

        matmul_dtype (one layer only; inference): multiply in this dtype and return the weights' dtype. Buys
        speed where the hardware has it: torch.bfloat16 is about 4x faster than float32 on a CPU with
        AVX512-BF16 or AMX, at about 3 significant digits (a feature near its threshold may flip).
        W: this layer's encoder `encoder(layer)` when the caller has it already (a lazy one is read from disk).
        """
        if layer is not None:
            W = self.encoder(layer) if W is None else W  # [D, F]
            if matmul_dtype is not None and matmul_dtype != W.dtype:
                return (x.to(matmul_dtype) @ W.to(matmul_dtype)).to(W.dtype) + self.b_enc[layer]
            return x @ W + self.b_enc[layer]
        if self.store is not None:  # one layer's encoder in memory at a time
            return torch.stack([self.pre_acts(x[:, s], s) for s in range(self.cfg.n_layers)], 1)
        # one batched matmul with the bias fused; the result is layer-major in memory ([L, N, F] transposed),
        # which keeps per-layer work (BatchTopK's cut-off, the sparse listing) free of copies
        return torch.baddbmm(self.b_enc[:, None], x.transpose(0, 1), self.W_enc).transpose(0, 1)

    def activate(self, pre: Tensor, layer: int | None = None, *, training: bool | None = None) -> Tensor:
        """Pre-activations -> activations, shaped like `pre` ([N, L, F], or [N, F] with `layer`)."""
        act = self.cfg.activation
        training = self.training if training is None else training
        if act == "relu":
            return torch.relu(pre)
        if act == "topk":
            return topk(pre, self.cfg.k)
        theta = self.threshold if layer is None else self.threshold[layer]
        if act == "batchtopk" and training:  # one budget of k·N per layer
            return batch_topk(pre, self.cfg.k)
        # jumprelu, and batchtopk at inference (a per-feature threshold learned during training)
        return jumprelu(pre, theta, self.cfg.bandwidth)

    def encode(self, x: Tensor, layer: int | None = None) -> Tensor:
        return self.activate(self.pre_acts(x, layer), layer)

    # ------------------------------------------------------------------ decode
    def decode(self, acts: Tensor, x: Tensor | None = None, *, sparse: str | bool = "auto") -> Tensor:
        """acts [N, L, F] (and x [N, L, D] for the skip term) -> reconstruction [N, L, D].

        A CLT's dense decode costs O(N · F · L² · D / 2), the sparse one O(N · L0 · L² · D / 2); `sparse`:
        "auto" (see `sparse.should_decode_sparse`), True or False.
        """
        return self.add_bias_and_skip(self.decode_features(acts, sparse=sparse), x)

    def decode_features(self, acts: Tensor, mask: Tensor | None = None, *, sparse: str | bool = "auto") -> Tensor:
        """acts [N, L, F] -> Σ_s a_s W_dec[s] placed on target layers: [N, L, D], *without* b_dec and skip.

        `mask` [N, L, F] lists the entries a sparse decode reads (default: the nonzero ones; `decode_mask` adds
        the JumpReLU entries that carry a threshold gradient). Feature-sharded training sums this over the
        shards before the bias is added once.
        """
        if self.store is not None:  # source layer by source layer, reading the active rows only
            out = torch.zeros(*acts.shape[:2], self.cfg.d_model, dtype=self.b_dec.dtype, device=acts.device)
            for s in range(self.cfg.n_layers):
                a = acts[:, s] if mask is None else acts[:, s] * mask[:, s]
                out[:, self.target_layers(s)] += self.decode_source(s, a)
            return out
        if mask is None:
            mask = acts != 0
        density = mask.float().mean().item() if sparse == "auto" else 0.0  # a pass over [N, L, F]: only if asked
        if should_decode_sparse(density, acts.device, sparse):
            listing = Listing.of(mask)
            return decode_listed(self.W_dec, listing, listing.gather(acts).to(self.b_dec.dtype))
        return decode_dense(self.W_dec, acts, self.cfg.d_model)

    def decode_listed(self, listing: Listing, vals: Tensor) -> Tensor:
        """The listed activations vals [nnz] -> [N, L, D] without b_dec and skip (the tiled sparse decode)."""
        self._require_eager("the tiled sparse decode (training)")
        return decode_listed(self.W_dec, listing, vals)

    def add_bias_and_skip(self, features_out: Tensor, x: Tensor | None) -> Tensor:
        """[N, L, D] feature part of a reconstruction -> + b_dec (+ x_l @ W_skip[l] when x is given)."""
        out = features_out + self.b_dec
        if self.W_skip is not None and x is not None:
            out = out + torch.einsum("nld,lde->nle", x.to(self.W_skip.dtype), self.W_skip)
        return out

    def decode_source(self, layer: int, a: Tensor, features: Tensor | None = None) -> Tensor:
        """One source layer's writes: a [N, F] -> Σ_i a_i W_dec[layer][i]: [N, n_out(layer), D], no bias.

        For passes that run layer by layer (evaluation's splice, the replacement model, interventions), where
        layer s's features must be decoded before layer s+1 is encoded. `features` (a [n] index) decodes those
        columns only, densely, keeping a gradient for each even where a is 0 (interventions); otherwise only
        the nonzero entries are read (`embedding_bag`) when few are. Lazy: the rows of the features active in
        some row of `a` are read and decoded as with `features`.
        """
        if features is None and self.store is not None:
            features = (a != 0).any(0).nonzero()[:, 0]
        if features is not None:
            W = self.decoder_vectors(layer, features)  # [n, n_out, D]
            return torch.einsum("nf,fod->nod", a[:, features].to(W.dtype), W)
        W = self.W_dec[layer]  # [F, n_out, D]
        if should_decode_sparse((a != 0).float().mean().item(), a.device):
            return decode_rows(W, a)
        return (a.to(W.dtype) @ W.reshape(W.shape[0], -1)).view(a.shape[0], *W.shape[1:])

    def feature_writes(self, layer: int, features: Tensor, acts: Tensor) -> Tensor:
        """What listed features write: a_i · W_dec[layer][f_i] for features [n], acts [n] -> [n, n_out, D]
        (target layers layer .. layer+n_out−1). Attribution's source vectors."""
        W = self.decoder_vectors(layer, features)  # [n, n_out, D]
        return W * acts.to(W.dtype)[:, None, None]

    def decode_mask(self, acts: Tensor, pre: Tensor | None) -> Tensor:
        """[N, L, F] bool: the entries a sparse decode must list to be exact in value *and* gradient.

        JumpReLU's threshold gets a straight-through gradient from features just below θ (inside the kernel
        window), where a = 0 but ∂L/∂a = W_dec_i · ∂L/∂ŷ is not; those are listed too (weight 0 forward)."""
        mask = acts != 0
        if pre is not None and self.cfg.activation == "jumprelu" and torch.is_grad_enabled():
            window = self.threshold - self.cfg.bandwidth / 2  # [L, F] lower edge of the STE kernel
            mask = mask | (pre.detach() > window.detach())
        return mask

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, L, D] -> (activations [N, L, F], reconstruction [N, L, D])."""
        acts = self.encode(x)
        return acts, self.decode(acts, x)

    # ------------------------------------------------------------------ training forward
    def train_forward(self, x: Tensor, *, sparse: str | bool = "auto", activate=None, active_mask=None,
                      sum_features=None, density: float | None = None) -> TrainForward:
        """The training forward: x [N, L, D] -> pre-activations, the reconstruction [N, L, D], and the active
        entries; gradients flow to every parameter exactly as through `forward`.

        TopK and BatchTopK, decoded sparsely, list the active entries from pre-activations computed without
        autograd and take the encoder's gradient at those entries only (`sparse.listed_pre_acts`): no dense
        [N, L, F] activation or gradient exists in the step. Other activations decode `decode_mask`'s entries.

        Feature-sharded training passes the three things that see every shard (training/sharding.py):
        `activate(pre)` and `active_mask(pre)` (a global k-th value for TopK/BatchTopK) and `sum_features`
        (the all-reduce of the partial reconstruction), plus `density`, the fraction of all features active.
        """
        activate = activate or self.activate
        sum_features = sum_features or (lambda t: t)
        if self.cfg.activation in ("topk", "batchtopk") and torch.is_grad_enabled():
            density = self.cfg.k / self.n_features if density is None else density  # known: k per token, layer
            if should_decode_sparse(density, x.device, sparse):
                with torch.no_grad():
                    pre = self.pre_acts(x)
                    mask = active_mask(pre) if active_mask else self.train_active_mask(pre)
                partial, listing, vals = self.decode_from_pre(x, pre, mask)  # [N, L, D] and the entries
                return TrainForward(pre, self.add_bias_and_skip(sum_features(partial), x), listing, vals.detach())
        pre = self.pre_acts(x)
        acts = activate(pre)
        mask = self.decode_mask(acts, pre)
        partial = self.decode_features(acts, mask, sparse=sparse)
        return TrainForward(pre, self.add_bias_and_skip(sum_features(partial), x), dense_acts=acts)

    def decode_from_pre(self, x: Tensor, pre: Tensor, mask: Tensor) -> tuple[Tensor, Listing, Tensor]:
        """TopK/BatchTopK/AuxK in training: pre [N, L, F] computed without autograd, mask [N, L, F] its active
        entries -> (sparse decode [N, L, D] without bias, the listing, the listed activations [nnz]), with
        gradients for the encoder through the listed entries only (an active entry's activation is its pre)."""
        listing = Listing.of(mask)
        vals = listed_pre_acts(self.W_enc, self.b_enc, x, pre, listing)
        return self.decode_listed(listing, vals), listing, vals

    def train_active_mask(self, pre: Tensor) -> Tensor:
        """bool [N, L, F]: the entries TopK/BatchTopK keep in training, without building the activations."""
        if self.cfg.activation == "batchtopk":
            return batch_topk_mask(pre, self.cfg.k)
        return self.activate(pre, training=True) != 0

    # ------------------------------------------------------------------ per-feature views
    def decoder_norms(self) -> Tensor:
        """[L, F] norm of each feature's decoder, concatenated over all the layers it writes to."""
        if self.store is not None:  # one layer's decoder in memory at a time
            return torch.stack([self.store.decoder(s).norm(dim=(1, 2)) for s in range(self.cfg.n_layers)])
        return torch.stack([self.W_dec[s].norm(dim=(1, 2)) for s in range(self.cfg.n_layers)])  # no copy

    def target_layers(self, layer: int) -> range:
        return range(layer, layer + self.n_out(layer))

    # ------------------------------------------------------------------ normalization
    @torch.no_grad()
    def fold_normalization(self, x_scale: Tensor, y_scale: Tensor) -> None:
        """Turn a transcoder trained on x/x_scale -> y/y_scale ([L] scalars) into one on raw activations."""
        self._require_eager("fold_normalization")
        self.W_enc.div_(x_scale[:, None, None])
        for s in range(self.cfg.n_layers):
            n = self.n_out(s)
            self.W_dec[s].mul_(y_scale[s : s + n][None, :, None])
        self.b_dec.mul_(y_scale[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((y_scale / x_scale)[:, None, None])


@dataclass
class TrainForward:
    """One training forward: pre-activations, the whole reconstruction, and on the sparse TopK/BatchTopK path
    the active entries with their values (the trainer's statistics read those instead of scanning [N, L, F]
    again; the dense activations are then built only if asked for)."""

    pre: Tensor  # [N, L, F]
    recon: Tensor  # [N, L, D]
    listing: Listing | None = None
    vals: Tensor | None = None  # [nnz] the listed activations (detached)
    dense_acts: Tensor | None = None  # [N, L, F] (the dense path's activations)

    @property
    def acts(self) -> Tensor:
        """[N, L, F] activations."""
        if self.dense_acts is None:
            self.dense_acts = self.listing.scatter(self.vals, self.pre)
        return self.dense_acts
