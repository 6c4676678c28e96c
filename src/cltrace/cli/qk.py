"""`cltrace qk GRAPH --node L:F@POS`: why attention moved information into a graph node (QK attributions)."""

from __future__ import annotations

import json


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="QK attributions and head loadings of a graph node's cross-position edges",
                       description="For a node of an attribution graph: split its strongest cross-position input "
                                   "edges by the attention head that carried them (head loadings), and decompose "
                                   "those heads' pre-softmax scores into (query component, key component) terms.")
    p.add_argument("graph", help="graph file written by `cltrace trace`")
    p.add_argument("--node", required=True, metavar="L:F@POS",
                   help="the target feature LAYER:FEATURE@POS, or 'logit' / 'logit:I' for a logit node")
    p.add_argument("--heads", nargs="+", default=["top"], metavar="top|L.H",
                   help="'top' (the heads that carry the most of the node's edges) or heads as LAYER.HEAD")
    p.add_argument("--edges", type=int, default=5, help="how many cross-position input edges to split (default 5)")
    p.add_argument("--key-pos", type=int, default=None, help="key position for --heads L.H (default: where the "
                                                              "head's loading on the node is largest)")
    p.add_argument("--top", type=int, default=10, help="terms and components listed per head (default 10)")
    p.add_argument("--model", "-m", default=None, help="model (default: the graph's)")
    p.add_argument("--transcoders", "-t", required=True, help="the transcoders the graph was built with")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--out", "-o", default=None, help="also write the JSON here")
    p.add_argument("--no-save", action="store_true",
                   help="do not merge the explained edges into GRAPH.qk.json (the file the viewer shows)")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.attribution import Graph
    from cltrace.attribution.heads import cross_position_edges, explain_edges, save_qk
    from cltrace.attribution.qk import HeadQuery, qk_attributions
    from cltrace.errors import CltraceError
    from cltrace.models.registry import load_model
    from cltrace.replacement import build_replacement
    from cltrace.transcoders.io import check_fits, load_transcoder

    graph = Graph.load(args.graph)
    model = load_model(args.model or graph.meta.get("model"), device=ctx.device, dtype=ctx.dtype)
    tc = load_transcoder(args.transcoders, device=ctx.device, dtype=ctx.dtype)
    check_fits(tc, model)
    rep = build_replacement(model, tc, graph.input_ids.to(model.device))
    row = node_row(graph, args.node)
    mask = graph.rows == graph.rows[row]
    edges = [e for e in cross_position_edges(graph, graph.n_nodes, mask=mask[:, None].expand_as(graph.edges))
             if e[0] == row][: args.edges]
    if not edges:
        raise CltraceError(f"node {args.node} has no input edge from another position in this graph")
    out = explain_edges(rep, graph, edges, top_terms=args.top)
    if not args.no_save:
        save_qk(args.graph, out)
    explicit = [spec for spec in args.heads if spec != "top"]
    if explicit:
        pos = int(graph.features[int(graph.rows[row]), 1]) if int(graph.rows[row]) < graph.n_features \
            else graph.n_pos - 1
        asks = []
        for spec in explicit:
            try:
                layer, head = (int(x) for x in spec.split("."))
            except ValueError:
                raise CltraceError(f"--heads {spec!r}: write 'top' or LAYER.HEAD, e.g. 5.2") from None
            key = args.key_pos if args.key_pos is not None else _best_key(out, layer, head, rep, pos)
            asks.append(HeadQuery(layer, head, pos, key))
        out["heads"] = [r.report(rep, args.top) for r in qk_attributions(rep, asks)]
    text = json.dumps(out, ensure_ascii=False)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        print(text)
        return 0
    for e in out["edges"]:
        print(f"edge {e['source']} -> {e['target']}: {e['edge']:+.4f}  (direct {e['direct']:+.4f}, heads "
              f"{e['sum_loadings']:+.4f})")
        for h in e["heads"]:
            _print_head(h["qk"], f"  carried by {h['layer']}.{h['head']} from key {h['key_pos']}: {h['part']:+.4f}")
    for r in out.get("heads", []):
        _print_head(r, f"head {r['layer']}.{r['head']}")
    return 0


def node_row(graph, spec: str) -> int:
    """'L:F@POS' (or 'logit', 'logit:I') -> the row of graph.edges holding that node's inputs."""
    from cltrace.errors import CltraceError
    from cltrace.interventions.spec import parse_feature

    if spec.startswith("logit"):
        i = int(spec.split(":")[1]) if ":" in spec else 0
        if not 0 <= i < graph.n_logits:
            raise CltraceError(f"--node {spec}: the graph has {graph.n_logits} logit nodes (logit:0 ..)")
        node = graph.logit_index(i)
    else:
        layer, pos, feature, _ = parse_feature(spec, what="node")
        if pos is None:
            raise CltraceError(f"--node {spec}: give the position too, LAYER:FEATURE@POS")
        pos = pos + graph.n_pos if pos < 0 else pos
        hit = ((graph.features[:, 0] == layer) & (graph.features[:, 1] == pos) & (graph.features[:, 2] == feature))
        if not hit.any():
            raise CltraceError(f"--node {spec} is not a feature node of this graph")
        node = int(hit.nonzero()[0, 0])
    rows = (graph.rows == node).nonzero()
    if not rows.numel():
        raise CltraceError(f"--node {spec} has no computed input row in this graph")
    return int(rows[0, 0])


def _best_key(out: dict, layer: int, head: int, rep, pos: int) -> int:
    """The key position of the head's largest loading among the explained edges, else its largest attention
    weight from pos to an earlier position."""
    for e in out["edges"]:
        for h in e["heads"]:
            if (h["layer"], h["head"]) == (layer, head):
                return h["key_pos"]
    row = rep.frozen.patterns[layer][0, head, pos, :pos + 1].clone()
    if pos:
        row[pos] = -1
    return int(row.argmax())


def _print_head(r: dict, title: str) -> None:
    cap = f", soft-cap {r['softcap']:g} applies after" if r["softcap"] else ""
    print(f"{title}\n    score {r['score']:+.4f} (pre-softmax{cap}; terms sum {r['score_terms']:+.4f}), "
          f"attention weight {r['pattern']:.3f}, query {r['query_pos']} key {r['key_pos']}")
    s = r["shares"]
    print("    share of |terms|: " + ", ".join(f"{k} {s[k]:.2f}" for k in ("feature", "error", "token", "constant"))
          + f"; feature x feature {s['feature_pairs']:.2f}")
    print("    top (query, key) terms: " + "; ".join(f"{t['query']} x {t['key']} {t['term']:+.3f}"
                                                  for t in r["top_pairs"][:5]))
    print("    top query side: " + "; ".join(f"{t['component']} {t['value']:+.3f}" for t in r["top_query"][:5]))
    print("    top key side:   " + "; ".join(f"{t['component']} {t['value']:+.3f}" for t in r["top_key"][:5]))
    print("    features, query side: " + "; ".join(f"{t['component']} {t['value']:+.3f}"
                                                  for t in r["top_query_features"][:5]))
    print("    features, key side:   " + "; ".join(f"{t['component']} {t['value']:+.3f}"
                                                  for t in r["top_key_features"][:5]))
    print("    feature x feature terms: " + "; ".join(f"{t['query']} x {t['key']} {t['term']:+.3f}"
                                                     for t in r["top_feature_pairs"][:5]))


def trace_qk(model, tc, graph, pruned, graph_path, n_edges: int) -> dict:
    """`cltrace trace --qk N`: explain the N most influential cross-position edges among those pruning keeps and
    merge them into GRAPH.qk.json -> {"file", "edges", "seconds"}."""
    import time

    from cltrace.attribution.heads import cross_position_edges, explain_edges, save_qk
    from cltrace.replacement import build_replacement

    t0 = time.perf_counter()
    edges = cross_position_edges(graph, n_edges, mask=pruned.edge_mask)
    rep = build_replacement(model, tc, graph.input_ids.to(model.device))
    path = save_qk(graph_path, explain_edges(rep, graph, edges))
    return {"file": str(path), "edges": len(edges), "seconds": time.perf_counter() - t0}
