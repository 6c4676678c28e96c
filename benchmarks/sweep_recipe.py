"""The recipe sweep of docs/training.md: short `cltrace train --minutes M` runs that differ in one lever each,
every one evaluated with `cltrace eval` on held-out text; prints a markdown table with the command of each row.

    .venv/bin/python benchmarks/sweep_recipe.py --work runs/sweep --minutes 4 [--rows base,p4,...] [--eval-tokens 2048]

One run at a time, each a fresh `cltrace` process (its own model load, its own measurement of the machine).
A row whose result is in WORK/results.jsonl is not run again, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

CLTRACE = str(Path(sys.executable).with_name("cltrace"))
BASE = ["--model", "gemma-3-270m", "--kind", "clt", "-F", "512"]
# name -> the lever it moves (arguments added to the base command, which takes the recipe of training/recipe.py)
ROWS: dict[str, list[str]] = {
    "p1": ["--passes", "1"],
    "p4": ["--passes", "4"],
    "p8": ["--passes", "8"],
    "p16": ["--passes", "16"],
    "lr4e-3": ["--lr", "4e-3"],
    "lr1e-3": ["--lr", "1e-3"],
    "b512": ["--batch-size", "512"],
    "b2048": ["--batch-size", "2048"],
    "resample": ["--set", "resample_every=20"],
    "noauxk": ["--set", "auxk=0"],
    "k32": ["--k", "32"],
    "F1024": ["-F", "1024"],
}


def run_row(name: str, extra: list[str], args) -> dict:
    out = Path(args.work) / name
    train = [CLTRACE, "-q", "train", *BASE, "--minutes", str(args.minutes), *args.common, *extra, "--out", str(out)]
    evaluate = [CLTRACE, "eval", str(out), "--tokens", str(args.eval_tokens), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t = time.monotonic()
    subprocess.run(["nice", "-n", "19", *train], check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t
    res = json.loads(subprocess.run(["nice", "-n", "19", *evaluate], check=True, env=env, capture_output=True,
                                    text=True).stdout)
    import yaml

    cfg = yaml.safe_load((out / "train_config.yaml").read_text())
    plan = cfg["extra"]["plan"]
    return {"name": name, "train_cmd": shlex.join(["cltrace", *train[1:]]), "wall_s": round(wall, 1),
            "tokens": cfg["tokens"], "collected": plan["collect_tokens"], "passes": plan["passes"],
            "batch": cfg["batch_size"], "steps": plan["steps"], "rates": plan["rates"],
            **{k: res[k] for k in ("nmse", "explained_variance", "l0", "dead_fraction", "top1_agreement",
                                   "ce_increase", "kl", "n_tokens")}}


def table(rows: list[dict]) -> str:
    head = ("| row | lever | wall s | collected | passes | steps × batch | NMSE | L0 | dead | top-1 | CE+ |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lever = " ".join(ROWS.get(r["name"], [])) or "(recipe)"
        lines.append(f"| {r['name']} | `{lever}` | {r['wall_s']:.0f} | {r['collected']:,} | {r['passes']:.1f} | "
                     f"{r['steps']} × {r['batch']} | {r['nmse']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['ce_increase']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/sweep")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names, run in this order")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--common", nargs="*", default=[], help="arguments added to every row's train command")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    lines = results.read_text().splitlines() if results.exists() else []
    done = {json.loads(ln)["name"]: json.loads(ln) for ln in lines}
    for name in args.rows.split(","):
        if name in done:
            continue
        print(f"running {name}", flush=True)
        row = run_row(name, ROWS[name], args)
        done[name] = row
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-1], flush=True)
    print(table([done[n] for n in args.rows.split(",") if n in done]))


if __name__ == "__main__":
    main()
