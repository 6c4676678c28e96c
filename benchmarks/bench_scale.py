"""Attribution at scale on Gemma-3-270M: long prompts in small memory, and transcoders larger than memory.

    .venv/bin/python benchmarks/bench_scale.py --part prompt   # 88 tokens, runs/demo/clt, --max-features 7500
    .venv/bin/python benchmarks/bench_scale.py --part curve    # seconds, peak RSS, graph file over prompt lengths
    .venv/bin/python benchmarks/bench_scale.py --part dict --sizes-gb 1 4 12 26   # synthetic CLTs on disk

prompt / curve: attribution time beside the FLOPs of its row passes (counted with torch's FlopCounterMode around
each batch: the batch's frozen forward, its batched backward and the row products) and this CPU's float32
matmul rate measured in the same process, so the achieved GFLOP/s can be read against the machine's.
dict: synthetic CLTs in circuit-tracer's folder format (so both tools read the same files), written in chunks,
with a fixed set of features planted to fire (K per layer, spread over the dictionary: b_enc = 10, θ = 0; every
other feature has θ = 1e6 and never fires), attributed on a fixed 7-token prompt. Ours loads them lazily (and
eagerly where they fit in memory); circuit-tracer (`benchmarks/ct_attribute.py`, its venv in /tmp/ct-venv)
with its lazy decoder. The files are deleted after each size, also on failure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
from peak import Peak  # benchmarks/peak.py (the script's folder is on sys.path)

from cltrace.runtime import tune_cpu_memory

tune_cpu_memory()  # the CLI's CPU memory settings, before the first large allocation

HERE = Path(__file__).parent
CT_PY = "/tmp/ct-venv/bin/python"
PARAGRAPH = (
    "The history of basketball begins in 1891, when James Naismith, a physical education teacher in Springfield, "
    "Massachusetts, invented a game to keep his students active indoors during the long New England winter. He "
    "nailed two peach baskets to the balcony of the gym and wrote thirteen basic rules. The first game ended with "
    "a score of one to nothing, and within a few years the sport had spread to colleges across the country, where "
    "students formed teams, built courts and argued about the rules. By the time the first professional league "
    "was founded, the baskets had become iron hoops with nets, the ball had grown larger and lighter, and players "
    "had learned to dribble, pass and shoot from far away. Today millions of people play the game in parks, "
    "schools and arenas on every continent, and the best players are famous around the world. "
)


def matmul_gflops(seconds: float = 2.0, n: int = 2048) -> float:
    """This CPU's float32 matmul rate with the current torch threads: [n, n] @ [n, n], best of repeated runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


class CountFlops:
    """Count the FLOPs of every RowComputer batch (forward, batched backward, row products) while active."""

    def __init__(self):
        from cltrace.attribution import engine

        self.engine, self.flops, self.seconds = engine, 0, 0.0

    def __enter__(self):
        from torch.utils.flop_counter import FlopCounterMode

        orig = self.orig = self.engine.RowComputer.__call__

        def counted(rc, seeds):
            t = time.perf_counter()
            with FlopCounterMode(display=False) as fc:
                out = orig(rc, seeds)
            self.flops += fc.get_total_flops()
            self.seconds += time.perf_counter() - t
            return out

        self.engine.RowComputer.__call__ = counted
        return self

    def __exit__(self, *exc):
        self.engine.RowComputer.__call__ = self.orig


def prompt_ids(model, n: int) -> torch.Tensor:
    ids = model.tokenize(PARAGRAPH * (n // 150 + 1))
    if ids.numel() < n:
        raise SystemExit(f"the paragraph gives {ids.numel()} tokens, fewer than {n}")
    return ids[:n]


def measure(model, tc, ids, cap: int | None, batch: int, graph_path: Path) -> dict:
    from cltrace.attribution import attribute

    with CountFlops() as fl, Peak() as pk:
        t = time.perf_counter()
        g = attribute(model, tc, ids, max_feature_nodes=cap, batch_size=batch)
        sec = time.perf_counter() - t
    path = g.save(graph_path)
    s = g.meta["seconds"]
    return {"tokens": int(ids.numel()), "active": g.meta["n_active_features"], "rows": g.n_features,
            "seconds": sec, "row_seconds": fl.seconds, "phases": s, "peak_mib": pk.peak / 2**20,
            "gflop": fl.flops / 1e9, "gflops_rate": fl.flops / 1e9 / fl.seconds, "file_mb": path.stat().st_size / 1e6,
            "batch": g.meta["batch_size"]}


def row_line(r: dict, rate: float) -> str:
    return (f"| {r['tokens']} | {r['active']:,} | {r['rows']:,} | {r['seconds']:.1f} | {r['row_seconds']:.1f} | "
            f"{r['gflop']:,.0f} | {r['gflops_rate']:.1f} ({r['gflops_rate'] / rate:.2f}) | {r['peak_mib']:,.0f} | "
            f"{r['file_mb']:.1f} |")


HEADER = ("| tokens | active features | feature rows | attribution s | in row batches s | row-batch GFLOP | "
          "achieved GFLOP/s (÷ matmul) | peak RSS MiB | graph file MB |\n|---|---|---|---|---|---|---|---|---|")


def part_prompt(args) -> None:
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder

    model = load_model("gemma-3-270m")
    tc = load_transcoder(args.transcoders)
    rate = matmul_gflops()
    print(f"matmul float32 [2048]^2, {torch.get_num_threads()} thread(s): {rate:.1f} GFLOP/s")
    print(HEADER)
    r = measure(model, tc, prompt_ids(model, args.tokens), args.max_features, args.batch_size,
                Path("/tmp/bench_scale_prompt.cltrace"))
    print(row_line(r, rate))
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()))


def ct_run(model_dir: str, tc_dir: Path, ids: torch.Tensor, cap: int | None, out: Path, timeout: float) -> dict:
    """circuit-tracer on the same folder and ids; {"error": ...} when it fails or runs past `timeout`."""
    cmd = [CT_PY, str(HERE / "ct_attribute.py"), model_dir, str(tc_dir), str(out / "ct.json"),
           "--ids", ",".join(map(str, ids.tolist())), "--threads", str(torch.get_num_threads()),
           "--graph", str(out / "ct_graph.pt")]
    if cap:
        cmd += ["--max-feature-nodes", str(cap)]
    out.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished in {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads((out / "ct.json").read_text())


def part_curve(args) -> None:
    from bench_attribution import ensure_gemma_folder

    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder

    model = load_model("gemma-3-270m")
    tc = load_transcoder(args.transcoders)
    rate = matmul_gflops()
    print(f"matmul float32 [2048]^2, {torch.get_num_threads()} thread(s): {rate:.1f} GFLOP/s; "
          f"feature rows capped at {args.max_features}")
    print(HEADER)
    ct_dir = Path("/tmp/bench_scale_ct/clt")
    if args.ct_tokens:
        from cltrace.transcoders.circuit_tracer_format import export_circuit_tracer

        export_circuit_tracer(tc, ct_dir)
        cfg = (ct_dir / "config.yaml").read_text().replace("mlp.hook_in", "ln2.hook_normalized")
        (ct_dir / "config.yaml").write_text(cfg)  # TransformerLens's name of Gemma's normalized MLP input
    ct_rows = []
    for n in args.tokens_list:
        ids = prompt_ids(model, n)
        r = measure(model, tc, ids, args.max_features, args.batch_size, Path(f"/tmp/bench_scale_{n}.cltrace"))
        print(row_line(r, rate))
        if n in args.ct_tokens:
            c = ct_run(ensure_gemma_folder(), ct_dir, ids, args.max_features, Path(f"/tmp/bench_scale_ct/{n}"),
                       args.ct_timeout)
            ct_rows.append((n, r, c))
    if ct_rows:
        print("\n| tokens | ours s / ct s | ours peak / ct peak MiB | ours file / ct file MB | ct active, rows |")
        print("|---|---|---|---|---|")
        for n, r, c in ct_rows:
            if "error" in c:
                print(f"| {n} | {r['seconds']:.1f} / - | {r['peak_mib']:,.0f} / - | {r['file_mb']:.1f} / - | "
                      f"circuit-tracer: {c['error']} |")
                continue
            print(f"| {n} | {r['seconds']:.1f} / {c['seconds']:.1f} = {r['seconds'] / c['seconds']:.2f} | "
                  f"{r['peak_mib']:,.0f} / {c['peak_mib']:,.0f} | {r['file_mb']:.1f} / {c['graph_bytes'] / 1e6:.1f} "
                  f"| {c['n_active']:,}, {c['n_selected']:,} |")


# ---------------------------------------------------------------------------------------------- synthetic CLTs
def write_tensor_file(path: Path, name: str, shape: tuple[int, ...], fill) -> None:
    """One float32 tensor as a safetensors file, written in chunks of first-dim rows: fill(lo, hi) -> rows."""
    nbytes = math.prod(shape) * 4
    header = json.dumps({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    row = math.prod(shape[1:])
    step = max(1, 2**24 // row)  # 64 MB chunks
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for lo in range(0, shape[0], step):
            hi = min(lo + step, shape[0])
            f.write(fill(lo, hi).contiguous().numpy().tobytes())


def write_synthetic_clt(folder: Path, L: int, D: int, F: int, planted: torch.Tensor) -> None:
    """circuit-tracer CLT folder: random weights from a 64 MB pool; `planted` [K] features fire everywhere."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2**24, generator=g) / math.sqrt(D)

    def chunk(lo: int, hi: int, row: int, salt: int) -> torch.Tensor:
        start = (lo * row * 7919 + salt * 104729) % (pool.numel() - (hi - lo) * row)
        return pool[start:start + (hi - lo) * row].view(hi - lo, row)

    for i in range(L):
        W_enc = torch.cat([chunk(lo, min(lo + 8192, F), D, i) for lo in range(0, F, 8192)])  # [F, D]
        W_enc[planted] *= 1e-3
        b_enc, theta = torch.zeros(F), torch.full((F,), 1e6)
        b_enc[planted], theta[planted] = 10.0, 0.0
        save_file({f"W_enc_{i}": W_enc, f"b_enc_{i}": b_enc, f"b_dec_{i}": torch.zeros(D), f"threshold_{i}": theta},
                  str(folder / f"W_enc_{i}.safetensors"))
        n = L - i
        write_tensor_file(folder / f"W_dec_{i}.safetensors", f"W_dec_{i}", (F, n, D),
                          lambda lo, hi, n=n, i=i: chunk(lo, hi, n * D, 100 + i).view(hi - lo, n, D))
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
        f"model_name: gemma-3-270m\nscan: synthetic-{F}\n")


DICT_PROMPT = "Fact: Michael Jordan plays the sport of"


def part_dict_one(args) -> None:
    """One measurement in a fresh process (a process keeps the memory it once held: see runtime.keep_freed_memory):
    load --folder lazily or eagerly, attribute the fixed prompt, print a JSON line."""
    from cltrace.attribution import attribute
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder

    model = load_model("gemma-3-270m")
    ids = model.tokenize(DICT_PROMPT)
    with Peak() as pk:
        t = time.perf_counter()
        tc = load_transcoder(args.folder, lazy=args.mode == "lazy")
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        g = attribute(model, tc, ids)
        sec = time.perf_counter() - t
    read = (tc.store.encoder_bytes + tc.store.decoder_bytes) / 1e6 if tc.lazy else None
    torch.save(g.edges, Path(args.folder) / f"edges-{args.mode}.pt")
    print(json.dumps({"load_s": t_load, "seconds": sec, "peak_mib": pk.peak / 2**20, "read_mb": read,
                      "active": g.meta["n_active_features"], "tokens": int(ids.numel())}))


def one(folder: Path, mode: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--part", "dict-one", "--folder", str(folder), "--mode", mode,
                        "--threads", str(torch.get_num_threads())], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def part_dict(args) -> None:
    from bench_attribution import ensure_gemma_folder

    from cltrace.models.registry import load_model

    model = load_model("gemma-3-270m")
    L, D = model.n_layers, model.d_model
    ids = model.tokenize(DICT_PROMPT)
    del model
    per_feature = (L * D + L * (L + 1) // 2 * D) * 4  # encoder column + decoder row bytes
    root = Path(args.scratch)
    print(f"prompt: {ids.numel()} tokens; {args.planted} features per layer planted to fire at every position; "
          f"bytes per feature {per_feature:,}; each measurement in a fresh process")
    print("| file GB | features/layer | active | lazy: load s | lazy: attribution s | lazy: peak RSS MiB | "
          "lazy: read from disk MB | eager: load + attribution s / peak MiB | circuit-tracer s / peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for gb in args.sizes_gb:
        F = int(gb * 1e9 / per_feature)
        folder = root / f"clt-{gb}gb"
        try:
            if shutil.disk_usage(root.parent).free - gb * 1e9 < 10e9:
                print(f"| {gb} | skipped: writing it would leave under 10 GB free on the disk |")
                continue
            planted = torch.linspace(0, F - 1, args.planted).round().long()
            t = time.perf_counter()
            write_synthetic_clt(folder, L, D, F, planted)
            size = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
            print(f"(wrote {size:.1f} GB in {time.perf_counter() - t:.0f} s)", file=sys.stderr)
            lz = one(folder, "lazy")
            if "error" in lz:
                print(f"| {size:.1f} | {F:,} | lazy failed: {lz['error']} |")
                continue
            eager = "not run"
            if size < args.eager_below_gb:
                ea = one(folder, "eager")
                same = torch.equal(torch.load(folder / "edges-lazy.pt"), torch.load(folder / "edges-eager.pt"))
                eager = (f"failed: {ea['error']}" if "error" in ea else
                         f"{ea['load_s'] + ea['seconds']:.1f} / {ea['peak_mib']:,.0f} (edges equal: {same})")
            run_ct = args.ct and size <= args.ct_max_gb
            c = ct_run(ensure_gemma_folder(), folder, ids, None, root / "ct", args.ct_timeout) if run_ct else None
            ct = "not run" if c is None else (f"fails: {c['error']}" if "error" in c else
                                              f"{c['seconds']:.1f} (load {c['load_s']:.0f}) / {c['peak_mib']:,.0f}")
            print(f"| {size:.1f} | {F:,} | {lz['active']:,} | {lz['load_s']:.1f} | {lz['seconds']:.1f} | "
                  f"{lz['peak_mib']:,.0f} | {lz['read_mb']:,.0f} | {eager} | {ct} |", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(root / "ct", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["prompt", "curve", "dict", "dict-one"], required=True)
    ap.add_argument("--folder", help="--part dict-one: the transcoder folder")
    ap.add_argument("--mode", choices=["lazy", "eager"], default="lazy", help="--part dict-one")
    ap.add_argument("-t", "--transcoders", default="runs/demo/clt")
    ap.add_argument("--tokens", type=int, default=88, help="--part prompt: prompt length (BOS included)")
    ap.add_argument("--tokens-list", type=int, nargs="+", default=[10, 30, 60, 120, 250, 500])
    ap.add_argument("--max-features", type=int, default=7500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ct-tokens", type=int, nargs="*", default=[], help="--part curve: lengths to run ct at")
    ap.add_argument("--ct-timeout", type=float, default=600)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1, 4, 12, 26])
    ap.add_argument("--planted", type=int, default=10, help="--part dict: features per layer that fire")
    ap.add_argument("--eager-below-gb", type=float, default=5, help="--part dict: also load eagerly below this")
    ap.add_argument("--ct", action="store_true", help="--part dict: circuit-tracer on each size too")
    ap.add_argument("--ct-max-gb", type=float, default=5,
                    help="--part dict: no circuit-tracer above this size (its TransformerLens load alone peaks at "
                         "~8 GB and it holds every encoder: on a shared machine that risks the OOM killer)")
    ap.add_argument("--scratch", default="/work/main/runs/bench-scale", help="--part dict: where the files go")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)
    {"prompt": part_prompt, "curve": part_curve, "dict": part_dict, "dict-one": part_dict_one}[args.part](args)


if __name__ == "__main__":
    main()
