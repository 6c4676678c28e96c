"""What one attribution graph says about itself: scores, pruning curve, path length, and its predictions for
inhibiting a feature (direct edge, total effect through the graph, influence).

All of it reads the graph's row block through `cltrace.attribution.prune` (no dense N×N matrix), except the
feature-to-feature block, which is [n_features, n_features] and solved as a triangular system: features are
sorted by layer and edges only go to later layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import normalize_rows, prune, scores

NODE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def graph_scores(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> dict:
    """Replacement and completeness scores of the whole graph and of the pruned one, and the pruned size."""
    kinds = graph.kinds()
    pr = prune(graph, node_threshold, edge_threshold)
    (r0, c0), (r1, c1) = scores(graph), scores(graph, pr)
    return {"replacement": r0, "completeness": c0, "replacement_pruned": r1, "completeness_pruned": c1,
            "n_features": graph.n_features, "n_nodes": graph.n_nodes,
            "n_features_pruned": int((pr.node_mask & (kinds == 0)).sum()), "n_nodes_pruned": int(pr.node_mask.sum()),
            "n_edges_pruned": int(pr.edge_mask.sum())}


def pruning_curve(graph: Graph, thresholds: tuple[float, ...] = NODE_THRESHOLDS, edge_threshold: float = 0.98
                  ) -> list[dict]:
    """For each node threshold: nodes and features kept, and the pruned graph's scores (edge threshold fixed)."""
    kinds = graph.kinds()
    out = []
    for t in thresholds:
        pr = prune(graph, t, edge_threshold)
        r, c = scores(graph, pr)
        out.append({"node_threshold": t, "n_nodes": int(pr.node_mask.sum()),
                    "n_features": int((pr.node_mask & (kinds == 0)).sum()), "replacement": r, "completeness": c})
    return out


def path_length(graph: Graph, max_iter: int = 1000) -> float:
    """Mean length (in edges) of the paths from token nodes to the logits, each weighted by its influence.

    A path's influence is the logit's probability times the product of its row-normalized |edges| (the Â of
    pruning). x_k = wᵀÂᵏ is the influence arriving at every node over paths of exactly k edges, so the mass at
    token nodes gives the distribution of path lengths: Σ_k k·x_k[tokens] / Σ_k x_k[tokens].
    """
    A, rows, x = normalize_rows(graph.edges.float()), graph.rows, graph.logit_weights()
    tokens = graph.kinds() == 2
    num = den = 0.0
    for k in range(1, max_iter + 1):
        x = x[rows] @ A
        if not x.any():
            break
        m = float(x[tokens].sum())
        num, den = num + k * m, den + m
    return num / den if den > 0 else float("nan")


def _feature_block(graph: Graph) -> Tensor:
    """[nf, nf] float64 edges feature -> feature (rows: targets), from the row block (feature rows come first)."""
    nf = graph.n_features
    return graph.edges[:nf, :nf].double()


def _solve_paths(M: Tensor, rhs: Tensor) -> Tensor:
    """(I − M)⁻¹ rhs for strictly lower-triangular M [n, n] (a DAG in topological order), rhs [n, k]."""
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    return torch.linalg.solve_triangular(eye - M, rhs, upper=False)


def predictions(graph: Graph, sources: list[int], targets: list[list[int]]) -> list[list[dict]]:
    """The graph's predictions when feature node s is set to 0, for each source and its target feature nodes.

    direct: Δpre_t = A[t, s] / a_s · (−a_s) = −A[t, s]: the edge, what the frozen model with every other
    feature held must give exactly.
    total: every graph feature responding linearly (a JumpReLU feature above threshold has slope 1): with
    M = A / a (per unit of source activation) and the source held at 0, Δa = −a_s e_s + M' Δa, i.e.
    Δa = (I − M')⁻¹(−a_s e_s), M' = M without the source's row.
    influence: the paper's unsigned path weight Σ_{k≥1} Âᵏ[t, s] (Â = row-normalized |A|), feature paths only
    (errors and tokens have no inputs, logits no outputs).
    """
    nf = graph.n_features
    if not sources:
        return []
    E = _feature_block(graph)
    acts = graph.activations.double()
    M = E / acts[None, :]
    Ahat = normalize_rows(graph.edges.double())[:nf, :nf]
    k = len(sources)
    src = torch.tensor(sources)
    rhs = torch.zeros(nf, k, dtype=torch.float64)
    rhs[src, torch.arange(k)] = -acts[src]
    total = torch.empty(nf, k, dtype=torch.float64)
    for j, s in enumerate(sources):  # each source's own M' (its row cut: it is held at 0)
        Mj = M.clone()
        Mj[s] = 0
        total[:, j] = _solve_paths(Mj, rhs[:, j:j + 1])[:, 0]
    inf = _solve_paths(Ahat, Ahat[:, src])  # [nf, k]: Σ_{k≥1} Âᵏ e_s
    return [[{"direct": float(-E[t, s]), "total": float(total[t, j]), "influence": float(inf[t, j])}
             for t in targets[j]] for j, s in enumerate(sources)]
