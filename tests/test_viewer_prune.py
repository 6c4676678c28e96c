"""The viewer's re-pruning on the edge list equals `cltrace.prune` (and node ids equal the JSON export's)."""

from __future__ import annotations

import pytest
import torch

from cltrace.attribution import attribute, prune
from cltrace.attribution.export import graph_json, node_ids
from cltrace.models.tiny import tiny_model
from cltrace.replacement import random_transcoder
from cltrace.viewer.reprune import Pruner
from cltrace.viewer.synthetic import synthetic_graph

THRESHOLDS = [(0.8, 0.98), (0.5, 0.9), (0.95, 0.99), (0.3, 0.5), (0.9, 0.7), (0.99, 0.999)]


def traced(family: str, kind: str):
    model = tiny_model(family)
    ids = model.tokenize("Fact: Michael Jordan plays")
    tc = random_transcoder(model, kind, 48, 8, seed=2, ids=ids)
    return attribute(model, tc, ids)


@pytest.mark.parametrize("make", [lambda: traced("llama", "clt"), lambda: traced("gemma3", "plt"),
                                  lambda: synthetic_graph(600, 5000, n_layers=6, n_pos=10, seed=1),
                                  lambda: synthetic_graph(1500, 12000, n_layers=8, n_pos=12, seed=2)])
def test_sparse_prune_equals_prune(make):
    g = make()
    p = Pruner(g)
    for node_t, edge_t in THRESHOLDS:
        want = prune(g, node_t, edge_t)
        got = p.prune(node_t, edge_t).to_prune_result(g)
        assert torch.equal(got.node_mask, want.node_mask), (node_t, edge_t)
        assert torch.equal(got.edge_mask, want.edge_mask), (node_t, edge_t)
        assert torch.equal(got.cumulative_scores, want.cumulative_scores)
    # threshold 1 keeps every nonzero edge among kept nodes (dense float32 rounding may drop a few: a superset)
    got, want = p.prune(1.0, 1.0).to_prune_result(g), prune(g, 1.0, 1.0)
    assert torch.equal(got.node_mask, want.node_mask) and bool((got.edge_mask | ~want.edge_mask).all())


def test_node_ids_are_the_exports():
    g = synthetic_graph(300, 2000, n_layers=4, n_pos=6, seed=3)
    everything = prune(g, 1.0, 1.0)
    everything.node_mask[:] = True
    everything.edge_mask = g.edges != 0
    exported = [n["node_id"] for n in graph_json(g, "x", everything)["nodes"]]
    ids = node_ids(g)
    assert len(set(ids)) == len(ids) == g.n_nodes
    assert exported == [i for i in ids if i in set(exported)] and len(exported) > 0.9 * g.n_nodes
