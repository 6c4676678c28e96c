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
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "state.safetensors").exists() and (Path(path) / "state.json").exists()


def transcoder_from_checkpoint(path: str | Path, *, device="cpu", dtype=torch.float32):
    """The transcoder a training checkpoint holds, normalization folded in (it acts on raw activations), as the
    run's end would save it: so `eval` and `trace` can look at a run that is still going or was stopped.

    Reads only the transcoder's tensors and the norm scalars, not the AdamW moments.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        with safe_open(str(path / "state.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("tc.", "norm."))}
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise CltraceError(f"checkpoint {path} is unreadable ({e})") from e
    run = meta.get("config") or {}
    L, D, F = t["tc.W_enc"].shape
    if run.get("features_per_layer") not in (None, F):
        raise CltraceError(f"{path} holds one feature shard ({F} of {run['features_per_layer']} features a layer): "
                           "let the run finish (or resume it) and use `cltrace merge-shards` on its output")
    cfg = TranscoderConfig(
        kind=run.get("kind", "clt"), n_layers=L, d_model=D, n_features=F, activation=run.get("activation", "jumprelu"),
        k=run.get("k", 0), skip="tc.W_skip" in t, bandwidth=run.get("bandwidth", 1.0),
        model_name=meta.get("model_name", ""),
        extra={"training": {"checkpoint": str(path), "steps": meta.get("step"), "tokens": meta.get("tokens")}},
    )
    tc = Transcoder.from_state_dict(cfg, {k[3:]: v for k, v in t.items() if k.startswith("tc.")})
    tc.fold_normalization(t["norm.x_scale"], t["norm.y_scale"])
    return tc.eval().to(device=device, dtype=dtype)
