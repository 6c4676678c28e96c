"""The PNG picture of a pruned graph."""

from __future__ import annotations

from cltrace.attribution import attribute
from cltrace.attribution.prune import prune
from cltrace.models.tiny import tiny_model
from cltrace.replacement import random_transcoder
from cltrace.viewer.plot import node_positions, plot_graph


def test_plot_graph_writes_png_with_every_kept_node_placed(tmp_path):
    model = tiny_model("gemma3")
    ids = model.tokenize("Fact: Michael")
    tc = random_transcoder(model, "clt", 48, 6, seed=1, ids=ids)
    graph = attribute(model, tc, ids)
    pr = prune(graph)
    xy = node_positions(graph, pr.node_mask)
    assert set(xy) == set(pr.node_mask.nonzero().flatten().tolist())
    # embeddings below layer 0, logits above the last layer, features at their own layer and position
    for i, (x, y) in xy.items():
        if i < graph.n_features:
            layer, pos = graph.features[i, :2].tolist()
            assert y == layer and abs(x - pos) <= 0.4 + 1e-9
    assert all(xy[graph.token_index(p)][1] == -1 for p in range(graph.n_pos))
    path = plot_graph(graph, pr, tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
