"""Scores of a pinned subgraph, and supernode suggestions among pinned features.

Subgraph scores are `cltrace.scores` itself: the pinned features play the part of the nodes pruning kept and
every other feature counts as error (its inputs cut, what it passes on unexplained), which is how Neuronpedia
scores a subgraph and how the paper scores a pruned graph.

Suggestions group features that play the same role. Per pair of pinned features, up to four similarities:
  input   cosine of the signed input edges, sources keyed by what they are (feature L:F, error of layer L,
          token id) rather than where, so the same role at two positions compares equal;
  output  the same over the edges they send (targets keyed likewise, logits by token);
  decoder cosine of their decoder vectors into their own layer (when the server has the transcoders);
  contexts the Jaccard overlap of their top-activation contexts (when there is a feature database).
Features are joined by average linkage while the mean of the available similarities stays above a threshold.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from cltrace.attribution.prune import PruneResult, scores
from cltrace.viewer.store import Loaded


def subgraph_scores(loaded: Loaded, pinned: list[str]) -> dict:
    """Replacement and completeness with only the pinned features kept (all others count as error)."""
    g = loaded.graph
    mask = g.kinds() >= 1  # errors, tokens, logits are always nodes; errors stay errors
    n = 0
    for node in pinned:
        i = loaded.index.get(node)
        if i is not None and i < g.n_features:
            mask[i] = True
            n += 1
    rep, comp = scores(g, PruneResult(mask, torch.zeros(0, dtype=torch.bool), torch.zeros(0)))
    return {"replacement": rep, "completeness": comp, "n_features": n}


def subgraph_nodes(loaded: Loaded, pinned: list[str], feature_labels: list[str]) -> dict:
    """The pinned nodes (what they are, even when pruning hid them) and every nonzero edge among them."""
    g = loaded.graph
    idx = [loaded.index[n] for n in dict.fromkeys(pinned) if n in loaded.index]
    nf, L, T = g.n_features, g.n_layers, g.n_pos
    nodes = {}
    for i in idx:
        key = _key(loaded, i)
        if key[0] == "f":
            layer, pos, _ = g.features[i].tolist()
            nodes[loaded.ids[i]] = {"kind": 0, "layer": layer, "pos": pos, "label": feature_labels[i],
                                    "act": float(g.activations[i])}
        elif key[0] == "e":
            layer, pos = divmod(i - nf, T)
            nodes[loaded.ids[i]] = {"kind": 1, "layer": layer, "pos": pos, "label": f"error {layer}@{pos}"}
        elif key[0] == "t":
            pos = i - nf - L * T
            nodes[loaded.ids[i]] = {"kind": 2, "layer": -1, "pos": pos, "label": f"token: {g.tokens[pos]}"}
        else:
            j = i - nf - (L + 1) * T
            nodes[loaded.ids[i]] = {"kind": 3, "layer": L, "pos": T - 1, "label": f"output {g.logit_labels[j]}"}
    row_of = {int(r): j for j, r in enumerate(g.rows.tolist())}
    edges = []
    for t in idx:
        if t in row_of:
            row = g.edges[row_of[t]]
            for s in idx:
                w = float(row[s])
                if w != 0:
                    edges.append([loaded.ids[s], loaded.ids[t], w])
    return {"nodes": nodes, "edges": edges}


def _key(loaded: Loaded, i: int) -> tuple:
    """What a node is, regardless of its position."""
    g = loaded.graph
    nf, L, T = g.n_features, g.n_layers, g.n_pos
    if i < nf:
        layer, _, f = g.features[i].tolist()
        return ("f", layer, f)
    if i < nf + L * T:
        return ("e", (i - nf) // T)
    if i < nf + (L + 1) * T:
        return ("t", int(g.input_ids[i - nf - L * T]))
    return ("l", int(g.logit_tokens[i - nf - (L + 1) * T]))


def _profiles(loaded: Loaded, i: int, row_of: dict[int, int]) -> tuple[dict, dict]:
    g = loaded.graph
    inp: dict = defaultdict(float)
    if i in row_of:
        row = g.edges[row_of[i]]
        for s in row.nonzero().flatten().tolist():
            inp[_key(loaded, s)] += float(row[s])
    out: dict = defaultdict(float)
    col = g.edges[:, i]
    for r in col.nonzero().flatten().tolist():
        out[_key(loaded, int(g.rows[r]))] += float(col[r])
    return inp, out


def _cos(a: dict, b: dict) -> float | None:
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    if na == 0 or nb == 0:
        return None
    return sum(v * b.get(k, 0.0) for k, v in a.items()) / (na * nb)


def suggest_supernodes(loaded: Loaded, pinned: list[str], *, decoder=None, contexts=None,
                       threshold: float = 0.5, exclude: list[list[str]] | None = None) -> list[dict]:
    """Proposed groups among the pinned features: [{"members", "score", "similarity": {...}, "why"}].

    decoder(layer, feature) -> Tensor [D] or None; contexts(layer, feature) -> set of context ids or None.
    exclude: groups already made (or rejected), not proposed again.
    """
    g = loaded.graph
    nodes = [(n, loaded.index[n]) for n in dict.fromkeys(pinned) if n in loaded.index
             and loaded.index[n] < g.n_features]
    if len(nodes) < 2:
        return []
    row_of = {int(r): j for j, r in enumerate(g.rows.tolist())}
    prof = {n: _profiles(loaded, i, row_of) for n, i in nodes}
    dec, ctx = {}, {}
    for n, i in nodes:
        layer, _, f = g.features[i].tolist()
        dec[n] = decoder(layer, f) if decoder else None
        ctx[n] = contexts(layer, f) if contexts else None
    sims: dict[tuple[str, str], dict] = {}
    for a_i, (a, _) in enumerate(nodes):
        for b, _ in nodes[a_i + 1:]:
            s = {"input": _cos(prof[a][0], prof[b][0]), "output": _cos(prof[a][1], prof[b][1])}
            if dec[a] is not None and dec[b] is not None:
                s["decoder"] = float(torch.nn.functional.cosine_similarity(dec[a], dec[b], dim=0))
            if ctx[a] and ctx[b]:
                s["contexts"] = len(ctx[a] & ctx[b]) / len(ctx[a] | ctx[b])
            vals = [v for v in s.values() if v is not None]
            s = {k: v for k, v in s.items() if v is not None}
            s["mean"] = sum(vals) / len(vals) if vals else 0.0
            sims[(a, b)] = sims[(b, a)] = s
    # average linkage
    groups = [[n] for n, _ in nodes]

    def link(x: list[str], y: list[str]) -> float:
        return sum(sims[(a, b)]["mean"] for a in x for b in y) / (len(x) * len(y))

    while len(groups) > 1:
        best, pair = -1.0, None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                v = link(groups[i], groups[j])
                if v > best:
                    best, pair = v, (i, j)
        if best < threshold:
            break
        i, j = pair
        groups[i] = groups[i] + groups.pop(j)
    seen = {frozenset(x) for x in exclude or []}
    out = []
    for grp in groups:
        if len(grp) < 2 or frozenset(grp) in seen:
            continue
        pairs = [sims[(a, b)] for k, a in enumerate(grp) for b in grp[k + 1:]]
        similarity = {}
        for name in ("input", "output", "decoder", "contexts"):
            vals = [p[name] for p in pairs if name in p]
            if vals:
                similarity[name] = round(sum(vals) / len(vals), 3)
        words = {"input": "input edges cos", "output": "output edges cos", "decoder": "decoder cos",
                 "contexts": "shared top contexts"}
        why = "; ".join(f"{words[k]} {v:.2f}" for k, v in similarity.items())
        out.append({"members": grp, "score": round(sum(p["mean"] for p in pairs) / len(pairs), 3),
                    "similarity": similarity, "why": why})
    out.sort(key=lambda p: -p["score"])
    return out
