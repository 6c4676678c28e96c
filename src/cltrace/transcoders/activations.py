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


def batch_topk_cutoff(pre: Tensor, k: int) -> Tensor:
    """pre [N, L, F] -> [L]: the (k·N)-th largest pre-activation of each layer over the whole batch."""
    N, L, Fn = pre.shape
    flat = pre.detach().transpose(0, 1).reshape(L, N * Fn)  # [L, N·F]
    return flat.topk(min(k * N, N * Fn), dim=-1).values[:, -1]


def batch_topk(x: Tensor, k: int) -> Tensor:
    """Keep the k·N largest positive pre-activations of the whole batch (Bussmann et al. 2024).

    x [N, F], or [N, L, F] with one budget of k·N per layer. The result is relu(x) times a 0/1 mask, so its
    backward is one multiply (per-layer slicing of a grad-carrying [N, L, F] tensor would allocate a full-size
    zero gradient per layer). Ties at the cut-off are all kept.
    """
    x3 = x[:, None] if x.dim() == 2 else x
    cutoff = batch_topk_cutoff(x3, k)[None, :, None]  # [1, L, 1]
    out = torch.relu(x3) * (x3 >= cutoff).to(x.dtype)
    return out[:, 0] if x.dim() == 2 else out
