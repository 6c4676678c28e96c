"""`cltrace merge-shards DIR --out OUT`: a feature-sharded transcoder -> the single-file format."""

from __future__ import annotations


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="merge a feature-sharded transcoder into one folder",
                       description="Merge the shard-*-of-*.safetensors files that feature-sharded training "
                                   "writes (one per feature shard) into the config.json + transcoder.safetensors "
                                   "folder that `cltrace trace` and load_transcoder read.")
    p.add_argument("folder", help="folder holding shards.json, config.json and the shard files")
    p.add_argument("--out", "-o", required=True, help="folder to write the merged transcoder to")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.errors import CltraceError
    from cltrace.transcoders.io import merge_shards
    from cltrace.transcoders.sharded import is_sharded_folder

    if not is_sharded_folder(args.folder):
        raise CltraceError(f"{args.folder} holds no sharded transcoder (no shards.json): give the folder "
                           "feature-sharded training wrote its shards to")
    out = merge_shards(args.folder, args.out)
    ctx.log(f"merged {args.folder} -> {out}")
    print(out)
    return 0
