"""Influence, pruning and the graph scores (Ameisen et al. 2025 §"Pruning", circuit-tracer §4).

Everything works on the graph's row block (only feature and logit nodes have inputs), never on a dense N×N:

    Â = |A| with each row divided by its sum          (how much of a node's input comes from each source)
    influence = Σ_{k≥1} wᵀ Âᵏ                          (w: logit probabilities; the graph is a DAG)

Node pruning keeps the nodes holding `node_threshold` of the total influence (tokens and logits always
stay); edge pruning then keeps the edges holding `edge_threshold` of the edge scores Â'[t, s]·(inf'(t) + w_t).

`keep_pruned` makes the graph that a pruned-only file holds: the edges one pruning keeps, and that pruning (as
computed on the full graph) beside them, so `prune` at the same thresholds gives the full graph's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from cltrace.attribution.graph import Graph, KeptPruning


def normalize_rows(edges: Tensor) -> Tensor:
    """[R, N] -> |edges| / row sum (a row with no input stays 0)."""
    a = edges.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(norm_rows: Tensor, rows: Tensor, w: Tensor, max_iter: int = 1000) -> Tensor:
    """Σ_{k≥1} wᵀ Âᵏ for Â given by its row block (norm_rows [R, N] at node indices rows [R]) -> [N]."""
    x, acc = w.clone(), torch.zeros_like(w)
    for _ in range(max_iter):
        x = x[rows] @ norm_rows
        if not x.any():
            return acc
        acc += x
    raise RuntimeError("influence did not converge: the graph has a cycle")


def find_threshold(scores: Tensor, tau: float) -> Tensor:
    """The smallest score among the top ones that together hold a fraction tau of the total."""
    s = scores.flatten().sort(descending=True).values
    c = s.cumsum(0) / s.sum().clamp_min(1e-30)
    i = min(int(torch.searchsorted(c, torch.tensor(tau, dtype=c.dtype))), s.numel() - 1)
    return s[i]


@dataclass
class PruneResult:
    node_mask: Tensor  # [N] bool
    edge_mask: Tensor  # [R, N] bool, aligned with graph.edges
    cumulative_scores: Tensor  # [N] cumulative influence fraction at each node's rank (the JSON "influence")


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """The pruned graph's node and edge masks. A pruned-only graph (`keep_pruned`) at the thresholds that made it
    returns the full graph's result it recorded; at other thresholds it prunes what it kept."""
    k = graph.kept_pruning
    if k is not None and (k.node_threshold, k.edge_threshold) == (node_threshold, edge_threshold):
        return PruneResult(k.node_mask.clone(), graph.edges != 0, k.cumulative_scores.clone())
    E, rows, w = graph.edges.float(), graph.rows, graph.logit_weights()
    kinds = graph.kinds()
    # 1. nodes
    node_inf = influence(normalize_rows(E), rows, w)
    node_mask = node_inf >= find_threshold(node_inf, node_threshold)
    node_mask |= kinds >= 2  # tokens and logits always stay
    # 2. edges, on the graph restricted to the kept nodes
    E2 = E * node_mask[rows, None] * node_mask[None, :]
    A2 = normalize_rows(E2)
    inf2 = influence(A2, rows, w) + w
    score = A2 * inf2[rows, None]
    edge_mask = (score >= find_threshold(score, edge_threshold)) & (E2 != 0)
    # 3. a feature/error node needs a kept outgoing edge; a feature a kept incoming one
    while True:
        has_out = edge_mask.any(0)  # [N]
        has_in = torch.zeros_like(node_mask)
        has_in[rows] = edge_mask.any(1)
        new = node_mask.clone()
        new &= ~((kinds <= 1) & ~has_out)
        new &= ~((kinds == 0) & ~has_in)
        edge_mask &= new[rows, None] & new[None, :]
        if torch.equal(new, node_mask):
            break
        node_mask = new
    # 4. cumulative influence fraction by rank
    order = node_inf.argsort(descending=True)
    cum = node_inf[order].cumsum(0) / node_inf.sum().clamp_min(1e-30)
    cumulative = torch.empty_like(cum)
    cumulative[order] = cum
    return PruneResult(node_mask, edge_mask, cumulative)


def keep_pruned(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                pruned: PruneResult | None = None) -> Graph:
    """A copy of `graph` holding only the edges that pruning at these thresholds keeps, and that pruning.

    What `cltrace trace --keep-pruned` saves: the file shrinks with the edges (e.g. 166k of 5.5M), and viewers
    and `prune` at the same thresholds show exactly the full graph's pruned graph. Scores computed from it are
    the kept subgraph's; the full graph's are in its meta when `cltrace trace` wrote it.
    """
    pr = pruned if pruned is not None else prune(graph, node_threshold, edge_threshold)
    n_full = graph.kept_pruning.n_edges_full if graph.kept_pruning else int((graph.edges != 0).sum())
    kept = KeptPruning(float(node_threshold), float(edge_threshold), pr.node_mask.clone(),
                       pr.cumulative_scores.clone(), n_full)
    edges = torch.where(pr.edge_mask, graph.edges, torch.zeros((), dtype=graph.edges.dtype))
    return replace(graph, edges=edges, meta=dict(graph.meta), kept_pruning=kept)


def scores(graph: Graph, pruned: PruneResult | None = None) -> tuple[float, float]:
    """(replacement score, completeness score).

    replacement = Σ_tokens inf / (Σ_tokens inf + Σ_errors inf): how much of the end-to-end influence reaches
    the logits from tokens through features rather than starting at error nodes.
    completeness = Σ_i (1 − Σ_{j∈errors} Â[i, j])(inf_i + w_i) / Σ_i (inf_i + w_i): the influence-weighted
    fraction of node inputs that does not come from errors.
    For a pruned graph, the features it dropped are treated as error nodes: their inputs are cut and what
    they pass on counts as unexplained, as in the paper.
    """
    E, rows, w = graph.edges.float(), graph.rows, graph.logit_weights()
    kinds = graph.kinds()
    is_err = kinds == 1
    if pruned is not None:
        dropped = (kinds == 0) & ~pruned.node_mask
        is_err = is_err | dropped
        E = E * (~dropped[rows])[:, None]
    A = normalize_rows(E)
    inf = influence(A, rows, w)
    tok, err = inf[kinds == 2].sum(), inf[is_err].sum()
    replacement = float(tok / (tok + err).clamp_min(1e-30))
    non_err = torch.ones_like(w)
    non_err[rows] = 1 - A[:, is_err].sum(1)
    non_err[rows[A.sum(1) == 0]] = 1  # rows with no inputs count as fully explained
    weight = inf + w
    completeness = float((non_err * weight).sum() / weight.sum().clamp_min(1e-30))
    return replacement, completeness
