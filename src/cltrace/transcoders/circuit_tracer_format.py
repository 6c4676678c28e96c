"""Read and write circuit-tracer's transcoder folders (`config.yaml` + per-layer safetensors).

circuit-tracer (Hanna, Piotrowski et al.) stores weights transposed relative to ours and per layer:

    transcoder_set (PLT), layer_{i}.safetensors:
        W_enc (F, D)  b_enc (F,)  W_dec (F, D)  b_dec (D,)  [activation_function.threshold (F,)]  [W_skip (D, D)]
    cross_layer_transcoder (CLT):
        W_enc_{i}.safetensors: W_enc_{i} (F, D)  b_enc_{i} (F,)  b_dec_{i} (D,)  [threshold_{i} (F,)]
        W_dec_{i}.safetensors: W_dec_{i} (F, L − i, D)   (decoder of layer-i features into layers i..L−1)

Their activation is JumpReLU a = x·[x > θ] with θ stored raw (ours: θ = exp(log_threshold)), or ReLU when
no threshold is stored. Their PLT skip is x @ W_skipᵀ (ours: x @ W_skip). The read point is named by
`feature_input_hook`: `hook_resid_mid` is the residual stream before the MLP norm, `ln2.hook_normalized` /
`mlp.hook_in` the normalized MLP input. We keep it in `cfg.reads` ("resid_mid" | "mlp_in") so
the replacement model reads where the transcoder was trained to read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.transcoders.lazy import LazyStore, Part, TensorFile, check_shapes, lazy_transcoder
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

# circuit-tracer / TransformerLens hook name -> our read or write point
INPUT_HOOKS = {"hook_resid_mid": "resid_mid", "ln2.hook_normalized": "mlp_in", "mlp.hook_in": "mlp_in"}
OUTPUT_HOOKS = {"hook_mlp_out": "mlp_out", "mlp.hook_out": "mlp_out"}
EXPORT_INPUT_HOOK = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in"}


def load_circuit_tracer(folder: str | Path, *, device="cpu", dtype=torch.float32, lazy: bool = False
                        ) -> Transcoder:
    """A circuit-tracer `transcoder_set` or `cross_layer_transcoder` folder -> our `Transcoder` (lazy: encoders
    and decoders left in their per-layer files, see `transcoders.lazy`)."""
    import yaml
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CltraceError(f"{folder}/config.yaml cannot be read ({e})") from e
    kind = cfg.get("model_kind")
    in_hook, out_hook = cfg.get("feature_input_hook", "hook_resid_mid"), cfg.get("feature_output_hook", "hook_mlp_out")
    if in_hook not in INPUT_HOOKS or out_hook not in OUTPUT_HOOKS:
        raise CltraceError(
            f"{folder}: hooks {in_hook!r} -> {out_hook!r} are not supported; cltrace reads "
            f"{sorted(INPUT_HOOKS)} and writes {sorted(OUTPUT_HOOKS)}"
        )
    if lazy and kind in ("transcoder_set", "cross_layer_transcoder"):
        return _load_lazy(folder, cfg, kind, in_hook, device=device, dtype=dtype)
    try:
        if kind == "transcoder_set":
            layers = _load_numbered(folder, "layer_{}.safetensors", load_file)
            params = _plt_params(layers)
        elif kind == "cross_layer_transcoder":
            enc = _load_numbered(folder, "W_enc_{}.safetensors", load_file)
            dec = [load_file(str(folder / f"W_dec_{i}.safetensors")) for i in range(len(enc))]
            params = _clt_params(enc, dec)
        else:
            raise CltraceError(f"{folder}: model_kind {kind!r} is neither transcoder_set nor cross_layer_transcoder")
    except (SafetensorError, OSError, KeyError) as e:
        raise CltraceError(f"{folder} is not a complete circuit-tracer transcoder ({e})") from e
    L, D, F = params["W_enc"].shape
    tcfg = _config(folder, cfg, kind, in_hook, (L, D, F), params.pop("has_threshold"), "W_skip" in params)
    state = {k: v for k, v in params.items() if not k.startswith("W_dec")}
    state.update({f"W_dec.{s}": w for s, w in enumerate(params["W_dec"])})
    return Transcoder.from_state_dict(tcfg, state, device=device, dtype=dtype)


def _config(folder: Path, cfg: dict, kind: str, in_hook: str, shape: tuple[int, int, int], has_threshold: bool,
            skip: bool) -> TranscoderConfig:
    L, D, F = shape
    return TranscoderConfig(
        kind="plt" if kind == "transcoder_set" else "clt", n_layers=L, d_model=D, n_features=F,
        activation="jumprelu" if has_threshold else "relu", skip=skip, model_name=str(cfg.get("model_name", "")),
        reads=INPUT_HOOKS[in_hook], extra={"source": "circuit-tracer", "scan": str(cfg.get("scan", folder))},
    )


def _load_lazy(folder: Path, cfg: dict, kind: str, in_hook: str, *, device, dtype) -> Transcoder:
    """Encoders stored [F, D] per layer (read whole and transposed, as the eager load stacks them), decoders
    [F, n_out, D] (PLT: [F, D], given our middle axis) read by rows; small tensors converted as `_plt_params`
    and `_clt_params` convert them."""
    plt = kind == "transcoder_set"
    enc_pattern = "layer_{}.safetensors" if plt else "W_enc_{}.safetensors"
    L = 0
    while (folder / enc_pattern.format(L)).exists():
        L += 1
    if L == 0:
        raise CltraceError(f"{folder}: no {enc_pattern.format(0)} found")
    enc = [TensorFile(folder / enc_pattern.format(i)) for i in range(L)]
    dec = enc if plt else [TensorFile(folder / f"W_dec_{i}.safetensors") for i in range(L)]
    enc_name = (lambda i: "W_enc") if plt else (lambda i: f"W_enc_{i}")
    dec_name = (lambda i: "W_dec") if plt else (lambda i: f"W_dec_{i}")
    F, D = enc[0].shape(enc_name(0))
    for i in range(L):
        check_shapes(enc[i], {enc_name(i): (F, D)})
        check_shapes(dec[i], {dec_name(i): (F, D) if plt else (F, L - i, D)})
    thr = (lambda i: "activation_function.threshold") if plt else (lambda i: f"threshold_{i}")
    b_enc = (lambda i: "b_enc") if plt else (lambda i: f"b_enc_{i}")
    b_dec = (lambda i: "b_dec") if plt else (lambda i: f"b_dec_{i}")
    has_thr = thr(0) in enc[0].tensors
    skip = plt and any("W_skip" in f.tensors for f in enc)
    b = [enc[i].read(b_enc(i)) for i in range(L)]
    small = {
        "b_enc": torch.stack(b).float(),
        "log_threshold": torch.stack([_log_threshold(enc[i].read(thr(i)) if has_thr else None, b[i])
                                      for i in range(L)]),
        "b_dec": torch.stack([enc[i].read(b_dec(i)) for i in range(L)]).float(),
    }
    if skip:
        small["W_skip"] = torch.stack([enc[i].read("W_skip").T if "W_skip" in enc[i].tensors else torch.zeros(D, D)
                                       for i in range(L)]).contiguous().float()
    store = LazyStore(
        [Part(0, F, lambda i: (enc[i], enc_name(i), None), lambda i: (dec[i], dec_name(i)))],
        enc + ([] if plt else dec), F, encoder_transposed=True,
        fold_dec=(lambda i, rows: rows[:, None, :].contiguous()) if plt else None, dtype=dtype, device=device)
    return lazy_transcoder(_config(folder, cfg, kind, in_hook, (L, D, F), has_thr, skip), small, store)


def _load_numbered(folder: Path, pattern: str, load_file) -> list[dict[str, Tensor]]:
    out = []
    while (folder / pattern.format(len(out))).exists():
        out.append(load_file(str(folder / pattern.format(len(out)))))
    if not out:
        raise CltraceError(f"{folder}: no {pattern.format(0)} found")
    return out


def _log_threshold(theta: Tensor | None, like: Tensor) -> Tensor:
    """Raw θ -> log θ (θ = 0 gives −inf, whose exp is 0 again). Negative θ cannot be represented."""
    if theta is None:
        return torch.full_like(like, math.log(0.1))  # unused: the activation is ReLU
    if (theta < 0).any():
        raise CltraceError("circuit-tracer thresholds below 0 cannot be represented as exp(log_threshold)")
    return theta.float().log()


def _plt_params(layers: list[dict[str, Tensor]]) -> dict:
    has_thr = "activation_function.threshold" in layers[0]
    skip = any("W_skip" in sd for sd in layers)
    D = layers[0]["b_dec"].shape[0]
    p = {
        "W_enc": torch.stack([sd["W_enc"].T for sd in layers]),  # [L, D, F]
        "b_enc": torch.stack([sd["b_enc"] for sd in layers]),  # [L, F]
        "log_threshold": torch.stack(
            [_log_threshold(sd.get("activation_function.threshold") if has_thr else None, sd["b_enc"]) for sd in layers]
        ),
        "W_dec": [sd["W_dec"][:, None, :] for sd in layers],  # [F, 1, D] each
        "b_dec": torch.stack([sd["b_dec"] for sd in layers]),  # [L, D]
        "has_threshold": has_thr,
    }
    if skip:  # theirs is x @ W_skipᵀ, ours x @ W_skip; a layer without one gets zeros
        p["W_skip"] = torch.stack([sd["W_skip"].T if "W_skip" in sd else torch.zeros(D, D) for sd in layers])
    return {k: (v.contiguous().float() if isinstance(v, Tensor) else v) for k, v in p.items()}


def _clt_params(enc: list[dict[str, Tensor]], dec: list[dict[str, Tensor]]) -> dict:
    L = len(enc)
    has_thr = "threshold_0" in enc[0]
    return {
        "W_enc": torch.stack([enc[i][f"W_enc_{i}"].T for i in range(L)]).contiguous().float(),
        "b_enc": torch.stack([enc[i][f"b_enc_{i}"] for i in range(L)]).float(),
        "log_threshold": torch.stack(
            [_log_threshold(enc[i].get(f"threshold_{i}") if has_thr else None, enc[i][f"b_enc_{i}"]) for i in range(L)]
        ),
        "W_dec": [dec[i][f"W_dec_{i}"].float().contiguous() for i in range(L)],  # [F, L − i, D]
        "b_dec": torch.stack([enc[i][f"b_dec_{i}"] for i in range(L)]).float(),
        "has_threshold": has_thr,
    }


def export_circuit_tracer(tc: Transcoder, folder: str | Path, model_name: str = "") -> Path:
    """Write `tc` as a circuit-tracer folder that `ReplacementModel.from_pretrained(model, <abs folder>)` loads."""
    import yaml
    from safetensors.torch import save_file

    act = tc.cfg.activation
    if act == "topk":
        raise CltraceError("circuit-tracer 0.5.0 has no TopK transcoders: export a JumpReLU or ReLU transcoder")
    if tc.cfg.kind == "clt" and tc.W_skip is not None:
        raise CltraceError("circuit-tracer cannot load a skip term for cross-layer transcoders")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jump = act in ("jumprelu", "batchtopk")  # batchtopk runs as JumpReLU with its learned threshold

    def c(t: Tensor) -> Tensor:
        return t.detach().float().contiguous().cpu()

    theta = tc.threshold
    for i in range(tc.n_layers):
        if tc.cfg.kind == "plt":
            sd = {"W_enc": c(tc.W_enc[i].T), "b_enc": c(tc.b_enc[i]), "W_dec": c(tc.W_dec[i][:, 0]),
                  "b_dec": c(tc.b_dec[i])}
            if jump:
                sd["activation_function.threshold"] = c(theta[i])
            if tc.W_skip is not None:
                sd["W_skip"] = c(tc.W_skip[i].T)
            save_file(sd, str(folder / f"layer_{i}.safetensors"))
        else:
            sd = {f"W_enc_{i}": c(tc.W_enc[i].T), f"b_enc_{i}": c(tc.b_enc[i]), f"b_dec_{i}": c(tc.b_dec[i])}
            if jump:
                sd[f"threshold_{i}"] = c(theta[i])
            save_file(sd, str(folder / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": c(tc.W_dec[i])}, str(folder / f"W_dec_{i}.safetensors"))
    config = {
        "model_kind": "transcoder_set" if tc.cfg.kind == "plt" else "cross_layer_transcoder",
        "feature_input_hook": EXPORT_INPUT_HOOK[tc.cfg.reads],
        "feature_output_hook": "hook_mlp_out",
        "model_name": model_name or tc.cfg.model_name,
        "scan": tc.cfg.extra.get("scan", f"cltrace-{tc.cfg.kind}-{tc.n_features}"),
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder
