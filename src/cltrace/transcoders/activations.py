"""Sparse activation functions, with the straight-through estimators used to train them.

JumpReLU (Rajamanoharan et al. 2024): a(x) = x · H(x − θ) with a learned per-feature threshold θ. H has no
useful gradient, so training uses a pseudo-derivative: the Dirac delta at x = θ is replaced by a rectangle
kernel of width `bandwidth`, which gives θ a gradient from the features that land near their threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel: 1 on (−1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = grad * (x > threshold).to(x.dtype)
        # d/dθ [x·H(x−θ)] ≈ −θ/ε · K((x−θ)/ε)
        grad_t = -(threshold / bw) * _rect((x - threshold) / bw) * grad
        return grad_x, _sum_to(grad_t, threshold.shape), None


class _Step(torch.autograd.Function):
    """H(x − θ), with d/dθ ≈ −1/ε · K((x−θ)/ε); used by the L0-style penalties."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_t = -(1.0 / bw) * _rect((x - threshold) / bw) * grad
        return torch.zeros_like(x), _sum_to(grad_t, threshold.shape), None


def _sum_to(g: Tensor, shape) -> Tensor:
    while g.dim() > len(shape):
        g = g.sum(0)
    return g


def jumprelu(x: Tensor, threshold: Tensor, bandwidth: float = 1.0) -> Tensor:
    """x · H(x − θ); differentiable in θ through the rectangle-kernel estimator."""
    return _JumpReLU.apply(x, threshold, bandwidth)


def step(x: Tensor, threshold: Tensor, bandwidth: float = 1.0) -> Tensor:
    return _Step.apply(x, threshold, bandwidth)


def topk(x: Tensor, k: int) -> Tensor:
    """Keep the k largest positive pre-activations of each row (last dim), zero the rest."""
    vals, idx = x.topk(k, dim=-1)
    return torch.zeros_like(x).scatter(-1, idx, torch.relu(vals))


def batch_topk_cutoff(pre: Tensor, k: int, *, sample_stride: int = 16) -> Tensor:
    """pre [N, L, F] -> [L]: the (k·N)-th largest pre-activation of each layer over the whole batch. Exact.

    On a CPU a top-(k·N) of N·F values per layer costs 0.5 s a step at N = F = 2048 (18 layers); instead a
    1/16 subsample gives a lower bound that about 1.25·k·N values pass, and the top-(k·N) is taken among those
    (0.15 s). A layer where the bound lets fewer than k·N through falls back to the full top-k.
    """
    N, L, Fn = pre.shape
    flat = pre.detach().transpose(0, 1).reshape(L, N * Fn)  # [L, N·F] (a view when pre is layer-major)
    K = min(k * N, N * Fn)
    if flat.device.type != "cpu" or K < 1024 * sample_stride or 4 * K > N * Fn:
        return flat.topk(K, dim=-1, sorted=False).values.amin(-1)
    bound = flat[:, ::sample_stride].topk(K * 5 // (4 * sample_stride), dim=-1, sorted=False).values.amin(-1)
    cutoffs = []
    for row, b in zip(flat, bound):
        passed = row[row >= b]
        cutoffs.append((passed if len(passed) >= K else row).topk(K, sorted=False).values.amin())
    return torch.stack(cutoffs)


def batch_topk_mask(x: Tensor, k: int) -> Tensor:
    """x [N, L, F] -> bool [N, L, F]: the entries BatchTopK keeps (≥ the layer's cut-off, and > 0)."""
    cutoff = batch_topk_cutoff(x, k).to(x.dtype)  # [L]
    # a non-positive cut-off keeps exactly the positive values: x >= the smallest positive (subnormal) number
    smallest = torch.nextafter(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)).to(x.device)
    return x >= torch.where(cutoff > 0, cutoff, smallest)[None, :, None]


def batch_topk(x: Tensor, k: int) -> Tensor:
    """Keep the k·N largest positive pre-activations of the whole batch (Bussmann et al. 2024).

    x [N, F], or [N, L, F] with one budget of k·N per layer. The result is x where one mask holds (x ≥ the
    cut-off, and > 0), so the forward is one compare and one select and the backward one select, in x's own
    memory layout. Ties at the cut-off are all kept.
    """
    x3 = x[:, None] if x.dim() == 2 else x
    out = torch.where(batch_topk_mask(x3, k), x3, 0.0)  # no bool -> float conversion pass, forward or backward
    return out[:, 0] if x.dim() == 2 else out
