"""The paper's comparison (Ameisen et al. 2025, CLT against PLT): held-out NMSE against L0 for a cross-layer
and a per-layer transcoder with the same features per layer, at several sparsity levels (BatchTopK k), every
run trained on the same activation cache for the same number of tokens. One command, one plot:

    .venv/bin/python benchmarks/nmse_vs_l0.py --work runs/nvl --ks 16,32,64 --tokens 131072 \
        --plot docs/training/nmse_vs_l0.png

The runs are rows of benchmarks/sweep_recipe.py (`k16`, `plt+k16`, ...: the same cache, tokens and recipe as
the sweep), so a row the sweep already trained in WORK is evaluated, not trained again. L0 on the x axis is
the held-out mean number of active features per token and layer (`cltrace eval`), the same measure for both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep_recipe  # noqa: E402


def plot(rows: dict[str, dict], ks: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, prefix, marker in (("CLT", "", "o"), ("PLT", "plt+", "s")):
        pts = sorted((rows[f"{prefix}k{k}"]["l0"], rows[f"{prefix}k{k}"]["nmse"], k) for k in ks
                     if f"{prefix}k{k}" in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
        for x, y, k in pts:
            ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active features per token and layer, held-out)")
    ax.set_ylabel("NMSE (held-out)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/sweep/fixed")
    ap.add_argument("--ks", default="16,32,64", help="sparsity levels (BatchTopK k)")
    ap.add_argument("--plot", default="docs/training/nmse_vs_l0.png")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--cache-tokens", type=int, default=65_536)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    names = [n for k in ks for n in (f"k{k}", f"plt+k{k}")]
    sys.argv = [sys.argv[0], "--work", args.work, "--rows", ",".join(names), "--parallel", str(args.parallel),
                "--tokens", str(args.tokens), "--cache-tokens", str(args.cache_tokens),
                "--eval-tokens", str(args.eval_tokens)]
    sweep_recipe.main()
    lines = (Path(args.work) / "results.jsonl").read_text().splitlines()
    rows = {r["name"]: r for r in map(json.loads, lines)}
    print("| k | CLT L0 | CLT NMSE | PLT L0 | PLT NMSE | PLT / CLT NMSE |\n|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        c, p = rows[f"k{k}"], rows[f"plt+k{k}"]
        print(f"| {k} | {c['l0']:.1f} | {c['nmse']:.3f} | {p['l0']:.1f} | {p['nmse']:.3f} | "
              f"{p['nmse'] / c['nmse']:.2f} |")
    plot(rows, ks, Path(args.plot), f"Gemma-3-270M, 512 features/layer, {args.tokens:,} tokens "
                                    f"({args.tokens // args.cache_tokens} passes over {args.cache_tokens:,})")
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
