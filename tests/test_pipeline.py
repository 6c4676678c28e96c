"""The whole loop through the CLI on a tiny model: train -> eval -> trace -> intervene (what `make demo` runs)."""

from __future__ import annotations

import json

from cltrace.attribution import Graph
from cltrace.cli import main
from cltrace.models.tiny import save_tiny


def test_train_trace_intervene(tmp_path, capsys):
    model = str(save_tiny("gemma3", tmp_path / "tiny-gemma3"))
    tc, graph, png = str(tmp_path / "clt"), str(tmp_path / "g.safetensors"), str(tmp_path / "g.png")
    assert main(["-q", "train", "-m", model, "--kind", "clt", "-F", "64", "--activation", "batchtopk", "--k", "4",
                 "--tokens", "3072", "--batch-size", "512", "--out", tc, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", tc, "-m", model, "--tokens", "512", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert 0 < ev["nmse"] < 1.5 and 0 < ev["l0"] < 64  # BatchTopK infers with learned thresholds, not k
    assert main(["-q", "trace", "Fact: Michael Jordan", "-m", model, "-t", tc, "--out", graph, "--png", png,
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_logit_error"] < 1e-4 and summary["n_nodes_pruned"] <= summary["n_nodes"]
    g = Graph.load(graph)
    assert g.n_features > 0
    assert main(["-q", "intervene", "-m", model, "-t", tc, "--graph", graph, "--node", "top", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["logits_before"] and out["logits_after"]
    (iv,) = out["interventions"]
    layer, feature, pos = iv["layer"], iv["feature"], iv["pos"]
    assert [layer, pos, feature] in g.features.tolist()  # 'top' resolved to one of the graph's feature nodes
