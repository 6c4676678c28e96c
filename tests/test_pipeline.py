"""The whole loop through the CLI on a tiny model: train -> eval -> trace -> intervene (what `make demo` runs)."""

from __future__ import annotations

import json

import torch

from cltrace.attribution import Graph
from cltrace.attribution.prune import prune
from cltrace.cli import main
from cltrace.models.registry import load_model
from cltrace.models.tiny import save_tiny
from cltrace.transcoders.io import load_transcoder

PROMPT = "Fact: Michael Jordan"


def test_train_trace_intervene(tmp_path, capsys, device):
    """In this process: --device puts every command on the test device."""
    dev = ["--device", str(device)]
    model = str(save_tiny("gemma3", tmp_path / "tiny-gemma3"))
    tc, graph, png = str(tmp_path / "clt"), str(tmp_path / "g.safetensors"), str(tmp_path / "g.png")
    # 12 steps at lr 0.01: enough to learn something (at the default lr, 6 steps stay at the mean's NMSE, 1.0)
    assert main(dev + ["-q", "train", "-m", model, "--kind", "clt", "-F", "64", "--activation", "batchtopk",
                       "--k", "4", "--tokens", "6144", "--batch-size", "512", "--out", tc, "--no-progress",
                       "--set", "lr=0.01"]) == 0
    capsys.readouterr()
    assert main(dev + ["-q", "eval", tc, "-m", model, "--tokens", "512", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    # measured NMSE 0.81 (a transcoder that outputs the mean scores 1.0), L0 5.5 with k = 4: BatchTopK infers with
    # its learned thresholds, which keep about k a token, not all 64 features or none
    assert ev["nmse"] < 0.9 and 2 < ev["l0"] < 8
    assert main(dev + ["-q", "trace", PROMPT, "-m", model, "-t", tc, "--out", graph, "--png", png, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_logit_error"] < 1e-4
    g = Graph.load(graph)
    # every active feature after BOS is a node (no --max-features): counted here from the model's own pass
    adapter, transcoder = load_model(model, device=device), load_transcoder(tc, device=device)
    with torch.no_grad():
        mlp_in = adapter.forward(adapter.tokenize(PROMPT)).mlp_in
        active = sum(int((transcoder.encode(mlp_in[l][0, 1:], l) != 0).sum()) for l in range(adapter.n_layers))
    assert g.n_features == summary["n_features"] == active > 0
    # pruning (the CLI's default thresholds) drops nodes, but keeps some features and every token and logit
    pr = prune(g)
    kinds = g.kinds()
    assert summary["n_nodes_pruned"] == int(pr.node_mask.sum()) < summary["n_nodes"] == g.n_nodes
    assert pr.node_mask[kinds >= 2].all() and 0 < int(pr.node_mask[kinds == 0].sum()) < g.n_features
    assert main(dev + ["-q", "intervene", "-m", model, "-t", tc, "--graph", graph, "--node", "top", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (iv,) = out["interventions"]
    layer, feature, pos = iv["layer"], iv["feature"], iv["pos"]
    assert [layer, pos, feature] in g.features.tolist()  # 'top' resolved to one of the graph's feature nodes
    # before: the model's own next-token distribution; after: the feature is off and the distribution moved
    with torch.no_grad():
        p = torch.softmax(adapter.logits(adapter.tokenize(PROMPT))[0, -1].float(), -1)
    top = p.topk(len(out["logits_before"]))
    assert [r["id"] for r in out["logits_before"]] == top.indices.tolist()
    assert torch.allclose(torch.tensor([r["prob"] for r in out["logits_before"]]), top.values.cpu(), rtol=1e-4)
    assert iv["positions"][0]["act_before"] > 0 and iv["positions"][0]["act_after"] == 0.0
    assert [r["prob"] for r in out["logits_after"]] != [r["prob"] for r in out["logits_before"]]
