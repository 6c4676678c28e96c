"""QK attributions on the default model: their seconds against the graph's, and the share of attention scores
that transcoder features explain.

    flock /tmp/cltrace-measure.lock nice -n -19 .venv/bin/python benchmarks/bench_qk.py \\
        --transcoders runs/demo/clt --part time       # top-20 cross-position edges vs the graph, per prompt
    flock /tmp/cltrace-measure.lock nice -n -19 .venv/bin/python benchmarks/bench_qk.py \\
        --transcoders runs/demo/clt --part shares --prompts 12 --heads 6

time: for each prompt, `attribute` (the graph, all active features), then `explain_edges` of its 20 strongest
cross-position edges (head loadings + the QK attribution of each edge's top head, a fresh local replacement
model included), in the same process: the ratio is QK seconds / graph seconds.
shares: over the first N validation prompts, `--heads` (layer, head) pairs drawn at random per prompt (seed 0),
the query at the last position and two keys: the one the head attends to most, and the most attended after BOS;
the shares of Σ|term| by component kind (each term half to its query component's kind, half to its key's) and
of feature × feature terms, averaged (rel_error: the largest |Σ terms − score| / |score|).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from cltrace.attribution import attribute
from cltrace.attribution.heads import cross_position_edges, explain_edges
from cltrace.attribution.qk import HeadQuery, qk_attributions
from cltrace.models.registry import DEFAULT_MODEL, load_model
from cltrace.replacement import build_replacement
from cltrace.transcoders.io import load_transcoder
from cltrace.validation.default_prompts import PROMPTS


def part_time(model, tc, prompts: list[str], n_edges: int) -> list[dict]:
    rows = []
    for prompt in prompts:
        ids = model.tokenize(prompt)
        t0 = time.perf_counter()
        graph = attribute(model, tc, ids)
        t_graph = time.perf_counter() - t0
        edges = cross_position_edges(graph, n_edges)
        t1 = time.perf_counter()
        rep = build_replacement(model, tc, ids)
        out = explain_edges(rep, graph, edges)
        t_qk = time.perf_counter() - t1
        err = max(abs(e["direct"] + e["sum_loadings"] - e["edge"]) / max(abs(e["edge"]), 1e-9) for e in out["edges"])
        qk_err = max(abs(h["qk"]["score_terms"] - h["qk"]["score"]) / max(abs(h["qk"]["score"]), 1e-9)
                     for e in out["edges"] for h in e["heads"])
        rows.append({"prompt": prompt, "tokens": len(ids), "features": graph.n_features, "edges": len(edges),
                     "heads": len({(h["layer"], h["head"], h["key_pos"]) for e in out["edges"] for h in e["heads"]}),
                     "graph_s": t_graph, "qk_s": t_qk, "ratio": t_qk / t_graph, "max_rel_edge_err": err,
                     "max_rel_score_err": qk_err})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def part_shares(model, tc, prompts: list[str], n_heads: int) -> dict:
    """Per prompt, n_heads random (layer, head), query at the last position, two keys each: the one the head
    attends to most, and the one it attends to most after BOS (the usual attention sink)."""
    rng = random.Random(0)
    acc: dict[str, dict[str, list[float]]] = {"top key": {}, "top non-BOS key": {}}
    for prompt in prompts:
        ids = model.tokenize(prompt)
        rep = build_replacement(model, tc, ids)
        T = rep.n_pos
        pairs = sorted(rng.sample([(m, h) for m in range(model.n_layers) for h in range(model.n_heads)], n_heads))
        asks = {"top key": [], "top non-BOS key": []}
        for m, h in pairs:
            row = rep.frozen.patterns[m][0, h, T - 1]
            asks["top key"].append(HeadQuery(m, h, T - 1, int(row.argmax())))
            asks["top non-BOS key"].append(HeadQuery(m, h, T - 1, 1 + int(row[1:].argmax())))
        for group, qs in asks.items():
            for res in qk_attributions(rep, qs):
                for k, v in res.shares().items():
                    acc[group].setdefault(k, []).append(v)
                acc[group].setdefault("key_is_bos", []).append(float(res.key_pos == 0))
                err = abs(res.score_terms - res.score) / max(abs(res.score), 1e-9)
                acc[group].setdefault("rel_error", []).append(err)
        print(prompt, {g: {k: round(sum(v) / len(v), 3) for k, v in a.items()} for g, a in acc.items()}, flush=True)
    out = {}
    for g, a in acc.items():
        out[g] = {k: (max(v) if k == "rel_error" else sum(v) / len(v)) for k, v in a.items()}
        out[g]["n_scores"] = len(a["feature"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--transcoders", required=True)
    p.add_argument("--part", choices=["time", "shares"], default="time")
    p.add_argument("--prompts", type=int, default=3, help="how many validation prompts (from the first)")
    p.add_argument("--edges", type=int, default=20)
    p.add_argument("--heads", type=int, default=6, help="(layer, head) pairs per prompt (--part shares)")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.model)
    tc = load_transcoder(args.transcoders)
    prompts = list(PROMPTS[: args.prompts])
    if args.part == "time":
        rows = part_time(model, tc, prompts, args.edges)
        print("| prompt | tokens | features | edges | heads | graph s | QK s | QK / graph |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['prompt']} | {r['tokens']} | {r['features']} | {r['edges']} | {r['heads']} | "
                  f"{r['graph_s']:.1f} | {r['qk_s']:.1f} | {r['ratio']:.2f} |")
    else:
        print(json.dumps(part_shares(model, tc, prompts, args.heads)))


if __name__ == "__main__":
    main()
