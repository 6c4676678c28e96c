"""Timings for a GPU machine, on a model of Gemma-3-270M's real size: forward, CLT training, attribution,
interventions.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out gpu.json            # GPU machine, a few minutes
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py --small --out /tmp/gpu_small.json   # CPU test run
    PYTHONPATH=src python3 benchmarks/gpu_check.py --parts bf16 --out bf16.json   # only bf16 vs fp32 attribution
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py --parts bf16 --device cpu --model gemma-3-270m \
        --transcoders runs/demo/clt --prompt "Michael Jordan plays the sport of" --out bf16_cpu.json

Correctness on the device is the test suite's: `pytest --device cuda -m "not slow"` runs the core tests (models,
transcoders, training, replacement, attribution, interventions) with everything on the GPU (tests/conftest.py).
This script only times, and its numbers are what docs/distributed.md reports.

Everything is built offline from configs with random weights, no network and no model files: a `Gemma3TextConfig`
with gemma-3-270m's hyper-parameters (hard-coded below, from the model's config.json) and the byte tokenizer of
`cltrace.models.tiny`; the text is the committed small corpus (data/corpus/small.jsonl.gz), read directly.

Parts (a table and JSON, each with its peak memory; CLT of 2048 features per layer, BatchTopK k=32):
  bare forward (`forward(ids, stop_at_layer=L)`, 32x128, fp32 and bf16; the reference of bench_training.py)
  CLT training steps from activations held on the device (batch 4096), fp32 and bf16 autocast
  CLT training end to end, streaming activations from the model
  attribution of a 64-token prompt with the fp32-trained CLT (capped at the most influential features, then
  uncapped when it fits the time left)
  attribution in bf16 against fp32 on the same prompt, model and random CLT (calibrated to ~k active features a
  token): the bf16 graph's edges against the fp32 graph's on the nodes both have, relative to the largest edge of
  the graph and of each row (`--parts bf16` runs only this check)
  interventions on the same prompt with a random CLT calibrated to ~k active features a token: the clean
  run, a constrained run (all layers live, then all held), a free run, first_order's autograd, the whole
  `intervene()` report, and an 8-token steered generation
A time guard skips the parts not started by --budget seconds after the start. --small shrinks the model and
every size (a quick CPU run of the script itself).

Exit status: 0, or 1 when a timing part raised (its traceback is in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# gemma-3-270m's config.json (~/.cache/cltrace/models/gemma-3-270m/config.json, transformers 5.24). The token
# ids are replaced by the byte tokenizer's (bos 256, eos 257, pad 258): the text is byte-tokenized here.
GEMMA_3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
    max_position_embeddings=32768, rms_norm_eps=9.999999974752427e-07, hidden_activation="gelu_pytorch_tanh",
    attn_logit_softcapping=None, final_logit_softcapping=None, attention_bias=False, attention_dropout=0.0,
    initializer_range=0.02, tie_word_embeddings=True, use_bidirectional_attention=False,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
)
GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
# --small: the same architecture, shrunk
GEMMA_SMALL = dict(GEMMA_3_270M, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                   head_dim=32, query_pre_attn_scalar=32, sliding_window=32,
                   layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(6)])


# ---------------------------------------------------------------------- recording
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


class Report:
    """Timing rows, skipped parts and errors, written to --out (JSON) after every part."""

    def __init__(self, args, dev: torch.device):
        self.args, self.dev = args, dev
        self.t0 = time.perf_counter()
        self.timings: list[dict] = []
        self.skipped: list[str] = []
        self.errors: list[dict] = []
        self.sections: dict[str, float] = {}
        self.env = environment(dev)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {"device": str(self.dev), "small": self.args.small, "elapsed_s": round(self.elapsed(), 1),
                "budget_s": self.args.budget, "env": self.env, "sections_s": self.sections, "timings": self.timings,
                "skipped": self.skipped, "errors": self.errors}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(data), indent=1))
        tmp.replace(out)


def environment(dev: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "torch_cuda": torch.version.cuda, "host": platform.node(), "threads": torch.get_num_threads(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the device machine is fine
        env["git_commit"] = None
    return env


# ---------------------------------------------------------------------- device helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def mem_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def mem_peak_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (not resettable)


def timed(fn, dev: torch.device, *, min_reps: int = 2, max_reps: int = 50, target_s: float = 3.0) -> tuple[float, int]:
    """(seconds per call, calls) after one warm-up call; synchronized around every call."""
    sync(dev)
    fn()
    sync(dev)
    n, t0 = 0, time.perf_counter()
    while n < min_reps or (n < max_reps and time.perf_counter() - t0 < target_s):
        fn()
        sync(dev)
        n += 1
    return (time.perf_counter() - t0) / n, n


# ---------------------------------------------------------------------- model and text
def gemma_model(dev: torch.device, small: bool):
    """A ModelAdapter over Gemma3ForCausalLM with gemma-3-270m's shape (or the --small one), random weights."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from cltrace.models.adapter import ModelAdapter
    from cltrace.models.tiny import byte_tokenizer

    kw = dict(GEMMA_SMALL if small else GEMMA_3_270M, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    try:
        cfg = Gemma3TextConfig(**kw, rope_parameters=GEMMA_ROPE)
    except TypeError:  # an older transformers without rope_parameters
        cfg = Gemma3TextConfig(**kw, rope_theta=1e6, rope_local_base_freq=1e4)
    torch.manual_seed(0)
    try:
        with torch.device(dev):  # initialize on the device: seconds instead of a CPU init of 268M parameters
            hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    except Exception:  # noqa: BLE001 - fall back to a CPU init
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    hf = hf.to(device=dev, dtype=torch.float32).eval()
    return ModelAdapter(hf, byte_tokenizer(), "gemma-3-270m-shape-random")


def corpus_docs(n: int = 400) -> list[str]:
    """Documents of the committed small corpus (read by path: `open_corpus` would look up a cache folder with
    platformdirs, which a bare GPU machine may lack); plain synthetic prose when the file is not there."""
    from cltrace.data.corpus import read_jsonl, repo_corpus_dir

    docs: list[str] = []
    path = repo_corpus_dir() / "small.jsonl.gz"
    if path.exists():
        for text in read_jsonl(path):
            if len(text) > 200:
                docs.append(text[:20000])
            if len(docs) >= n:
                break
    if len(docs) < 20:  # throughput does not depend on the text
        words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
        g = torch.Generator().manual_seed(0)
        docs = [" ".join(words[i] for i in torch.randint(0, len(words), (600,), generator=g).tolist())
                for _ in range(n)]
    return docs


def batch_ids(model, docs: list[str], n: int, T: int, start: int = 0) -> torch.Tensor:
    """[n, T] packed contexts of `docs` (BOS first), the ones training streams, on the model's device."""
    from cltrace.data import ContextStream

    return torch.tensor(ContextStream(docs, model.tokenizer, T).take(start + n)[start:], device=model.device)


def ascii_prompt(docs: list[str], T: int) -> str:
    """A prompt of T tokens under the byte tokenizer (BOS + T − 1 one-byte characters)."""
    text = " ".join(" ".join(docs[3:6]).split())
    return "".join(c for c in text if c.isascii() and c.isprintable())[: T - 1]


# ====================================================================== the timing parts
class Timings:
    """The timing parts, sharing one model; each part is skipped once the time guard has passed."""

    def __init__(self, rep: Report, dev: torch.device, work: Path, small: bool):
        self.rep, self.dev, self.work, self.small = rep, dev, work, small
        self.F = 256 if small else 2048
        self.k = 8 if small else 32
        self.batch = 512 if small else 4096
        self.fwd_shape = (4, 64) if small else (32, 128)
        self.prompt_T = 24 if small else 64
        self.attr_cap = 64 if small else 1024
        self.target_s = 1.0 if small else 3.0
        self.max_uncapped_s = 30.0 if small else 120.0  # the uncapped graph runs only if estimated below this
        self.fwd_ref: dict[str, float] = {}
        self.model = None
        self.docs = corpus_docs(400)
        self.prompt = ascii_prompt(self.docs, self.prompt_T)
        self.tc_attr = None  # the CLT trained a few steps in the fp32 part, for attribution

    def part(self, name: str, fn) -> None:
        if self.rep.left() <= 0:
            self.rep.skipped.append(name)
            print(f"SKIP  {name}: time guard ({self.rep.elapsed():.0f} s > budget {self.rep.args.budget:.0f} s)",
                  flush=True)
            self.rep.save()
            return
        t = time.perf_counter()
        mem_reset(self.dev)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the next part
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            self.rep.errors.append({"name": name, "error": f"{type(e).__name__}: {e}"[:500], "traceback": tb[-3000:]})
            print(f"ERROR {name}: {type(e).__name__}: {e}", flush=True)
        self.rep.sections[name] = round(time.perf_counter() - t, 2)
        self.rep.save()

    def row(self, name: str, tok_s: float | None, **extra) -> None:
        ratio = tok_s / self.fwd_ref["fp32"] if tok_s and self.fwd_ref.get("fp32") else None
        ratio16 = tok_s / self.fwd_ref["bf16"] if tok_s and self.fwd_ref.get("bf16") else None
        peak = mem_peak_gb(self.dev)
        self.rep.timings.append({"name": name, "tok_per_s": tok_s, "x_fwd_fp32": ratio, "x_fwd_bf16": ratio16,
                                 "peak_gb": peak, **extra})
        self.rep.save()
        r = f"{ratio:6.3f}" if ratio is not None else "     -"
        v = f"{tok_s:12.0f}" if tok_s else f"{'-':>12}"
        print(f"TIME  {name:<62} {v} tok/s  x fwd {r}  peak {peak:6.2f} GB  "
              + "  ".join(f"{k}={v}" for k, v in extra.items()), flush=True)

    # ------------------------------------------------------------------ model and forward
    def build(self) -> None:
        t = time.perf_counter()
        args = self.rep.args
        if args.model:  # a real model (bf16 check only): its own tokenizer, the given prompt
            from cltrace.models.registry import load_model

            self.model = load_model(args.model, device=self.dev)
            self.prompt = args.prompt or self.prompt
        else:
            self.model = gemma_model(self.dev, self.small)
        sync(self.dev)
        n_params = sum(p.numel() for p in self.model.hf.parameters())
        self.rep.env["timing_model"] = {"layers": self.model.n_layers, "d_model": self.model.d_model,
                                        "vocab": self.model.vocab_size, "params": n_params,
                                        "features_per_layer": self.F, "k": self.k, "batch_tokens": self.batch,
                                        "prompt_tokens": self.prompt_T}
        name = f"load {args.model}" if args.model else "build the gemma-size model (random weights)"
        self.row(name, None, seconds=round(time.perf_counter() - t, 2),
                 params_m=round(n_params / 1e6, 1))

    def forward(self, precision: str) -> None:
        m = self.model
        if precision == "bf16":  # a bf16 copy of the same weights (the fp32 model stays for the other parts)
            from cltrace.models.adapter import ModelAdapter

            m = ModelAdapter(copy.deepcopy(m.hf).to(torch.bfloat16), m.tokenizer, m.name + "-bf16")
        B, T = self.fwd_shape
        ids = batch_ids(m, self.docs, B, T)
        with torch.no_grad():
            s, n = timed(lambda: m.forward(ids, stop_at_layer=m.n_layers), self.dev, target_s=self.target_s)
        self.fwd_ref[precision] = ids.numel() / s
        self.row(f"bare forward {precision} (stop_at_layer, {B}x{T})", ids.numel() / s, ms=round(1e3 * s, 2),
                 reps=n)

    # ------------------------------------------------------------------ training
    def _source(self):
        from cltrace.data import StreamingActivations

        return StreamingActivations(self.model, self.docs, context_len=self.fwd_shape[1],
                                    buffer_tokens=2 * self.batch, model_batch=self.fwd_shape[0])

    def _trainer(self, precision: str, source):
        from cltrace.training import TrainConfig, Trainer

        cfg = TrainConfig(kind="clt", features_per_layer=self.F, activation="batchtopk", k=self.k,
                          batch_size=self.batch, tokens=self.batch * 1000, norm_tokens=self.batch,
                          precision=precision, device=str(self.dev), progress=False, checkpoint_every=0,
                          out=str(self.work / f"timing-{precision}"))
        tr = Trainer(cfg, source, model_name=self.model.name)
        tr.initialize()
        return tr

    def train_step(self, precision: str) -> None:
        """Steps on rows already on the device: the trainer's own cost, without the model or the source."""
        src = self._source()
        batches = src.batches(self.batch, seed=0)
        rows = [tuple(t.clone() for t in next(batches)) for _ in range(4)]  # the buffer is refilled in place
        batches.close()
        tr = self._trainer(precision, src)
        i = iter(range(10**9))

        def step():
            return tr.train_step(*rows[next(i) % len(rows)])

        t = time.perf_counter()
        step()  # the first step allocates the optimizer state
        sync(self.dev)
        first = time.perf_counter() - t
        s, reps = timed(step, self.dev, min_reps=3, max_reps=40, target_s=self.target_s)
        last = step()
        B = self.batch
        self.row(f"CLT F={self.F} k={self.k} train step, {precision}, rows on the device (batch {B})", B / s,
                 ms=round(1e3 * s, 1), reps=reps, first_step_s=round(first, 2), loss=round(last["loss"], 4),
                 l0=round(float(last["l0_layers"].float().mean()), 1),
                 params_m=round(sum(p.numel() for p in tr.params) / 1e6, 1))
        if precision == "fp32" and self.tc_attr is None:  # the trained CLT folded, as `finalize` (minus the file)
            from cltrace.transcoders.transcoder import Transcoder

            tc = Transcoder.from_state_dict(tr.tc.cfg, tr.tc.state_dict(), device=self.dev)
            tc.fold_normalization(tr.x_scale, tr.y_scale)
            self.tc_attr = tc.eval()

    def end_to_end(self) -> None:
        src = self._source()
        tr = self._trainer("fp32", src)
        batches = src.batches(self.batch, seed=0)
        tr.train_step(*next(batches))
        sync(self.dev)
        tok0 = src.model_tokens
        s, reps = timed(lambda: tr.train_step(*next(batches)), self.dev, min_reps=3, max_reps=30,
                        target_s=2 * self.target_s)
        B = self.batch
        self.row(f"CLT F={self.F} end to end, streaming from the model (batch {B})", B / s, ms=round(1e3 * s, 1),
                 reps=reps, model_tokens_per_step=round((src.model_tokens - tok0) / (reps + 1)))

    # ------------------------------------------------------------------ attribution
    def attribution(self) -> None:
        from cltrace.attribution import attribute

        m, tc = self.model, self.tc_attr
        if tc is None:
            raise RuntimeError("no CLT: the fp32 training part did not run")
        ids = m.tokenize(self.prompt)
        T = ids.numel()
        with torch.no_grad():
            fwd_s, _ = timed(lambda: m.forward(ids), self.dev, min_reps=3, max_reps=20, target_s=1.0)
        self.row(f"bare forward of the {T}-token prompt (batch 1, logits)", T / fwd_s, ms=round(1e3 * fwd_s, 2))
        attribute(m, tc, ids[: min(T, 8)], max_feature_nodes=16, batch_size=16)  # warm-up
        sync(self.dev)

        def run(cap):
            mem_reset(self.dev)
            t = time.perf_counter()
            g = attribute(m, tc, ids, max_feature_nodes=cap)
            sync(self.dev)
            secs = time.perf_counter() - t
            name = f"attribution, {T} tokens, " + (f"top {cap} features" if cap else "all features")
            self.row(name, None, seconds=round(secs, 2), x_prompt_forward=round(secs / fwd_s),
                     n_active_features=g.meta["n_active_features"], feature_nodes=g.n_features, nodes=g.n_nodes,
                     rows=int(g.edges.shape[0]), edges_nonzero=int((g.edges != 0).sum()),
                     batches=g.meta["n_feature_batches"], batch_size=g.meta["batch_size"],
                     max_logit_error=float(g.meta["max_logit_error"]),
                     phases_s={k: round(v, 2) for k, v in g.meta["seconds"].items()}, tc_dtype=str(tc.W_enc.dtype))
            return g

        g = run(self.attr_cap)
        nf = g.meta["n_active_features"]
        # uncapped: about nf rows at the capped run's rate (which also paid for influence updates)
        rows_s = max(g.meta["seconds"]["feature_rows"], 1e-3) / max(g.n_features, 1)
        estimate = 1.3 * nf * rows_s + g.meta["seconds"]["forward"] + 2 * g.meta["seconds"]["assemble"] + 5
        mem_gb = 4 * nf * (nf + (m.n_layers + 1) * T) * 4 / 2**30  # row blocks, their cat, the graph, a copy
        free_gb = (torch.cuda.mem_get_info(self.dev)[0] / 2**30) if self.dev.type == "cuda" else 8.0
        info = dict(n_active_features=nf, estimate_s=round(estimate, 1), estimate_gb=round(mem_gb, 1),
                    time_left_s=round(self.rep.left(), 1))
        del g
        if nf <= self.attr_cap:
            return
        if estimate > min(self.max_uncapped_s, self.rep.left() - 20) or mem_gb > 0.8 * free_gb:
            self.rep.skipped.append(f"attribution, all {nf} features: {info}")
            print(f"SKIP  attribution with all {nf} features: {info}", flush=True)
            return
        run(None)

    # ------------------------------------------------------------------ bf16 attribution against fp32
    def attribution_bf16(self) -> None:
        """The same graph in bf16 and fp32: model and CLT cast to bf16, the fp32 graph's logit targets, edges
        compared node by node (bf16 can move a feature across its threshold: such nodes are counted, not compared)."""
        from cltrace.attribution import attribute
        from cltrace.attribution.ct_compare import node_keys_ours
        from cltrace.models.adapter import ModelAdapter
        from cltrace.replacement import random_transcoder

        m = self.model
        ids = m.tokenize(self.prompt)
        T = ids.numel()
        if self.rep.args.transcoders:
            from cltrace.transcoders.io import load_transcoder

            tc = load_transcoder(self.rep.args.transcoders, device=self.dev)
        else:
            tc = random_transcoder(m, "clt", n_features=self.F, active_per_layer=self.k * (T - 1), ids=ids)
        cap = None if self.rep.args.model else self.attr_cap  # a real model's short prompt: every feature
        graphs, secs = {}, {}
        for precision in ("fp32", "bf16"):
            mp, tp = m, tc
            if precision == "bf16":
                mp = ModelAdapter(copy.deepcopy(m.hf).to(torch.bfloat16), m.tokenizer, m.name + "-bf16")
                tp = copy.deepcopy(tc).to(dtype=torch.bfloat16)
            targets = graphs["fp32"].logit_tokens.tolist() if graphs else None
            sync(self.dev)
            t = time.perf_counter()
            graphs[precision] = attribute(mp, tp, ids, targets=targets, max_feature_nodes=cap)
            sync(self.dev)
            secs[precision] = round(time.perf_counter() - t, 2)
        g32, g16 = graphs["fp32"], graphs["bf16"]
        k32, k16 = node_keys_ours(g32), node_keys_ours(g16)
        at16 = {k: i for i, k in enumerate(k16)}
        common = [i for i, k in enumerate(k32) if k in at16]
        i32, i16 = torch.tensor(common), torch.tensor([at16[k32[i]] for i in common])
        A32 = g32.adjacency().double()[i32][:, i32]  # [n, n] matched nodes, rows = targets
        A16 = g16.adjacency().double()[i16][:, i16]
        diff = (A16 - A32).abs()
        row_max = A32.abs().amax(1)
        has = row_max > 0
        row_rel = diff.amax(1)[has] / row_max[has]  # per target row: max |Δ| / max |edge of the fp32 row|
        self.row(f"attribution bf16 vs fp32, {T} tokens, " + (f"top {cap} features" if cap else "all features"), None,
                 seconds_fp32=secs["fp32"], seconds_bf16=secs["bf16"], matched_nodes=len(common),
                 only_fp32=len(k32) - len(common), only_bf16=len(k16) - len(common),
                 max_rel_err_graph=float(diff.max() / A32.abs().max()),
                 max_rel_err_row=float(row_rel.max()), median_rel_err_row=float(row_rel.median()),
                 logit_prob_max_diff=float((g16.logit_probs - g32.logit_probs).abs().max()),
                 max_logit_error_bf16=float(g16.meta["max_logit_error"]))

    # ------------------------------------------------------------------ interventions
    def interventions(self) -> None:
        from cltrace.interventions import (
            Intervention,
            clean_run,
            first_order,
            intervene,
            intervene_generate,
            run_constrained,
            run_free,
        )
        from cltrace.replacement import random_transcoder

        m = self.model
        ids = m.tokenize(self.prompt)
        T, L = ids.numel(), m.n_layers
        # about k active features a token and layer on this prompt (the random model's trained BatchTopK CLT lets
        # nearly every feature through at inference, which no real transcoder does)
        t = time.perf_counter()
        tc = random_transcoder(m, "clt", n_features=self.F, active_per_layer=self.k * (T - 1), ids=ids)
        sync(self.dev)
        build_s = time.perf_counter() - t
        with torch.no_grad():
            fwd_s, _ = timed(lambda: m.forward(ids), self.dev, min_reps=3, max_reps=20, target_s=1.0)
            clean = clean_run(m, tc, ids)
        layer = L // 3
        pos, feature = divmod(int(clean.acts[layer].argmax()), self.F)
        a = float(clean.acts[layer][pos, feature])
        tok = int(clean.last_logits.argmax())
        iv = [Intervention(layer=layer, pos=pos, feature=feature, value=0.0)]
        every = [Intervention(layer=layer, pos=None, feature=feature, value=2.0 * a)]  # every position
        held = set(range(L))

        def report(name: str, fn) -> None:
            s, reps = timed(fn, self.dev, min_reps=2, max_reps=20, target_s=self.target_s)
            self.row(f"interventions: {name}", None, ms=round(1e3 * s, 1), reps=reps,
                     x_prompt_forward=round(s / fwd_s, 1), prompt_tokens=T)

        self.row(f"interventions: random CLT F={self.F}, calibrated on the prompt", None, build_s=round(build_s, 2),
                 active_per_token_and_layer=round(sum(int((x != 0).sum()) for x in clean.acts) / (L * (T - 1)), 1),
                 intervened=f"{layer}:{feature}@{pos}", act=round(a, 3), prompt_forward_ms=round(1e3 * fwd_s, 2))
        with torch.no_grad():
            report("clean run (replacement model + activations)", lambda: clean_run(m, tc, ids))
            report("constrained, one feature set to 0, layers live", lambda: run_constrained(m, tc, clean, iv))
            report("constrained, every layer held", lambda: run_constrained(m, tc, clean, iv, held=held))
            report("free (real model), one feature at every position", lambda: run_free(m, tc, ids, every))
        report("first_order (autograd, top logit)", lambda: first_order(m, tc, clean, layer, pos, feature, logit=tok))
        report("intervene() report (10 watched, top 10)", lambda: intervene(m, tc, self.prompt, iv, n_watch=10, top=10))
        n = 8
        s, reps = timed(lambda: intervene_generate(m, tc, self.prompt, every, n_tokens=n, mode="free"), self.dev,
                        min_reps=1, max_reps=3, target_s=self.target_s)
        self.row(f"interventions: steered generation, {n} tokens x 2 (free)", None, seconds=round(s, 2), reps=reps,
                 generated_tok_per_s=round(2 * n / s, 1))

    def run_all(self, parts: str = "all") -> None:
        self.part("build model", self.build)
        if self.model is None:
            if "build model" not in self.rep.skipped:
                self.rep.skipped.append("every timing part: the gemma-size model could not be built")
            return
        if parts == "bf16":
            self.part("attribution bf16 vs fp32", self.attribution_bf16)
            return
        self.part("bare forward fp32", lambda: self.forward("fp32"))
        self.part("bare forward bf16", lambda: self.forward("bf16"))
        self.part("train step fp32", lambda: self.train_step("fp32"))
        self.part("train step bf16", lambda: self.train_step("bf16"))
        self.part("end to end streaming", self.end_to_end)
        self.part("attribution", self.attribution)
        self.part("attribution bf16 vs fp32", self.attribution_bf16)
        self.part("interventions", self.interventions)


# ====================================================================== main
def summary(rep: Report) -> None:
    print("\n" + "=" * 100)
    print(f"device {rep.env.get('gpu', rep.dev)}  torch {rep.env['torch']}  transformers {rep.env['transformers']}  "
          f"elapsed {rep.elapsed():.0f} s")
    print(f"\n{'timing':<66} {'tok/s':>11} {'x fwd32':>8} {'x fwd16':>8} {'peak GB':>8}  other")
    for r in rep.timings:
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        other = {k: v for k, v in r.items() if k not in ("name", "tok_per_s", "x_fwd_fp32", "x_fwd_bf16", "peak_gb",
                                                           "phases_s")}
        print(f"{r['name']:<66} {f(r.get('tok_per_s'), '11.0f'):>11} {f(r.get('x_fwd_fp32'), '8.3f'):>8} "
              f"{f(r.get('x_fwd_bf16'), '8.3f'):>8} {f(r.get('peak_gb'), '8.2f'):>8}  {other}")
    for s in rep.skipped:
        print(f"skipped: {s}")
    for e in rep.errors:
        print(f"error: {e['name']}: {e['error']}")
    print(f"JSON: {rep.args.out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    ap.add_argument("--small", action="store_true", help="shrink everything (a CPU test run of the script)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cuda, cuda:N, cpu")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after the start past which no timing part starts (default 240; --small 120)")
    ap.add_argument("--parts", default="all", choices=["all", "bf16"],
                    help="all timing parts, or only the bf16-vs-fp32 attribution check")
    ap.add_argument("--model", help="bf16 check on this real model (e.g. gemma-3-270m) instead of random weights")
    ap.add_argument("--transcoders", help="bf16 check with these transcoders instead of a random CLT")
    ap.add_argument("--prompt", help="bf16 check on this prompt (with --model)")
    args = ap.parse_args()
    if (args.model or args.transcoders or args.prompt) and args.parts != "bf16":
        ap.error("--model/--transcoders/--prompt are for --parts bf16")
    if args.budget is None:
        args.budget = 120.0 if args.small else 240.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cltrace.runtime import tune_cpu_memory

    tune_cpu_memory()  # before the first large allocation, as the CLI and the trainer do
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cpu":  # a test run of the script: one thread (two, on a shared 2-core machine, spin-waited
        torch.set_num_threads(1)  # for descheduled threads and made a 7 ms forward take 1.3 s)
    rep = Report(args, dev)
    print(f"gpu_check (timings) on {rep.env.get('gpu', dev)} (torch {torch.__version__}), small={args.small}, "
          f"budget {args.budget:.0f} s, out {args.out}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        Timings(rep, dev, work, args.small).run_all(args.parts)
    finally:
        rep.save()
        shutil.rmtree(work, ignore_errors=True)
    summary(rep)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
