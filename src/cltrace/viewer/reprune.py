"""Re-pruning at new thresholds fast enough for a slider: `cltrace.prune`'s algorithm on the nonzero edges only.

`cltrace.prune` works on the dense row block: for a 5,000-node graph that is 22M entries, and sorting every
entry's edge score takes 1.5 s on a 2-core CPU. A graph has ~50k nonzero edges, and every step of the algorithm
only ever looks at nonzero ones (a zero edge has score 0 and is never kept), so here the same steps run on
the edge list:

1. node influence (independent of the thresholds) is computed once per graph with `prune`'s own functions on
   the dense block, so the node mask is bit-identical to `prune`'s;
2. edge scores Â'[t, s]·(inf'(t) + w_t) on the node-pruned graph, from the edge list; the threshold search
   counts the zero entries exactly as `find_threshold` does (they sit at the end of the sorted scores);
3. the same clean-up loop (a node needs a kept outgoing / incoming edge).

Row sums and influences are float32 sums in another order than the dense code's, so a score can differ from
`prune`'s in its last bit; tests/test_viewer_prune.py checks the masks equal `prune`'s on traced and random graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import PruneResult, find_threshold, influence, normalize_rows


@dataclass
class SparsePrune:
    node_mask: Tensor  # [N] bool
    edge_rows: Tensor  # [K] row index (into graph.rows) of each kept edge
    edge_cols: Tensor  # [K] source node of each kept edge
    cumulative_scores: Tensor  # [N] as PruneResult.cumulative_scores

    def to_prune_result(self, graph: Graph) -> PruneResult:
        """The dense PruneResult (what scores and the JSON export take)."""
        mask = torch.zeros(graph.edges.shape, dtype=torch.bool)
        mask[self.edge_rows, self.edge_cols] = True
        return PruneResult(self.node_mask.clone(), mask, self.cumulative_scores)


class Pruner:
    """Holds one graph's nonzero edges and node influence; `prune(node_threshold, edge_threshold)` is cheap.

    The edge-list steps run in NumPy: torch's small scatter/gather kernels take ~100x longer with 2 OpenMP
    threads on a busy 2-core machine, and a slider must not wait on that.
    """

    def __init__(self, graph: Graph):
        E = graph.edges.float()
        self.graph = graph
        self.rows = graph.rows.numpy()
        self.w = graph.logit_weights().numpy()
        self.kinds = graph.kinds().numpy()
        node_inf = influence(normalize_rows(E), graph.rows, graph.logit_weights())  # exactly as prune() step 1
        self.node_inf = node_inf
        r, s = E.nonzero(as_tuple=True)
        self.r, self.s, self.v = r.numpy(), s.numpy(), E[r, s].numpy()
        self.n_entries = E.numel()
        order = node_inf.argsort(descending=True)
        cum = node_inf[order].cumsum(0) / node_inf.sum().clamp_min(1e-30)
        self.cumulative = torch.empty_like(cum)
        self.cumulative[order] = cum

    def _influence(self, a: np.ndarray, r: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Σ_{k≥1} wᵀÂᵏ with Â given as the edge list (a at (rows[r], s))."""
        n = self.w.size
        x, acc = self.w.copy(), np.zeros_like(self.w)
        src_rows = self.rows[r]
        for _ in range(1000):
            x = np.bincount(s, weights=x[src_rows] * a, minlength=n).astype(np.float32)
            if not x.any():
                return acc
            acc += x
        raise RuntimeError("influence did not converge: the graph has a cycle")

    def _threshold(self, scores: np.ndarray, tau: float) -> float:
        """find_threshold over all R×N entries, the zero entries (not listed) included."""
        s = -np.sort(-scores)
        c = np.cumsum(s, dtype=np.float64) / max(float(s.sum(dtype=np.float64)), 1e-30)
        i = int(np.searchsorted(c, tau, side="left"))
        if i < s.size:
            return float(s[i])
        return 0.0 if self.n_entries > s.size else float(s[-1])

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> SparsePrune:
        kinds, rows = self.kinds, self.rows
        node_mask = (self.node_inf >= find_threshold(self.node_inf, node_threshold)).numpy()
        node_mask |= kinds >= 2
        keep = node_mask[rows[self.r]] & node_mask[self.s]
        r, s, v = self.r[keep], self.s[keep], self.v[keep]
        a = np.abs(v)
        row_sum = np.bincount(r, weights=a, minlength=rows.size).astype(np.float32)
        a = a / np.maximum(row_sum, np.float32(1e-10))[r]
        inf2 = self._influence(a, r, s) + self.w
        score = a * inf2[rows[r]]
        kept = score >= self._threshold(score, edge_threshold)
        r, s = r[kept], s[kept]
        while True:
            has_out = np.zeros_like(node_mask)
            has_out[s] = True
            has_in = np.zeros_like(node_mask)
            has_in[rows[r]] = True
            new = node_mask & ~((kinds <= 1) & ~has_out) & ~((kinds == 0) & ~has_in)
            ok = new[rows[r]] & new[s]
            r, s = r[ok], s[ok]
            if np.array_equal(new, node_mask):
                break
            node_mask = new
        return SparsePrune(torch.from_numpy(node_mask), torch.from_numpy(r), torch.from_numpy(s), self.cumulative)
