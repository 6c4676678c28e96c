"""`cltrace validate -t TRANSCODERS --out DIR`: faithfulness and completeness of graphs over many prompts."""

from __future__ import annotations

import shlex
import sys


def add_parser(sub, name: str) -> None:
    from cltrace.models.registry import DEFAULT_MODEL
    from cltrace.validation.prompt_run import Settings

    d = Settings()
    p = sub.add_parser(name, help="measure how faithful and complete attribution graphs are, over many prompts",
                       description="Trace every prompt of a set and report the paper's measures of the graphs: "
                                   "scores, pruning curves, faithfulness under perturbation, error compounding, "
                                   "next-token agreement and path length (JSON, PNG plots and a markdown report "
                                   "in --out). Resumable: a rerun computes only prompts without a result. Under "
                                   "torchrun the prompts are split over the processes; rank 0 writes the report.")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    p.add_argument("--transcoders", "-t", required=True, help="folder written by `cltrace train`, or circuit-tracer's")
    p.add_argument("--compare", metavar="TRANSCODERS", help="a second transcoder set, run on the same prompts")
    p.add_argument("--out", "-o", required=True, help="result folder (per-prompt results, validation.json, "
                                                      "report.md, plots)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="FILE", help="one prompt a line (\\n for a line break), or .jsonl/.json; "
                                                       "default: the built-in set of 60 prompts")
    src.add_argument("--corpus", nargs="?", const="small", metavar="SPEC",
                     help="use N held-out contexts of this corpus instead (default corpus: small)")
    p.add_argument("--n", type=int, help="the first N prompts (with --corpus: N contexts, default 50)")
    p.add_argument("--context-len", type=int, default=16, help="tokens per corpus context, BOS included (default 16)")
    p.add_argument("--max-features", type=int, default=d.max_features,
                   help=f"features per graph, the most influential (default {d.max_features}; 0 = all)")
    p.add_argument("--sources", type=int, default=d.sources, help=f"features inhibited per prompt ({d.sources})")
    p.add_argument("--targets", type=int, default=d.targets, help=f"features watched per source ({d.targets})")
    p.add_argument("--node-threshold", type=float, default=d.node_threshold)
    p.add_argument("--edge-threshold", type=float, default=d.edge_threshold)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per backward pass")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling of the perturbed pairs")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.models.registry import load_model
    from cltrace.training.distributed import FailureGuard, init_distributed, shutdown
    from cltrace.validation import Settings, validate

    settings = Settings(max_features=args.max_features or None, sources=args.sources, targets=args.targets,
                        node_threshold=args.node_threshold, edge_threshold=args.edge_threshold, seed=args.seed,
                        batch_size=args.batch_size)
    d = init_distributed(device=ctx.device)  # one process without torchrun
    try:
        model = load_model(args.model, device=d.device, dtype=ctx.dtype)
        with FailureGuard(d):  # a rank that fails stops the others with its message
            res = validate(model, args.transcoders, args.prompts, out=args.out, compare=args.compare, n=args.n,
                           corpus=args.corpus, context_len=args.context_len, settings=settings,
                           progress=not ctx.quiet, log=ctx.log if d.is_main else None, dist=d,
                           command="cltrace " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    finally:
        shutdown(d)
    if not d.is_main:
        return 0
    for label, s in res["summaries"].items():
        sc, f = s["scores"], s["faithfulness"]["spearman"]
        print(f"{label}: {s['n_prompts']} prompts; replacement {sc['replacement']['mean']:.3f} "
              f"({sc['replacement_pruned']['mean']:.3f} pruned), completeness {sc['completeness']['mean']:.3f} "
              f"({sc['completeness_pruned']['mean']:.3f} pruned); next token {s['next_token_agreement']:.2f}; "
              f"path length {s['path_length']['mean']:.2f}; Spearman influence vs real {f['influence']['real']:.2f}")
    print(f"report: {res['out']}/report.md")
    return 0
