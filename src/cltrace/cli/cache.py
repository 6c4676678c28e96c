"""`cltrace cache`: run the model once over a corpus and store its MLP activations for `train --cache`."""

from __future__ import annotations


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="write an activation cache (run the model once; several transcoders then train from disk)",
        description="Run the model over a corpus and write every layer's MLP inputs and outputs (16-bit, sharded, "
        "checksummed .npy files + manifest.json) into a folder; `cltrace train --cache DIR` then trains without "
        "running the model. Gemma-3-270M takes 46 KB a token (18 layers x 640 x 2 x 2 bytes).",
    )
    p.add_argument("--model", "-m", default="gemma-3-270m", help="built-in name, model folder, .gguf file or hub id")
    p.add_argument("--tokens", type=float, required=True, help="rows (tokens) to store, e.g. 2e5")
    p.add_argument("--out", "-o", required=True, help="cache folder to create")
    p.add_argument("--corpus", help="corpus spec: a file, 'large', or a hub dataset (default: the small built-in one)")
    p.add_argument("--context-len", type=int, default=128, help="tokens per context (default 128)")
    p.add_argument("--storage", choices=("bfloat16", "float16"), default="bfloat16",
                   help="16-bit type the rows are stored in (the global --dtype is the model's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the model's matmuls: fp32, or bf16 autocast (3x faster where bf16 is native: AVX512-BF16 "
                        "or AMX CPUs, GPUs; rows within 2.5%% of fp32's); auto (default): bf16 where native")
    p.add_argument("--keep-special", action="store_true", help="keep BOS and other special-token positions")
    p.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.data import write_activation_cache
    from cltrace.errors import CltraceError
    from cltrace.models.registry import load_model
    from cltrace.runtime import native_precision

    if args.tokens < 1 or args.context_len < 2:
        raise CltraceError("--tokens must be positive and --context-len at least 2")
    model = load_model(args.model, device=ctx.device, dtype=ctx.dtype)
    precision = native_precision(model.device) if args.precision == "auto" else args.precision
    m = write_activation_cache(model, args.corpus, args.out, int(args.tokens), context_len=args.context_len,
                               dtype=args.storage, keep_special=args.keep_special, overwrite=args.overwrite,
                               progress=not ctx.quiet, precision=precision)
    print(f"wrote {m['n_tokens']:,} rows of {m['model']} ({len(m['shards'])} shard(s), {m['seconds']} s) to "
          f"{args.out}; train from it with: cltrace train --cache {args.out} ...")
    return 0
