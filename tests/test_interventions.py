"""Interventions: no-ops change nothing, the frozen model is linear, free mode is an MLP-output patch."""

from __future__ import annotations

import math

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.interventions import (
    Intervention,
    clean_run,
    first_order,
    intervene,
    intervene_generate,
    run_constrained,
    run_free,
)
from cltrace.replacement import random_transcoder

PROMPT = "the cat sat on the mat"


def calibrated_transcoder(model, kind: str = "clt", skip: bool = False, seed: int = 0):
    """Random transcoder with ~40 active (pos, feature) pairs per layer on PROMPT."""
    return random_transcoder(model, kind, n_features=32, active_per_layer=40, seed=seed, prompt=PROMPT, skip=skip)


def active_feature(clean, layer: int, pos: int | None = None) -> tuple[int, int, float]:
    """(feature, pos, activation) of the most active feature of `layer` (at `pos` if given)."""
    a = clean.acts[layer] if pos is None else clean.acts[layer][pos : pos + 1]
    i = int(a.flatten().argmax())
    p, f = divmod(i, a.shape[1])
    p = p if pos is None else pos
    assert clean.acts[layer][p, f] > 0, "calibration left no active feature"
    return f, p, float(clean.acts[layer][p, f])


@pytest.fixture(scope="module")
def llama(tiny_on):
    m = tiny_on("llama")
    return m, calibrated_transcoder(m)


# ---------------------------------------------------------------------- (b) no-ops change nothing
@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", False), ("clt", True)])
def test_noop_reproduces_logits_exactly(family, kind, skip, tiny_on):
    model = tiny_on(family)
    tc = calibrated_transcoder(model, kind=kind, skip=skip)
    with torch.no_grad():
        clean = clean_run(model, tc, model.tokenize(PROMPT))
        f, p, a = active_feature(clean, 1)
        noop = [Intervention(layer=1, pos=p, feature=f, value=a),
                Intervention(layer=2, pos=None, feature=5, value=1.0, op="scale"),
                Intervention(layer=0, pos=2, feature=3, value=1.0, op="scale")]
        ref = clean.last_logits
        assert torch.equal(run_constrained(model, tc, clean, noop).last_logits, ref)
        assert torch.equal(run_constrained(model, tc, clean, noop, held={0, 1, 2}).last_logits, ref)
        assert torch.equal(run_free(model, tc, clean.ids, noop).last_logits, ref)
    torch.testing.assert_close(ref, model.logits(clean.ids)[0, -1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- (a) the graph's prediction holds
def test_all_layers_held_is_linear_and_matches_direct_patch(family, tiny_on):
    """Every layer held: Δpre of a later feature = (d pre / d a) · Δa exactly, for any Δa, and equals the
    frozen plain model with the feature's decoder vectors added to the clean MLP outputs."""
    model = tiny_on(family)
    tc = calibrated_transcoder(model)
    L = model.n_layers
    with torch.no_grad():
        clean = clean_run(model, tc, model.tokenize(PROMPT))
        f, p, a = active_feature(clean, 0)
        watch = [(2, p, 7), (3, clean.ids.numel() - 1, 1), (1, p, 0), (0, p, 1)]
        tok = int(clean.last_logits.argmax())
        delta = 1.7
        run = run_constrained(model, tc, clean, [Intervention(layer=0, pos=p, feature=f, value=a + delta)],
                              held=set(range(L)))
        # the same thing written directly: clean MLP outputs plus delta · decoder, frozen attention and norms
        W = tc.W_dec[0][f].detach()  # [n_out, D]
        outs = clean.rep.mlp_out

        def patch(layer, mlp_in, mlp_out):
            o = outs[layer][None].clone()
            o[0, p] += delta * W[layer]
            return o

        direct = model.forward(clean.ids, frozen=clean.rep.frozen, mlp_hook=patch)
    d_logit, d_pre = first_order(model, tc, clean, 0, p, f, logit=tok, watch=watch, held=set(range(L)))
    for (wl, wp, wf), g in zip(watch, d_pre):
        expect_pre = (direct.mlp_in[wl][0, wp] @ tc.W_enc[wl, :, wf] + tc.b_enc[wl, wf]).detach()
        measured = float(run.pre[wl][wp, wf] - clean.pre[wl][wp, wf])
        assert math.isclose(float(run.pre[wl][wp, wf]), float(expect_pre), rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(measured, g * delta, rel_tol=1e-3, abs_tol=1e-5)
    torch.testing.assert_close(run.last_logits, direct.logits[0, -1], rtol=1e-4, atol=1e-4)
    measured = float(run.last_logits[tok] - clean.last_logits[tok])
    if not getattr(model.config, "final_logit_softcapping", None):  # logits linear too, up to rounding
        assert math.isclose(measured, d_logit * delta, rel_tol=1e-3, abs_tol=1e-4)
    assert d_pre[3] == 0.0 and run.pre[0][p, 1] == clean.pre[0][p, 1]  # a layer does not read its own output


def test_first_order_matches_small_constrained_change(llama):
    """All layers responding (JumpReLU live): a change Δa that flips no feature on or off moves the logit and
    later pre-activations by exactly the linearized model's prediction."""
    model, tc = llama
    with torch.no_grad():
        clean = clean_run(model, tc, model.tokenize(PROMPT))
    f, p, a = active_feature(clean, 0)
    tok = int(clean.last_logits.argmax())
    watch = [(3, clean.ids.numel() - 1, f2) for f2 in range(4)]
    d_logit, d_pre = first_order(model, tc, clean, 0, p, f, logit=tok, watch=watch)
    # frozen attention and norms: the replacement model is exactly linear while no feature crosses its threshold
    for eps in (0.2 * a, 0.02 * a, 0.002 * a):
        with torch.no_grad():
            run = run_constrained(model, tc, clean, [Intervention(layer=0, pos=p, feature=f, value=a + eps)])
        if all(torch.equal(r != 0, c != 0) for r, c in zip(run.acts[1:], clean.acts[1:])):
            break
    measured = float(run.last_logits[tok] - clean.last_logits[tok])
    assert abs(d_logit) > 1e-3
    assert math.isclose(measured, d_logit * eps, rel_tol=2e-2, abs_tol=1e-6)
    for (wl, wp, wf), g in zip(watch, d_pre):
        m = float(run.pre[wl][wp, wf] - clean.pre[wl][wp, wf])
        assert math.isclose(m, g * eps, rel_tol=2e-2, abs_tol=1e-6)


# ---------------------------------------------------------------------- (c) free mode is an MLP-output patch
@pytest.mark.parametrize("pos", [None, 4])
def test_free_equals_decoder_patch_of_mlp_outputs(family, pos, tiny_on):
    model = tiny_on(family)
    tc = calibrated_transcoder(model)
    s = 1
    with torch.no_grad():
        clean = clean_run(model, tc, model.tokenize(PROMPT))
        f = int(clean.acts[s].sum(0).argmax())
        a = clean.acts[s][:, f]  # [T] current activation (upstream of layer s nothing changed)
        g = (f + 1) % tc.n_features  # a second feature, scaled at every position
        ivs = [Intervention(layer=s, pos=pos, feature=f, value=3.0),
                Intervention(layer=s, pos=None, feature=g, value=0.5, op="scale")]
        run = run_free(model, tc, clean.ids, ivs)
        d_f = (3.0 - a) if pos is None else torch.zeros_like(a).index_fill(
            0, torch.tensor([pos], device=a.device), 3.0 - a[pos])
        d_f[0] = 0  # BOS carries no features: "every position" means positions 1..T-1
        d_g = -0.5 * clean.acts[s][:, g]
        W = tc.W_dec[s].detach()  # [F, n_out, D]

        def patch(layer, mlp_in, mlp_out):
            if layer < s:
                return mlp_out
            k = layer - s
            return mlp_out + (d_f[:, None] * W[f, k] + d_g[:, None] * W[g, k])[None]

        ref = model.forward(clean.ids, mlp_hook=patch)
    torch.testing.assert_close(run.last_logits, ref.logits[0, -1], rtol=1e-5, atol=1e-5)
    for layer in range(s + 1, model.n_layers):  # later features are re-encoded from the live inputs
        torch.testing.assert_close(run.pre[layer], ref.mlp_in[layer][0] @ tc.W_enc[layer] + tc.b_enc[layer])


# ---------------------------------------------------------------------- (d) generation
@pytest.mark.parametrize("mode", ["free", "constrained"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_noop_equals_plain(llama, mode, temperature):
    model, tc = llama
    noop = [Intervention(layer=1, pos=None, feature=3, value=1.0, op="scale"),
            Intervention(layer=2, pos=3, feature=0, value=1.0, op="scale")]
    out = intervene_generate(model, tc, PROMPT, noop, n_tokens=6, mode=mode, temperature=temperature, seed=3)
    assert out.steered_ids == out.original_ids and len(out.original_ids) >= 3
    if temperature == 0.0:  # the original continuation is the HF model's own greedy generation
        ids = model.tokenize(PROMPT)
        hf = model.hf.generate(ids[None], max_new_tokens=6, do_sample=False, pad_token_id=258)
        assert hf[0, ids.numel():].tolist() == out.original_ids


def test_generation_steering_and_every_position_semantics(llama):
    model, tc = llama
    big = [Intervention(layer=2, pos=None, feature=1, value=40.0)]  # every position, generated tokens included
    out = intervene_generate(model, tc, PROMPT, big, n_tokens=5, mode="free")
    assert out.steered_ids != out.original_ids
    ids = model.tokenize(PROMPT)
    steered = torch.cat([ids, torch.tensor(out.steered_ids, device=ids.device)])
    with torch.no_grad():  # the last steered token is what the intervened model predicts after the others
        logits = run_free(model, tc, steered[:-1], big).last_logits
    assert int(logits.argmax()) == out.steered_ids[-1]


# ---------------------------------------------------------------------- API output
def test_intervene_api_is_jsonable_and_reports_changes(llama):
    import json

    model, tc = llama
    with torch.no_grad():
        clean = clean_run(model, tc, model.tokenize(PROMPT))
    f, p, a = active_feature(clean, 1)
    for mode in ("constrained", "free"):
        out = intervene(model, tc, PROMPT, [f"1:{f}@{p}=0"], mode=mode, n_watch=4, top=3)
        assert json.loads(out.to_json()) == out.to_dict()
        assert len(out.logits_before) == 3 and {"token", "id", "prob", "logit"} <= set(out.logits_before[0])
        assert out.interventions[0]["positions"][0]["act_before"] == pytest.approx(a)
        assert out.interventions[0]["positions"][0]["act_after"] == 0.0
        assert len(out.features) == 4 and all(r["layer"] > 1 and r["pos"] >= p for r in out.features)
        assert out.logits_before[0]["prob"] == pytest.approx(
            float(torch.softmax(clean.last_logits, -1).max()))
    held = intervene(model, tc, PROMPT, [f"1:{f}@{p}=0"], constrained_layers="all", watch=["3:0@-1"])
    assert held.constrained_layers == [0, 1, 2, 3] and held.features[0]["pos"] == clean.ids.numel() - 1
    # held layers keep their clean activations, only the pre-activation moves
    assert held.features[0]["act_after"] == held.features[0]["act_before"]


# ---------------------------------------------------------------------- (e) bad input
@pytest.mark.parametrize("spec,match", [
    (["9:0=1"], "layer 9 does not exist"),
    (["1:32=1"], "feature 32 does not exist"),
    (["1:-1=1"], "feature -1 does not exist"),
    (["1:0@99=1"], "position 99 is past the prompt"),
    (["1:0@-99=1"], "position -99 is past the prompt"),
    (["1:0=nan"], "not a finite number"),
    (["1:0=inf"], "not a finite number"),
    (["1:0=abc"], "not a number"),
    (["1:0"], "has no value"),
    (["layer1"], "cannot read"),
    ([{"layer": 1}], "cannot read intervention"),
    ([], "nothing to do"),
])
def test_bad_interventions(llama, spec, match):
    model, tc = llama
    with pytest.raises(CltraceError, match=match):
        intervene(model, tc, PROMPT, spec)


def test_bad_options(llama, tiny_on):
    model, tc = llama
    with pytest.raises(CltraceError, match="unknown mode"):
        intervene(model, tc, PROMPT, ["1:0=1"], mode="sideways")
    with pytest.raises(CltraceError, match="outside"):
        intervene(model, tc, PROMPT, ["1:0=1"], constrained_layers="2:9")
    with pytest.raises(CltraceError, match="cannot read layers"):
        intervene(model, tc, PROMPT, ["1:0=1"], constrained_layers="x:y")
    with pytest.raises(CltraceError, match="only applies"):
        intervene(model, tc, PROMPT, ["1:0=1"], mode="free", constrained_layers="all")
    with pytest.raises(CltraceError, match="watch 3:99"):
        intervene(model, tc, PROMPT, ["1:0=1"], watch=["3:99"])
    with pytest.raises(CltraceError, match="do not fit"):
        intervene(tiny_on("llama", n_layers=2), tc, PROMPT, ["1:0=1"])
    with pytest.raises(CltraceError, match="temperature"):
        intervene_generate(model, tc, PROMPT, ["1:0=1"], temperature=-1)


# ---------------------------------------------------------------------- (a) with the attribution graph's edges
def graph_effects(graph, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit change of feature node k's activation: the change of every row's value (feature
    pre-activations, then demeaned logits), (direct from edges, total along all paths of active features)."""
    nf = graph.n_features
    assert torch.equal(graph.rows[:nf], torch.arange(nf))  # feature rows first, in node order
    per_unit = graph.edges[:, :nf] / graph.activations  # [R, nf]: edge / source activation
    direct = per_unit[:, k]
    e = torch.zeros(nf, dtype=per_unit.dtype)
    e[k] = 1.0
    da = torch.linalg.solve(torch.eye(nf) - per_unit[:nf], e)  # linearized: Δa_t = Δpre_t for active t
    return direct, per_unit @ da


def measured_effects(graph, clean, run) -> torch.Tensor:
    """Change of every row's value between the clean pass and `run` (on the CPU, where the graph is)."""
    d_pre = torch.stack([run.pre[l][p, f] - clean.pre[l][p, f] for l, p, f in graph.features.tolist()])
    logits = run.last_logits - run.last_logits.mean() - (clean.last_logits - clean.last_logits.mean())
    return torch.cat([d_pre.cpu(), logits.cpu()[graph.logit_tokens]]).double()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_graph_edges_predict_constrained_interventions(family, tiny_on):
    from cltrace.attribution import attribute

    model = tiny_on(family)
    tc = calibrated_transcoder(model)
    graph = attribute(model, tc, PROMPT)
    with torch.no_grad():
        clean = clean_run(model, tc, graph.input_ids.to(model.device))
    k = int(((graph.features[:, 0] == 1) * graph.activations).argmax())  # the most active layer-1 feature
    layer, pos, f = graph.features[k].tolist()
    a = float(graph.activations[k])
    assert a == pytest.approx(float(clean.acts[layer][pos, f]), rel=1e-5)
    direct, total = graph_effects(graph, k)
    direct, total = direct.double(), total.double()
    scale = float(direct.abs().max())
    # every layer held: the frozen model is linear, so edge / a × Δa holds for any Δa
    for delta in (-a, 2.5):
        with torch.no_grad():
            run = run_constrained(model, tc, clean, [Intervention(layer=layer, pos=pos, feature=f, value=a + delta)],
                                  held=set(range(model.n_layers)))
        torch.testing.assert_close(measured_effects(graph, clean, run), direct * delta, rtol=1e-3, atol=1e-4 * scale)
    # all layers responding: the linearized model follows every path of the graph
    with torch.no_grad():
        lin = run_constrained(model, tc, clean, [Intervention(layer=layer, pos=pos, feature=f, value=a + 1.0)],
                              linear=True)
    torch.testing.assert_close(measured_effects(graph, clean, lin), total, rtol=1e-3, atol=1e-4 * scale)
    # ... and so does the real constrained model, for a change small enough to flip no feature
    eps = 1e-2 * a
    with torch.no_grad():
        run = run_constrained(model, tc, clean, [Intervention(layer=layer, pos=pos, feature=f, value=a + eps)])
    assert all(torch.equal(r != 0, c != 0) for r, c in zip(run.acts, clean.acts))
    torch.testing.assert_close(measured_effects(graph, clean, run), total * eps, rtol=2e-2, atol=2e-4 * scale * eps)
    # and autograd through the engine agrees with the graph for the top logit
    V = clean.last_logits.shape[-1]
    tok = int(graph.logit_tokens[0])
    demean = torch.full((V,), -1.0 / V, device=model.device)
    demean[tok] += 1.0
    d_direct, _ = first_order(model, tc, clean, layer, pos, f, logit=demean, held=set(range(model.n_layers)))
    d_total, _ = first_order(model, tc, clean, layer, pos, f, logit=demean)
    nf = graph.n_features
    assert d_direct == pytest.approx(float(direct[nf]), rel=1e-3, abs=1e-4 * scale)
    assert d_total == pytest.approx(float(total[nf]), rel=1e-3, abs=1e-4 * scale)


# ---------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory, device):
    """A tiny model folder, a transcoder folder and a graph file for the same prompt."""
    from cltrace.attribution import attribute
    from cltrace.models.registry import load_model
    from cltrace.models.tiny import save_tiny
    from cltrace.transcoders.io import save_transcoder

    d = tmp_path_factory.mktemp("iv")
    folder = str(save_tiny("llama", d / "tiny-llama"))
    model = load_model(folder, device=device)
    tc = calibrated_transcoder(model)
    save_transcoder(tc, d / "tc")
    graph = attribute(model, tc, PROMPT)
    graph.save(d / "g.safetensors")
    return folder, str(d / "tc"), str(d / "g.safetensors"), graph


# the CLI runs in this process: --device puts its model and transcoders on the test device
def test_cli_json(saved, capsys, device):
    import json

    from cltrace.cli import main
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder

    folder, tcdir, _, graph = saved
    model, tc = load_model(folder, device=device), load_transcoder(tcdir, device=device)
    # set a graph node to 0, double an active layer-2 feature everywhere, and zero a layer-3 feature active at the
    # last position after those two, so that each of the three changes the result
    layer, pos, f = graph.features[0].tolist()
    last = graph.n_pos - 1
    with torch.no_grad():
        clean = clean_run(model, tc, model.tokenize(PROMPT))
        for f2 in sorted({ff for ll, _, ff in graph.features.tolist() if ll == 2}):
            ivs = [Intervention(layer=layer, pos=pos, feature=f, value=0.0),
                   Intervention(layer=2, pos=None, feature=f2, value=2.0, op="scale")]
            two = run_constrained(model, tc, clean, ivs)
            if two.acts[3][last].any():
                break
        f3 = int(two.acts[3][last].argmax())
        ivs.append(Intervention(layer=3, pos=last, feature=f3, value=0.0))
        run = run_constrained(model, tc, clean, ivs)
    assert two.acts[3][last, f3] > 0 and run.acts[3][last, f3] == 0
    argv = ["--device", str(device), "-q", "intervene", PROMPT, "--model", folder, "--transcoders", tcdir,
            "--set", f"{layer}:{f}@{pos}=0", "--scale", f"2:{f2}=2", "--zero", f"3:{f3}@-1", "--json", "--top", "3"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"logits_before", "logits_after", "features", "interventions"} <= set(out)
    assert set(out["logits_after"][0]) >= {"token", "prob"} and len(out["logits_after"]) == 3
    # the distributions before and after are the clean and the constrained run of the same changes, run here
    after = torch.softmax(run.last_logits.float(), -1).topk(3)
    before = torch.softmax(clean.last_logits.float(), -1).topk(3)
    assert [r["id"] for r in out["logits_after"]] == after.indices.tolist()
    assert [r["prob"] for r in out["logits_after"]] == pytest.approx(after.values.tolist(), rel=1e-5)
    assert [r["prob"] for r in out["logits_before"]] == pytest.approx(before.values.tolist(), rel=1e-5)
    assert main(argv[:-3] + ["--generate", "4", "--temperature", "0.8", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "original:" in text and "steered:" in text and "top token" in text


def test_cli_graph_node(saved, capsys, device):
    import json

    from cltrace.cli import main

    folder, tcdir, gfile, graph = saved
    layer, pos, f = graph.features[int(graph.activations.argmax())].tolist()
    base = ["--device", str(device), "-q", "intervene", "--model", folder, "--transcoders", tcdir, "--graph", gfile]
    assert main(base + ["--node", f"{layer}_{f}_{pos}", "--constrained-layers", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == PROMPT and out["interventions"][0]["pos"] == pos
    # with every layer held, the graph's direct prediction is what happens
    for r in out["graph"]["logit_changes"]:
        assert r["measured"] == pytest.approx(r["predicted_direct"], rel=1e-3, abs=1e-5)
    for r in out["features"]:
        assert r["pre_after"] - r["pre_before"] == pytest.approx(r["pre_change_predicted_direct"], rel=1e-3, abs=1e-5)
    assert main(base + ["--node", f"{layer}_{f}_{pos}=1.5"]) == 0
    assert "graph-predicted" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--set", "1:0@99=1"], "past the prompt"),
    (["--set", "1:0=nan"], "not a finite number"),
    (["--zero", "1:0=3"], "takes no value"),
    (["--node", "1_0_2"], "give --graph"),
    (["--set", "3_err_2=0"], "only feature nodes"),
    (["--set", "1:0@0=1"], "start-of-text"),
])
def test_cli_errors_are_one_line(saved, capsys, device, argv, match):
    from cltrace.cli import main

    folder, tcdir, _, _ = saved
    assert main(["--device", str(device), "intervene", PROMPT, "--model", folder, "--transcoders", tcdir] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
