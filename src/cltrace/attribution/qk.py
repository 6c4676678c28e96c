"""QK attributions: why an attention head attended from one position to another, in feature terms.

Kamath, Ameisen et al. (2025), "Tracing Attention Computation Through Feature Interactions". In the local
replacement model (attention patterns and every norm denominator frozen at the prompt's reference pass) the
residual stream entering layer l is an affine function of the nodes:

    resid_pre[l][p] = Σ_a c_a[l, p] + c_bias[l, p]

with one component per node (active feature, error node, token embedding) and per constant (the
transcoders' b_dec, the BOS position's MLP outputs, GPT-2's learned position embeddings), plus the intercept
c_bias (model biases carried through the frozen layers): what the stream holds when every component is 0.
A head's query and key are affine in that stream, since every step is linear once denominators are frozen:
the attention-input norm (frozen 1/rms; weight, and GPT-2's LayerNorm bias into the intercept), W_q / W_k
(+ bias: the intercept), the per-head q/k norm of Qwen 3 and Gemma 3 (frozen 1/rms, computed from the
reference pass), and RoPE (a fixed rotation per position; Gemma 3's local and global layers each with their own
base). So with q_a the query-side image of component a at the query position (the bias component also gets
W_q's bias) and k_b the key-side image at the key position (of the head's key/value head under GQA),

    score = scale · q · k = Σ_{a, b} scale · q_a · k_b          (exact; a, b range over components + bias)

This is the score *before* Gemma 2's attention-logit soft-cap tanh(s / cap)·cap and before the causal mask:
the cap is not linear, so it is decomposed at its input.

The c_a are found by backward passes, like the attribution engine's rows: the pass is run on the prompt's
prefix up to the key/query position with every MLP output (minus the live skip term) and the embedding as
leaves, and the readout rows (the head's linearized W_q or W_k, or the identity) are seeded at
resid_pre[l][p]; the gradient at each leaf dotted with each node's output vector is that node's term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.models.adapter import Frozen, _apply_rope
from cltrace.replacement.forward import frozen_forward, frozen_prefix
from cltrace.replacement.local import LocalReplacement, build_replacement

KINDS = ("feature", "error", "token", "constant")


# ---------------------------------------------------------------------- components
@dataclass
class Components:
    """The components of the residual stream, in one fixed order for every (layer, position):

    [active features (rep.features order) | errors l·T + p | tokens p | constants (names)].
    """

    n_features: int
    n_layers: int
    n_pos: int
    constants: list[str]  # "b_dec", "bos", ["pos_embed",] "bias"

    @property
    def n(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + len(self.constants)

    def kind(self) -> Tensor:
        """[n] index into KINDS."""
        L, T = self.n_layers, self.n_pos
        return torch.cat([torch.zeros(self.n_features), torch.ones(L * T), torch.full((T,), 2.0),
                          torch.full((len(self.constants),), 3.0)]).long()

    def error_col(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_col(self, pos: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + pos

    def constant_col(self, name: str) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.constants.index(name)


def position_embeddings(rep: LocalReplacement) -> Tensor | None:
    """[T, D] learned absolute position embeddings (GPT-2), part of the token nodes' output; None otherwise."""
    wpe = getattr(rep.model.body, "wpe", None)
    if wpe is None:
        return None
    return wpe(torch.arange(rep.n_pos, device=rep.embed.device)).detach()


def components(rep: LocalReplacement) -> Components:
    names = ["b_dec", "bos"] + (["pos_embed"] if position_embeddings(rep) is not None else []) + ["bias"]
    return Components(len(rep.features), rep.tc.n_layers, rep.n_pos, names)


def component_labels(rep: LocalReplacement, comp: Components, cols: list[int]) -> list[str]:
    """Readable names of component columns: 'L:F@P', 'err L@P', 'tok P', or the constant's name."""
    out = []
    tokens = rep.model.decode(rep.ids)
    for c in cols:
        if c < comp.n_features:
            f = rep.features
            out.append(f"{int(f.layer[c])}:{int(f.index[c])}@{int(f.pos[c])}")
        elif c < comp.token_col(0):
            layer, pos = divmod(c - comp.n_features, comp.n_pos)
            out.append(f"err {layer}@{pos}")
        elif c < comp.token_col(comp.n_pos):
            pos = c - comp.token_col(0)
            out.append(f"tok {pos} {tokens[pos]!r}")
        else:
            out.append(comp.constants[c - comp.token_col(comp.n_pos)])
    return out


# ---------------------------------------------------------------------- the frozen stream at resid_pre[l]
def _leaves(rep: LocalReplacement) -> Tensor:
    """[L, T, D] what each block adds besides its live skip term: true MLP output − skip (the engine's leaves)."""
    return rep.mlp_out if rep.skip is None else rep.mlp_out - rep.skip


def resid_pre(rep: LocalReplacement, layer: int, emb: Tensor, outs: list[Tensor]) -> Tensor:
    """The frozen stream entering block `layer` on the prefix emb covers: emb [B, P, D], outs[l] [B, P, D]
    (l < layer) added by block l on top of its live skip term -> [B, P, D]."""
    if layer == 0:
        return emb
    tc = rep.tc
    fp = frozen_forward(rep.model, emb, frozen_prefix(rep.frozen, emb.shape[1]),
                        lambda l_, rm, mi: outs[l_] + skip_write(tc, l_, rm, mi), stop_at_layer=layer - 1)
    last = layer - 1
    return fp.resid_mid[last] + outs[last] + skip_write(tc, last, fp.resid_mid[last], fp.mlp_in[last])


def skip_write(tc, layer: int, resid_mid: Tensor, mlp_in: Tensor) -> Tensor:
    """The transcoder's live skip term x @ W_skip[layer] (0 without one): part of the frozen linear model."""
    if tc.W_skip is None:
        return torch.zeros((), dtype=resid_mid.dtype, device=resid_mid.device)
    x = tc.select_input(resid_mid, mlp_in)
    return (x.to(tc.W_skip.dtype) @ tc.W_skip[layer]).to(resid_mid.dtype)


@torch.no_grad()
def reference_stream(rep: LocalReplacement, layer: int) -> Tensor:
    """[T, D] resid_pre[layer] of the reference pass (the replacement model reproduces it exactly)."""
    leaves = _leaves(rep)
    return resid_pre(rep, layer, rep.embed[None], [leaves[m][None] for m in range(layer)])[0]


def residual_contributions(rep: LocalReplacement, layer: int, pos: int, readout: Tensor | None = None,
                           comp: Components | None = None, chunk_mb: float = 512) -> Tensor:
    """Every component's contribution to readout · resid_pre[layer][pos] -> [n_components, r] float32.

    readout [r, D] (None: the identity, r = D). Rows sum to readout @ resid_pre[layer][pos] exactly (up to
    rounding): the last component, "bias", is the intercept (the stream with every node and constant at 0).
    """
    comp = comp or components(rep)
    D, dev = rep.embed.shape[-1], rep.embed.device
    R = torch.eye(D, device=dev) if readout is None else readout.float()
    r, P = R.shape[0], pos + 1
    per_row = 4 * 3 * (layer + 1) * P * D
    step = max(1, int(chunk_mb * 2**20 // per_row))
    out = torch.zeros(comp.n, r, device=dev)
    for i in range(0, r, step):
        out[:, i:i + step] = _contributions_chunk(rep, layer, pos, R[i:i + step], comp)
    leaves = _leaves(rep)
    with torch.no_grad():  # the intercept: every leaf and the embedding at 0
        zero = resid_pre(rep, layer, torch.zeros_like(rep.embed[None, :P]),
                         [torch.zeros_like(leaves[m][None, :P]) for m in range(layer)])[0, pos]
    out[comp.constant_col("bias")] += R @ zero.float()
    return out


def _contributions_chunk(rep: LocalReplacement, layer: int, pos: int, R: Tensor, comp: Components) -> Tensor:
    """One backward batch (rows of R seeded at resid_pre[layer][pos]) -> [n_components, r] (no intercept)."""
    tc, P, r = rep.tc, pos + 1, R.shape[0]
    leaves = _leaves(rep)
    emb = rep.embed[None, :P].detach().clone().requires_grad_(True)
    outs = [leaves[m][None, :P].detach().clone().requires_grad_(True) for m in range(layer)]
    with torch.enable_grad():
        x = resid_pre(rep, layer, emb, outs)
    seed = torch.zeros(r, 1, P, x.shape[-1], dtype=x.dtype, device=x.device)
    seed[:, 0, pos] = R.to(x.dtype)
    grads = torch.autograd.grad([x], [emb] + outs, [seed], is_grads_batched=True, allow_unused=True)
    G_emb = grads[0][:, 0].float()  # [r, P, D]
    G = [(g[:, 0].float() if g is not None else torch.zeros_like(G_emb)) for g in grads[1:]]  # layer × [r, P, D]
    out = torch.zeros(comp.n, r, device=R.device)
    with torch.no_grad():
        feats = rep.features
        for s, sl in enumerate(feats.layer_slices(comp.n_layers)):
            if s >= layer or sl.stop == sl.start:
                continue
            stop = sl.start + int(torch.searchsorted(feats.pos[sl], P))  # sorted by position within a layer
            if stop == sl.start:
                continue
            cols = torch.arange(sl.start, stop, device=R.device)
            writes = tc.feature_writes(s, feats.index[cols], feats.act[cols]).float()  # [n, n_out, D]
            fpos = feats.pos[cols]
            ps, counts = fpos.unique_consecutive(return_counts=True)
            for j in range(min(tc.n_out(s), layer - s)):
                for p, c, w in zip(ps.tolist(), cols.split(counts.tolist()), writes[:, j].split(counts.tolist())):
                    out[c] += w @ G[s + j][:, p].T  # [n, D] @ [D, r]
        err = rep.error.float()
        for m in range(layer):
            e0 = comp.error_col(m, 0)
            out[e0:e0 + P] = torch.einsum("rpd,pd->pr", G[m], err[m, :P])
        pos_emb = position_embeddings(rep)
        tok = rep.embed[:P].float() - (pos_emb[:P].float() if pos_emb is not None else 0)
        t0 = comp.token_col(0)
        out[t0:t0 + P] = torch.einsum("rpd,pd->pr", G_emb, tok)
        if pos_emb is not None:
            out[comp.constant_col("pos_embed")] = torch.einsum("rpd,pd->r", G_emb, pos_emb[:P].float())
        if layer:
            Gs = torch.stack(G)  # [layer, r, P, D]
            b_dec = tc.b_dec[:layer].float()  # [layer, D]
            out[comp.constant_col("b_dec")] = torch.einsum("mrpd,md->r", Gs[:, :, 1:], b_dec)
            bos = leaves[:layer, 0].float()  # [layer, D]
            out[comp.constant_col("bos")] = torch.einsum("mrd,md->r", Gs[:, :, 0], bos)
    return out


# ---------------------------------------------------------------------- a head's query and key maps
@dataclass
class HeadMaps:
    """The frozen affine maps resid_pre[layer][p] -> queries [H, Dh] and keys [K, Dh] of one layer."""

    rep: LocalReplacement
    layer: int
    q_scale: Tensor | None  # [1, T, H, 1] frozen 1/rms of the per-head query norm (Qwen 3, Gemma 3)
    k_scale: Tensor | None  # [1, T, K, 1]
    rope: tuple[Tensor, Tensor] | None  # cos, sin [1, T, Dh]
    scaling: float
    softcap: float | None
    n_heads: int
    n_kv: int

    def project(self, x: Tensor, pos: int, side: str) -> Tensor:
        """x [N, D] at position pos -> [N, H, Dh] (side "q") or [N, K, Dh] (side "k"), frozen."""
        model, layer = self.rep.model, self.layer
        fam = model.family
        block = model.blocks[layer]
        attn = fam.attn_module(block)
        key = f"{layer}.attn_in"
        frozen = Frozen(scales={key: self.rep.frozen.scales[key][:, pos:pos + 1]})
        h = model.norm(fam.norms(block)["attn_in"], x[:, None, :].to(model.dtype), key, frozen, Frozen())
        y = _raw_qk(attn, h, side)  # [N, 1, n, Dh]
        scale = self.q_scale if side == "q" else self.k_scale
        if scale is not None:
            norm = attn.q_norm if side == "q" else attn.k_norm
            y = model.norm(norm, y, "qk", Frozen(scales={"qk": scale[:, pos:pos + 1]}), Frozen())
        y = y.transpose(1, 2)  # [N, n, 1, Dh]
        if self.rope is not None:
            cos, sin = self.rope
            y = _apply_rope(y, y, cos[:, pos:pos + 1], sin[:, pos:pos + 1])[0]
        return y[:, :, 0]

    def linear(self, pos: int, side: str) -> Tensor:
        """[n, Dh, D]: the linear part of `project` (exact: a forward-mode derivative of an affine map)."""
        D = self.rep.embed.shape[-1]
        eye = torch.eye(D, dtype=self.rep.embed.dtype, device=self.rep.embed.device)
        _, lin = torch.func.jvp(lambda x: self.project(x, pos, side), (torch.zeros_like(eye),), (eye,))
        return lin.permute(1, 2, 0).float()  # [D, n, Dh] -> [n, Dh, D]

    def intercept(self, pos: int, side: str) -> Tensor:
        """[n, Dh] the image of a zero stream (biases of W_q / W_k)."""
        with torch.no_grad():
            return self.project(torch.zeros_like(self.rep.embed[:1]), pos, side)[0].float()


def _raw_qk(attn, h: Tensor, side: str) -> Tensor:
    """Normalized attention input h [N, 1, D] -> raw queries or keys [N, 1, n, Dh] (before any q/k norm)."""
    N, T, _ = h.shape
    if hasattr(attn, "q_proj"):  # Llama, Qwen 2/3, Gemma 2/3
        proj = attn.q_proj if side == "q" else attn.k_proj
        return proj(h).view(N, T, -1, attn.head_dim)
    q, k, _ = attn.c_attn(h).split(attn.split_size, dim=2)  # GPT-2
    return (q if side == "q" else k).view(N, T, -1, attn.head_dim)


@torch.no_grad()
def head_maps(rep: LocalReplacement, layer: int) -> HeadMaps:
    """The maps of `layer`, with the per-head q/k norms' 1/rms taken from the reference pass."""
    model = rep.model
    fam, block = model.family, model.blocks[layer]
    attn = fam.attn_module(block)
    x = reference_stream(rep, layer)[None]  # [1, T, D]
    key = f"{layer}.attn_in"
    h = model.norm(fam.norms(block)["attn_in"], x, key, rep.frozen, Frozen())
    scales = {}
    for side in ("q", "k"):
        if hasattr(attn, "q_norm"):
            rec = Frozen()
            model.norm(attn.q_norm if side == "q" else attn.k_norm, _raw_qk(attn, h, side), "qk", None, rec)
            scales[side] = rec.scales["qk"]
        else:
            scales[side] = None
    ropes = fam.rope(model, x, rep.n_pos)
    rope = ropes[model.layer_types[layer]] if ropes else None
    K = _raw_qk(attn, h[:, :1], "k").shape[2]
    return HeadMaps(rep, layer, scales["q"], scales["k"], rope, float(attn.scaling),
                    getattr(model.config, "attn_logit_softcapping", None), model.n_heads, K)


@torch.no_grad()
def model_score(rep: LocalReplacement, layer: int, head: int, q_pos: int, k_pos: int) -> float:
    """The head's pre-softmax, pre-soft-cap score from the model's own (unfrozen) pieces at the reference stream:
    family.qkv with live q/k norms, the adapter's RoPE. What the decomposition must add up to."""
    model = rep.model
    fam, block = model.family, model.blocks[layer]
    attn = fam.attn_module(block)
    x = reference_stream(rep, layer)[None]
    h = model.norm(fam.norms(block)["attn_in"], x, f"{layer}.attn_in", rep.frozen, Frozen())
    q, k, _ = fam.qkv(attn, h, True)
    ropes = fam.rope(model, x, rep.n_pos)
    if ropes:
        q, k = _apply_rope(q, k, *ropes[model.layer_types[layer]])
    kv = head // (model.n_heads // k.shape[1])
    return float((q[0, head, q_pos].float() @ k[0, kv, k_pos].float()) * attn.scaling)


# ---------------------------------------------------------------------- QK attribution
@dataclass
class QKResult:
    """One head's score at (query position, key position), decomposed over (query, key) component pairs.

    q [n, Dh], k [n, Dh]: each component's image in the head's query / key space (scaled so that
    terms = q @ k.T); component order as `Components`. Σ terms = score_terms ≈ score (the model's own).
    """

    layer: int
    head: int
    kv_head: int
    query_pos: int
    key_pos: int
    score: float  # the model's own pre-softmax score (before any soft-cap)
    pattern: float  # the attention weight after softmax (the frozen pattern)
    softcap: float | None
    q: Tensor
    k: Tensor
    comp: Components
    labels: list[str] = field(default_factory=list)  # filled lazily for the columns a report names

    @property
    def terms(self) -> Tensor:
        """[n, n] term[a, b] = scale · q_a · k_b (query component a, key component b)."""
        return self.q @ self.k.T

    @property
    def score_terms(self) -> float:
        return float(self.q.sum(0) @ self.k.sum(0))

    def query_marginals(self) -> Tensor:
        """[n] Σ_b term[a, b]: what each query-side component contributes against the whole key."""
        return self.q @ self.k.sum(0)

    def key_marginals(self) -> Tensor:
        return self.k @ self.q.sum(0)

    def kind_table(self) -> Tensor:
        """[4, 4] Σ of terms by (query kind, key kind), KINDS order; sums to the score."""
        kind = self.comp.kind().to(self.q.device)
        Qk = torch.zeros(4, self.q.shape[1], device=self.q.device).index_add_(0, kind, self.q)
        Kk = torch.zeros(4, self.k.shape[1], device=self.k.device).index_add_(0, kind, self.k)
        return Qk @ Kk.T

    def shares(self) -> dict[str, float]:
        """Share of Σ|term| by kind, each term split half to its query component's kind and half to its key
        component's; plus "feature_pairs": the share of Σ|term| with features on both sides."""
        nz_q = self.q.abs().sum(1) > 0
        nz_k = self.k.abs().sum(1) > 0
        qi, ki = nz_q.nonzero()[:, 0], nz_k.nonzero()[:, 0]
        t = (self.q[qi] @ self.k[ki].T).abs()  # [nq, nk]
        kind = self.comp.kind().to(t.device)
        by_q = torch.zeros(4, device=t.device).index_add_(0, kind[qi], t.sum(1))
        by_k = torch.zeros(4, device=t.device).index_add_(0, kind[ki], t.sum(0))
        total = float(t.sum()) or 1.0
        out = {k: float(by_q[i] + by_k[i]) / (2 * total) for i, k in enumerate(KINDS)}
        fq, fk = kind[qi] == 0, kind[ki] == 0
        out["feature_pairs"] = float(t[fq][:, fk].sum()) / total
        return out

    def report(self, rep: LocalReplacement, top: int = 10) -> dict:
        """JSON-ready summary: top pairwise terms, top query/key marginals, shares by kind."""
        terms = self.terms
        flat = terms.flatten()
        idx = flat.abs().topk(min(top, flat.numel())).indices
        pairs = [(int(i) // terms.shape[1], int(i) % terms.shape[1]) for i in idx]
        qm, km = self.query_marginals(), self.key_marginals()
        qi = qm.abs().topk(min(top, qm.numel())).indices.tolist()
        ki = km.abs().topk(min(top, km.numel())).indices.tolist()
        nf = self.comp.n_features  # the same lists among features only: constants often dominate the above
        qf = qm[:nf].abs().topk(min(top, nf)).indices.tolist()
        kf = km[:nf].abs().topk(min(top, nf)).indices.tolist()
        ff = terms[:nf, :nf].flatten()
        fpairs = [(int(i) // nf, int(i) % nf) for i in ff.abs().topk(min(top, ff.numel())).indices] if nf else []
        cols = sorted({a for a, _ in pairs + fpairs} | {b for _, b in pairs + fpairs} | set(qi) | set(ki)
                      | set(qf) | set(kf))
        name = dict(zip(cols, component_labels(rep, self.comp, cols)))
        table = self.kind_table()
        return {
            "layer": self.layer, "head": self.head, "kv_head": self.kv_head, "query_pos": self.query_pos,
            "key_pos": self.key_pos, "score": self.score, "score_terms": self.score_terms,
            "pattern": self.pattern, "softcap": self.softcap,
            "top_pairs": [{"query": name[a], "key": name[b], "term": float(terms[a, b])} for a, b in pairs],
            "top_query": [{"component": name[a], "value": float(qm[a])} for a in qi],
            "top_key": [{"component": name[b], "value": float(km[b])} for b in ki],
            "top_feature_pairs": [{"query": name[a], "key": name[b], "term": float(terms[a, b])} for a, b in fpairs],
            "top_query_features": [{"component": name[a], "value": float(qm[a])} for a in qf],
            "top_key_features": [{"component": name[b], "value": float(km[b])} for b in kf],
            "by_kind": {f"{KINDS[i]}x{KINDS[j]}": float(table[i, j]) for i in range(4) for j in range(4)},
            "shares": self.shares(),
        }


@dataclass(frozen=True)
class HeadQuery:
    layer: int
    head: int
    query_pos: int
    key_pos: int


def qk_attributions(rep: LocalReplacement, queries: list[HeadQuery]) -> list[QKResult]:
    """QK attributions of several (layer, head, query position, key position) at once.

    Requests are grouped by (layer, position): one set of backward passes per group seeds the linearized
    query rows of every head asked for there and the key rows of their key/value heads (or the identity,
    when that is fewer rows), so heads of one layer and edges that share positions share the work.
    """
    comp = components(rep)
    T = rep.n_pos
    for hq in queries:
        if not (0 <= hq.layer < rep.tc.n_layers and 0 <= hq.head < rep.model.n_heads
                and 0 <= hq.key_pos <= hq.query_pos < T):
            raise CltraceError(f"no head score at {hq}: need layer < {rep.tc.n_layers}, head < "
                               f"{rep.model.n_heads}, 0 <= key_pos <= query_pos < {T}")
    maps: dict[int, HeadMaps] = {}
    for hq in queries:
        if hq.layer not in maps:
            maps[hq.layer] = head_maps(rep, hq.layer)
    # (layer, pos) -> {(side, head index): None}: which rows to seed there
    wanted: dict[tuple[int, int], dict[tuple[str, int], Tensor | None]] = {}
    for hq in queries:
        hm = maps[hq.layer]
        kv = hq.head // (hm.n_heads // hm.n_kv)
        wanted.setdefault((hq.layer, hq.query_pos), {})[("q", hq.head)] = None
        wanted.setdefault((hq.layer, hq.key_pos), {})[("k", kv)] = None
    D = rep.embed.shape[-1]
    for (layer, pos), sides in wanted.items():
        hm = maps[layer]
        lins = {s: hm.linear(pos, s) for s in {side for side, _ in sides}}  # side -> [n, Dh, D]
        keys = list(sides)
        M = torch.cat([lins[s][h] for s, h in keys])  # [rows, D]
        if M.shape[0] < D:
            C = residual_contributions(rep, layer, pos, M, comp)
        else:
            C = residual_contributions(rep, layer, pos, None, comp) @ M.T
        dh = M.shape[0] // len(keys)
        for i, (s, h) in enumerate(keys):
            part = C[:, i * dh:(i + 1) * dh].clone()
            part[comp.constant_col("bias")] += hm.intercept(pos, s)[h]
            sides[(s, h)] = part
    out = []
    for hq in queries:
        hm = maps[hq.layer]
        kv = hq.head // (hm.n_heads // hm.n_kv)
        q = wanted[(hq.layer, hq.query_pos)][("q", hq.head)] * hm.scaling
        k = wanted[(hq.layer, hq.key_pos)][("k", kv)]
        pattern = float(rep.frozen.patterns[hq.layer][0, hq.head, hq.query_pos, hq.key_pos])
        out.append(QKResult(hq.layer, hq.head, kv, hq.query_pos, hq.key_pos,
                            model_score(rep, hq.layer, hq.head, hq.query_pos, hq.key_pos), pattern,
                            hm.softcap, q, k, comp))
    return out


def qk_attribution(model, tc, prompt, heads: list, *, rep: LocalReplacement | None = None) -> list[QKResult]:
    """QK attributions on `prompt` (text or ids [T]) for heads given as HeadQuery or (layer, head, query_pos,
    key_pos) tuples; `rep` reuses a local replacement model already built on that prompt."""
    if rep is None:
        ids = model.tokenize(prompt) if isinstance(prompt, str) else prompt.to(model.device)
        rep = build_replacement(model, tc, ids)
    return qk_attributions(rep, [h if isinstance(h, HeadQuery) else HeadQuery(*h) for h in heads])
