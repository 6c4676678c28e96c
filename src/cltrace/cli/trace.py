"""`cltrace trace "PROMPT"`: build, prune, save and summarize an attribution graph."""

from __future__ import annotations

import json
import time


def add_parser(sub, name: str) -> None:
    from cltrace.models.registry import DEFAULT_MODEL

    p = sub.add_parser(name, help="build an attribution graph for a prompt",
                       description="Build the attribution graph of a prompt, prune it, save it and print a summary. "
                                   "With --prompts FILE: one graph per prompt into --out-dir, with index.json; "
                                   "under torchrun the prompts are split over the processes.")
    p.add_argument("prompt", nargs="?", help="the prompt (or --prompts FILE)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt a line (\\n for a line break), or .jsonl/.json: "
                                                     "trace each into --out-dir (batch mode)")
    p.add_argument("--out-dir", metavar="DIR", help="with --prompts: where the graphs and index.json go")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--transcoders", "-t", help="folder written by `cltrace train`, or a circuit-tracer folder")
    src.add_argument("--random-transcoders", type=int, metavar="F",
                     help="no trained transcoders yet: random CLT with F features/layer, thresholds calibrated "
                          "on the prompt (for trying the pipeline)")
    p.add_argument("--random-kind", default="clt", choices=["clt", "plt"])
    p.add_argument("--random-active", type=int, default=40, help="active features per layer (random transcoders)")
    p.add_argument("--out", "-o", help="graph file to write (.safetensors; one prompt)")
    p.add_argument("--max-features", type=int, default=None, help="keep at most N features, the most influential")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--batch-size", type=int, default=64, help="rows per backward pass (default 64)")
    p.add_argument("--target", action="append", default=None, metavar="TOKEN",
                   help="explain this token's logit (repeatable); 'A-B' style contrasts: --contrast A B")
    p.add_argument("--contrast", nargs=2, action="append", default=None, metavar=("A", "B"),
                   help="explain the logit difference A − B (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--export-json", metavar="DIR", help="also write the viewer JSON (circuit-tracer / Neuronpedia)")
    p.add_argument("--slug", help="graph name in the viewer (with --export-json)")
    p.add_argument("--scan", help="the viewer's name of the transcoder set (with --export-json; default: the model). "
                                  "circuit-tracer's local server reads feature files from its features_dir for a "
                                  "scan that starts with '/'; see `cltrace features export`")
    p.add_argument("--features", metavar="DB", help="feature database (`cltrace features build`) of these "
                                                    "transcoders: label the graph's features (saved in the graph's "
                                                    "meta and as the viewer JSON's clerp)")
    p.add_argument("--edge-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="edge values in the file: float32 exact (default); float16 within max(2^-11 |e|, "
                        "2^-24 row max), bfloat16 within 2^-8 |e| (docs/attribution.md, Graph files)")
    p.add_argument("--compress", default="bz2", choices=["bz2", "zlib", "lzma", "none"],
                   help="graph file compressor (default bz2; zlib is faster and ~1%% larger)")
    p.add_argument("--keep-pruned", action="store_true",
                   help="save only the edges the pruning at --node-threshold/--edge-threshold keeps (and that pruning)")
    p.add_argument("--png", metavar="FILE", help="also draw the pruned graph into this PNG")
    p.add_argument("--qk", type=int, default=0, metavar="N", help="also explain the N most influential cross-position "
                   "edges by attention head and QK terms, into GRAPH.qk.json (docs/attention.md)")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.errors import CltraceError

    if (args.prompt is None) == (args.prompts is None):
        raise CltraceError("give one PROMPT, or --prompts FILE with --out-dir DIR")
    if args.prompts is None and not args.out:
        raise CltraceError("--out FILE is needed: the graph file to write")
    if args.export_json and not args.slug:
        raise CltraceError("--export-json needs --slug NAME (the graph's name in the viewer)")
    if args.features and not args.transcoders:
        raise CltraceError("--features needs the transcoders the database was built for (-t DIR), not random ones")
    for name in ("node_threshold", "edge_threshold"):
        if not 0 < getattr(args, name) <= 1:
            raise CltraceError(f"--{name.replace('_', '-')} must be in (0, 1]")
    if args.prompts is not None:
        return run_batch(args, ctx)
    t0 = time.perf_counter()
    model, tc, db = load_inputs(args, ctx, args.prompt)
    try:
        summary, graph, pr = trace_prompt(args, ctx, model, tc, db, args.prompt, args.out, time.perf_counter() - t0)
    finally:
        if db is not None:
            db.close()
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    path, seconds, n_edges = summary["out"], summary["seconds"], summary["n_edges"]
    (rep_u, rep_p), (comp_u, comp_p) = summary["replacement_score"].values(), summary["completeness_score"].values()
    print(f"prompt: {args.prompt!r} ({len(graph.tokens)} tokens)")
    print(f"nodes: {graph.n_nodes} ({graph.n_features} features of {graph.meta['n_active_features']} active), "
          f"edges: {n_edges}")
    print(f"pruned: {summary['n_nodes_pruned']} nodes, {summary['n_edges_pruned']} edges")
    print(f"replacement score: {rep_u:.3f} unpruned, {rep_p:.3f} pruned")
    print(f"completeness score: {comp_u:.3f} unpruned, {comp_p:.3f} pruned")
    print(f"max |logit error| of the replacement model: {graph.meta['max_logit_error']:.2e}")
    if db is not None:
        print(f"labels: {summary['n_labelled_features']} features labelled from {args.features}")
    print("top logits:")
    for row in summary["logits"]:
        print(f"  {row['prob']:.4f}  {row['token']!r}")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    print(f"saved {path} ({summary['file_bytes'] / 1e6:.2f} MB)" + (f" and {args.png}" if args.png else ""))
    return 0


def load_inputs(args, ctx, prompt: str):
    """(model, transcoders, feature database or None) as the options say; random transcoders are calibrated
    on `prompt`."""
    from cltrace.models.registry import load_model

    model = load_model(args.model, device=ctx.device, dtype=ctx.dtype)
    ids = model.tokenize(prompt)
    if args.transcoders:
        from cltrace.transcoders.io import check_fits, load_transcoder

        tc = load_transcoder(args.transcoders, device=ctx.device, dtype=ctx.dtype)
        check_fits(tc, model)
    else:
        from cltrace.replacement import random_transcoder

        tc = random_transcoder(model, args.random_kind, args.random_transcoders, args.random_active, ids=ids)
        tc = tc.to(dtype=ctx.dtype)
    db = None
    if args.features:
        from cltrace.features import FeatureDB

        db = FeatureDB.open(args.features)
        try:
            db.check_fits(tc, model)
        except BaseException:
            db.close()
            raise
    return model, tc, db


def trace_prompt(args, ctx, model, tc, db, prompt: str, out, load_s: float):
    """Attribute, prune, score and save one prompt's graph at `out` (and the viewer JSON, PNG if asked):
    (summary dict, graph, pruning)."""
    from cltrace.attribution import attribute
    from cltrace.attribution.prune import prune, scores

    ids = model.tokenize(prompt)
    targets = (args.target or []) + [tuple(c) for c in (args.contrast or [])]
    graph = attribute(model, tc, ids, targets=targets or None, max_feature_nodes=args.max_features,
                      batch_size=args.batch_size, log=None if args.json else ctx.log)
    t1 = time.perf_counter()
    pr = prune(graph, args.node_threshold, args.edge_threshold)
    if db is not None:
        from cltrace.features.export import feature_labels

        graph.meta["feature_labels"] = feature_labels(db, graph.features[:, [0, 2]].tolist())
        graph.meta["features_db"] = {"path": str(args.features), "transcoder_sha256": db.meta["transcoder_sha256"]}
    rep_u, comp_u = scores(graph)
    rep_p, comp_p = scores(graph, pr)
    prune_s = time.perf_counter() - t1
    graph.meta.update(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                      vocab_size=model.vocab_size,
                      scores={"replacement": rep_u, "completeness": comp_u, "replacement_pruned": rep_p,
                              "completeness_pruned": comp_p})
    if args.qk:  # on the full graph: pr's masks index its edges
        from cltrace.cli.qk import trace_qk

        qk = trace_qk(model, tc, graph, pr, out, args.qk)
    t2 = time.perf_counter()
    if args.keep_pruned:
        from cltrace.attribution.prune import keep_pruned

        graph = keep_pruned(graph, args.node_threshold, args.edge_threshold, pr)
    path = graph.save(out, edge_dtype=args.edge_dtype, compress=args.compress)
    if args.export_json:
        from cltrace.attribution.export import export_graph_files

        export_graph_files(graph, args.export_json, args.slug, pruned=pr, node_threshold=args.node_threshold,
                           edge_threshold=args.edge_threshold, scan=args.scan)
    if args.png:
        from cltrace.viewer.plot import plot_graph

        plot_graph(graph, pr, args.png)
    save_s = time.perf_counter() - t2
    seconds = {"load": load_s, **graph.meta["seconds"], "prune_and_scores": prune_s, "save": save_s}
    n_edges = graph.kept_pruning.n_edges_full if graph.kept_pruning else int((graph.edges != 0).sum())
    summary = {
        "prompt": prompt, "tokens": graph.tokens, "out": str(path),
        "n_nodes": graph.n_nodes, "n_edges": n_edges, "n_active_features": graph.meta["n_active_features"],
        "n_features": graph.n_features, "n_nodes_pruned": int(pr.node_mask.sum()),
        "n_edges_pruned": int(pr.edge_mask.sum()),
        "replacement_score": {"unpruned": rep_u, "pruned": rep_p},
        "completeness_score": {"unpruned": comp_u, "pruned": comp_p},
        "logits": [{"token": lab, "prob": float(p)} for lab, p in zip(graph.logit_labels, graph.logit_probs)],
        "max_logit_error": graph.meta["max_logit_error"],
        "n_labelled_features": len(graph.meta.get("feature_labels", {})),
        "file_bytes": path.stat().st_size,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }
    if args.qk:
        summary["qk"] = qk
    return summary, graph, pr


def run_batch(args, ctx) -> int:
    """--prompts FILE: prompt i's graph into --out-dir/NNNNN.safetensors, and index.json (the summaries, in
    prompt order). Under torchrun prompt i goes to rank i mod W and rank 0 writes the index; each graph is
    the one a single process writes."""
    from pathlib import Path

    from cltrace.errors import CltraceError
    from cltrace.features.distributed import owns
    from cltrace.training.distributed import FailureGuard, init_distributed, shutdown
    from cltrace.validation.prompts import read_prompt_file

    if not args.out_dir or args.out or args.export_json or args.png:
        raise CltraceError("--prompts writes one graph per prompt into --out-dir DIR (--out, --export-json and "
                           "--png are for one PROMPT)")
    prompts = read_prompt_file(args.prompts)
    if not prompts:
        raise CltraceError(f"{args.prompts} holds no prompt: write one prompt a line")
    out_dir = Path(args.out_dir)
    d = init_distributed(device=ctx.device)  # one process without torchrun
    ctx.device = d.device
    try:
        with FailureGuard(d):  # a rank that fails stops the others with its message
            t0 = time.perf_counter()
            model, tc, db = load_inputs(args, ctx, prompts[0])
            load_s = time.perf_counter() - t0
            out_dir.mkdir(parents=True, exist_ok=True)
            mine = []
            try:
                for i, prompt in enumerate(prompts):
                    if owns(d, i):
                        name = f"{i:05d}.safetensors"
                        summary, _, _ = trace_prompt(args, ctx, model, tc, db, prompt, out_dir / name, load_s)
                        del summary["out"]
                        mine.append({"index": i, "file": name, **summary})
                        ctx.log(f"[{i + 1}/{len(prompts)}] {name}: {summary['n_nodes']} nodes, {prompt!r}")
            finally:
                if db is not None:
                    db.close()
            graphs = sorted((e for part in d.gather_objects_over_data(mine) for e in part), key=lambda e: e["index"])
    finally:
        shutdown(d)
    if d.is_main:
        index = {"prompts": str(args.prompts), "model": args.model, "graphs": graphs}
        (out_dir / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1))
        if args.json:
            print(json.dumps(index, ensure_ascii=False))
        else:
            print(f"saved {len(graphs)} graphs and index.json in {out_dir}")
    return 0
