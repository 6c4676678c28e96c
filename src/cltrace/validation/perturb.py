"""Measured effects of inhibiting a feature, in three models, and how far the replacement drifts from the
real model after the perturbation.

(a) `run_constrained` (cltrace.interventions): the local replacement model, attention patterns and norm
    denominators frozen. With every layer held it gives the direct effect, which a graph edge must equal
    exactly; with layers responding, features downstream re-encode (JumpReLU and all).
(b) `run_live` (here): the same replacement (transcoder + the clean pass's error at every MLP), but attention
    and norms recomputed from the perturbed stream.
(c) `run_free` (cltrace.interventions): the real model, the transcoder's decoder change added to the MLP
    outputs the feature writes to; real MLPs, attention and norms respond.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cltrace.interventions.engine import (
    Clean,
    DecoderWrites,
    Run,
    apply,
    encode,
    live_resid_mid,
    run_constrained,
    run_free,
    unembed_last,
)
from cltrace.interventions.spec import Intervention
from cltrace.models.adapter import ModelAdapter
from cltrace.transcoders.transcoder import Transcoder


def run_live(model: ModelAdapter, tc: Transcoder, clean: Clean, interventions: list[Intervention], *,
             errors: bool = True) -> Run:
    """The replacement model with attention and norms recomputed (model.forward, every MLP replaced).

    Each MLP outputs reconstruction(features re-encoded from the live stream) + the clean pass's error,
    written as the clean output plus the change of decoder writes (and of the skip term), so that with
    nothing changed it is the model bit for bit. errors=False drops the error terms: the *global* replacement
    model, whose next token the paper compares with the model's. BOS keeps its true output either way.
    """
    rep = clean.rep
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)
    writes = DecoderWrites(tc)
    pres: list[Tensor] = []
    acts: list[Tensor] = []
    W_skip = tc.W_skip.detach() if tc.W_skip is not None else None
    with live_resid_mid(model, tc.cfg.reads) as resid_mid:

        def hook(layer: int, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
            x = resid_mid.get(layer, mlp_in)[0]  # [T, D] live read point
            pre, a = encode(tc, x, layer)
            ivs = by_layer.get(layer, [])
            a = apply(ivs, a) if ivs else a
            always = torch.zeros(a.shape[1], dtype=torch.bool, device=a.device)
            always[[iv.feature for iv in ivs]] = True
            writes.add(layer, a - clean.acts[layer], always)
            out = rep.mlp_out[layer] if errors else rep.mlp_out[layer] - rep.error[layer]
            if W_skip is not None:
                out = out + ((x - rep.inputs[layer]).to(W_skip.dtype) @ W_skip[layer]).to(out.dtype)
            w = writes.take(layer)
            if w is not None:
                out = out + w.to(out.dtype)
            pres.append(pre)
            acts.append(a)
            return out[None].to(mlp_out.dtype)

        trace = model.forward(clean.ids, mlp_hook=hook, compute_logits=False)
    return Run(unembed_last(model, trace.final_normed), pres, acts, [r[0] for r in trace.resid_mid])


def clean_resid(model: ModelAdapter, clean: Clean) -> list[Tensor]:
    """The model's own residual stream entering each MLP, [T, D] per layer (what every run starts from)."""
    return [r[0] for r in model.forward(clean.ids, compute_logits=False).resid_mid]


def drift(rep_run: Run, real_run: Run, clean: list[Tensor], layer: int, pos: int) -> dict:
    """How a replacement's perturbation effect compares with the real model's at each later layer.

    Effects are changes from the clean stream, Δ = resid − resid_clean, over positions ≥ pos (earlier ones
    cannot change). Entry k = 1, 2, ... is the stream entering the MLP of layer + k + 1: the MLPs of k later
    layers have responded (the replacement's features there, the real MLPs in the model). The stream entering
    layer + 1 is left out: both add the same decoder change at the feature's own layer, so only attention
    could differ there. cosine(Δ_rep, Δ_real) and NMSE ‖Δ_rep − Δ_real‖² / ‖Δ_real‖²; None where Δ_real = 0.
    """
    cos, nmse = [], []
    for t in range(layer + 2, len(clean)):
        d_rep = (rep_run.resid_mid[t][pos:] - clean[t][pos:]).double().flatten()
        d_real = (real_run.resid_mid[t][pos:] - clean[t][pos:]).double().flatten()
        n_real, n_rep = float(d_real.norm()), float(d_rep.norm())
        if n_real == 0:
            cos.append(None)
            nmse.append(None)
            continue
        cos.append(float(d_rep @ d_real) / (n_rep * n_real) if n_rep > 0 else 0.0)
        nmse.append(float((d_rep - d_real).pow(2).sum()) / n_real**2)
    return {"cosine": cos, "nmse": nmse}


@torch.no_grad()
def measure_source(model: ModelAdapter, tc: Transcoder, clean: Clean, clean_stream: list[Tensor],
                   source: tuple[int, int, int], targets: list[tuple[int, int, int]]) -> dict:
    """Set `source` (layer, pos, feature) to 0 in every model; Δ pre-activation of each target and the drift.

    Returns {"held", "frozen", "live", "real"}: lists of Δpre per target, and {"drift_frozen",
    "drift_live"}: `drift` of (a) and (b) against (c).
    """
    layer, pos, feature = source
    ivs = [Intervention(layer=layer, pos=pos, feature=feature, value=0.0)]
    runs = {
        "held": run_constrained(model, tc, clean, ivs, held=frozenset(range(model.n_layers))),
        "frozen": run_constrained(model, tc, clean, ivs),
        "live": run_live(model, tc, clean, ivs),
        "real": run_free(model, tc, clean.ids, ivs),
    }
    out: dict = {}
    for name, run in runs.items():
        out[name] = [float(run.pre[tl][tp, tf] - clean.pre[tl][tp, tf]) for tl, tp, tf in targets]
    out["drift_frozen"] = drift(runs["frozen"], runs["real"], clean_stream, layer, pos)
    out["drift_live"] = drift(runs["live"], runs["real"], clean_stream, layer, pos)
    return out
