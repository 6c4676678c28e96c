"""Distributed training on CPU with gloo: step time with 1 and 2 processes, and bytes exchanged per step.

    .venv/bin/python benchmarks/bench_distributed.py [--layers 4 --d-model 128 --features 2048 --batch 512]

Modes: `single` (1 process), `data` (2 processes, data parallel: each trains on half of every batch),
`features` (2 processes, feature sharded: each owns half of every layer's features). Each process runs the
real `Trainer.train_step` on random activations. Bytes are what each rank contributes to collectives per
step, counted by `Dist.comm_bytes` (an all-reduce of S bytes moves ~2·S·(W−1)/W per rank on a ring).
On a 2-core machine two processes share the cores: no speedup is expected, the numbers show the overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, mode: str, a: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(a["threads"])
    from cltrace.training import InMemoryActivations, TrainConfig, Trainer
    from cltrace.training.distributed import Dist, init_distributed, shutdown

    d = init_distributed(2 if mode == "features" else 1, "cpu") if world > 1 else Dist()
    L, D, F, B = a["layers"], a["d_model"], a["features"], a["batch"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * B, L, D, generator=g), torch.randn(4 * B, L, D, generator=g)
    cfg = TrainConfig(features_per_layer=F, activation=a["activation"], k=a["k"], batch_size=B, tokens=B * 1000,
                      out=tempfile.mkdtemp(), progress=False, device="cpu", norm_tokens=B)
    trainer = Trainer(cfg, InMemoryActivations(x, y), dist=d)
    trainer.initialize()
    batches = trainer.source.batches(B, seed=0)
    times = []
    for i in range(a["warmup"] + a["steps"]):
        if i == a["warmup"]:
            d.reset_comm()
        bx, by = next(batches)
        d.barrier()
        t = time.perf_counter()
        trainer.train_step(bx, by)
        times.append(time.perf_counter() - t)
    comm = {k: v / a["steps"] for k, v in d.comm_bytes.items()}
    n_params = sum(p.numel() for p in trainer.tc.parameters())
    res = {"mode": mode, "world": world, "rank": rank, "step_ms": 1000 * statistics.median(times[a["warmup"]:]),
           "comm_bytes_per_step": comm, "params_per_rank": n_params}
    with open(os.path.join(out, f"{mode}-{rank}.json"), "w") as f:
        json.dump(res, f)
    shutdown(d)


def run(mode: str, world: int, a: dict, out: str) -> dict:
    if world == 1:
        worker(0, 1, 0, mode, a, out)
    else:
        mp.start_processes(worker, args=(world, _free_port(), mode, a, out), nprocs=world, start_method="spawn")
    return json.load(open(os.path.join(out, f"{mode}-0.json")))


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n:.0f} B"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--activation", default="jumprelu")
    p.add_argument("--k", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    a = vars(p.parse_args())
    a["d_model"] = a.pop("d_model")
    out = tempfile.mkdtemp()
    rows = [run("single", 1, a, out), run("data", 2, a, out), run("features", 2, a, out)]
    L, D, F, B = a["layers"], a["d_model"], a["features"], a["batch"]
    print(f"CLT L={L} D={D} F={F}/layer, batch {B} tokens, {a['activation']}, gloo on CPU, "
          f"{a['threads']} thread(s) per process, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'mode':<10}{'procs':>6}{'step ms':>10}{'params/rank':>14}  bytes per step per rank (by collective)")
    for r in rows:
        comm = ", ".join(f"{k} {_size(v)}" for k, v in sorted(r["comm_bytes_per_step"].items())) or "-"
        print(f"{r['mode']:<10}{r['world']:>6}{r['step_ms']:>10.1f}{r['params_per_rank']:>14,}  {comm}")
    params = rows[0]["params_per_rank"]
    print(f"expected: data parallel grad = 4·P = {4 * params / 2**20:.2f} MiB; feature sharded partial_recon = "
          f"4·(B)·L·D = {4 * B * L * D / 2**20:.2f} MiB (B = the whole batch: every shard sees every row)")
    json.dump(rows, sys.stderr)
    print(file=sys.stderr)


if __name__ == "__main__":
    main()
