"""`cltrace features build|show|label|search|export|explain`: the feature database (cltrace.features)."""

from __future__ import annotations

import json
import re
import sys

_REF = re.compile(r"^(\d+):(\d+)$")


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="the feature database: build, show, label, search, export, explain features",
                       description="Per-feature statistics over a corpus (frequency, histogram, top and quantile "
                                   "examples, promoted / suppressed / input tokens, labels) in one SQLite file.")
    fsub = p.add_subparsers(dest="features_command", metavar="ACTION", required=True)

    b = fsub.add_parser("build", help="one pass over a corpus -> FEATURES.db (resumable; labels are kept)",
                        description="Run the model and the transcoders over a corpus once and write the feature "
                                    "database. Ctrl-C saves the pass so far in OUT.partial/; --resume continues it. "
                                    "Under torchrun the corpus is split over the processes and rank 0 writes the "
                                    "same database one process would (docs/distributed.md).")
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
    b.add_argument("--coactivation", type=int, default=0, metavar="M",
                   help="also keep each feature's M strongest co-activation partners, same or later layer (for "
                        "global weights; default 0: off)")
    b.add_argument("--coact-tokens", type=int, default=0, metavar="N",
                   help="measure co-activation on N random tokens per batch (default 0: all)")
    b.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="the encoder's matmul: float32 (default; the activations attribution computes) or bfloat16 "
                        "(about 4x faster on CPUs with AVX512-BF16/AMX and on GPUs; ~3 significant digits)")
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

    lab = fsub.add_parser("label", help="write a person's label for a feature (an empty label removes it)",
                          description="Write a person's label for LAYER:FEATURE. It survives rebuilds of the "
                                      "database and wins over automatic and language-model labels.")
    lab.add_argument("feature", help="LAYER:FEATURE, e.g. 12:345")
    lab.add_argument("label", help='the label, e.g. "Michael Jordan" ("" removes the label)')
    lab.add_argument("--db", required=True, help="the feature database")
    lab.add_argument("--note", default="", help="a longer note kept with the label")
    lab.add_argument("--author", help="who wrote it (default: your user name)")
    lab.set_defaults(run=run_label)

    se = fsub.add_parser("search", help="features by label text, then by token",
                         description="Features whose label (a person's, a language model's, then the automatic "
                                     "one) contains TEXT, then features with TEXT as a token at a top example, "
                                     "among the promoted tokens or among the input tokens (case and surrounding "
                                     "spaces ignored).")
    se.add_argument("text")
    se.add_argument("--db", required=True, help="the feature database")
    se.add_argument("--limit", type=int, default=50, help="at most N features (default 50)")
    se.add_argument("--json", action="store_true", help="print one JSON list")
    se.set_defaults(run=run_search)

    ex = fsub.add_parser("export", help="feature files for circuit-tracer's viewer or Neuronpedia",
                         description="Write the features as circuit-tracer's feature files ({index}.json, and "
                                     "index.json.gz + layer_L.bin for its local server's features_dir) or as "
                                     "Neuronpedia dashboard batches ({layer}-{name}/batch-N.json).")
    ex.add_argument("--db", required=True, help="the feature database")
    ex.add_argument("--format", required=True, choices=["circuit-tracer", "neuronpedia"])
    ex.add_argument("--out", "-o", required=True, help="folder to write into")
    ex.add_argument("--features", help="only these: LAYER:FEATURE or LAYER:*, comma-separated (default: all)")
    ex.add_argument("--name", help="transcoder id (circuit-tracer) / sae_set (Neuronpedia) (default: KIND-SHA256[:8])")
    ex.add_argument("--model-id", help="Neuronpedia model id (default: the database's model)")
    ex.add_argument("--batch-size", type=int, default=128, help="features per Neuronpedia batch file (default 128)")
    ex.add_argument("--no-binary", action="store_true", help="circuit-tracer: only the {index}.json files")
    ex.set_defaults(run=run_export)

    xp = fsub.add_parser("explain", help="labels by a language model (OpenAI-compatible endpoint), resumable",
                         description="Ask an OpenAI-compatible chat-completions endpoint for a short label of each "
                                     "feature that fired and has no label, and store it with author llm:MODEL. A "
                                     "person's label always wins. Run it again to continue after an interruption.")
    xp.add_argument("--db", required=True, help="the feature database")
    xp.add_argument("--url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000/v1 (/chat/completions "
                                                 "is added unless the URL ends with it)")
    xp.add_argument("--model", required=True, help="model name sent to the endpoint")
    xp.add_argument("--key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the API key (default OPENAI_API_KEY; '' for none)")
    xp.add_argument("--features", help="only these: LAYER:FEATURE or LAYER:*, comma-separated (default: all)")
    xp.add_argument("--limit", type=int, help="ask about at most N features (the next ones; run again for more)")
    xp.add_argument("--batch-size", type=int, default=4, help="requests in flight at once (default 4)")
    xp.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    xp.add_argument("--retries", type=int, default=2, help="retries after HTTP 429/5xx or a network error (default 2)")
    xp.add_argument("--redo", action="store_true", help="ask again for features a language model labelled")
    xp.add_argument("--print-prompt", action="store_true",
                    help="print the prompt of the first feature to ask about and stop (contacts nothing)")
    xp.set_defaults(run=run_explain)


def run_build(args, ctx) -> int:
    from cltrace.errors import CltraceError
    from cltrace.features import build_features
    from cltrace.models.registry import load_model
    from cltrace.training.distributed import FailureGuard, init_distributed, shutdown
    from cltrace.transcoders.io import load_transcoder

    d = init_distributed(device=ctx.device)  # one process without torchrun
    try:
        tc = load_transcoder(args.transcoders, device=d.device, dtype=ctx.dtype)
        name = args.model or tc.cfg.model_name
        if not name:
            raise CltraceError(f"{args.transcoders} does not say which model it was trained on: pass --model")
        model = load_model(name, device=d.device, dtype=ctx.dtype)
        with FailureGuard(d):  # a rank that fails stops the others with its message
            out = build_features(
                model, tc, corpus=args.corpus, n_tokens=int(args.tokens), context_len=args.context_len,
                batch_size=args.batch_size, out=args.out, resume=args.resume, top_k=args.top_k,
                window=tuple(args.window), n_ranges=args.ranges, per_range=args.per_range,
                checkpoint_every=args.checkpoint_every, progress=not ctx.quiet, split=args.split,
                coactivation=args.coactivation, coact_tokens=args.coact_tokens, precision=args.precision,
                log=lambda msg: print(msg, file=sys.stderr, flush=True),  # even with -q: how to resume after Ctrl-C
                dist=d,
            )
    finally:
        shutdown(d)
    if d.is_main:
        ctx.log(f"wrote {out}" + (f" (corpus split over {d.world} processes)" if d.distributed else ""))
    return 0


def _ref(text: str) -> tuple[int, int]:
    from cltrace.errors import CltraceError

    m = _REF.match(text.strip())
    if not m:
        raise CltraceError(f"cannot read feature {text!r}: write LAYER:FEATURE, e.g. 12:345")
    return int(m.group(1)), int(m.group(2))


def run_show(args, ctx) -> int:
    from cltrace.features import FeatureDB
    from cltrace.features.show import card_text, save_card_png

    layer, f = _ref(args.feature)
    with FeatureDB.open(args.db) as db:
        card = db.feature(layer, f)
    if args.png:
        save_card_png(card, args.png)
        ctx.log(f"wrote {args.png}")
    if args.json:
        print(json.dumps(card.to_dict(), ensure_ascii=False))
    else:
        print(card_text(card, color=sys.stdout.isatty()))
    return 0


def run_label(args, ctx) -> int:
    from cltrace.features import FeatureDB

    layer, f = _ref(args.feature)
    with FeatureDB.open(args.db) as db:
        db.set_label(layer, f, args.label, note=args.note, author=args.author)
        now = db.label(layer, f)
    ctx.log(f"{layer}:{f}: {now}" if args.label.strip() else f"{layer}:{f}: label removed (now: {now})")
    return 0


def run_search(args, ctx) -> int:
    from dataclasses import asdict

    from cltrace.features import FeatureDB

    with FeatureDB.open(args.db) as db:
        hits = db.search(args.text, limit=args.limit)
    if args.json:
        print(json.dumps([{"id": f"{h.layer}:{h.feature}", **asdict(h)} for h in hits], ensure_ascii=False))
        return 0
    if not hits:
        ctx.log(f"no feature matches {args.text!r}")
    for h in hits:
        print(f"{h.layer}:{h.feature}\t{h.why}\t{h.label}")
    return 0


def run_export(args, ctx) -> int:
    from cltrace.features import FeatureDB
    from cltrace.features.export import export_circuit_tracer, export_neuronpedia

    with FeatureDB.open(args.db) as db:
        if args.format == "circuit-tracer":
            out = export_circuit_tracer(db, args.out, args.features, transcoder_id=args.name,
                                        binary=not args.no_binary, progress=not ctx.quiet)
        else:
            out = export_neuronpedia(db, args.out, args.features, model_id=args.model_id, sae_set=args.name,
                                     batch_size=args.batch_size, progress=not ctx.quiet)
    ctx.log(f"wrote {args.format} feature files into {out}")
    return 0


def run_explain(args, ctx) -> int:
    from cltrace.features import FeatureDB
    from cltrace.features.explain import SYSTEM, explain_features, feature_prompt, to_explain

    with FeatureDB.open(args.db) as db:
        if args.print_prompt:
            todo, _ = to_explain(db, args.features, redo=args.redo)
            if not todo:
                ctx.log("every feature asked for has a label (or never fired): nothing to ask")
                return 0
            card = db.feature(*todo[0])
            print(f"[system]\n{SYSTEM}\n\n[user]\n"
                  f"{feature_prompt(card, n_layers=db.n_layers, kind=db.meta['transcoder']['kind'])}")
            return 0
        report = explain_features(db, url=args.url, model=args.model, features=args.features, limit=args.limit,
                                  key_env=args.key_env, batch_size=args.batch_size, timeout=args.timeout,
                                  retries=args.retries, redo=args.redo, progress=not ctx.quiet,
                                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    ctx.log(f"{report.written} labels written ({report.asked} answers, {report.empty} empty, {report.kept_human} "
            f"kept a person's label); skipped {report.skipped_labelled} labelled and {report.skipped_dead} never "
            f"active" + (f"; {report.remaining} left for a later run" if report.remaining else ""))
    return 0
