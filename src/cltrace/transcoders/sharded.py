"""Feature-sharded transcoder folders: what feature-sharded training writes, read back as one transcoder.

Rank j of n owns features [lo_j, hi_j) of every layer (contiguous, lo_j = j·F // n): their encoder columns
W_enc[:, :, lo:hi], b_enc and thresholds [:, lo:hi] and decoder rows W_dec[s][lo:hi]. A shard is an ordinary
`Transcoder` with n_features = hi − lo; the global shape is kept in `cfg.extra["shard"]`.

Folder: the global config.json, shards.json and one shard-JJJJJ-of-NNNNN.safetensors per feature shard (the
shared parameters b_dec and W_skip in shard 0 only). `load_sharded` concatenates the shards; `merge_shards`
writes the single-file format of `cltrace.transcoders.io`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from cltrace.errors import CltraceError
from cltrace.transcoders.lazy import LazyStore, Part, TensorFile, check_shapes, lazy_transcoder, read_small
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

SHARDS = "shards.json"
SHARED_PARAMS = ("b_dec", "W_skip")


def shard_bounds(n_features: int, n_shards: int) -> list[tuple[int, int]]:
    """[(lo, hi)] per shard: contiguous, sizes differ by at most one."""
    if not 1 <= n_shards <= n_features:
        raise CltraceError(f"cannot split {n_features} features into {n_shards} shards")
    cuts = [j * n_features // n_shards for j in range(n_shards + 1)]
    return list(zip(cuts[:-1], cuts[1:]))



def shard_config(cfg: TranscoderConfig, shard: int, n_shards: int) -> TranscoderConfig:
    """The config of shard `shard`: n_features = its slice; the global shape is kept in extra."""
    lo, hi = shard_bounds(cfg.n_features, n_shards)[shard]
    local = copy.deepcopy(cfg)
    local.n_features = hi - lo
    local.extra = {**cfg.extra, "shard": {"index": shard, "of": n_shards, "lo": lo, "hi": hi,
                                          "n_features": cfg.n_features}}
    return local


def global_config(local: TranscoderConfig) -> TranscoderConfig:
    """Inverse of shard_config."""
    info = local.extra.get("shard")
    if info is None:
        return local
    cfg = copy.deepcopy(local)
    cfg.n_features = info["n_features"]
    cfg.extra = {k: v for k, v in local.extra.items() if k != "shard"}
    return cfg


def shard_file(shard: int, n_shards: int) -> str:
    return f"shard-{shard:05d}-of-{n_shards:05d}.safetensors"


def save_shard(tc: Transcoder, folder: str | Path, *, metadata: dict | None = None) -> Path:
    """Write this rank's shard atomically (temp file + os.replace); shard 0 also writes the configs."""
    from safetensors.torch import save_file

    info = tc.cfg.extra.get("shard") or {"index": 0, "of": 1, "lo": 0, "hi": tc.n_features,
                                         "n_features": tc.n_features}
    j, n = info["index"], info["of"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "log_threshold": tc.log_threshold,
               **{f"W_dec_{s}": w for s, w in enumerate(tc.W_dec)}}
    if j == 0:
        tensors["b_dec"] = tc.b_dec
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "cltrace-transcoder-shard", "index": str(j), "of": str(n), "lo": str(info["lo"]),
            "hi": str(info["hi"])}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = folder / shard_file(j, n)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    if j == 0:
        _write_json(folder / "config.json", global_config(tc.cfg).to_dict())
        _write_json(folder / SHARDS, {"format": "cltrace-sharded-transcoder", "n_shards": n,
                                      "bounds": shard_bounds(info["n_features"], n)})
    return path


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def is_sharded_folder(folder: str | Path) -> bool:
    return (Path(folder) / SHARDS).exists()


def _read_index(folder: Path) -> tuple[TranscoderConfig, int, list[tuple[int, int]]]:
    try:
        cfg = TranscoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
        index = json.loads((folder / SHARDS).read_text())
        n, bounds = int(index["n_shards"]), [tuple(b) for b in index["bounds"]]
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise CltraceError(f"{folder} is not a readable sharded transcoder ({e})") from e
    missing = [shard_file(j, n) for j in range(n) if not (folder / shard_file(j, n)).exists()]
    if missing:
        raise CltraceError(f"{folder}: shard files {missing} are missing (was training interrupted before the "
                           "first checkpoint finished on every rank?)")
    return cfg, n, bounds


def load_shard(folder: str | Path, shard: int, *, device="cpu", dtype=torch.float32) -> Transcoder:
    """One rank's shard (resuming with the same number of feature shards)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg, n, _ = _read_index(folder)
    state = load_file(str(folder / shard_file(shard, n)))
    if shard != 0:  # shared parameters live in shard 0
        shared = load_file(str(folder / shard_file(0, n)))
        state.update({k: shared[k] for k in SHARED_PARAMS if k in shared})
    return Transcoder.from_state_dict(shard_config(cfg, shard, n), {_param_name(k): v for k, v in state.items()},
                                      device=device, dtype=dtype)


def load_sharded(folder: str | Path, *, device="cpu", dtype=torch.float32, lazy: bool = False) -> Transcoder:
    """All shards of a folder, concatenated into the full transcoder (lazy: left on disk, see
    `transcoders.lazy`; a layer's encoder is read from every shard, a feature's decoder row from its own)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg, n, bounds = _read_index(folder)
    if lazy:
        return _load_lazy(folder, cfg, n, bounds, device=device, dtype=dtype)
    parts = [load_file(str(folder / shard_file(j, n))) for j in range(n)]
    state = {
        "W_enc": torch.cat([p["W_enc"] for p in parts], dim=-1),
        "b_enc": torch.cat([p["b_enc"] for p in parts], dim=-1),
        "log_threshold": torch.cat([p["log_threshold"] for p in parts], dim=-1),
        **{f"W_dec.{s}": torch.cat([p[f"W_dec_{s}"] for p in parts], dim=0) for s in range(cfg.n_layers)},
        **{k: parts[0][k] for k in SHARED_PARAMS if k in parts[0]},
    }
    if state["W_enc"].shape[-1] != cfg.n_features or bounds[-1][1] != cfg.n_features:
        raise CltraceError(f"{folder}: shards hold {state['W_enc'].shape[-1]} features, config says "
                           f"{cfg.n_features}")
    try:
        return Transcoder.from_state_dict(cfg, state, device=device, dtype=dtype)
    except RuntimeError as e:
        raise CltraceError(f"{folder}: shards do not fit the config ({e})") from e


def _load_lazy(folder: Path, cfg: TranscoderConfig, n: int, bounds: list[tuple[int, int]], *, device,
               dtype) -> Transcoder:
    L, D = cfg.n_layers, cfg.d_model
    files = [TensorFile(folder / shard_file(j, n)) for j in range(n)]
    if bounds[-1][1] != cfg.n_features:
        raise CltraceError(f"{folder}: shards hold {bounds[-1][1]} features, config says {cfg.n_features}")
    parts = []
    for f, (lo, hi) in zip(files, bounds):
        n_out = [L - s if cfg.kind == "clt" else 1 for s in range(L)]
        check_shapes(f, {"W_enc": (L, D, hi - lo), **{f"W_dec_{s}": (hi - lo, n_out[s], D) for s in range(L)}})
        parts.append(Part(lo, hi, lambda layer, f=f: (f, "W_enc", layer), lambda layer, f=f: (f, f"W_dec_{layer}")))
    smalls = [read_small(f, {"b_enc": "b_enc", "log_threshold": "log_threshold"}) for f in files]
    small = {k: torch.cat([s[k] for s in smalls], dim=-1) for k in ("b_enc", "log_threshold")}
    small.update(read_small(files[0], {k: k for k in SHARED_PARAMS}))
    store = LazyStore(parts, files, cfg.n_features, dtype=dtype, device=device)
    return lazy_transcoder(cfg, small, store)


def _param_name(key: str) -> str:
    return f"W_dec.{key[6:]}" if key.startswith("W_dec_") else key
