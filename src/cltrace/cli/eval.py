"""`cltrace eval DIR`: reconstruction and replacement-model metrics of a trained transcoder."""

from __future__ import annotations

import json


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="evaluate a transcoder: NMSE, L0, dead features, and the spliced-in model's CE/KL/top-1",
        description="Evaluate a transcoder folder on held-out text: per-layer NMSE, explained variance, L0, "
        "dead fraction; and the model with every MLP replaced by the transcoder against the original "
        "(next-token cross-entropy increase, KL divergence, top-1 agreement).",
    )
    p.add_argument("folder", help="transcoder folder (written by `cltrace train`)")
    p.add_argument("--model", "-m", help="the model it was trained on (default: the name saved with it)")
    p.add_argument("--tokens", type=float, default=8192, help="held-out tokens to evaluate on (default 8192)")
    p.add_argument("--contexts", type=int,
                   help="evaluate exactly this many contexts instead of --tokens (an error if the split holds "
                        "fewer): e.g. --contexts 200 --context-len 64 for the paper's per-prompt statistic over "
                        "200 held-out prompts")
    p.add_argument("--corpus", help="corpus spec to evaluate on (default: the small built-in one)")
    p.add_argument("--split", choices=["eval", "train", "all"],
                   help="which documents of the corpus: eval (the 2%% hash-held-out split), train, or all "
                        "(default: eval for the built-in corpora and hub datasets, all for a local file or folder)")
    p.add_argument("--context-len", type=int, default=128, help="tokens per context (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.errors import CltraceError
    from cltrace.models.registry import load_model
    from cltrace.training import evaluate
    from cltrace.transcoders.io import load_transcoder

    bad_contexts = args.contexts is not None and args.contexts < 1
    if args.tokens < 1 or args.context_len < 2 or args.batch_size < 1 or bad_contexts:
        raise CltraceError("--tokens, --contexts and --batch-size must be positive and --context-len at least 2")
    tc = load_transcoder(args.folder, device=ctx.device)
    name = args.model or tc.cfg.model_name
    if not name:
        raise CltraceError(f"{args.folder} does not say which model it was trained on: pass --model")
    model = load_model(name, device=ctx.device, dtype=ctx.dtype)
    res = evaluate(model, tc, args.corpus, int(args.tokens), context_len=args.context_len,
                   batch_size=args.batch_size, split=args.split, n_contexts=args.contexts,
                   log=ctx.log if ctx.verbose else None)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['kind']} {res['activation']} F={res['n_features']} on {res['model']}, {res['n_tokens']} tokens "
          f"({res['split']} split)")
    print(f"{'layer':>5} {'NMSE':>8} {'EV':>8} {'L0':>8} {'dead':>6}")
    for i, (n, e, l0, d) in enumerate(zip(res["nmse_layers"], res["explained_variance_layers"], res["l0_layers"],
                                         res["dead_fraction_layers"])):
        print(f"{i:>5} {n:8.4f} {e:8.4f} {l0:8.1f} {d:6.3f}")
    print(f"{'mean':>5} {res['nmse']:8.4f} {res['explained_variance']:8.4f} {res['l0']:8.1f} "
          f"{res['dead_fraction']:6.3f}")
    print(f"replacement model: CE {res['ce_original']:.4f} -> {res['ce_spliced']:.4f} "
          f"(+{res['ce_increase']:.4f}), KL {res['kl']:.4f}, top-1 agreement {res['top1_agreement']:.3f} "
          f"(at the last position of each of {res['n_contexts']} contexts: {res['last_top1_agreement']:.3f})")
    return 0
