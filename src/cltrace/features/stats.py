"""Per-feature statistics of a transcoder over a corpus, in one streaming pass.

For every feature of every layer (all L·F at once, vectorized over features) `FeatureStats` keeps:

    count, act_sum, act_max     tokens where it fires (activation > 0), Σ activation, max activation     [L, F]
    hist                        nonzero activations on a fixed log-spaced grid (48 bins over 1e-3..1e3 by
                                default) plus an underflow (< 1e-3) and an overflow (≥ 1e3) bin   [L, F, H]
    top-k examples              the k largest activations: value, global index (context·T + pos), and the
                                feature's activation over a window around that token              [L, k, F, W]
    quantile reservoir          per (feature, fine histogram bin) the m occurrences with the smallest random
                                keys, with their windows                                           [L, F, H, m, W]
    contexts                    the token ids of every context seen (int32 [n_contexts, T])

Memory is flat in the number of tokens: everything above is a fixed size per feature, except the context
token ids (4 bytes a token). Per feature that is 8·H (histogram) + k·(12 + 2W) (top-k) + H·m·(20 + 2W)
(reservoir) + 60 bytes; with the defaults (H = 50, k = 20, W = 25, m = 4) about 16 KB, so 4.6 GB for
18 layers × 16384 features, most of it the reservoir's windows (fewer `hist_bins` or a smaller `per_bin`
shrink it).

Windows. Each example stores the feature's activation at `before` tokens before and `after` tokens after
its token (NaN outside the context, 0 at special-token positions, which are not counted), as float16. They
are gathered from the batch's activations when the example is inserted, so no second pass is needed.

Ties in the top-k: of equal activations the earlier occurrence (smaller context index, then position) wins.
Contexts are processed in a fixed order, the running top-k always holds earlier tokens than a new batch, and
every sort is stable; exact ties do happen (a repeated text gives bit-identical activations).

Quantile examples: `n_ranges` equal ranges between 0 and the final max, `per_range` examples each, sampled
uniformly within each range. The final max is unknown during the pass, so: every nonzero occurrence gets a
pseudo-random key in [0, 1), a hash of (seed, layer, feature, global token index) (`occurrence_keys`), so
that it does not depend on which process saw the token or in which batch; for each feature and fine
histogram bin the m (= per_range) occurrences with the smallest (key, global index) are kept; at the end,
for each range, the kept occurrences with the smallest keys among those whose value lies in the range are
taken. For fine bins wholly inside a range this is *exactly* a uniform sample without replacement (the
range's per_range smallest keys are each among the per_range smallest of their own bin, so they were kept).
Only at range edges, in a fine bin that straddles two ranges, is it approximate, at the fine-bin width (a
factor 10^(6/48) ≈ 1.33 in value with the defaults): such a bin kept its m smallest keys over both sides, so
a range may get fewer, or not quite uniform, examples from it.

Co-activation (optional, `coactivation=M`, see `CoactStats`): for pairs of features (i, j) with j in the same
or a later layer, active at the same token, Σ a_i·a_j and the number of tokens where both fire, kept sparse: per
source feature i at most M partners, by a weighted Misra-Gries summary over the products (exact while a source
has at most M partners; otherwise every kept estimate is low by at most that source's `error`, and a pair not
kept has Σ a_i·a_j ≤ error). `coact_tokens=n` uses n random (non-special) tokens of each batch instead of all.

Sums are exact and independent of the order of the batches: each batch's float64 sum (of float32
activations; of the final norm's scales) is added to a fixed-point integer of SUM_LIMBS 32-bit limbs (units
of 2^-128 up to 2^95, `exact_add`), and read back as float64 only at the end (`exact_value`).

Merging (`merge`): statistics of disjoint sets of contexts, numbered in one global order (`add_batch`'s
ctx0), merge into exactly the statistics of one pass over their union: counts, histograms and sum limbs add,
maxima take the maximum, the top-k and the reservoir keep the k (m) best of both under the same total order
as the pass ((value desc, global index asc); (key asc, global index asc)). Only the co-activation summary
differs: its float64 sums by summation order, and once a source has more than M partners, in what it keeps
(within the same guarantee; see `CoactStats.merge`). features.distributed uses it to run the pass on many
processes.

Resuming: `state_dict()` holds plain tensors only (saved with safetensors), including the number of contexts
consumed, so a pass that is stopped, saved, loaded and continued (same batches in the same order) ends equal
to an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor

from cltrace.data.activations import keep_mask

NAN = float("nan")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}  # the encoder matmul's dtype (None: the weights')
SUM_LIMBS, LIMB_BITS, SUM_LSB = 6, 32, -128  # exact sums: limb i counts units of 2^(SUM_LSB + LIMB_BITS·i)


# ---------------------------------------------------------------------- order-free exact sums
def exact_add(limbs: Tensor, x: Tensor) -> Tensor:
    """limbs [..., SUM_LIMBS] int64 (normalized: limbs below the top in [0, 2^32)) += x [...] float64 ≥ 0,
    in place and exactly (x is cut below 2^-128). Integer addition is associative, so the result does not
    depend on the order of the additions: a pass split over processes sums to the same bits."""
    r = x.to(torch.float64)
    for i in reversed(range(SUM_LIMBS)):
        e = SUM_LSB + LIMB_BITS * i
        digit = torch.floor(r * 2.0 ** -e)  # < 2^32 below the top limb; powers of two scale exactly
        limbs[..., i] += digit.to(torch.int64)
        r = r - digit * 2.0 ** e  # exact (Sterbenz): what the lower limbs hold
    return normalize_limbs(limbs)


def normalize_limbs(limbs: Tensor) -> Tensor:
    """Carry every limb's bits above 32 into the next one (in place): one representation per value."""
    for i in range(SUM_LIMBS - 1):
        carry = limbs[..., i] >> LIMB_BITS
        limbs[..., i] -= carry << LIMB_BITS
        limbs[..., i + 1] += carry
    return limbs


def exact_value(limbs: Tensor) -> Tensor:
    """[...] float64 of normalized limbs [..., SUM_LIMBS] (rounded, the same way for the same limbs)."""
    value = torch.zeros(limbs.shape[:-1], dtype=torch.float64, device=limbs.device)
    for i in reversed(range(SUM_LIMBS)):
        value = value + limbs[..., i].to(torch.float64) * 2.0 ** (SUM_LSB + LIMB_BITS * i)
    return value


# ---------------------------------------------------------------------- keys of the quantile reservoir
def _int64(c: int) -> int:
    """A 64-bit constant as the signed int64 that has its bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (>> on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (multiplication wraps modulo 2^64): a bijective 64-bit mix."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def occurrence_keys(seed: int, layer: int, n_features: int, feature: Tensor, gidx: Tensor) -> Tensor:
    """[s] float64 keys in [0, 1) of occurrences (feature [s], global token index gidx [s]) of one layer: a
    hash of (seed, layer, feature, gidx), so any process computes the same key for the same occurrence."""
    base = splitmix64(torch.tensor(seed, dtype=torch.int64)).item()
    h = splitmix64(splitmix64(base ^ (layer * n_features + feature)) ^ gidx)
    return _shr(h, 11).to(torch.float64) * 2.0 ** -53  # the top 53 bits: exactly representable


def bin_edges(lo: float = 1e-3, hi: float = 1e3, n_bins: int = 48) -> Tensor:
    """[n_bins + 1] log-spaced edges. Bin 0 is (0, lo), bins 1..n_bins the grid, bin n_bins + 1 is [hi, ∞)."""
    return torch.logspace(math.log10(lo), math.log10(hi), n_bins + 1, dtype=torch.float64).float()


@dataclass
class Summary:
    """The finished statistics, on the CPU: what the feature database stores (see the module docstring)."""

    tokens: int  # tokens seen (special-token positions excluded)
    count: Tensor  # [L, F] int64
    act_sum: Tensor  # [L, F] float64
    act_max: Tensor  # [L, F] float32
    hist: Tensor  # [L, F, H] int64
    edges: Tensor  # [H - 1] float32 (see bin_edges)
    top_val: Tensor  # [L, k, F] float32, 0 where empty; sorted by (value desc, index asc)
    top_gidx: Tensor  # [L, k, F] int64 context·T + pos, -1 where empty
    top_win: Tensor  # [L, k, F, W] float16
    q_val: Tensor  # [L, F, R, p] float32, 0 where empty; sorted by value desc within a range
    q_gidx: Tensor  # [L, F, R, p] int64, -1 where empty
    q_win: Tensor  # [L, F, R, p, W] float16
    contexts: Tensor  # [n_contexts, T] int32
    final_scale: float  # mean over the tokens of the final norm's 1/rms (1/std) factor
    window: tuple[int, int]  # (before, after)
    coact: dict | None = None  # CoactStats.summary() when co-activation was measured

    @property
    def context_len(self) -> int:
        return int(self.contexts.shape[1])


class FeatureStats:
    """The running statistics of one pass (see the module docstring). `add_batch` feeds it contexts."""

    def __init__(self, n_layers: int, n_features: int, context_len: int, *, special_ids: set[int] | None = None,
                 top_k: int = 20, window: tuple[int, int] = (16, 8), per_bin: int = 4,
                 hist_range: tuple[float, float] = (1e-3, 1e3), hist_bins: int = 48, seed: int = 0,
                 device: torch.device | str = "cpu", coactivation: int = 0, coact_tokens: int = 0,
                 precision: str = "float32"):
        self._args = dict(n_layers=n_layers, n_features=n_features, context_len=context_len, special_ids=special_ids,
                          top_k=top_k, window=window, per_bin=per_bin, hist_range=hist_range, hist_bins=hist_bins,
                          seed=seed, device=device, coactivation=coactivation, coact_tokens=coact_tokens,
                          precision=precision)
        L, F, self.T = n_layers, n_features, context_len
        self.L, self.F = L, F
        self.k, self.window, self.m = top_k, (int(window[0]), int(window[1])), per_bin
        self.W = self.window[0] + 1 + self.window[1]
        self.special_ids = set(special_ids or ())
        self.matmul_dtype = PRECISIONS[precision]  # see `Transcoder.pre_acts`
        self.device = torch.device(device)
        self.edges = bin_edges(*hist_range, hist_bins).to(self.device)  # [H - 1]
        self.H = hist_bins + 2
        kw = dict(device=self.device)
        self.seed = seed
        self.tokens = 0
        self.n_contexts = 0  # contexts this object has seen (all of them on one process)
        self.final_scale_limbs = torch.zeros(SUM_LIMBS, dtype=torch.int64)  # exact Σ of the final norm's 1/rms
        self.count = torch.zeros(L, F, dtype=torch.int64, **kw)
        self.act_sum_limbs = torch.zeros(L, F, SUM_LIMBS, dtype=torch.int64, **kw)  # exact Σ activation
        self.act_max = torch.zeros(L, F, dtype=torch.float32, **kw)
        self.hist = torch.zeros(L, F, self.H, dtype=torch.int64, **kw)
        self.top_val = torch.zeros(L, self.k, F, dtype=torch.float32, **kw)
        self.top_gidx = torch.full((L, self.k, F), -1, dtype=torch.int64, **kw)
        self.top_win = torch.full((L, self.k, F, self.W), NAN, dtype=torch.float16, **kw)
        self.q_key = torch.full((L, F, self.H, self.m), math.inf, dtype=torch.float64, **kw)
        self.q_val = torch.zeros(L, F, self.H, self.m, dtype=torch.float32, **kw)
        self.q_gidx = torch.full((L, F, self.H, self.m), -1, dtype=torch.int64, **kw)
        self.q_win = torch.full((L, F, self.H, self.m, self.W), NAN, dtype=torch.float16, **kw)
        self.contexts: list[Tensor] = []  # int32 [B, T] per batch, on the CPU
        self.context_index: list[Tensor] = []  # int64 [B] per batch: the contexts' global indices
        self.coact = CoactStats(L, F, coactivation, coact_tokens, seed=seed + 1, device=self.device) \
            if coactivation > 0 else None

    # ------------------------------------------------------------------ the pass
    def empty_like(self) -> FeatureStats:
        """Fresh statistics with the same settings (nothing seen yet)."""
        return FeatureStats(**self._args)

    @property
    def act_sum(self) -> Tensor:
        """[L, F] float64 Σ activation (from the exact limbs)."""
        return exact_value(self.act_sum_limbs)

    @torch.no_grad()
    def add_batch(self, model, tc, ids: Tensor, ctx0: int | None = None) -> None:
        """ids [B, T]: contexts ctx0..ctx0+B-1 of the fixed global order (default: the next ones after those
        this object has seen; a process given a share of the corpus passes their global index). One forward
        of the model, then every layer."""
        ctx0 = self.n_contexts if ctx0 is None else int(ctx0)
        B, T = ids.shape
        if T != self.T:
            raise ValueError(f"contexts of {T} tokens, the statistics were set up for {self.T}")
        ids_dev = ids.to(model.device)
        trace = model.forward(ids_dev, compute_logits=False)
        keep = keep_mask(ids_dev, self.special_ids).to(self.device)  # [B, T] not BOS or another special token
        reads = tc.select_input(trace.resid_mid, trace.mlp_in)  # L × [B, T, D]
        scale = trace.frozen.scales["final"][..., 0].to(self.device)  # [B, T] the final norm's 1/rms
        exact_add(self.final_scale_limbs, scale[keep].double().sum().cpu())
        rows = self.coact.sample_rows(keep, ctx0) if self.coact is not None else None
        dropped = (~keep).reshape(-1).nonzero()[:, 0]  # rows not counted: zeroed in place (a few rows)
        picked = []
        for layer in range(self.L):
            x = reads[layer].reshape(B * T, -1).to(tc.b_enc.dtype)  # [N, D]
            pre = tc.pre_acts(x, layer, matmul_dtype=self.matmul_dtype)  # [N, F]
            a = tc.activate(pre, layer, training=False).float().to(self.device)
            a = a.index_fill_(0, dropped, 0.0).view(B, T, self.F)
            self.update_layer(layer, a, ctx0)
            if rows is not None:
                picked.append(a.view(B * T, self.F)[rows])
        if rows is not None:
            self.coact.update(picked)
        self.tokens += int(keep.sum())
        self.contexts.append(ids.to(torch.int32).cpu())
        self.context_index.append(torch.arange(ctx0, ctx0 + B, dtype=torch.int64))
        self.n_contexts += B

    def update_layer(self, layer: int, a: Tensor, ctx0: int) -> None:
        """a [B, T, F]: one layer's activations of contexts ctx0..ctx0+B-1, 0 at positions not counted.

        Everything works on the batch's list of nonzero activations (a few percent of [N, F]), so the dense
        [N, F] tensor is read only by one comparison, one listing and one column maximum."""
        B, T, F = a.shape
        flat = a.reshape(B * T, F)  # [N, F], row n = b·T + t
        n, f = (flat > 0).nonzero().unbind(1)  # [nnz] row-major: a fixed order for the random keys
        v = flat[n, f]
        self.count[layer] += torch.bincount(f, minlength=F)
        exact_add(self.act_sum_limbs[layer], torch.bincount(f, weights=v.double(), minlength=F))
        batch_max = flat.amax(0).clamp_min(0.0)  # [F]
        self.act_max[layer] = torch.maximum(self.act_max[layer], batch_max)

        def windows(rows: Tensor, feats: Tensor) -> Tensor:  # rows, feats [s] -> [s, W] float16
            return self._windows(flat, T, rows, feats)

        g0 = ctx0 * T
        self._update_top(layer, n, f, v, batch_max, windows, g0)
        if n.numel():
            bins = torch.bucketize(v, self.edges, right=True)  # [nnz] 0 (underflow) .. H - 1 (overflow)
            self.hist[layer] += torch.bincount(f * self.H + bins, minlength=F * self.H).view(F, self.H)
            self._update_reservoir(layer, n, f, v, bins, windows, g0)

    def _windows(self, flat: Tensor, T: int, rows: Tensor, feats: Tensor) -> Tensor:
        """[s, W] float16: feature feats[i]'s activation at the tokens `before` before to `after` after row
        rows[i] of flat [B·T, F], NaN outside the row's context."""
        before, after = self.window
        offset = torch.arange(-before, after + 1, device=flat.device)  # [W]
        pos = (rows % T)[:, None] + offset  # [s, W] positions in the context
        inside = (pos >= 0) & (pos < T)
        src = (rows[:, None] + offset).clamp(0, flat.shape[0] - 1)
        return flat[src, feats[:, None].expand_as(src)].masked_fill(~inside, NAN).to(torch.float16)

    def _update_top(self, layer: int, n: Tensor, f: Tensor, v: Tensor, batch_max: Tensor, windows,
                    g0: int) -> None:
        """Merge the batch's activations into the running top-k ([k, F] per layer), kept sorted by (value desc,
        global index asc).

        Only an activation above its feature's running k-th value can enter (an equal one loses to the earlier
        token), so only those are merged with the running lists of their features: once the lists fill up,
        few per batch. The merge is one lexicographic sort of (feature, value desc, global index asc); the
        running entries hold earlier tokens than the batch, so ties go to the earlier token."""
        k, W = self.k, self.W
        kth = self.top_val[layer][-1]  # [F]
        touched = (batch_max > kth).nonzero()[:, 0]  # [c] features whose list changes (sorted)
        c = touched.numel()
        if c == 0:
            return
        enter = v > kth[f]
        n, f, v = n[enter], f[enter], v[enter]
        slot_of = torch.full((self.F,), -1, dtype=torch.int64, device=v.device)
        slot_of[touched] = torch.arange(c, device=v.device)
        # candidates: the c·k running entries (slot j, rank i), then the e entering ones
        slot = torch.cat([torch.arange(c, device=v.device).repeat(k), slot_of[f]])
        val = torch.cat([self.top_val[layer][:, touched].reshape(-1), v])
        gidx = torch.cat([self.top_gidx[layer][:, touched].reshape(-1), g0 + n])
        src = torch.cat([torch.arange(k, device=v.device).repeat_interleave(c), torch.full_like(n, -1)])
        order = gidx.sort(stable=True).indices  # empty running entries (-1) first: they have value 0 and lose
        order = order[val[order].sort(descending=True, stable=True).indices]
        order = order[slot[order].sort(stable=True).indices]  # [c·k + e] by (slot, value desc, gidx asc)
        per_slot = torch.bincount(slot, minlength=c)  # k running entries + the entering ones
        first = per_slot.cumsum(0) - per_slot
        rank = torch.arange(order.numel(), device=v.device) - first[slot[order]]
        order = order[rank < k]  # [c·k]: every slot has its k running entries, so exactly k per slot
        new_val = val[order].view(c, k).T  # [k, c]
        new_gidx = gidx[order].view(c, k).T
        new_win = torch.empty(c * k, W, dtype=torch.float16, device=v.device)
        s = src[order]
        old = s >= 0
        new_win[old] = self.top_win[layer][s[old], touched[slot[order][old]]]
        fresh = order[~old] - c * k  # into the entering entries
        if fresh.numel():
            new_win[~old] = windows(n[fresh], f[fresh])
        empty = new_val <= 0
        self.top_val[layer][:, touched] = new_val.masked_fill(empty, 0.0)
        self.top_gidx[layer][:, touched] = new_gidx.masked_fill(empty, -1)
        self.top_win[layer][:, touched] = new_win.view(c, k, W).transpose(0, 1).masked_fill(empty[..., None], NAN)

    def _update_reservoir(self, layer: int, n: Tensor, f: Tensor, v: Tensor, bins: Tensor, windows,
                          g0: int) -> None:
        """Keep, per (feature, fine bin), the m occurrences with the smallest (key, global index) seen so far.

        Every occurrence's key is a hash of (seed, layer, feature, global index), but only those below their
        group's current m-th smallest kept key can enter (a kept key, an earlier token, wins a tie), so only
        those go through the sorts: after a few batches, few of them."""
        m, W = self.m, self.W
        key = occurrence_keys(self.seed, layer, self.F, f, g0 + n)  # [nnz] float64 in [0, 1)
        group = f * self.H + bins  # [nnz]
        qk, qv = self.q_key[layer].view(-1, m), self.q_val[layer].view(-1, m)  # [F·H, m] views
        qg, qw = self.q_gidx[layer].view(-1, m), self.q_win[layer].view(-1, m, W)
        enter = key < qk[group, m - 1]
        n, f, v, key, group = n[enter], f[enter], v[enter], key[enter], group[enter]
        if n.numel() == 0:
            return
        # 1) within the batch: the m smallest keys of each group (sort by key, then stably by group)
        order = key.sort(stable=True).indices
        order = order[group[order].sort(stable=True).indices]
        g = group[order]
        start = torch.ones_like(g, dtype=torch.bool)
        start[1:] = g[1:] != g[:-1]
        first = start.nonzero()[:, 0]  # where each group's run begins
        rank = torch.arange(g.numel(), device=g.device) - first[start.cumsum(0) - 1]
        sel = rank < m
        order, rank, g = order[sel], rank[sel], g[sel]
        groups, slot = g.unique_consecutive(return_inverse=True)  # [G] touched groups; slot: row in [G, m]
        G = groups.numel()
        new_key = torch.full((G, m), math.inf, dtype=torch.float64, device=self.device)
        new_val = torch.zeros(G, m, device=self.device)
        new_gidx = torch.full((G, m), -1, dtype=torch.int64, device=self.device)
        new_win = torch.full((G, m, W), NAN, dtype=torch.float16, device=self.device)
        new_key[slot, rank] = key[order]
        new_val[slot, rank] = v[order]
        new_gidx[slot, rank] = g0 + n[order]
        new_win[slot, rank] = windows(n[order], f[order])
        # 2) merge with the kept ones: [G, 2m] -> the m smallest keys (kept ones first on an equal key)
        ck = torch.cat([qk[groups], new_key], 1)
        o = ck.sort(dim=1, stable=True).indices[:, :m]  # [G, m]
        cv = torch.cat([qv[groups], new_val], 1)
        cg = torch.cat([qg[groups], new_gidx], 1)
        cw = torch.cat([qw[groups], new_win], 1)
        qk[groups] = ck.gather(1, o)
        qv[groups] = cv.gather(1, o)
        qg[groups] = cg.gather(1, o)
        qw[groups] = cw.gather(1, o[..., None].expand(G, m, W))

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def quantile_examples(self, n_ranges: int = 8, per_range: int = 4) -> tuple[Tensor, Tensor, Tensor]:
        """(value [L, F, R, p], gidx [L, F, R, p], window [L, F, R, p, W]) for R equal ranges of [0, max].

        Range r is [r·max/R, (r+1)·max/R) (the last one includes max). Within a range: the kept occurrences
        with the smallest keys (see the module docstring), then sorted by value, largest first.
        """
        R, p, W = n_ranges, per_range, self.W
        L, F = self.L, self.F
        out_val = torch.zeros(L, F, R, p, device=self.device)
        out_gidx = torch.full((L, F, R, p), -1, dtype=torch.int64, device=self.device)
        out_win = torch.full((L, F, R, p, W), NAN, dtype=torch.float16, device=self.device)
        for layer in range(L):
            key = self.q_key[layer].reshape(F, -1)  # [F, H·m]
            val = self.q_val[layer].reshape(F, -1)
            top = self.act_max[layer].double().clamp_min(1e-30)[:, None]
            r = (val.double() / top * R).floor().long().clamp(0, R - 1)
            r = torch.where(torch.isfinite(key), r, R)  # empty slots go to bucket R (dropped)
            o = key.sort(dim=1, stable=True).indices  # by key, then stably by range
            o = o.gather(1, r.gather(1, o).sort(dim=1, stable=True).indices)
            rs = r.gather(1, o)
            counts = nnf.one_hot(r, R + 1).sum(1)  # [F, R + 1]
            offset = counts.cumsum(1) - counts
            rank = torch.arange(o.shape[1], device=self.device)[None] - offset.gather(1, rs)
            fi, j = ((rank < p) & (rs < R)).nonzero().unbind(1)
            src, rr, kk = o[fi, j], rs[fi, j], rank[fi, j]
            out_val[layer, fi, rr, kk] = val[fi, src]
            out_gidx[layer, fi, rr, kk] = self.q_gidx[layer].reshape(F, -1)[fi, src]
            out_win[layer, fi, rr, kk] = self.q_win[layer].reshape(F, -1, W)[fi, src]
        order = out_val.sort(dim=-1, descending=True, stable=True).indices  # largest first, empty (0) last
        out_val, out_gidx = out_val.gather(-1, order), out_gidx.gather(-1, order)
        out_win = out_win.gather(-2, order[..., None].expand(*order.shape, W))
        return out_val, out_gidx, out_win

    def summary(self, n_ranges: int = 8, per_range: int = 4) -> Summary:
        """The finished statistics (CPU tensors)."""
        self._check_contiguous()
        q_val, q_gidx, q_win = self.quantile_examples(n_ranges, per_range)
        return Summary(
            tokens=self.tokens, count=self.count.cpu(), act_sum=self.act_sum.cpu(), act_max=self.act_max.cpu(),
            hist=self.hist.cpu(), edges=self.edges.cpu(), top_val=self.top_val.cpu(),
            top_gidx=self.top_gidx.cpu(), top_win=self.top_win.cpu(), q_val=q_val.cpu(), q_gidx=q_gidx.cpu(),
            q_win=q_win.cpu(), contexts=self.context_ids(),
            final_scale=self.mean_final_scale(), window=self.window,
            coact=self.coact.summary() if self.coact is not None else None,
        )

    def mean_final_scale(self) -> float:
        """The final norm's 1/rms (1/std) factor averaged over the tokens seen (what output effects freeze)."""
        return float(exact_value(self.final_scale_limbs)) / max(self.tokens, 1)

    def context_ids(self) -> Tensor:
        """[n_contexts, T] int32 token ids of every context seen, in global order (a merged pass: the union
        of the processes' contexts, which must then be contexts 0..n_contexts-1)."""
        if not self.contexts:
            return torch.zeros(0, self.T, dtype=torch.int32)
        if len(self.contexts) > 1:
            index = torch.cat(self.context_index)
            order = index.sort().indices
            self.contexts, self.context_index = [torch.cat(self.contexts)[order]], [index[order]]
        return self.contexts[0]

    def _check_contiguous(self) -> None:
        index = torch.cat(self.context_index) if self.context_index else torch.zeros(0, dtype=torch.int64)
        if not torch.equal(index.sort().values, torch.arange(index.numel())):
            raise ValueError(f"the statistics hold {index.numel()} contexts, not contexts 0..{index.numel() - 1} "
                             "of one corpus order: merge the statistics of every share first")

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the statistics of `other` (the same settings, other contexts of the same global order) in place,
        so that self ends equal to one pass over both sets of contexts (see the module docstring)."""
        mine = (self.L, self.F, self.T, self.k, self.window, self.m, self.H, self.seed, self.coact is not None)
        theirs = (other.L, other.F, other.T, other.k, other.window, other.m, other.H, other.seed,
                  other.coact is not None)
        if mine != theirs or not torch.equal(self.edges.cpu(), other.edges.cpu()):
            raise ValueError(f"cannot merge statistics of other settings ({theirs} into {mine})")
        seen = torch.cat(self.context_index) if self.context_index else torch.zeros(0, dtype=torch.int64)
        new = torch.cat(other.context_index) if other.context_index else torch.zeros(0, dtype=torch.int64)
        if torch.isin(new, seen).any():
            raise ValueError("the two statistics share contexts: a merge needs disjoint shares of the corpus")
        o = {name: getattr(other, name).to(self.device) for name in self._TENSORS}
        self.count += o["count"]
        normalize_limbs(self.act_sum_limbs.add_(o["act_sum_limbs"]))
        normalize_limbs(self.final_scale_limbs.add_(other.final_scale_limbs))
        torch.maximum(self.act_max, o["act_max"], out=self.act_max)
        self.hist += o["hist"]
        for layer in range(self.L):
            self._merge_top(layer, o["top_val"][layer], o["top_gidx"][layer], o["top_win"][layer])
            self._merge_reservoir(layer, o["q_key"][layer], o["q_val"][layer], o["q_gidx"][layer],
                                  o["q_win"][layer])
        self.contexts += [c.clone() for c in other.contexts]
        self.context_index += [c.clone() for c in other.context_index]
        self.tokens += other.tokens
        self.n_contexts += other.n_contexts
        if self.coact is not None:
            self.coact.merge(other.coact)
        return self

    def _merge_top(self, layer: int, val: Tensor, gidx: Tensor, win: Tensor) -> None:
        """The k best of both lists [k, F] (+ windows [k, F, W]) by (value desc, global index asc): the pass's
        own order, so ties go to the earlier token whichever process saw it."""
        k = self.k
        cv = torch.cat([self.top_val[layer], val])  # [2k, F]; empty entries (0, -1) lose to every activation
        cg = torch.cat([self.top_gidx[layer], gidx])
        cw = torch.cat([self.top_win[layer], win])  # [2k, F, W]
        o = cg.sort(dim=0, stable=True).indices
        o = o.gather(0, cv.gather(0, o).sort(dim=0, descending=True, stable=True).indices)[:k]  # [k, F]
        self.top_val[layer] = cv.gather(0, o)
        self.top_gidx[layer] = cg.gather(0, o)
        self.top_win[layer] = cw.gather(0, o[..., None].expand(k, self.F, self.W))

    def _merge_reservoir(self, layer: int, key: Tensor, val: Tensor, gidx: Tensor, win: Tensor) -> None:
        """Per (feature, fine bin) the m smallest (key, global index) of both ([F, H, m] each, + windows)."""
        m = self.m
        ck = torch.cat([self.q_key[layer], key], -1)  # [F, H, 2m]; empty slots have key inf and lose
        cv = torch.cat([self.q_val[layer], val], -1)
        cg = torch.cat([self.q_gidx[layer], gidx], -1)
        cw = torch.cat([self.q_win[layer], win], -2)  # [F, H, 2m, W]
        o = cg.sort(dim=-1, stable=True).indices
        o = o.gather(-1, ck.gather(-1, o).sort(dim=-1, stable=True).indices)[..., :m]  # [F, H, m]
        self.q_key[layer] = ck.gather(-1, o)
        self.q_val[layer] = cv.gather(-1, o)
        self.q_gidx[layer] = cg.gather(-1, o)
        self.q_win[layer] = cw.gather(-2, o[..., None].expand(*o.shape, self.W))

    # ------------------------------------------------------------------ checkpoints
    _TENSORS = ("count", "act_sum_limbs", "act_max", "hist", "top_val", "top_gidx", "top_win", "q_key", "q_val",
                "q_gidx", "q_win")

    def state_dict(self) -> dict[str, Tensor]:
        """Plain CPU tensors (for safetensors): the statistics and the contexts with their global indices."""
        state = {name: getattr(self, name).detach().cpu().contiguous() for name in self._TENSORS}
        state["contexts"] = self.context_ids().contiguous()
        state["context_index"] = (self.context_index[0] if self.context_index else
                                  torch.zeros(0, dtype=torch.int64)).contiguous()
        state["scalars"] = torch.tensor([self.tokens, self.n_contexts], dtype=torch.int64)
        state["final_scale_limbs"] = self.final_scale_limbs.clone()
        if self.coact is not None:
            state.update({f"coact.{k}": v for k, v in self.coact.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in (*self._TENSORS, "final_scale_limbs", "context_index"):  # KeyError: an older format
            want = getattr(self, name)
            want = tuple(want.shape) if name != "context_index" else (int(state["contexts"].shape[0]),)
            if tuple(state[name].shape) != want or state[name].dtype != (
                    torch.int64 if name in ("final_scale_limbs", "context_index") else getattr(self, name).dtype):
                raise ValueError(f"{name}: saved {state[name].dtype} {tuple(state[name].shape)}, expected {want}")
        for name in self._TENSORS:
            getattr(self, name).copy_(state[name])
        self.final_scale_limbs.copy_(state["final_scale_limbs"])
        self.contexts = [state["contexts"].to(torch.int32).clone()]
        self.context_index = [state["context_index"].clone()]
        self.tokens, self.n_contexts = (int(v) for v in state["scalars"])
        if self.coact is not None:
            self.coact.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("coact.")})


# ---------------------------------------------------------------------- co-activation
class CoactStats:
    """Sparse co-activation of feature pairs: for source feature i and partner j (same or later layer, j ≠ i),
    both active at one token, Σ a_i·a_j and the count of such tokens, at most M partners per source.

    Global ids: g = layer·F + feature (G = L·F of them). State, all [G, M] rows sorted by sum, largest first:

        partner   int64, −1 where empty        sum     float64 Σ a_i·a_j (see below)
        count     int64 tokens where both fire while the pair was kept
        error     [G] float64: what the summary subtracted from each of source i's kept sums in total
        total     [G] float64: Σ over every partner (kept or not) of a_i·a_j, exact
        tokens    tokens seen (sampled ones with `coact_tokens`)

    The summary per source is weighted Misra-Gries, merged once per batch: the batch's pair sums are added to
    the kept ones; when a source then has more than M partners, the (M+1)-th largest sum is subtracted from
    all of them and what is not positive is dropped (`error` += that amount). Guarantees, for every pair:
    kept sum ≤ true sum ≤ kept sum + error[i] (a pair not kept: true ≤ error[i]), and error[i] ≤
    total[i] / (M + 1). While a source never had more than M partners, its error is 0 and everything is exact.

    Cost per token: k² pairs for k features active across all layers, so `coact_tokens` (sample that many
    tokens per batch, uniformly, with a generator seeded by (seed, the batch's first global context), so any
    process draws the same ones) bounds the time; expectations are then over the sampled tokens.

    Merging two summaries (`merge`, the pass split over processes) adds their entries and cuts once more:
    while no source has more than M partners (error 0 everywhere) it is the single pass's result, up to the
    float64 summation order of the sums (relative 1e-16 per addition; counts, partners and totals' terms are
    the same); otherwise the merged summary keeps the same guarantee with error = the sum of both errors and
    the new cut, still ≤ total / (M + 1) (Agarwal et al. 2012, mergeable summaries), but it may keep other
    partners than one pass would. Memory: 24·M bytes per feature for the rows, plus the batch's pairs (`max_pairs` at a
    time).
    """

    def __init__(self, n_layers: int, n_features: int, top_m: int, tokens_per_batch: int = 0, *, seed: int = 1,
                 device: torch.device | str = "cpu", max_pairs: int = 1 << 22):
        self.L, self.F, self.M = n_layers, n_features, int(top_m)
        self.G = n_layers * n_features
        self.tokens_per_batch, self.max_pairs = int(tokens_per_batch), int(max_pairs)
        self.device = torch.device(device)
        kw = dict(device=self.device)
        self.partner = torch.full((self.G, self.M), -1, dtype=torch.int64, **kw)
        self.sum = torch.zeros(self.G, self.M, dtype=torch.float64, **kw)
        self.count = torch.zeros(self.G, self.M, dtype=torch.int64, **kw)
        self.error = torch.zeros(self.G, dtype=torch.float64, **kw)
        self.total = torch.zeros(self.G, dtype=torch.float64, **kw)
        self.tokens = 0
        self.seed = seed

    def sample_rows(self, keep: Tensor, ctx0: int = 0) -> Tensor:
        """keep [B, T] bool of the batch of contexts ctx0.. -> rows of the flattened batch to measure: all kept
        tokens, or `tokens_per_batch` of them chosen uniformly at random (in increasing order)."""
        rows = keep.reshape(-1).nonzero()[:, 0]
        if 0 < self.tokens_per_batch < rows.numel():
            key = splitmix64(torch.tensor(self.seed * 1_000_003 + ctx0, dtype=torch.int64)).item()
            rng = torch.Generator().manual_seed(key & (2**63 - 1))
            pick = torch.randperm(rows.numel(), generator=rng)[:self.tokens_per_batch].sort().values
            rows = rows[pick.to(rows.device)]
        return rows

    @torch.no_grad()
    def update(self, acts: list[Tensor]) -> None:
        """acts: L × [n, F], every layer's activations at the same n tokens."""
        n = acts[0].shape[0]
        self.tokens += n
        if n == 0:
            return
        tok, gid, val = [], [], []
        for layer, a in enumerate(acts):
            t, f = (a > 0).nonzero().unbind(1)
            tok.append(t)
            gid.append(layer * self.F + f)
            val.append(a[t, f].double())
        tok, gid, val = torch.cat(tok), torch.cat(gid), torch.cat(val)
        o = gid.sort(stable=True).indices
        o = o[tok[o].sort(stable=True).indices]  # by token, then by global id (so by layer)
        tok, gid, val = tok[o], gid[o], val[o]
        k = torch.bincount(tok, minlength=n)  # [n] active features per token
        start = k.cumsum(0) - k
        t0 = 0
        per_token = k * k
        while t0 < n:  # tokens in chunks of at most max_pairs pairs (a single token may exceed it), merged each
            cum = per_token[t0:].cumsum(0)
            t1 = t0 + max(1, int((cum <= self.max_pairs).sum()))
            e0, e1 = int(start[t0]), int(start[t1 - 1] + k[t1 - 1])
            if e1 > e0:
                keys, prod = self._pairs(tok[e0:e1], gid[e0:e1], val[e0:e1], k[tok[e0:e1]], start[tok[e0:e1]] - e0)
                if keys.numel():  # one entry per pair and token: _merge adds them up
                    self._merge(keys // self.G, keys % self.G, prod, torch.ones_like(keys))
            t0 = t1

    def _pairs(self, tok, gid, val, k, start) -> tuple[Tensor, Tensor]:
        """Every ordered pair (p, q) of elements at the same token with q's layer ≥ p's and q ≠ p: (key
        p·G + q, product). k, start: each element's token's count and first element."""
        m = tok.numel()
        p = torch.repeat_interleave(torch.arange(m, device=tok.device), k)
        block = torch.repeat_interleave(k.cumsum(0) - k, k)
        q = start[p] + torch.arange(p.numel(), device=tok.device) - block
        layer = gid // self.F
        ok = (q != p) & (layer[q] >= layer[p])
        p, q = p[ok], q[ok]
        prod = val[p] * val[q]
        self.total.index_add_(0, gid[p], prod)
        return gid[p] * self.G + gid[q], prod

    def _merge(self, src: Tensor, par: Tensor, w: Tensor, c: Tensor) -> None:
        """Add a batch's (source, partner, sum, count) entries (repeats allowed) to the kept rows; keep M partners
        per source."""
        M, G = self.M, self.G
        touched = src.unique()  # sorted
        r, j = (self.partner[touched] >= 0).nonzero().unbind(1)
        rows = touched[r]
        src = torch.cat([rows, src])
        par = torch.cat([self.partner[rows, j], par])
        w = torch.cat([self.sum[rows, j], w])
        c = torch.cat([self.count[rows, j], c])
        key, inv = (src * G + par).unique(return_inverse=True)
        w = torch.zeros(key.numel(), dtype=torch.float64, device=w.device).index_add_(0, inv, w)
        c = torch.zeros(key.numel(), dtype=torch.int64, device=c.device).index_add_(0, inv, c)
        src, par = key // G, key % G
        o = w.sort(descending=True, stable=True).indices
        o = o[src[o].sort(stable=True).indices]  # by source, then by sum, largest first
        src, par, w, c = src[o], par[o], w[o], c[o]
        first = torch.ones_like(src, dtype=torch.bool)
        first[1:] = src[1:] != src[:-1]
        group = first.cumsum(0) - 1  # index into touched (both sorted)
        rank = torch.arange(src.numel(), device=src.device) - first.nonzero()[:, 0][group]
        cut = torch.zeros(touched.numel(), dtype=torch.float64, device=w.device)
        at = rank == M  # the (M+1)-th largest sum of a source with more than M partners
        cut[group[at]] = w[at]
        w = w - cut[group]
        keep = (rank < M) & (w > 0)
        self.error[touched] += cut
        self.partner[touched] = -1
        self.sum[touched] = 0.0
        self.count[touched] = 0
        g, rk = touched[group[keep]], rank[keep]
        self.partner[g, rk], self.sum[g, rk], self.count[g, rk] = par[keep], w[keep], c[keep]

    @torch.no_grad()
    def merge(self, other: CoactStats) -> None:
        """Add another summary (other tokens) in place (see the class docstring for what is exact)."""
        if (self.L, self.F, self.M, self.tokens_per_batch) != (other.L, other.F, other.M, other.tokens_per_batch):
            raise ValueError("cannot merge co-activation statistics of other settings")
        self.total += other.total.to(self.device)
        self.error += other.error.to(self.device)
        self.tokens += other.tokens
        g, j = (other.partner >= 0).nonzero().unbind(1)
        if g.numel():
            self._merge(g.to(self.device), other.partner[g, j].to(self.device), other.sum[g, j].to(self.device),
                        other.count[g, j].to(self.device))

    def summary(self) -> dict:
        """CPU tensors and numbers for the database: partner, sum, count, error, total, tokens, top_m."""
        return {"partner": self.partner.cpu(), "sum": self.sum.cpu(), "count": self.count.cpu(),
                "error": self.error.cpu(), "total": self.total.cpu(), "tokens": self.tokens, "top_m": self.M,
                "tokens_per_batch": self.tokens_per_batch}

    _TENSORS = ("partner", "sum", "count", "error", "total")

    def state_dict(self) -> dict[str, Tensor]:
        state = {name: getattr(self, name).detach().cpu().contiguous() for name in self._TENSORS}
        state["tokens"] = torch.tensor([self.tokens], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self._TENSORS:
            t = getattr(self, name)
            if name not in state or tuple(state[name].shape) != tuple(t.shape):
                got = tuple(state[name].shape) if name in state else "none"
                raise ValueError(f"coact.{name}: saved shape {got}, expected {tuple(t.shape)}")
            t.copy_(state[name])
        self.tokens = int(state["tokens"][0])
