"""Helpers for the intervention tests: random transcoders whose thresholds make some features fire."""

from __future__ import annotations

import torch

from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

CALIBRATION = "The quick brown fox jumps over the lazy dog. Circuit tracing finds features; 1 2 3 4 5."


@torch.no_grad()
def calibrated_transcoder(model, n_features: int = 32, kind: str = "clt", seed: int = 0,
                          quantile: float = 0.8, skip: bool = False, text: str = CALIBRATION) -> Transcoder:
    """Random CLT/PLT with each feature's threshold at the `quantile` of its pre-activations on `text`.

    So about 1 − quantile of (token, feature) pairs are active. Decoders are scaled up so that changing
    one feature moves later features visibly (random init writes tiny vectors).
    """
    torch.manual_seed(seed)
    cfg = TranscoderConfig(kind=kind, n_layers=model.n_layers, d_model=model.d_model, n_features=n_features,
                           skip=skip, model_name=model.name)
    tc = Transcoder(cfg).eval()
    trace = model.forward(model.tokenize(text), stop_at_layer=model.n_layers)
    for layer in range(model.n_layers):
        x = trace.mlp_in[layer][0].float()  # [T, D]
        tc.W_enc[layer].mul_(1.0 / x.norm(dim=-1).mean())  # pre-activations of order 1
        tc.b_enc[layer].normal_(0, 0.1)
        pre = x @ tc.W_enc[layer] + tc.b_enc[layer]  # [T, F]
        tc.log_threshold[layer] = pre.quantile(quantile, dim=0).clamp_min(1e-3).log()
        out_scale = trace.mlp_out[layer][0].norm(dim=-1).mean()
        tc.W_dec[layer].mul_(out_scale)
    if skip:
        tc.W_skip.normal_(0, 0.02)
    return tc
