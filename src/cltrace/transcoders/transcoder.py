"""Cross-layer (CLT) and per-layer (PLT) transcoders: one module for both.

A feature of layer s reads that layer's MLP input and writes to MLP outputs:

    pre_s  = x_s @ W_enc[s] + b_enc[s]                      x_s: [N, D]     pre_s: [N, F]
    a_s    = σ(pre_s)                                       σ: JumpReLU, TopK, BatchTopK or ReLU
    ŷ_t    = Σ_{s ≤ t} a_s @ W_dec[s][:, t − s] + b_dec[t]   (CLT: every s ≤ t;  PLT: s = t only)
           (+ x_t @ W_skip[t] for a skip transcoder)

W_dec[s] is [F, n_out(s), D] with n_out(s) = L − s for a CLT and 1 for a PLT, so the decoder of source
layer s into target layer t is W_dec[s][:, t − s]. The module always acts on raw model activations:
training normalizes per layer by scalars and `fold_normalization` folds them into the weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from cltrace.transcoders.activations import batch_topk, jumprelu, topk

ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")


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
        # tile W_dec[s][:, j] is one contiguous [F, D] block: the unit of the sparse decode (training/sparse.py)
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(self.n_out(s), F, D, **kw).transpose(0, 1)) for s in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, D, **kw))  # [L, D]
        self.W_skip = nn.Parameter(torch.zeros(L, D, D, **kw)) if cfg.skip else None  # [L, D, D]
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

    def n_out(self, s: int) -> int:
        """How many output layers a feature of layer s writes to."""
        return self.cfg.n_layers - s if self.cfg.kind == "clt" else 1

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def reset_parameters(self) -> None:
        """The paper's init: encoder U(±1/√F), decoder U(±1/√(L·D)) (for a CLT, over the layers written)."""
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

    # ------------------------------------------------------------------ encode
    def pre_acts(self, x: Tensor, layer: int | None = None) -> Tensor:
        """x [N, L, D] -> [N, L, F] (or, for one layer, x [N, D] -> [N, F])."""
        if layer is not None:
            return x @ self.W_enc[layer] + self.b_enc[layer]
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
    def decode(self, acts: Tensor, x: Tensor | None = None, *, sparse: bool | None = None) -> Tensor:
        """acts [N, L, F] (and x [N, L, D] for the skip term) -> reconstruction [N, L, D].

        Sparse decoding gathers only the decoder rows of active features: a CLT's dense decoder costs
        O(L² F D) per token, the sparse one O(L · active · D).
        """
        N, L, F = acts.shape
        if sparse is None:
            sparse = (acts != 0).float().mean().item() < 0.05
        out = self.b_dec.expand(N, L, self.cfg.d_model).clone()
        for s in range(L):
            a = acts[:, s]  # [N, F]
            W = self.W_dec[s].reshape(F, -1)  # [F, n_out·D]
            if sparse:
                rows, feats = a.nonzero(as_tuple=True)
                contrib = torch.zeros(N, W.shape[1], dtype=W.dtype, device=W.device)
                contrib = contrib.index_add(0, rows, W[feats] * a[rows, feats, None])
            else:
                contrib = a @ W
            n = self.n_out(s)
            out[:, s : s + n] = out[:, s : s + n] + contrib.view(N, n, -1)
        if self.W_skip is not None and x is not None:
            out = out + torch.einsum("nld,lde->nle", x, self.W_skip)
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, L, D] -> (activations [N, L, F], reconstruction [N, L, D])."""
        acts = self.encode(x)
        return acts, self.decode(acts, x)

    # ------------------------------------------------------------------ per-feature views
    def decoder_vectors(self, layer: int, features: Tensor) -> Tensor:
        """[n] features of `layer` -> [n, n_out(layer), D]; target layers are layer .. layer+n_out−1."""
        return self.W_dec[layer][features]

    def decoder_norms(self) -> Tensor:
        """[L, F] norm of each feature's decoder, concatenated over all the layers it writes to."""
        return torch.stack([self.W_dec[s].norm(dim=(1, 2)) for s in range(self.cfg.n_layers)])  # no copy

    def target_layers(self, layer: int) -> range:
        return range(layer, layer + self.n_out(layer))

    # ------------------------------------------------------------------ normalization
    @torch.no_grad()
    def fold_normalization(self, x_scale: Tensor, y_scale: Tensor) -> None:
        """Turn a transcoder trained on x/x_scale -> y/y_scale ([L] scalars) into one on raw activations."""
        self.W_enc.div_(x_scale[:, None, None])
        for s in range(self.cfg.n_layers):
            n = self.n_out(s)
            self.W_dec[s].mul_(y_scale[s : s + n][None, :, None])
        self.b_dec.mul_(y_scale[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((y_scale / x_scale)[:, None, None])
