"""`cltrace trace` end to end on a tiny model folder."""

import json

import pytest

from cltrace.attribution import Graph
from cltrace.cli import main
from cltrace.models.tiny import save_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny"))


def test_trace_json_and_files(folder, tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    rc = main(["trace", "Fact: Michael", "-m", folder, "--random-transcoders", "48", "--random-active", "10",
               "--out", str(out), "--json", "--export-json", str(tmp_path / "view"), "--slug", "s"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("prompt", "tokens", "n_nodes", "n_edges", "n_nodes_pruned", "n_edges_pruned", "replacement_score",
                "completeness_score", "logits", "max_logit_error", "seconds"):
        assert key in d
    assert set(d["replacement_score"]) == {"pruned", "unpruned"}
    assert d["max_logit_error"] < 1e-4
    g = Graph.load(out)
    assert g.n_nodes == d["n_nodes"]
    view = json.loads((tmp_path / "view" / "s.json").read_text())
    assert view["metadata"]["slug"] == "s" and view["nodes"] and view["links"]
    assert json.loads((tmp_path / "view" / "graph-metadata.json").read_text())["graphs"][0]["slug"] == "s"


@pytest.mark.parametrize("argv,msg", [
    (["", "--random-transcoders", "8"], "empty"),
    (["x" * 600, "--random-transcoders", "8"], "at most"),
    (["hi", "-t", "/nonexistent/tc"], "no transcoder folder"),
    (["hi", "--random-transcoders", "8", "--export-json", "d"], "--slug"),
    (["hi", "--random-transcoders", "8", "--target", "abc"], "single token"),
])
def test_trace_errors(folder, tmp_path, capsys, argv, msg):
    rc = main(["trace", *argv, "-m", folder, "--out", str(tmp_path / "g.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_trace_transcoders_for_another_model(folder, tmp_path, capsys):
    from cltrace.models.tiny import tiny_model
    from cltrace.replacement import random_transcoder
    from cltrace.transcoders.circuit_tracer_format import export_circuit_tracer

    other = tiny_model("qwen2", n_layers=2)
    export_circuit_tracer(random_transcoder(other, "plt", 16, 4), tmp_path / "tc")
    rc = main(["trace", "hi", "-m", folder, "-t", str(tmp_path / "tc"), "--out", str(tmp_path / "g.safetensors")])
    assert rc == 2 and "do not fit" in capsys.readouterr().err
