"""`cltrace validate`: every number it reports against an independent brute-force computation in this file.

One validation run (a random CLT against a random PLT on a tiny Llama, three prompts, whole graphs) is shared
by the tests; each test recomputes what the run stored in its own way: scores from the dense (I − Â)⁻¹,
perturbation effects by patching the model's own forward pass, rank correlations by counting, path lengths by
enumerating paths. Resumption, bad input and the command line are checked at the end.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import cltrace
from cltrace.attribution import attribute, prune
from cltrace.attribution.graph import Graph
from cltrace.errors import CltraceError
from cltrace.interventions import Intervention, clean_run, run_constrained
from cltrace.replacement import random_transcoder
from cltrace.validation import PROMPTS, Settings, load_prompts, validate
from cltrace.validation.graph_measures import path_length
from cltrace.validation.perturb import run_live
from cltrace.validation.stats import spearman
from cltrace.validation.summary import MEASURES

TEXTS = ["the cat sat", "one two", "a b c d"]
SETTINGS = Settings(max_features=None, sources=3, targets=6, seed=3)


@pytest.fixture(scope="module")
def setup(tiny_on, tmp_path_factory):
    model = tiny_on("llama")
    clt = random_transcoder(model, "clt", n_features=24, active_per_layer=14, prompt=TEXTS[0])
    plt = random_transcoder(model, "plt", n_features=24, active_per_layer=14, prompt=TEXTS[0], seed=1)
    out = tmp_path_factory.mktemp("val") / "run"
    res = validate(model, clt, TEXTS, out=out, compare=plt, settings=SETTINGS, progress=False)
    return model, {"clt": clt, "plt": plt}, out, res


def stored(out, label: str) -> list[dict]:
    files = sorted((out / label / "prompts").glob("*.json"))
    return [json.loads(f.read_text()) for f in files]


# ---------------------------------------------------------------------- scores and pruning
def dense_scores(g: Graph, dropped: torch.Tensor | None = None) -> tuple[float, float]:
    """The paper's formulas on the dense N×N matrix: B = (I − Â)⁻¹ − I, influence = wᵀB."""
    A = g.adjacency().double().abs()
    kinds = g.kinds()
    is_err = kinds == 1
    if dropped is not None:  # pruned features become error nodes: their inputs are cut
        A[dropped] = 0
        is_err = is_err | dropped
    s = A.sum(1, keepdim=True)
    Ahat = torch.where(s > 0, A / s.clamp_min(1e-300), torch.zeros_like(A))
    N = A.shape[0]
    B = torch.linalg.inv(torch.eye(N, dtype=torch.float64) - Ahat) - torch.eye(N, dtype=torch.float64)
    w = g.logit_weights().double()
    inf = w @ B
    tok, err = inf[kinds == 2].sum(), inf[is_err].sum()
    non_err = 1 - Ahat[:, is_err].sum(1)
    non_err[s[:, 0] == 0] = 1
    return float(tok / (tok + err)), float((non_err * (inf + w)).sum() / (inf + w).sum())


def test_scores_and_pruning_curve_match_the_dense_formula(setup):
    model, tcs, out, _ = setup
    for label, tc in tcs.items():
        for r in stored(out, label):
            g = attribute(model, tc, torch.tensor(r["ids"], device=model.device))
            r0, c0 = dense_scores(g)
            assert r["replacement"] == pytest.approx(r0, abs=1e-5) and r["completeness"] == pytest.approx(c0, abs=1e-5)
            pr = prune(g, 0.8, 0.98)
            r1, c1 = dense_scores(g, (g.kinds() == 0) & ~pr.node_mask)
            assert r["replacement_pruned"] == pytest.approx(r1, abs=1e-5)
            assert r["completeness_pruned"] == pytest.approx(c1, abs=1e-5)
            assert r["n_features"] == g.n_features and 0 < r["n_features_pruned"] < g.n_features
            for row in r["pruning_curve"]:
                pr = prune(g, row["node_threshold"], 0.98)
                kept = (g.kinds() == 0) & pr.node_mask
                assert row["n_features"] == int(kept.sum())
                assert (row["replacement"], row["completeness"]) == pytest.approx(
                    dense_scores(g, (g.kinds() == 0) & ~pr.node_mask), abs=1e-5)
            sizes = [row["n_features"] for row in r["pruning_curve"]]
            assert sizes == sorted(sizes)  # a higher threshold keeps at least as many features


# ---------------------------------------------------------------------- path length
def test_path_length_equals_path_enumeration():
    """A random DAG as a Graph: enumerate every path token -> ... -> logit and average lengths by weight."""
    gen = torch.Generator().manual_seed(0)
    L, T, n_f, n_l = 3, 3, 5, 2
    feats = torch.tensor([[0, 1, 0], [0, 2, 1], [1, 1, 2], [1, 2, 0], [2, 2, 1]])
    N = n_f + (L + 1) * T + n_l
    rows = torch.cat([torch.arange(n_f), torch.arange(N - n_l, N)])
    E = torch.randn(len(rows), N, generator=gen)  # logits read every node
    E[:n_f, :n_f] = torch.tril(E[:n_f, :n_f], -1)  # features read only earlier features: a DAG
    E[:, N - n_l:] = 0  # nothing reads a logit
    g = Graph("x", torch.arange(T), ["a"] * T, L, feats, torch.rand(n_f, generator=gen) + 0.5, torch.arange(n_l),
              ["a", "b"], torch.tensor([0.7, 0.3]), rows, E, torch.zeros(len(rows)), torch.zeros(len(rows)))
    A = g.adjacency().abs()
    Ahat = A / A.sum(1, keepdim=True).clamp_min(1e-30)
    kinds, w = g.kinds(), g.logit_weights()

    num = den = 0.0

    def walk(node: int, weight: float, length: int) -> None:
        nonlocal num, den
        if kinds[node] == 2:
            num, den = num + weight * length, den + weight
        for src in Ahat[node].nonzero().flatten().tolist():
            walk(src, weight * float(Ahat[node, src]), length + 1)

    for i in range(n_l):
        walk(g.logit_index(i), float(w[g.logit_index(i)]), 0)
    assert path_length(g) == pytest.approx(num / den, rel=1e-5)
    assert 1 < path_length(g) < n_f + 1


# ---------------------------------------------------------------------- perturbations
def steered_forward(model, tc, ids, source, frozen=None, clean_out=None):
    """The model's own forward with source (layer, pos, feature) removed from the MLP outputs it writes to:
    −a · W_dec[s][f, t − s] at pos added to MLP t. frozen + clean_out: attention/norms frozen and every MLP at
    its clean output (nothing else responds): the direct effect. Returns the trace."""
    s, p, f = source
    x = model.forward(ids).mlp_in[s][0, p]
    a = tc.activate(tc.pre_acts(x[None], s), s, training=False)[0, f]
    W = tc.W_dec[s][f].detach()  # [n_out, D]

    def hook(layer, mlp_in, mlp_out):
        base = clean_out[layer] if clean_out is not None else mlp_out
        if s <= layer < s + W.shape[0]:
            base = base.clone()
            base[0, p] = base[0, p] - a * W[layer - s]
        return base

    return model.forward(ids, mlp_hook=hook, frozen=frozen), float(a)


def pre_of(tc, trace, target) -> float:
    layer, pos, f = target
    return float(tc.pre_acts(trace.mlp_in[layer][0, pos][None], layer)[0, f])


@torch.no_grad()
def test_perturbation_effects_match_brute_force(setup):
    """held (frozen, nothing responds) = −edge = brute force; real = brute-force patch of the model's MLPs."""
    model, tcs, out, _ = setup
    n_pairs = 0
    for label, tc in tcs.items():
        for r in stored(out, label):
            ids = torch.tensor(r["ids"], device=model.device)
            clean = model.forward(ids)
            base = {t: pre_of(tc, clean, t) for p in r["perturbations"] for t in map(tuple, p["targets"])}
            for p in r["perturbations"]:
                src = tuple(p["source"])
                held, a = steered_forward(model, tc, ids, src, frozen=clean.frozen, clean_out=clean.mlp_out)
                real, _ = steered_forward(model, tc, ids, src)
                assert a == pytest.approx(p["activation"], rel=1e-5)
                scale = max(abs(v) for v in p["pred_direct"]) + 1e-6
                for i, t in enumerate(map(tuple, p["targets"])):
                    d_held, d_real = pre_of(tc, held, t) - base[t], pre_of(tc, real, t) - base[t]
                    assert p["held"][i] == pytest.approx(d_held, abs=1e-4 * scale)
                    assert p["pred_direct"][i] == pytest.approx(d_held, abs=1e-4 * scale)  # the edge is exact
                    assert p["real"][i] == pytest.approx(d_real, abs=1e-4 * (abs(d_real) + scale))
                    n_pairs += 1
    assert n_pairs >= 20


def test_total_effect_and_influence_match_dense_inverses(setup):
    model, tcs, out, _ = setup
    for label, tc in tcs.items():
        for r in stored(out, label):
            g = attribute(model, tc, torch.tensor(r["ids"], device=model.device))
            A = g.adjacency().double()
            nf = g.n_features
            index = {tuple(f): i for i, f in enumerate(g.features.tolist())}
            absA = A.abs()
            Ahat = absA / absA.sum(1, keepdim=True).clamp_min(1e-300)
            eye = torch.eye(A.shape[0], dtype=torch.float64)
            B = torch.linalg.inv(eye - Ahat) - eye
            for p in r["perturbations"]:
                s = index[tuple(p["source"])]
                M = A[:nf, :nf] / g.activations.double()[None, :]
                M[s] = 0  # the source is held at 0
                da = torch.linalg.inv(torch.eye(nf, dtype=torch.float64) - M) @ \
                    (-g.activations.double()[s] * torch.eye(nf, dtype=torch.float64)[:, s])
                for i, t in enumerate(map(tuple, p["targets"])):
                    assert p["pred_total"][i] == pytest.approx(float(da[index[t]]), abs=1e-6)
                    assert p["pred_influence"][i] == pytest.approx(float(B[index[t], s]), abs=1e-6)
                    assert p["pred_direct"][i] == pytest.approx(-float(A[index[t], s]), abs=1e-6)


def ranks_by_counting(x: list[float]) -> list[float]:
    return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]


def spearman_by_counting(x: list[float], y: list[float]) -> float:
    rx, ry = ranks_by_counting(x), ranks_by_counting(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_rank_correlations_match_direct_computation(setup):
    _, tcs, out, res = setup
    assert spearman([1, 2, 2, 3, 5], [2, 1, 4, 4, 9]) == pytest.approx(
        spearman_by_counting([1, 2, 2, 3, 5], [2, 1, 4, 4, 9]))
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    for label in tcs:
        rs = stored(out, label)
        col = {k: [v for r in rs for p in r["perturbations"] for v in p[k]] for k in ("held", "frozen", "live", "real")}
        pred = {k: [v for r in rs for p in r["perturbations"] for v in p[f"pred_{k}"]]
                for k in ("direct", "total", "influence")}
        rho = res["summaries"][label]["faithfulness"]["spearman"]
        for m in MEASURES:
            assert rho["direct"][m] == pytest.approx(spearman_by_counting(pred["direct"], col[m]), abs=1e-9)
            assert rho["total"][m] == pytest.approx(spearman_by_counting(pred["total"], col[m]), abs=1e-9)
            assert rho["influence"][m] == pytest.approx(
                spearman_by_counting(pred["influence"], [abs(v) for v in col[m]]), abs=1e-9)
        assert rho["direct"]["held"] == pytest.approx(1.0, abs=1e-6)  # the edges are the direct effects


@torch.no_grad()
def test_drift_matches_direct_computation(setup):
    """cosine and NMSE of the (a) frozen run's residual effect against the brute-force real model's."""
    model, tcs, out, _ = setup
    tc = tcs["clt"]
    r = stored(out, "clt")[0]
    ids = torch.tensor(r["ids"], device=model.device)
    clean_trace = model.forward(ids)
    clean = clean_run(model, tc, ids)
    for p in r["perturbations"]:
        s, pos, f = p["source"]
        real, _ = steered_forward(model, tc, ids, (s, pos, f))
        frozen = run_constrained(model, tc, clean, [Intervention(layer=s, pos=pos, feature=f, value=0.0)])
        d = p["drift_frozen"]
        assert len(d["cosine"]) == max(0, model.n_layers - s - 2)
        for k, (c, e) in enumerate(zip(d["cosine"], d["nmse"]), start=1):
            t = s + k + 1
            dr = (frozen.resid_mid[t][pos:] - clean_trace.resid_mid[t][0, pos:]).flatten().double()
            dm = (real.resid_mid[t][0, pos:] - clean_trace.resid_mid[t][0, pos:]).flatten().double()
            assert c == pytest.approx(float(dr @ dm / (dr.norm() * dm.norm())), abs=1e-5)
            assert e == pytest.approx(float(((dr - dm) ** 2).sum() / (dm ** 2).sum()), rel=1e-4, abs=1e-7)


@torch.no_grad()
def test_live_replacement_noop_and_next_token_agreement(setup):
    """No change: the live replacement is the model. Without errors it is the spliced model (features
    re-encoded from the spliced stream), which the test writes out directly."""
    model, tcs, out, res = setup
    for label, tc in tcs.items():
        for r in stored(out, label):
            ids = torch.tensor(r["ids"], device=model.device)
            clean = clean_run(model, tc, ids)
            ref = model.forward(ids)
            torch.testing.assert_close(run_live(model, tc, clean, []).last_logits, ref.logits[0, -1],
                                       rtol=1e-5, atol=1e-5)
            pending = torch.zeros(model.n_layers, ids.numel(), model.d_model, device=model.device)

            def splice(layer, mlp_in, mlp_out, tc=tc, pending=pending):
                a = tc.activate(tc.pre_acts(mlp_in[0], layer), layer, training=False)  # [T, F]
                for j in range(tc.n_out(layer)):
                    pending[layer + j] += a @ tc.W_dec[layer][:, j]
                out = pending[layer] + tc.b_dec[layer]
                out[0] = mlp_out[0, 0]  # BOS keeps its true output
                return out[None]

            spliced = model.forward(ids, mlp_hook=splice).logits[0, -1]
            glob = run_live(model, tc, clean, [], errors=False).last_logits
            torch.testing.assert_close(glob, spliced, rtol=1e-4, atol=1e-4)
            assert r["next_token"]["replacement"] == int(spliced.argmax())
            assert r["next_token"]["agree"] == (int(spliced.argmax()) == int(ref.logits[0, -1].argmax()))
        agree = [r["next_token"]["agree"] for r in stored(out, label)]
        assert res["summaries"][label]["next_token_agreement"] == pytest.approx(sum(agree) / len(agree))


# ---------------------------------------------------------------------- outputs, resumption, errors
def test_outputs_are_written(setup):
    _, _, out, res = setup
    assert res["complete"] and res["computed"] == {"clt": 3, "plt": 3}
    for name in ("validation.json", "report.md", "scores.png", "pruning.png", "faithfulness.png", "drift.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "validation.json").read_text())["summaries"]
    assert set(summary) == {"clt", "plt"} and summary["clt"]["n_prompts"] == 3
    report = (out / "report.md").read_text()
    assert "Spearman" in report and "| replacement |" in report and "plt" in report


def test_resume_equals_one_uninterrupted_run(setup, tmp_path):
    model, tcs, out, res = setup
    part = validate(model, tcs["clt"], TEXTS, out=tmp_path, settings=SETTINGS, progress=False, stop_after=1)
    assert not part["complete"] and part["computed"] == {"clt": 1}
    assert len(list((tmp_path / "clt" / "prompts").glob("*.json"))) == 1
    again = validate(model, tcs["clt"], TEXTS, out=tmp_path, settings=SETTINGS, progress=False)
    assert again["computed"] == {"clt": 2}
    assert validate(model, tcs["clt"], TEXTS, out=tmp_path, settings=SETTINGS, progress=False)["computed"] == {"clt": 0}

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert strip(stored(tmp_path, "clt")) == strip(stored(out, "clt"))
    a, b = again["summaries"]["clt"], res["summaries"]["clt"]
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_bad_input_is_one_clear_error(setup, tmp_path):
    model, tcs, _, _ = setup
    tc = tcs["clt"]
    cases = [
        dict(prompts=str(tmp_path / "missing.txt")),
        dict(prompts=[]),
        dict(prompts=TEXTS, n=0),
        dict(prompts=TEXTS, settings=Settings(node_threshold=1.5)),
        dict(prompts=TEXTS, settings=Settings(targets=0)),
        dict(prompts=["   "]),
    ]
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    cases += [dict(prompts=str(tmp_path / "empty.txt")), dict(prompts=str(tmp_path / "bad.jsonl"))]
    for kw in cases:
        with pytest.raises(CltraceError) as e:
            validate(model, tc, out=tmp_path / "o", progress=False, **kw)
        assert "\n" not in str(e.value), kw
    (tmp_path / "file").write_text("x")
    with pytest.raises(CltraceError, match="is a file"):
        validate(model, tc, TEXTS[:1], out=tmp_path / "file", progress=False)
    validate(model, tc, TEXTS[:1], out=tmp_path / "s", settings=Settings(sources=1, targets=2), progress=False)
    with pytest.raises(CltraceError, match="other settings"):  # never mixes results of other settings
        validate(model, tc, TEXTS[:1], out=tmp_path / "s", settings=Settings(sources=2, targets=2), progress=False)
    with pytest.raises(CltraceError, match="other settings"):  # nor of other weights
        other = random_transcoder(model, "clt", n_features=24, active_per_layer=14, prompt=TEXTS[0], seed=5)
        validate(model, other, TEXTS[:1], out=tmp_path / "s", settings=Settings(sources=1, targets=2), progress=False)


def test_prompt_sources(setup, tmp_path):
    model = setup[0]
    assert len(PROMPTS) >= 50 and len(set(PROMPTS)) == len(PROMPTS)
    assert [p.text for p in load_prompts(model, n=5)] == list(PROMPTS[:5])
    (tmp_path / "p.txt").write_text("# comment\nfirst one\n\ndef f():\\n    return\n")
    got = load_prompts(model, tmp_path / "p.txt")
    assert [p.text for p in got] == ["first one", "def f():\n    return"]
    assert list(got[0].ids) == model.tokenize("first one").tolist()
    (tmp_path / "p.jsonl").write_text('{"prompt": "x y"}\n"z w"\n')
    assert [p.text for p in load_prompts(model, tmp_path / "p.jsonl")] == ["x y", "z w"]
    ctx = load_prompts(model, corpus="small", n=3, context_len=8)
    assert len(ctx) == 3 and all(len(p.ids) == 8 and p.ids[0] == model.bos_token_id for p in ctx)


def test_cli_runs_resumes_and_fails_in_one_line(tmp_path, capsys):
    from cltrace.cli import main
    from cltrace.models.tiny import save_tiny
    from cltrace.transcoders.io import save_transcoder

    folder = save_tiny("llama", tmp_path / "tiny")
    model = cltrace.load_model(str(folder))
    save_transcoder(random_transcoder(model, "plt", n_features=16, active_per_layer=8, prompt="ab cd"),
                    tmp_path / "plt")
    (tmp_path / "p.txt").write_text("ab cd\nef gh\n")
    args = ["-q", "validate", "-m", str(folder), "-t", str(tmp_path / "plt"), "--prompts", str(tmp_path / "p.txt"),
            "--out", str(tmp_path / "out"), "--sources", "2", "--targets", "3", "--max-features", "0"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "plt" / "prompts").glob("*.json"))) == 2
    mtimes = {f: f.stat().st_mtime_ns for f in (tmp_path / "out" / "plt" / "prompts").glob("*.json")}
    assert main(args) == 0  # resumed: nothing recomputed
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes
    capsys.readouterr()
    bad = args[:]
    bad[bad.index(str(tmp_path / "p.txt"))] = str(tmp_path / "nope.txt")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cltrace: error:") and "nope.txt" in err and len(err.splitlines()) == 1


def test_pairs_are_downstream_and_deterministic(setup):
    """Targets sit at a later layer and the same or a later position; a per-prompt seed picks the same pairs."""
    _, _, out, _ = setup
    for r in stored(out, "clt"):
        assert 1 <= len(r["perturbations"]) <= SETTINGS.sources
        for p in r["perturbations"]:
            s = p["source"]
            assert 1 <= len(p["targets"]) <= SETTINGS.targets
            assert all(t[0] > s[0] and t[1] >= s[1] for t in p["targets"])
            assert len({tuple(t) for t in p["targets"]}) == len(p["targets"])
