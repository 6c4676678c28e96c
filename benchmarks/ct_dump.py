"""Run with circuit-tracer's venv: graph.pt -> graph.npz (plain arrays) + ct's own prune/scores.

/tmp/ct-venv/bin/python benchmarks/ct_dump.py RUN_DIR   (RUN_DIR holds graph.pt from run_reference.py)
"""

import json
import sys

import numpy as np
import torch
from circuit_tracer.graph import Graph, compute_graph_scores, prune_graph

run = sys.argv[1]
g = Graph.from_pt(f"{run}/graph.pt")
pr = prune_graph(g, node_threshold=0.8, edge_threshold=0.98)
rep, comp = compute_graph_scores(g)
np.savez(
    f"{run}/graph.npz",
    adjacency=g.adjacency_matrix.float().numpy(),
    active_features=g.active_features.numpy(),
    selected_features=g.selected_features.numpy(),
    activation_values=g.activation_values.float().numpy(),
    input_tokens=g.input_tokens.numpy(),
    logit_ids=np.array([int(t.vocab_idx) for t in g.logit_targets]),
    logit_probs=g.logit_probabilities.float().numpy(),
    node_mask=pr.node_mask.numpy(),
    edge_mask=pr.edge_mask.numpy(),
)
json.dump({"replacement": rep, "completeness": comp, "nodes_pruned": int(pr.node_mask.sum()),
           "edges_pruned": int(pr.edge_mask.sum()), "n_nodes": int(g.adjacency_matrix.shape[0]),
           "edges": int((g.adjacency_matrix != 0).sum())}, open(f"{run}/ct_scores.json", "w"))
print(torch.__version__, "ok")
