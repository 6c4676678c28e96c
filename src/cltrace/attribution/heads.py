"""Head loadings: how much of a graph edge each attention head carries across positions.

An edge A[t, s] is a sum over paths through the frozen linear model from the source's output to the target's
read point. Causal attention only moves information forward, so a path from position p_s to p_t ≠ p_s changes
position at least once, always at an attention head. We split the edge by the **last** position change:

    A[t, s] = direct + Σ_{m, h, j ≠ p_t} loading[m, h, j]
    loading[m, h, j] = P_m[h, p_t, j] · ⟨ w_t[m, h],  v_s[m, kv(h), j] ⟩

* v_s[m] — the source's contribution to layer m's value vectors at every position j, in the FULL frozen model
  (every path up to layer m, any number of earlier crossings; a forward-mode derivative of the affine pass);
* P_m[h, p_t, j] — the frozen attention weight of head h from the target's position p_t to key j ≠ p_t;
* w_t[m, h] — the target's gradient with respect to head h's mixed value at (m, p_t), taken in the
  *position-preserving* model: the frozen model with every attention pattern cut to its diagonal, so after
  layer m the signal never leaves p_t again (through W_O, Gemma's frozen post-attention norm, later blocks);
* direct — the edge in the position-preserving model: paths that never change position (0 when p_s ≠ p_t).

The identity is exact (a telescoping sum over layers: full − diagonal = Σ_m diagonal-after-m ∘ off-diagonal
at m ∘ full-before-m), so the loadings and the direct part add up to the edge; `tests/test_qk_heads.py` checks it
against the attribution engine's edges on every family. The key position j of a head's loading is where that
head read the information from: the (head, p_t, j) whose QK attribution explains the edge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cltrace.attribution.export import node_ids
from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import influence, normalize_rows
from cltrace.attribution.qk import HeadQuery, qk_attributions, skip_write
from cltrace.errors import CltraceError
from cltrace.models.adapter import Frozen
from cltrace.replacement.forward import frozen_forward
from cltrace.replacement.local import LocalReplacement


@dataclass
class EdgeLoading:
    """The split of one graph edge (row r, source column c of graph.edges) by the head that crosses last."""

    row: int
    col: int
    graph_edge: float  # graph.edges[row, col]
    direct: float  # paths that never change position
    loadings: Tensor  # [L, H, T] by (layer, head, key position j) of the last crossing

    @property
    def edge(self) -> float:
        """direct + Σ loadings: equals graph_edge (the engine's edge) up to rounding."""
        return self.direct + float(self.loadings.sum())

    def by_head(self) -> Tensor:
        """[L, H] each head's part (summed over key positions)."""
        return self.loadings.sum(-1)

    def top_heads(self, k: int = 3) -> list[tuple[int, int, int, float]]:
        """(layer, head, key position of its largest part, part) of the k heads with the largest |part|."""
        per = self.by_head()
        idx = per.flatten().abs().topk(min(k, per.numel())).indices.tolist()
        out = []
        for i in idx:
            m, h = divmod(i, per.shape[1])
            j = int(self.loadings[m, h].abs().argmax())
            out.append((m, h, j, float(per[m, h])))
        return out


# ---------------------------------------------------------------------- node vectors
def _source_slot(rep: LocalReplacement, graph: Graph, col: int) -> tuple[Tensor, Tensor, int]:
    """Graph column -> (embedding tangent [T, D], leaf tangents [L, T, D], position) of that node's output."""
    L, T, D = rep.mlp_out.shape
    emb = torch.zeros(T, D, device=rep.embed.device)
    outs = torch.zeros(L, T, D, device=rep.embed.device)
    if col < graph.n_features:
        layer, pos, f = graph.features[col].tolist()
        k = _feature_index(rep, layer, pos, f)
        writes = rep.tc.feature_writes(layer, rep.features.index[k:k + 1], rep.features.act[k:k + 1])[0]
        outs[layer:layer + writes.shape[0], pos] = writes.float()
    elif col < graph.token_index(0):
        layer, pos = divmod(col - graph.n_features, T)
        outs[layer, pos] = rep.error[layer, pos].float()
    elif col < graph.logit_index(0):
        pos = col - graph.token_index(0)
        emb[pos] = rep.embed[pos].float()
    else:
        raise CltraceError(f"column {col} is a logit node: logits are never edge sources")
    return emb, outs, pos


def _feature_index(rep: LocalReplacement, layer: int, pos: int, f: int) -> int:
    fe = rep.features
    hit = ((fe.layer == layer) & (fe.pos == pos) & (fe.index == f)).nonzero()
    if not hit.numel():
        raise CltraceError(f"feature {layer}:{f}@{pos} is not active on this prompt with these transcoders: "
                           "give the model and transcoders the graph was built with")
    return int(hit[0, 0])


def _target_seed(rep: LocalReplacement, graph: Graph, row: int) -> tuple[int, int, Tensor]:
    """Graph row -> (read layer, L for final_normed; position; input vector [D])."""
    node = int(graph.rows[row])
    L = rep.tc.n_layers
    if node < graph.n_features:
        layer, pos, f = graph.features[node].tolist()
        return layer, pos, rep.tc.encoder_vectors(torch.tensor([layer]), torch.tensor([f]))[0].detach().float()
    i = node - graph.logit_index(0)
    tok = int(graph.logit_tokens[i])
    if tok < 0:
        raise CltraceError("head loadings of a contrast logit (A - B) are not supported: trace with plain targets")
    W_U = rep.model.W_U.float()
    return L, rep.n_pos - 1, (W_U[tok] - W_U.mean(0)).detach()


# ---------------------------------------------------------------------- the two passes
def _model_pieces(rep: LocalReplacement, m: int):
    fam = rep.model.family
    block = rep.model.blocks[m]
    return fam, block, fam.attn_module(block), fam.norms(block)


def source_values(rep: LocalReplacement, emb_t: Tensor, outs_t: Tensor) -> list[Tensor]:
    """Sources' output vectors emb_t [N, T, D], outs_t [L, N, T, D] -> per layer m their contribution to the
    value vectors v_m [N, K, T, Dh] in the full frozen model (the linear part: a forward-mode derivative)."""
    model, tc, L = rep.model, rep.tc, rep.tc.n_layers
    dtype = rep.embed.dtype

    def values(emb: Tensor, *outs: Tensor) -> tuple[Tensor, ...]:
        added: list[Tensor] = []

        def mlp(layer: int, rm: Tensor, mi: Tensor) -> Tensor:
            added.append(outs[layer] + skip_write(tc, layer, rm, mi))
            return added[-1]

        fp = frozen_forward(model, emb, rep.frozen, mlp, stop_at_layer=L - 1)
        vs = []
        for m in range(L):
            fam, _, attn, norms = _model_pieces(rep, m)
            x = emb if m == 0 else fp.resid_mid[m - 1] + added[m - 1]
            h = model.norm(norms["attn_in"], x, f"{m}.attn_in", rep.frozen, Frozen())
            vs.append(fam.qkv(attn, h, False)[2])
        return tuple(vs)

    primals = (torch.zeros_like(emb_t, dtype=dtype),) + tuple(torch.zeros_like(o, dtype=dtype) for o in outs_t)
    tangents = (emb_t.to(dtype),) + tuple(o.to(dtype) for o in outs_t)
    _, vs = torch.func.jvp(values, primals, tangents)
    return [v.detach().float() for v in vs]


def target_gradients(rep: LocalReplacement, layer: int, pos: int, vec: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """One target (read layer, position, input vector) in the position-preserving model (patterns cut to their
    diagonal) -> (w [M, H, Dh]: gradient at each head's mixed value at (m, pos) for the M = layer + 1 (or L)
    attention layers before the read; G_emb [T, D]; G_leaves [M', T, D] at the leaves below the read)."""
    model, tc = rep.model, rep.tc
    L, T = tc.n_layers, rep.n_pos
    eye = torch.eye(T, device=rep.embed.device, dtype=rep.frozen.patterns[0].dtype)
    diag = Frozen([p * eye for p in rep.frozen.patterns], rep.frozen.scales)
    n_leaves = L if layer == L else layer
    leaves = rep.mlp_out if rep.skip is None else rep.mlp_out - rep.skip
    emb = rep.embed[None].detach().clone().requires_grad_(True)
    outs = [leaves[m][None].detach().clone().requires_grad_(True) for m in range(n_leaves)]
    with torch.enable_grad():
        fp = frozen_forward(model, emb, diag, lambda m, rm, mi: outs[m] + skip_write(tc, m, rm, mi),
                            stop_at_layer=None if layer == L else layer)
        read = fp.final_normed if layer == L else tc.select_input(fp.resid_mid, fp.mlp_in)[layer]
        value = read[0, pos].float() @ vec.float()
        n_att = L if layer == L else layer + 1
        grads = torch.autograd.grad(value, fp.resid_mid[:n_att] + [emb] + outs, allow_unused=True)
    g_mid, G_emb = grads[:n_att], grads[n_att][0].float()
    G_leaves = torch.stack([g[0].float() if g is not None else torch.zeros_like(G_emb) for g in grads[n_att + 1:]]) \
        if n_leaves else torch.zeros(0, T, G_emb.shape[-1], device=G_emb.device)
    ws = []
    for m in range(n_att):
        ws.append(_head_space_gradient(rep, m, pos, g_mid[m][0, pos]))
    return torch.stack(ws), G_emb, G_leaves


def _head_space_gradient(rep: LocalReplacement, m: int, pos: int, g: Tensor) -> Tensor:
    """g [D] at resid_mid[m][pos] -> [H, Dh]: pulled back through W_O and any frozen post-attention norm."""
    model = rep.model
    fam, _, attn, norms = _model_pieces(rep, m)
    H = model.n_heads
    u0 = torch.zeros(1, 1, H * attn.head_dim, dtype=rep.embed.dtype, device=rep.embed.device)

    def write(u: Tensor) -> Tensor:
        a = fam.attn_out(attn, u)
        if "attn_out" in norms:
            key = f"{m}.attn_out"
            a = model.norm(norms["attn_out"], a, key, Frozen(scales={key: rep.frozen.scales[key][:, pos:pos + 1]}),
                           Frozen())
        return a

    _, pull = torch.func.vjp(write, u0)
    return pull(g.to(u0.dtype).view(1, 1, -1))[0].view(H, -1).float()


# ---------------------------------------------------------------------- the split
def head_loadings(rep: LocalReplacement, graph: Graph, edges: list[tuple[int, int]]) -> list[EdgeLoading]:
    """Split each edge (row r, column c of graph.edges) into the direct part and per-(layer, head, key position)
    loadings; one backward per distinct target and one forward-mode pass per distinct source."""
    L, T = rep.tc.n_layers, rep.n_pos
    H = rep.model.n_heads
    if graph.n_pos != T or not torch.equal(graph.input_ids.cpu(), rep.ids.cpu()):
        raise CltraceError("the graph was built on another prompt than this replacement model's")
    cols = sorted({c for _, c in edges})
    with torch.no_grad():  # transcoder weights are Parameters: the slots need no history
        slots = [_source_slot(rep, graph, c) for c in cols]
    emb_t = torch.stack([s[0] for s in slots])  # [N, T, D]
    outs_t = torch.stack([s[1] for s in slots], 1)  # [L, N, T, D]
    values = source_values(rep, emb_t, outs_t)  # L × [N, K, T, Dh]
    col_i = {c: i for i, c in enumerate(cols)}
    targets = {}
    for r in sorted({r for r, _ in edges}):
        layer, pos, vec = _target_seed(rep, graph, r)
        targets[r] = (layer, pos, *target_gradients(rep, layer, pos, vec))
    out = []
    for r, c in edges:
        layer, pos, w, G_emb, G_leaves = targets[r]
        i = col_i[c]
        direct = float((G_emb * emb_t[i]).sum() + (G_leaves * outs_t[:G_leaves.shape[0], i]).sum())
        loads = torch.zeros(L, H, T)
        for m in range(w.shape[0]):
            v = values[m][i]  # [K, T, Dh]
            n_rep = H // v.shape[0]
            v = v.repeat_interleave(n_rep, 0)  # [H, T, Dh]
            per_j = torch.einsum("hd,htd->ht", w[m], v) * rep.frozen.patterns[m][0, :, pos].float()  # [H, T]
            per_j[:, pos] = 0  # the diagonal stays at p_t: part of the position-preserving model
            loads[m] = per_j.detach().cpu()
        out.append(EdgeLoading(r, c, float(graph.edges[r, c]), direct, loads))
    return out


def cross_position_edges(graph: Graph, top: int = 20, mask: Tensor | None = None) -> list[tuple[int, int]]:
    """The `top` most influential edges (row, column) between nodes at different positions: ranked by pruning's
    edge score, |A[r, c]| / Σ_c |A[r, c]| times the influence of r on the logits (plus r's logit weight).
    mask [R, N] limits the choice (e.g. a PruneResult's edge_mask). Error nodes are left out as sources (an
    error is not a feature: nothing to explain on its side)."""
    T = graph.n_pos
    pos = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    pos[:graph.n_features] = graph.features[:, 1]
    pos[graph.token_index(0):graph.token_index(0) + T] = torch.arange(T)
    pos[graph.logit_index(0):] = T - 1
    row_pos = pos[graph.rows]
    A = normalize_rows(graph.edges.float())
    w = graph.logit_weights()
    score = A * (influence(A, graph.rows, w) + w)[graph.rows, None]
    ok = (pos[None, :] >= 0) & (pos[None, :] != row_pos[:, None]) & (graph.edges != 0)
    if mask is not None:
        ok &= mask
    flat = torch.where(ok, score, torch.zeros(())).flatten()
    idx = flat.topk(min(top, int(ok.sum()))).indices.tolist()
    return [divmod(i, graph.n_nodes) for i in idx]


# ---------------------------------------------------------------------- edges explained end to end
def explain_edges(rep: LocalReplacement, graph: Graph, edges: list[tuple[int, int]], *, heads_per_edge: int = 1,
                  top_terms: int = 10) -> dict:
    """Head loadings of each edge, and the QK attribution of the head(s) that carry most of it, at the edge's
    target position and the key position that head read from. JSON-ready (the side file `GRAPH.qk.json`)."""
    ids = node_ids(graph)
    loads = head_loadings(rep, graph, edges)
    asks: list[HeadQuery] = []
    per_edge = []
    for e in loads:
        pos = _target_seed_pos(graph, e.row)
        heads = [(m, h, j, part) for m, h, j, part in e.top_heads(heads_per_edge) if part != 0]
        per_edge.append(heads)
        asks += [HeadQuery(m, h, pos, j) for m, h, j, _ in heads]
    results = {}
    unique = list(dict.fromkeys(asks))
    for hq, res in zip(unique, qk_attributions(rep, unique)):
        results[hq] = res.report(rep, top_terms)
    out = []
    for e, heads in zip(loads, per_edge):
        pos = _target_seed_pos(graph, e.row)
        out.append({
            "target": ids[int(graph.rows[e.row])], "source": ids[e.col],
            "edge": e.graph_edge, "direct": e.direct, "sum_loadings": float(e.loadings.sum()),
            "heads": [{"layer": m, "head": h, "key_pos": j, "part": part,
                       "qk": results[HeadQuery(m, h, pos, j)]} for m, h, j, part in heads],
            "by_head": {f"{m}.{h}": float(v) for (m, h), v in _nonzero_heads(e.by_head())},
        })
    return {"format": "cltrace-qk", "version": 1, "prompt": graph.prompt, "tokens": graph.tokens, "edges": out}


def _target_seed_pos(graph: Graph, row: int) -> int:
    node = int(graph.rows[row])
    return int(graph.features[node, 1]) if node < graph.n_features else graph.n_pos - 1


def _nonzero_heads(per: Tensor, k: int = 8) -> list[tuple[tuple[int, int], float]]:
    """The k (layer, head) with the largest |part|, largest first."""
    idx = per.flatten().abs().topk(min(k, per.numel())).indices.tolist()
    return [(divmod(i, per.shape[1]), float(per.flatten()[i])) for i in idx if per.flatten()[i] != 0]


def qk_side_path(graph_path) -> Path:
    """Where QK results of a graph file live: next to it, GRAPH.qk.json (the graph format is unchanged)."""
    p = Path(graph_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".qk.json")


def save_qk(graph_path, data: dict) -> Path:
    """Merge `explain_edges` output into the graph's side file (an edge explained again replaces its entry)."""
    path = qk_side_path(graph_path)
    old = json.loads(path.read_text()) if path.is_file() else {"edges": []}
    new_keys = {(e["target"], e["source"]) for e in data["edges"]}
    merged = dict(data, edges=[e for e in old.get("edges", []) if (e["target"], e["source"]) not in new_keys]
                  + data["edges"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, ensure_ascii=False))
    tmp.replace(path)
    return path
