"""Where a CLT training step spends its time: torch.profiler's op table for a few steps (CPU or CUDA).

    .venv/bin/python benchmarks/profile_step.py --cache DIR [--batch 2048] [--precision bf16]   # real rows
    python3 benchmarks/profile_step.py --random [--device cuda]          # synthetic rows of Gemma-3-270M's shape

With --random no model or cache is needed (rows are random normals with Gemma-3-270M's 18 x 640 shape), which
is enough to time the transcoder's own step: its cost does not depend on what the rows hold, except through
how many features fire, and BatchTopK fixes that at k per token and layer.
"""

from __future__ import annotations

import argparse
import time

import torch

from cltrace.runtime import tune_cpu_memory

tune_cpu_memory()  # before the first large allocation: huge pages, malloc keeps freed blocks (as the CLI)


class RandomRows:
    """An endless source of random (x, y) rows on one device (the trainer's source interface, no resume)."""

    def __init__(self, n_layers: int, d_model: int, device):
        self.n_layers, self.d_model, self.device = n_layers, d_model, torch.device(device)

    def batches(self, batch_size: int, *, seed: int = 0, track: bool = True):
        g = torch.Generator(device=self.device).manual_seed(seed)
        shape = (batch_size, self.n_layers, self.d_model)
        while True:
            yield (torch.randn(shape, generator=g, device=self.device),
                   torch.randn(shape, generator=g, device=self.device))


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from cltrace.training import TrainConfig, Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", help="activation cache folder (rows of a real model)")
    ap.add_argument("--random", action="store_true", help="random rows of Gemma-3-270M's shape instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--kind", default="clt", choices=("clt", "plt"))
    ap.add_argument("--decode", default="auto", choices=("auto", "always", "never"), help="sparse decode setting")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25, help="rows of the op table")
    args = ap.parse_args()
    if args.random:
        source = RandomRows(18, 640, args.device)
    else:
        from cltrace.data import CachedActivations

        source = CachedActivations(args.cache)
    cfg = TrainConfig(kind=args.kind, features_per_layer=args.features, activation="batchtopk", k=32,
                      batch_size=args.batch, tokens=args.batch * 100, precision=args.precision, device=args.device,
                      sparse_decode=args.decode,
                      out="/tmp/profile_step", progress=False, norm_tokens=args.batch)
    tr = Trainer(cfg, source)
    tr.initialize()
    batches = source.batches(args.batch, seed=0)
    cuda = tr.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tr.train_step(*next(batches))  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        tr.train_step(*next(batches))
    sync()
    dt = (time.perf_counter() - t) / args.steps
    print(f"{args.kind} F={args.features} batch {args.batch} {args.precision} decode={args.decode} on {tr.device}: "
          f"{dt * 1e3:.1f} ms/step, "
          f"{args.batch / dt:,.0f} tok/s", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as p:
        for _ in range(args.steps):
            tr.train_step(*next(batches))
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
