"""Per-layer normalization scalars for transcoder inputs and outputs, estimated from data.

MLP inputs and outputs differ in scale by orders of magnitude across layers (and across models); the
trainer divides x_l by x_scale[l] and y_l by y_scale[l] so that every layer's loss and every layer's
encoder see vectors of comparable size, then multiplies reconstructions back. The scale is chosen so that
E ||x_l / x_scale[l]||^2 = D, i.e. each coordinate has unit mean square, as in Ameisen et al. (2025).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from cltrace.errors import CltraceError


@torch.no_grad()
def estimate_norm_scales(source, n_tokens: int = 65536, *, batch_size: int = 4096,
                         seed: int = 12345) -> tuple[Tensor, Tensor]:
    """(x_scale [L], y_scale [L]) = sqrt(mean over tokens of ||x_l||^2 / D), from n_tokens rows of source.

    Reads a separate, untracked batch sequence when the source supports it, so that the training
    stream's resume state is not disturbed.
    """
    if n_tokens < 1:
        raise CltraceError(f"n_tokens must be positive, not {n_tokens}")
    try:
        batches = source.batches(min(batch_size, n_tokens), seed=seed, track=False)
    except TypeError:  # a source without the track option
        batches = source.batches(min(batch_size, n_tokens), seed=seed)
    sx = torch.zeros(source.n_layers, dtype=torch.float64)
    sy = torch.zeros(source.n_layers, dtype=torch.float64)
    seen = 0
    # closing the side pass frees its shuffle buffer at once
    with contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext():
        for x, y in batches:  # [N, L, D]
            x, y = x[: n_tokens - seen], y[: n_tokens - seen]
            sx += x.double().pow(2).sum(dim=(0, 2)).cpu()
            sy += y.double().pow(2).sum(dim=(0, 2)).cpu()
            seen += len(x)
            if seen >= n_tokens:
                break
    if seen == 0:
        raise CltraceError("the activation source gave no rows: is the corpus empty?")
    d = source.d_model
    x_scale = (sx / (seen * d)).sqrt().float()
    y_scale = (sy / (seen * d)).sqrt().float()
    # a layer whose activations are all zero (a dead MLP) keeps scale 1 rather than dividing by 0
    return torch.where(x_scale > 0, x_scale, 1.0), torch.where(y_scale > 0, y_scale, 1.0)
