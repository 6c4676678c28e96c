"""Benchmark cltrace attribution against circuit-tracer 0.5.0 on the same model folder, transcoders and tokens.

    .venv/bin/python benchmarks/bench_attribution.py --part tiny     # ct TL CLT+PLT vs ours, node by node
    .venv/bin/python benchmarks/bench_attribution.py --part gemma    # Gemma-3-270M CLT 2048 f/l, 40 active/layer
    .venv/bin/python benchmarks/bench_attribution.py --part scale    # ours: 10/30/60/500/2000-token prompts

circuit-tracer runs in its own venv (/tmp/ct-venv) through run_reference.py, which writes random transcoders
in its format, calibrates them, attributes and saves graph.pt; benchmarks/ct_dump.py turns graph.pt into
plain arrays. We load the same transcoder folder with our importer and the same token ids.
Gemma folder: /tmp/ct-models/gemma-cltrace = cltrace's prepared gemma-3-270m weights (symlinked) with a
config.json that transformers 4.57 also reads (architectures + rope_theta keys added).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from peak import Peak  # benchmarks/peak.py (the script's folder is on sys.path)

from cltrace.runtime import tune_cpu_memory

tune_cpu_memory()  # the CLI's CPU memory settings, before the first large allocation

CT_PY = "/tmp/ct-venv/bin/python"
CT_REF = "/work/shared/reference/circuit-tracer/run_reference.py"
HERE = Path(__file__).parent
GEMMA = "/tmp/ct-models/gemma-cltrace"


def ensure_gemma_folder() -> str:
    from cltrace.models.registry import model_dir, prepare

    src = prepare("gemma-3-270m")
    os.makedirs(GEMMA, exist_ok=True)
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not os.path.exists(f"{GEMMA}/{f}"):
            os.symlink(model_dir("gemma-3-270m") / f, f"{GEMMA}/{f}")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["Gemma3ForCausalLM"], rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6)
    Path(f"{GEMMA}/config.json").write_text(json.dumps(cfg, indent=1))
    return GEMMA


def run_ct(model: str, kind: str, backend: str, batch: int, n_features: int, active: int, reuse: bool) -> Path:
    tag = "tiny" if model == "tiny" else Path(model).name
    out = Path(f"/tmp/ct-runs/bench-{tag}-{kind}-{backend}-b{batch}")
    if not (reuse and (out / "graph.npz").exists()):
        cmd = [CT_PY, CT_REF, "--model", model, "--kind", kind, "--backend", backend, "--batch-size", str(batch),
               "--n-features", str(n_features), "--active-per-layer", str(active), "--out-dir", str(out),
               "--threads", str(torch.get_num_threads())]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([CT_PY, str(HERE / "ct_dump.py"), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def run_ours(model_path: str, run: Path, batch: int, token_scale: float = 1.0) -> dict:
    from cltrace.attribution import attribute
    from cltrace.attribution.ct_compare import compare
    from cltrace.attribution.prune import prune, scores
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder

    s = json.loads((run / "summary.json").read_text())
    model = load_model(model_path)
    tc = load_transcoder(run / "transcoders")
    ids = torch.tensor(s["input_tokens"])
    attribute(model, tc, ids, batch_size=batch)  # warm-up (ct's numbers are a single warm-ish run)
    with Peak() as pk:
        t = time.perf_counter()
        g = attribute(model, tc, ids, batch_size=batch)
        sec = time.perf_counter() - t
    pr = prune(g)
    path = g.save(run / "ours.safetensors")
    ct_scores = json.loads((run / "ct_scores.json").read_text())
    return {"seconds": sec, "peak_mib": pk.peak / 2**20, "cmp": compare(g, str(run / "graph.npz"), token_scale),
            "scores": scores(g), "pruned": (int(pr.node_mask.sum()), int(pr.edge_mask.sum())),
            "ct_scores": ct_scores, "ct_seconds": s["time_attribution_s"],
            "ct_peak_mib": s["peak_rss_during_attribution_mib"], "p0": (g.logit_labels[0], float(g.logit_probs[0])),
            "ct_p0": (s["logit_targets"][0][0], s["logit_probabilities"][0]),
            "size": path.stat().st_size, "ct_size": (run / "graph.pt").stat().st_size}


def row(name: str, r: dict) -> str:
    c = r["cmp"]
    return (f"| {name} | {c['matched_nodes']} ({c['only_ours']}/{c['only_ct']}) | {c['rel_diff']:.1e} | "
            f"{r['scores'][0]:.3f}/{r['scores'][1]:.3f} vs {r['ct_scores']['replacement']:.3f}/"
            f"{r['ct_scores']['completeness']:.3f} | {r['pruned']} vs ({r['ct_scores']['nodes_pruned']}, "
            f"{r['ct_scores']['edges_pruned']}) | {r['p0'][1]:.3f} vs {r['ct_p0'][1]:.3f} | "
            f"{r['seconds']:.2f} / {r['ct_seconds']:.2f} = {r['seconds'] / r['ct_seconds']:.2f} | "
            f"{r['peak_mib']:.0f} / {r['ct_peak_mib']:.0f} = {r['peak_mib'] / r['ct_peak_mib']:.2f} | "
            f"{r['size'] / 1e6:.2f} / {r['ct_size'] / 1e6:.2f} MB |")


HEADER = ("| run | matched nodes (only ours/only ct) | max rel ΔA | ours repl/compl vs ct | pruned nodes, edges "
          "ours vs ct | p(top) ours vs ct | attribution s ours/ct | peak RSS MiB ours/ct | graph file ours/ct |\n"
          "|---|---|---|---|---|---|---|---|---|")


def part_tiny(reuse: bool) -> None:
    print(HEADER)
    for kind in ("clt", "plt"):
        run = run_ct("tiny", kind, "transformerlens", 256, 256, 20, reuse)
        print(row(f"tiny Llama {kind.upper()} vs ct TL", run_ours("/tmp/ct-models/tiny-lm", run, 64)), flush=True)


def part_gemma(reuse: bool) -> None:
    model = ensure_gemma_folder()
    print(HEADER)
    tl = run_ct(model, "clt", "transformerlens", 32, 2048, 40, reuse)  # ct's fastest setting
    nn = run_ct(model, "clt", "nnsight", 64, 2048, 40, reuse)  # correct forward, token edges need √d_model
    print(row("Gemma CLT vs ct TL b32", run_ours(model, tl, 64)), flush=True)
    print(row("Gemma CLT vs ct nnsight b64 (ct tokens ×√640)", run_ours(model, nn, 64, token_scale=640**0.5)),
          flush=True)


SCALE = {10: (40, None), 30: (120, None), 60: (240, None), 500: (2000, 32), 2000: (4000, 16)}  # tokens: (active, cap)


def part_scale(sizes: list[int]) -> None:
    from cltrace.attribution import attribute
    from cltrace.models.registry import load_model
    from cltrace.replacement import random_transcoder

    model = load_model("gemma-3-270m")
    words = ("The history of basketball begins in 1891 when James Naismith , a teacher in Springfield , "
             "invented a game for his students that would keep them active indoors during the winter . ").split()
    print("| prompt tokens | active features | feature rows kept | batch | attribution s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        active, cap = SCALE[n]
        text = " ".join(words * (n // len(words) + 2))
        ids = model.tokenize(text)[: n]
        tc = random_transcoder(model, "clt", 2048, active, ids=ids)
        with Peak() as pk:
            t = time.perf_counter()
            g = attribute(model, tc, ids, max_feature_nodes=cap, batch_size=64)
            sec = time.perf_counter() - t
        print(f"| {n} | {g.meta['n_active_features']} | {g.n_features} | {g.meta['batch_size']} | {sec:.1f} | "
              f"{pk.peak / 2**20:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["tiny", "gemma", "scale"], required=True)
    ap.add_argument("--reuse-ct", action="store_true", help="reuse circuit-tracer runs already on disk")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (1: on a shared 2-core machine, 2 threads thrash)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SCALE), choices=list(SCALE),
                    help="--part scale: prompt lengths to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)
    parts = {"tiny": lambda: part_tiny(args.reuse_ct), "gemma": lambda: part_gemma(args.reuse_ct),
             "scale": lambda: part_scale(args.sizes)}
    parts[args.part]()


if __name__ == "__main__":
    main()
