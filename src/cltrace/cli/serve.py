"""`cltrace serve [DIR]`: the interactive graph viewer on http://127.0.0.1:PORT/ (cltrace.viewer.serve)."""

from __future__ import annotations


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="open attribution graphs in the interactive local viewer",
                       description="Serve the graphs (.safetensors from `cltrace trace`) in DIR to a browser: "
                                   "explore, label, group, score, steer and export them. See docs/viewer.md.")
    p.add_argument("dir", nargs="?", default=".", help="folder of graph files (default: the current folder)")
    p.add_argument("--features", metavar="DB", help="feature database of the graphs' transcoders (dashboards, labels)")
    p.add_argument("--model", "-m", help="model to trace and steer with (with --transcoders)")
    p.add_argument("--transcoders", "-t", help="transcoders to trace and steer with (with --model)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; another address prints a warning)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.errors import CltraceError
    from cltrace.viewer import serve

    if bool(args.model) != bool(args.transcoders):
        raise CltraceError("--model and --transcoders go together (both are needed to trace and steer)")
    if not 0 <= args.port < 65536:
        raise CltraceError(f"--port {args.port} is not a port number")
    serve(args.dir, features=args.features, model=args.model, transcoders=args.transcoders,
          device=str(ctx.device), host=args.host, port=args.port, open_browser=args.open, log=print)
    return 0
