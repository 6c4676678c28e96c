"""Training throughput and quality on a real model (default gemma-3-270m), printed as a table.

    .venv/bin/python benchmarks/bench_training.py [--part throughput|quality|all] [--threads 1] [--work DIR]
    .venv/bin/python benchmarks/bench_training.py --part curve --points SERIES:MINUTES:EVAL.json,... --plot PNG

Throughput (tokens/s, and as a ratio to the model's bare forward, measured in the same run on the same
batch shape: `forward(ids, stop_at_layer=L)` of 8 x 128 tokens):
  * CLT training step from an on-disk activation cache (sparse decode), and with dense decode;
  * end to end: CLT training on activations streamed from the model;
  * peak resident memory.
Quality: CLT vs PLT with the same features per layer and the same L0 (BatchTopK, k=32) on the same cached
tokens, and with twice the tokens (NMSE, L0, top-1 agreement, CE increase of the spliced-in replacement
model on held-out text).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from cltrace.runtime import tune_cpu_memory

tune_cpu_memory()  # before the first large allocation: huge pages, malloc keeps freed blocks (as the CLI)


def bare_forward(model, reps: int = 3) -> float:
    from cltrace.data import ContextStream

    ids = torch.tensor(ContextStream(None, model.tokenizer, 128).take(8))
    with torch.no_grad():
        model.forward(ids, stop_at_layer=model.n_layers)
        t = time.perf_counter()
        for _ in range(reps):
            model.forward(ids, stop_at_layer=model.n_layers)
    return reps * ids.numel() / (time.perf_counter() - t)


def train_rate(cfg, source, steps: int, model_name: str) -> float:
    """tokens/s of training steps 2..steps (the first one warms up)."""
    from cltrace.training import Trainer

    tr = Trainer(cfg, source, model_name=model_name)
    tr.initialize()
    batches = source.batches(cfg.batch_size, seed=cfg.seed)
    tr.train_step(*next(batches))
    t = time.perf_counter()
    for _ in range(steps - 1):
        tr.train_step(*next(batches))
    return (steps - 1) * cfg.batch_size / (time.perf_counter() - t)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def quality_rows(model, work: Path, tokens: int, features: int, eval_tokens: int, threads_note: str = "") -> None:
    """CLT vs PLT of equal size and equal L0 (BatchTopK, k=32 both) on the same cached tokens, at N and 2N."""
    import json

    from cltrace.data import CachedActivations, write_activation_cache
    from cltrace.training import TrainConfig, evaluate, train

    cache = work / "cache-quality"
    if not (cache / "manifest.json").exists():
        t = time.perf_counter()
        write_activation_cache(model, None, cache, 2 * tokens + 4096, context_len=128, progress=True)
        print(f"cache: {2 * tokens + 4096} tokens in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"\nquality, F={features} per layer, BatchTopK k=32, from one cache, eval on {eval_tokens} held-out "
          f"tokens{threads_note}")
    print(f"{'kind':<5} {'tokens':>7} {'train s':>8} {'NMSE':>7} {'EV':>7} {'L0':>7} {'dead':>6} {'top1':>6} "
          f"{'CE+':>7} {'KL':>7}", flush=True)
    done = {}  # rows already measured in this work folder (a long run can be continued after an interruption)
    if (work / "quality.jsonl").exists():
        for line in (work / "quality.jsonl").read_text().splitlines():
            r = json.loads(line)
            done[(r["kind"], r["tokens"])] = r
    for n in (tokens, 2 * tokens):
        for kind in ("clt", "plt"):
            if (kind, n) in done:
                e, secs = done[(kind, n)], done[(kind, n)]["train_s"]
                print(f"{kind:<5} {n:>7} {secs:8.0f} {e['nmse']:7.3f} {e['explained_variance']:7.3f} {e['l0']:7.1f} "
                      f"{e['dead_fraction']:6.3f} {e['top1_agreement']:6.3f} {e['ce_increase']:7.3f} {e['kl']:7.3f}"
                      "  (from quality.jsonl)", flush=True)
                continue
            out = work / f"{kind}-{n}"
            cfg = TrainConfig(model=model.name, kind=kind, features_per_layer=features, activation="batchtopk", k=32,
                              tokens=n, batch_size=1024, lr=2e-3, auxk=1 / 32, dead_tokens=16384, progress=False,
                              out=str(out), norm_tokens=4096, checkpoint_every=0, log_every=8, warmup=0.05)
            t = time.perf_counter()
            tc = train(cfg, source=CachedActivations(cache, model=model), model_name=model.name)
            secs = time.perf_counter() - t
            e = evaluate(model, tc, n_tokens=eval_tokens)
            print(f"{kind:<5} {n:>7} {secs:8.0f} {e['nmse']:7.3f} {e['explained_variance']:7.3f} {e['l0']:7.1f} "
                  f"{e['dead_fraction']:6.3f} {e['top1_agreement']:6.3f} {e['ce_increase']:7.3f} {e['kl']:7.3f}",
                  flush=True)
            with open(work / "quality.jsonl", "a") as f:
                f.write(json.dumps({"kind": kind, "tokens": n, "train_s": secs, **e}) + "\n")


# the targets on this 2-core CPU: budget (minutes) -> metric -> bound (`make demo` trains for 10 minutes)
TARGETS = {10: {"nmse": 0.35, "dead_fraction": 0.10, "top1_agreement": 0.30},
           20: {"nmse": 0.20, "dead_fraction": 0.05, "top1_agreement": 0.45, "ce_increase": 1.5},
           120: {"nmse": 0.12, "dead_fraction": 0.05, "top1_agreement": 0.55, "ce_increase": 0.8}}


def budget_curve(points: str, path: Path) -> None:
    """Held-out quality against the time budget: `points` is "series:minutes:eval.json,..." (what `cltrace eval
    --json` wrote for each run); one panel per metric, one line per series, the budget on a log axis, and the
    issue's targets at their budgets as gray bars (a point meets its target when it is on the bar's good side)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for item in points.split(","):
        name, minutes, file = item.split(":", 2)
        series.setdefault(name, []).append((float(minutes), json.loads(Path(file).read_text())))
    panels = (("nmse", "NMSE (lower is better)"), ("dead_fraction", "dead fraction (lower)"),
              ("top1_agreement", "top-1 agreement (higher)"), ("ce_increase", "CE increase, nats (lower)"))
    ticks = sorted({m for pts in series.values() for m, _ in pts} | set(TARGETS))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for ax, (key, label) in zip(axes, panels):
        for name, pts in series.items():
            pts.sort(key=lambda p: p[0])
            ax.plot([m for m, _ in pts], [e[key] for _, e in pts], marker="o", label=name)
        bars = [(m, t[key]) for m, t in TARGETS.items() if key in t]
        ax.scatter([m for m, _ in bars], [v for _, v in bars], marker="_", s=400, c="gray", lw=2, label="target",
                   zorder=3)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{m:g}" for m in ticks])
        ax.minorticks_off()
        ax.set_xlabel("budget (minutes, 2-core CPU)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)  # below: no point hidden
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    from cltrace.data import CachedActivations, StreamingActivations, write_activation_cache
    from cltrace.models.registry import load_model
    from cltrace.training import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("throughput", "quality", "all", "curve"), default="all")
    ap.add_argument("--points", help="--part curve: series:minutes:eval.json,... (cltrace eval --json outputs)")
    ap.add_argument("--plot", default="docs/training/budget_curve.png", help="--part curve: the PNG to write")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2048, help="tokens per training step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dense-batch", type=int, default=256)
    ap.add_argument("--quality-tokens", type=int, default=65536, help="N: the quality part trains on N and 2N")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    if args.part == "curve":
        return budget_curve(args.points, Path(args.plot))
    from cltrace.runtime import keep_freed_memory

    keep_freed_memory()  # as the trainer does: the bare forward is measured under the same allocator
    if args.threads:
        torch.set_num_threads(args.threads)
    note = f", {torch.get_num_threads()} thread(s)"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_training_"))
    model = load_model(args.model)
    if args.part == "quality":
        return quality_rows(model, work, args.quality_tokens, args.features, args.eval_tokens, note)
    rows = []
    print(f"throughput{note}, CLT F={args.features}/layer BatchTopK k=32 (L0 = 32)")
    print(f"{'measurement':<66} {'tok/s':>9} {'x bare fwd':>10}", flush=True)

    def add(name: str, v: float, ratio: float) -> None:
        rows.append((name, v, ratio))
        print(f"{name:<66} {v:9.1f} {ratio:10.2f}", flush=True)

    fwd = bare_forward(model)
    add("bare forward (stop_at_layer, 8x128)", fwd, 1.0)
    n_cache = args.batch * (args.steps + 1)
    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        t = time.perf_counter()
        write_activation_cache(model, None, cache, n_cache, context_len=128, progress=False)
        cache_s = time.perf_counter() - t
        add(f"writing the activation cache ({n_cache} tokens)", n_cache / cache_s, n_cache / cache_s / fwd)
    source = CachedActivations(cache, model=model)

    base = dict(model=args.model, kind="clt", features_per_layer=args.features, activation="batchtopk", k=32,
                batch_size=args.batch, tokens=args.batch * 100, progress=False, out=str(work / "scratch"),
                norm_tokens=args.batch)
    for precision in ("fp32", "bf16"):
        r = train_rate(TrainConfig(**base, precision=precision), source, args.steps, model.name)
        add(f"CLT step from the cache, sparse decode, {precision} (batch {args.batch})", r, r / fwd)
    small = {**base, "batch_size": args.dense_batch, "norm_tokens": args.dense_batch}
    r = train_rate(TrainConfig(**{**small, "sparse_decode": "never"}), source, 2, model.name)
    add(f"CLT step from the cache, dense decode (batch {args.dense_batch})", r, r / fwd)
    r = train_rate(TrainConfig(**small), source, 2, model.name)
    add(f"CLT step from the cache, sparse decode (batch {args.dense_batch})", r, r / fwd)
    stream = StreamingActivations(model, None, context_len=128, buffer_tokens=args.batch)
    r = train_rate(TrainConfig(**base), stream, args.steps, model.name)
    add(f"CLT end to end, streaming from the model, fp32 (batch {args.batch})", r, r / fwd)
    add("peak resident memory (GB)", peak_gb(), float("nan"))
    if args.part == "all":
        quality_rows(model, work, args.quality_tokens, args.features, args.eval_tokens, note)


if __name__ == "__main__":
    main()
