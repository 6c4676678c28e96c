"""Plain Python in, result objects out: what the CLI and the local viewer call.

    r = intervene(model, tc, "Fact: Michael Jordan plays the sport of", ["5:123@-1=0"], mode="free")
    r.logits_before, r.logits_after     [{"token", "id", "prob", "logit"}, ...] the top next tokens
    r.top_token, r.token_changes        the clean top token's (and every listed token's) logit/prob change
    r.interventions, r.features         what was changed and the watched features, before and after
    r.to_json()                         all of it as a JSON string (r.to_dict(): JSON-able dict)

Interventions may be given as `Intervention`s, "L:F[@P]=V" strings (set) or dicts with the same keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from cltrace.attribution.graph import Graph
from cltrace.errors import CltraceError
from cltrace.interventions.engine import MODES, Clean, Run, clean_run, run_constrained, run_free, run_mode
from cltrace.interventions.generate import generate
from cltrace.interventions.graph import direct_prediction, graph_watch, load_graph, node_index
from cltrace.interventions.spec import (
    FeatureRef,
    Intervention,
    parse_feature,
    parse_intervention,
    parse_layers,
    validate,
    validate_refs,
)
from cltrace.models.adapter import ModelAdapter
from cltrace.transcoders.io import check_fits
from cltrace.transcoders.transcoder import Transcoder


class _Result:
    def to_dict(self) -> dict:
        """Everything as plain JSON-able values."""
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)


@dataclass
class InterventionResult(_Result):
    """What `intervene` measured. Features are listed in (layer, pos, feature) terms, as in graphs."""

    prompt: str
    tokens: list[str]  # the prompt's tokens
    mode: str  # "constrained" (the local replacement model) or "free" (the real model)
    constrained_layers: list[int]  # layers whose features kept their clean activations
    interventions: list[dict]  # each Intervention, with its activation before and after at each position
    logits_before: list[dict]  # top next tokens without the interventions: {"token", "id", "prob", "logit"}
    logits_after: list[dict]  # ... and with them
    top_token: dict  # the clean top token's logit and probability, before and after
    token_changes: list[dict]  # every token of either top list, before and after
    features: list[dict]  # watched features: {"layer", "feature", "pos", "token", act/pre before and after}
    graph: dict | None = None  # with a graph: its direct prediction beside what was measured


@dataclass
class GenerationResult(_Result):
    """What `intervene_generate` produced: the same seed and sampling, without and with the interventions."""

    prompt: str
    mode: str
    constrained_layers: list[int]
    temperature: float
    seed: int
    interventions: list[dict]
    original: str  # the continuation of the plain model (prompt included)
    steered: str  # the continuation with the interventions held at every step
    original_ids: list[int] = field(default_factory=list)
    steered_ids: list[int] = field(default_factory=list)


def as_interventions(items) -> list[Intervention]:
    """Accept Intervention objects, 'L:F[@P]=V' strings (set) or {"layer", "feature", "value", ...} dicts."""
    out = []
    for it in items or []:
        if isinstance(it, Intervention):
            out.append(it)
        elif isinstance(it, str):
            out.append(parse_intervention(it, "set"))
        elif isinstance(it, dict):
            try:
                out.append(Intervention(layer=int(it["layer"]), pos=None if it.get("pos") is None else int(it["pos"]),
                                        feature=int(it["feature"]), value=float(it["value"]), op=it.get("op", "set")))
            except (KeyError, TypeError, ValueError) as e:
                raise CltraceError(f"cannot read intervention {it!r}: need layer, feature, value ({e})") from None
        else:
            raise CltraceError(f"cannot read intervention {it!r}: give 'L:F[@P]=V', a dict or an Intervention")
    if not out:
        raise CltraceError("nothing to do: give at least one intervention")
    return out


def as_refs(items) -> list[FeatureRef]:
    out = []
    for it in items or []:
        if isinstance(it, FeatureRef):
            out.append(it)
        elif isinstance(it, str):
            layer, pos, feature, _ = parse_feature(it, what="watched feature")
            out.append(FeatureRef(layer=layer, pos=pos, feature=feature))
        else:
            out.append(FeatureRef(layer=int(it["layer"]), pos=it.get("pos"), feature=int(it["feature"])))
    return out


def _prepare(model: ModelAdapter, tc: Transcoder, prompt: str, interventions, mode: str, constrained_layers):
    if mode not in MODES:
        raise CltraceError(f"unknown mode {mode!r}: use constrained or free")
    check_fits(tc, model)
    ids = model.tokenize(prompt)
    ivs = validate(as_interventions(interventions), tc, ids.numel())
    if isinstance(constrained_layers, str) or constrained_layers is None:
        held = parse_layers(constrained_layers, model.n_layers)
    else:
        held = sorted({int(x) for x in constrained_layers})
        if any(not 0 <= x < model.n_layers for x in held):
            raise CltraceError(f"constrained layers {held} are outside 0..{model.n_layers - 1}")
    if held and mode == "free":
        raise CltraceError("constrained_layers only applies to the constrained mode, not to free")
    return ids, ivs, frozenset(held)


def top_tokens(model: ModelAdapter, logits: Tensor, k: int) -> list[dict]:
    """logits [V] -> the k most likely tokens: [{"token", "id", "prob", "logit"}]."""
    probs = torch.softmax(logits.float(), -1)
    p, i = probs.topk(min(k, probs.numel()))
    return [{"token": model.tokenizer.decode([int(t)]), "id": int(t), "prob": float(v),
             "logit": float(logits[t])} for v, t in zip(p, i)]


def default_watch(clean: Clean, ivs: list[Intervention], n: int) -> list[FeatureRef]:
    """The n most active clean features that an intervention can reach: later layers, same or later positions."""
    first_layer = min(iv.layer for iv in ivs)
    first_pos = min(1 if iv.pos is None else iv.pos for iv in ivs)
    touched = {(iv.layer, iv.feature) for iv in ivs}
    cands = []
    for layer in range(first_layer + 1, len(clean.acts)):
        a = clean.acts[layer][first_pos:]  # [T', F]
        vals, idx = a.flatten().topk(min(n + len(touched), a.numel()))
        F = a.shape[1]
        for v, i in zip(vals.tolist(), idx.tolist()):
            if v > 0 and (layer, i % F) not in touched:
                cands.append((v, FeatureRef(layer=layer, pos=first_pos + i // F, feature=i % F)))
    cands.sort(key=lambda c: -c[0])
    return [r for _, r in cands[:n]]


def _feature_rows(model, ids: Tensor, clean: Clean, run: Run, layer: int, pos: int | None, feature: int) -> list:
    positions = range(1, ids.numel()) if pos is None else [pos]
    toks = model.decode(ids)
    return [{"pos": p, "token": toks[p],
             "act_before": float(clean.acts[layer][p, feature]) + 0.0,  # + 0.0: no "-0.0" from JumpReLU
             "act_after": float(run.acts[layer][p, feature]) + 0.0,
             "pre_before": float(clean.pre[layer][p, feature]), "pre_after": float(run.pre[layer][p, feature])}
            for p in positions]


@torch.no_grad()
def intervene(
    model: ModelAdapter, transcoder: Transcoder, prompt: str | None, interventions, *, mode: str = "constrained",
    constrained_layers=None, watch=None, n_watch: int = 10, top: int = 10, graph=None,
) -> InterventionResult:
    """Run `prompt` with features set or scaled; report next-token and feature-activation changes.

    mode "constrained": inside the prompt's local replacement model (errors, attention patterns and norm
    denominators frozen); `constrained_layers` (list or "A:B") keep their clean activations.
    mode "free": in the real model, everything downstream recomputing.
    watch: features to report ("L:F[@P]" or FeatureRef); default the graph's most influential nodes when a
    graph is given, else the n_watch most active features the interventions can reach.
    graph: an attribution Graph of the same prompt (or its file); adds the graph's direct prediction.
    """
    tc = transcoder
    if top < 1 or n_watch < 0:
        raise CltraceError(f"top must be at least 1 and n_watch at least 0 (got {top}, {n_watch})")
    if prompt is None and graph is not None:
        graph = graph if isinstance(graph, Graph) else Graph.load(graph)
        prompt = graph.prompt
    ids, ivs, held = _prepare(model, tc, prompt, interventions, mode, constrained_layers)
    if graph is not None:
        graph = load_graph(graph, ids)
    clean = clean_run(model, tc, ids)
    run = run_free(model, tc, ids, ivs) if mode == "free" else run_constrained(model, tc, clean, ivs, held=held)
    before, after = clean.last_logits, run.last_logits
    if watch:
        refs = validate_refs(as_refs(watch), tc, ids.numel())
    elif graph is not None:
        first = (min(iv.layer for iv in ivs), min(1 if iv.pos is None else iv.pos for iv in ivs))
        refs = graph_watch(graph, {(iv.layer, iv.pos, iv.feature) for iv in ivs}, n_watch, first)
    else:
        refs = default_watch(clean, ivs, n_watch)
    lb, la = top_tokens(model, before, top), top_tokens(model, after, top)
    pb, pa = torch.softmax(before.float(), -1), torch.softmax(after.float(), -1)
    tops = dict.fromkeys([r["id"] for r in lb] + [r["id"] for r in la])
    out = dict(
        prompt=prompt,
        tokens=model.decode(ids),
        mode=mode,
        constrained_layers=sorted(held),
        interventions=[
            {**iv.to_dict(), "positions": _feature_rows(model, ids, clean, run, iv.layer, iv.pos, iv.feature)}
            for iv in ivs
        ],
        logits_before=lb,
        logits_after=la,
        top_token={"token": lb[0]["token"], "id": lb[0]["id"], "logit_before": float(before[lb[0]["id"]]),
                      "logit_after": float(after[lb[0]["id"]]), "prob_before": float(pb[lb[0]["id"]]),
                      "prob_after": float(pa[lb[0]["id"]])},
        token_changes=[
            {"token": model.tokenizer.decode([t]), "id": t, "logit_before": float(before[t]),
             "logit_after": float(after[t]), "prob_before": float(pb[t]), "prob_after": float(pa[t])}
            for t in tops
        ],
        features=[
            {"layer": r.layer, "feature": r.feature, **row}
            for r in refs for row in _feature_rows(model, ids, clean, run, r.layer, r.pos, r.feature)
        ],
    )
    if graph is not None:
        out["graph"] = _graph_report(model, graph, ivs, clean, run, out["features"])
    return InterventionResult(**out)


def _graph_report(model, graph, ivs: list[Intervention], clean: Clean, run: Run, features: list[dict]) -> dict:
    """The graph's direct prediction next to what was measured: logit nodes (logit − mean logit) and the
    watched features that are graph nodes (pre-activation change, written into `features` rows)."""
    index = node_index(graph)
    changes, missing = {}, []
    for iv in ivs:
        for p in range(1, clean.ids.numel()) if iv.pos is None else [iv.pos]:
            d = float(run.acts[iv.layer][p, iv.feature] - clean.acts[iv.layer][p, iv.feature])
            if d == 0:
                continue
            key = (iv.layer, p, iv.feature)
            if key in index:
                changes[key] = d
            else:
                missing.append(f"{iv.layer}_{iv.feature}_{p}")  # circuit-tracer's node id
    pred = direct_prediction(graph, changes)
    nf = graph.n_features
    for row in features:
        i = index.get((row["layer"], row["pos"], row["feature"]))
        row["pre_change_predicted_direct"] = None if i is None else float(pred[i])
    demeaned = (run.last_logits - run.last_logits.mean()) - (clean.last_logits - clean.last_logits.mean())
    logits = [{"token": label, "id": int(t), "predicted_direct": float(pred[nf + j]),
               "measured": float(demeaned[int(t)]) if int(t) >= 0 else None}
              for j, (t, label) in enumerate(zip(graph.logit_tokens.tolist(), graph.logit_labels))]
    return {"logit_changes": logits, "changes_outside_graph": missing,
            "note": "predicted_direct: Σ edge / activation × Δactivation over the changed graph nodes, the exact "
                    "change with every layer constrained; logit values are logit − mean logit"}


def intervene_generate(
    model: ModelAdapter, transcoder: Transcoder, prompt: str, interventions, *, n_tokens: int = 20,
    mode: str = "free", constrained_layers=None, temperature: float = 0.0, seed: int = 0,
) -> GenerationResult:
    """Continue `prompt` twice, without and with the interventions held at every step; same seed for both."""
    if n_tokens < 1:
        raise CltraceError("generation needs at least 1 token (n_tokens)")
    if temperature < 0 or temperature != temperature:
        raise CltraceError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    tc = transcoder
    ids, ivs, held = _prepare(model, tc, prompt, interventions, mode, constrained_layers)
    kw = dict(temperature=temperature, seed=seed, stop=model.tokenizer.eos_token_id, max_len=model.n_ctx)
    original = generate(lambda x: run_free(model, tc, x, []).last_logits, ids, n_tokens, **kw)  # the plain model
    steered = generate(lambda x: run_mode(model, tc, x, ivs, mode, held=held).last_logits, ids, n_tokens, **kw)
    return GenerationResult(
        prompt=prompt, mode=mode, constrained_layers=sorted(held), temperature=temperature, seed=seed,
        interventions=[iv.to_dict() for iv in ivs], original=model.tokenizer.decode(original),
        steered=model.tokenizer.decode(steered), original_ids=original, steered_ids=steered,
    )
