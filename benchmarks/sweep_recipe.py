"""The recipe sweep of docs/training.md: short `cltrace train` runs that differ in one lever each, every one
evaluated with `cltrace eval` on held-out text; prints a markdown table with the command of each row.

    # at a fixed token budget (quality that does not depend on how busy the machine is): every row trains on
    # the same activation cache, written once, for the same number of tokens
    .venv/bin/python benchmarks/sweep_recipe.py --work runs/sweep/fixed --cache-tokens 65536 --tokens 262144 \
        --rows base,k32,k64,topk,jumprelu,lr1e-3,lr4e-3,b512,b2048,auxk0,auxk1/8,F1024,bf16 --parallel 2
    # at a fixed time budget (what `cltrace train --minutes M` plans on this machine)
    .venv/bin/python benchmarks/sweep_recipe.py --work runs/sweep/phase1 --minutes 4 --rows p1,p4,p8

A row name is one lever of ROWS, or several joined by "+" (`k64+auxk1/8`). Every row starts from the recipe
(training/recipe.py), which `cltrace train` takes as its defaults. Rows run under `nice -n 19` with
`--threads` torch threads each, `--parallel` at a time, each a fresh `cltrace` process. A row whose result is
in WORK/results.jsonl is not run again, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLTRACE = str(Path(sys.executable).with_name("cltrace"))
MODEL = "gemma-3-270m"
# every row starts from the recipe of the first sweep (training/recipe.py at commit f065cd3), written out so that
# a row means the same after recipe.py changes; the named flags and --set of a lever come later and win
BASE = ["--model", MODEL, "--kind", "clt", "-F", "512", "--activation", "batchtopk", "--k", "16", "--lr", "2e-3",
        "--batch-size", "1024", "--set", "auxk=0.03125", "--set", "dead_tokens=16384", "--set", "warmup=0.02",
        "--set", "sparse_decode=always"]  # same result as auto (tested), 3-5x faster on a CPU when k/F > 5%
# name -> the lever it moves (arguments added to BASE)
ROWS: dict[str, list[str]] = {
    "base": [],
    "recipe": [],  # training/recipe.py as it is now (see lever())
    # time-budget rows (--minutes): passes over one cached sample
    "p1": ["--passes", "1"],
    "p2": ["--passes", "2"],
    "p4": ["--passes", "4"],
    "p8": ["--passes", "8"],
    "p16": ["--passes", "16"],
    # sparsity: k (= L0 per token and layer for TopK/BatchTopK)
    "k8": ["--k", "8"],
    "k16": ["--k", "16"],
    "k32": ["--k", "32"],
    "k64": ["--k", "64"],
    "k128": ["--k", "128"],
    # activation
    "topk": ["--activation", "topk"],
    "jumprelu": ["--activation", "jumprelu"],
    "relu": ["--activation", "relu"],
    # optimizer
    "lr1e-3": ["--lr", "1e-3"],
    "lr4e-3": ["--lr", "4e-3"],
    "lr8e-3": ["--lr", "8e-3"],
    "b512": ["--batch-size", "512"],
    "b2048": ["--batch-size", "2048"],
    "b256": ["--batch-size", "256"],
    # dead features
    "auxk0": ["--set", "auxk=0"],
    "auxk1/8": ["--set", "auxk=0.125"],
    "auxk1/2": ["--set", "auxk=0.5"],
    "dead4k": ["--set", "dead_tokens=4096"],
    "resample": ["--set", "resample_every=20"],
    # architecture and capacity
    "plt": ["--kind", "plt"],
    "F256": ["-F", "256"],
    "F1024": ["-F", "1024"],
    "F2048": ["-F", "2048"],
    # initialization
    "zerodec": ["--set", "init=zero_decoder"],
    # numerics
    "bf16": ["--precision", "bf16"],
    "noauxk": ["--set", "auxk=0"],  # the name of the first sweep
}
METRICS = ("nmse", "explained_variance", "l0", "dead_fraction", "top1_agreement", "last_top1_agreement",
           "ce_increase", "kl", "n_tokens", "n_contexts")


def lever(name: str) -> list[str]:
    """The arguments of a row: its levers' arguments in order ("k64+auxk1/8"); "recipe" is the recipe of
    training/recipe.py now, as flags."""
    out = []
    for part in name.split("+"):
        if part == "recipe":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
            from cltrace.training.recipe import RECIPE

            named = {"activation": "--activation", "k": "--k", "lr": "--lr", "batch_size": "--batch-size",
                     "precision": "--precision"}  # a named flag of BASE would win over a --set
            for key, v in RECIPE.items():
                out += [named[key], str(v)] if key in named else ["--set", f"{key}={v}"]
        else:
            out += ROWS[part]
    return out


def budget_args(args) -> list[str]:
    if args.minutes:
        return ["--minutes", str(args.minutes)]
    return ["--cache", str(Path(args.work) / "cache"), "--tokens", str(args.tokens)]


def run_row(name: str, args) -> dict:
    out = Path(args.work) / name.replace("/", "_")
    train = [CLTRACE, "-q", "train", *BASE, *budget_args(args), *args.common, *lever(name), "--out", str(out)]
    evaluate = [CLTRACE, "eval", str(out), "--tokens", str(args.eval_tokens), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t = time.monotonic()
    if not (out / "transcoder.safetensors").exists():
        subprocess.run(["nice", "-n", "19", *train, *(["--resume"] if out.exists() else [])], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t
    res = json.loads(subprocess.run(["nice", "-n", "19", *evaluate], check=True, env=env, capture_output=True,
                                    text=True).stdout)
    import yaml

    cfg = yaml.safe_load((out / "train_config.yaml").read_text())
    plan = cfg["extra"].get("plan") or {}
    return {"name": name, "train_cmd": shlex.join(["cltrace", *train[1:]]), "wall_s": round(wall, 1),
            "tokens": cfg["tokens"], "collected": plan.get("collect_tokens", args.cache_tokens),
            "passes": plan.get("passes", cfg["tokens"] / max(1, args.cache_tokens)), "batch": cfg["batch_size"],
            "steps": plan.get("steps", cfg["tokens"] // cfg["batch_size"]), "rates": plan.get("rates"),
            **{k: res.get(k) for k in METRICS}}


def table(rows: list[dict]) -> str:
    head = ("| row | lever | train s | steps × batch | NMSE | EV | L0 | dead | top-1 | last top-1 | CE+ | KL |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lev = " ".join(lever(r["name"])) or "(recipe)"
        lines.append(f"| {r['name']} | `{lev}` | {r['wall_s']:.0f} | {r['steps']} × {r['batch']} | {r['nmse']:.3f} | "
                     f"{r['explained_variance']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['last_top1_agreement']:.3f} | {r['ce_increase']:.2f} | "
                     f"{r['kl']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/sweep/fixed")
    ap.add_argument("--minutes", type=float, default=0.0, help="a time budget per row (default: a token budget)")
    ap.add_argument("--tokens", type=int, default=262_144, help="training tokens per row (token budget)")
    ap.add_argument("--cache-tokens", type=int, default=65_536,
                    help="tokens in WORK/cache, written once and read by every row (token budget)")
    ap.add_argument("--rows", default="base,k32,k64,topk,jumprelu,lr1e-3,lr4e-3,b512,b2048,auxk0,auxk1/8,F1024,bf16",
                    help="comma-separated row names, run in this order")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per row")
    ap.add_argument("--parallel", type=int, default=1, help="rows run at a time")
    ap.add_argument("--common", nargs="*", default=[], help="arguments added to every row's train command")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.minutes and not (work / "cache" / "manifest.json").exists():
        cache = [CLTRACE, "-q", "cache", "--model", MODEL, "--tokens", str(args.cache_tokens),
                 "--out", str(work / "cache")]
        subprocess.run(["nice", "-n", "19", *cache], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads * args.parallel)})
    results = work / "results.jsonl"
    lines = results.read_text().splitlines() if results.exists() else []
    done = {json.loads(ln)["name"]: json.loads(ln) for ln in lines}
    todo = [n for n in args.rows.split(",") if n not in done]
    for n in todo:
        lever(n)  # an unknown lever fails before anything runs

    def one(name: str) -> None:
        print(f"running {name}", flush=True)
        row = run_row(name, args)
        done[name] = row
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-1], flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, todo))
    print(table([done[n] for n in args.rows.split(",") if n in done]))


if __name__ == "__main__":
    main()
