"""`cltrace train`: train a cross-layer or per-layer transcoder (a thin wrapper over cltrace.training.train)."""

from __future__ import annotations

# flag -> TrainConfig field, for the named options (all default to None: only given flags override)
FLAGS = {
    "model": "model", "kind": "kind", "features_per_layer": "features_per_layer", "tokens": "tokens",
    "out": "out", "corpus": "corpus", "cache": "cache", "activation": "activation", "k": "k", "lr": "lr",
    "sparsity": "sparsity", "batch_size": "batch_size", "context_len": "context_len", "skip": "skip",
    "precision": "precision", "seed": "seed", "checkpoint_every": "checkpoint_every", "log_every": "log_every",
    "feature_shards": "feature_shards",
}


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="train a transcoder (CLT or PLT) on a model's MLP activations",
        description="Train a cross-layer (clt) or per-layer (plt) transcoder. Writes DIR/config.json + "
        "transcoder.safetensors (acting on raw activations), train_config.yaml, metrics.jsonl, curves.png "
        "and checkpoints/. Options override --config FILE, which overrides the defaults: the recipe of "
        "docs/training.md (training/recipe.py), or TrainConfig's own under --config.",
    )
    p.add_argument("--model", "-m", help="built-in name, model folder, .gguf file or hub id (default gemma-3-270m)")
    p.add_argument("--kind", choices=["clt", "plt"], help="cross-layer or per-layer transcoder (default clt)")
    p.add_argument("--features-per-layer", "-F", type=int, help="features per layer (default 2048)")
    p.add_argument("--tokens", type=float, help="training tokens, e.g. 2e6 (default 1e6)")
    p.add_argument("--minutes", type=float,
                   help="a time budget instead of --tokens: measure this machine, plan tokens, passes, batch and "
                        "LR schedule to finish in about this many minutes (collection and training), with the "
                        "recipe of docs/training.md as the defaults")
    p.add_argument("--passes", type=float,
                   help="with --minutes: passes over one activation sample cached in DIR/cache (default: the "
                        "recipe's; 1 streams fresh text once)")
    p.add_argument("--out", "-o", help="output folder (default runs/transcoder)")
    p.add_argument("--corpus", help="corpus spec: a file, 'large', or a hub dataset (default: the small built-in one)")
    p.add_argument("--cache", metavar="DIR", help="train from this activation cache instead of running the model")
    p.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON training config (fields of TrainConfig)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (its saved config is used)")
    p.add_argument("--activation", choices=["jumprelu", "topk", "batchtopk", "relu"],
                   help="default: the recipe's (batchtopk)")
    p.add_argument("--k", type=int,
                   help="active features per token and layer, for topk/batchtopk (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--sparsity", "--l0-coefficient", dest="sparsity", type=float,
                   help="final λ of the tanh sparsity penalty (jumprelu/relu)")
    p.add_argument("--batch-size", type=int, help="tokens per optimizer step (default: the recipe's)")
    p.add_argument("--context-len", type=int, help="tokens per context when streaming (default 128)")
    p.add_argument("--skip", action="store_true", default=None, help="add a linear skip connection")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocasts the matmuls (default fp32)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    p.add_argument("--log-every", type=int, help="steps between metric lines (default 10)")
    p.add_argument("--feature-shards", type=int,
                   help="under torchrun: split every layer's features over this many ranks (default 1: data "
                        "parallel only); see docs/distributed.md")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other TrainConfig field, e.g. --set warmup=0.1 --set decay=linear (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def build_config(args, device=None):
    """Defaults < --config FILE < the run's saved config (with --resume) < --set < named options.
    The defaults are the recipe for `device` (training/recipe.py), or TrainConfig's own under --config."""
    from pathlib import Path

    from cltrace.training.config import CONFIG_FILE, TrainConfig, parse_assignments
    from cltrace.training.recipe import recipe

    # the recipe is the defaults of every run (a --tokens or a --minutes budget); a --config file starts from
    # TrainConfig's own defaults instead, so a saved config reproduces its run
    cfg = TrainConfig.load(args.config) if args.config else TrainConfig().override(recipe(device))
    if args.resume:
        out = Path(args.out or cfg.out)
        if (out / CONFIG_FILE).exists():
            cfg = TrainConfig.load(out / CONFIG_FILE)
    cfg = cfg.override(parse_assignments(args.set))
    given = {field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag, None) is not None}
    if "tokens" in given:
        given["tokens"] = int(given["tokens"])
    if args.no_progress or args.quiet:
        given["progress"] = False
    return cfg.override(given)


def run(args, ctx) -> int:

    cfg = build_config(args, device=ctx.device)
    if cfg.device == "auto":
        cfg = cfg.override({"device": str(ctx.device)})
    cfg.validate()
    from cltrace.training.distributed import init_distributed, shutdown

    dist = init_distributed(cfg.feature_shards, cfg.device)  # under torchrun: this rank's group and GPU
    try:
        return _run(args, ctx, cfg, dist)
    finally:  # a process group left alive aborts the process at exit (gloo threads still running)
        shutdown(dist)


def _run(args, ctx, cfg, dist) -> int:
    from pathlib import Path

    from cltrace.errors import CltraceError
    from cltrace.training import train
    from cltrace.training.distributed import find_resume_checkpoint

    resuming = args.resume and find_resume_checkpoint(Path(cfg.out), dist) is not None
    budget = args.minutes is not None and not resuming  # a resumed run keeps the plan saved in its config
    if budget and (dist.distributed or args.minutes <= 0 or cfg.cache):
        raise CltraceError("--minutes plans a single-process run from the model (not under torchrun, not with "
                           "--cache) and must be positive")
    if dist.distributed:
        cfg = cfg.override({"device": str(dist.device)})  # cuda:LOCAL_RANK
        ctx.quiet = ctx.quiet or not dist.is_main  # only rank 0 speaks
    model = None
    if not cfg.cache:
        from cltrace.models.registry import DEFAULT_MODEL, load_model

        ctx.log(f"loading model {cfg.model or DEFAULT_MODEL}")
        model = load_model(cfg.model or DEFAULT_MODEL, device=dist.device, dtype=ctx.dtype)
    if budget:
        from cltrace.training.budget import run_with_budget
        from cltrace.training.recipe import PASSES

        trainer_log = ctx.log if ctx.verbose else None
        _, plan = run_with_budget(cfg, model, args.minutes, passes=args.passes or PASSES, log=ctx.log,
                                  train_fn=lambda c, **kw: train(c, dist=dist, **{**kw, "log": trainer_log}))
        ctx.log(f"planned {plan.steps} steps of {plan.batch_size} tokens ({plan.train_tokens:,} tokens)")
    else:
        ctx.log(f"training a {cfg.kind} ({cfg.activation}, {cfg.features_per_layer} features per layer) on "
                f"{cfg.tokens:,} tokens, {cfg.steps} steps of {cfg.batch_size} tokens -> {cfg.out}")
        train(cfg, model=model, resume=args.resume, log=ctx.log if ctx.verbose else None, dist=dist)
    ctx.log(f"saved the transcoder, train_config.yaml, metrics.jsonl and curves.png in {cfg.out}")
    if dist.is_main:
        print(cfg.out)
    return 0
