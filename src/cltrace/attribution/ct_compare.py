"""Node-by-node comparison with a circuit-tracer graph (dumped to plain arrays by benchmarks/ct_dump.py).

Nodes are matched by identity, never by position in the matrix: features by (layer, pos, feature), errors by
(layer, pos), tokens by pos, logits by vocab id. The result says how far the two adjacency matrices are
apart on the matched nodes, and which nodes exist on one side only.
"""

from __future__ import annotations

import numpy as np
import torch

from cltrace.attribution.graph import Graph


def node_keys_ours(g: Graph) -> list[tuple]:
    keys: list[tuple] = [("f", *map(int, row)) for row in g.features.tolist()]
    keys += [("e", layer, p) for layer in range(g.n_layers) for p in range(g.n_pos)]
    keys += [("t", p) for p in range(g.n_pos)]
    keys += [("l", int(t)) for t in g.logit_tokens.tolist()]
    return keys


def node_keys_ct(ct: dict, n_layers: int) -> list[tuple]:
    T = len(ct["input_tokens"])
    sel = ct["active_features"][ct["selected_features"]]
    keys: list[tuple] = [("f", *map(int, row)) for row in sel.tolist()]
    keys += [("e", layer, p) for layer in range(n_layers) for p in range(T)]
    keys += [("t", p) for p in range(T)]
    keys += [("l", int(t)) for t in ct["logit_ids"].tolist()]
    return keys


def compare(g: Graph, ct_npz: str, token_scale: float = 1.0) -> dict:
    """Max |ΔA| over matched nodes, relative to max |A_ct|. token_scale multiplies ct's token columns
    (√d_model repairs the nnsight backend's Gemma token edges, HOW_IT_WORKS §7.2)."""
    ct = dict(np.load(ct_npz))
    A_ct = torch.from_numpy(ct["adjacency"]).double()
    ours, theirs = node_keys_ours(g), node_keys_ct(ct, g.n_layers)
    if token_scale != 1.0:
        tok_cols = [i for i, k in enumerate(theirs) if k[0] == "t"]
        A_ct[:, tok_cols] *= token_scale
    pos_ours = {k: i for i, k in enumerate(ours)}
    common = [k for k in theirs if k in pos_ours]
    i_ct = torch.tensor([theirs.index(k) for k in common])
    i_us = torch.tensor([pos_ours[k] for k in common])
    A_us = g.adjacency().double()[i_us][:, i_us]
    A_c = A_ct[i_ct][:, i_ct]
    diff = (A_us - A_c).abs()
    scale = float(A_c.abs().max())
    act_ct = {("f", *map(int, r)): float(v) for r, v in zip(ct["active_features"].tolist(),
                                                           ct["activation_values"].tolist())}
    act_us = {k: float(v) for k, v in zip(ours, g.activations.tolist())}
    act_diff = max((abs(act_us[k] - act_ct[k]) for k in act_us if k in act_ct), default=0.0)
    return {
        "matched_nodes": len(common), "only_ours": len(set(ours) - set(theirs)),
        "only_ct": len(set(theirs) - set(ours)), "max_abs_diff": float(diff.max()), "max_abs_ct": scale,
        "rel_diff": float(diff.max()) / max(scale, 1e-30), "max_activation_diff": act_diff,
        "same_tokens": list(ct["input_tokens"]) == g.input_ids.tolist(),
        "same_logits": list(ct["logit_ids"]) == g.logit_tokens.tolist(),
    }
