"""Does the graph predict what inhibiting its most influential feature does to the top logit?

For each prompt: build the attribution graph, take the feature node with the largest influence on the
logits, set it to 0 at its position, and compare the change of the top token's logit − mean logit:

    graph direct   Σ edge / a × Δa on the logit node (Δa = −a): the graph's own prediction
    held           constrained, every layer held: the exact direct effect (should equal "graph direct")
    graph total    along every path of the graph, active features responding linearly
    constrained    local replacement model, every layer responding (JumpReLU live)
    free           the real model, attention and norms recomputing

Usage:  .venv/bin/python benchmarks/bench_interventions.py [--model gemma-3-270m] [--transcoders DIR]
Without --transcoders: a random CLT (seed 0) calibrated on each prompt (~20 active features per layer).
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = [
    "Fact: Michael Jordan plays the sport of",
    "The capital of France is",
    "The opposite of hot is",
    "1, 2, 3, 4,",
]


def run(args) -> list[dict]:
    from cltrace.attribution import attribute
    from cltrace.attribution.prune import influence, normalize_rows
    from cltrace.interventions import Intervention, clean_run, run_constrained, run_free
    from cltrace.models.registry import load_model
    from cltrace.replacement import random_transcoder
    from cltrace.transcoders.io import load_transcoder

    model = load_model(args.model)
    trained = load_transcoder(args.transcoders) if args.transcoders else None
    rows = []
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        tc = trained or random_transcoder(model, "clt", n_features=args.features, active_per_layer=20, seed=0,
                                          prompt=prompt)
        graph = attribute(model, tc, prompt, max_feature_nodes=args.max_features)
        nf = graph.n_features
        inf = influence(normalize_rows(graph.edges.float()), graph.rows, graph.logit_weights())[:nf]
        k = int(inf.argmax())
        layer, pos, f = graph.features[k].tolist()
        a = float(graph.activations[k])
        per_unit = graph.edges[:, :nf].double() / graph.activations.double()  # [R, nf]
        e = torch.zeros(nf, dtype=torch.float64)
        e[k] = 1.0
        total = per_unit @ torch.linalg.solve(torch.eye(nf, dtype=torch.float64) - per_unit[:nf], e)
        tok = int(graph.logit_tokens[0])
        with torch.no_grad():
            clean = clean_run(model, tc, graph.input_ids)
            iv = [Intervention(layer=layer, pos=pos, feature=f, value=0.0)]
            runs = {"held": run_constrained(model, tc, clean, iv, held=set(range(model.n_layers))),
                    "constrained": run_constrained(model, tc, clean, iv),
                    "free": run_free(model, tc, clean.ids, iv)}
        base = demeaned(clean.last_logits, tok)
        p0 = float(torch.softmax(clean.last_logits.float(), -1)[tok])
        row = {"prompt": prompt, "token": graph.logit_labels[0], "p": p0, "node": f"{layer}_{f}_{pos}",
               "token_at": graph.tokens[pos], "act": a, "n_features": nf,
               "graph_direct": float(per_unit[nf, k]) * -a, "graph_total": float(total[nf]) * -a}
        for name, r in runs.items():
            row[name] = demeaned(r.last_logits, tok) - base
            row[f"p_{name}"] = float(torch.softmax(r.last_logits.float(), -1)[tok])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{prompt!r}: done in {row['seconds']:.1f}s", flush=True)
    return rows


def demeaned(logits: torch.Tensor, tok: int) -> float:
    """logits [V]: tok's logit minus the mean logit, the value of a graph's logit node."""
    return float(logits[tok] - logits.float().mean())


def table(rows: list[dict]) -> str:
    head = ("| prompt | top token (p) | inhibited node (token, act) | graph direct | held (measured) | graph total "
            "| constrained (p after) | free (p after) |\n|---|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['prompt']} | {r['token']!r} ({r['p']:.3f}) | {r['node']} ({r['token_at']!r}, {r['act']:.2f}) "
            f"| {r['graph_direct']:+.4f} | {r['held']:+.4f} | {r['graph_total']:+.4f} "
            f"| {r['constrained']:+.4f} ({r['p_constrained']:.3f}) | {r['free']:+.4f} ({r['p_free']:.3f}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--transcoders", help="a trained transcoder folder (default: random, calibrated per prompt)")
    p.add_argument("--features", type=int, default=512, help="features per layer of the random CLT (512)")
    p.add_argument("--max-features", type=int, default=None,
                   help="cap the graph's feature nodes (the most influential kept; default: all)")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = run(args)
    print(table(rows))


if __name__ == "__main__":
    main()
