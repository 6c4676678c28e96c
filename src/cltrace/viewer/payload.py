"""What the page needs to draw one pruned graph, and nothing more, packed small.

Numbers go as little-endian typed arrays in base64 (edge source/target as uint32 indices into the node list,
weights and activations as float32): a 50,000-edge view is 600 kB of arrays instead of ~1 MB of JSON
number text, and the browser turns them into typed arrays without parsing a number at a time. Strings (ids,
labels, tokens) stay JSON. Nodes are those `export.graph_json` would write (kept by pruning and touching a kept
edge, plus every token and logit), in node order.
"""

from __future__ import annotations

import base64

import numpy as np

from cltrace.viewer.reprune import SparsePrune
from cltrace.viewer.store import Loaded

KIND_DIFF = 4  # the virtual "logit A − logit B" node


def b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def shown_nodes(loaded: Loaded, sp: SparsePrune) -> np.ndarray:
    g = loaded.graph
    has_edge = np.zeros(g.n_nodes, dtype=bool)
    has_edge[sp.edge_cols.numpy()] = True
    has_edge[g.rows.numpy()[sp.edge_rows.numpy()]] = True
    kinds = g.kinds().numpy()
    return np.nonzero((sp.node_mask.numpy() & has_edge) | (kinds >= 2))[0]


def node_columns(loaded: Loaded) -> dict[str, np.ndarray]:
    """Per node of the whole graph: kind, layer (tokens −1, logits L), position, feature (−1 if none)."""
    g = loaded.graph
    L, T, nf = g.n_layers, g.n_pos, g.n_features
    kinds = g.kinds().numpy()
    layer = np.empty(g.n_nodes, dtype=np.int32)
    pos = np.empty(g.n_nodes, dtype=np.int32)
    feat = np.full(g.n_nodes, -1, dtype=np.int32)
    f = g.features.numpy()
    layer[:nf], pos[:nf], feat[:nf] = f[:, 0], f[:, 1], f[:, 2]
    layer[nf:nf + L * T] = np.repeat(np.arange(L), T)
    pos[nf:nf + L * T] = np.tile(np.arange(T), L)
    layer[nf + L * T:nf + (L + 1) * T] = -1
    pos[nf + L * T:nf + (L + 1) * T] = np.arange(T)
    layer[nf + (L + 1) * T:] = L
    pos[nf + (L + 1) * T:] = T - 1
    return {"kind": kinds, "layer": layer, "pos": pos, "feature": feat}


def view_payload(loaded: Loaded, sp: SparsePrune, labels: list[str], *, node_threshold: float,
                 edge_threshold: float, diff: tuple[int, int] | None = None, max_diff_edges: int = 300) -> dict:
    """The view of one pruned graph. `labels[i]` is the label of feature i (graph feature order)."""
    g = loaded.graph
    nodes = shown_nodes(loaded, sp)
    pos_in_view = np.full(g.n_nodes, -1, dtype=np.int64)
    pos_in_view[nodes] = np.arange(nodes.size)
    cols = node_columns(loaded)
    rows = g.rows.numpy()
    er, ec = sp.edge_rows.numpy(), sp.edge_cols.numpy()
    src, tgt = pos_in_view[ec], pos_in_view[rows[er]]
    ok = (src >= 0) & (tgt >= 0)
    E = g.edges
    weights = E[sp.edge_rows, sp.edge_cols].numpy()[ok]
    src, tgt = src[ok], tgt[ok]
    nf, L, T = g.n_features, g.n_layers, g.n_pos
    act = np.zeros(g.n_nodes, dtype=np.float32)
    act[:nf] = g.activations.float().numpy()
    prob = np.zeros(g.n_nodes, dtype=np.float32)
    prob[g.n_nodes - g.n_logits:] = g.logit_probs.float().numpy()
    label = []
    for i in nodes.tolist():
        k = cols["kind"][i]
        if k == 0:
            label.append(labels[i])
        elif k == 1:
            label.append(f"error {cols['layer'][i]}@{cols['pos'][i]}: {g.tokens[cols['pos'][i]]}")
        elif k == 2:
            label.append(f"token: {g.tokens[cols['pos'][i]]}")
        else:
            j = i - (g.n_nodes - g.n_logits)
            label.append(f"output {g.logit_labels[j]} (p={float(g.logit_probs[j]):.3f})")
    ids = [loaded.ids[i] for i in nodes.tolist()]
    kind, layer, pos, feat = (cols[c][nodes] for c in ("kind", "layer", "pos", "feature"))
    infl, actv, probv = sp.cumulative_scores.numpy()[nodes], act[nodes], prob[nodes]
    if diff is not None:
        a, b = diff
        if not (0 <= a < g.n_logits and 0 <= b < g.n_logits and a != b):
            raise ValueError(f"logit difference needs two different logits among 0..{g.n_logits - 1}")
        ra, rb = nf + a, nf + b  # logit rows come after the feature rows
        d = (E[ra] - E[rb]).numpy()[nodes]
        top = np.argsort(-np.abs(d))[:max_diff_edges]
        top = top[d[top] != 0]
        ids.append(f"diff_{a}_{b}")
        label.append(f"output {g.logit_labels[a]} − {g.logit_labels[b]}")
        n = len(ids) - 1
        kind, layer, pos, feat = (np.append(kind, KIND_DIFF), np.append(layer, L + 1), np.append(pos, T - 1),
                                  np.append(feat, -1))
        infl, actv = np.append(infl, 0), np.append(actv, 0)
        probv = np.append(probv, float(g.logit_probs[a] - g.logit_probs[b]))
        src, tgt = np.concatenate([src, top]), np.concatenate([tgt, np.full(top.size, n)])
        weights = np.concatenate([weights, d[top]])
    return {
        "prompt": g.prompt, "tokens": g.tokens, "n_layers": L, "n_pos": T,
        "model": g.meta.get("model", ""), "meta_scores": g.meta.get("scores"),
        "node_threshold": node_threshold, "edge_threshold": edge_threshold,
        "logits": [{"index": j, "token": t, "prob": float(p)}
                   for j, (t, p) in enumerate(zip(g.logit_labels, g.logit_probs.tolist()))],
        "counts": {"nodes_total": g.n_nodes, "edges_total": int(loaded.pruner.v.size),
                   "nodes_shown": len(ids), "edges_shown": int(src.size),
                   "features_total": nf, "features_shown": int((kind == 0).sum())},
        "nodes": {"id": ids, "label": label, "kind": b64(kind, "<u1"), "layer": b64(layer, "<i4"),
                  "pos": b64(pos, "<i4"), "feature": b64(feat, "<i4"), "act": b64(actv, "<f4"),
                  "influence": b64(infl, "<f4"), "prob": b64(probv, "<f4")},
        "edges": {"src": b64(src, "<u4"), "tgt": b64(tgt, "<u4"), "w": b64(weights, "<f4")},
    }
