"""Feature dashboards side by side: cltrace's `build_features` and SAEDashboard (pip `sae-dashboard`) on one layer
of the same PLT and the same tokens, Gemma-3-270M, CPU (issue 13).

    .venv/bin/python benchmarks/bench_saedashboard.py --tokens 16384 --layer 6 --threads 1

SAEDashboard runs in its own venv, made so (2.0 GB):

    python3 -m venv /tmp/saed-venv && P=/tmp/saed-venv/bin/pip
    $P install torch==2.13.0 && $P install sae-dashboard      # sae-dashboard 0.8.0
    $P install "pyarrow<21"      # transformer-lens 2.17.0 pins numpy<2 on Python 3.11; pyarrow 26 needs numpy>=2
    $P install torch==2.13.0     # decode-clt's torchaudio/torchvision pulled torch 2.14.1 (CUDA): back to CPU
    $P uninstall -y torchvision torchaudio triton cuda-toolkit cuda-bindings cuda-pathfinder
    $P uninstall -y $($P list | awk '/^nvidia-/{print $1}')

(`import sae_lens` fails without the pyarrow step: "ImportError: pyarrow requires NumPy 2.0 or newer, found
1.26.4"; torchvision/torchaudio are needed only by decode-clt's CLT loader, unused here.) This script starts it
as a worker (`--worker DIR`, run by that venv's python; it imports no cltrace). The two sides share only files
in the work folder: the token ids and the one layer's transcoder weights (safetensors), a JSON spec, and the
worker's JSON result.

SAEDashboard's side is what `NeuronpediaRunner.run` does per feature batch, with our token ids in place of its
ActivationsStore (which would need a HuggingFace dataset): `SaeVisRunner(SaeVisConfig(...)).run(...)` with the
runner's layout and defaults (128 features per batch, 32 prompts per forward, 5 quantile groups, 20 top and 5
per-quantile examples, model activations cached on disk across batches, BOS/EOS/pad ignored), then
`NeuronpediaConverter.convert_to_np_json` and one `batch-N.json` per batch. Model: TransformerLens's built-in
`google/gemma-3-270m` config with `hf_model=` our dequantized folder (`~/.cache/cltrace/models/gemma-3-270m`; by
name alone it would download from the hub), built from its config.json with the rope bases given explicitly
(transformers 4.56 there does not read the transformers-5 `rope_parameters`; its defaults happen to agree).
The transcoder layer: sae-lens's `JumpReLUTranscoder` (W_enc [D, F], b_enc, threshold, W_dec [F, D], b_dec) on
hook `blocks.L.ln2.hook_normalized`; that hook is x/rms(x), before the norm's weight, so the weight (1 + w of
Gemma's pre-feedforward norm) is folded into W_enc's rows and the pre-activations equal cltrace's on mlp_in
(checked: the read point on the first context, and each feature's top activation).

Reported, wall seconds on the same tokens (model loading excluded on both sides):
  * ours, all layers: `build_features` over the PLT's L layers (one forward, L layers' statistics, effects, the
    SQLite write) — raw, and divided by L ("per layer", an average that splits the shared forward L ways);
  * ours, this layer alone: the statistics pass of `FeatureStats` for the one layer, the forward stopped after
    it (no effects, no database): the closest like-for-like to SAEDashboard's forward + statistics; and that
    plus 1/L of the build's effects and database write (an estimate of a one-layer database: SAEDashboard's
    run also computes each feature's logits over the vocabulary, as our output effects do);
  * SAEDashboard, this layer: `SaeVisRunner.run` over all feature batches, and with the Neuronpedia JSON written.
Peak RSS of each side (its own process, sampled every 20 ms), and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peak import Peak  # benchmarks/peak.py (the script's folder is on sys.path)

SAED_PY = "/tmp/saed-venv/bin/python"
CONTEXT_LEN = 128
TL_NAME = "google/gemma-3-270m"


# ====================================================================== SAEDashboard side (its own venv)
def worker(folder: Path) -> None:
    """Run SAEDashboard as NeuronpediaRunner would, on the exchanged tokens and transcoder layer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from importlib.metadata import version

    from safetensors.torch import load_file

    spec = json.loads((folder / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    versions = {p: version(p) for p in ("sae-dashboard", "sae-lens", "transformer-lens", "transformers", "torch")}
    t = time.perf_counter()
    model, ln_w = _tl_model(Path(spec["model_folder"]), spec["layer"])
    load_s = time.perf_counter() - t
    ex = load_file(str(folder / "exchange.safetensors"))
    tokens = ex["tokens"]
    layer, hook = spec["layer"], f"blocks.{spec['layer']}.ln2.hook_normalized"
    with torch.no_grad():  # the read point: TL's x/rms(x) times the norm's weight = cltrace's mlp_in
        _, cache = model.run_with_cache(tokens[:1], stop_at_layer=layer + 1, names_filter=hook)
        theirs = cache[hook][0] * ln_w
        ours = ex["mlp_in0"]
        read_diff = float((theirs - ours).abs().max() / ours.abs().max())
    sae = _transcoder(ex, ln_w, hook, layer)
    n_feat = spec["max_features"] or sae.cfg.d_sae
    out = folder / "saed-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with Peak() as pk:
        run_s, json_s, top = _run_dashboards(model, sae, tokens, hook, spec, out, n_feat)
    # fold_W_dec_norm (which SaeVisRunner.run calls) scales feature f's activations by |W_dec[f]|
    scale = ex["W_dec"].norm(dim=1)
    ours_top = ex["act_max"][: len(top)] * scale[: len(top)]
    got = torch.tensor(top)
    fired = ours_top > 0
    top_diff = float(((got - ours_top).abs()[fired] / ours_top[fired]).max()) if bool(fired.any()) else 0.0
    size = sum(p.stat().st_size for p in out.iterdir())
    result = {"versions": versions, "model_load_s": load_s, "run_s": run_s, "json_s": json_s,
              "features": n_feat, "peak_rss_mib": pk.peak / 2**20, "read_point_rel_diff": read_diff,
              "top_act_max_rel_diff": top_diff, "features_compared": int(fired.sum()), "json_bytes": size}
    (folder / "saed-result.json").write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def _tl_model(folder: Path, layer: int):
    """TransformerLens Gemma-3-270M from our local HF folder (offline), and layer's pre-MLP norm weight (1 + w)."""
    from sae_lens import HookedSAETransformer
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    for k in ("dtype", "transformers_version", "_model_name_or_path"):
        cfg.pop(k, None)
    hc = Gemma3TextConfig(**cfg, rope_theta=rope.get("full_attention", {}).get("rope_theta", 1e6),
                          rope_local_base_freq=rope.get("sliding_attention", {}).get("rope_theta", 1e4))
    hf = Gemma3ForCausalLM(hc)
    missing, unexpected = hf.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"weights do not fit Gemma3ForCausalLM: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.eval()
    ln_w = (1.0 + hf.model.layers[layer].pre_feedforward_layernorm.weight.detach().float()).clone()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = HookedSAETransformer.from_pretrained(TL_NAME, hf_model=hf, tokenizer=tok, device="cpu",
                                                 dtype="float32")
    del hf
    return model, ln_w


def _transcoder(ex: dict, ln_w, hook: str, layer: int):
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    D, F = ex["W_enc"].shape
    cfg = JumpReLUTranscoderConfig(d_in=D, d_sae=F, d_out=D, dtype="float32", device="cpu",
                                   apply_b_dec_to_input=False, normalize_activations="none",
                                   metadata=SAEMetadata(hook_name=hook, hook_layer=layer, model_name=TL_NAME,
                                                        context_size=CONTEXT_LEN, prepend_bos=True))
    sae = JumpReLUTranscoder(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(ln_w[:, None] * ex["W_enc"])
        sae.b_enc.copy_(ex["b_enc"])
        sae.threshold.copy_(ex["threshold"])
        sae.W_dec.copy_(ex["W_dec"])
        sae.b_dec.copy_(ex["b_dec"])
    return sae.eval()


def _run_dashboards(model, sae, tokens, hook: str, spec: dict, out: Path, n_feat: int):
    """NeuronpediaRunner.run's per-batch loop; returns (run seconds, JSON seconds, top activation per feature)."""
    from sae_dashboard.components_config import (
        ActsHistogramConfig,
        Column,
        FeatureTablesConfig,
        LogitsHistogramConfig,
        LogitsTableConfig,
        SequencesConfig,
    )
    from sae_dashboard.layout import SaeVisLayoutConfig
    from sae_dashboard.neuronpedia.neuronpedia_converter import NeuronpediaConverter
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    np_cfg = NeuronpediaRunnerConfig(sae_set="cltrace-plt", sae_path=str(out), outputs_dir=str(out),
                                     n_prompts_total=len(tokens), n_tokens_in_prompt=tokens.shape[1],
                                     n_prompts_in_forward_pass=spec["prompts_per_forward"],
                                     n_features_at_a_time=spec["features_per_batch"], model_id=TL_NAME,
                                     layer=spec["layer"])
    tk = model.tokenizer
    vocab = {v: k for k, v in tk.vocab.items()}  # as NeuronpediaRunner.get_vocab_dict (without the HTML escapes)
    for i in range(len(vocab), model.cfg.d_vocab):
        vocab[i] = "<|outofrange|>"
    cache_dir = out.parent / "saed-acts"
    shutil.rmtree(cache_dir, ignore_errors=True)
    features = list(range(n_feat))
    run_s = json_s = 0.0
    top = [0.0] * n_feat
    for b in range(math.ceil(n_feat / np_cfg.n_features_at_a_time)):
        batch = features[b * np_cfg.n_features_at_a_time:(b + 1) * np_cfg.n_features_at_a_time]
        layout = SaeVisLayoutConfig(columns=[Column(
            SequencesConfig(stack_mode="stack-all", buffer=None, compute_buffer=True, n_quantiles=np_cfg.n_quantiles,
                            top_acts_group_size=np_cfg.top_acts_group_size,
                            quantile_group_size=np_cfg.quantile_group_size),
            ActsHistogramConfig(), LogitsHistogramConfig(), LogitsTableConfig(), FeatureTablesConfig(n_rows=3))])
        cfg = SaeVisConfig(hook_point=hook, features=batch, minibatch_size_features=np_cfg.n_features_at_a_time,
                           minibatch_size_tokens=np_cfg.n_prompts_in_forward_pass,
                           quantile_feature_batch_size=np_cfg.quantile_feature_batch_size, verbose=False,
                           device="cpu", feature_centric_layout=layout, perform_ablation_experiments=False,
                           dtype="float32", cache_dir=cache_dir,
                           ignore_tokens={tk.pad_token_id, tk.bos_token_id, tk.eos_token_id}, ignore_positions=[],
                           use_dfa=False)
        t = time.perf_counter()
        data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
        t1 = time.perf_counter()
        text = NeuronpediaConverter.convert_to_np_json(model, data, np_cfg, vocab)
        (out / f"batch-{b}.json").write_text(text)
        t2 = time.perf_counter()
        run_s += t1 - t
        json_s += t2 - t1
        print(f"  saedashboard: batch {b} ({len(batch)} features) {t1 - t:.1f} s + JSON {t2 - t1:.1f} s",
              flush=True)
        for feat in json.loads(text)["features"]:  # the top-activations group's bin_max is the feature's max
            tops = [a["bin_max"] for a in feat["activations"] if a["bin_min"] == -1]
            top[feat["feature_index"]] = float(tops[0]) if tops else 0.0
    shutil.rmtree(cache_dir, ignore_errors=True)
    return run_s, json_s, top


# ====================================================================== cltrace side
def ours(args, work: Path) -> None:
    from cltrace.runtime import tune_cpu_memory

    tune_cpu_memory()  # as the CLI (the worker, a separate process, keeps its own defaults)
    from safetensors.torch import save_file

    from cltrace.data import ContextStream
    from cltrace.data.activations import keep_mask
    from cltrace.data.tokens import special_tokens
    from cltrace.features import FeatureStats, build_features
    from cltrace.models.registry import load_model, model_dir
    from cltrace.replacement import random_transcoder
    from cltrace.transcoders.io import load_transcoder

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = load_model("gemma-3-270m")
    n_ctx = math.ceil(args.tokens / CONTEXT_LEN)
    ids = torch.tensor(ContextStream(None, model.tokenizer, CONTEXT_LEN, split="all", loop=False).take(n_ctx))
    n_tok = ids.numel()
    if args.transcoders:
        tc = load_transcoder(args.transcoders)
        desc = f"{args.transcoders} ({tc.cfg.kind.upper()}, {tc.n_features} features/layer, {tc.cfg.activation})"
    else:
        tc = random_transcoder(model, "plt", args.features, args.active * (CONTEXT_LEN - 1), ids=ids[:1])
        desc = (f"random PLT, {args.features} features/layer, JumpReLU thresholds calibrated to about "
                f"{args.active} active features/layer/token on the first context")
    if tc.cfg.activation not in ("jumprelu", "batchtopk") or tc.cfg.reads != "mlp_in" or tc.cfg.skip:
        sys.exit("the SAEDashboard side takes a JumpReLU/BatchTopK transcoder reading mlp_in, without skip")
    L, F, layer = tc.n_layers, tc.n_features, args.layer
    print(f"model {model.name}; {desc}; layer {layer}; {n_ctx} contexts x {CONTEXT_LEN} = {n_tok:,} tokens; "
          f"{threads} thread(s) on both sides", flush=True)

    # 1. ours, this layer alone: FeatureStats for one layer, the forward stopped after it (as FeatureStats.add_batch,
    # without the final-norm scale, which needs the whole forward)
    _, _, specials = special_tokens(model.tokenizer)
    stats = FeatureStats(1, F, CONTEXT_LEN, special_ids=specials)
    with Peak() as pk_one, torch.no_grad():
        t = time.perf_counter()
        for b in ids.split(args.batch_size):
            trace = model.forward(b, stop_at_layer=layer + 1, compute_logits=False)
            keep = keep_mask(b, specials)
            x = trace.mlp_in[layer].reshape(b.numel(), -1)
            a = tc.activate(tc.pre_acts(x, layer), layer, training=False).float().view(*b.shape, F)
            stats.update_layer(0, a.masked_fill(~keep[..., None], 0.0), stats.n_contexts)
            stats.n_contexts += len(b)
        one_s = time.perf_counter() - t
    with torch.no_grad():
        trace = model.forward(ids[:1], stop_at_layer=layer + 1, compute_logits=False)

    # 2. ours, all layers: the whole database (after 1, so that 1's peak RSS is its own)
    import cltrace.features.build as fb

    db = work / "features.db"
    finish = {"compute_effects": 0.0, "save_database": 0.0}  # seconds of the whole-database steps after the pass
    originals = {name: getattr(fb, name) for name in finish}

    def timed(name):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return originals[name](*a, **kw)
            finally:
                finish[name] += time.perf_counter() - t0
        return run

    for name in finish:
        setattr(fb, name, timed(name))
    try:
        with Peak() as pk_all:
            t = time.perf_counter()
            build_features(model, tc, n_tokens=n_tok, context_len=CONTEXT_LEN, batch_size=args.batch_size, out=db,
                           progress=False, checkpoint_every=0)
            all_s = time.perf_counter() - t
    finally:
        for name, f in originals.items():
            setattr(fb, name, f)
    share = (finish["compute_effects"] + finish["save_database"]) / L  # one layer's share of effects + db write
    db_size = db.stat().st_size

    ex = {"tokens": ids.contiguous(), "W_enc": tc.W_enc[layer].detach().contiguous(),
          "b_enc": tc.b_enc[layer].detach().contiguous(), "threshold": tc.threshold[layer].detach().contiguous(),
          "W_dec": tc.W_dec[layer][:, 0].detach().contiguous(), "b_dec": tc.b_dec[layer].detach().contiguous(),
          "mlp_in0": trace.mlp_in[layer][0].detach().contiguous(), "act_max": stats.act_max[0].contiguous()}
    save_file({k: v.float() if v.is_floating_point() else v for k, v in ex.items()},
              str(work / "exchange.safetensors"))
    spec = {"layer": layer, "model_folder": str(model_dir("gemma-3-270m")), "threads": threads,
            "features_per_batch": args.features_per_batch, "prompts_per_forward": args.prompts_per_forward,
            "max_features": args.max_features}
    (work / "spec.json").write_text(json.dumps(spec))
    del model, tc, stats, trace

    # 3. SAEDashboard, in its venv
    cmd = [args.saed_python, os.path.abspath(__file__), "--worker", str(work)]
    print("$", " ".join(cmd), flush=True)
    with open(work / "saed-stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            if line.startswith("  saedashboard"):
                print(line.rstrip(), flush=True)
    if proc.wait() != 0 or not (work / "saed-result.json").exists():
        print((work / "saed-stderr.log").read_text()[-8000:])
        sys.exit(f"the SAEDashboard worker failed (exit status {proc.returncode}); the end of its stderr is above")
    r = json.loads((work / "saed-result.json").read_text())
    n_f = r["features"]
    note = "" if n_f == F else f" (first {n_f} of {F} features)"
    saed_total = r["run_s"] + r["json_s"]
    print(f"\nSAEDashboard: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}; TransformerLens model "
          f"loaded in {r['model_load_s']:.0f} s (not counted)")
    print(f"same computation: read point max rel. diff {r['read_point_rel_diff']:.1e}; top activation per feature "
          f"max rel. diff {r['top_act_max_rel_diff']:.1e} over {r['features_compared']} features that fired (the JSON "
          "rounds to 3 decimals)\n")
    print("| run | features | wall s | tokens/s | x ours one layer | peak RSS MiB | output |")
    print("|---|---|---|---|---|---|---|")
    rows = [
        (f"cltrace build_features, all {L} layers (forward, stats, effects, SQLite)", L * F, all_s, pk_all.peak,
         f"{db_size / 1e6:.1f} MB db"),
        (f"cltrace build_features, all layers / {L} (per-layer average)", F, all_s / L, None, ""),
        (f"cltrace FeatureStats pass, layer {layer} alone (forward to layer {layer}, no effects, no db)", F, one_s,
         pk_one.peak, "(in memory)"),
        (f"cltrace layer {layer} alone + 1/{L} of the build's effects and db write (estimate)", F, one_s + share,
         None, ""),
        (f"SAEDashboard SaeVisRunner, layer {layer}{note}", n_f, r["run_s"], None, "(in memory)"),
        (f"SAEDashboard SaeVisRunner + Neuronpedia JSON, layer {layer}{note}", n_f, saed_total,
         r["peak_rss_mib"] * 2**20,
         f"{r['json_bytes'] / 1e6:.1f} MB JSON"),
    ]
    for name, feats, sec, peak, output in rows:
        print(f"| {name} | {feats:,} | {sec:.1f} | {n_tok / sec:,.0f} | {sec / one_s:.2f} | "
              f"{'' if peak is None else f'{peak / 2**20:,.0f}'} | {output} |")
    print(json.dumps({"tokens": n_tok, "layer": layer, "layers": L, "features_per_layer": F, "threads": threads,
                      "transcoder": desc, "ours_all_layers_s": all_s, "ours_all_peak_mib": pk_all.peak / 2**20,
                      "ours_one_layer_s": one_s, "ours_effects_s": finish["compute_effects"],
                      "ours_db_write_s": finish["save_database"], "ours_db_bytes": db_size, "saedashboard": r}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens (contexts of 128) for both sides")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--transcoders", default=None, help="a PLT folder (default: a random calibrated PLT)")
    ap.add_argument("--features", type=int, default=2048, help="random PLT: features per layer (default 2048)")
    ap.add_argument("--active", type=int, default=64, help="random PLT: active features per layer per token")
    ap.add_argument("--batch-size", type=int, default=16, help="ours: contexts per forward (the build's default)")
    ap.add_argument("--features-per-batch", type=int, default=128,
                    help="SAEDashboard: features per SaeVisRunner run (NeuronpediaRunner's default 128)")
    ap.add_argument("--prompts-per-forward", type=int, default=32,
                    help="SAEDashboard: prompts per forward (NeuronpediaRunner's default 32)")
    ap.add_argument("--max-features", type=int, default=0,
                    help="SAEDashboard: only the first N features (0: all; for a quick check)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    ap.add_argument("--saed-python", default=SAED_PY, help=f"the SAEDashboard venv's python (default {SAED_PY})")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args.worker:
        return worker(Path(args.worker))
    if not os.path.exists(args.saed_python):
        sys.exit(f"no SAEDashboard venv at {args.saed_python}: see this script's docstring")
    tmp = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_saed_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ours(args, work)
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
