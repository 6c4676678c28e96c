"""`cltrace qk` end to end on a tiny model folder and saved transcoders."""

import json
import re

import pytest

from cltrace.attribution import Graph
from cltrace.cli import main
from cltrace.models.registry import load_model
from cltrace.models.tiny import save_tiny
from cltrace.replacement import random_transcoder
from cltrace.transcoders import save_transcoder

PROMPT = "Fact: Michael Jordan"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("qk")
    folder = str(save_tiny("gemma3", root / "tiny"))
    model = load_model(folder)
    save_transcoder(random_transcoder(model, "clt", 64, 10, ids=model.tokenize(PROMPT)), root / "tc")
    graph = root / "g.safetensors"
    assert main(["-q", "trace", PROMPT, "-m", folder, "-t", str(root / "tc"), "--out", str(graph)]) == 0
    return folder, str(root / "tc"), graph


def test_qk_node(traced, capsys):
    folder, tc, graph = traced
    g = Graph.load(graph)
    node = int(g.rows[-1])  # a logit row: its inputs come from every position
    assert node >= g.n_features
    rc = main(["qk", str(graph), "--node", "logit:0", "-m", folder, "-t", tc, "--json", "--edges", "3",
               "--heads", "top", "1.2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["edges"]) <= 3
    for e in out["edges"]:
        assert abs(e["direct"] + e["sum_loadings"] - e["edge"]) <= 1e-5 * max(1.0, abs(e["edge"]))
        assert e["direct"] == 0.0
        for h in e["heads"]:
            qk = h["qk"]
            assert abs(qk["score_terms"] - qk["score"]) <= 1e-4 * max(1.0, abs(qk["score"]))
            assert abs(sum(qk["by_kind"].values()) - qk["score"]) <= 1e-4 * max(1.0, abs(qk["score"]))
            assert qk["top_pairs"] and qk["top_query"] and qk["top_key"] and qk["top_query_features"]
    (extra,) = out["heads"]
    assert (extra["layer"], extra["head"], extra["query_pos"]) == (1, 2, g.n_pos - 1)
    # text output names the carrying head and the score
    assert main(["qk", str(graph), "--node", "logit", "-m", folder, "-t", tc, "--edges", "1"]) == 0
    text = capsys.readouterr().out
    assert "carried by" in text and "pre-softmax" in text


@pytest.mark.parametrize("argv,msg", [
    (["--node", "0:99999@3"], "not a feature node"),
    (["--node", "banana"], "cannot read node"),
    (["--node", "logit", "--heads", "x"], "LAYER.HEAD"),
])
def test_qk_errors(traced, capsys, argv, msg):
    folder, tc, graph = traced
    assert main(["qk", str(graph), *argv, "-m", folder, "-t", tc]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_side_file_and_viewer_route(traced, capsys):
    """`cltrace qk` merges into GRAPH.qk.json; the viewer's route serves a node's entries, escaped as JSON."""
    from starlette.testclient import TestClient

    from cltrace.attribution.heads import qk_side_path
    from cltrace.viewer import make_app

    folder, tc, graph = traced
    assert main(["-q", "qk", str(graph), "--node", "logit", "-m", folder, "-t", tc, "--json", "--edges", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    side = json.loads(qk_side_path(graph).read_text())
    keys = {(e["target"], e["source"]) for e in side["edges"]}
    assert {(e["target"], e["source"]) for e in out["edges"]} <= keys
    target = out["edges"][0]["target"]
    with TestClient(make_app(graph.parent, token="t"), base_url="http://127.0.0.1:8765") as c:
        r = c.get(f"/api/graphs/{graph.stem}/qk/{target}")
        assert r.status_code == 200
        got = r.json()["edges"]
        assert got and all(target in (e["target"], e["source"]) for e in got)
        assert c.get(f"/api/graphs/{graph.stem}/qk/none_9_9").json()["edges"] == []
        assert c.get("/api/graphs/nope/qk/x").status_code in (400, 404)


def test_trace_qk(traced, tmp_path, capsys):
    from cltrace.attribution.heads import qk_side_path

    folder, tc, _ = traced
    out = tmp_path / "t.safetensors"
    assert main(["trace", PROMPT, "-m", folder, "-t", tc, "--out", str(out), "--qk", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["qk"]["edges"] == 3 and summary["qk"]["file"] == str(qk_side_path(out))
    side = json.loads(qk_side_path(out).read_text())
    assert len(side["edges"]) == 3 and PROMPT in side["prompt"]
    for e in side["edges"]:
        assert abs(e["direct"] + e["sum_loadings"] - e["edge"]) <= 1e-5 * max(1.0, abs(e["edge"]))


@pytest.mark.slow
def test_node_pane_shows_qk_results(traced, capsys):
    """In a real browser: clicking the logit node shows its cross-position edges split by head, with the numbers
    of the side file, and each head's (query, key) terms."""
    from playwright.sync_api import sync_playwright
    from viewer_setup import launch_browser

    from cltrace.attribution.heads import qk_side_path
    from cltrace.viewer import make_app
    from cltrace.viewer.background import Background

    folder, tc, graph = traced
    assert main(["-q", "qk", str(graph), "--node", "logit", "-m", folder, "-t", tc, "--json", "--edges", "2"]) == 0
    capsys.readouterr()
    side = json.loads(qk_side_path(graph).read_text())
    target = side["edges"][0]["target"]
    want = [e for e in side["edges"] if e["target"] == target]
    with Background(make_app(graph.parent)) as url, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + f"?graph={graph.stem}")
        page.wait_for_function("() => window.__cltrace && window.__cltrace.ready")
        assert target in page.evaluate("() => __cltrace.nodeIds()")
        pos = page.evaluate("id => __cltrace.nodeScreenPos(id)", target)
        page.mouse.click(pos["x"], pos["y"])
        page.wait_for_function("() => document.querySelectorAll('[data-testid=qk-edge]').length > 0")
        edges = page.get_by_test_id("qk-edge")
        assert edges.count() == len(want)
        for row, e in zip(edges.all(), want):
            head = row.inner_text().splitlines()[0]  # "SOURCE → TARGET: edge +x (heads +y, direct +z)"
            assert head.startswith(f"{e['source']} → {e['target']}: edge ")
            shown = float(re.search(r"edge ([-+0-9.e]+)", head).group(1))
            assert abs(shown - e["edge"]) <= 5e-4 + 1e-2 * abs(e["edge"]), (head, e["edge"])
        assert page.get_by_test_id("qk-head").count() >= 1
        browser.close()
    assert not errors, errors
