"""`cltrace features build|show`: the feature database (cltrace.features)."""

from __future__ import annotations

import json
import re
import sys

_REF = re.compile(r"^(\d+):(\d+)$")


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="the feature database: build it over a corpus, show a feature",
                       description="Per-feature statistics over a corpus (frequency, histogram, top and quantile "
                                   "examples, promoted / suppressed / input tokens, labels) in one SQLite file.")
    fsub = p.add_subparsers(dest="features_command", metavar="ACTION", required=True)

    b = fsub.add_parser("build", help="one pass over a corpus -> FEATURES.db (resumable; labels are kept)",
                        description="Run the model and the transcoders over a corpus once and write the feature "
                                    "database. Ctrl-C saves the pass so far in OUT.partial/; --resume continues it.")
    b.add_argument("--transcoders", "-t", required=True, help="transcoder folder (written by `cltrace train`, or a "
                                                              "circuit-tracer folder)")
    b.add_argument("--model", "-m", help="the model (default: the name saved with the transcoders)")
    b.add_argument("--corpus", help="corpus spec (default: the small built-in one; see `cltrace corpus`)")
    b.add_argument("--split", default="all", choices=["all", "train", "eval"], help="corpus split (default all)")
    b.add_argument("--tokens", type=float, default=1_000_000, help="tokens to read (default 1e6)")
    b.add_argument("--context-len", type=int, default=128, help="tokens per context (default 128)")
    b.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass (default 16)")
    b.add_argument("--top-k", type=int, default=20, help="top examples per feature (default 20)")
    b.add_argument("--window", type=int, nargs=2, default=(16, 8), metavar=("BEFORE", "AFTER"),
                   help="tokens shown before and after an example's token (default 16 8)")
    b.add_argument("--ranges", type=int, default=8, help="activation ranges for quantile examples (default 8)")
    b.add_argument("--per-range", type=int, default=4, help="examples per range (default 4)")
    b.add_argument("--checkpoint-every", type=int, default=200, help="save the pass every N batches (default 200)")
    b.add_argument("--out", "-o", required=True, help="the database to write (e.g. FEATURES.db)")
    b.add_argument("--resume", action="store_true", help="continue the interrupted build of --out")
    b.set_defaults(run=run_build)

    s = fsub.add_parser("show", help="one feature's card: label, frequency, histogram, examples, effects",
                        description="Print a feature's card from the database (LAYER:FEATURE, e.g. 12:345).")
    s.add_argument("feature", help="LAYER:FEATURE, e.g. 12:345")
    s.add_argument("--db", required=True, help="the feature database (from `cltrace features build`)")
    s.add_argument("--json", action="store_true", help="print the card as one JSON object")
    s.add_argument("--png", metavar="FILE", help="also draw the card into this PNG")
    s.set_defaults(run=run_show)


def run_build(args, ctx) -> int:
    from cltrace.errors import CltraceError
    from cltrace.features import build_features
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder

    tc = load_transcoder(args.transcoders, device=ctx.device, dtype=ctx.dtype)
    name = args.model or tc.cfg.model_name
    if not name:
        raise CltraceError(f"{args.transcoders} does not say which model it was trained on: pass --model")
    model = load_model(name, device=ctx.device, dtype=ctx.dtype)
    out = build_features(
        model, tc, corpus=args.corpus, n_tokens=int(args.tokens), context_len=args.context_len,
        batch_size=args.batch_size, out=args.out, resume=args.resume, top_k=args.top_k, window=tuple(args.window),
        n_ranges=args.ranges, per_range=args.per_range, checkpoint_every=args.checkpoint_every,
        progress=not ctx.quiet, split=args.split,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),  # even with -q: how to resume after Ctrl-C
    )
    ctx.log(f"wrote {out}")
    return 0


def run_show(args, ctx) -> int:
    from cltrace.errors import CltraceError
    from cltrace.features import FeatureDB
    from cltrace.features.show import card_text, save_card_png

    m = _REF.match(args.feature.strip())
    if not m:
        raise CltraceError(f"cannot read feature {args.feature!r}: write LAYER:FEATURE, e.g. 12:345")
    with FeatureDB.open(args.db) as db:
        card = db.feature(int(m.group(1)), int(m.group(2)))
    if args.png:
        save_card_png(card, args.png)
        ctx.log(f"wrote {args.png}")
    if args.json:
        print(json.dumps(card.to_dict(), ensure_ascii=False))
    else:
        print(card_text(card, color=sys.stdout.isatty()))
    return 0
