"""A picture of a pruned attribution graph (PNG, matplotlib): what one looks at before opening a viewer.

Layout follows the paper's figures: token positions left to right, layers bottom to top (embeddings at the
bottom, logits on top). Nodes of one (layer, position) cell sit side by side; edges are drawn blue when
excitatory and red when inhibitory, their width and opacity growing with |weight|.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cltrace.attribution.graph import Graph
from cltrace.attribution.prune import PruneResult

KIND_STYLE = {  # kind -> (colour, marker, label)
    0: ("#f2a93b", "o", "feature"),
    1: ("#9a9a9a", "s", "error"),
    2: ("#5aa469", "D", "token"),
    3: ("#7b5ea7", "^", "logit"),
}


def node_positions(graph: Graph, keep: torch.Tensor) -> dict[int, tuple[float, float]]:
    """{node index: (x, y)} for the kept nodes: x = position (+ offset within the cell), y = layer."""
    L, T = graph.n_layers, graph.n_pos
    cells: dict[tuple[int, int], list[int]] = {}
    kinds = graph.kinds()
    for i in keep.nonzero().flatten().tolist():
        k = int(kinds[i])
        if k == 0:
            layer, pos = int(graph.features[i, 0]), int(graph.features[i, 1])
        elif k == 1:
            j = i - graph.n_features
            layer, pos = j // T, j % T
        elif k == 2:
            layer, pos = -1, i - graph.token_index(0)
        else:
            layer, pos = L, T - 1
        cells.setdefault((layer, pos), []).append(i)
    xy = {}
    for (layer, pos), members in cells.items():
        n = len(members)
        spread = 0.8 if layer < L else min(0.9 * T, 0.9 * n)  # logits get room for their labels
        for j, i in enumerate(members):
            offset = 0.0 if n == 1 else (j / (n - 1) - 0.5) * spread
            if layer == L and n > 1:
                offset -= spread / 2  # end the row of logits at the last position
            xy[i] = (pos + offset, layer)
    return xy


def plot_graph(graph: Graph, pruned: PruneResult, path: str | Path, *, max_edges: int = 400,
               title: str | None = None) -> Path:
    """Draw the pruned graph's strongest `max_edges` edges into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = pruned.node_mask.clone()
    xy = node_positions(graph, keep)
    E = graph.edges.float() * pruned.edge_mask
    r, s = E.nonzero(as_tuple=True)
    w = E[r, s]
    order = w.abs().argsort(descending=True)[:max_edges]
    T, L = graph.n_pos, graph.n_layers
    fig, ax = plt.subplots(figsize=(min(30, max(8, 1.1 * T)), 9))
    wmax = float(w.abs().max()) if w.numel() else 1.0
    for k in order.tolist():
        tgt, src = int(graph.rows[r[k]]), int(s[k])
        if tgt not in xy or src not in xy:
            continue
        strength = abs(float(w[k])) / wmax
        (x0, y0), (x1, y1) = xy[src], xy[tgt]
        ax.plot([x0, x1], [y0, y1], color="#2b6cb0" if w[k] > 0 else "#c53030",
                lw=0.3 + 2.5 * strength, alpha=0.15 + 0.7 * strength, zorder=1)
    kinds = graph.kinds()
    influence = pruned.cumulative_scores
    for kind, (colour, marker, label) in KIND_STYLE.items():
        idx = [i for i in xy if int(kinds[i]) == kind]
        if not idx:
            continue
        size = [30 + 120 * (1 - float(influence[i])) for i in idx] if kind == 0 else 60
        ax.scatter([xy[i][0] for i in idx], [xy[i][1] for i in idx], s=size, c=colour, marker=marker,
                   edgecolors="black", linewidths=0.4, label=label, zorder=2)
    for i, text in enumerate(graph.logit_labels):
        node = graph.logit_index(i)
        if node in xy:
            ax.annotate(f"{text!r} {float(graph.logit_probs[i]):.2f}", xy[node], textcoords="offset points",
                        xytext=(0, 8 + 10 * (i % 2)), ha="center", fontsize=8)
    ax.set_xticks(range(T))
    ax.set_xticklabels([repr(t)[1:-1] for t in graph.tokens], rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(-1, L + 1))
    ax.set_yticklabels(["emb"] + [str(i) for i in range(L)] + ["logit"], fontsize=8)
    ax.set_xlim(min(-0.7, min(x for x, _ in xy.values()) - 0.3), T - 0.3)
    ax.set_ylabel("layer")
    n_nodes, n_edges = int(keep.sum()), int(pruned.edge_mask.sum())
    ax.set_title(title or f"{graph.prompt!r}\n{n_nodes} nodes, {n_edges} edges after pruning", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    ax.grid(alpha=0.2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
