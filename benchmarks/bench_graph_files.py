"""Graph file sizes and speeds per format, against circuit-tracer's graph file for the same graph.

    flock /tmp/cltrace-measure.lock nice -n -19 .venv/bin/python benchmarks/bench_graph_files.py \
        --transcoders runs/demo/clt --cache /tmp/gf

Traces two prompts on the default model (7 tokens with every feature; 50 tokens with the 4,000 most influential)
unless --cache already holds them, then writes each graph in every format and reads it back.

circuit-tracer's file is `Graph.to_pt`: torch.save of a dict with the dense [N, N] float32 adjacency matrix and a
few small tensors. circuit-tracer is not installed here, so its file is *computed*: the same dict (its keys, the
same node count and tensors, the adjacency from our row block), written by torch.save in this process, with its
config and logit targets as plain Python objects instead of circuit-tracer's classes (a few hundred bytes).

Columns: bytes; ratio to circuit-tracer's file; bytes per node; bytes per nonzero edge the file holds (the full
graph's, or the pruned one's); save and load seconds (best of --repeat); max error as a fraction of the stated bound
(≤ 1 means within it; 0 = exact).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

import cltrace
from cltrace.attribution import Graph, keep_pruned, prune

PROMPTS = {  # name: (prompt, max_feature_nodes)
    "short": ("Michael Jordan plays the sport of", None),  # 7 tokens with BOS
    "long": ("The Eiffel Tower, completed in 1889 for the World's Fair, stands on the Champ de Mars in Paris. It was "
             "designed by the engineering company of Gustave Eiffel, and it is the most visited monument in the city "
             "of", 4000),  # 50 tokens
}


def ct_file(g: Graph, path: Path) -> None:
    """circuit-tracer 0.5.0's Graph.to_pt for this graph (same keys, shapes and dtypes; plain objects for its
    UnifiedConfig and LogitTarget classes)."""
    n_f = g.n_features
    torch.save({"input_string": g.prompt, "adjacency_matrix": g.adjacency().float(),
                "cfg": {"n_layers": g.n_layers, "model_name": g.meta.get("model", "")},
                "active_features": g.features, "logit_targets": [(s, int(t)) for s, t in zip(g.logit_labels,
                                                                                              g.logit_tokens)],
                "logit_probabilities": g.logit_probs.float(), "vocab_size": int(g.meta.get("vocab_size", 0)),
                "input_tokens": g.input_ids, "selected_features": torch.arange(n_f),
                "activation_values": g.activations.float(), "scan": None}, path)


def bound_fraction(got: Tensor, ref: Tensor, edge_dtype: str) -> float:
    """max over edges of |ê − e| / the stated bound (graph_codec)."""
    e, d = ref.double(), (got.double() - ref.double()).abs()
    if edge_dtype == "float32":
        return float(d.max()) if d.numel() else 0.0
    if edge_dtype == "float16":
        bound = torch.maximum(2.0 ** -11 * e.abs(), 2.0 ** -24 * e.abs().amax(1, keepdim=True))
    else:
        bound = 2.0 ** -8 * e.abs()
    nz = e != 0
    return float((d[nz] / bound[nz]).max()) if nz.any() else 0.0


def timed(repeat: int, fn, *a, **kw):
    """(fn's result, best seconds of `repeat` calls)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*a, **kw)
        best = min(best, time.perf_counter() - t)
    return out, best


def graphs(args) -> dict[str, Graph]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out, model, tc = {}, None, None
    for i, (name, (prompt, cap)) in enumerate(PROMPTS.items()):
        path = cache / f"bench-graph-{i}.safetensors"
        if not path.exists() or Graph.load(path).prompt != prompt:
            if model is None:
                model = cltrace.load_model(args.model)
                tc = cltrace.load_transcoder(args.transcoders)
            t = time.perf_counter()
            g = cltrace.attribute(model, tc, prompt, max_feature_nodes=cap)
            g.meta.update(vocab_size=model.vocab_size)
            g.save(path)
            print(f"traced {name}: {time.perf_counter() - t:.1f} s", flush=True)
        out[name] = Graph.load(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transcoders", default="runs/demo/clt")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--cache", default="/tmp/gf", help="folder for the traced graphs and the files written")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.cache)
    print("| graph | format | bytes | / circuit-tracer | bytes/node | bytes/edge | save s | load s | max err / bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, g in graphs(args).items():
        nnz = int((g.edges != 0).sum())
        pr = prune(g, 0.8, 0.98)
        kept = keep_pruned(g, 0.8, 0.98, pr)
        label = (f"{name} ({g.n_pos} tok, {g.n_nodes} nodes, {g.n_features} of {g.meta['n_active_features']} "
                 f"features, {nnz:,} edges, {int(pr.edge_mask.sum()):,} kept by pruning)")
        ct_path = work / "ct.pt"
        _, ct_save = timed(args.repeat, ct_file, g, ct_path)
        _, ct_load = timed(args.repeat, torch.load, ct_path, weights_only=False)
        ct_bytes = ct_path.stat().st_size
        rows = [("circuit-tracer .pt (computed)", ct_bytes, nnz, ct_save, ct_load, "")]
        variants = [("float32 bz2 (default, exact)", g, "float32", "bz2"), ("float32 zlib", g, "float32", "zlib"),
                    ("float32 lzma", g, "float32", "lzma"), ("float32 none", g, "float32", "none"),
                    ("float16 bz2", g, "float16", "bz2"), ("bfloat16 bz2", g, "bfloat16", "bz2"),
                    ("pruned 0.8/0.98, float32 bz2", kept, "float32", "bz2"),
                    ("pruned 0.8/0.98, float16 bz2", kept, "float16", "bz2")]
        for vname, graph, dt, how in variants:
            path = work / "variant.safetensors"
            _, save_s = timed(args.repeat, graph.save, path, edge_dtype=dt, compress=how)
            h, load_s = timed(args.repeat, Graph.load, path)
            err = bound_fraction(h.edges, graph.edges, dt)
            n_held = int((graph.edges != 0).sum())
            rows.append((vname, path.stat().st_size, n_held, save_s, load_s, f"{err:.3g}"))
        for vname, size, n_held, save_s, load_s, err in rows:
            print(f"| {label} | {vname} | {size:,} | {size / ct_bytes:.3f} | {size / g.n_nodes:.0f} | "
                  f"{size / n_held:.2f} | {save_s:.2f} | {load_s:.2f} | {err} |", flush=True)
            label = ""
        ct_path.unlink()


if __name__ == "__main__":
    main()
