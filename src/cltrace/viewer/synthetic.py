"""A random attribution graph of a chosen size, built without a model.

The viewer's benchmark needs a graph of 5,000 nodes and 50,000 edges, and its tests need graphs with known
ids; tracing a real model to get one would take minutes and tie the numbers to a model. The graph obeys the
real graphs' rules (a source feeds only later layers at the same or later positions, features and logits are
the only targets, every row sums to its value), so pruning, scores and the viewer treat it like a traced one.
"""

from __future__ import annotations

import torch

from cltrace.attribution.graph import Graph


def synthetic_graph(n_nodes: int = 5000, n_edges: int = 50_000, *, n_layers: int = 18, n_pos: int = 24,
                    n_logits: int = 5, seed: int = 0, prompt: str | None = None) -> Graph:
    """A random DAG-shaped Graph with n_nodes nodes in all and about n_edges nonzero edges."""
    g = torch.Generator().manual_seed(seed)
    L, T = n_layers, n_pos
    n_feat = n_nodes - (L + 1) * T - n_logits
    if n_feat < 1:
        raise ValueError(f"{n_nodes} nodes cannot hold {L} layers × {T} positions plus {n_logits} logits")
    layer = torch.randint(0, L, (n_feat,), generator=g)
    pos = torch.randint(1, T, (n_feat,), generator=g)
    feat = torch.randint(0, 4096, (n_feat,), generator=g)
    order = torch.argsort(layer * T * 10_000 + pos * 10_000 + feat)  # the graph's (layer, pos, feature) order
    features = torch.stack([layer[order], pos[order], feat[order]], 1)
    features = torch.unique(features, dim=0)  # duplicates (same layer, pos, feature) are merged
    n_feat = features.shape[0]
    N = n_feat + (L + 1) * T + n_logits
    rows = torch.cat([torch.arange(n_feat), torch.arange(N - n_logits, N)])
    # node (layer, pos) of every possible source: features, errors, tokens (layer -1)
    src_layer = torch.cat([features[:, 0], torch.arange(L).repeat_interleave(T), torch.full((T,), -1)])
    src_pos = torch.cat([features[:, 1], torch.arange(T).repeat(L), torch.arange(T)])
    tgt_layer = torch.cat([features[:, 0], torch.full((n_logits,), L)])
    tgt_pos = torch.cat([features[:, 1], torch.full((n_logits,), T - 1)])
    edges = torch.zeros(rows.numel(), N)
    per_row = max(1, round(0.96 * n_edges / rows.numel()))  # the rest: features' edges to the logits (below)
    n_src = src_layer.numel()
    for r in range(rows.numel()):
        ok = ((src_layer < tgt_layer[r]) & (src_pos <= tgt_pos[r])).nonzero().flatten()
        if ok.numel() == 0:
            continue
        # prefer nearby sources (as real graphs do): sample among the allowed ones, weighted by closeness
        closeness = 1.0 / (1.0 + (tgt_layer[r] - src_layer[ok]).float() + (tgt_pos[r] - src_pos[ok]).float())
        k = min(per_row, ok.numel())
        pick = ok[torch.multinomial(closeness, k, replacement=False, generator=g)]
        assert int(pick.max()) < n_src
        edges[r, pick] = torch.randn(k, generator=g) * closeness[torch.searchsorted(ok, pick)] * 2
    # as in a traced graph, every feature reaches the logits: one without a target gets an edge to a logit
    lonely = (edges[:, :n_feat] == 0).all(0).nonzero().flatten()
    if lonely.numel():
        logit_rows = torch.randint(n_feat, rows.numel(), (lonely.numel(),), generator=g)
        edges[logit_rows, lonely] = torch.randn(lonely.numel(), generator=g) * 0.2
    acts = torch.rand(n_feat, generator=g) * 5 + 0.1
    probs = torch.softmax(torch.randn(n_logits, generator=g) * 2, 0)
    probs = probs.sort(descending=True).values
    ids = torch.randint(0, 250, (T,), generator=g)
    ids[0] = 256
    tokens = ["<bos>"] + [f"tok{i}" for i in range(1, T)]
    value = edges.sum(1)
    return Graph(prompt=prompt or " ".join(tokens[1:]), input_ids=ids, tokens=tokens, n_layers=L,
                 features=features, activations=acts, logit_tokens=torch.arange(n_logits) + 100,
                 logit_labels=[f" out{i}" for i in range(n_logits)], logit_probs=probs, rows=rows, edges=edges,
                 row_constant=torch.zeros(rows.numel()), row_value=value,
                 meta={"model": "synthetic", "vocab_size": 264, "synthetic": True})
