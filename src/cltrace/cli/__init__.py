"""The `cltrace` command: global options, then one thin subcommand per module in this package.

Each subcommand module defines `add_parser(subparsers)` (its options) and `run(args, ctx) -> int`, and
calls one Python API function. Errors a user can cause are `CltraceError`s: printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cltrace import __version__
from cltrace.errors import CltraceError, SettingError

# subcommand name -> module in cltrace.cli (imported only when listed, so `--help` stays fast)
SUBCOMMANDS = {
    "models": "models",
    "predict": "predict",
    "corpus": "corpus",
    "train": "train",
    "eval": "eval",
    "cache": "cache",
    "trace": "trace",
    "intervene": "intervene",
    "features": "features",
    "weights": "weights",
    "merge-shards": "merge_shards",
    "serve": "serve",
    "validate": "validate",
    "qk": "qk",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line that points at --help (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cltrace", description="Circuit tracing for language models.")
    p.add_argument("--version", action="version", version=f"cltrace {__version__}")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model and transcoders (default float32)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only results and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"cltrace.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"cltrace.cli.{module}":
                continue  # subcommand not built yet
            raise
        mod.add_parser(sub, name)
    return p


class Context:
    """What every subcommand gets besides its own options: device, dtype and how much to say."""

    def __init__(self, args: argparse.Namespace):
        from cltrace.runtime import resolve_device, resolve_dtype

        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype)
        self.quiet = args.quiet
        self.verbose = args.verbose

    def log(self, *msg) -> None:
        if not self.quiet:
            print(*msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from cltrace.runtime import tune_cpu_memory

    # a CLI process is one job: huge pages and malloc that keeps freed blocks (cltrace.runtime; each can be
    # turned off from the environment); set before the first tensor is allocated
    tune_cpu_memory()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        ctx = Context(args)
        return int(args.run(args, ctx) or 0)
    except SettingError as e:  # the library names settings; the command line names the flags that set them
        flags = ", ".join(f"--{s.replace('_', '-')}" for s in e.settings)
        print(f"cltrace: error: {e}" + (f" (options: {flags})" if flags else ""), file=sys.stderr)
        return 2
    except CltraceError as e:
        print(f"cltrace: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cltrace: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
