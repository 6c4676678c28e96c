"""Learning-rate and sparsity schedules: pure functions of the step (so resuming needs only the step)."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: float, decay: str, min_lr: float) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup, then cosine/linear/constant decay."""
    n_warm = int(warmup * total)
    if step < n_warm:
        return (step + 1) / n_warm
    if decay == "constant" or total <= n_warm:
        return 1.0
    t = (step - n_warm) / max(1, total - n_warm - 1)  # 0 -> 1 over the decay phase
    t = min(max(t, 0.0), 1.0)
    if decay == "linear":
        return 1.0 - (1.0 - min_lr) * t
    return min_lr + (1.0 - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def sparsity_factor(step: int, total: int, warmup: float) -> float:
    """λ ramps linearly from ~0 to its full value over the first `warmup` fraction of the steps."""
    n = int(warmup * total)
    if n <= 0:
        return 1.0
    return min(1.0, (step + 1) / n)


def retimed_steps(step: int, elapsed_s: float, budget_s: float) -> int:
    """The total steps that end training `budget_s` seconds after it began, at the rate of the `step` steps
    done in `elapsed_s` seconds; at least step + 1 (a retimed run never stops where it stands)."""
    if step < 1 or elapsed_s <= 0:
        raise ValueError("retiming needs at least one step done and time elapsed")
    return max(step + 1, math.floor(step * budget_s / elapsed_s + 1e-6))  # 1e-6: a whole ratio stays whole
