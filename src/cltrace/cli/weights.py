"""`cltrace weights L:F -t TRANSCODERS [--db FEATURES.db]`: a feature's strongest global connections
(cltrace.features.weights.global_weights): virtual weights, ERA or TWERA, upstream or downstream, with labels."""

from __future__ import annotations

import json
import math

KIND_NAMES = {"virtual": "virtual weight V", "era": "ERA", "twera": "TWERA"}


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="a feature's strongest global connections (virtual weights, ERA, TWERA)",
                       description="List the features that feed LAYER:FEATURE (--upstream, the default) or that "
                                   "it feeds (--downstream) across all contexts: virtual weights through the "
                                   "residual stream, or ERA / TWERA, corrected by co-activation statistics "
                                   "from a feature database built with `cltrace features build --coactivation "
                                   "M`. Ranked by absolute value; labels from --db.")
    p.add_argument("feature", help="LAYER:FEATURE, e.g. 12:345")
    p.add_argument("--transcoders", "-t", required=True, help="transcoder folder")
    p.add_argument("--db", help="feature database (labels; co-activation statistics for era and twera)")
    p.add_argument("--top", type=int, default=20, help="connections to list (default 20)")
    p.add_argument("--kind", default="virtual", choices=["virtual", "era", "twera"],
                   help="virtual (default), era or twera (these two need --db built with --coactivation M)")
    way = p.add_mutually_exclusive_group()
    way.add_argument("--upstream", dest="direction", action="store_const", const="upstream",
                     help="the sources that feed it (default)")
    way.add_argument("--downstream", dest="direction", action="store_const", const="downstream",
                     help="the targets it feeds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run, direction="upstream")


def run(args, ctx) -> int:
    from cltrace.cli.features import _ref
    from cltrace.features.weights import global_weights
    from cltrace.transcoders.io import load_transcoder

    layer, f = _ref(args.feature)
    tc = load_transcoder(args.transcoders, device=ctx.device, dtype=ctx.dtype)
    gw = global_weights(tc, layer, f, args.db, kind=args.kind, direction=args.direction, top=args.top)
    if args.json:
        print(json.dumps(gw.to_dict(), ensure_ascii=False))
    else:
        print(table(gw))
    return 0


def table(gw) -> str:
    """The rows as aligned text: rank, feature, value, V (and E[a_i a_j], bound), label."""
    who = "sources feeding" if gw.direction == "upstream" else "targets fed by"
    head = f"{KIND_NAMES[gw.kind]}: {who} {gw.layer}:{gw.feature}" + (f"  {gw.label}" if gw.label else "")
    lines = [head]
    if gw.kind != "virtual":
        lines.append(f"co-activation over {gw.tokens:,} tokens; {gw.candidates:,} kept pairs ranked")
    lines += gw.notes
    corrected = gw.kind != "virtual"
    cols = ["#", "feature", gw.kind] + (["V", "E[ai aj]", "bound"] if corrected else []) + ["label"]
    rows = []
    for k, r in enumerate(gw.rows, 1):
        row = [str(k), r.id, f"{r.value:+.4g}"]
        if corrected:
            row += [f"{r.virtual:+.4g}", f"{r.coact:.3g}", f"{r.bound:.3g}"]
        rows.append(row + [r.label])
    if rows:
        width = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols[:-1])]
        fmt = lambda cells: "  ".join(c.rjust(w) if i != 1 else c.ljust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, width))) + "  " + cells[-1]
        lines += [fmt(cols)] + [fmt(r) for r in rows]
    rest = "inf" if math.isinf(gw.rest_bound) else f"{gw.rest_bound:.3g}"
    lines.append(f"every pair not listed: |{gw.kind}| ≤ {rest}")
    return "\n".join(lines)
