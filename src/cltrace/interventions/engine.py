"""Running a model with some transcoder features changed, in the two senses of Ameisen et al. (2025).

*Constrained*: inside the local replacement model of one prompt (`cltrace.replacement`). Each MLP is
replaced by its transcoder plus an error term (true MLP output − reconstruction, from the clean pass, held
fixed), and attention patterns and norm denominators are frozen at the clean pass's values. Written as a
change from the clean pass, a layer's output is

    out_t = mlp_out_t(clean) + Σ_{s ≤ t} (a_s − a_s(clean)) @ W_dec[s][:, t − s]   (+ skip-term change)

which is reconstruction + error exactly, and which is bit-for-bit the clean output when nothing
changes. Layers in `held` keep their clean activations (except the intervened features): holding all
layers leaves only direct decoder effects, which is what attribution-graph edges measure.

*Free*: in the real model. At a feature's layer s, delta = new − current activation (current re-encoded
from the live MLP input), and delta · W_dec[s][:, t − s] is added to the true MLP output of every layer t
the feature writes to. Everything downstream, attention included, recomputes.

Position 0 (BOS) carries no features, as in the replacement model and the attribution graph.
All tensors here are for one sequence: T positions, D d_model, F features, V vocab.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from cltrace.interventions.spec import Intervention
from cltrace.models.adapter import ModelAdapter
from cltrace.replacement.forward import frozen_forward
from cltrace.replacement.local import LocalReplacement, build_replacement
from cltrace.transcoders.transcoder import Transcoder


@dataclass
class Clean:
    """The clean pass every intervention is measured against: the prompt's local replacement model, plus
    every layer's dense pre-activations and activations (position 0, BOS, carries no features)."""

    rep: LocalReplacement  # frozen patterns and norm scales, embeddings, read points, true MLP outputs
    pre: list[Tensor]  # per layer [T, F]
    acts: list[Tensor]  # per layer [T, F], row 0 zero
    last_logits: Tensor | None = None  # [V] the model's logits at the last position

    @property
    def ids(self) -> Tensor:  # [T]
        return self.rep.ids


@dataclass
class Run:
    """What an intervened pass produced."""

    last_logits: Tensor  # [V] logits at the last position (the unembedding of all positions is costly)
    pre: list[Tensor]  # per layer [T, F] pre-activations read from the live stream
    acts: list[Tensor]  # per layer [T, F] activations in effect (after interventions; held layers: clean)
    resid_mid: list[Tensor] | None = None  # per layer [T, D] residual stream entering the MLP (for comparing runs)


def encode(tc: Transcoder, x: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """Read point x [T, D] -> (pre [T, F], acts [T, F]) with inference-time activations and no BOS features."""
    pre = tc.pre_acts(x.to(tc.b_enc.dtype), layer)  # [T, F]
    a = tc.activate(pre, layer, training=False)
    return pre, torch.cat([torch.zeros_like(a[:1]), a[1:]])


@torch.no_grad()
def clean_run(model: ModelAdapter, tc: Transcoder, ids: Tensor) -> Clean:
    """One plain forward pass -> the local replacement model and every layer's activations."""
    rep = build_replacement(model, tc, ids)
    pre, acts = zip(*(encode(tc, rep.inputs[layer], layer) for layer in range(model.n_layers)))
    clean = Clean(rep, list(pre), list(acts))
    # the replacement model with nothing changed: the model's logits, computed exactly as every run's are
    clean.last_logits = run_constrained(model, tc, clean, []).last_logits
    return clean


def apply(ivs: list[Intervention], a: Tensor) -> Tensor:
    """a [T, F] activations of one layer -> a copy with the interventions applied in order.

    pos None means every position but 0: BOS carries no features, as in the attribution graph.
    """
    a = a.clone()
    for iv in ivs:
        at = slice(1, None) if iv.pos is None else iv.pos
        a[at, iv.feature] = iv.value if iv.op == "set" else a[at, iv.feature] * iv.value
    return a


class DecoderWrites:
    """Pending decoder writes: a change of activations at layer s reaches the outputs of s..s+n_out−1."""

    def __init__(self, tc: Transcoder):
        self.tc = tc
        self.pending: dict[int, Tensor] = {}  # target layer -> [T, D]

    def add(self, layer: int, delta: Tensor, always: Tensor | list[int]) -> None:
        """delta [T, F]; decodes the features that changed, and those in `always` (index list or [F] mask),
        whose change may be zero now but carries a gradient."""
        changed = (delta != 0).any(0)  # [F]
        changed[always] = True
        cols = changed.nonzero().squeeze(1)  # [n]
        if len(cols) == 0:
            return
        contrib = self.tc.decode_source(layer, delta, features=cols)  # [T, n_out, D]
        for i, t in enumerate(self.tc.target_layers(layer)):
            self.pending[t] = self.pending[t] + contrib[:, i] if t in self.pending else contrib[:, i]

    def take(self, layer: int) -> Tensor | None:
        return self.pending.pop(layer, None)


def _by_layer(interventions: list[Intervention]) -> dict[int, list[Intervention]]:
    out: dict[int, list[Intervention]] = defaultdict(list)
    for iv in interventions:
        out[iv.layer].append(iv)
    return out


def run_constrained(
    model: ModelAdapter, tc: Transcoder, clean: Clean, interventions: list[Intervention], *,
    held: set[int] | frozenset[int] = frozenset(), linear: bool = False,
) -> Run:
    """The local replacement model of `clean`'s prompt, with `interventions` applied.

    held: layers whose features keep their clean activations (constrained patching).
    linear: responding features follow their pre-activation linearly where active (a = a_clean + Δpre),
    and stay off where inactive: the first-order model that attribution graphs describe.
    """
    rep = clean.rep
    by_layer = _by_layer(interventions)
    writes = DecoderWrites(tc)
    pres: list[Tensor] = []
    acts: list[Tensor] = []
    W_skip = tc.W_skip.detach() if tc.W_skip is not None else None

    def mlp(layer: int, resid_mid: Tensor, mlp_in: Tensor) -> Tensor:
        x = tc.select_input(resid_mid, mlp_in)[0]  # [T, D] live read point
        pre, a_live = encode(tc, x, layer)  # [T, F]
        a0 = clean.acts[layer]
        if layer in held:
            a = a0
        elif linear:
            a = a0 + (a0 != 0) * (pre - clean.pre[layer])
        else:
            a = a_live
        ivs = by_layer.get(layer, [])
        a = apply(ivs, a) if ivs else a
        always = torch.zeros(a.shape[1], dtype=torch.bool, device=a.device)  # [F]
        always[[iv.feature for iv in ivs]] = True
        if linear and layer not in held and torch.is_grad_enabled():
            always |= (a0 != 0).any(0)  # active features pass gradients on even where their change is 0
        writes.add(layer, a - a0, always)
        out = rep.mlp_out[layer]  # [T, D]: the error term is held inside it
        if W_skip is not None:
            dx = (x - rep.inputs[layer]).to(W_skip.dtype)
            out = out + (dx @ W_skip[layer]).to(out.dtype)
        w = writes.take(layer)
        if w is not None:
            out = out + w.to(out.dtype)
        pres.append(pre)
        acts.append(a)
        return out[None]

    fp = frozen_forward(model, rep.embed[None], rep.frozen, mlp)
    return Run(unembed_last(model, fp.final_normed), pres, acts, [r[0] for r in fp.resid_mid])


def unembed_last(model: ModelAdapter, final_normed: Tensor) -> Tensor:
    """final_normed [1, T, D] -> logits [V] of the last position; every run computes them this same way,
    so that an unchanged stream gives bit-identical logits."""
    return model.unembed(final_normed[0, -1:])[0]


@contextmanager
def live_resid_mid(model: ModelAdapter, point: str) -> Iterator[dict[int, Tensor]]:
    """Record resid_mid per layer during `model.forward`, for transcoders that read there.

    The adapter's mlp_hook sees only the MLP's normalized input; resid_mid is what its MLP-input norm is
    applied to, so a temporary wrapper around `model.norm` catches it as it goes by.
    """
    seen: dict[int, Tensor] = {}
    if point != "resid_mid":
        yield seen
        return
    norm = model.norm

    def recording_norm(module, x, key, frozen, record):
        layer, _, name = key.partition(".")
        if name == "mlp_in":
            seen[int(layer)] = x
        return norm(module, x, key, frozen, record)

    model.norm = recording_norm
    try:
        yield seen
    finally:
        del model.norm  # back to the class's method


def run_free(model: ModelAdapter, tc: Transcoder, ids: Tensor, interventions: list[Intervention]) -> Run:
    """The real model with each intervention's decoder change added to the MLP outputs it writes to."""
    by_layer = _by_layer(interventions)
    writes = DecoderWrites(tc)
    pres: list[Tensor] = []
    acts: list[Tensor] = []
    with live_resid_mid(model, tc.cfg.reads) as resid_mid:

        def hook(layer: int, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
            x = resid_mid.get(layer, mlp_in)[0]
            pre, a = encode(tc, x, layer)  # current activations, from the live stream
            ivs = by_layer.get(layer, [])
            if ivs:
                new = apply(ivs, a)
                writes.add(layer, new - a, [iv.feature for iv in ivs])
                a = new
            w = writes.take(layer)
            pres.append(pre)
            acts.append(a)
            return mlp_out if w is None else mlp_out + w[None].to(mlp_out.dtype)

        trace = model.forward(ids, mlp_hook=hook, compute_logits=False)
    return Run(unembed_last(model, trace.final_normed), pres, acts, [r[0] for r in trace.resid_mid])


MODES = ("constrained", "free")


def run_mode(
    model: ModelAdapter, tc: Transcoder, ids: Tensor, interventions: list[Intervention], mode: str, *,
    held: set[int] | frozenset[int] = frozenset(), clean: Clean | None = None,
) -> Run:
    """Dispatch on mode; a constrained run builds the replacement model of `ids` unless `clean` is given."""
    if mode == "free":
        return run_free(model, tc, ids, interventions)
    clean = clean if clean is not None else clean_run(model, tc, ids)
    return run_constrained(model, tc, clean, interventions, held=held)


def first_order(
    model: ModelAdapter, tc: Transcoder, clean: Clean, layer: int, pos: int, feature: int, *,
    logit: int | Tensor, watch: list[tuple[int, int, int]] = (), held: set[int] | frozenset[int] = frozenset(),
) -> tuple[float, list[float]]:
    """d logit / d a and d pre[watch] / d a for one feature activation a, in the linear frozen model.

    logit: a token id, or a direction [V] over the last position's logits (e.g. one-hot − 1/V: the logit
    minus the mean logit, what a graph's logit node holds). With every layer held this is the direct
    effect (an attribution edge divided by a); otherwise active features of responding layers pass changes
    on linearly. watch: (layer, pos, feature) triples. Multiply by Δa to predict the effect of a small change.
    """
    value = clean.acts[layer][pos, feature].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        run = run_constrained(model, tc, clean, [Intervention(layer=layer, pos=pos, feature=feature, value=value)],
                              held=held, linear=True)
        last = run.last_logits
        target = last[logit] if isinstance(logit, int) else last.float() @ logit.float()
        outs = [target] + [run.pre[wl][wp, wf] for wl, wp, wf in watch]
        grads = [torch.autograd.grad(o, value, retain_graph=True, allow_unused=True)[0] if o.requires_grad
                 else None for o in outs]
    vals = [0.0 if g is None else float(g) for g in grads]
    return vals[0], vals[1:]
