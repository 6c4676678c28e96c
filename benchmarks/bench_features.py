"""Feature-database build: throughput against the model's bare forward, peak memory, database size (issue 13).

    .venv/bin/python benchmarks/bench_features.py --part throughput --tokens 100000 [--transcoders DIR] [--threads 1]
        [--precision bfloat16]
    .venv/bin/python benchmarks/bench_features.py --part memory --tokens 100000 1000000 [--threads 1]

Targets: build throughput >= 0.8x the bare forward's tokens/s on the default model (Gemma-3-270M) with a
2,048-features-per-layer CLT; peak memory flat in the number of tokens.

--part throughput, in one process:
  * the bare forward: `model.forward(ids, compute_logits=False)` under no_grad (what `FeatureStats.add_batch`
    runs), on batches of the same contexts (context_len 128, the build's batch size): one after every
    --fwd-every batches of the build, interleaved with it (the build's `on_batch`), so that both see the same
    machine; their tokens/s is the reference of every ratio. (Also --fwd-batches before the build, for reference.)
  * `build_features(...)` over --tokens tokens with the same batch size and `progress=False`: tokens/s end to
    end (pass + output/input effects + database write) and of the pass alone (forward + statistics, including
    the periodic checkpoints the build writes), each as a ratio to the bare forward; the seconds of writing the
    database, of the effects and of the checkpoints; peak RSS during the build (a thread samples it every 20 ms)
    and RSS before it; the database's size and bytes per feature; the L0 the pass measured.
  Prints a markdown table and, last, a one-line JSON summary.
--part memory: the throughput part for each --tokens value, each in a fresh subprocess (so peaks do not mix).

The transcoder: --transcoders DIR (any `cltrace.load_transcoder` path) or, by default, a random CLT with
--features per layer whose JumpReLU thresholds are calibrated (`random_transcoder`) on the first context so that
about --active features per layer fire per token: what a trained BatchTopK CLT does at inference (a per-feature
threshold), with a realistic L0. Tokens count every position of a context (BOS included), for the forward and
the build alike. Databases go to --work (default: a temporary folder) and are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peak import Peak  # benchmarks/peak.py (the script's folder is on sys.path)

from cltrace.runtime import tune_cpu_memory

tune_cpu_memory()  # the CLI's CPU memory settings, before the first tensor is allocated

CONTEXT_LEN = 128


class Timed:
    """Wrap module attribute `mod.name` so that its calls add their wall time to `seconds` (and count them)."""

    def __init__(self, mod, name: str):
        self.mod, self.name, self.orig, self.seconds, self.calls = mod, name, getattr(mod, name), 0.0, 0

    def __enter__(self):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return self.orig(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1

        setattr(self.mod, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.mod, self.name, self.orig)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def contexts(model, corpus, n: int) -> torch.Tensor:
    """The first n contexts of the corpus, as the build reads them (split "all", no looping)."""
    from cltrace.data import ContextStream

    ctxs = ContextStream(corpus, model.tokenizer, CONTEXT_LEN, split="all", loop=False).take(n)
    if not ctxs:
        sys.exit(f"the corpus has no context of {CONTEXT_LEN} tokens")
    return torch.tensor(ctxs, dtype=torch.long)


def bare_forward(model, ids: torch.Tensor, batch: int, reps: int) -> float:
    """tokens/s of `model.forward(ids, compute_logits=False)` on batches of `batch` contexts (after a warm-up)."""
    batches = list(ids.split(batch))
    timed = (batches[1:] or batches)[:reps]  # the first batch warms up (a short corpus: it is timed too)
    with torch.no_grad():
        model.forward(batches[0].to(model.device), compute_logits=False)
        t = time.perf_counter()
        for b in timed:
            model.forward(b.to(model.device), compute_logits=False)
        sec = time.perf_counter() - t
    return sum(b.numel() for b in timed) / sec


class Interleaved:
    """`on_batch` for the build: times its batches and, after every `every`-th, one bare forward of a batch of the
    same shape. Both then run on the same machine state (other processes, clock, memory), so their ratio holds on
    a busy machine too. The interleaved forwards are not counted in the pass's time."""

    def __init__(self, model, ids: torch.Tensor, batch: int, every: int):
        self.model, self.batches, self.every = model, list(ids.split(batch)), every
        self.pass_s = self.fwd_s = 0.0
        self.fwd_tokens = self.fwd_n = 0
        self.t = time.perf_counter()

    def start(self) -> None:
        self.t = time.perf_counter()

    def __call__(self, done: int) -> None:
        self.pass_s += time.perf_counter() - self.t
        if done % self.every == 0:
            b = self.batches[self.fwd_n % len(self.batches)].to(self.model.device)
            t = time.perf_counter()
            with torch.no_grad():
                self.model.forward(b, compute_logits=False)
            self.fwd_s += time.perf_counter() - t
            self.fwd_tokens += b.numel()
            self.fwd_n += 1
        self.t = time.perf_counter()


def make_transcoder(model, args, first: torch.Tensor):
    from cltrace.replacement import random_transcoder
    from cltrace.transcoders.io import load_transcoder

    if args.transcoders:
        tc = load_transcoder(args.transcoders, device=model.device)
        return tc, (f"{args.transcoders} ({tc.cfg.kind.upper()}, {tc.n_features} features/layer, "
                    f"{tc.cfg.activation})")
    # random_transcoder's budget is (position, feature) pairs per layer over the calibration context (BOS left out)
    tc = random_transcoder(model, "clt", args.features, args.active * (first.shape[1] - 1), ids=first)
    return tc, (f"random CLT, {args.features} features/layer, JumpReLU thresholds calibrated to about "
                f"{args.active} active features/layer/token on the corpus's first context")


@torch.no_grad()
def agreement(model, tc, ids: torch.Tensor, batch: int, precision: str) -> dict:
    """How far the `precision` encoder matmul is from float32 on the contexts `ids` (every layer, BOS left out):
    the share of float32 firings that also fire (recall), the share of its firings that float32 does not make,
    and the relative error of the activations both make (median, 99th percentile, max)."""
    from cltrace.features.stats import PRECISIONS

    both = only32 = only_p = 0
    rel = []
    for b in ids.split(batch):
        trace = model.forward(b.to(model.device), compute_logits=False)
        reads = tc.select_input(trace.resid_mid, trace.mlp_in)
        for layer in range(tc.n_layers):
            x = reads[layer][:, 1:].reshape(-1, tc.d_model).to(tc.W_enc.dtype)
            a32 = tc.activate(tc.pre_acts(x, layer), layer, training=False)
            ap = tc.activate(tc.pre_acts(x, layer, matmul_dtype=PRECISIONS[precision]), layer, training=False)
            f32, fp = a32 > 0, ap > 0
            both += int((f32 & fp).sum())
            only32 += int((f32 & ~fp).sum())
            only_p += int((fp & ~f32).sum())
            rel.append(((ap - a32).abs() / a32.abs())[f32 & fp].float())
    rel = torch.cat(rel)
    q = torch.quantile(rel[torch.randperm(rel.numel())[:1_000_000]], torch.tensor([0.5, 0.99])).tolist()
    return {"recall": both / max(1, both + only32), "extra": only_p / max(1, both + only_p),
            "rel_median": q[0], "rel_p99": q[1], "rel_max": float(rel.max())}


def measured_l0(db: Path) -> tuple[float, int]:
    """(mean over layers of the active features per counted token, contexts) read back from the database."""
    conn = sqlite3.connect(str(db))  # read-write, so that closing it removes the -wal and -shm files
    try:
        per_layer = [r[0] for r in conn.execute("SELECT SUM(frequency) FROM features GROUP BY layer")]
        n_ctx = conn.execute("SELECT COUNT(*) FROM contexts").fetchone()[0]
    finally:
        conn.close()
    return sum(per_layer) / max(1, len(per_layer)), int(n_ctx)


def remove_db(db: Path) -> None:
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        p.unlink(missing_ok=True)
    shutil.rmtree(Path(f"{db}.partial"), ignore_errors=True)


def part_throughput(args, work: Path) -> dict:
    import cltrace.features.build as fb
    from cltrace.features import build_features
    from cltrace.models.registry import load_model

    n_tokens = args.tokens[0]
    model = load_model(args.model)
    threads = torch.get_num_threads()
    fwd_ids = contexts(model, args.corpus, args.batch_size * (args.fwd_batches + 1))
    fwd = bare_forward(model, fwd_ids, args.batch_size, args.fwd_batches)
    tc, tc_desc = make_transcoder(model, args, fwd_ids[:1])
    L, F = tc.n_layers, tc.n_features
    db = work / f"features-{n_tokens}.db"
    remove_db(db)
    inter = Interleaved(model, fwd_ids[args.batch_size:] if len(fwd_ids) > args.batch_size else fwd_ids,
                        args.batch_size, args.fwd_every)
    rss_before = rss()
    with Timed(fb, "save_database") as t_db, Timed(fb, "compute_effects") as t_eff, \
            Timed(fb, "_save_checkpoint") as t_ckpt, Peak() as pk:
        t0 = time.perf_counter()
        inter.start()
        build_features(model, tc, corpus=args.corpus, n_tokens=n_tokens, context_len=CONTEXT_LEN,
                       batch_size=args.batch_size, out=db, progress=False, checkpoint_every=args.checkpoint_every,
                       precision=args.precision,
                       on_batch=inter,
                       log=lambda msg: print(f"  build: {msg}", file=sys.stderr, flush=True))
        total = time.perf_counter() - t0 - inter.fwd_s
    pass_s = inter.pass_s
    fwd_before, fwd = fwd, inter.fwd_tokens / inter.fwd_s  # the ratios use the interleaved forwards
    l0, n_ctx = measured_l0(db)
    built = n_ctx * CONTEXT_LEN
    size = db.stat().st_size
    # checkpoints: the periodic ones happen inside the pass, the last one (always written) after it
    s = {
        "part": "throughput", "model": model.name, "transcoder": tc_desc, "features": L * F, "layers": L,
        "features_per_layer": F, "tokens_asked": n_tokens, "tokens": built, "contexts": n_ctx,
        "context_len": CONTEXT_LEN, "batch_size": args.batch_size, "threads": threads, "device": str(model.device),
        "fwd_tok_s": fwd, "fwd_before_tok_s": fwd_before, "fwd_interleaved_batches": inter.fwd_n,
        "build_tok_s": built / total, "ratio": built / total / fwd,
        "pass_tok_s": built / pass_s, "pass_ratio": built / pass_s / fwd, "build_s": total, "pass_s": pass_s,
        "effects_s": t_eff.seconds, "db_write_s": t_db.seconds, "checkpoint_s": t_ckpt.seconds,
        "checkpoints": t_ckpt.calls, "peak_rss_mib": pk.peak / 2**20, "rss_before_mib": rss_before / 2**20,
        "db_bytes": size, "bytes_per_feature": size / (L * F), "l0_per_layer": l0, "precision": args.precision,
    }
    if args.precision != "float32":
        s["agreement"] = agreement(model, tc, fwd_ids, args.batch_size, args.precision)
    if not args.keep:
        remove_db(db)
    print(f"\nmodel {model.name}, {tc_desc}; {threads} thread(s), device {model.device}; contexts of {CONTEXT_LEN} "
          f"tokens, batch {args.batch_size}; measured L0 {l0:.1f} active features per layer per token; encoder "
          f"matmul in {args.precision}\n")
    print("| measurement | value | x bare forward |")
    print("|---|---|---|")
    rows = [
        (f"bare forward, compute_logits=False ({args.batch_size}x{CONTEXT_LEN}), {inter.fwd_n} batches interleaved "
         f"with the build's (one after every {args.fwd_every})", f"{fwd:,.0f} tok/s", "1.00"),
        (f"bare forward before the build ({args.fwd_batches} batches; for reference)", f"{fwd_before:,.0f} tok/s",
         f"{fwd_before / fwd:.2f}"),
        (f"build_features end to end ({built:,} tokens: pass + effects + db write)",
         f"{s['build_tok_s']:,.0f} tok/s", f"{s['ratio']:.2f}"),
        (f"build pass only (forward + statistics, {t_ckpt.calls - 1} periodic checkpoints)",
         f"{s['pass_tok_s']:,.0f} tok/s", f"{s['pass_ratio']:.2f}"),
        ("build wall time (interleaved forwards not counted)", f"{total:.1f} s", ""),
        ("  of which output/input effects", f"{t_eff.seconds:.1f} s", ""),
        ("  of which writing the database", f"{t_db.seconds:.1f} s", ""),
        (f"  of which checkpoints ({t_ckpt.calls}, the last after the pass)", f"{t_ckpt.seconds:.1f} s", ""),
        ("RSS before the build (model + transcoder loaded)", f"{s['rss_before_mib']:,.0f} MiB", ""),
        ("peak RSS during the build", f"{s['peak_rss_mib']:,.0f} MiB", ""),
        (f"database size ({L} x {F} = {L * F:,} features)", f"{size / 1e6:,.1f} MB", ""),
        ("database bytes per feature", f"{s['bytes_per_feature']:,.0f} B", ""),
    ]
    if "agreement" in s:
        g = s["agreement"]
        rows += [
            (f"{args.precision} vs float32: float32 firings it also makes", f"{g['recall']:.4%}", ""),
            (f"{args.precision} vs float32: its firings float32 does not make", f"{g['extra']:.4%}", ""),
            (f"{args.precision} vs float32: relative error of shared activations (median / p99 / max)",
             f"{g['rel_median']:.1e} / {g['rel_p99']:.1e} / {g['rel_max']:.1e}", ""),
        ]
    for name, value, ratio in rows:
        print(f"| {name} | {value} | {ratio} |")
    print(json.dumps(s), flush=True)
    return s


def part_memory(args, work: Path) -> None:
    """The throughput part for each size, each in a fresh subprocess; a table of the summaries."""
    results = []
    for n in args.tokens:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", "throughput", "--tokens", str(n),
               "--model", args.model, "--batch-size", str(args.batch_size), "--features", str(args.features),
               "--active", str(args.active), "--fwd-batches", str(args.fwd_batches), "--work", str(work),
               "--fwd-every", str(args.fwd_every),
               "--checkpoint-every", str(args.checkpoint_every), "--precision", args.precision]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--transcoders", args.transcoders] if args.transcoders else []
        cmd += ["--corpus", args.corpus] if args.corpus else []
        cmd += ["--keep"] if args.keep else []
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        last = None
        for line in proc.stdout:
            print("  " + line.rstrip(), flush=True)
            if line.startswith("{"):
                last = json.loads(line)
        if proc.wait() != 0 or last is None:
            sys.exit(f"the run with --tokens {n} failed (exit status {proc.returncode})")
        results.append(last)
    r0 = results[0]
    print(f"\nmemory: model {r0['model']}, {r0['transcoder']}; {r0['threads']} thread(s); each size in a fresh "
          "process\n")
    print("| tokens | build tok/s | x bare fwd | pass tok/s | x bare fwd | RSS before build MiB | peak RSS in build "
          "MiB | peak - before MiB | db MB | bytes/feature | db write s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tokens']:,} | {r['build_tok_s']:,.0f} | {r['ratio']:.2f} | {r['pass_tok_s']:,.0f} | "
              f"{r['pass_ratio']:.2f} | {r['rss_before_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:,.0f} | {r['db_bytes'] / 1e6:,.1f} | "
              f"{r['bytes_per_feature']:,.0f} | {r['db_write_s']:.1f} |")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"\npeak RSS at {b['tokens']:,} tokens / at {a['tokens']:,} tokens: "
              f"{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x for {b['tokens'] / a['tokens']:.0f}x the tokens")
    print(json.dumps({"part": "memory", "runs": results}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("throughput", "memory"), required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="tokens to build over (throughput: one value, default 100000; memory: default "
                         "100000 1000000)")
    ap.add_argument("--model", default="gemma-3-270m", help="any load_model spec (default gemma-3-270m)")
    ap.add_argument("--transcoders", default=None, help="a transcoder folder (default: a random calibrated CLT)")
    ap.add_argument("--features", type=int, default=2048, help="random CLT: features per layer (default 2048)")
    ap.add_argument("--active", type=int, default=64,
                    help="random CLT: active features per layer per token to calibrate to (default 64)")
    ap.add_argument("--corpus", default=None, help="corpus spec (default: the small built-in corpus)")
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per forward, as the build (default 16)")
    ap.add_argument("--fwd-batches", type=int, default=4, help="timed batches of the bare forward (default 4)")
    ap.add_argument("--fwd-every", type=int, default=4,
                    help="one bare forward after every N build batches, the reference of the ratios (default 4)")
    ap.add_argument("--checkpoint-every", type=int, default=200, help="as the build's option (default 200)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                    help="the build's encoder matmul (default float32); bfloat16 also measures its agreement")
    ap.add_argument("--work", default=None, help="folder for the databases (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the databases")
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = [100_000] if args.part == "throughput" else [100_000, 1_000_000]
    if args.part == "throughput" and len(args.tokens) != 1:
        ap.error("--part throughput takes one --tokens value (use --part memory for several)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)
    tmp = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_features_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (part_throughput if args.part == "throughput" else part_memory)(args, work)
    finally:
        if tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
