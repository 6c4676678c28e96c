"""Everything `cltrace validate` measures on one prompt, as one JSON-able dict (one result file)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from cltrace.attribution.engine import attribute
from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import prune
from cltrace.interventions.engine import clean_run
from cltrace.models.adapter import ModelAdapter
from cltrace.transcoders.transcoder import Transcoder
from cltrace.validation.graph_measures import NODE_THRESHOLDS, graph_scores, path_length, predictions, pruning_curve
from cltrace.validation.perturb import clean_resid, measure_source, run_live
from cltrace.validation.prompts import Prompt


@dataclass(frozen=True)
class Settings:
    """What a validation run measures; a result folder holds results of one Settings only."""

    max_features: int | None = 200  # attribution's max_feature_nodes (None: every active feature)
    sources: int = 8  # features inhibited per prompt (sampled among the pruned graph's features)
    targets: int = 16  # downstream graph features watched per source
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    node_thresholds: tuple[float, ...] = NODE_THRESHOLDS
    seed: int = 0
    batch_size: int = 64

    def to_dict(self) -> dict:
        d = asdict(self)
        d["node_thresholds"] = list(self.node_thresholds)
        return d


def sample_pairs(graph: Graph, settings: Settings, seed: int) -> tuple[list[int], list[list[int]]]:
    """Source feature nodes (kept by pruning, with a feature downstream) and, per source, target feature nodes
    at a later layer and the same or a later position, drawn uniformly without replacement.

    When pruning keeps no such feature (errors hold nearly all the influence), sources come from every graph
    feature instead, so that the graph's edges are still tested."""
    g = torch.Generator().manual_seed(seed)
    feats = graph.features  # [nf, 3] (layer, pos, feature)
    nf = graph.n_features
    kept = prune(graph, settings.node_threshold, settings.edge_threshold).node_mask[:nf]
    layer, pos = feats[:, 0], feats[:, 1]
    down = (layer[None, :] > layer[:, None]) & (pos[None, :] >= pos[:, None])  # [s, t]
    candidates = (kept & down.any(1)).nonzero().flatten()
    if candidates.numel() == 0:
        candidates = down.any(1).nonzero().flatten()
    pick = candidates[torch.randperm(candidates.numel(), generator=g)[:settings.sources]].sort().values.tolist()
    targets = []
    for s in pick:
        t = down[s].nonzero().flatten()
        targets.append(t[torch.randperm(t.numel(), generator=g)[:settings.targets]].sort().values.tolist())
    return pick, targets


def prompt_seed(seed: int, prompt: Prompt) -> int:
    """Per-prompt sampling seed: the same pairs whatever order or subset the prompts run in."""
    return (seed * 1_000_003 + int(prompt.key, 16)) % (2**63)


def measure_prompt(model: ModelAdapter, tc: Transcoder, prompt: Prompt, settings: Settings) -> dict:
    """Trace the prompt, then score, prune, perturb and compare (see cltrace.validation)."""
    t0 = time.perf_counter()
    ids = prompt.tensor(model.device)
    graph = attribute(model, tc, ids, max_feature_nodes=settings.max_features, batch_size=settings.batch_size)
    t_attr = time.perf_counter() - t0
    out: dict = {"prompt": prompt.text, "ids": list(prompt.ids), "tokens": graph.tokens,
                 **graph_scores(graph, settings.node_threshold, settings.edge_threshold),
                 "n_active_features": int(graph.meta.get("n_active_features", graph.n_features)),
                 "pruning_curve": pruning_curve(graph, settings.node_thresholds, settings.edge_threshold),
                 "path_length": path_length(graph)}

    with torch.no_grad():
        clean = clean_run(model, tc, ids)
        glob = run_live(model, tc, clean, [], errors=False).last_logits
    top_model, top_rep = int(clean.last_logits.argmax()), int(glob.argmax())
    out["next_token"] = {"model": top_model, "replacement": top_rep, "agree": top_model == top_rep,
                         "model_token": model.decode([top_model])[0], "replacement_token": model.decode([top_rep])[0],
                         "p_model_top_in_replacement": float(torch.softmax(glob.float(), -1)[top_model])}

    sources, targets = sample_pairs(graph, settings, prompt_seed(settings.seed, prompt))
    preds = predictions(graph, sources, targets)
    stream = clean_resid(model, clean) if sources else []
    feats = graph.features.tolist()
    out["perturbations"] = []
    for s, ts, ps in zip(sources, targets, preds):
        m = measure_source(model, tc, clean, stream, tuple(feats[s]), [tuple(feats[t]) for t in ts])
        out["perturbations"].append({
            "source": feats[s], "activation": float(graph.activations[s]), "targets": [feats[t] for t in ts],
            "pred_direct": [p["direct"] for p in ps], "pred_total": [p["total"] for p in ps],
            "pred_influence": [p["influence"] for p in ps], **m})
    out["seconds"] = {"attribution": t_attr, "total": time.perf_counter() - t0}
    return out
