"""Re-initializing dead features, so that a short run does not carry a third of its features as dead weight.

A feature is dead when it has not fired for `dead_tokens` tokens (`FeatureStats.dead`). Every
`resample_every` steps the trainer re-initializes the dead features of every layer s from the step's batch,
after the optimizer step (as in Anthropic's "Towards Monosemanticity" resampling, adapted to transcoders):

    pick a token n with probability ∝ its squared reconstruction error summed over the layers feature s writes to
        (CLT: layers s..L−1; PLT: s), with replacement; uniform when every error is zero
    W_enc[s][:, i] = x_ns / ‖x_ns‖ · (mean norm of layer s's live encoder columns)   points at that input
    b_enc[s, i]    = 0
    W_dec[s][i]    = 0 (every target layer)        the reconstruction does not jump; the decoder learns from
                                                   the tokens the feature now fires on
    JumpReLU only: log θ[s, i] = the median log θ of layer s's live features (a dead feature's θ has drifted up)
    AdamW's exp_avg and exp_avg_sq of exactly these entries = 0; the step counter is per tensor and stays
    feature statistics: tokens since fired = 0 and firing frequency = 0 (not dead again at once)

Nothing else changes: every other parameter, moment and statistic keeps its bits (tests/test_resample.py).
With zeroed moments the first update of a resampled entry is about 3·lr in size (Adam's (1−β1)/√(1−β2)), not lr.
The tokens are drawn from a generator seeded by (seed, step), so a resumed run resamples exactly as an
uninterrupted one. Single process only (data ranks would draw from different batches).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cltrace.training.metrics import FeatureStats
from cltrace.training.optim import AdamW, _inverse
from cltrace.transcoders.transcoder import Transcoder


def resample_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that draws the tokens of the resampling at `step` (a function of seed and step only)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 17)


def token_errors(recon: Tensor, y: Tensor) -> Tensor:
    """recon, y [N, L, D] -> [N, L] squared reconstruction error of each token at each layer (float64 on CPU)."""
    return (recon.detach().float() - y.float()).pow(2).sum(-1).double().cpu()


@torch.no_grad()
def resample_dead(tc: Transcoder, opt: AdamW, stats: FeatureStats, dead: Tensor, x: Tensor, err: Tensor,
                  generator: torch.Generator) -> Tensor:
    """Re-initialize the features marked in `dead` [L, F] as the module docstring says.

    x [N, L, D]: the step's normalized inputs; err [N, L]: `token_errors` of the step. Returns [L] the number
    of features re-initialized per layer.
    """
    L = tc.n_layers
    dead = dead.to(tc.b_enc.device)
    counts = dead.sum(-1).cpu()
    enc_norms = tc.W_enc.norm(dim=1)  # [L, F] column norms
    for s in range(L):
        idx = dead[s].nonzero().squeeze(-1)
        n = idx.numel()
        if n == 0:
            continue
        w = err[:, s:s + tc.n_out(s)].sum(-1)  # [N] the error this layer's features could have reduced
        w = w if float(w.sum()) > 0 else torch.ones_like(w)
        tokens = torch.multinomial(w, n, replacement=True, generator=generator).to(x.device)
        inp = x[tokens, s].float()  # [n, D]
        live = ~dead[s]
        scale = enc_norms[s][live].mean() if live.any() else enc_norms[s].mean()
        tc.W_enc[s][:, idx] = (inp / inp.norm(dim=-1, keepdim=True).clamp_min(1e-12) * scale).T.to(tc.b_enc.dtype)
        tc.b_enc[s, idx] = 0
        tc.W_dec[s][idx] = 0
        if tc.cfg.activation == "jumprelu" and live.any():
            tc.log_threshold[s, idx] = tc.log_threshold[s][live].median()
        for p, sel in _feature_slices(tc, s, idx):
            _zero_moments(opt, p, sel)
        stats.since_fired[s, idx] = 0
        stats.frequency[s, idx] = 0
    return counts


def _feature_slices(tc: Transcoder, s: int, idx: Tensor):
    """(parameter, index into the parameter) of every entry that belongs to features idx of layer s."""
    yield tc.W_enc, (s, slice(None), idx)
    yield tc.b_enc, (s, idx)
    if tc.cfg.activation == "jumprelu":
        yield tc.log_threshold, (s, idx)
    yield tc.W_dec[s], (idx,)


def _zero_moments(opt: AdamW, p: Tensor, sel: tuple) -> None:
    """Zero AdamW's moments of p[sel]; the state is held in p's memory-order view, so index it through p's shape."""
    for param, view, perm in zip(opt.params, opt.views, opt.perms):
        if param is not p:
            continue
        state = opt.opt.state.get(view, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = state.get(key)
            if t is None:
                continue
            as_param = t if perm is None else t.permute(_inverse(perm))  # a view of the same memory
            as_param[sel] = 0
        return
    raise ValueError("parameter not handled by this optimizer")
