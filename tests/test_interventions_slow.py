"""Interventions on the default model, Gemma-3-270M, with a random CLT calibrated on the prompt (slow)."""

from __future__ import annotations

import pytest
import torch
from test_interventions import graph_effects, measured_effects

from cltrace.interventions import Intervention, clean_run, intervene, run_constrained, run_free
from cltrace.replacement import random_transcoder

pytestmark = pytest.mark.slow

MJ = "Fact: Michael Jordan plays the sport of"


@pytest.fixture(scope="module")
def setup(gemma):
    from cltrace.attribution import attribute

    tc = random_transcoder(gemma, "clt", n_features=128, active_per_layer=10, prompt=MJ)
    graph = attribute(gemma, tc, MJ)
    with torch.no_grad():
        clean = clean_run(gemma, tc, graph.input_ids)
    return gemma, tc, graph, clean


def test_gemma_noop_is_exact(setup):
    model, tc, graph, clean = setup
    layer, pos, f = graph.features[0].tolist()
    noop = [Intervention(layer=layer, pos=pos, feature=f, value=float(clean.acts[layer][pos, f])),
            Intervention(layer=3, pos=None, feature=7, value=1.0, op="scale")]
    with torch.no_grad():
        assert torch.equal(run_constrained(model, tc, clean, noop).last_logits, clean.last_logits)
        assert torch.equal(run_free(model, tc, clean.ids, noop).last_logits, clean.last_logits)
        torch.testing.assert_close(clean.last_logits, model.logits(clean.ids)[0, -1], rtol=1e-4, atol=1e-3)


def test_gemma_graph_edges_predict_constrained_interventions(setup):
    model, tc, graph, clean = setup
    k = int(graph.activations.argmax())
    layer, pos, f = graph.features[k].tolist()
    a = float(graph.activations[k])
    direct, total = (x.double() for x in graph_effects(graph, k))
    scale = float(direct.abs().max())
    with torch.no_grad():  # inhibition, every layer held: exactly the edges
        run = run_constrained(model, tc, clean, [Intervention(layer=layer, pos=pos, feature=f, value=0.0)],
                              held=set(range(model.n_layers)))
        torch.testing.assert_close(measured_effects(graph, clean, run), -a * direct, rtol=1e-3, atol=1e-3 * scale)
        lin = run_constrained(model, tc, clean, [Intervention(layer=layer, pos=pos, feature=f, value=0.0)], linear=True)
        torch.testing.assert_close(measured_effects(graph, clean, lin), -a * total, rtol=1e-3, atol=1e-3 * scale)
        for eps in (3e-2 * a, 3e-3 * a):  # a change that flips no feature: the graph's paths, exactly
            run = run_constrained(model, tc, clean, [Intervention(layer=layer, pos=pos, feature=f, value=a + eps)])
            if all(torch.equal(r != 0, c != 0) for r, c in zip(run.acts, clean.acts)):
                break
    assert all(torch.equal(r != 0, c != 0) for r, c in zip(run.acts, clean.acts))
    torch.testing.assert_close(measured_effects(graph, clean, run), eps * total, rtol=2e-2, atol=2e-2 * scale * eps)


def test_gemma_api_top_token(setup):
    model, tc, graph, clean = setup
    layer, pos, f = graph.features[int(graph.activations.argmax())].tolist()
    out = intervene(model, tc, MJ, [f"{layer}:{f}@{pos}=0"], mode="free", graph=graph)
    assert out.logits_before[0]["token"] == " basketball"
    assert out.logits_before[0]["prob"] == pytest.approx(0.611, abs=0.01)
    assert len(out.graph["logit_changes"]) >= 1
