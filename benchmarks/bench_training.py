"""Training throughput and quality on a real model (default gemma-3-270m), printed as a table.

    .venv/bin/python benchmarks/bench_training.py [--model gemma-3-270m] [--features 2048] [--batch 2048]

Throughput (tokens/s, and as a ratio to the model's bare forward, measured in the same run on the same
batch shape: `forward(ids, stop_at_layer=L)` of 8 x 128 tokens):
  * CLT training step from an on-disk activation cache (sparse decode), and with dense decode;
  * end to end: CLT training on activations streamed from the model;
  * peak resident memory.
Quality: CLT vs PLT with the same features per layer on the same tokens, and with twice the tokens
(NMSE, L0, top-1 agreement, CE increase of the spliced-in replacement model on held-out text).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch


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


def main() -> None:
    from cltrace.data import CachedActivations, StreamingActivations, write_activation_cache
    from cltrace.models.registry import load_model
    from cltrace.training import TrainConfig, evaluate, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2048, help="tokens per training step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dense-batch", type=int, default=256)
    ap.add_argument("--quality-features", type=int, default=512)
    ap.add_argument("--quality-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_training_"))
    model = load_model(args.model)
    rows = []
    print(f"{'measurement':<66} {'tok/s':>9} {'x bare fwd':>10}", flush=True)

    def add(name: str, v: float, ratio: float) -> None:
        rows.append((name, v, ratio))
        print(f"{name:<66} {v:9.1f} {ratio:10.2f}", flush=True)

    fwd = bare_forward(model)
    add("bare forward (stop_at_layer, 8x128)", fwd, 1.0)
    n_cache = max(args.batch * args.steps, 2 * args.quality_tokens if not args.skip_quality else 0) + args.batch
    t = time.perf_counter()
    write_activation_cache(model, None, work / "cache", n_cache, context_len=128, progress=False)
    cache_s = time.perf_counter() - t
    add(f"writing the activation cache ({n_cache} tokens)", n_cache / cache_s, n_cache / cache_s / fwd)
    cache = CachedActivations(work / "cache", model=model)

    base = dict(model=args.model, kind="clt", features_per_layer=args.features, batch_size=args.batch,
                tokens=args.batch * 100, progress=False, out=str(work / "scratch"), norm_tokens=args.batch)
    r = train_rate(TrainConfig(**base), cache, args.steps, model.name)
    add(f"CLT F={args.features} step from cache, sparse decode (batch {args.batch})", r, r / fwd)
    r = train_rate(TrainConfig(**{**base, "batch_size": args.dense_batch, "sparse_decode": "never",
                                  "norm_tokens": args.dense_batch}), cache, 2, model.name)
    add(f"CLT F={args.features} step from cache, dense decode (batch {args.dense_batch})", r, r / fwd)
    r = train_rate(TrainConfig(**{**base, "batch_size": args.dense_batch, "norm_tokens": args.dense_batch}),
                   cache, 2, model.name)
    add(f"CLT F={args.features} step from cache, sparse decode (batch {args.dense_batch})", r, r / fwd)
    stream = StreamingActivations(model, None, context_len=128, buffer_tokens=args.batch)
    r = train_rate(TrainConfig(**base), stream, args.steps, model.name)
    add(f"CLT F={args.features} end to end, streaming (batch {args.batch})", r, r / fwd)
    add("peak resident memory (GB)", peak_gb(), float("nan"))

    if args.skip_quality:
        return
    print(f"\nquality, F={args.quality_features} per layer, from the cache, eval on {args.eval_tokens} held-out tokens")
    print(f"{'kind':<5} {'tokens':>7} {'train s':>8} {'NMSE':>7} {'EV':>7} {'L0':>7} {'dead':>6} {'top1':>6} "
          f"{'CE+':>7} {'KL':>7}")
    for tokens in (args.quality_tokens, 2 * args.quality_tokens):
        for kind in ("clt", "plt"):
            out = work / f"{kind}-{tokens}"
            cfg = TrainConfig(model=args.model, kind=kind, features_per_layer=args.quality_features, tokens=tokens,
                              batch_size=1024, lr=2e-3, sparsity=1e-3, progress=False, out=str(out),
                              norm_tokens=4096, checkpoint_every=0, log_every=5, init_l0=32, warmup=0.1)
            t = time.perf_counter()
            tc = train(cfg, source=CachedActivations(work / "cache", model=model), model_name=model.name)
            secs = time.perf_counter() - t
            e = evaluate(model, tc, n_tokens=args.eval_tokens)
            print(f"{kind:<5} {tokens:>7} {secs:8.0f} {e['nmse']:7.3f} {e['explained_variance']:7.3f} {e['l0']:7.1f} "
                  f"{e['dead_fraction']:6.3f} {e['top1_agreement']:6.3f} {e['ce_increase']:7.3f} {e['kl']:7.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
