"""The case studies (examples/case_studies/) end to end on a tiny random model, and the pieces they rely on.

Each study's `run(study)` writes its page, figures and saved subgraph; the subgraph must open in the viewer with
its pinned nodes and named supernodes. The supernode predictions are checked against interventions measured
independently, and the addition study's type rule against heat maps whose type is known.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cltrace.attribution import attribute
from cltrace.interventions import Intervention, clean_run, run_constrained
from cltrace.interventions.graph import direct_prediction, total_prediction
from cltrace.replacement import random_transcoder
from cltrace.viewer import make_app
from cltrace.viewer.store import GraphStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "case_studies"))

import acronym  # noqa: E402
import addition  # noqa: E402
import antonyms  # noqa: E402
import common  # noqa: E402
import factual_recall  # noqa: E402

PROMPT = "Fact: Michael Jordan plays the sport of"


@pytest.fixture(scope="module")
def study(tiny_on, tmp_path_factory):
    model = tiny_on("gemma3")
    tc = random_transcoder(model, "clt", n_features=32, active_per_layer=12, seed=0, prompt=PROMPT)
    root = tmp_path_factory.mktemp("case-studies")
    return common.Study(model, tc, None, docs=root / "docs", runs=root / "runs", max_features=60, grid=12, batch=50,
                        transcoders="random")


def check_outputs(study: common.Study, name: str, figures: list[str]) -> dict:
    """The page names its figures, the PNGs are images, and the saved subgraph loads in the viewer with its
    state: every supernode member is a pinned node of the graph, every supernode has a name."""
    page = (study.docs / f"{name}.md").read_text()
    for fig in figures:
        assert f"]({name}/{fig})" in page, fig
        with Image.open(study.docs / name / fig) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    folder = study.runs / name
    store = GraphStore(folder)
    assert store.names() == [name]
    loaded = store.load(name)
    from starlette.testclient import TestClient

    client = TestClient(make_app(folder), base_url="http://127.0.0.1:8765")
    state = client.get(f"/api/graphs/{name}/state").json()
    assert state["pinned"] and state["supernodes"]
    assert set(state["pinned"]) <= set(loaded.ids)
    for sn in state["supernodes"]:
        assert sn["name"] and sn["members"] and set(sn["members"]) <= set(state["pinned"])
    assert state["labels"]  # the members' labels, for a viewer without a feature database
    view = client.get(f"/api/graphs/{name}/view").json()
    assert view["prompt"] == loaded.graph.prompt
    return json.loads((folder / "results.json").read_text())


def test_factual_recall_writes_page_and_subgraph(study):
    r = factual_recall.run(study, candidates=[PROMPT, "Fact: Tiger Woods plays the sport of"])
    check_outputs(study, factual_recall.NAME, ["graph.png", "supernodes.png"])
    assert r["supernodes"], "no supernode formed"
    # the athlete group is found by character span: with the byte tokenizer, one position per letter
    g = GraphStore(study.runs / factual_recall.NAME).load(factual_recall.NAME).graph
    start = PROMPT.index("Jordan") + 1  # + 1: BOS
    assert common.token_positions(g, ["Jordan"]) == set(range(start, start + len("Jordan")))
    assert common.token_positions(g, ["Michael", "of"]) == (set(range(start - 8, start - 1))
                                                            | {len(PROMPT) - 1, len(PROMPT)})


def test_supernode_predictions_match_independent_runs(study):
    """steer_supernode's graph direct prediction equals the change measured with every layer held, and its total
    prediction the linearized model's, for a supernode of several features (computed here without the helpers)."""
    model, tc = study.model, study.tc
    t = common.trace(replace(study, max_features=None), PROMPT)  # every active feature a node, as the linear model
    g = t.graph
    members = t.influence[: g.n_features].argsort(descending=True)[:3].tolist()  # pruned away or not
    assert len(members) == 3
    answer = int(g.logit_tokens[0])
    r = common.steer_supernode(study, g, members, -1.0, answer)
    keys = [common.node_key(g, i) for i in members]
    ivs = [Intervention(layer=la, pos=p, feature=f, value=-float(g.activations[i])) for (la, p, f), i
           in zip(keys, members)]
    with torch.no_grad():
        clean = clean_run(model, tc, g.input_ids)
        held = run_constrained(model, tc, clean, ivs, held=set(range(model.n_layers)))
        lin = run_constrained(model, tc, clean, ivs, linear=True)

    def demeaned(logits):
        return float(logits[answer] - logits.mean())

    base = demeaned(clean.last_logits)
    assert r["graph_direct"] == pytest.approx(demeaned(held.last_logits) - base, rel=1e-3, abs=1e-5)
    assert r["graph_total"] == pytest.approx(demeaned(lin.last_logits) - base, rel=1e-3, abs=1e-5)
    # every feature row too: the total prediction of the supernode is the linearized model's pre-activations
    changes = {k: -2.0 * float(g.activations[i]) for k, i in zip(keys, members)}
    total = total_prediction(g, changes)[: g.n_features]
    measured = torch.stack([lin.pre[la][p, f] - clean.pre[la][p, f] for la, p, f in g.features.tolist()]).double()
    outside = torch.tensor([tuple(k) not in set(keys) for k in g.features.tolist()])
    torch.testing.assert_close(total[outside], measured[outside], rtol=1e-3, atol=1e-4 * float(measured.abs().max()))
    assert not torch.allclose(total, direct_prediction(g, changes)[: g.n_features])  # paths beyond direct edges


def test_total_prediction_of_one_feature_matches_linearized_run(tiny_on):
    model = tiny_on("llama")
    tc = random_transcoder(model, "clt", n_features=32, active_per_layer=20, seed=1, prompt=PROMPT)
    g = attribute(model, tc, PROMPT)
    k = int(g.activations.argmax())
    la, p, f = g.features[k].tolist()
    a = float(g.activations[k])
    with torch.no_grad():
        clean = clean_run(model, tc, g.input_ids)
        lin = run_constrained(model, tc, clean, [Intervention(layer=la, pos=p, feature=f, value=a + 1.5)],
                              linear=True)
    pred = total_prediction(g, {(la, p, f): 1.5})
    d = lin.last_logits - lin.last_logits.mean() - (clean.last_logits - clean.last_logits.mean())
    torch.testing.assert_close(pred[g.n_features:], d[g.logit_tokens].double(), rtol=1e-3,
                               atol=1e-4 * float(d.abs().max()))


def test_addition_writes_operand_plots(study):
    r = addition.run(study)
    figs = ["accuracy.png", "graph.png", "supernodes.png"] + [f"feature_{c['layer']}_{c['feature']}.png"
                                                              for c in r["features"]]
    check_outputs(study, addition.NAME, figs)
    assert 1 <= len(r["features"]) <= addition.N_FEATURES
    assert 0.0 <= r["accuracy_first_token"] <= 1.0
    # the sweep's activations are the CLT's at "=", as one prompt's own clean pass gives them
    grid = addition.sweep(study)
    c = r["features"][0]
    ids = study.model.tokenize("7+5=")
    with torch.no_grad():
        clean = clean_run(study.model, study.tc, ids)
    assert float(grid["acts"][7, 5, c["layer"], c["feature"]]) == pytest.approx(
        float(clean.acts[c["layer"]][-1, c["feature"]]), rel=1e-2, abs=1e-2)
    top = int(study.model.logits(ids)[0, -1].argmax())
    assert int(grid["top"][7, 5]) == top


@pytest.mark.parametrize("pattern,kind,key", [
    (lambda a, b: (a % 10 == 6) & (b % 10 == 9), "lookup table", "(a mod 10, b mod 10)"),
    (lambda a, b: (a + b) % 10 == 5, "sum", "(a+b) mod 10"),
    (lambda a, b: np.abs(a + b - 95) < 3, "sum", "a+b"),
    (lambda a, b: a % 10 == 3, "add-function (operand)", "a mod 10"),
    (lambda a, b: b // 10 == 4, "add-function (operand)", "b // 10"),
])
def test_addition_type_rule_on_known_patterns(pattern, kind, key):
    a, b = np.meshgrid(np.arange(100), np.arange(100), indexing="ij")
    rng = np.random.default_rng(0)
    H = pattern(a, b) * (2.0 + 0.1 * rng.random((100, 100)))
    c = addition.classify(H)
    assert (c["type"], c["key"]) == (kind, key)


def test_addition_type_rule_refuses_noise_and_rare():
    rng = np.random.default_rng(1)
    assert addition.classify(rng.random((100, 100)))["type"] == "unclassified"
    H = np.zeros((100, 100))
    H[3, 4] = 1.0
    assert addition.classify(H)["type"] == "rare on the grid"
    a, b = np.meshgrid(np.arange(100), np.arange(100), indexing="ij")
    assert addition.classify(7.0 + 0.3 * (a % 10 == 3))["type"] == "near-constant on the grid"
    assert addition.classify(7.0 + 3.0 * (a % 10 == 3))["key"] == "a mod 10"


def test_acronym_and_antonyms_write_pages(study):
    acronym.run(study)
    check_outputs(study, acronym.NAME, ["graph.png", "supernodes.png"])
    r = antonyms.run(study)
    check_outputs(study, antonyms.NAME, ["graph.png", "supernodes.png"])
    cross = [v for v in r["cross_language"].values() if v]
    assert cross and all(set(v) == {"French", "Spanish"} for v in cross)
