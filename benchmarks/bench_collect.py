"""Collecting activations in fp32 and under bf16 autocast: speed, and what bf16 does to the rows, on a real model.

    .venv/bin/python benchmarks/bench_collect.py [--model gemma-3-270m] [--tokens 16384] [--transcoder runs/demo/clt]

Speed (tokens/s, and as a ratio to the fp32 bare forward `forward(ids, stop_at_layer=L)` of 8 x 128 tokens
measured in the same process): the bare forward in each precision, streaming (`StreamingActivations`: forward +
keeping the training positions) and writing an activation cache (`write_activation_cache`: + bf16 storage,
writing, SHA-256) of --tokens tokens.

What bf16 does to the rows: the same contexts harvested both ways; per layer, the relative norm of the
difference and its normalized MSE (‖y16 − y32‖² / E‖y32 − ȳ32‖², the unit of a transcoder's NMSE), for x (MLP
inputs) and y (MLP outputs). With --transcoder: that transcoder's NMSE against the fp32 targets when it reads
the fp32 inputs and when it reads the bf16 ones and is scored against the bf16 targets.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cltrace.runtime import fast_bf16, tune_cpu_memory

tune_cpu_memory()


def bare_forward(model, ids, precision: str, reps: int = 3) -> float:
    with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model.forward(ids, stop_at_layer=model.n_layers)
        t = time.perf_counter()
        for _ in range(reps):
            model.forward(ids, stop_at_layer=model.n_layers)
    return reps * ids.numel() / (time.perf_counter() - t)


def stream_rate(model, tokens: int, precision: str) -> float:
    from cltrace.data import StreamingActivations

    src = StreamingActivations(model, None, buffer_tokens=2048, precision=precision)
    batches = src.batches(1024, seed=0, track=False)
    next(batches)
    t, got = time.perf_counter(), 0
    while got < tokens:
        got += len(next(batches)[0])
    batches.close()
    return got / (time.perf_counter() - t)


def cache_rate(model, tokens: int, precision: str) -> float:
    from cltrace.data import write_activation_cache

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_activation_cache(model, None, tmp, tokens, progress=False, precision=precision)
        return tokens / (time.perf_counter() - t)


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, L, D] -> [L]: ‖pred − target‖² / ‖target − mean‖², per layer."""
    err = (pred - target).pow(2).sum((0, 2))
    var = (target - target.mean(0)).pow(2).sum((0, 2))
    return err / var


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens streamed and cached per precision")
    ap.add_argument("--contexts", type=int, default=32, help="contexts of 128 tokens compared fp32 vs bf16")
    ap.add_argument("--transcoder", default="", help="a transcoder of this model to score on both")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import cltrace
    from cltrace.data import ContextStream, harvest
    from cltrace.data.tokens import special_tokens

    model = cltrace.load_model(args.model)
    print(f"{args.model}, {args.threads} threads, fast_bf16: {fast_bf16('cpu')}, "
          f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    ids = torch.tensor(ContextStream(None, model.tokenizer, 128).take(8))
    ref = bare_forward(model, ids, "fp32")
    rows = [("bare forward, fp32", ref)]
    rows.append(("bare forward, bf16 autocast", bare_forward(model, ids, "bf16")))
    for p in ("fp32", "bf16"):
        rows.append((f"streaming (forward + harvest), {p}", stream_rate(model, args.tokens, p)))
    for p in ("fp32", "bf16"):
        rows.append((f"writing a cache of {args.tokens:,} tokens, {p}", cache_rate(model, args.tokens, p)))
    print("\n| measurement | tok/s | x fp32 bare forward |\n|---|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / ref:.2f} |")

    _, _, special = special_tokens(model.tokenizer)
    contexts = torch.tensor(ContextStream(None, model.tokenizer, 128, split="eval").take(args.contexts))
    parts = {p: [harvest(model, contexts[i:i + 8], special, precision=p) for i in range(0, len(contexts), 8)]
             for p in ("fp32", "bf16")}
    x32, y32 = (torch.cat([r[j] for r in parts["fp32"]]) for j in (0, 1))
    x16, y16 = (torch.cat([r[j] for r in parts["bf16"]]) for j in (0, 1))
    print(f"\nbf16 rows against fp32 rows, {len(x32):,} held-out positions ({args.contexts} contexts of 128)")
    print("| layer | x: relative difference | x: NMSE | y: relative difference | y: NMSE |\n|---:|---:|---:|---:|---:|")
    rel = lambda a, b: ((a - b).norm(dim=-1) / a.norm(dim=-1)).mean(0)  # noqa: E731
    rx, ry, nx, ny = rel(x32, x16), rel(y32, y16), nmse(x16, x32), nmse(y16, y32)
    for layer in range(model.n_layers):
        print(f"| {layer} | {rx[layer]:.4f} | {nx[layer]:.2e} | {ry[layer]:.4f} | {ny[layer]:.2e} |")
    print(f"| mean | {rx.mean():.4f} | {nx.mean():.2e} | {ry.mean():.4f} | {ny.mean():.2e} |")
    if args.transcoder:
        tc = cltrace.load_transcoder(args.transcoder)
        with torch.no_grad():
            pred32 = tc.decode(tc.encode(x32), x32)
            pred16 = tc.decode(tc.encode(x16), x16)
        print(f"\n{args.transcoder}: NMSE reading fp32 rows, scored on fp32 targets "
              f"{nmse(pred32, y32).mean():.4f}; reading bf16 rows, scored on bf16 targets "
              f"{nmse(pred16, y16).mean():.4f}; reading bf16 rows, scored on fp32 targets "
              f"{nmse(pred16, y32).mean():.4f}")


if __name__ == "__main__":
    main()
