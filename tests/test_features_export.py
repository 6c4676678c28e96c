"""Feature files for other viewers (circuit-tracer, Neuronpedia), labels in graphs, and the label / search /
export commands, on a tiny Llama folder with a random CLT and a feature database of a dozen short contexts."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from cltrace.attribution import Graph
from cltrace.attribution.export import cantor
from cltrace.cli import main
from cltrace.errors import CltraceError
from cltrace.features import FeatureDB, build_features, export_circuit_tracer, export_neuronpedia
from cltrace.features.db import FeatureCard
from cltrace.features.export import linear_histogram, percentiles, read_binary_feature
from cltrace.features.stats import bin_edges
from cltrace.models.registry import load_model
from cltrace.models.tiny import save_tiny
from cltrace.replacement.calibrate import random_transcoder
from cltrace.transcoders.io import save_transcoder

T = 24
TEXT = ("Fact: Michael Jordan plays the sport of basketball. The opposite of hot is cold, and the capital of "
        "France is Paris. Numbers: 36+59=95, 12*3=36. def f(x): return x + 1. The National Digital Analytics "
        "Group (NDAG) met on Monday.")
DOCS = [TEXT[i:i + T - 3] for i in range(0, 10 * (T - 3), T - 3)]
BUILD = dict(corpus=DOCS, n_tokens=10 * T, context_len=T, batch_size=5, top_k=4, window=(4, 2), n_ranges=3,
             per_range=2, progress=False, log=lambda msg: None)

# circuit-tracer's frontend/feature_models.py (pydantic): field -> type
CT_FEATURE = {"transcoder_id": str, "index": int, "examples_quantiles": list, "top_logits": list,
              "bottom_logits": list, "act_min": float, "act_max": float, "quantile_values": list, "histogram": list,
              "activation_frequency": float}
CT_QUANTILE = {"quantile_name": str, "examples": list}
CT_EXAMPLE = {"tokens_acts_list": list, "train_token_ind": int, "is_repeated_datapoint": bool, "tokens": list}
# SAEDashboard's NeuronpediaDashboardBatch / Feature / Activation .to_dict()
NP_BATCH = {"model_id": str, "layer": int, "sae_set": str, "features": list}
NP_FEATURE = {"feature_index": int, "neuron_alignment_indices": list, "neuron_alignment_values": list,
              "neuron_alignment_l1": list, "correlated_neurons_indices": list, "correlated_neurons_l1": list,
              "correlated_neurons_pearson": list, "correlated_features_indices": list, "correlated_features_l1": list,
              "correlated_features_pearson": list, "neg_str": list, "neg_values": list, "pos_str": list,
              "pos_values": list, "frac_nonzero": float, "freq_hist_data_bar_values": list,
              "freq_hist_data_bar_heights": list, "logits_hist_data_bar_heights": list,
              "logits_hist_data_bar_values": list, "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str,
              "decoder_weights_dist": list, "activations": list}
NP_ACTIVATION = {"bin_min": (int, float), "bin_max": (int, float), "bin_contains": (int, float), "tokens": list,
                 "values": list}


def has_schema(obj: dict, schema: dict) -> None:
    assert set(schema) <= set(obj), set(schema) - set(obj)
    for key, typ in schema.items():
        ok = isinstance(obj[key], typ) and not (typ is int and isinstance(obj[key], bool))
        if typ is float:
            ok = isinstance(obj[key], (int, float)) and not isinstance(obj[key], bool)
        assert ok, (key, type(obj[key]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, model, tc, transcoder folder, db path): a tiny Llama folder, its random CLT saved, the database."""
    root = tmp_path_factory.mktemp("fx")
    folder = save_tiny("llama", root / "tiny")
    model = load_model(str(folder))
    tc = random_transcoder(model, "clt", n_features=16, active_per_layer=40, seed=0)
    save_transcoder(tc, root / "clt")
    db = root / "f.db"
    build_features(model, tc, out=db, **BUILD)
    return folder, model, tc, root / "clt", db


def test_circuit_tracer_files_have_the_schema_and_the_database_numbers(setup, tmp_path):
    *_, path = setup
    db = FeatureDB.open(path)
    db.set_label(1, 3, "a person's label")
    out = export_circuit_tracer(db, tmp_path / "ct")
    L, F = db.n_layers, db.n_features
    assert len(list(out.glob("*.json"))) == L * F
    index = json.loads(gzip.decompress((out / "index.json.gz").read_bytes()))
    assert [e["filename"] for e in index] == [f"layer_{a}.bin" for a in range(L)]
    assert all(len(e["offsets"]) == F + 1 for e in index)
    fired = 0
    for card in db.features([(a, f) for a in range(L) for f in range(F)]):
        data = json.loads((out / f"{cantor(card.layer, card.feature)}.json").read_text())
        assert read_binary_feature(out, card.layer, card.feature) == data
        has_schema(data, CT_FEATURE)
        for group in data["examples_quantiles"]:
            has_schema(group, CT_QUANTILE)
            for ex in group["examples"]:
                has_schema(ex, CT_EXAMPLE)
                assert len(ex["tokens"]) == len(ex["tokens_acts_list"]) > ex["train_token_ind"] >= 0
        assert data["index"] == cantor(card.layer, card.feature)
        assert (data["layer"], data["feature_index"], data["label"]) == (card.layer, card.feature, card.label)
        assert data["act_min"] == 0.0 and data["act_max"] == card.max_act
        assert data["activation_frequency"] == card.frequency
        assert data["top_logits"] == [t.token for t in card.output_top] and len(data["top_logits"]) == 10
        assert data["bottom_logits"] == [t.token for t in card.output_bottom]
        assert data["top_logits_values"] == [t.value for t in card.output_top]
        assert data["bottom_logits_values"] == [t.value for t in card.output_bottom]
        top = data["examples_quantiles"][0]
        assert top["quantile_name"] == "Top activations"
        assert [(e["tokens"], e["tokens_acts_list"], e["train_token_ind"]) for e in top["examples"]] == \
            [(ex.tokens, ex.acts, ex.center) for ex in card.top]
        ranges = [q for q in card.quantiles[::-1] if q.examples]
        assert [[e["tokens"] for e in g["examples"]] for g in data["examples_quantiles"][1:]] == \
            [[ex.tokens for ex in q.examples] for q in ranges]
        assert len(data["quantile_values"]) == 100 and len(data["histogram"]) == 50
        if card.count:
            fired += 1
            ex = top["examples"][0]
            assert ex["tokens_acts_list"][ex["train_token_ind"]] == float(np.float16(card.max_act))
            assert sum(data["histogram"]) == pytest.approx(card.count, rel=1e-3)
            q = data["quantile_values"]
            assert q == sorted(q) and q[-1] == card.max_act and q[0] > 0
    assert fired > L * F // 2
    assert json.loads((out / f"{cantor(1, 3)}.json").read_text())["label"] == "a person's label"
    # a subset: its JSON files, and binary files that hold only it
    sub = export_circuit_tracer(db, tmp_path / "sub", "1:3,2:*")
    assert len(list(sub.glob("*.json"))) == 1 + F
    assert read_binary_feature(sub, 1, 3) == json.loads((out / f"{cantor(1, 3)}.json").read_text())
    assert read_binary_feature(sub, 1, 2) is None and read_binary_feature(sub, 1, 4) is None
    assert read_binary_feature(sub, 0, 0) is None and not (sub / "layer_0.bin").exists()
    assert all(read_binary_feature(sub, 2, f) is not None for f in range(F))
    with pytest.raises(CltraceError, match="not in"):
        export_circuit_tracer(db, tmp_path / "bad", [(1, F)])


def synthetic_card(values: np.ndarray) -> FeatureCard:
    edges = bin_edges().double().numpy()
    hist = np.bincount(np.searchsorted(edges, values, side="right"), minlength=50)
    return FeatureCard(layer=0, feature=0, label="", label_source="auto", auto_label="", note="", author="",
                       updated_at="", frequency=0.1, count=len(values), max_act=float(values.max()),
                       mean_act=float(values.mean()), histogram=hist.tolist(), bin_edges=edges[:].tolist(), top=[],
                       quantiles=[], output_top=[], output_bottom=[], input_top=[])


def test_percentiles_and_linear_histogram_from_the_log_histogram():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(0.0, 1.0, 20_000))  # log-normal, spread over many log bins
    card = synthetic_card(values)
    q = np.array(percentiles(card))
    exact = np.percentile(values, np.arange(1, 101), method="inverted_cdf")
    assert q[-1] == values.max()
    assert np.all(q / exact < 1.34) and np.all(exact / q < 1.34)  # within one log bin (10^(6/48) = 1.33)
    assert np.median(np.abs(np.log(q / exact))) < 0.03  # and close inside a bin
    centres, heights = linear_histogram(card, 50)
    assert sum(heights) == pytest.approx(len(values), rel=1e-6)
    width = values.max() / 50
    assert centres[0] == pytest.approx(width / 2) and centres[-1] == pytest.approx(values.max() - width / 2)
    counts, _ = np.histogram(values, bins=50, range=(0, values.max()))
    cum, cum_exact = np.cumsum(heights), np.cumsum(counts)
    assert np.max(np.abs(cum - cum_exact)) < 0.05 * len(values)  # the CDF at each bar edge, to a log bin
    one = synthetic_card(np.full(10, 2.5))  # every value in one log bin, the max equal to all of them
    assert percentiles(one)[-1] == 2.5 and max(percentiles(one)) == 2.5
    assert sum(linear_histogram(one, 10)[1]) == pytest.approx(10)


def test_neuronpedia_batches_have_the_schema_and_the_database_numbers(setup, tmp_path):
    *_, path = setup
    db = FeatureDB.open(path)
    out = export_neuronpedia(db, tmp_path / "np", batch_size=5, sae_set="clt-test", model_id="tiny")
    L, F = db.n_layers, db.n_features
    files = sorted(out.glob("*/batch-*.json"))
    assert sorted({p.parent.name for p in files}) == sorted(f"{a}-clt-test" for a in range(L))
    assert len(files) == L * math.ceil(F / 5)
    seen = []
    for p in files:
        batch = json.loads(p.read_text())
        has_schema(batch, NP_BATCH)
        assert (batch["model_id"], batch["sae_set"]) == ("tiny", "clt-test") and len(batch["features"]) <= 5
        assert p.parent.name == f"{batch['layer']}-clt-test"
        for feat in batch["features"]:
            has_schema(feat, NP_FEATURE)
            card = db.feature(batch["layer"], feat["feature_index"])
            seen.append((card.layer, card.feature))
            assert feat["pos_str"] == [t.token for t in card.output_top]
            assert feat["pos_values"] == [t.value for t in card.output_top]
            assert feat["neg_str"] == [t.token for t in card.output_bottom]
            assert feat["neg_values"] == [t.value for t in card.output_bottom]
            assert feat["frac_nonzero"] == card.frequency
            assert (feat["n_prompts_total"], feat["n_tokens_in_prompt"]) == (db.meta["n_contexts"], T)
            for a in feat["activations"]:
                has_schema(a, NP_ACTIVATION)
            top = [a for a in feat["activations"] if a["bin_min"] == -1]
            assert [(a["tokens"], a["values"]) for a in top] == [(ex.tokens, ex.acts) for ex in card.top]
            assert all(a["bin_max"] == card.max_act for a in top)
            rest = feat["activations"][len(top):]
            assert [a["tokens"] for a in rest] == [ex.tokens for q in card.quantiles[::-1] for ex in q.examples]
            for a in rest:
                assert 0 <= a["bin_min"] < a["bin_max"] <= card.max_act * (1 + 1e-9) and 0 < a["bin_contains"] <= 1
            if card.count:
                assert max(top[0]["values"]) == float(np.float16(card.max_act))
                assert sum(feat["freq_hist_data_bar_heights"]) == pytest.approx(card.count, rel=1e-3)
    assert sorted(seen) == [(a, f) for a in range(L) for f in range(F)]


def test_cli_label_search_show_export(setup, tmp_path, capsys):
    *_, path = setup
    db = str(path)
    assert main(["features", "label", "2:5", "Paris, the capital", "--db", db, "--note", "checked", "--author",
                 "ana"]) == 0
    assert main(["features", "show", "2:5", "--db", db, "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert (card["label"], card["label_source"], card["note"], card["author"]) == ("Paris, the capital", "human",
                                                                                   "checked", "ana")
    assert main(["features", "search", "CAPITAL", "--db", db, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0] == {"id": "2:5", "layer": 2, "feature": 5, "label": "Paris, the capital", "why": "label"}
    with FeatureDB.open(path) as d:  # a feature whose top example is at a letter
        card = next(c for c in d.features([(0, f) for f in range(16)]) if c.top and c.top[0].tokens[
            c.top[0].center].strip().isalpha())
    token = card.top[0].tokens[card.top[0].center]
    assert main(["features", "search", token, "--db", db, "--limit", "10000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert card.id in [line.split("\t")[0] for line in lines] and all(len(line.split("\t")) == 3 for line in lines)
    assert main(["features", "label", "2:5", "", "--db", db]) == 0  # removed: the automatic label is back
    with FeatureDB.open(path) as d:
        assert d.feature(2, 5).label_source == "auto"
    assert main(["-q", "features", "export", "--db", db, "--format", "circuit-tracer", "--out", str(tmp_path / "ct"),
                 "--features", "0:1,1:2", "--name", "mine"]) == 0
    data = json.loads((tmp_path / "ct" / f"{cantor(1, 2)}.json").read_text())
    assert data["transcoder_id"] == "mine" and len(list((tmp_path / "ct").glob("*.json"))) == 2
    assert main(["-q", "features", "export", "--db", db, "--format", "neuronpedia", "--out", str(tmp_path / "np"),
                 "--features", "1:*"]) == 0
    (batch,) = (tmp_path / "np").glob("1-clt-*/batch-0.json")
    assert len(json.loads(batch.read_text())["features"]) == 16
    capsys.readouterr()
    for argv, msg in ((["label", "2:99", "x"], "not in"), (["label", "2-5", "x"], "LAYER:FEATURE"),
                      (["export", "--format", "neuronpedia", "--out", str(tmp_path / "x"), "--features", "1:x"],
                       "LAYER:FEATURE"), (["search", "x", "--db", str(tmp_path / "none.db")], "no feature database")):
        if "--db" not in argv:
            argv = [*argv, "--db", db]
        assert main(["features", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1


def test_trace_carries_labels_into_the_graph_and_its_viewer_json(setup, tmp_path, capsys):
    folder, model, tc, tc_dir, path = setup
    base = ["trace", "Fact: Michael Jordan", "-m", str(folder), "-t", str(tc_dir), "--features", str(path),
            "--export-json", str(tmp_path / "view"), "--slug", "s", "--scan", "/features", "--json"]

    def run() -> tuple[Graph, dict]:
        assert main([*base, "--out", str(tmp_path / "g.safetensors")]) == 0
        summary = json.loads(capsys.readouterr().out)
        g = Graph.load(tmp_path / "g.safetensors")
        assert summary["n_labelled_features"] == len(g.meta["feature_labels"])
        return g, json.loads((tmp_path / "view" / "s.json").read_text())

    graph, view = run()
    with FeatureDB.open(path) as db:
        refs = {(int(a), int(f)) for a, _, f in graph.features.tolist()}
        assert set(graph.meta["feature_labels"]) == {f"{a}:{f}" for a, f in refs}
        for key, value in graph.meta["feature_labels"].items():
            a, f = map(int, key.split(":"))
            card = db.feature(a, f)
            assert value == {"label": db.label(a, f), "source": card.label_source}
        assert graph.meta["features_db"]["transcoder_sha256"] == db.meta["transcoder_sha256"]
        feats = [n for n in view["nodes"] if n["feature_type"] == "cross layer transcoder"]
        assert feats and view["metadata"]["scan"] == "/features"
        for n in feats:
            a, f, _ = map(int, n["node_id"].split("_"))
            assert n["clerp"] == db.label(a, f) != ""
        a, f, _ = map(int, feats[0]["node_id"].split("_"))
        db.set_label(a, f, "a person's label")
    graph, view = run()
    assert graph.meta["feature_labels"][f"{a}:{f}"] == {"label": "a person's label", "source": "human"}
    assert [n["clerp"] for n in view["nodes"] if n["node_id"].startswith(f"{a}_{f}_")][0] == "a person's label"
    # a database of other transcoders does not fit
    other = tmp_path / "other.db"
    build_features(model, random_transcoder(model, "clt", n_features=16, active_per_layer=40, seed=7), out=other,
                   **BUILD)
    argv = [a if a != str(path) else str(other) for a in base]
    assert main([*argv, "--out", str(tmp_path / "g2.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "other transcoders" in err and len(err.splitlines()) == 1
    assert main(["trace", "hi", "-m", str(folder), "--random-transcoders", "8", "--features", str(path), "--out",
                 str(tmp_path / "g3.safetensors")]) == 2
    assert "--features needs" in capsys.readouterr().err


@torch.no_grad()
def test_graph_json_without_labels_keeps_empty_clerps(setup):
    from cltrace.attribution import attribute
    from cltrace.attribution.export import graph_json

    _, model, tc, _, _ = setup
    graph = attribute(model, tc, "Fact: Michael", batch_size=16)
    nodes = graph_json(graph, "s")["nodes"]
    assert all(n["clerp"] == "" for n in nodes if n["feature_type"] == "cross layer transcoder")
    graph.meta["feature_labels"] = {f"{a}:{f}": {"label": f"L{a}F{f}", "source": "auto"}
                                    for a, _, f in graph.features.tolist()}
    nodes = graph_json(graph, "s")["nodes"]
    feats = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
    assert feats and all(n["clerp"] == "L{}F{}".format(*n["node_id"].split("_")[:2]) for n in feats)
