"""From per-prompt results to the numbers of the report: means, spreads, worst prompts, pooled correlations."""

from __future__ import annotations

import math

import torch

from cltrace.validation.stats import describe, spearman

SCORES = ("replacement", "completeness", "replacement_pruned", "completeness_pruned")
PREDICTIONS = ("direct", "total")
MEASURES = ("held", "frozen", "live", "real")  # (a) held / (a) responding, (b), (c); see cltrace.validation.perturb


def _worst(results: list[dict], key: str, n: int) -> list[dict]:
    ranked = sorted((r for r in results if r.get(key) is not None), key=lambda r: r[key])
    return [{"prompt": r["prompt"], key: r[key]} for r in ranked[:n]]


def faithfulness(results: list[dict]) -> dict:
    """Rank correlations of the graph's predictions with measured effects, over all sampled pairs pooled.

    Signed predictions (direct edge, total effect) against the signed measured Δ pre-activation; the unsigned
    influence against |Δ|. held_max_error: the largest |held − direct| (must be ~0: edges are exact direct
    effects), also relative to the largest |direct|.
    """
    cols: dict[str, list[float]] = {k: [] for k in ("direct", "total", "influence", *MEASURES)}
    n_sources = 0
    for r in results:
        for p in r.get("perturbations", []):
            n_sources += 1
            for k in ("direct", "total", "influence"):
                cols[k].extend(p[f"pred_{k}"])
            for k in MEASURES:
                cols[k].extend(p[k])
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}
    out: dict = {"n_pairs": len(cols["direct"]), "n_sources": n_sources, "spearman": {}}
    for pred in PREDICTIONS:
        out["spearman"][pred] = {m: spearman(t[pred], t[m]) for m in MEASURES}
    out["spearman"]["influence"] = {m: spearman(t["influence"], t[m].abs()) for m in MEASURES}
    if out["n_pairs"]:
        err = (t["held"] - t["direct"]).abs().max()
        out["held_max_error"] = float(err)
        out["held_max_rel_error"] = float(err / t["direct"].abs().max().clamp_min(1e-30))
        out["sign_agreement"] = {m: float(((t["total"] > 0) == (t[m] > 0)).double().mean()) for m in MEASURES}
    return out


def drift(results: list[dict], which: str) -> list[dict]:
    """Per k layers after the perturbed feature's layer: mean cosine, median and mean NMSE, count."""
    by_k: dict[int, tuple[list[float], list[float]]] = {}
    for r in results:
        for p in r.get("perturbations", []):
            d = p[f"drift_{which}"]
            for k, (c, e) in enumerate(zip(d["cosine"], d["nmse"]), start=1):
                if c is not None and math.isfinite(c):  # None (a file) or NaN (compact): no real effect
                    by_k.setdefault(k, ([], []))
                    by_k[k][0].append(c)
                    by_k[k][1].append(e)
    out = []
    for k in sorted(by_k):
        c, e = describe(by_k[k][0]), describe(by_k[k][1])
        out.append({"layers_after": k, "n": c["n"], "cosine_mean": c["mean"], "nmse_median": e["median"],
                    "nmse_mean": e["mean"]})
    return out


def pruning(results: list[dict]) -> list[dict]:
    """Mean nodes, features and scores at each node threshold (the paper's pruning table)."""
    rows: dict[float, list[dict]] = {}
    for r in results:
        for row in r["pruning_curve"]:
            rows.setdefault(row["node_threshold"], []).append(row)
    out = []
    for t in sorted(rows):
        rs = rows[t]
        out.append({"node_threshold": t, **{k: describe([x[k] for x in rs])["mean"]
                                            for k in ("n_nodes", "n_features", "replacement", "completeness")}})
    return out


def summarize(results: list[dict], worst: int = 5) -> dict:
    """The summary of one transcoder set over its prompts (what validation.json and the report show)."""
    nt = [r["next_token"]["agree"] for r in results]
    return {
        "n_prompts": len(results),
        "scores": {k: describe([r[k] for r in results]) for k in SCORES},
        "worst": {k: _worst(results, k, worst) for k in ("replacement", "completeness_pruned")},
        "sizes": {k: describe([r[k] for r in results]) for k in
                  ("n_active_features", "n_features", "n_features_pruned", "n_nodes_pruned", "n_edges_pruned")},
        "pruning_curve": pruning(results),
        "faithfulness": faithfulness(results),
        "drift": {"frozen": drift(results, "frozen"), "live": drift(results, "live")},
        "next_token_agreement": sum(nt) / len(nt) if nt else math.nan,
        "path_length": describe([r["path_length"] for r in results]),
        "seconds": {k: describe([r["seconds"][k] for r in results]) for k in ("attribution", "total")},
    }
