"""Random transcoders whose JumpReLU thresholds are calibrated on a prompt.

Until trained transcoders exist, tests and benchmarks need transcoders that behave like real ones on the
prompt at hand: a realistic number of active features (not 0, not all F). Random weights give that once each
layer's threshold sits between the k-th and (k+1)-th largest pre-activation over positions ≥ 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cltrace.models.adapter import ModelAdapter
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig


@torch.no_grad()
def random_transcoder(
    model: ModelAdapter, kind: str = "clt", n_features: int = 256, active_per_layer: int = 20, seed: int = 0,
    ids: Tensor | None = None, prompt: str | None = None, skip: bool = False, reads: str = "mlp_in",
) -> Transcoder:
    """A random CLT/PLT for `model` with about `active_per_layer` active (pos, feature) pairs per layer.

    ids / prompt: what to calibrate on (positions ≥ 1, since BOS features are dropped by attribution).
    reads: "mlp_in" (cltrace's read point) or "resid_mid" (circuit-tracer's CLT read point).
    """
    L, D, F = model.n_layers, model.d_model, n_features
    cfg = TranscoderConfig(kind=kind, n_layers=L, d_model=D, n_features=F, activation="jumprelu", skip=skip,
                           model_name=model.name, reads=reads, extra={"random_seed": seed})
    tc = Transcoder(cfg, device=model.device, init=False).eval()
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> Tensor:
        return (torch.randn(*shape, generator=g) * std).to(model.device)

    tc.W_enc.copy_(randn(L, D, F, std=D**-0.5))
    tc.b_enc.copy_(randn(L, F, std=0.01))
    for s in range(L):
        tc.W_dec[s].copy_(randn(F, tc.n_out(s), D, std=D**-0.5))
    tc.b_dec.copy_(randn(L, D, std=0.01))
    if skip:
        tc.W_skip.copy_(randn(L, D, D, std=0.01))
    if ids is None:
        ids = model.tokenize(prompt or "Fact: Michael Jordan plays the sport of")
    calibrate_thresholds(tc, model, ids, active_per_layer)
    return tc


@torch.no_grad()
def calibrate_thresholds(tc: Transcoder, model: ModelAdapter, ids: Tensor, active_per_layer: int) -> Tensor:
    """Set each layer's threshold so that ≈ `active_per_layer` pre-activations exceed it; returns θ [L]."""
    trace = model.forward(ids)
    reads = tc.select_input(trace.resid_mid, trace.mlp_in)
    thetas = []
    for layer in range(tc.n_layers):
        pre = tc.pre_acts(reads[layer][0, 1:].to(tc.b_enc.dtype), layer).flatten()
        k = max(1, min(active_per_layer, pre.numel() - 1))
        top = pre.topk(k + 1).values
        theta = max(float((top[k - 1] + top[k]) / 2), 1e-6)
        tc.log_threshold[layer].fill_(math.log(theta))
        thetas.append(theta)
    return torch.tensor(thetas)
