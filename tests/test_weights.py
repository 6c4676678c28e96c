"""Global weights (`features.weights`, `cltrace weights`) against plain computations written here: virtual
weights as loops of decoder-row · encoder-column dot products; ERA and TWERA from the activations of the same
tokens the feature database measured, recomputed by brute force (a tiny Llama with random CLT and PLT)."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.features import FeatureDB, build_features
from cltrace.features.weights import downstream_virtual, global_weights, upstream_virtual
from cltrace.models.tiny import tiny_model
from cltrace.replacement.calibrate import random_transcoder
from cltrace.transcoders import Transcoder, TranscoderConfig


def direct_virtual(tc, s: int, i: int, t: int, j: int) -> float:
    """Σ over the layers l where source (s, i) writes and target (t, j) reads (s ≤ l < t) of
    W_dec[s][i, l − s] · W_enc[t][:, j], written out: a CLT writes to s..L−1, a PLT to s only."""
    writes = range(s, tc.n_layers) if tc.cfg.kind == "clt" else [s]
    total = 0.0
    for layer in writes:
        if layer < t:  # the target reads the residual stream before its own layer's MLP adds its output
            row = tc.W_dec[s][i, layer - s].detach().double()
            col = tc.W_enc[t][:, j].detach().double()
            total += float(sum(row[d] * col[d] for d in range(tc.d_model)))
    return total


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_virtual_weights_equal_the_direct_sum(kind):
    torch.manual_seed(3)
    tc = Transcoder(TranscoderConfig(kind=kind, n_layers=4, d_model=6, n_features=5))
    L, F = 4, 5
    for t in range(L):
        for j in range(F):
            up = upstream_virtual(tc, t, j)
            assert up.shape == (t, F)
            want = torch.tensor([[direct_virtual(tc, s, i, t, j) for i in range(F)] for s in range(t)],
                                dtype=torch.float64).reshape(t, F)
            torch.testing.assert_close(up.double(), want, rtol=1e-5, atol=1e-6)
    for s in range(L):
        for i in range(F):
            down = downstream_virtual(tc, s, i)
            assert down.shape == (L - s - 1, F)
            want = torch.tensor([[direct_virtual(tc, s, i, t, j) for j in range(F)]
                                 for t in range(s + 1, L)], dtype=torch.float64).reshape(L - s - 1, F)
            torch.testing.assert_close(down.double(), want, rtol=1e-5, atol=1e-6)
    # the same pair seen from both ends
    torch.testing.assert_close(upstream_virtual(tc, 3, 2)[1, 4], downstream_virtual(tc, 1, 4)[1, 2])


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
def test_virtual_ranking_is_the_brute_force_top(direction):
    torch.manual_seed(5)
    tc = Transcoder(TranscoderConfig(kind="clt", n_layers=4, d_model=6, n_features=7))
    layer, f = (3, 2) if direction == "upstream" else (0, 4)
    others = [(s, i) for s in range(layer) for i in range(7)] if direction == "upstream" else \
        [(t, j) for t in range(layer + 1, 4) for j in range(7)]
    v = {o: (direct_virtual(tc, o[0], o[1], layer, f) if direction == "upstream"
             else direct_virtual(tc, layer, f, o[0], o[1])) for o in others}
    ranked = sorted(v, key=lambda o: -abs(v[o]))
    gw = global_weights(tc, layer, f, kind="virtual", direction=direction, top=5)
    assert [(r.layer, r.feature) for r in gw.rows] == ranked[:5]
    assert all(abs(r.value - v[(r.layer, r.feature)]) < 1e-5 for r in gw.rows)
    assert gw.rest_bound == pytest.approx(abs(v[ranked[5]]), rel=1e-5)
    assert gw.candidates == len(others)


T = 16
TEXT = "Fact: Michael Jordan plays the sport of basketball. The capital of France is Paris. 36+59=95. "
DOCS = [TEXT[i:i + T - 3] for i in range(0, 8 * (T - 3), T - 3)]
BUILD = dict(corpus=DOCS, n_tokens=8 * T, context_len=T, batch_size=2, top_k=2, window=(2, 1), n_ranges=2,
             per_range=1, progress=False, log=lambda msg: None)
NF = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module", params=["clt", "plt"])
def built(request, model, tmp_path_factory):
    """(tc, exact database, bounded database (M = 2), brute-force activations [N, L·F] at the measured tokens)."""
    tc = random_transcoder(model, request.param, n_features=NF, active_per_layer=24, seed=1)
    d = tmp_path_factory.mktemp(request.param)
    exact = build_features(model, tc, out=d / "exact.db", coactivation=10_000, **BUILD)
    bounded = build_features(model, tc, out=d / "bounded.db", coactivation=2, **BUILD)
    with sqlite3.connect(exact) as conn:
        ctxs = np.stack([np.frombuffer(r[0], dtype="<i4") for r in conn.execute("SELECT tokens FROM contexts "
                                                                                   "ORDER BY id")])
    acts = []
    with torch.no_grad():
        for k in range(0, len(ctxs), 2):
            ids = torch.tensor(ctxs[k:k + 2], dtype=torch.long)
            trace = model.forward(ids)
            reads = tc.select_input(trace.resid_mid, trace.mlp_in)
            keep = torch.tensor([[p > 0 and t not in (256, 257, 258) for p, t in enumerate(r)]
                                 for r in ids.tolist()])
            layers = [tc.activate(tc.pre_acts(reads[a].reshape(-1, model.d_model), a), a, training=False)
                      for a in range(tc.n_layers)]
            acts.append(torch.cat(layers, 1)[keep.reshape(-1)].double())
    a = torch.cat(acts).numpy()
    assert a.shape[0] == FeatureDB.open(exact).meta["coactivation"]["tokens"]
    return tc, exact, bounded, a


def brute(tc, a, layer, f, direction):
    """{other: (V, TWERA, ERA by the paper, ERA as the database estimates it)} over every pair that connects."""
    g = layer * NF + f
    out = {}
    others = range(layer * NF) if direction == "upstream" else range((layer + 1) * NF, tc.n_layers * NF)
    for o in others:
        i, j = (o, g) if direction == "upstream" else (g, o)
        ai, aj = a[:, i], a[:, j]
        V = direct_virtual(tc, i // NF, i % NF, j // NF, j % NF)
        twera = V * (ai * aj).mean() / aj.mean() if aj.mean() > 0 else 0.0
        era = V * (ai * (aj > 0)).mean()
        mean_i = ai[ai > 0].mean() if (ai > 0).any() else 0.0
        era_est = V * ((ai > 0) & (aj > 0)).mean() * mean_i
        theta = float(tc.threshold[j // NF, j % NF].detach())  # a_j > θ_j: E[1(a_j > 0) a_i] ≤ E[a_i a_j] / θ_j
        era_bound = abs(V) * min((ai * aj).mean() / theta, ai.mean())
        era_est = np.sign(era_est) * min(abs(era_est), era_bound)  # the estimate, clipped to the bound on the truth
        out[(o // NF, o % NF)] = (V, twera, era, era_est)
    return out


def busiest(a, tc):
    """A target in a middle layer and a source in an early one, both firing often."""
    freq = (a > 0).mean(0).reshape(tc.n_layers, NF)
    mid = tc.n_layers // 2
    return (mid, int(freq[mid].argmax())), (0, int(freq[0].argmax()))


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
def test_twera_and_era_equal_the_brute_force_formulas(built, direction):
    tc, exact, _, a = built
    target, source = busiest(a, tc)
    layer, f = target if direction == "upstream" else source
    want = brute(tc, a, layer, f, direction)
    with FeatureDB.open(exact) as db:
        assert not any(db.coactivation(la, fe).error for la in range(tc.n_layers) for fe in range(NF))
        for kind, col in (("twera", 1), ("era", 3)):
            gw = global_weights(tc, layer, f, db, kind=kind, direction=direction, top=1000)
            nonzero = {o for o, w in want.items() if abs(w[col]) > 0}
            assert {(r.layer, r.feature) for r in gw.rows} == nonzero and len(nonzero) > 3
            for r in gw.rows:
                assert r.value == pytest.approx(want[(r.layer, r.feature)][col], rel=1e-4, abs=1e-9)
                assert r.virtual == pytest.approx(want[(r.layer, r.feature)][0], rel=1e-4, abs=1e-7)
            assert [abs(r.value) for r in gw.rows] == sorted((abs(r.value) for r in gw.rows), reverse=True)
            assert gw.rest_bound == 0.0  # an exact summary: every pair not listed never co-fired
            # top selection: the brute-force top 3 by |value| (ties are measure-zero with random weights)
            top = global_weights(tc, layer, f, db, kind=kind, direction=direction, top=3)
            assert [(r.layer, r.feature) for r in top.rows] == sorted(nonzero, key=lambda o: -abs(want[o][col]))[:3]
            assert top.rest_bound >= max(abs(want[o][col]) for o in nonzero - {(r.layer, r.feature)
                                                                              for r in top.rows})
            for r in gw.rows:  # the paper's ERA, which the database can only estimate, is inside the bound
                assert abs(want[(r.layer, r.feature)][2 if kind == "era" else col]) <= r.bound * (1 + 1e-4)


@pytest.mark.parametrize("kind", ["twera", "era"])
def test_bounded_summary_bounds_every_pair(built, kind):
    tc, _, bounded, a = built
    with FeatureDB.open(bounded) as db:
        assert sum(db.coactivation(la, fe).error > 0 for la in range(tc.n_layers) for fe in range(NF)) > NF
        for direction in ("upstream", "downstream"):
            target, source = busiest(a, tc)
            layer, f = target if direction == "upstream" else source
            want = brute(tc, a, layer, f, direction)
            col = 1 if kind == "twera" else 2
            gw = global_weights(tc, layer, f, db, kind=kind, direction=direction, top=2)
            listed = {(r.layer, r.feature): r for r in gw.rows}
            for o, w in want.items():
                if o in listed:
                    assert abs(w[col]) <= listed[o].bound * (1 + 1e-4) + 1e-12
                    if kind == "twera":  # a kept E[a_i a_j] is never above the true one
                        assert abs(listed[o].value) <= abs(w[col]) * (1 + 1e-4) + 1e-12
                else:
                    assert abs(w[col]) <= gw.rest_bound * (1 + 1e-4) + 1e-12


@pytest.mark.parametrize("kind", ["twera", "era"])
def test_planted_statistics_give_the_formulas(built, kind, tmp_path):
    """A database whose co-activation tables are written by hand: E[a_j] = 0.2 · 1.5, E[a_i a_j], counts and
    summary errors drawn at random; every pair's value and bound equal the formulas written here."""
    tc, exact, _, _ = built
    path = tmp_path / "planted.db"
    shutil.copy(exact, path)
    t, j = tc.n_layers - 1, 3
    rng = np.random.default_rng(7)
    kept, err = {}, {}
    with sqlite3.connect(path) as c:
        c.execute("DELETE FROM coactivation")
        c.execute("DELETE FROM coactivation_sources")
        c.execute("UPDATE features SET frequency = 0.2, mean_act = 1.5 WHERE layer = ? AND feature = ?", (t, j))
        for s in range(t):
            for i in range(NF):
                if rng.random() < 0.6:
                    kept[(s, i)] = (float(rng.uniform(0.01, 0.5)), int(rng.integers(1, 60)))
                    c.execute("INSERT INTO coactivation VALUES (?, ?, ?, ?, ?, ?)", (s, i, t, j, *kept[(s, i)]))
                err[(s, i)] = float(rng.uniform(0, 0.05))
                c.execute("INSERT INTO coactivation_sources VALUES (?, ?, 1.0, ?)", (s, i, err[(s, i)]))
        stats = {(a, f): (fr, m, mx) for a, f, fr, m, mx in c.execute("SELECT layer, feature, frequency, mean_act, "
                                                                       "max_act FROM features")}
    with FeatureDB.open(path) as db:
        n = db.meta["coactivation"]["tokens"]
        gw = global_weights(tc, t, j, db, kind=kind, top=1000)
    theta = float(tc.threshold[t, j].detach())
    want, clipped = {}, 0
    for (s, i), e in err.items():
        V = direct_virtual(tc, s, i, t, j)
        mp, cnt = kept.get((s, i), (0.0, 0))
        freq_i, mean_i, max_i = stats[(s, i)]
        if kind == "twera":
            est, bound = V * mp / (0.2 * 1.5), abs(V) * min((mp + e) / (0.2 * 1.5), max_i)
        else:
            est, bound = V * cnt / n * mean_i, abs(V) * min((mp + e) / theta, freq_i * mean_i)
        clipped += abs(est) > bound
        want[(s, i)] = (float(np.sign(est)) * min(abs(est), bound), bound)
    assert clipped > 0  # the planted numbers exercise the clipping of estimates beyond the bound
    got = {(r.layer, r.feature): (r.value, r.bound) for r in gw.rows}
    assert set(got) == set(kept)  # every kept pair is ranked (top = 1000)
    for o, (value, bound) in got.items():
        assert value == pytest.approx(want[o][0], rel=1e-4, abs=1e-12)  # V in float32
        assert bound == pytest.approx(want[o][1], rel=1e-4, abs=1e-12)
    assert gw.rest_bound == pytest.approx(max(b for o, (_, b) in want.items() if o not in got), rel=1e-4)


def test_labels_and_errors(built, model, tmp_path):
    tc, exact, _, _ = built
    with FeatureDB.open(exact) as db:
        db.set_label(0, 1, "a planted label")
        gw = global_weights(tc, 2, 3, db, kind="virtual", top=100)
        row = next(r for r in gw.rows if (r.layer, r.feature) == (0, 1))
        assert row.label == "a planted label" and row.label_source == "human"
        assert gw.label == db.label(2, 3)
        db.set_label(0, 1, "")
    with pytest.raises(CltraceError, match="not in these transcoders"):
        global_weights(tc, tc.n_layers, 0)
    with pytest.raises(CltraceError, match="--coactivation"):
        global_weights(tc, 1, 0, kind="twera")
    plain = build_features(model, tc, out=tmp_path / "plain.db", **BUILD)
    with pytest.raises(CltraceError, match="--coactivation"):
        global_weights(tc, 1, 0, plain, kind="era")
    other = random_transcoder(model, tc.cfg.kind, n_features=NF, active_per_layer=24, seed=2)
    with pytest.raises(CltraceError, match="other transcoders"):
        global_weights(other, 1, 0, exact)
    assert global_weights(tc, 0, 0, exact, kind="twera").rows == []  # layer 0 reads no earlier feature


def test_cli_prints_the_api_rows(built, tmp_path, capsys):
    from cltrace.cli import main
    from cltrace.transcoders.io import save_transcoder

    tc, exact, _, a = built
    save_transcoder(tc, tmp_path / "tc")
    layer, f = busiest(a, tc)[0]
    args = ["-q", "--device", "cpu", "weights", f"{layer}:{f}", "-t", str(tmp_path / "tc"), "--db", str(exact)]
    assert main(args + ["--kind", "twera", "--top", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with FeatureDB.open(exact) as db:
        want = global_weights(tc, layer, f, db, kind="twera", top=4).to_dict()
    assert [(r["id"], r["label"]) for r in got["rows"]] == [(r["id"], r["label"]) for r in want["rows"]]
    assert [r["value"] for r in got["rows"]] == pytest.approx([r["value"] for r in want["rows"]], rel=1e-6)
    assert main(args + ["--kind", "era", "--downstream"]) == 0
    text = capsys.readouterr().out
    assert "ERA" in text and f"{layer}:{f}" in text
    assert main(args[:4] + [f"{tc.n_layers}:0", "-t", str(tmp_path / "tc")]) == 2
    assert "not in these transcoders" in capsys.readouterr().err
    assert main(args[:4] + ["x", "-t", str(tmp_path / "tc")]) == 2
    assert "LAYER:FEATURE" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_lazy_transcoder_gives_the_same_virtual_weights(kind, tmp_path):
    """A transcoder kept on disk (`load_transcoder(lazy=True)`) reads W_enc / W_dec through its store: the
    virtual weights must be those of the same file loaded eagerly (the same weights; the matmuls may round
    differently on differently aligned buffers, so to float32 rounding)."""
    from cltrace.transcoders.io import load_transcoder, save_transcoder

    torch.manual_seed(int.from_bytes(__import__("os").urandom(2), "little"))
    save_transcoder(Transcoder(TranscoderConfig(kind=kind, n_layers=4, d_model=6, n_features=5)), tmp_path / "tc")
    eager, lazy = load_transcoder(tmp_path / "tc", lazy=False), load_transcoder(tmp_path / "tc", lazy=True)
    assert lazy.lazy and not eager.lazy
    for layer in range(4):
        for feature in (0, 4):
            for fn in (upstream_virtual, downstream_virtual):
                torch.testing.assert_close(fn(lazy, layer, feature), fn(eager, layer, feature), rtol=1e-5, atol=1e-7)
