"""The viewer's HTTP API: every endpoint, the security guard, and the numbers against the library's own code."""

from __future__ import annotations

import base64
import json
import os
import time

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient
from viewer_setup import EVIL, PROMPT

from cltrace.attribution import Graph, PruneResult, prune, scores
from cltrace.attribution.export import graph_json, node_ids
from cltrace.features import FeatureDB
from cltrace.viewer import make_app
from cltrace.viewer.analysis import suggest_supernodes
from cltrace.viewer.store import GraphStore
from cltrace.viewer.synthetic import synthetic_graph

TOKEN = "test-token"
H = {"X-Cltrace-Token": TOKEN}
BASE = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def client(viewer_served):
    s = viewer_served
    app = make_app(s.root, features=s.features, model=s.model, transcoders=s.transcoders, token=TOKEN)
    with TestClient(app, base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def bare(viewer_served, tmp_path_factory):
    """A server without model or database over a copy of the synthetic graph."""
    root = tmp_path_factory.mktemp("bare")
    (root / "synth.safetensors").write_bytes((viewer_served.root / "synth.safetensors").read_bytes())
    with TestClient(make_app(root, token=TOKEN), base_url=BASE) as c:
        yield c, root


def unpack(arr: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(arr), dtype=dtype)


def wait(client, job: dict) -> dict:
    deadline = time.monotonic() + 120
    while job["status"] not in ("done", "error"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


def test_page_health_info_and_listing(client, viewer_served):
    r = client.get("/")
    assert r.status_code == 200 and f'content="{TOKEN}"' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert client.get("/healthz").text == "ok"
    info = client.get("/api/info").json()
    assert info["model"] == viewer_served.model and info["features"].endswith("features.db")
    graphs = {g["name"]: g for g in client.get("/api/graphs").json()["graphs"]}
    assert {"evil", "synth"} <= set(graphs) and graphs["evil"]["prompt"] == PROMPT
    assert client.get("/static/js/main.js").status_code == 200
    assert client.get("/static/vendor/LICENSE-d3.txt").status_code == 200


def test_view_is_the_exact_pruning(client, viewer_served):
    g = Graph.load(viewer_served.root / "evil.safetensors")
    for node_t, edge_t in [(0.8, 0.98), (0.5, 0.9)]:
        v = client.get(f"/api/graphs/evil/view?node={node_t}&edge={edge_t}").json()
        j = graph_json(g, "evil", prune(g, node_t, edge_t))
        assert v["nodes"]["id"] == [n["node_id"] for n in j["nodes"]]
        ids = v["nodes"]["id"]
        src, tgt = unpack(v["edges"]["src"], "<u4"), unpack(v["edges"]["tgt"], "<u4")
        w = unpack(v["edges"]["w"], "<f4")
        got = {(ids[s], ids[t]): float(x) for s, t, x in zip(src, tgt, w)}
        want = {(e["source"], e["target"]): e["weight"] for e in j["links"]}
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) <= 1e-6 * max(1, abs(want[k])) for k in want)
        kinds = unpack(v["nodes"]["kind"], "u1")
        assert v["counts"]["features_shown"] == int((kinds == 0).sum())
    assert v["counts"]["nodes_total"] == g.n_nodes and v["prompt"] == PROMPT


def test_logit_difference_node(client, viewer_served):
    g = Graph.load(viewer_served.root / "evil.safetensors")
    v = client.get("/api/graphs/evil/view?diff=0,1").json()
    ids = v["nodes"]["id"]
    assert ids[-1] == "diff_0_1" and unpack(v["nodes"]["kind"], "u1")[-1] == 4
    src, tgt = unpack(v["edges"]["src"], "<u4"), unpack(v["edges"]["tgt"], "<u4")
    w = unpack(v["edges"]["w"], "<f4")
    index = {k: i for i, k in enumerate(node_ids(g))}
    nf = g.n_features
    into = [(ids[s], float(x)) for s, t, x in zip(src, tgt, w) if t == len(ids) - 1]
    assert into
    for source, x in into:
        want = float(g.edges[nf, index[source]] - g.edges[nf + 1, index[source]])
        assert x == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert client.get("/api/graphs/evil/view?diff=0,0").status_code == 400
    assert client.get("/api/graphs/evil/view?diff=x").status_code == 400


@pytest.mark.parametrize("query", ["node=0", "node=1.5", "edge=abc", "node=nan"])
def test_bad_thresholds_are_400(client, query):
    r = client.get(f"/api/graphs/evil/view?{query}")
    assert r.status_code == 400 and "threshold" in r.json()["error"]


def test_only_graphs_in_dir_are_served(client, viewer_served, tmp_path):
    root = viewer_served.root
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((root / "synth.safetensors").read_bytes())
    os.symlink(outside, root / "linkout.safetensors")
    os.symlink("/etc/passwd", root / "passwd.safetensors")
    try:
        names = [g["name"] for g in client.get("/api/graphs").json()["graphs"]]
        assert "linkout" not in names and "passwd" not in names
        for bad in ["linkout", "passwd", "..", "%2e%2e", "..%2Fgraphs%2Fevil", "%2Fetc%2Fpasswd", "evil.view",
                    "..%5Cevil", "%00evil", "work%2Ffeatures"]:
            r = client.get(f"/api/graphs/{bad}/view")
            assert r.status_code == 404, (bad, r.status_code)
            assert client.get(f"/api/graphs/{bad}/state").status_code == 404
        for bad in ["/static/../app.py", "/static/..%2Fapp.py", "/static/%2e%2e/app.py", "/static//etc/passwd",
                    "/static/js/../../app.py", "/static/..%2F..%2F..%2Fgraphs%2Fevil.safetensors"]:
            r = client.get(bad)
            assert r.status_code == 404 and "import" not in r.text, bad
        assert client.get("/evil.safetensors").status_code == 404
    finally:
        (root / "linkout.safetensors").unlink()
        (root / "passwd.safetensors").unlink()


def test_graph_store_refuses_links_out_and_non_graphs(viewer_served, tmp_path):
    (tmp_path / "notgraph.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}              ")
    (tmp_path / "ok.safetensors").write_bytes((viewer_served.root / "synth.safetensors").read_bytes())
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "deep.safetensors").write_bytes((viewer_served.root / "synth.safetensors").read_bytes())
    os.symlink(sub / "deep.safetensors", tmp_path / "link.safetensors")  # inside the tree, but not DIR itself
    store = GraphStore(tmp_path)
    assert store.names() == ["ok"]
    assert store.free_name("ok") == "ok-2" and store.free_name("a/../b c") == "a-b-c"


def test_guard_host_origin_token_and_sizes(client):
    state = client.get("/api/graphs/evil/state").json()
    assert client.put("/api/graphs/evil/state", json=state).status_code == 403  # no token
    r = client.put("/api/graphs/evil/state", json=state, headers={"X-Cltrace-Token": "wrong"})
    assert r.status_code == 403 and "Token" in r.json()["error"]
    r = client.put("/api/graphs/evil/state", json=state, headers={**H, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]
    r = client.get("/api/graphs", headers={"Host": "attacker.example:8765"})  # DNS rebinding
    assert r.status_code == 403 and "rebinding" in r.json()["error"]
    assert client.put("/api/graphs/evil/state", json=state, headers={**H, "Origin": BASE}).status_code == 200
    big = b'{"pinned": [' + b'"x",' * 400_000 + b'"x"]}'
    r = client.put("/api/graphs/evil/state", content=big, headers={**H, "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = client.put("/api/graphs/evil/state", content=b"{not json", headers=H)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.put("/api/graphs/evil/state", json={"pinned": "abc"}, headers=H)
    assert r.status_code == 422 and "pinned" in r.json()["error"]
    r = client.put("/api/graphs/evil/state", json={"pinned": [], "surprise": 1}, headers=H)
    assert r.status_code == 422 and "surprise" in r.json()["error"]
    r = client.put("/api/graphs/evil/state", json={"pinned": ["nope_1_2"]}, headers=H)
    assert r.status_code == 422 and "not in this graph" in r.json()["error"]
    r = client.post("/api/graphs/evil/scores", json={"pinned": ["x"] * 600}, headers=H)
    assert r.status_code == 422
    assert client.get("/api/graphs").status_code == 200  # still serving


def test_state_round_trip(client):
    ids = client.get("/api/graphs/evil/view").json()["nodes"]["id"]
    st = {"pinned": ids[:3], "supernodes": [{"id": "sn1", "name": EVIL, "members": ids[:2]}],
          "layout": {"sn1": [0.25, 0.5]}, "node_threshold": 0.6, "edge_threshold": 0.9,
          "rejected": [], "clicked": ids[0], "link_type": "both", "labels": {}}
    assert client.put("/api/graphs/evil/state", json=st, headers=H).json() == {"saved": True}
    got = client.get("/api/graphs/evil/state").json()
    assert got["pinned"] == ids[:3] and got["supernodes"][0]["name"] == EVIL and got["layout"]["sn1"] == [0.25, 0.5]
    v = client.get("/api/graphs/evil/view").json()  # the saved thresholds are the default view
    assert v["node_threshold"] == 0.6 and v["edge_threshold"] == 0.9
    client.put("/api/graphs/evil/state", json={"pinned": []}, headers=H)


def test_node_dashboard_and_label_to_database(client, viewer_served):
    g = Graph.load(viewer_served.root / "evil.safetensors")
    i = int(g.activations.argmax())
    layer, pos, f = g.features[i].tolist()
    nid = f"{layer}_{f}_{pos}"
    d = client.get(f"/api/graphs/evil/node/{nid}").json()
    assert d["activation"] == pytest.approx(float(g.activations[i])) and d["layer"] == layer
    dash = d["dashboard"]
    with FeatureDB.open(viewer_served.features) as db:
        card = db.feature(layer, f)
    assert dash["max_act"] == card.max_act and len(dash["top"]) == len(card.top)
    assert dash["histogram"] == card.histogram and dash["activation"] == d["activation"]
    r = client.put("/api/graphs/evil/label", json={"node": nid, "label": EVIL}, headers=H).json()
    assert r == {"node": nid, "label": EVIL, "saved_to": "database"}
    with FeatureDB.open(viewer_served.features) as db:
        assert db.label(layer, f) == EVIL
    v = client.get("/api/graphs/evil/view").json()
    if nid in v["nodes"]["id"]:
        assert v["nodes"]["label"][v["nodes"]["id"].index(nid)] == EVIL
    assert client.get("/api/graphs/evil/node/nope").status_code == 404
    err = [n for n in node_ids(g) if "_err_" in n][0]
    assert client.get(f"/api/graphs/evil/node/{err}").json()["dashboard"] is None
    r = client.put("/api/graphs/evil/label", json={"node": err, "label": "x"}, headers=H)
    assert r.status_code == 422


def test_label_without_database_goes_to_state(bare):
    c, root = bare
    nid = c.get("/api/graphs/synth/view").json()["nodes"]["id"][0]
    r = c.put("/api/graphs/synth/label", json={"node": nid, "label": "  my   label "}, headers=H).json()
    assert r["label"] == "my label" and r["saved_to"] == "graph state"
    assert json.loads((root / "synth.view.json").read_text())["labels"]
    c.put("/api/graphs/synth/state", json={"pinned": [nid]}, headers=H)  # saving state keeps labels
    assert c.get("/api/graphs/synth/view").json()["nodes"]["label"][0] == "my label"
    assert c.get(f"/api/graphs/synth/node/{nid}").json()["dashboard"] is None
    r = c.post("/api/trace", json={"prompt": "hi"}, headers=H)
    assert r.status_code == 409 and "--model" in r.json()["error"]
    r = c.post("/api/graphs/synth/steer", json={"items": [{"nodes": [nid], "value": 0}]}, headers=H)
    assert r.status_code == 409


def test_subgraph_scores_are_cltrace_scores(client, viewer_served):
    g = Graph.load(viewer_served.root / "evil.safetensors")
    ids = node_ids(g)
    pr = prune(g)
    kept = [ids[i] for i in range(g.n_features) if pr.node_mask[i]]
    r = client.post("/api/graphs/evil/scores", json={"pinned": kept}, headers=H).json()
    assert (r["replacement"], r["completeness"]) == scores(g, pr)  # pinned = what pruning kept
    every = client.post("/api/graphs/evil/scores", json={"pinned": ids[:g.n_features]}, headers=H).json()
    assert (every["replacement"], every["completeness"]) == scores(g)  # nothing left out
    two = client.post("/api/graphs/evil/scores", json={"pinned": ids[:2]}, headers=H).json()
    mask = g.kinds() >= 1
    mask[:2] = True
    assert (two["replacement"], two["completeness"]) == scores(g, PruneResult(mask, torch.zeros(0), torch.zeros(0)))
    assert two["n_features"] == 2 and set(two["nodes"]) == set(ids[:2])
    for s, t, w in two["edges"]:
        assert w == pytest.approx(float(g.adjacency()[ids.index(t), ids.index(s)]))


def test_suggestions_group_features_with_the_same_role():
    g = synthetic_graph(200, 1500, n_layers=3, n_pos=5, seed=4)
    a, b, c = 10, 11, 12  # give b a scaled copy of a's edges, c the negated ones
    E = g.edges
    E[b] = E[a] * 2
    E[:, b] = E[:, a] * 0.5
    E[c] = -E[a]
    E[:, c] = -E[:, a]
    g.features[b, :2] = g.features[a, :2]
    g.features[c, :2] = g.features[a, :2]
    E[a, b] = E[b, a] = E[a, c] = E[c, a] = E[b, c] = E[c, b] = 0
    from cltrace.viewer.reprune import Pruner
    from cltrace.viewer.store import Loaded

    ids = node_ids(g)
    loaded = Loaded(g, 0.0, ids, {k: i for i, k in enumerate(ids)}, Pruner(g))
    out = suggest_supernodes(loaded, [ids[a], ids[b], ids[c]], contexts=lambda layer, f: {1, 2, 3})
    assert [s["members"] for s in out] == [[ids[a], ids[b]]]
    assert out[0]["similarity"]["input"] == pytest.approx(1.0, abs=1e-5)
    assert "input edges cos 1.00" in out[0]["why"] and "shared top contexts 1.00" in out[0]["why"]
    assert suggest_supernodes(loaded, [ids[a], ids[b]], exclude=[[ids[b], ids[a]]]) == []


def test_suggest_endpoint(client):
    ids = client.get("/api/graphs/evil/view?node=1&edge=1").json()["nodes"]["id"]
    feats = [n for n in ids if n.count("_") == 2 and "_err_" not in n and not n.startswith("E_")][:10]
    out = client.post("/api/graphs/evil/suggest", json={"pinned": feats}, headers=H).json()["suggestions"]
    for s in out:
        assert set(s["members"]) <= set(feats) and len(s["members"]) >= 2 and s["why"]


def test_export_json_with_qparams_and_subgraph(client, viewer_served):
    g = Graph.load(viewer_served.root / "evil.safetensors")
    ids = client.get("/api/graphs/evil/view?node=0.8&edge=0.98").json()["nodes"]["id"]
    feats = [n for n in ids if n in node_ids(g)[:g.n_features]][:3]
    st = {"pinned": feats, "supernodes": [{"id": "s", "name": "grp", "members": feats[:2]}],
          "layout": {feats[2]: [0.1, 0.2]}}
    client.put("/api/graphs/evil/state", json=st, headers=H)
    r = client.get("/api/graphs/evil/export.json?node=0.8&edge=0.98")
    assert "attachment" in r.headers["content-disposition"]
    data = r.json()
    want = graph_json(g, "evil", prune(g, 0.8, 0.98))
    assert [n["node_id"] for n in data["nodes"]] == [n["node_id"] for n in want["nodes"]]
    assert len(data["links"]) == len(want["links"])
    q = data["qParams"]
    assert q["pinnedIds"] == feats and q["supernodes"] == [["grp", *feats[:2]]] and q["sg_pos"] == "100 200"
    assert q["pruningThreshold"] == 0.8 and data["metadata"]["schema_version"] == 1
    sub = client.get("/api/graphs/evil/export.json?subgraph=1").json()
    assert [n["node_id"] for n in sub["nodes"]] == sorted(feats, key=ids.index)
    assert all(e["source"] in feats and e["target"] in feats for e in sub["links"])
    client.put("/api/graphs/evil/state", json={}, headers=H)


def test_trace_and_steer_jobs(client, viewer_served):
    r = client.post("/api/trace", json={"prompt": "Hi <b>there</b>", "name": "../../hello", "max_features": 50},
                    headers=H)
    assert r.status_code == 202
    job = wait(client, r.json())
    assert job["status"] == "done", job
    name = job["result"]["name"]
    assert "/" not in name and (viewer_served.root / f"{name}.safetensors").is_file()
    assert name in [x["name"] for x in client.get("/api/graphs").json()["graphs"]]
    g = Graph.load(viewer_served.root / f"{name}.safetensors")
    i = int(g.activations.argmax())
    layer, pos, f = g.features[i].tolist()
    nid = f"{layer}_{f}_{pos}"
    req = {"items": [{"nodes": [nid], "op": "scale", "value": 0.0}], "mode": "constrained", "n_tokens": 3}
    job = wait(client, client.post(f"/api/graphs/{name}/steer", json=req, headers=H).json())
    assert job["status"] == "done", job
    res = job["result"]
    assert len(res["before"]) == 10 and len(res["after"]) == 10
    assert len(res["generation"]["original"]) == 3 and len(res["generation"]["steered"]) == 3
    changes = res["graph"]["logit_changes"]
    assert len(changes) == g.n_logits
    # constrained, a feature turned off: the graph's direct prediction is −edge (edge/a × −a) to each logit
    nf = g.n_features
    for j, ch in enumerate(changes):
        assert ch["predicted_direct"] == pytest.approx(-float(g.edges[nf + j, i]), rel=1e-4, abs=1e-6)
    r = client.post(f"/api/graphs/{name}/steer", json={"items": [{"nodes": ["nope"], "value": 1}]}, headers=H)
    assert r.status_code == 422
    err = [n for n in node_ids(g) if "_err_" in n][0]
    r = client.post(f"/api/graphs/{name}/steer", json={"items": [{"nodes": [err], "value": 1}]}, headers=H)
    assert r.status_code == 422 and "feature" in r.json()["error"]
    r = client.post(f"/api/graphs/{name}/steer", json={"items": [{"nodes": [nid], "value": 1}], "n_tokens": 999},
                    headers=H)
    assert r.status_code == 422 and "n_tokens" in r.json()["error"]
    assert client.get("/api/jobs/999-none").status_code == 404
    (viewer_served.root / f"{name}.safetensors").unlink()
    (viewer_served.root / f"{name}.view.json").unlink(missing_ok=True)


def test_cli_serve_errors_are_one_line(capsys, tmp_path):
    from cltrace.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--model", "x"]) == 2
    assert "go together" in capsys.readouterr().err


def test_a_chunked_body_over_the_limit_is_413(viewer_served):
    app = make_app(viewer_served.root, token=TOKEN, max_body=1000)
    with TestClient(app, base_url=BASE) as c:
        def chunks():
            for _ in range(20):
                yield b" " * 100
        r = c.put("/api/graphs/evil/state", content=chunks(), headers=H)  # no Content-Length
        assert r.status_code == 413 and "limit" in r.json()["error"]
        assert c.get("/healthz").text == "ok"
