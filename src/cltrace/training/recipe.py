"""The training recipe: the settings the CPU sweep in docs/training.md ("The recipe") found best, the defaults
of `cltrace train` for a token budget (--tokens) and a time budget (--minutes); --set and named flags still
override them, and a --config file starts from TrainConfig's own defaults instead. PASSES is the planner's
default number of passes over one collected sample (1 = stream fresh text once)."""

from __future__ import annotations

from cltrace.runtime import native_precision

RECIPE: dict = {
    "activation": "batchtopk",
    # 64 active features per token and layer (the paper's 18-layer CLT: L0 88): at a fixed token budget k = 64
    # leaves almost no feature dead (0.5% against 16% for k = 16 during the sweep's training) and reconstructs
    # better; a step costs 2.2x k = 16's, but in a time budget the model's forward (collection) dominates
    "k": 64,
    "lr": 2e-3,
    # batch 512: at a fixed token count steps are the strongest lever (131k tokens: NMSE 0.299 at batch 512,
    # 0.351 at 1,024, 0.523 at 2,048), and on a CPU a step of 512 trains as many tokens a second as one of 1,024
    "batch_size": 512,
    # the decoder starts at zero (sparsify's init): equal NMSE at 131k tokens (0.347 against 0.351) but the
    # spliced model gains the most of any lever but batch (top-1 0.341 against 0.306, CE increase 2.09 against 2.49)
    "init": "zero_decoder",
    "auxk": 1 / 32,
    "dead_tokens": 16384,
    "warmup": 0.02,
    # the sparse decode at any density: on a CPU it beats the dense one at every k swept (F = 512, k = 64, 12.5%
    # of the features active: 1,328 against 488 tok/s), where `auto` switches to dense above 5%
    "sparse_decode": "always",
}
# 2 passes over one cached sample: with the model's forward under bf16 autocast the sample is cheap, and at 10
# minutes 2 passes over 248k tokens beat 4 over 131k and 1 over 469k streamed (held-out NMSE 0.229 / 0.235 / 0.243)
PASSES: float = 2.0
GPU_LEAVES = ("sparse_decode",)  # on a GPU `auto` decodes densely under bf16 autocast, where tensor cores win


def recipe(device=None) -> dict:
    """The recipe's settings for a run on `device` (None: a CPU): RECIPE (less GPU_LEAVES on a GPU), and the
    model's forward under bf16 autocast when collecting activations where bf16 matmuls are native
    (`runtime.fast_bf16`: 3.3x the fp32 forward on an AVX512-BF16 CPU, so a time budget sees 3x the tokens;
    elsewhere bf16 is emulated, slower than fp32)."""
    out = dict(RECIPE)
    if device is not None and str(device).startswith("cuda"):
        out = {k: v for k, v in out.items() if k not in GPU_LEAVES}
    out["collect_precision"] = native_precision(device or "cpu")
    return out
