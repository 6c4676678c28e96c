"""Training metrics: per-step statistics, a JSON-lines log, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor


class FeatureStats:
    """Which features fire: tokens since each last fired (dead) and a running firing frequency (dense)."""

    def __init__(self, n_layers: int, n_features: int, device=None):
        self.since_fired = torch.zeros(n_layers, n_features, dtype=torch.long, device=device)  # tokens
        self.frequency = torch.zeros(n_layers, n_features, device=device)  # EMA of the firing rate
        self.updates = 0

    @torch.no_grad()
    def update(self, fwd, decay: float = 0.9) -> Tensor:
        """fwd: the step's `TrainForward` (its listing of active entries, or its activations [N, L, F]);
        returns [L] mean L0 of this batch."""
        n_tokens = fwd.pre.shape[0]
        if fwd.listing is not None:
            L, F = self.since_fired.shape
            count = torch.bincount(fwd.listing.lay * F + fwd.listing.feats, minlength=L * F).view(L, F)  # [L, F]
        else:
            count = (fwd.acts != 0).sum(0, dtype=torch.int32)  # [L, F] (int32: no int64 copy of the mask)
        self.since_fired += n_tokens
        self.since_fired[count > 0] = 0
        rate = count.float() / n_tokens
        d = decay if self.updates else 0.0
        self.frequency.mul_(d).add_((1 - d) * rate)
        self.updates += 1
        return count.sum(-1).float() / n_tokens  # [L] mean active features per token

    def dead(self, window: int) -> Tensor:
        """[L, F] bool: not fired for `window` tokens (or ever, when fewer have been seen)."""
        return self.since_fired >= window

    def state(self) -> dict[str, Tensor]:
        return {"stats.since_fired": self.since_fired, "stats.frequency": self.frequency,
                "stats.updates": torch.tensor(self.updates)}

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.since_fired.copy_(tensors["stats.since_fired"])
        self.frequency.copy_(tensors["stats.frequency"])
        self.updates = int(tensors["stats.updates"])


class MetricsLog:
    """Appends one JSON object per line; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def _jsonable(x):
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def plot_curves(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Loss terms, NMSE, L0 and dead fraction against tokens, one panel each (matplotlib, Agg)."""
    rows = [r for r in read_metrics(metrics_path) if "tokens" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    for key in ("loss", "recon", "sparsity", "preact", "auxk"):
        vals = [r.get(key) for r in rows]
        if any(isinstance(v, (int, float)) and v > 0 for v in vals):
            ax.plot(tok, [v if isinstance(v, (int, float)) and v > 0 else float("nan") for v in vals], label=key)
    ax.set_yscale("log")
    ax.set_title("loss terms")
    ax.legend(fontsize=8)
    panels = [(axes[0, 1], "nmse", "mean NMSE (per layer, normalized MSE)"), (axes[1, 0], "l0", "mean L0 per layer"),
              (axes[1, 1], "dead_fraction", "dead / dense fraction")]
    for ax, key, name in panels:
        ax.plot(tok, [r.get(key, float("nan")) for r in rows], label=key)
        ax.set_title(name)
    axes[0, 1].set_yscale("log")
    axes[1, 1].plot(tok, [r.get("dense_fraction", float("nan")) for r in rows], label="dense_fraction")
    axes[1, 1].legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
