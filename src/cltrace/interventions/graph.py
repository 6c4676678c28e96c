"""What an attribution graph predicts for an intervention, and which of its nodes to watch.

A graph edge A[t, s] is source s's direct contribution to target t's value (a feature's pre-activation, or a
logit minus the mean logit) at the source's activation a_s. Per unit of a_s it is A[t, s] / a_s, and in the
local replacement model with every layer held (only direct effects) a change Δa_s moves t by exactly
A[t, s] / a_s · Δa_s. So the graph's direct prediction for a set of changes at graph nodes is

    Δvalue_t = Σ_s A[t, s] / a_s · Δa_s
"""

from __future__ import annotations

import torch
from torch import Tensor

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import prune
from cltrace.errors import CltraceError
from cltrace.interventions.spec import FeatureRef


def load_graph(graph: Graph | str, ids: Tensor) -> Graph:
    """A Graph (or its file) built for exactly these token ids."""
    g = graph if isinstance(graph, Graph) else Graph.load(graph)
    if g.input_ids.tolist() != ids.cpu().tolist():
        raise CltraceError(f"the graph was built for another prompt ({g.prompt!r}): give the same prompt")
    return g


def node_index(graph: Graph) -> dict[tuple[int, int, int], int]:
    """(layer, pos, feature) -> feature node index."""
    return {(layer, pos, f): i for i, (layer, pos, f) in enumerate(graph.features.tolist())}


def graph_watch(graph: Graph, exclude: set[tuple[int, int, int]], n: int, after: tuple[int, int] = (-1, 0)
                ) -> list[FeatureRef]:
    """The graph's feature nodes kept by pruning, most influential first, at most n.

    after (layer, pos): only nodes an intervention there can reach (a later layer, the same or a later pos).
    """
    pr = prune(graph)
    nf = graph.n_features
    order = pr.cumulative_scores[:nf].argsort()  # lower cumulative score = more influential
    out = []
    for i in order.tolist():
        layer, pos, f = graph.features[i].tolist()
        if pr.node_mask[i] and (layer, pos, f) not in exclude and layer > after[0] and pos >= after[1]:
            out.append(FeatureRef(layer=layer, pos=pos, feature=f))
        if len(out) == n:
            break
    return out


def direct_prediction(graph: Graph, changes: dict[tuple[int, int, int], float]) -> Tensor:
    """changes {(layer, pos, feature): Δa} at graph feature nodes -> predicted Δ of every row [R]."""
    index = node_index(graph)
    pred = torch.zeros(graph.edges.shape[0], dtype=torch.float64)
    for key, d in changes.items():
        i = index[key]
        pred += graph.edges[:, i].double() / float(graph.activations[i]) * d
    return pred


def total_prediction(graph: Graph, changes: dict[tuple[int, int, int], float]) -> Tensor:
    """changes {(layer, pos, feature): Δa} at graph feature nodes -> predicted Δ of every row [R], along every path.

    The graph's first-order model: every feature node responds to its inputs with slope 1 (Δa_t = Δpre_t), so
    Δa = (I − M)⁻¹ e with M[t, s] = A[t, s] / a_s over feature nodes and e the imposed changes; the changed
    nodes are held at their imposed values (their rows of M are cut). Then Δrow = M_rows · Δa. What
    `run_constrained(..., linear=True)` measures, for a supernode of several features as for one.
    """
    index = node_index(graph)
    nf = graph.n_features
    if not torch.equal(graph.rows[:nf].cpu(), torch.arange(nf)):
        raise CltraceError("the graph does not store every feature's row first: total_prediction needs them")
    per_unit = graph.edges[:, :nf].double() / graph.activations.double()  # [R, nf]
    M = per_unit[:nf].clone()
    e = torch.zeros(nf, dtype=torch.float64)
    for key, d in changes.items():
        i = index[key]
        M[i] = 0.0  # an intervened node keeps its imposed value
        e[i] = d
    da = torch.linalg.solve(torch.eye(nf, dtype=torch.float64) - M, e)
    return per_unit @ da
