"""Reading the transcoder out of a training checkpoint folder (`RUN/checkpoints/step-N`).

A checkpoint (written by `cltrace.training.checkpoint`) holds state.safetensors (the transcoder as `tc.*`, the
norm scalars as `norm.*`, AdamW moments, RNG) and state.json (step, run config). Loading one here lets
`eval` and `trace` look at a run that is still going or was stopped, without importing the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.lazy import (
    SMALL_PARAMS,
    LazyStore,
    Part,
    TensorFile,
    check_shapes,
    lazy_transcoder,
    read_small,
)
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "state.safetensors").exists() and (Path(path) / "state.json").exists()


def transcoder_from_checkpoint(path: str | Path, *, device="cpu", dtype=torch.float32, lazy: bool = False):
    """The transcoder a training checkpoint holds, normalization folded in (it acts on raw activations), as the
    run's end would save it: so `eval` and `trace` can look at a run that is still going or was stopped.

    Reads only the transcoder's tensors and the norm scalars, not the AdamW moments (lazy: not W_enc and W_dec
    either, which are read, and folded, when used).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        if lazy:
            return _lazy(path, meta, device=device, dtype=dtype)
        with safe_open(str(path / "state.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("tc.", "norm."))}
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise CltraceError(f"checkpoint {path} is unreadable ({e})") from e
    cfg = _config(path, meta, t["tc.W_enc"].shape, "tc.W_skip" in t)
    tc = Transcoder.from_state_dict(cfg, {k[3:]: v for k, v in t.items() if k.startswith("tc.")})
    tc.fold_normalization(t["norm.x_scale"], t["norm.y_scale"])
    return tc.eval().to(device=device, dtype=dtype)


def _config(path: Path, meta: dict, enc_shape: tuple[int, ...], skip: bool) -> TranscoderConfig:
    run = meta.get("config") or {}
    L, D, F = enc_shape
    if run.get("features_per_layer") not in (None, F):
        raise CltraceError(f"{path} holds one feature shard ({F} of {run['features_per_layer']} features a layer): "
                           "let the run finish (or resume it) and use `cltrace merge-shards` on its output")
    cfg = TranscoderConfig(
        kind=run.get("kind", "clt"), n_layers=L, d_model=D, n_features=F, activation=run.get("activation", "jumprelu"),
        k=run.get("k", 0), skip=skip, bandwidth=run.get("bandwidth", 1.0),
        model_name=meta.get("model_name", ""),
        extra={"training": {"checkpoint": str(path), "steps": meta.get("step"), "tokens": meta.get("tokens")}},
    )
    return cfg


def _lazy(path: Path, meta: dict, *, device, dtype) -> Transcoder:
    """W_enc / W_dec left in state.safetensors; the fold of `Transcoder.fold_normalization` applied per read
    (the same elementwise division and product, so the values are those of the eager load bit for bit)."""
    f = TensorFile(path / "state.safetensors")
    cfg = _config(path, meta, f.shape("tc.W_enc"), "tc.W_skip" in f.tensors)
    L, D, F = cfg.n_layers, cfg.d_model, cfg.n_features
    n_out = [L - s if cfg.kind == "clt" else 1 for s in range(L)]
    check_shapes(f, {f"tc.W_dec.{s}": (F, n_out[s], D) for s in range(L)})
    x_scale, y_scale = f.read("norm.x_scale").float(), f.read("norm.y_scale").float()  # [L] each
    small = read_small(f, {k: f"tc.{k}" for k in SMALL_PARAMS})
    small = {k: v.float() for k, v in small.items()}
    small["b_dec"] = small["b_dec"] * y_scale[:, None]
    if "W_skip" in small:
        small["W_skip"] = small["W_skip"] * (y_scale / x_scale)[:, None, None]
    store = LazyStore(
        [Part(0, F, lambda layer: (f, "tc.W_enc", layer), lambda layer: (f, f"tc.W_dec.{layer}"))], [f], F,
        fold_enc=lambda layer, w: w / x_scale[layer],
        fold_dec=lambda s, rows: rows * y_scale[s:s + n_out[s]][None, :, None], dtype=dtype, device=device)
    return lazy_transcoder(cfg, small, store)
