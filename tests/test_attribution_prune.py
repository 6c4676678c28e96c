"""Influence, pruning and scores against a direct dense computation on small random DAGs.

A `Graph` holds CPU tensors (attribution moves its result to the host; `kinds`, `logit_weights` and `prune` work
there), so pruning and the scores are tested on the CPU only; the influence series itself, a tensor function,
also runs on --device.
"""

import pytest
import torch

from cltrace.attribution.export import graph_json
from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import find_threshold, influence, normalize_rows, prune, scores


def random_graph(seed: int, L=3, T=4, n_f=12, n_l=3) -> Graph:
    """Random edges respecting the DAG order: features by layer, errors/tokens as sources, logits last."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.randint(0, L, (n_f,), generator=g).sort().values
    pos = torch.randint(1, T, (n_f,), generator=g)
    feats = torch.stack([layer, pos, torch.arange(n_f)], 1)
    N = n_f + (L + 1) * T + n_l
    rows = torch.cat([torch.arange(n_f), torch.arange(N - n_l, N)])
    E = torch.randn(len(rows), N, generator=g) * (torch.rand(len(rows), N, generator=g) < 0.6)
    E[:, N - n_l:] = 0
    for r in range(n_f):  # a feature only receives from features of lower layers
        E[r, :n_f] *= (layer < layer[r]).float()
    probs = torch.rand(n_l, generator=g)
    return Graph(prompt="x", input_ids=torch.arange(T), tokens=["t"] * T, n_layers=L, features=feats,
                 activations=torch.rand(n_f, generator=g), logit_tokens=torch.arange(n_l),
                 logit_labels=[str(i) for i in range(n_l)], logit_probs=probs / probs.sum() * 0.9,
                 rows=rows, edges=E, row_constant=torch.zeros(len(rows)), row_value=E.sum(1))


def dense_influence(A: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    An = A.abs() / A.abs().sum(1, keepdim=True).clamp_min(1e-10)
    N = A.shape[0]
    return w @ (torch.linalg.inv(torch.eye(N, dtype=A.dtype) - An) - torch.eye(N, dtype=A.dtype))


@pytest.mark.parametrize("seed", range(4))
def test_influence_is_inverse_series(seed, device):
    g = random_graph(seed)
    w = g.logit_weights().double()
    got = influence(normalize_rows(g.edges.double().to(device)), g.rows.to(device), w.to(device))
    assert torch.allclose(got.cpu(), dense_influence(g.adjacency().double(), w), atol=1e-10)


def dense_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    s = x.flatten().sort(descending=True).values
    return s[min(int(torch.searchsorted(s.cumsum(0) / s.sum(), torch.tensor(tau, dtype=s.dtype))), len(s) - 1)]


def dense_prune(A: torch.Tensor, w: torch.Tensor, kinds: torch.Tensor, node_tau: float, edge_tau: float):
    """`prune` written out on the dense N×N adjacency: (node mask [N], edge mask [N, N])."""
    inf = dense_influence(A, w)
    keep = (inf >= dense_threshold(inf, node_tau)) | (kinds >= 2)
    A2 = A * keep[:, None] * keep[None, :]
    An2 = A2.abs() / A2.abs().sum(1, keepdim=True).clamp_min(1e-10)
    score = An2 * (dense_influence(A2, w) + w)[:, None]
    edges = (score >= dense_threshold(score, edge_tau)) & (A2 != 0)
    while True:  # a feature/error node needs a kept outgoing edge, a feature also a kept incoming one
        new = keep & ~((kinds <= 1) & ~edges.any(0)) & ~((kinds == 0) & ~edges.any(1))
        edges &= new[:, None] & new[None, :]
        if torch.equal(new, keep):
            return keep, edges
        keep = new


def dense_scores(A: torch.Tensor, w: torch.Tensor, kinds: torch.Tensor, is_err: torch.Tensor) -> tuple[float, float]:
    """(replacement, completeness) from the dense adjacency; is_err: the nodes counted as errors."""
    inf = dense_influence(A, w)
    An = A.abs() / A.abs().sum(1, keepdim=True).clamp_min(1e-10)
    rep = inf[kinds == 2].sum() / (inf[kinds == 2].sum() + inf[is_err].sum())
    has_in = A.abs().sum(1) > 0
    non_err = torch.where(has_in, 1 - An[:, is_err].sum(1), torch.ones_like(w))
    comp = (non_err * (inf + w)).sum() / (inf + w).sum()
    return float(rep), float(comp)


@pytest.mark.parametrize("seed", range(4))
def test_prune_and_scores_match_direct_computation(seed):
    g = random_graph(seed)
    A, w, kinds = g.adjacency().double(), g.logit_weights().double(), g.kinds()
    inf = dense_influence(A, w)
    # node pruning, written out densely
    keep = (inf >= dense_threshold(inf, 0.8)) | (kinds >= 2)
    pr = prune(g, 0.8, 0.98)
    assert (pr.node_mask & ~keep).sum() == 0  # the final mask only removes nodes, never adds
    assert pr.node_mask[kinds >= 2].all()
    # the whole pruning (node threshold, edge threshold on the kept subgraph, dangling nodes) written out densely
    node_mask, edge_mask = dense_prune(A, w, kinds, 0.8, 0.98)
    assert torch.equal(pr.node_mask, node_mask) and torch.equal(pr.edge_mask, edge_mask[g.rows])
    # it really prunes: strictly fewer nodes (features and errors both), but some features and every token and logit
    assert 0 < int(pr.node_mask[kinds == 0].sum()) < g.n_features
    assert int(pr.node_mask[kinds == 1].sum()) < int((kinds == 1).sum())
    assert 0 < int(pr.edge_mask.sum()) < int((g.edges != 0).sum())
    order = inf.argsort(descending=True)  # the viewer's cumulative influence at each node's rank
    assert torch.allclose(pr.cumulative_scores.double()[order], inf[order].cumsum(0) / inf.sum(), atol=1e-6)
    # scores
    r, c = scores(g)
    rep, comp = dense_scores(A, w, kinds, kinds == 1)
    assert abs(r - rep) < 1e-5 and abs(c - comp) < 1e-5
    # pruned: the dropped features count as errors and their inputs are cut
    dropped = (kinds == 0) & ~pr.node_mask
    rp, cp = scores(g, pr)
    rep_p, comp_p = dense_scores(A * (~dropped)[:, None], w, kinds, (kinds == 1) | dropped)
    assert abs(rp - rep_p) < 1e-5 and abs(cp - comp_p) < 1e-5
    assert rp < r and cp < c  # on these graphs (measured: 0.18-0.25 vs 0.21-0.28, 0.66-0.70 vs 0.68-0.73)


def test_find_threshold():
    s = torch.tensor([5.0, 3.0, 1.0, 1.0])  # cumulative 0.5, 0.8, 0.9, 1.0
    assert find_threshold(s, 0.8) == 3.0 and find_threshold(s, 0.85) == 1.0 and find_threshold(s, 1.0) == 1.0


def test_viewer_json_ids_are_unique():
    g = random_graph(0, L=3, T=4, n_f=6)
    g.features[:, 0] = 0  # all features in layer 0 with indices 0..5: circuit-tracer's ids would collide
    g.features[:, 2] = torch.arange(6)
    g.edges[: g.n_features, : g.n_features] = 0  # keep the DAG: same-layer features do not feed each other
    data = graph_json(g, "s", node_threshold=1.0, edge_threshold=1.0)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert {lk["source"] for lk in data["links"]} | {lk["target"] for lk in data["links"]} <= set(ids)
    assert any(n["feature_type"] == "mlp reconstruction error" for n in data["nodes"])
