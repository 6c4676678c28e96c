"""One-shot GPU check: correctness of every CUDA path, then timings on a model of Gemma-3-270M's real size.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out gpu.json            # GPU machine, ~3-5 minutes
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py --small --out /tmp/gpu_small.json   # CPU test run

Needs only torch, transformers, tokenizers, safetensors, numpy, pyyaml, matplotlib: no network, no model
files, no platformdirs (so nothing here goes through `cltrace.models.registry` or `open_corpus`). Every
model is built from a config with random weights: the tiny models of `cltrace.models.tiny`, and a
`Gemma3TextConfig` with gemma-3-270m's hyper-parameters (hard-coded below, from the model's config.json).

1. Correctness on the device (each line PASS/FAIL with the measured error and its tolerance):
   a. tiny random models of every family: the adapter's logits vs HF's, the frozen forward, the local
      replacement model (CLT, and PLT with skip) vs the model's logits, attribution rows summing to their
      targets' values (internally and against an independent frozen forward), single edges equal to the
      effect of removing their source, and (on CUDA) graphs and logits equal to the same computation on CPU;
   b. training: sparse decode == dense decode in value and gradient; interrupted + resumed == uninterrupted
      (in-memory source, JumpReLU/auto and BatchTopK/sparse; streaming source), with the run-to-run noise of
      an uninterrupted run measured beside it; a bf16-autocast run ends with a finite, decreased loss;
   c. interventions: no-ops give bit-identical logits (constrained, held, free); free mode equals patching
      the MLP outputs; with every layer held the graph's edges predict the measured change, and the
      linearized model its total effect.
2. Timings (table + JSON), CLT of 2048 features per layer, BatchTopK k=32 on the Gemma-size model:
   bare forward (`forward(ids, stop_at_layer=L)`, 32x128, fp32 and bf16; the reference of
   benchmarks/bench_training.py), training steps from activations held on the GPU (batch 4096, fp32 and
   bf16 autocast), end-to-end training streaming from the model, attribution of a 64-token prompt
   (capped at the most influential features, then uncapped when it fits the time left); peak GPU memory
   of each. A time guard skips the timing parts not started by --budget seconds after the start.
3. Everything goes to --out (JSON, rewritten after each part) and a summary is printed.

Exit status: 0 all checks passed; 1 a check failed (or raised); 3 checks passed but a timing part raised.
"""

from __future__ import annotations

import argparse
import copy
import gzip
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

PROMPT = "Fact: Michael Jordan plays the sport of"
IV_PROMPT = "the cat sat on the mat"
ROOT = Path(__file__).resolve().parents[1]
ALL_FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")
SMALL_FAMILIES = ("llama", "gemma3", "gpt2")

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
def _num(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.item()
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) or isinstance(x, torch.Tensor):
        return _num(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


class Recorder:
    def __init__(self, args, dev: torch.device):
        self.args, self.dev = args, dev
        self.t0 = time.perf_counter()
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.skipped: list[str] = []
        self.timing_errors: list[dict] = []
        self.sections: dict[str, float] = {}
        self.env = environment(dev)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def check(self, name: str, ok, err=None, tol=None, **info) -> bool:
        ok = bool(ok)
        self.checks.append({"name": name, "ok": ok, "err": _num(err), "tol": _num(tol), **_jsonable(info)})
        e = "" if err is None else f"  err={float(err):.3g}"
        t = "" if tol is None else f" (tol {float(tol):.3g})"
        extra = "".join(f"  {k}={v}" for k, v in info.items() if k != "traceback")
        print(f"{'PASS' if ok else 'FAIL'}  {name}{e}{t}{extra}", flush=True)
        return ok

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-4,
              **info) -> bool:
        """PASS when |got − want| <= atol + rtol·|want| everywhere (torch.allclose); err = max |got − want|."""
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.shape != want.shape:
            return self.check(name, False, shape=f"{tuple(got.shape)} vs {tuple(want.shape)}", **info)
        diff = (got - want).abs()
        excess = float((diff - rtol * want.abs()).max()) if diff.numel() else 0.0
        ok = bool(torch.isfinite(got).all()) and excess <= atol
        return self.check(name, ok, float(diff.max()) if diff.numel() else 0.0, atol, rtol=rtol,
                          scale=round(float(want.abs().max()), 4) if want.numel() else 0.0, **info)

    def exact(self, name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
        diff = float((got.detach().double() - want.detach().double()).abs().max())
        return self.check(name, torch.equal(got, want), diff, 0.0)

    def failed(self, name: str, e: BaseException) -> None:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        self.check(f"{name}: raised {type(e).__name__}", False, error=str(e).splitlines()[0][:300] if str(e) else "",
                   traceback=tb[-3000:])

    def timing(self, name: str, **values) -> dict:
        row = {"name": name, **_jsonable(values)}
        self.timings.append(row)
        self.save()
        return row

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        n_fail = sum(not c["ok"] for c in self.checks)
        data = {
            "all_checks_passed": n_fail == 0 and bool(self.checks), "n_checks": len(self.checks),
            "n_failed": n_fail, "failed": [c["name"] for c in self.checks if not c["ok"]],
            "device": str(self.dev), "small": self.args.small, "elapsed_s": round(self.elapsed(), 1),
            "budget_s": self.args.budget, "env": self.env, "sections_s": self.sections, "checks": self.checks,
            "timings": self.timings, "skipped": self.skipped, "timing_errors": self.timing_errors,
        }
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(data), indent=1))
        tmp.replace(out)


def environment(dev: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "torch_cuda": torch.version.cuda, "host": platform.node(), "threads": torch.get_num_threads(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "float32_matmul_precision":
           torch.get_float32_matmul_precision()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the device machine is fine
        env["git_commit"] = None
    return env


def section(rec: Recorder, name: str, fn, *args) -> None:
    """Run one group of checks; an exception is one FAIL and the other groups still run."""
    t = time.perf_counter()
    print(f"\n== {name}", flush=True)
    try:
        fn(rec, *args)
    except Exception as e:  # noqa: BLE001 - report and go on
        rec.failed(name, e)
    rec.sections[name] = round(time.perf_counter() - t, 2)
    rec.save()


# ---------------------------------------------------------------------- helpers
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


def tiny_on(family: str, dev: torch.device, **kw):
    from cltrace.models.tiny import tiny_model

    model = tiny_model(family, **kw)
    model.hf.to(dev)
    return model


def corpus_docs(n: int = 400) -> list[str]:
    """Documents of the committed small corpus, read directly (open_corpus would import platformdirs)."""
    path = ROOT / "data" / "corpus" / "small.jsonl.gz"
    docs: list[str] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line).get("text", "")
                if len(text) > 200:
                    docs.append(text[:20000])
                if len(docs) >= n:
                    break
    except OSError:
        pass
    if len(docs) < 20:  # no corpus file: plain synthetic prose is enough for throughput and resume checks
        words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
        g = torch.Generator().manual_seed(0)
        docs = [" ".join(words[i] for i in torch.randint(0, len(words), (600,), generator=g).tolist())
                for _ in range(n)]
    return docs


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


# ====================================================================== 1a. models, replacement, attribution
def frozen_run(model, rep, *, delta=None, emb_delta=None, zero_nodes=False):
    """The frozen affine model through the adapter's own forward (tests/test_attribution.py)."""
    tc = rep.tc
    leaf = rep.mlp_out - (rep.skip if rep.skip is not None else 0)
    if zero_nodes:
        leaf = tc.b_dec[:, None, :].expand_as(leaf).clone()
        leaf[:, 0] = rep.mlp_out[:, 0] - (rep.skip[:, 0] if rep.skip is not None else 0)

    def mlp_hook(layer, m_in, m_out):
        out = leaf[layer][None].clone()
        if tc.W_skip is not None:
            out = out + m_in @ tc.W_skip[layer]
        if delta is not None:
            out = out + delta[layer][None]
        return out

    def embed_hook(x):
        x = torch.zeros_like(x) if zero_nodes else x
        return x + emb_delta[None] if emb_delta is not None else x

    return model.forward(rep.ids, frozen=rep.frozen, mlp_hook=mlp_hook, embed_hook=embed_hook)


def target_value(g, tc, r: int, trace) -> float:
    layer, pos, f = g.features[int(g.rows[r])].tolist()
    return float(trace.mlp_in[layer][0, pos].detach() @ tc.W_enc[layer][:, f])


@torch.no_grad()
def check_graph(rec: Recorder, tag: str, model, tc, ids, g) -> None:
    from cltrace.replacement import build_replacement

    dev = ids.device
    # internal: Σ edges + constant = value for every row
    rec.close(f"{tag}: graph rows sum to their values", g.edges.sum(1) + g.row_constant, g.row_value,
              rtol=1e-4, atol=1e-4, rows=int(g.edges.shape[0]), nodes=g.n_nodes)
    rec.check(f"{tag}: graph max_logit_error", g.meta["max_logit_error"] < 1e-4, g.meta["max_logit_error"], 1e-4)
    # independent: an adapter forward with every node removed gives the constants, the plain forward the values
    rep = build_replacement(model, tc, ids)
    const = frozen_run(model, rep, zero_nodes=True)
    ref = model.forward(ids)
    feat_rows = (g.rows < g.n_features).nonzero().flatten().tolist()
    pre = torch.tensor([target_value(g, tc, r, ref) for r in feat_rows])
    c_ind = torch.tensor([target_value(g, tc, r, const) for r in feat_rows])
    rec.close(f"{tag}: feature rows + independent constant == pre-activation", g.edges[feat_rows].sum(1) + c_ind,
              pre, rtol=1e-5, atol=1e-4)
    logit_rows = (g.rows >= g.n_features).nonzero().flatten()
    lg = (ref.final_normed[0, -1] @ model.W_U.T).cpu()
    cl = (const.final_normed[0, -1] @ model.W_U.T).cpu()
    want = lg[g.logit_tokens] - lg.mean()
    rec.close(f"{tag}: logit rows + independent constant == logit - mean", g.edges[logit_rows].sum(1)
              + (cl[g.logit_tokens] - cl.mean()), want, rtol=1e-5, atol=1e-4)
    # single edges = the change of a target when that source is removed (the frozen model is linear)
    L, T, D = rep.mlp_out.shape
    base = frozen_run(model, rep)
    gen = torch.Generator().manual_seed(0)
    sources = [int(i) for i in torch.randint(0, g.n_features, (3,), generator=gen)]
    sources += [g.error_index(int(torch.randint(0, L, (1,), generator=gen)), T - 2), g.token_index(T - 3)]
    worst, n = 0.0, 0
    for s in sources:
        delta, emb_delta = torch.zeros(L, T, D, device=dev), None
        if s < g.n_features:
            layer, pos, f = g.features[s].tolist()
            dec = tc.decoder_vectors(layer, torch.tensor([f], device=dev))[0]
            for j, lt in enumerate(tc.target_layers(layer)):
                delta[lt, pos] = -float(g.activations[s]) * dec[j]
        elif s < g.token_index(0):
            layer, pos = divmod(s - g.n_features, T)
            delta[layer, pos] = -rep.error[layer, pos]
        else:
            emb_delta = torch.zeros(T, D, device=dev)
            emb_delta[s - g.token_index(0)] = -rep.embed[s - g.token_index(0)]
        pert = frozen_run(model, rep, delta=delta, emb_delta=emb_delta)
        for r in feat_rows[:25]:
            change = target_value(g, tc, r, base) - target_value(g, tc, r, pert)
            worst = max(worst, abs(change - float(g.edges[r, s])) / (1.0 + abs(change)))
            n += 1
    rec.check(f"{tag}: single edges == perturbation effects", worst < 1e-4, worst, 1e-4, pairs=n,
              note="err = max |Δ − edge| / (1 + |Δ|)")


def check_family(rec: Recorder, dev: torch.device, family: str) -> None:
    from cltrace.attribution import attribute
    from cltrace.models.tiny import tiny_model
    from cltrace.replacement import build_replacement, random_transcoder

    model = tiny_on(family, dev)
    ids = model.tokenize(PROMPT)
    with torch.no_grad():
        trace = model.forward(ids)
        ref = model.logits(ids)
        frozen = model.forward(ids, frozen=trace.frozen)
    rec.close(f"{family}: adapter logits == HF logits", trace.logits, ref)
    rec.close(f"{family}: frozen forward == forward", frozen.logits, trace.logits)
    cpu_model = tiny_model(family) if dev.type == "cuda" else None
    if cpu_model is not None:
        with torch.no_grad():
            rec.close(f"{family}: {dev.type} logits == cpu logits", ref, cpu_model.logits(ids.cpu()))
    for kind in ("clt", "plt"):
        tag = f"{family} {kind}{'+skip' if kind == 'plt' else ''}"
        tc = random_transcoder(model, kind, 96, 12, ids=ids, skip=kind == "plt")
        rep = build_replacement(model, tc, ids)
        rec.close(f"{tag}: replacement model logits == model logits", rep.forward(), ref[0])
        g = attribute(model, tc, ids, batch_size=16)
        check_graph(rec, tag, model, tc, ids, g)
        if cpu_model is not None:  # the same graph computed on the CPU
            tc_cpu = copy.deepcopy(tc).cpu()
            gc = attribute(cpu_model, tc_cpu, ids.cpu(), batch_size=16)
            same = torch.equal(g.features, gc.features) and torch.equal(g.logit_tokens, gc.logit_tokens)
            if rec.check(f"{tag}: same active features and logits as cpu", same, n_features=g.n_features,
                         n_features_cpu=gc.n_features):
                scale = float(gc.edges.abs().max())
                rec.close(f"{tag}: {dev.type} edges == cpu edges", g.edges, gc.edges, rtol=1e-3, atol=1e-5 * scale)


def check_models(rec: Recorder, dev: torch.device, families) -> None:
    for family in families:
        try:
            check_family(rec, dev, family)
        except Exception as e:  # noqa: BLE001 - one family's failure must not hide the others
            rec.failed(f"{family}: models/replacement/attribution", e)


# ====================================================================== 1b. training
L_S, D_S, F_S = 3, 8, 16  # the synthetic problem of tests/test_training.py


def synthetic(n=512, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L_S, D_S, generator=g) * torch.tensor([1.0, 3.0, 0.5])[None, :, None]
    W = torch.randn(L_S, D_S, D_S, generator=g) / math.sqrt(D_S)
    y = torch.relu(torch.einsum("nld,lde->nle", x, W)) * torch.tensor([2.0, 0.5, 1.0])[None, :, None]
    return x, y + noise * torch.randn(n, L_S, D_S, generator=g)


def cfg_for(work: Path, name: str, dev: torch.device, **kw):
    from cltrace.training import TrainConfig

    base = dict(kind="clt", features_per_layer=F_S, tokens=64 * 30, batch_size=64, out=str(work / name),
                progress=False, log_every=5, checkpoint_every=10, init_l0=4, norm_tokens=256, lr=3e-3,
                device=str(dev))
    base.update(kw)
    return TrainConfig(**base)


def max_param_diff(a, b) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def check_sparse_decode(rec: Recorder, dev: torch.device) -> None:
    from cltrace.transcoders.sparse import decode_mask, decode_partial, finish_decode
    from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

    x, y = (t.to(dev) for t in synthetic(32))
    for kind, act, skip in (("clt", "jumprelu", False), ("plt", "jumprelu", True), ("clt", "topk", False),
                            ("clt", "batchtopk", False)):
        torch.manual_seed(0)
        tc = Transcoder(TranscoderConfig(kind=kind, n_layers=L_S, d_model=D_S, n_features=F_S, activation=act,
                                         k=3, skip=skip, bandwidth=0.3), device=dev)
        with torch.no_grad():
            tc.log_threshold.fill_(math.log(0.3))
            tc.b_dec.normal_()
            if skip:
                tc.W_skip.normal_(std=0.1)
        res = []
        for sparse in (True, False):
            tc.zero_grad()
            pre = tc.pre_acts(x)
            acts = tc.activate(pre)
            recon = finish_decode(tc, decode_partial(tc, acts, decode_mask(tc, acts, pre), sparse=sparse), x)
            ((recon - y) ** 2).sum().backward()
            res.append((recon.detach(), {n: p.grad.clone() for n, p in tc.named_parameters() if p.grad is not None}))
        (r1, g1), (r2, g2) = res
        tag = f"sparse == dense decode ({kind} {act}{' skip' if skip else ''})"
        rec.close(f"{tag}: value", r1, r2, rtol=1e-5, atol=1e-5)
        worst = max(float(((g1[n] - g2[n]).abs() - 1e-4 * g2[n].abs()).max()) for n in g2)
        rec.check(f"{tag}: gradients", g1.keys() == g2.keys() and worst <= 1e-4, max(worst, 0.0), 1e-4,
                  params=len(g2))


def check_resume(rec: Recorder, dev: torch.device, work: Path, tag: str, source_fn, **kw) -> None:
    """Uninterrupted twice (the noise floor of the device) and interrupted at step 10 + resumed."""
    from cltrace.training import train
    from cltrace.training.checkpoint import checkpoint_root, latest_checkpoint
    from cltrace.training.metrics import read_metrics

    name = tag.replace(" ", "_").replace("/", "_")
    a = train(cfg_for(work, f"{name}-a", dev, **kw), source=source_fn())
    a2 = train(cfg_for(work, f"{name}-a2", dev, **kw), source=source_fn())
    cfg_b = cfg_for(work, f"{name}-b", dev, **kw)
    until = kw.get("checkpoint_every", 10)
    train(cfg_b, source=source_fn(), until_step=until)
    ck = latest_checkpoint(checkpoint_root(cfg_b.out))
    rec.check(f"resume {tag}: checkpoint written at the interruption", ck is not None and
              ck.name == f"step-{until:09d}", checkpoint=ck.name if ck else None)
    b = train(cfg_b, source=source_fn(), resume=True)
    floor = max_param_diff(a, a2)
    diff = max_param_diff(a, b)
    tol = max(1e-5, 10 * floor)
    rec.check(f"resume {tag}: resumed == uninterrupted (parameters)", diff <= tol, diff, tol,
              noise_floor=f"{floor:.3g}")
    ra = read_metrics(Path(cfg_for(work, f"{name}-a", dev).out) / "metrics.jsonl")
    rb = read_metrics(Path(cfg_b.out) / "metrics.jsonl")
    same_steps = [r["step"] for r in ra] == [r["step"] for r in rb]
    dl = abs(ra[-1]["loss"] - rb[-1]["loss"]) / max(abs(ra[-1]["loss"]), 1e-12)
    rec.check(f"resume {tag}: same metric steps and final loss", same_steps and dl <= max(1e-5, 10 * floor + 1e-6),
              dl, max(1e-5, 10 * floor + 1e-6), final_loss=round(ra[-1]["loss"], 6))


def check_training(rec: Recorder, dev: torch.device, work: Path, small: bool) -> None:
    from cltrace.data import StreamingActivations
    from cltrace.training import InMemoryActivations, train
    from cltrace.training.metrics import read_metrics

    steps = [("sparse decode", lambda: check_sparse_decode(rec, dev))]
    x, y = synthetic(512)
    steps.append(("resume in-memory jumprelu/auto", lambda: check_resume(
        rec, dev, work, "in-memory clt jumprelu", lambda: InMemoryActivations(x, y))))
    steps.append(("resume in-memory batchtopk/sparse", lambda: check_resume(
        rec, dev, work, "in-memory clt batchtopk sparse", lambda: InMemoryActivations(x, y),
        activation="batchtopk", k=3, sparse_decode="always")))

    def streaming():
        model = tiny_on("llama", dev)
        docs = corpus_docs(200)

        def src():
            return StreamingActivations(model, docs, context_len=64, buffer_tokens=512, model_batch=4)

        check_resume(rec, dev, work, "streaming clt (tiny llama)", src, features_per_layer=32, tokens=128 * 12,
                     batch_size=128, checkpoint_every=4, log_every=2)

    steps.append(("resume streaming", streaming))

    def bf16():
        xs, ys = synthetic(1024)
        cfg = cfg_for(work, "bf16", dev, precision="bf16", activation="batchtopk", k=3, sparse_decode="always",
                      tokens=128 * 40, batch_size=128, lr=1e-2, checkpoint_every=0)
        train(cfg, source=InMemoryActivations(xs, ys))
        rows = read_metrics(Path(cfg.out) / "metrics.jsonl")
        losses = [r["loss"] for r in rows]
        finite = all(math.isfinite(v) for v in losses)
        rec.check("bf16 autocast training (batchtopk, sparse): finite loss", finite, final_loss=round(losses[-1], 5),
                  steps=rows[-1]["step"])
        rec.check("bf16 autocast training: NMSE decreased", rows[-1]["nmse"] < 0.9 * rows[0]["nmse"],
                  nmse_first=round(rows[0]["nmse"], 4), nmse_last=round(rows[-1]["nmse"], 4))

    steps.append(("bf16", bf16))
    for name, fn in steps:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            rec.failed(f"training: {name}", e)


# ====================================================================== 1c. interventions
def calibrated(model, kind="clt", skip=False, seed=0):
    from cltrace.replacement import random_transcoder

    return random_transcoder(model, kind, n_features=32, active_per_layer=40, seed=seed, prompt=IV_PROMPT, skip=skip)


def active_feature(clean, layer: int) -> tuple[int, int, float]:
    a = clean.acts[layer]
    i = int(a.flatten().argmax())
    p, f = divmod(i, a.shape[1])
    return f, p, float(a[p, f])


@torch.no_grad()
def check_noop(rec: Recorder, dev: torch.device, family: str) -> None:
    from cltrace.interventions import Intervention, clean_run, run_constrained, run_free

    model = tiny_on(family, dev)
    for kind, skip in (("clt", False), ("plt", False), ("clt", True)):
        tag = f"{family} {kind}{'+skip' if skip else ''}"
        tc = calibrated(model, kind, skip)
        clean = clean_run(model, tc, model.tokenize(IV_PROMPT))
        f, p, a = active_feature(clean, 1)
        noop = [Intervention(1, f, a, p), Intervention(2, 5, 1.0, None, "scale"), Intervention(0, 3, 1.0, 2, "scale")]
        ref = clean.last_logits
        rec.exact(f"{tag}: no-op intervention, constrained: identical logits",
                  run_constrained(model, tc, clean, noop).last_logits, ref)
        rec.exact(f"{tag}: no-op intervention, layers held: identical logits",
                  run_constrained(model, tc, clean, noop, held={0, 1, 2}).last_logits, ref)
        rec.exact(f"{tag}: no-op intervention, free: identical logits",
                  run_free(model, tc, clean.ids, noop).last_logits, ref)
        rec.close(f"{tag}: clean replacement logits == HF logits", ref, model.logits(clean.ids)[0, -1])


@torch.no_grad()
def check_free_patch(rec: Recorder, dev: torch.device, family: str) -> None:
    from cltrace.interventions import Intervention, clean_run, run_free

    model = tiny_on(family, dev)
    tc = calibrated(model)
    s, pos = 1, 4
    clean = clean_run(model, tc, model.tokenize(IV_PROMPT))
    f = int(clean.acts[s].sum(0).argmax())
    a = clean.acts[s][:, f]
    g = (f + 1) % tc.n_features
    run = run_free(model, tc, clean.ids, [Intervention(s, f, 3.0, pos), Intervention(s, g, 0.5, None, "scale")])
    d_f = torch.zeros_like(a)
    d_f[pos] = 3.0 - a[pos]
    d_g = -0.5 * clean.acts[s][:, g]
    W = tc.W_dec[s].detach()

    def patch(layer, mlp_in, mlp_out):
        if layer < s:
            return mlp_out
        k = layer - s
        return mlp_out + (d_f[:, None] * W[f, k] + d_g[:, None] * W[g, k])[None]

    ref = model.forward(clean.ids, mlp_hook=patch)
    rec.close(f"{family}: free intervention == MLP-output patch (logits)", run.last_logits, ref.logits[0, -1],
              rtol=1e-5, atol=1e-5)


def check_graph_prediction(rec: Recorder, dev: torch.device, family: str) -> None:
    from cltrace.attribution import attribute
    from cltrace.interventions import Intervention, clean_run, first_order, run_constrained

    model = tiny_on(family, dev)
    tc = calibrated(model)
    graph = attribute(model, tc, IV_PROMPT)
    with torch.no_grad():
        clean = clean_run(model, tc, graph.input_ids.to(dev))
    k = int(((graph.features[:, 0] == 1) * graph.activations).argmax())
    layer, pos, f = graph.features[k].tolist()
    a = float(graph.activations[k])
    nf = graph.n_features
    per_unit = (graph.edges[:, :nf] / graph.activations).double()  # [R, nf]
    direct = per_unit[:, k]
    e = torch.zeros(nf, dtype=torch.double)
    e[k] = 1.0
    total = per_unit @ torch.linalg.solve(torch.eye(nf, dtype=torch.double) - per_unit[:nf], e)
    scale = float(direct.abs().max())

    def measured(run):
        d_pre = torch.stack([run.pre[lay][p, ff] - clean.pre[lay][p, ff]
                             for lay, p, ff in graph.features.tolist()]).cpu()
        rl, cl = run.last_logits.cpu(), clean.last_logits.cpu()
        lg = rl - rl.mean() - (cl - cl.mean())
        return torch.cat([d_pre, lg[graph.logit_tokens]]).double()

    held = set(range(model.n_layers))
    with torch.no_grad():
        for delta in (-a, 2.5):
            run = run_constrained(model, tc, clean, [Intervention(layer, f, a + delta, pos)], held=held)
            rec.close(f"{family}: all layers held, Δa={delta:+.3g}: measured == graph edges / a × Δa",
                      measured(run), direct * delta, rtol=1e-3, atol=1e-4 * scale * max(1.0, abs(delta)))
        lin = run_constrained(model, tc, clean, [Intervention(layer, f, a + 1.0, pos)], linear=True)
        rec.close(f"{family}: linearized constrained run == graph total effect (I − A/a)⁻¹", measured(lin), total,
                  rtol=1e-3, atol=1e-4 * scale)
    V = clean.last_logits.shape[-1]
    tok = int(graph.logit_tokens[0])
    demean = torch.full((V,), -1.0 / V, device=dev)
    demean[tok] += 1.0
    d_direct, _ = first_order(model, tc, clean, layer, f, pos, logit=demean, held=held)
    rec.close(f"{family}: first_order (autograd, held) == graph direct edge / a", torch.tensor(d_direct),
              direct[nf], rtol=1e-3, atol=1e-4 * scale)
    # the user-facing API (what `cltrace intervene --graph --node ... --constrained-layers all` runs)
    from cltrace.interventions import intervene

    out = intervene(model, tc, IV_PROMPT, [f"{layer}:{f}@{pos}=0"], constrained_layers="all", graph=graph)
    lc = out["graph"]["logit_changes"]
    rec.close(f"{family}: intervene(graph=, constrained_layers=all): logit changes == predicted_direct",
              torch.tensor([r["measured"] for r in lc]), torch.tensor([r["predicted_direct"] for r in lc]),
              rtol=1e-3, atol=1e-4 * scale * a)
    rows = [r for r in out["features"] if r.get("pre_change_predicted_direct") is not None]
    if rows:
        rec.close(f"{family}: intervene(graph=, constrained_layers=all): watched pre changes == predicted_direct",
                  torch.tensor([r["pre_after"] - r["pre_before"] for r in rows]),
                  torch.tensor([r["pre_change_predicted_direct"] for r in rows]), rtol=1e-3,
                  atol=1e-4 * scale * a, watched=len(rows))


def check_generation(rec: Recorder, dev: torch.device) -> None:
    from cltrace.interventions import Intervention, intervene_generate

    model = tiny_on("llama", dev)
    tc = calibrated(model)
    noop = [Intervention(1, 3, 1.0, None, "scale"), Intervention(2, 0, 1.0, 3, "scale")]
    ids = model.tokenize(IV_PROMPT)
    with torch.no_grad():
        hf = model.hf.generate(ids[None], max_new_tokens=6, do_sample=False, pad_token_id=258)[0, ids.numel():]
    for mode in ("free", "constrained"):
        out = intervene_generate(model, tc, IV_PROMPT, noop, n_tokens=6, mode=mode, temperature=0.0, seed=3)
        rec.check(f"llama: no-op generation ({mode}) == plain == HF greedy generate",
                  out["steered_ids"] == out["original_ids"] == hf.tolist(), steered=out["steered_ids"],
                  hf=hf.tolist())


def check_interventions(rec: Recorder, dev: torch.device, families) -> None:
    for family in families:
        for name, fn in (("no-op", check_noop), ("free patch", check_free_patch)):
            try:
                fn(rec, dev, family)
            except Exception as e:  # noqa: BLE001
                rec.failed(f"{family}: interventions {name}", e)
    for family in ("llama", "gemma3"):
        try:
            check_graph_prediction(rec, dev, family)
        except Exception as e:  # noqa: BLE001
            rec.failed(f"{family}: interventions graph prediction", e)
    try:
        check_generation(rec, dev)
    except Exception as e:  # noqa: BLE001
        rec.failed("llama: interventions generation", e)


# ====================================================================== 2. timings
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


def batch_ids(model, docs, n: int, T: int, start: int = 0) -> torch.Tensor:
    from cltrace.data import ContextStream

    ctxs = ContextStream(docs, model.tokenizer, T).take(start + n)[start:]
    return torch.tensor(ctxs, device=model.device)


@torch.no_grad()
def gpu_activations(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [N, L, D] float32 kept on the device, at the positions training keeps (no BOS/special)."""
    from cltrace.data import keep_mask
    from cltrace.data.tokens import special_tokens

    _, _, special = special_tokens(model.tokenizer)
    xs, ys = [], []
    for chunk in ids.split(32):
        tr = model.forward(chunk, stop_at_layer=model.n_layers)
        keep = keep_mask(chunk, special)
        xs.append(torch.stack([m[keep] for m in tr.mlp_in], 1).float())
        ys.append(torch.stack([m[keep] for m in tr.mlp_out], 1).float())
    return torch.cat(xs), torch.cat(ys)


class Timings:
    """The timing parts, sharing one model; each part is skipped once the time guard has passed."""

    def __init__(self, rec: Recorder, dev: torch.device, work: Path, small: bool):
        self.rec, self.dev, self.work, self.small = rec, dev, work, small
        self.F = 256 if small else 2048
        self.k = 8 if small else 32
        self.batch = 512 if small else 4096
        self.fwd_shape = (4, 64) if small else (32, 128)
        self.attr_T = 24 if small else 64
        self.attr_cap = 64 if small else 1024
        self.target_s = 1.0 if small else 3.0
        self.max_uncapped_s = 30.0 if small else 120.0  # the uncapped graph runs only if estimated below this
        self.fwd_ref: dict[str, float] = {}
        self.model = None
        self.docs = corpus_docs(400)
        self.tc_attr = None  # the CLT trained a few steps in the fp32 part, for attribution

    def left(self) -> float:
        return self.rec.args.budget - self.rec.elapsed()

    def part(self, name: str, fn) -> None:
        if self.left() <= 0:
            self.rec.skipped.append(name)
            print(f"SKIP  {name}: time guard ({self.rec.elapsed():.0f} s > budget {self.rec.args.budget:.0f} s)",
                  flush=True)
            self.rec.save()
            return
        t = time.perf_counter()
        mem_reset(self.dev)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the next part
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            self.rec.timing_errors.append({"name": name, "error": f"{type(e).__name__}: {e}"[:500],
                                           "traceback": tb[-3000:]})
            print(f"ERROR {name}: {type(e).__name__}: {e}", flush=True)
        self.rec.sections[f"timing: {name}"] = round(time.perf_counter() - t, 2)
        self.rec.save()

    def row(self, name: str, tok_s: float | None, **extra) -> None:
        ratio = tok_s / self.fwd_ref["fp32"] if tok_s and self.fwd_ref.get("fp32") else None
        ratio16 = tok_s / self.fwd_ref["bf16"] if tok_s and self.fwd_ref.get("bf16") else None
        peak = mem_peak_gb(self.dev)
        self.rec.timing(name, tok_per_s=tok_s, x_fwd_fp32=ratio, x_fwd_bf16=ratio16, peak_gb=peak, **extra)
        r = f"{ratio:6.3f}" if ratio is not None else "     -"
        v = f"{tok_s:12.0f}" if tok_s else f"{'-':>12}"
        print(f"TIME  {name:<58} {v} tok/s  x fwd {r}  peak {peak:6.2f} GB  "
              + "  ".join(f"{k}={v}" for k, v in extra.items()), flush=True)

    # ------------------------------------------------------------------ parts
    def build(self) -> None:
        t = time.perf_counter()
        self.model = gemma_model(self.dev, self.small)
        sync(self.dev)
        n_params = sum(p.numel() for p in self.model.hf.parameters())
        self.rec.env["timing_model"] = {"layers": self.model.n_layers, "d_model": self.model.d_model,
                                        "vocab": self.model.vocab_size, "params": n_params,
                                        "features_per_layer": self.F, "k": self.k, "batch_tokens": self.batch}
        self.row("build the gemma-size model (random weights)", None, seconds=round(time.perf_counter() - t, 2),
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

    def _trainer(self, precision: str, source, **kw):
        from cltrace.training import TrainConfig, Trainer

        cfg = TrainConfig(kind="clt", features_per_layer=self.F, activation="batchtopk", k=self.k,
                          batch_size=self.batch, tokens=self.batch * 1000, norm_tokens=self.batch,
                          precision=precision, device=str(self.dev), progress=False, checkpoint_every=0,
                          out=str(self.work / f"timing-{precision}"), **kw)
        return Trainer(cfg, source, model_name=self.model.name)

    def train_step(self, precision: str) -> None:
        from cltrace.training import InMemoryActivations

        m, B = self.model, self.batch
        n_ctx = max(2, -(-2 * B // (self.fwd_shape[1] - 1)))  # contexts for >= 2 batches of kept rows
        x, y = gpu_activations(m, batch_ids(m, self.docs, n_ctx, self.fwd_shape[1], start=100))
        n = x.shape[0]
        tr = self._trainer(precision, InMemoryActivations(x[:B].cpu(), y[:B].cpu()))  # initialize reads CPU rows
        tr.initialize()
        g = torch.Generator(device=self.dev).manual_seed(0)

        def step():
            idx = torch.randint(0, n, (B,), device=self.dev, generator=g)
            return tr.train_step(x[idx], y[idx])

        t = time.perf_counter()
        step()  # the first step allocates the optimizer state
        sync(self.dev)
        first = time.perf_counter() - t
        s, reps = timed(step, self.dev, min_reps=3, max_reps=40, target_s=self.target_s)
        last = step()
        self.row(f"CLT F={self.F} k={self.k} train step, {precision}, rows on the device (batch {B})", B / s,
                 ms=round(1e3 * s, 1), reps=reps, first_step_s=round(first, 2), loss=round(last["loss"], 4),
                 l0=round(float(last["l0_layers"].float().mean()), 1),
                 params_m=round(sum(p.numel() for p in tr.params) / 1e6, 1))
        if precision == "fp32" and self.tc_attr is None:  # a CLT with a learned BatchTopK threshold, folded
            from cltrace.transcoders.transcoder import Transcoder

            tc = Transcoder(tr.tc.cfg, device=self.dev, init=False)
            tc.load_state_dict(tr.tc.state_dict())
            tc.fold_normalization(tr.x_scale, tr.y_scale)
            self.tc_attr = tc.eval()

    def end_to_end(self) -> None:
        from cltrace.data import StreamingActivations

        m, B = self.model, self.batch
        src = StreamingActivations(m, self.docs, context_len=self.fwd_shape[1], buffer_tokens=2 * B,
                                   model_batch=self.fwd_shape[0])
        tr = self._trainer("fp32", src)
        tr.initialize()
        batches = src.batches(B, seed=0)
        tr.train_step(*next(batches))
        sync(self.dev)
        tok0 = src.model_tokens
        s, reps = timed(lambda: tr.train_step(*next(batches)), self.dev, min_reps=3, max_reps=30,
                        target_s=2 * self.target_s)
        self.row(f"CLT F={self.F} end to end, streaming from the model (batch {B})", B / s, ms=round(1e3 * s, 1),
                 reps=reps, model_tokens_per_step=round((src.model_tokens - tok0) / (reps + 1)))

    def attribution(self) -> None:
        from cltrace.attribution import attribute

        m, tc = self.model, self.tc_attr
        if tc is None:
            raise RuntimeError("no CLT: the fp32 training part did not run")
        T = self.attr_T
        text = self.docs[3]
        ids = torch.tensor(m.tokenizer(text, add_special_tokens=False)["input_ids"][: T - 1])
        ids = torch.cat([torch.tensor([m.bos_token_id]), ids]).to(self.dev)
        with torch.no_grad():
            fwd_s, _ = timed(lambda: m.forward(ids), self.dev, min_reps=3, max_reps=20, target_s=1.0)
        self.row(f"bare forward of the {T}-token prompt (batch 1, logits)", T / fwd_s, ms=round(1e3 * fwd_s, 2))
        tc_dtype = tc.W_enc.dtype
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
                     phases_s={k: round(v, 2) for k, v in g.meta["seconds"].items()}, tc_dtype=str(tc_dtype))
            return g, secs

        g, secs = run(self.attr_cap)
        nf = g.meta["n_active_features"]
        # uncapped: about nf rows at the capped run's rate (which also paid for influence updates)
        rows_s = max(g.meta["seconds"]["feature_rows"], 1e-3) / max(g.n_features, 1)
        estimate = 1.3 * nf * rows_s + g.meta["seconds"]["forward"] + 2 * g.meta["seconds"]["assemble"] + 5
        mem_gb = 4 * nf * (nf + (m.n_layers + 1) * T) * 4 / 2**30  # row blocks, their cat, the graph, a copy
        free_gb = (torch.cuda.mem_get_info(self.dev)[0] / 2**30) if self.dev.type == "cuda" else 8.0
        info = dict(n_active_features=nf, estimate_s=round(estimate, 1), estimate_gb=round(mem_gb, 1),
                    time_left_s=round(self.left(), 1))
        del g
        if nf <= self.attr_cap:
            return
        if estimate > min(self.max_uncapped_s, self.left() - 20) or mem_gb > 0.8 * free_gb:
            self.rec.skipped.append(f"attribution, all {nf} features: {info}")
            print(f"SKIP  attribution with all {nf} features: {info}", flush=True)
            return
        run(None)

    def run_all(self) -> None:
        self.part("build model", self.build)
        if self.model is None:
            if "build model" not in self.rec.skipped:
                self.rec.skipped.append("every timing part: the gemma-size model could not be built")
            return
        self.part("bare forward fp32", lambda: self.forward("fp32"))
        self.part("bare forward bf16", lambda: self.forward("bf16"))
        self.part("train step fp32", lambda: self.train_step("fp32"))
        self.part("train step bf16", lambda: self.train_step("bf16"))
        self.part("end to end streaming", self.end_to_end)
        self.part("attribution", self.attribution)


# ====================================================================== main
def summary(rec: Recorder) -> None:
    print("\n" + "=" * 100)
    n_fail = sum(not c["ok"] for c in rec.checks)
    print(f"device {rec.env.get('gpu', rec.dev)}  torch {rec.env['torch']}  transformers {rec.env['transformers']}  "
          f"elapsed {rec.elapsed():.0f} s")
    print(f"checks: {len(rec.checks) - n_fail} passed, {n_fail} failed")
    for c in rec.checks:
        if not c["ok"]:
            print(f"  FAIL {c['name']}  err={c.get('err')} tol={c.get('tol')} {c.get('error', '')}")
    if rec.timings:
        print(f"\n{'timing':<62} {'tok/s':>11} {'x fwd32':>8} {'x fwd16':>8} {'peak GB':>8}  other")
        for r in rec.timings:
            def f(v, fmt):
                return format(v, fmt) if isinstance(v, (int, float)) else "-"
            other = {k: v for k, v in r.items() if k not in ("name", "tok_per_s", "x_fwd_fp32", "x_fwd_bf16",
                                                               "peak_gb", "phases_s")}
            print(f"{r['name']:<62} {f(r.get('tok_per_s'), '11.0f'):>11} {f(r.get('x_fwd_fp32'), '8.3f'):>8} "
                  f"{f(r.get('x_fwd_bf16'), '8.3f'):>8} {f(r.get('peak_gb'), '8.2f'):>8}  {other}")
    for s in rec.skipped:
        print(f"skipped: {s}")
    for e in rec.timing_errors:
        print(f"timing error: {e['name']}: {e['error']}")
    print(f"JSON: {rec.args.out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    ap.add_argument("--small", action="store_true", help="shrink everything (a CPU test run of the script)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cuda, cuda:N, cpu")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after the start past which no timing part starts (default 240; --small 90)")
    ap.add_argument("--skip-checks", action="store_true", help="timings only")
    ap.add_argument("--skip-timings", action="store_true", help="checks only")
    args = ap.parse_args()
    if args.budget is None:
        args.budget = 90.0 if args.small else 240.0
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before any CUDA call)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    rec = Recorder(args, dev)
    print(f"gpu_check on {rec.env.get('gpu', dev)} (torch {torch.__version__}), small={args.small}, "
          f"budget {args.budget:.0f} s, out {args.out}", flush=True)
    families = SMALL_FAMILIES if args.small else ALL_FAMILIES
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        if not args.skip_checks:
            section(rec, "1a models, replacement, attribution", check_models, dev, families)
            section(rec, "1b training", check_training, dev, work / "train", args.small)
            section(rec, "1c interventions", check_interventions, dev, families)
        if not args.skip_timings:
            print(f"\n== 2 timings (guard: no part starts after {args.budget:.0f} s; now {rec.elapsed():.0f} s)",
                  flush=True)
            Timings(rec, dev, work / "timing", args.small).run_all()
    finally:
        rec.save()
        shutil.rmtree(work, ignore_errors=True)
    summary(rec)
    if any(not c["ok"] for c in rec.checks):
        return 1
    return 3 if rec.timing_errors else 0


if __name__ == "__main__":
    sys.exit(main())
