"""Export a graph as the JSON that circuit-tracer's local viewer and Neuronpedia read (schema_version 1).

Feature labels: a graph whose meta holds "feature_labels" ({"LAYER:FEATURE": {"label", "source"}}, written by
`cltrace trace --features DB`) gets each feature node's label in its "clerp", the field both viewers show.

Node ids follow circuit-tracer except for error nodes. circuit-tracer writes "0_{layer}_{pos}" for them,
which collides with the layer-0 feature "{0}_{feat}_{pos}" whenever feat == layer (its bug §7.4). The
viewer only uses node_id as an opaque key (links refer to it; nothing parses it), so we write
"{layer}_err_{pos}": still three '_'-separated parts with the layer first and the position last, and the
middle part is never an integer, so it can never equal a feature id.
"""

from __future__ import annotations

import json
from pathlib import Path

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import PruneResult, prune


def cantor(layer: int, feat: int) -> int:
    return (layer + feat) * (layer + feat + 1) // 2 + feat


def node_ids(graph: Graph) -> list[str]:
    """Every node's id, in node order: the ids of the JSON below, which the local viewer and its saved state use."""
    L, T, nf = graph.n_layers, graph.n_pos, graph.n_features
    ids = [f"{layer}_{f}_{pos}" for layer, pos, f in graph.features.tolist()]
    ids += [f"{layer}_err_{pos}" for layer in range(L) for pos in range(T)]
    ids += [f"E_{int(tok)}_{pos}" for pos, tok in enumerate(graph.input_ids.tolist())]
    vocab = int(graph.meta.get("vocab_size", 0))
    ids += [f"{L + 1}_{t if t >= 0 else vocab + j}_{T - 1}" for j, t in enumerate(graph.logit_tokens.tolist())]
    assert len(ids) == nf + (L + 1) * T + graph.n_logits
    return ids


def graph_json(graph: Graph, slug: str, pruned: PruneResult | None = None, *, scan: str | None = None,
               node_threshold: float = 0.8, edge_threshold: float = 0.98) -> dict:
    pr = pruned or prune(graph, node_threshold, edge_threshold)
    L, T, nf = graph.n_layers, graph.n_pos, graph.n_features
    kinds = graph.kinds().tolist()
    infl = pr.cumulative_scores.tolist()
    ids: list[str] = []
    nodes: list[dict] = []
    has_edge = pr.edge_mask.any(0).clone()
    has_edge[graph.rows] |= pr.edge_mask.any(1)
    keep = (pr.node_mask & has_edge) | (graph.kinds() >= 2)
    labels = graph.meta.get("feature_labels") or {}
    for i in range(graph.n_nodes):
        k = kinds[i]
        base = {"run_idx": 0, "reverse_ctx_idx": 0, "clerp": "", "influence": infl[i], "activation": None,
                "token_prob": 0.0, "is_target_logit": False}
        if k == 0:
            layer, pos, f = graph.features[i].tolist()
            nid = f"{layer}_{f}_{pos}"
            label = labels.get(f"{layer}:{f}", "")
            base.update(node_id=nid, feature=cantor(layer, f), layer=str(layer), ctx_idx=pos,
                        feature_type="cross layer transcoder", jsNodeId=f"{layer}_{f}-0",
                        activation=float(graph.activations[i]),
                        clerp=label.get("label", "") if isinstance(label, dict) else str(label))
        elif k == 1:
            layer, pos = divmod(i - nf, T)
            nid = f"{layer}_err_{pos}"
            base.update(node_id=nid, feature=-1, layer=str(layer), ctx_idx=pos,
                        feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0")
        elif k == 2:
            pos = i - nf - L * T
            tok = int(graph.input_ids[pos])
            nid = f"E_{tok}_{pos}"
            base.update(node_id=nid, feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                        jsNodeId=f"E_{tok}-{pos}")
        else:
            j = i - (nf + (L + 1) * T)
            vocab = int(graph.logit_tokens[j])
            vocab = vocab if vocab >= 0 else int(graph.meta.get("vocab_size", 0)) + j  # contrast: virtual id
            p = float(graph.logit_probs[j])
            nid = f"{L + 1}_{vocab}_{T - 1}"
            base.update(node_id=nid, feature=vocab, layer=str(L + 1), ctx_idx=T - 1, feature_type="logit",
                        token_prob=p, is_target_logit=j == 0, jsNodeId=f"L_{vocab}-{T - 1}",
                        clerp=f'Output "{graph.logit_labels[j]}" (p={p:.3f})')
        ids.append(nid)
        if keep[i]:
            nodes.append(base)
    links = []
    r_idx, s_idx = pr.edge_mask.nonzero(as_tuple=True)
    for r, s in zip(r_idx.tolist(), s_idx.tolist()):
        t = int(graph.rows[r])
        if keep[t] and keep[s]:
            links.append({"source": ids[s], "target": ids[t], "weight": float(graph.edges[r, s])})
    metadata = {"slug": slug, "scan": scan or graph.meta.get("scan") or graph.meta.get("model", ""),
                "transcoder_list": [], "prompt_tokens": graph.tokens, "prompt": graph.prompt,
                "node_threshold": node_threshold, "schema_version": 1}
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q, "nodes": nodes, "links": links}


def export_graph_files(graph: Graph, folder: str | Path, slug: str, **kw) -> Path:
    """Write {folder}/{slug}.json and upsert {folder}/graph-metadata.json (what the viewer lists)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = graph_json(graph, slug, **kw)
    out = folder / f"{slug}.json"
    out.write_text(json.dumps(data))
    meta_path = folder / "graph-metadata.json"
    try:
        index = json.loads(meta_path.read_text()) if meta_path.exists() else {"graphs": []}
    except json.JSONDecodeError:
        index = {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
    meta_path.write_text(json.dumps(index, indent=1))
    return out
