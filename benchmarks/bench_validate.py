"""What validating a prompt costs, against the bare attribution graph of the same prompt (`cltrace trace`).

Per prompt, back to back on the same loaded model and transcoders, so that the ratio holds on a loaded machine:

    trace      cltrace.attribute(model, tc, ids, max_feature_nodes=M) + prune + scores (what `cltrace trace`
               computes; no file written)
    validate   cltrace.validation.measure_prompt: the same attribution, then pruning curve, path length, next
               token, and per inhibited source 4 perturbed forward passes

then one end-to-end `cltrace.validate` over all the prompts into a temporary folder (result files, summary,
plots, report), and the process's peak RSS during the first half and during the whole of it (memory is
bounded when the whole run needs no more than half of it did).

Usage:  .venv/bin/python benchmarks/bench_validate.py [-t runs/demo/clt] [--n 10] [--max-features 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("-t", "--transcoders", default="runs/demo/clt")
    ap.add_argument("--n", type=int, default=10, help="prompts of the built-in set")
    ap.add_argument("--max-features", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch
    from peak import Peak

    from cltrace.attribution import attribute, prune, scores
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder
    from cltrace.validation import Settings, load_prompts, measure_prompt, validate

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tc = load_transcoder(args.transcoders)
    prompts = load_prompts(model, n=args.n)
    settings = Settings(max_features=args.max_features)
    attribute(model, tc, prompts[0].tensor(model.device), max_feature_nodes=args.max_features)  # warm-up

    rows = []
    for p in prompts:
        t0 = time.perf_counter()
        g = attribute(model, tc, p.tensor(model.device), max_feature_nodes=args.max_features)
        scores(g, prune(g))
        t_trace = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = measure_prompt(model, tc, p, settings)
        t_val = time.perf_counter() - t1
        rows.append((p.text, len(p.ids), t_trace, t_val, res["seconds"]["attribution"]))

    half = max(1, len(prompts) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        with Peak() as pk_half:
            validate(model, tc, [p.text for p in prompts[:half]], out=tmp, settings=settings, progress=False)
        t2 = time.perf_counter()
        with Peak() as pk_all:
            validate(model, tc, [p.text for p in prompts], out=tmp, settings=settings, progress=False)
        t_rest = time.perf_counter() - t2
    n_rest = len(prompts) - half

    print(f"model {args.model}, transcoders {args.transcoders}, max features {args.max_features}, "
          f"{len(prompts)} prompts, torch threads {torch.get_num_threads()}\n")
    print("| prompt | tokens | trace s | validate s | ratio | of which attribution s |")
    print("|---|---:|---:|---:|---:|---:|")
    for text, n_tok, a, b, c in rows:
        print(f"| {text[:40]!r} | {n_tok} | {a:.2f} | {b:.2f} | {b / a:.2f} | {c:.2f} |")
    tr = statistics.mean(r[2] for r in rows)
    va = statistics.mean(r[3] for r in rows)
    print(f"| **mean** | | **{tr:.2f}** | **{va:.2f}** | **{va / tr:.2f}** | "
          f"{statistics.mean(r[4] for r in rows):.2f} |\n")
    per = t_rest / max(1, n_rest)
    print(f"end to end `validate` (files, summary, plots, report), {n_rest} new prompts on top of {half} stored: "
          f"{t_rest:.1f} s = {per:.2f} s per new prompt ({per / tr:.2f}x trace)")
    print(f"peak RSS: {pk_half.peak / 2**20:.0f} MiB over the first {half} prompts, "
          f"{pk_all.peak / 2**20:.0f} MiB over all {len(prompts)}")


if __name__ == "__main__":
    main()
