"""`cltrace features build` on 1 process against 2 gloo processes (torchrun) on this machine's CPU.

    flock /tmp/cltrace-measure.lock nice -n -19 .venv/bin/python benchmarks/bench_distributed_passes.py \
        [--tokens 32768] [--transcoders runs/demo/clt] [--model gemma-3-270m]

Three runs of the same build (corpus: the small built-in one, context_len 128, batch 16, no checkpoints):
one process with 2 threads, one process with 1 thread, and `torchrun --nproc-per-node 2` with 1 thread per
process (each process loads the model and transcoders; batch b goes to rank b mod 2). Each worker times its
phases: load (model + transcoders), pass (first batch to the last batch's `on_batch`, the slowest rank),
finish (the merge into rank 0, output/input effects, the database write) and the whole call. Prints a
markdown table with each run's ratio to the 1-process-1-thread run, and whether the 2-process database
equals the 1-process-1-thread one table by table (the `built_at` time aside).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch.distributed as dist

    from cltrace.features import build_features
    from cltrace.models.registry import load_model
    from cltrace.training.distributed import init_distributed, shutdown
    from cltrace.transcoders.io import load_transcoder

    d = init_distributed(device="cpu")
    t0 = time.perf_counter()
    tc = load_transcoder(args.transcoders)
    model = load_model(args.model or tc.cfg.model_name)
    d.barrier()
    t1 = time.perf_counter()
    last = [t1]
    out = build_features(model, tc, n_tokens=args.tokens, context_len=128, batch_size=16, out=args.out,
                         checkpoint_every=0, progress=False, log=lambda m: None, dist=d,
                         on_batch=lambda b: last.__setitem__(0, time.perf_counter()))
    t2 = time.perf_counter()
    times = {"load": t1 - t0, "pass": last[0] - t1, "finish": t2 - last[0], "build": t2 - t1}
    if d.distributed:
        box = [None] * d.world
        dist.all_gather_object(box, times)
        times = {k: max(t[k] for t in box) if k == "pass" else times[k] for k in times}
    if d.is_main:
        print(json.dumps({"out": str(out), **times}), flush=True)
    shutdown(d)


def main() -> None:
    from cltrace.features.db import database_contents

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--transcoders", default="runs/demo/clt")
    p.add_argument("--model", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    me = [sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--transcoders", args.transcoders] + \
        (["--model", args.model] if args.model else [])
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-port", "29517"]
    runs = [("1 process, 2 threads", "2", me), ("1 process, 1 thread", "1", me),
            ("2 processes (gloo), 1 thread each", "1", torchrun + me[1:])]
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for i, (name, threads, cmd) in enumerate(runs):
            db = Path(work) / f"run{i}.db"
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            t = time.perf_counter()
            res = subprocess.run(cmd + ["--out", str(db)], env=env, capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
            rows[name] = {**json.loads(res.stdout.strip().splitlines()[-1]), "command": time.perf_counter() - t}
            rows[name]["db"] = db
        ref = rows["1 process, 1 thread"]
        same = database_contents(rows["2 processes (gloo), 1 thread each"]["db"]) == database_contents(ref["db"])
    print(f"features build, {args.tokens} tokens, {args.transcoders}, CPU ({os.cpu_count()} cores)\n")
    print("| run | load s | pass s | pass ratio | merge + effects + write s | whole command s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['load']:.1f} | {r['pass']:.1f} | {r['pass'] / ref['pass']:.2f} | {r['finish']:.1f} | "
              f"{r['command']:.1f} | {r['command'] / ref['command']:.2f} |")
    print(f"\n2-process database equals the 1-process (1 thread) one, every table: {same}")


if __name__ == "__main__":
    main()
