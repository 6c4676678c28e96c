"""The training recipe a time budget gets: the settings the CPU sweep in docs/training.md ("The recipe")
found best at a fixed budget. `cltrace train --minutes M` starts from these instead of TrainConfig's
defaults; --config, --set and named flags still override them. PASSES is the planner's default number of
passes over one collected sample (1 = stream fresh text once)."""

from __future__ import annotations

RECIPE: dict = {
    "activation": "batchtopk",
    "k": 16,
    "lr": 2e-3,
    "batch_size": 1024,
    "auxk": 1 / 32,
    "dead_tokens": 16384,
    "warmup": 0.02,
}
PASSES: float = 4.0
