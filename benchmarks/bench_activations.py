"""How fast activations reach the trainer: streaming vs writing / reading the disk cache.

    python benchmarks/bench_activations.py                          # a tiny random model (seconds)
    python benchmarks/bench_activations.py --model gemma-3-270m --tokens 8192

Prints tokens/s of each path and its ratio to the model's bare forward (the same batches through
`forward(ids, stop_at_layer=n_layers)` under no_grad, nothing kept), measured in the same run, so the
ratio says what the data pipeline costs on top of the model. Streaming and writing count the tokens run
through the model (every position, like the bare forward; a buffer computed but not yet served at the end
counts, since a longer run serves it); reading the cache counts rows served.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cltrace.data import CachedActivations, StreamingActivations, write_activation_cache


def load(spec: str):
    if spec.startswith("tiny"):
        from cltrace.models.tiny import tiny_model

        return tiny_model("llama", n_layers=6, d_model=256, vocab_size=264)
    from cltrace.models import registry

    if spec in registry.BUILTIN and not registry.is_ready(spec):
        raise SystemExit(f"{spec} is not prepared: run cltrace.models.registry.prepare({spec!r}) first")
    return registry.load_model(spec)


@torch.no_grad()
def bare_forward(model, contexts: list[list[int]], model_batch: int) -> float:
    """Positions per second of the forward alone, over the given contexts (after one warm-up batch)."""
    model.forward(torch.tensor(contexts[:model_batch]), stop_at_layer=model.n_layers)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(contexts) - model_batch + 1, model_batch):
        ids = torch.tensor(contexts[i:i + model_batch])
        model.forward(ids, stop_at_layer=model.n_layers)
        n += ids.numel()
    return n / (time.perf_counter() - t0)


def consume(batches, n_tokens: int) -> float:
    """Rows per second drawn from a batch iterator until n_tokens rows."""
    t0 = time.perf_counter()
    n = 0
    for x, _ in batches:
        n += len(x)
        if n >= n_tokens:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random, 6 layers, d_model 256) or a model spec")
    ap.add_argument("--corpus", default=None, help="corpus spec (default: the committed small corpus)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--context-len", type=int, default=128)
    ap.add_argument("--model-batch", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1024, help="trainer batch (rows)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    kw = dict(context_len=args.context_len, model_batch=args.model_batch)
    buffer = max(args.tokens // 4, args.batch_size)
    print(f"model {model.name}: {model.n_layers} layers, d_model {model.d_model}; {args.tokens} tokens, "
          f"context {args.context_len}, model batch {args.model_batch}, trainer batch {args.batch_size}, "
          f"buffer {buffer} rows, {torch.get_num_threads()} threads")

    src = StreamingActivations(model, args.corpus, buffer_tokens=buffer, **kw)
    contexts = src.contexts().take(max(2, args.tokens // args.context_len) + args.model_batch)
    bare_before = bare_forward(model, contexts, args.model_batch)
    rates = {"bare forward (stop_at_layer)": bare_before}
    t0 = time.perf_counter()
    consume(src.batches(args.batch_size, seed=0), args.tokens)
    rates["streaming activations"] = src.model_tokens / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        m = write_activation_cache(model, args.corpus, folder, args.tokens, buffer_tokens=buffer, progress=False,
                                   **kw)
        rates["writing the disk cache (bf16)"] = m["model_tokens"] / (time.perf_counter() - t0)
        cache = CachedActivations(folder, buffer_tokens=buffer)
        rates["reading the disk cache"] = consume(cache.batches(args.batch_size, seed=0), args.tokens)

    bare_after = bare_forward(model, contexts, args.model_batch)  # again: the machine's load may drift
    base = rates["bare forward (stop_at_layer)"] = (bare_before + bare_after) / 2
    print(f"bare forward: {bare_before:,.0f} tokens/s before, {bare_after:,.0f} after; the mean is the base")
    print(f"\n| {'path':32s} | {'tokens/s':>10s} | {'x bare forward':>14s} |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 16}|")
    for name, rate in rates.items():
        print(f"| {name:32s} | {rate:10,.0f} | {rate / base:14.2f} |")


if __name__ == "__main__":
    main()
