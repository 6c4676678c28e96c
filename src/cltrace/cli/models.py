"""`cltrace models`: list the built-in offline models, whether each is ready, and where it is cached."""

from __future__ import annotations

import json


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="list built-in models (and prepare them)",
                       description="List the built-in offline models, whether each is ready, and its cache folder.")
    p.add_argument("--prepare", nargs="*", metavar="NAME",
                   help="convert these built-in models into the cache (all when no name is given)")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.models.registry import BUILTIN, list_models, prepare

    if args.prepare is not None:
        for name in args.prepare or list(BUILTIN):
            prepare(name, log=ctx.log)
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "ready" if r["ready"] else ("not prepared" if r["installed"] else "package missing")
        star = "*" if r["default"] else " "
        print(f"{star} {r['name']:<14} {state:<16} {r['path']}")
        print(f"    {r['description']}")
    return 0
