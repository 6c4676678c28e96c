"""Atomic, pickle-free training checkpoints.

Layout (under the run folder):

    checkpoints/step-000200/state.safetensors   every tensor: transcoder, AdamW moments, RNG, norm scales
    checkpoints/step-000200/state.json          everything else: step, optimizer hyper-parameters, data-source state
    checkpoints/LATEST                          the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/` and renamed into place, then LATEST is replaced (os.replace is
atomic), so a crash at any moment leaves the previous checkpoint intact and LATEST pointing at it. Nothing
is unpickled on load: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from cltrace.errors import CltraceError

LATEST = "LATEST"


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Tensor], meta: dict, *, keep: int = 1) -> Path:
    """Write tensors + JSON meta as checkpoint `step`; keep the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}"
    final, tmp = root / name, root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    for f in tmp.iterdir():  # make the files durable before they become visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in old[: max(0, len(old) - keep)]:
        if p.name != name:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        raise CltraceError(f"{pointer} names {path.name}, which is missing or incomplete: delete {root} to restart")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise CltraceError(f"checkpoint {path} is unreadable ({e}): delete it to restart from an older one") from e
    return tensors, meta


# ---------------------------------------------------------------------- optimizer state without pickle
def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """AdamW state -> ({'optim.<param index>.<key>': tensor}, JSON-able param_groups)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    # the saved moments are contiguous; a fused AdamW walks param, grad and moments as raw memory, so a moment
    # whose strides differ from its (target-major W_dec) parameter's would silently pair the wrong elements
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=v.dtype).copy_(v)
