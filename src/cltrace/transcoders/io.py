"""Saving and loading transcoders. `load_transcoder` is the one loader: it reads every format (no pickle).

    cltrace folder           config.json + transcoder.safetensors            (this module; `save_transcoder`)
    feature-sharded folder   config.json + shards.json + shard-*.safetensors  (`transcoders.sharded`)
    training checkpoint      RUN/checkpoints/step-N/state.{json,safetensors}  (`transcoders.checkpoint`)
    circuit-tracer folder    config.yaml + per-layer safetensors             (`transcoders.circuit_tracer_format`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.checkpoint import is_checkpoint, transcoder_from_checkpoint
from cltrace.transcoders.circuit_tracer_format import load_circuit_tracer
from cltrace.transcoders.lazy import (
    SMALL_PARAMS,
    LazyStore,
    Part,
    TensorFile,
    check_shapes,
    lazy_transcoder,
    read_small,
)
from cltrace.transcoders.sharded import SHARDS, load_sharded
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

CONFIG = "config.json"
WEIGHTS = "transcoder.safetensors"


def save_transcoder(tc: Transcoder, folder: str | Path) -> Path:
    """Write atomically: files go to temporary names first and are renamed into place."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": tc.W_enc, "b_enc": tc.b_enc, "log_threshold": tc.log_threshold, "b_dec": tc.b_dec,
        **{f"W_dec_{s}": w for s, w in enumerate(tc.W_dec)},
    }
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp_w, tmp_c = folder / (WEIGHTS + ".tmp"), folder / (CONFIG + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "cltrace-transcoder"})
    tmp_c.write_text(json.dumps(tc.cfg.to_dict(), indent=2))
    os.replace(tmp_w, folder / WEIGHTS)
    os.replace(tmp_c, folder / CONFIG)
    return folder


def load_transcoder(folder: str | Path, *, device="cpu", dtype=torch.float32, lazy: bool | str = "auto"
                     ) -> Transcoder:
    """Load a cltrace transcoder folder, a feature-sharded one (shards.json), a circuit-tracer one (config.yaml),
    or a training checkpoint (`RUN/checkpoints/step-N`: the transcoder as it stood at that step).

    lazy: True keeps W_enc and W_dec on disk and reads one layer's encoder / the listed features' decoder rows
    when they are used (`transcoders.lazy`; same values bit for bit; training needs lazy=False). "auto": lazy
    when the weight files exceed half the memory available now.

    In eval mode: a loaded transcoder is for inference, and a BatchTopK one in training mode would keep the top
    k·N of whatever batch it is given instead of applying its learned thresholds.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CltraceError(f"no transcoder folder at {folder}: give a folder written by `cltrace train`")
    if lazy == "auto":
        lazy = _weights_bytes(folder) > 0.5 * _available_memory()
    return _load(folder, device=device, dtype=dtype, lazy=bool(lazy)).eval()


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def _load(folder: Path, *, device, dtype, lazy: bool = False) -> Transcoder:
    if is_checkpoint(folder):
        return transcoder_from_checkpoint(folder, device=device, dtype=dtype, lazy=lazy)
    if (folder / SHARDS).exists() and not (folder / WEIGHTS).exists():  # feature-sharded training output
        return load_sharded(folder, device=device, dtype=dtype, lazy=lazy)
    if not (folder / CONFIG).exists() and (folder / "config.yaml").exists():
        return load_circuit_tracer(folder, device=device, dtype=dtype, lazy=lazy)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise CltraceError(
            f"{folder} holds no transcoder ({CONFIG} + {WEIGHTS}, or a circuit-tracer config.yaml)"
        )
    if lazy:
        return _load_lazy(folder, device=device, dtype=dtype)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = TranscoderConfig.from_dict(json.loads((folder / CONFIG).read_text()))
        state = load_file(str(folder / WEIGHTS))
    except (json.JSONDecodeError, TypeError, SafetensorError, OSError) as e:
        raise CltraceError(f"{folder} is corrupt or not a cltrace transcoder ({e}); retrain or re-export it") from e
    tc = Transcoder(cfg, device="meta", init=False)
    expected = {k for k, _ in tc.named_parameters()}
    state = {_param_name(k): v for k, v in state.items()}
    if set(state) != expected:
        raise CltraceError(f"{folder}: tensors {sorted(set(state) ^ expected)} missing or unexpected")
    for name, p in tc.named_parameters():
        if tuple(state[name].shape) != tuple(p.shape):
            raise CltraceError(f"{folder}: {name} has shape {tuple(state[name].shape)}, config says {tuple(p.shape)}")
    return Transcoder.from_state_dict(cfg, state, device=device, dtype=dtype)


def _load_lazy(folder: Path, *, device, dtype) -> Transcoder:
    """The single-file folder with W_enc [L, D, F] and W_dec_s [F, n_out(s), D] left on disk."""
    try:
        cfg = TranscoderConfig.from_dict(json.loads((folder / CONFIG).read_text()))
        cfg.validate()
    except (json.JSONDecodeError, TypeError, ValueError, OSError) as e:
        raise CltraceError(f"{folder} is corrupt or not a cltrace transcoder ({e}); retrain or re-export it") from e
    f = TensorFile(folder / WEIGHTS)
    L, D, F = cfg.n_layers, cfg.d_model, cfg.n_features
    n_out = [L - s if cfg.kind == "clt" else 1 for s in range(L)]
    check_shapes(f, {"W_enc": (L, D, F), **{f"W_dec_{s}": (F, n_out[s], D) for s in range(L)}})
    store = LazyStore([Part(0, F, lambda layer: (f, "W_enc", layer), lambda layer: (f, f"W_dec_{layer}"))], [f], F,
                      dtype=dtype, device=device)
    return lazy_transcoder(cfg, read_small(f, {n: n for n in SMALL_PARAMS}), store)


def merge_shards(folder: str | Path, out: str | Path) -> Path:
    """Feature-sharded folder -> the single-file folder (one file to copy, share or memory-map)."""
    return save_transcoder(load_sharded(folder), out)


def _param_name(key: str) -> str:
    return f"W_dec.{key[6:]}" if key.startswith("W_dec_") else key


def check_fits(tc: Transcoder, model) -> None:
    """Raise a clear error when a transcoder was made for another model."""
    problems = []
    if tc.n_layers != model.n_layers:
        problems.append(f"{tc.n_layers} layers vs the model's {model.n_layers}")
    if tc.d_model != model.d_model:
        problems.append(f"d_model {tc.d_model} vs the model's {model.d_model}")
    if problems:
        name = tc.cfg.model_name or "another model"
        raise CltraceError(
            f"these transcoders do not fit model {model.name} ({'; '.join(problems)}); they were made for "
            f"{name}: load model {name}, or transcoders trained on {model.name}"
        )
