"""Attribution: the edges of the local replacement model's linear graph, by batched backward passes.

With patterns and norm scales frozen, MLP outputs replaced by detached leaves (so no gradient flows through
a real MLP; a skip term x @ W_skip stays in the graph) and gradients stopped at feature activations, the map
from node outputs to node inputs is linear. Edge A[t, s] = (t's input vector) · J · (s's output vector):

    feature s (layer l_s, pos p, act a):  writes a·W_dec[l_s][f, k] into MLP output l_s + k at p
    error (l, p):                          writes error[l, p] into MLP output l at p
    token p:                               writes embed[p] into the residual stream before block 0
    feature t:                             reads W_enc[l_t][:, f] at its read point (layer l_t, pos p_t)
    logit t:                               reads the demeaned unembedding at final_normed, last position

We run the forward ONCE at batch 1 and get a batch of rows per backward with
`torch.autograd.grad(..., is_grads_batched=True)` (vmap over the backward): each row's seed is its input
vector placed at its read point; one backward gives d(target)/d(every MLP-output leaf and the embedding),
and the row is those gradients dotted with every source's output vector. circuit-tracer instead runs the
forward on `batch_size` copies of the prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cltrace.attribution.graph import Graph
from cltrace.attribution.targets import Target, select_targets
from cltrace.models.adapter import ModelAdapter
from cltrace.replacement.forward import FrozenPass, frozen_forward, frozen_prefix
from cltrace.replacement.local import LocalReplacement, build_replacement
from cltrace.transcoders.transcoder import Transcoder


@dataclass
class _Leaves:
    """The graph of one frozen forward: leaves (embedding, MLP outputs) and the read points."""

    emb: Tensor  # [1, P, D] leaf
    outs: list[Tensor]  # leaves [1, P, D]: MLP output minus the skip term, one per layer run
    reads: list[Tensor]  # read points [1, P, D] (graph-connected), one per layer run
    final: Tensor | None  # [1, P, D] final_normed (None when stopped early)


def _leaf_pass(rep: LocalReplacement, emb: Tensor, outs: list[Tensor], stop_at_layer: int | None = None) -> FrozenPass:
    """Frozen forward in which block l adds outs[l] (+ skip of its live input), on the prefix emb covers."""
    tc = rep.tc

    def mlp(layer: int, resid_mid: Tensor, mlp_in: Tensor) -> Tensor:
        if tc.W_skip is None:
            return outs[layer]
        x = tc.select_input(resid_mid, mlp_in)
        return outs[layer] + (x.to(tc.W_skip.dtype) @ tc.W_skip[layer]).to(outs[layer].dtype)

    return frozen_forward(rep.model, emb, frozen_prefix(rep.frozen, emb.shape[1]), mlp, stop_at_layer)


def _reads(rep: LocalReplacement, fp: FrozenPass) -> list[Tensor]:
    return rep.tc.select_input(fp.resid_mid, fp.mlp_in)


def build_leaves(rep: LocalReplacement, n_pos: int | None = None, stop_at_layer: int | None = None) -> _Leaves:
    """The forward with gradients (batch 1), on positions < n_pos and up to the read points of stop_at_layer.

    By causality a target at position p depends on positions <= p only, and a read point at layer l on
    blocks < l only, so rows whose targets all sit at positions < n_pos and layers <= stop_at_layer get
    exactly the same gradients from this truncated pass.
    """
    n_pos = rep.n_pos if n_pos is None else n_pos
    n_layers = rep.tc.n_layers if stop_at_layer is None else stop_at_layer
    emb = rep.embed[None, :n_pos].detach().clone().requires_grad_(True)
    base = rep.mlp_out if rep.skip is None else rep.mlp_out - rep.skip
    outs = [base[layer, :n_pos][None].detach().clone().requires_grad_(True) for layer in range(n_layers)]
    with torch.enable_grad():
        fp = _leaf_pass(rep, emb, outs, stop_at_layer)
    return _Leaves(emb, outs, _reads(rep, fp), fp.final_normed)


@torch.no_grad()
def constants(rep: LocalReplacement) -> tuple[list[Tensor], Tensor]:
    """The frozen affine model with every node removed (embeddings 0, MLP outputs = b_dec, BOS as is).

    Returns read points [L] of [T, D] and final_normed [T, D]: whatever a target still sees comes from biases.
    """
    L, T, D = rep.mlp_out.shape
    outs = rep.tc.b_dec.to(rep.mlp_out.dtype)[:, None, :].expand(L, T, D).clone()
    outs[:, 0] = rep.mlp_out[:, 0] - (rep.skip[:, 0] if rep.skip is not None else 0)
    fp = _leaf_pass(rep, torch.zeros_like(rep.embed)[None], [o[None] for o in outs])
    return [r[0] for r in _reads(rep, fp)], fp.final_normed[0]


class RowComputer:
    """Rows of the edge matrix for batches of targets. Columns: [active features | errors (l·T+p) | tokens]."""

    def __init__(self, rep: LocalReplacement, leaves: _Leaves):
        self.rep, self.lv, self.tc = rep, leaves, rep.tc
        self.L, self.T, self.D = rep.mlp_out.shape
        self.nf = len(rep.features)
        self.n_cols = self.nf + (self.L + 1) * self.T
        self.slices = rep.features.layer_slices(self.L)
        self.err = rep.error.float()  # [L, T, D] error nodes' output vectors
        self.emb = rep.embed.float()  # [T, D] token nodes' output vectors
        self.groups = self._build_groups()
        self.dec = None if self.groups is not None else self._decoder_rows()

    def __call__(self, seeds: list[tuple[int, int, Tensor]]) -> Tensor:
        """seeds: (read layer, L = final_normed; pos; input vector [D]) -> rows [B, n_cols] float32.

        The pass runs on the prefix up to the last seed position and up to the deepest read point only
        (causality: columns of later positions are 0, leaves at or above the deepest read point get no
        gradient); batches with similar positions/layers (`plan_batches`) make this pay.
        """
        L, D, B = self.L, self.D, len(seeds)
        P = max(s[1] for s in seeds) + 1
        top = max(s[0] for s in seeds)
        # A fresh batch-1 forward per batch: backward passes with is_grads_batched=True on a retained graph
        # leak their batched buffers into it (torch 2.13), and the forward costs ~1/B of the backward.
        lv = build_leaves(self.rep, P, None if top == L else top)
        dtype, dev = lv.emb.dtype, lv.emb.device
        outputs, grad_outputs = [], []
        for layer in sorted({s[0] for s in seeds}):
            g = torch.zeros(B, 1, P, D, dtype=dtype, device=dev)
            for b, (lay, pos, vec) in enumerate(seeds):
                if lay == layer:
                    g[b, 0, pos] = vec.to(dtype)
            outputs.append(lv.final if layer == L else lv.reads[layer])
            grad_outputs.append(g)
        inputs = [lv.emb] + lv.outs[:top]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True, allow_unused=True)
        return self._rows(grads, top, P)

    @torch.no_grad()
    def _rows(self, grads: tuple, top: int, P: int) -> Tensor:
        """Gradients on the prefix P and layers < top -> full rows (0 at later positions)."""
        L, T, nf = self.L, self.T, self.nf
        B, dev = grads[0].shape[0], grads[0].device
        # d(target)/d(MLP output l at p), l < top, p < P: every leaf below the deepest read point is reached
        Gs = [g[:, 0].float() for g in grads[1:]]  # top × [B, P, D]
        rows = torch.zeros(B, self.n_cols, device=dev)
        self._feature_cols(Gs, rows, top, P)
        err_cols = rows[:, nf:nf + L * T].view(B, L, T)
        for layer, g in enumerate(Gs):
            err_cols[:, layer, :P] = torch.einsum("btd,td->bt", g, self.err[layer, :P])
        rows[:, nf + L * T:nf + L * T + P] = torch.einsum("btd,td->bt", grads[0][:, 0].float(), self.emb[:P])
        return rows

    @torch.no_grad()  # transcoder weights are Parameters: without this, `rows` would record their history
    def _feature_cols(self, Gs: list[Tensor], rows: Tensor, top: int, P: int) -> None:
        """rows[:, k] = a_k Σ_j <G[:, l_k + j, p_k], W_dec[l_k][f_k, j]>: every decoder that reaches a target.

        Grouped by (output layer, position): one [B, D] @ [D, n] product per group, no gathered copy of G.
        """
        if self.groups is None:
            if Gs:  # else every target reads at layer 0: no feature reaches it
                self._feature_cols_gathered(Gs, rows, top, P)
            return
        for layer in range(top):
            g = Gs[layer]
            for pos, cols, vecs in self.groups[layer]:
                if pos >= P:
                    break
                rows.index_add_(1, cols, g[:, pos] @ vecs.T)  # [B, D] @ [D, n]

    @torch.no_grad()
    def _decoder_rows(self) -> list[tuple[Tensor, Tensor]]:
        """Per source layer s: (W_dec[s] rows of its distinct active features [u, n_out, D], each active
        feature's row in it [n_s]): read once (a feature firing at several positions is stored once)."""
        out = []
        for s, sl in enumerate(self.slices):
            uniq, inverse = self.rep.features.index[sl].unique(return_inverse=True)
            out.append((self.tc.decoder_vectors(s, uniq), inverse))
        return out

    def _feature_cols_gathered(self, Gs: list[Tensor], rows: Tensor, top: int, P: int, chunk_elems: int = 2**24
                               ) -> None:
        """Long prompts (too many (layer, position) groups): gather Gs at the features' positions, a chunk of
        features at a time (no copy of all the gradients is made: a batch's [B, top, P, D] is large)."""
        feats, B = self.rep.features, Gs[0].shape[0]
        for s, sl in enumerate(self.slices):
            if sl.stop == sl.start or s >= top:
                continue
            stop = sl.start + int(torch.searchsorted(feats.pos[sl], P))  # sorted by pos within a layer
            k = min(self.tc.n_out(s), top - s)  # output layers that can reach a read point in this batch
            dec, inverse = self.dec[s]
            step = max(1, chunk_elems // (B * k * self.D))
            for c in range(sl.start, stop, step):
                e = min(c + step, stop)
                pos = feats.pos[c:e]
                g = torch.stack([Gs[s + j][:, pos].transpose(0, 1) for j in range(k)], 2)  # [c, B, k, D]
                g = g.view(e - c, B, k * self.D)
                w = dec[inverse[c - sl.start:e - sl.start], :k].float().reshape(e - c, k * self.D, 1)  # [c, k·D, 1]
                rows[:, c:e] = torch.bmm(g, w)[:, :, 0].T * feats.act[c:e].float()

    @torch.no_grad()
    def _build_groups(self, max_groups: int = 4096, max_mb: float = 512) -> list[list] | None:
        """Per output layer l, sorted by position: (pos, feature columns [n], vectors a·W_dec[s][f, l − s]
        [n, D]) of all source layers s <= l at once. None (use the gathered path) when too many/too big."""
        feats, tc = self.rep.features, self.tc
        n_vecs = sum(tc.n_out(s) * (sl.stop - sl.start) for s, sl in enumerate(self.slices))
        n_pos = feats.pos.unique().numel()
        if self.L * n_pos > max_groups or n_vecs * self.D * 4 > max_mb * 2**20:
            return None
        parts: list[list] = [[] for _ in range(self.L)]  # per output layer: (cols, pos, vecs) per source
        for s, sl in enumerate(self.slices):
            if sl.stop == sl.start:
                continue
            vecs = tc.feature_writes(s, feats.index[sl], feats.act[sl]).float()  # [n, n_out, D]
            cols = torch.arange(sl.start, sl.stop, device=vecs.device)
            for j in range(tc.n_out(s)):
                parts[s + j].append((cols, feats.pos[sl], vecs[:, j]))
        groups: list[list] = []
        for layer_parts in parts:
            groups.append([])
            if not layer_parts:
                continue
            cols = torch.cat([c for c, _, _ in layer_parts])
            pos = torch.cat([p for _, p, _ in layer_parts])
            vecs = torch.cat([v for _, _, v in layer_parts])
            order = pos.argsort(stable=True)
            cols, pos, vecs = cols[order], pos[order], vecs[order]
            ps, counts = pos.unique_consecutive(return_counts=True)
            for p, c, v in zip(ps.tolist(), cols.split(counts.tolist()), vecs.split(counts.tolist())):
                groups[-1].append((p, c, v.contiguous()))
        return groups


def plan_batches(keys: list[tuple[int, int]], sizes: list[int], n_layers: int, overhead: float = 3.0
                 ) -> list[list[int]]:
    """keys[i] = (position, read layer) of row i -> batches (lists of i) that make truncated passes cheap.

    A batch costs ~ (rows + overhead) · (last position + 1) · (deepest read layer + 1): the backward of each
    row plus the batch's own forward and bookkeeping (~3 rows on CPU). Rows are sorted by (layer band,
    position, layer) for k equal layer bands, cut into consecutive batches of each size in `sizes`, and the
    cheapest (k, size) wins (k = 1: sorted by position only).
    """
    if not keys:
        return []
    best, best_cost = None, None
    for k in range(1, n_layers + 1):
        order = sorted(range(len(keys)), key=lambda i: (keys[i][1] * k // n_layers, keys[i][0], keys[i][1]))
        for size in sizes:
            batches = [order[i:i + size] for i in range(0, len(order), size)]
            cost = sum((len(b) + overhead) * (max(keys[i][0] for i in b) + 1) * (max(keys[i][1] for i in b) + 1)
                       for b in batches)
            if best_cost is None or cost < best_cost:
                best, best_cost = batches, cost
    return best


def _influence_on_columns(rows: Tensor, row_col: Tensor, weights: Tensor, n_cols: int, max_iter: int = 128) -> Tensor:
    """Estimated influence of every column on the logits from the rows computed so far.

    rows [R, n_cols]; row_col [R] the column of each row's node (n_cols for logits, which have none);
    weights [R] logit probabilities (0 for feature rows). Power series Σ_k wᵀ Âᵏ with Â = row-normalized |A|.
    """
    R, dev = rows.shape[0], rows.device
    inv = torch.empty(R, device=dev)
    has_col = row_col < n_cols  # logit rows have no column
    cols = row_col[has_col]
    Q = torch.zeros(R, R, device=dev)  # Â restricted to the rows' own columns: Q[i, j] = Â[i, row_col[j]]
    for i in range(0, R, 1024):  # chunked so |rows| is never materialized whole
        a = rows[i:i + 1024].abs()
        inv[i:i + 1024] = 1.0 / a.sum(1).clamp_min(1e-10)
        Q[i:i + 1024, has_col] = a[:, cols] * inv[i:i + 1024, None]
    # Σ_k y_k with y_k = c_k Â and c_{k+1} = y_k[row_col] = c_k Q: the series runs on Q, then one pass over Â
    cur, total = weights.clone(), torch.zeros(R, device=dev)
    for _ in range(max_iter):
        total += cur
        cur = cur @ Q
        if not cur.any():
            break
    acc = torch.zeros(n_cols, device=dev)
    for i in range(0, R, 1024):
        acc += (total[i:i + 1024] * inv[i:i + 1024]) @ rows[i:i + 1024].abs()
    return acc


def _batch_size(batch_size: int, L: int, T: int, D: int, memory_mb: float) -> int:
    """Rows per backward so that the [B, L, T, D] gradients (and vmap's temporaries, ~3×) fit memory_mb."""
    per_row = 4 * (L + 1) * T * D * 3
    return max(1, min(batch_size, int(memory_mb * 2**20 // per_row)))


def attribute(
    model: ModelAdapter, tc: Transcoder, prompt: str | Tensor, *, targets: list | None = None,
    max_n_logits: int = 10, desired_logit_prob: float = 0.95, max_feature_nodes: int | None = None,
    batch_size: int = 64, update_interval: int = 4, memory_mb: float = 1024, fold_dropped: bool = True,
    log: Callable[[str], None] | None = None,
) -> Graph:
    """Build the attribution graph of `prompt` (text, or token ids [T] with BOS first).

    max_feature_nodes: keep at most this many features, the most influential on the logits (estimated as
    rows arrive, logit rows first, like circuit-tracer). The edges of features left out are added to the
    error node of their (layer, pos) when fold_dropped, so every row still sums to its target's value.
    batch_size: rows per backward (lowered so the batch's gradients fit in memory_mb).
    """
    t0, timings = time.perf_counter(), {}
    ids = model.tokenize(prompt) if isinstance(prompt, str) else prompt.to(model.device)
    text = prompt if isinstance(prompt, str) else model.tokenizer.decode(ids.tolist())

    rep = build_replacement(model, tc, ids)
    tgts = select_targets(model, rep.last_logits, targets, max_n_logits=max_n_logits,
                          desired_logit_prob=desired_logit_prob)
    timings["forward"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    leaves = build_leaves(rep)
    rc = RowComputer(rep, leaves)
    L, T, D, nf = rc.L, rc.T, rc.D, rc.nf
    B = _batch_size(batch_size, L, T, D, memory_mb)
    feats = rep.features
    dev = leaves.emb.device

    # every active feature's encoder column [nf, D] (its row's seed), read once: a lazy transcoder reads each
    # layer's encoder once here instead of once per batch
    with torch.no_grad():
        enc = (feats.enc if feats.enc is not None else tc.encoder_vectors(feats.layer, feats.index)).float()

    def feature_seed(k: int) -> tuple[int, int, Tensor]:
        return int(feats.layer[k]), int(feats.pos[k]), enc[k]

    # rows land in one buffer allocated once (logit rows first, then feature rows in visiting order):
    # no concatenated copy of the rows is ever made
    budget = nf if max_feature_nodes is None else min(max_feature_nodes, nf)
    rows = torch.empty(len(tgts) + budget, rc.n_cols, device=dev)
    n_rows = 0

    def add_rows(block: Tensor) -> None:
        nonlocal n_rows
        rows[n_rows:n_rows + block.shape[0]] = block
        n_rows += block.shape[0]

    for i in range(0, len(tgts), B):
        add_rows(rc([(L, T - 1, t.vector) for t in tgts[i:i + B]]))
    timings["logit_rows"] = time.perf_counter() - t1

    # feature rows: all of them, or the most influential ones first (refreshed every update_interval
    # batches); either way in batches of nearby (position, layer) that truncated passes make cheap
    t2 = time.perf_counter()
    f_pos, f_layer = feats.pos.tolist(), feats.layer.tolist()
    visited: list[int] = []

    # CPU: per-row cost hardly depends on the batch size above ~16, so smaller batches that truncate
    # tighter can win; on an accelerator, larger batches are what pays
    sizes = [B] if dev.type != "cpu" else sorted({B, max(1, B // 2), max(1, B // 4)})
    n_batches = 0

    def run_rows(ks: list[int]) -> None:
        nonlocal n_batches
        for batch in plan_batches([(f_pos[k], f_layer[k]) for k in ks], sizes, L):
            n_batches += 1
            kb = [ks[i] for i in batch]
            add_rows(rc([feature_seed(k) for k in kb]))
            visited.extend(kb)

    if budget == nf:
        run_rows(list(range(nf)))
    else:
        seen = torch.zeros(nf, dtype=torch.bool, device=dev)
        weights = torch.tensor([t.prob for t in tgts], device=dev)
        while len(visited) < budget:
            row_col = torch.tensor([rc.n_cols] * len(tgts) + visited, device=dev)
            w = torch.cat([weights, torch.zeros(len(visited), device=dev)])
            inf = _influence_on_columns(rows[:n_rows], row_col, w, rc.n_cols)[:nf]
            inf[seen] = -1
            ks = inf.argsort(descending=True)[: min(budget - len(visited), update_interval * B)].tolist()
            run_rows(ks)
            seen[ks] = True
    timings["feature_rows"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    graph = _assemble(model, rep, tgts, rows[:n_rows], visited, text, ids, fold_dropped, leaves, enc)
    with torch.no_grad():
        ref = model.hf(input_ids=ids[None], logits_to_keep=1).logits[0, -1].float()  # the plain HF forward
        graph.meta["max_logit_error"] = float((rep.forward(last_only=True)[-1].float() - ref).abs().max())
    timings["assemble"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    graph.meta.update(seconds=timings, batch_size=B, n_feature_batches=n_batches, n_active_features=nf,
                      dtype=str(leaves.emb.dtype), model=model.name, transcoder_kind=tc.cfg.kind,
                      transcoder_input=tc.cfg.reads, scan=tc.cfg.extra.get("scan", ""))
    if log:
        log(f"attribution: {nf} active features, {len(visited)} rows of features, {len(tgts)} logits, "
            f"{timings['total']:.2f}s")
    return graph


@torch.no_grad()
def _assemble(model: ModelAdapter, rep: LocalReplacement, tgts: list[Target], rows: Tensor, visited: list[int],
              text: str, ids: Tensor, fold_dropped: bool, leaves: _Leaves, enc: Tensor, chunk: int = 1024) -> Graph:
    """Rows in visiting order -> the Graph's node order, with unselected feature columns folded or dropped.

    Written chunk by chunk of rows straight into the edge matrix, so no temporary as large as the rows exists.
    """
    feats = rep.features
    L, T = rep.mlp_out.shape[:2]
    nf, n_l = len(feats), len(tgts)
    dev = rows.device
    sel = torch.tensor(sorted(visited), dtype=torch.long, device=dev)
    n_sel = sel.numel()
    N = n_sel + (L + 1) * T + n_l
    # column map: old column -> new node index
    col_map = torch.full((nf,), -1, dtype=torch.long, device=dev)
    col_map[sel] = torch.arange(n_sel, device=dev)
    dropped = (col_map < 0).nonzero(as_tuple=True)[0]
    err_cols = n_sel + feats.layer[dropped] * T + feats.pos[dropped]
    # row order: selected features (ascending), then logits; dest[i] = where computed row i goes
    order = {k: i for i, k in enumerate(visited)}
    feat_rows = torch.tensor([n_l + order[k] for k in sel.tolist()], dtype=torch.long, device=dev)
    perm = torch.cat([feat_rows, torch.arange(n_l, device=dev)])
    dest = torch.empty_like(perm)
    dest[perm] = torch.arange(perm.numel(), device=dev)
    edges = torch.zeros(rows.shape[0], N, device=dev)
    for i in range(0, rows.shape[0], chunk):
        r = rows[i:i + chunk]
        e = torch.zeros(r.shape[0], N, device=dev)
        e[:, :n_sel] = r[:, sel]
        e[:, n_sel:n_sel + (L + 1) * T] = r[:, nf:]
        if fold_dropped and dropped.numel():
            e.index_add_(1, err_cols, r[:, dropped])
        edges[dest[i:i + chunk]] = e
    row_nodes = torch.cat([torch.arange(n_sel, device=dev), torch.arange(N - n_l, N, device=dev)])
    # constants and values
    c_reads, c_final = constants(rep)
    s_layer, s_pos, s_idx = feats.layer[sel], feats.pos[sel], feats.index[sel]
    c_feat = (torch.stack(c_reads).float()[s_layer, s_pos] * enc[sel]).sum(-1)  # enc [nf, D]
    vecs = torch.stack([t.vector for t in tgts]).to(dev)  # [n_l, D]
    c_logit = vecs @ c_final[-1].float()
    v_logit = vecs @ leaves.final[0, -1].detach().float()
    return Graph(
        prompt=text, input_ids=ids.cpu(), tokens=model.decode(ids), n_layers=L,
        features=torch.stack([s_layer, s_pos, s_idx], 1).cpu(), activations=feats.act[sel].float().cpu(),
        logit_tokens=torch.tensor([t.token for t in tgts]), logit_labels=[t.label for t in tgts],
        logit_probs=torch.tensor([t.prob for t in tgts]), rows=row_nodes.cpu(), edges=edges.cpu(),
        row_constant=torch.cat([c_feat, c_logit]).cpu(), row_value=torch.cat([feats.pre[sel].float(), v_logit]).cpu(),
        meta={"n_rows_computed": int(rows.shape[0]), "fold_dropped": fold_dropped},
    )
