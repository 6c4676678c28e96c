"""Side by side with EleutherAI's sparsify: a per-layer transcoder (PLT) trained by `eai-sparsify` and by
`cltrace train --kind plt` on the same model, the same tokens, the same number of features and the same k, both
evaluated by `cltrace eval` on the same held-out contexts.

    # sparsify is not a dependency of cltrace; install it into the venv without letting it pull another torch:
    .venv/bin/pip install --no-deps eai-sparsify==1.3.3 einops natsort schedulefree simple-parsing docstring-parser
    .venv/bin/python benchmarks/bench_sparsify.py --work runs/bench_sparsify --tokens 65536 -F 512 --k 16

What is the same: the model (Gemma-3-270M, cltrace's dequantized copy, which sparsify loads with
`transformers`), the text (the first contexts of 128 tokens of the built-in corpus' training split, in the
order `cltrace train` streams them; special tokens left out of training by both), the features per layer, k
(TopK), the tokens per optimizer step (8 contexts) and the number of training tokens (one pass).
Each uses its own optimizer recipe: sparsify's defaults (SignSGD + schedule-free, LR 5e-3/√(F/2^14), no
AuxK), cltrace's recipe (AdamW, LR and AuxK of training/recipe.py).

Hooks: cltrace's transcoders read the normalized MLP input and write what the MLP adds to the residual stream,
which in Gemma 3 is the MLP's output *after* `post_feedforward_layernorm`. sparsify transcodes a module's
input to its output, so each layer's `mlp` is wrapped together with its post-norm (`Sequential(mlp, norm)`,
the norm then `Identity`): the model computes the same function, and the benchmark checks on one context that
the wrapped module's input and output equal cltrace's (x, y) of every layer before training. The unused LM head
is replaced by a 1-output layer (sparsify's "fvu" loss never reads logits; the 262k-row unembedding would
otherwise cost more than the 18 layers). sparsify's weights are then written as a cltrace PLT (TopK), so both
are evaluated by the same code.
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
from torch import nn

CLTRACE = str(Path(sys.executable).with_name("cltrace"))
MODEL = "gemma-3-270m"


def contexts(model, n_tokens: int, context_len: int) -> torch.Tensor:
    """[B, T] the first contexts of the corpus' training split that cover n_tokens non-special positions:
    what `cltrace train` streams from (its rows are these contexts' positions, shuffled)."""
    from cltrace.data import StreamingActivations, keep_mask
    from cltrace.data.tokens import special_tokens

    _, _, specials = special_tokens(model.tokenizer)
    stream = StreamingActivations(model, None, context_len=context_len).contexts()
    ids, kept = [], 0
    while kept < n_tokens:
        (c,) = stream.take(1)
        ids.append(c)
        kept += int(keep_mask(torch.tensor([c]), specials).sum())
    return torch.tensor(ids, dtype=torch.long)


def hf_model(model_dir: Path):
    """sparsify's model: transformers' Gemma 3 with each layer's `mlp` wrapped with its post-norm."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for layer in hf.model.layers:
        layer.mlp = nn.Sequential(layer.mlp, layer.post_feedforward_layernorm)
        layer.post_feedforward_layernorm = nn.Identity()
    hf.lm_head = nn.Linear(hf.config.hidden_size, 1, bias=False)  # logits unused by the "fvu" loss
    return hf


@torch.no_grad()
def check_hooks(hf, model, ids: torch.Tensor) -> float:
    """Largest relative difference between the wrapped modules' (input, output) and cltrace's (x, y)."""
    seen: dict[int, tuple] = {}
    handles = [layer.mlp.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
               for n, layer in enumerate(hf.model.layers)]
    hf(ids)
    for h in handles:
        h.remove()
    ours: dict[int, tuple] = {}
    model.forward(ids, mlp_hook=lambda layer, x, y: (ours.__setitem__(layer, (x, y)), y)[1])
    worst = 0.0
    for n, (x, y) in ours.items():
        for a, b in zip(seen[n], (x, y)):
            worst = max(worst, ((a - b).norm() / b.norm()).item())
    return worst


def train_sparsify(hf, ids: torch.Tensor, specials: set[int], F: int, k: int, batch: int, work: Path):
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    ds = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    cfg = TrainConfig(SaeConfig(transcode=True, num_latents=F, k=k), batch_size=batch,
                      hookpoints=[f"layers.{i}.mlp" for i in range(len(hf.model.layers))],
                      exclude_tokens=sorted(specials), log_to_wandb=False, save_dir=str(work / "sparsify-ckpt"),
                      save_every=10**9)
    hf.requires_grad_(False)
    trainer = Trainer(cfg, ds, hf)
    trainer.fit()
    return trainer.saes  # hookpoint -> SparseCoder (schedule-free: the averaged weights, set by the final save)


def to_cltrace(saes: dict, model, F: int, k: int, out: Path) -> None:
    """sparsify's per-layer coders as one cltrace PLT (TopK): pre = x W_enc + b_enc, y = topk(pre) W_dec + b_dec."""
    from cltrace.transcoders import Transcoder, TranscoderConfig
    from cltrace.transcoders.io import save_transcoder

    L, D = model.n_layers, model.d_model
    tc = Transcoder(TranscoderConfig(kind="plt", n_layers=L, d_model=D, n_features=F, activation="topk", k=k,
                                     model_name=model.name, extra={"trained_by": "eai-sparsify 1.3.3"}), init=False)
    with torch.no_grad():
        tc.log_threshold.zero_()
        for n in range(L):
            sae = saes[f"layers.{n}.mlp"]
            tc.W_enc[n].copy_(sae.encoder.weight.T)  # [D, F]
            tc.b_enc[n].copy_(sae.encoder.bias)
            tc.W_dec[n][:, 0].copy_(sae.W_dec)  # [F, D]
            tc.b_dec[n].copy_(sae.b_dec)
    save_transcoder(tc, out)


def cltrace_eval(folder: Path, tokens: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([CLTRACE, "eval", str(folder), "--tokens", str(tokens), "--json"], check=True, env=env,
                         capture_output=True, text=True)
    return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench_sparsify")
    ap.add_argument("--tokens", type=int, default=65_536, help="training tokens (non-special positions), one pass")
    ap.add_argument("-F", "--features", type=int, default=512, help="features per layer")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--contexts-per-step", type=int, default=8, help="128-token contexts per optimizer step")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from cltrace.data.tokens import special_tokens
    from cltrace.models.registry import load_model, model_dir

    model = load_model(MODEL)
    ids = contexts(model, args.tokens, 128)
    _, _, specials = special_tokens(model.tokenizer)
    results = {"tokens": args.tokens, "contexts": len(ids), "features": args.features, "k": args.k}

    # cltrace: the same contexts, streamed in the same order, one pass
    ours = work / "cltrace-plt"
    cmd = [CLTRACE, "-q", "train", "--model", MODEL, "--kind", "plt", "--activation", "topk", "--k", str(args.k),
           "-F", str(args.features), "--tokens", str(args.tokens), "--batch-size", str(args.contexts_per_step * 128),
           "--out", str(ours)]
    if not (ours / "transcoder.safetensors").exists():
        t = time.monotonic()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                       stdout=subprocess.DEVNULL)
        results["cltrace_train_s"] = round(time.monotonic() - t, 1)
    results["cltrace_cmd"] = " ".join(["cltrace", *cmd[1:]])

    # sparsify
    theirs = work / "sparsify-plt"
    if not (theirs / "transcoder.safetensors").exists():
        hf = hf_model(model_dir(MODEL))
        results["hook_max_rel_diff"] = check_hooks(hf, model, ids[:1])
        assert results["hook_max_rel_diff"] < 1e-3, results  # the wrapped modules read and write cltrace's x, y
        t = time.monotonic()
        saes = train_sparsify(hf, ids, specials, args.features, args.k, args.contexts_per_step, work)
        results["sparsify_train_s"] = round(time.monotonic() - t, 1)
        to_cltrace(saes, model, args.features, args.k, theirs)
        del hf, saes

    keys = ("nmse", "explained_variance", "l0", "dead_fraction", "top1_agreement", "ce_increase", "kl")
    a = cltrace_eval(ours, args.eval_tokens, args.threads)
    b = cltrace_eval(theirs, args.eval_tokens, args.threads)
    results["cltrace"] = {k: a[k] for k in keys} | {"nmse_layers": a["nmse_layers"]}
    results["sparsify"] = {k: b[k] for k in keys} | {"nmse_layers": b["nmse_layers"]}
    results["nmse_ratio_cltrace_over_sparsify"] = a["nmse"] / b["nmse"]
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print("| trainer | NMSE | EV | L0 | dead | top-1 | CE+ | KL |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("cltrace train --kind plt", results["cltrace"]), ("eai-sparsify 1.3.3", results["sparsify"])):
        print(f"| {name} | {r['nmse']:.3f} | {r['explained_variance']:.3f} | {r['l0']:.1f} | "
              f"{r['dead_fraction']:.3f} | {r['top1_agreement']:.3f} | {r['ce_increase']:.2f} | {r['kl']:.2f} |")
    print(f"NMSE ratio cltrace / sparsify: {results['nmse_ratio_cltrace_over_sparsify']:.3f}")
    print(json.dumps({k: v for k, v in results.items() if k not in ("cltrace", "sparsify")}))


if __name__ == "__main__":
    main()
