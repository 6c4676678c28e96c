"""Small statistics the report needs, written once: rank correlation and a distribution's summary."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of x [n] (float64), ties sharing their average rank (what Spearman's ρ needs)."""
    x = x.double().flatten()
    n = x.numel()
    order = x.argsort(stable=True)
    sorted_x = x[order]
    r = torch.empty(n, dtype=torch.float64)
    # runs of equal values get the mean of the positions they span
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = sorted_x[1:] != sorted_x[:-1]
    group = new.cumsum(0) - 1  # [n] run index of each sorted element
    pos = torch.arange(1, n + 1, dtype=torch.float64)
    n_groups = int(group[-1]) + 1 if n else 0
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, pos) / \
        torch.bincount(group, minlength=n_groups).double()
    r[order] = mean[group]
    return r


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks. NaN for fewer than 3 pairs or a constant side."""
    x, y = torch.as_tensor(x).flatten(), torch.as_tensor(y).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs pairs: {x.numel()} values against {y.numel()}")
    if x.numel() < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float((rx.pow(2).sum() * ry.pow(2).sum()).sqrt())
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def describe(values: list[float]) -> dict:
    """mean, std, min, median, max and count of the finite values (NaN fields when there are none)."""
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    if v.numel() == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "median": math.nan, "max": math.nan}
    return {"n": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "min": float(v.min()), "median": float(v.quantile(0.5)), "max": float(v.max())}
