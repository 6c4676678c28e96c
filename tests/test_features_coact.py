"""Co-activation statistics (`features.stats.CoactStats`, `build_features(coactivation=M)`) against brute force:
synthetic sparse activations for the summary's guarantees, a tiny Llama with a random CLT for the database."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.features import CoactStats, FeatureDB, build_features
from cltrace.features.db import database_contents
from cltrace.models.tiny import tiny_model
from cltrace.replacement.calibrate import random_transcoder

L, F = 3, 6


def synthetic(n: int, seed: int, p: float = 0.35) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, F, generator=g) * (torch.rand(n, F, generator=g) < p) for _ in range(L)]


def brute(batches: list[list[torch.Tensor]]) -> tuple[dict, dict]:
    """{(i, j): (Σ a_i a_j, count)} over pairs with layer(j) ≥ layer(i), j ≠ i; {i: Σ over its pairs}."""
    a = torch.cat([torch.cat(b, 1) for b in batches]).double().numpy()  # [N, L·F], global id = layer·F + f
    pairs, total = {}, {}
    for i in range(L * F):
        for j in range(L * F):
            if j == i or j // F < i // F:
                continue
            prod = a[:, i] * a[:, j]
            if (prod > 0).any():
                pairs[(i, j)] = (prod.sum(), int((prod > 0).sum()))
                total[i] = total.get(i, 0.0) + prod.sum()
    return pairs, total


def kept(c: CoactStats) -> dict:
    return {(i, int(c.partner[i, m])): (float(c.sum[i, m]), int(c.count[i, m]))
            for i in range(c.G) for m in range(c.M) if c.partner[i, m] >= 0}


@pytest.mark.parametrize("max_pairs", [1 << 24, 7])
def test_exact_when_every_partner_fits(max_pairs):
    batches = [synthetic(9, seed) for seed in range(4)]
    c = CoactStats(L, F, top_m=L * F, max_pairs=max_pairs)
    for b in batches:
        c.update(b)
    pairs, total = brute(batches)
    got = kept(c)
    assert set(got) == set(pairs) and len(pairs) > 100
    for key, (s, n) in pairs.items():
        assert got[key][0] == pytest.approx(s, rel=1e-12) and got[key][1] == n
    assert c.tokens == 36 and float(c.error.abs().max()) == 0.0
    assert c.total.numpy() == pytest.approx([total.get(i, 0.0) for i in range(L * F)], rel=1e-12)
    for i in range(c.G):  # each row sorted by sum, largest first, empty slots last
        row = [float(x) for x, p in zip(c.sum[i], c.partner[i]) if p >= 0]
        assert row == sorted(row, reverse=True) and (c.partner[i, len(row):] == -1).all()


def test_bounded_summary_keeps_its_guarantees():
    batches = [synthetic(12, 10 + seed, p=0.5) for seed in range(6)]
    M = 3
    c = CoactStats(L, F, top_m=M)
    for b in batches:
        c.update(b)
    pairs, total = brute(batches)
    got = kept(c)
    err = c.error.numpy()
    assert (err > 0).sum() > L * F // 2  # the summary had to drop partners
    tol = 1e-9
    for (i, j), (s, _) in pairs.items():
        k = got.get((i, j), (0.0, 0))[0]
        assert k - tol <= s <= k + err[i] + tol
    for i in range(L * F):
        assert (c.partner[i] >= 0).sum() <= M
        assert err[i] <= total.get(i, 0.0) / (M + 1) + tol
    # the strongest partner of each source is kept when its lead exceeds the error
    for i in range(L * F):
        mine = sorted(((s, j) for (a, j), (s, _) in pairs.items() if a == i), reverse=True)
        if len(mine) > 1 and mine[0][0] - mine[1][0] > 2 * err[i]:
            assert (i, mine[0][1]) in got


T = 16
TEXT = "Fact: Michael Jordan plays the sport of basketball. The capital of France is Paris. 36+59=95. "
DOCS = [TEXT[i:i + T - 3] for i in range(0, 6 * (T - 3), T - 3)]
BUILD = dict(corpus=DOCS, n_tokens=6 * T, context_len=T, batch_size=2, top_k=2, window=(2, 1), n_ranges=2,
             per_range=1, progress=False, log=lambda msg: None)


@pytest.fixture(scope="module")
def model_tc():
    model = tiny_model("llama")
    return model, random_transcoder(model, "clt", n_features=8, active_per_layer=24, seed=0)


@torch.no_grad()
def test_database_coactivation_equals_brute_force(model_tc, tmp_path):
    model, tc = model_tc
    path = tmp_path / "c.db"
    build_features(model, tc, out=path, coactivation=10_000, **BUILD)
    db = FeatureDB.open(path)
    with sqlite3.connect(path) as conn:
        ctxs = np.stack([np.frombuffer(r[0], dtype="<i4") for r in conn.execute("SELECT tokens FROM contexts "
                                                                                   "ORDER BY id")])
    acts = []  # the same forward batches as the build: [N, L·F] at the counted tokens
    for i in range(0, len(ctxs), 2):
        ids = torch.tensor(ctxs[i:i + 2], dtype=torch.long)
        trace = model.forward(ids)
        reads = tc.select_input(trace.resid_mid, trace.mlp_in)
        keep = torch.tensor([[p > 0 and t not in (256, 257, 258) for p, t in enumerate(r)] for r in ids.tolist()])
        layers = [tc.activate(tc.pre_acts(reads[a].reshape(-1, model.d_model), a), a, training=False)
                  for a in range(tc.n_layers)]
        acts.append(torch.cat(layers, 1)[keep.reshape(-1)].double())
    a = torch.cat(acts).numpy()
    n, G = a.shape
    Fn = tc.n_features
    assert db.meta["coactivation"] == {"top_m": 10_000, "tokens": n, "tokens_per_batch": 0} and n == db.meta["tokens"]
    checked = 0
    for i in range(G):
        co = db.coactivation(i // Fn, i % Fn)
        want = {}
        for j in range(G):
            if j != i and j // Fn >= i // Fn and (a[:, i] * a[:, j] > 0).any():
                want[(j // Fn, j % Fn)] = ((a[:, i] * a[:, j]).sum() / n, int((a[:, i] * a[:, j] > 0).sum()))
        got = {(pl, pf): (m, c) for pl, pf, m, c in co.partners}
        assert set(got) == set(want) and co.error == 0.0 and co.tokens == n
        for key, (m, c) in want.items():
            assert got[key][0] == pytest.approx(m, rel=1e-6) and got[key][1] == c
        assert co.total == pytest.approx(sum(m for m, _ in want.values()), rel=1e-6)
        assert [m for _, _, m, _ in co.partners] == sorted((m for _, _, m, _ in co.partners), reverse=True)
        checked += bool(want)
    assert checked > G // 2
    # E[a_j] for the TWERA denominator comes from the features table: mean_act · frequency
    card = db.feature(1, 3)
    assert card.mean_act * card.frequency == pytest.approx(a[:, Fn + 3].mean(), rel=1e-6)


def test_sampled_tokens_resume_and_errors(model_tc, tmp_path):
    model, tc = model_tc
    kw = dict(BUILD, coactivation=2, coact_tokens=5)
    whole = tmp_path / "whole.db"
    build_features(model, tc, out=whole, **kw)
    db = FeatureDB.open(whole)
    assert db.meta["coactivation"] == {"top_m": 2, "tokens": 3 * 5, "tokens_per_batch": 5}
    assert all(len(db.coactivation(a, f).partners) <= 2 for a in range(tc.n_layers) for f in range(8))
    with sqlite3.connect(whole) as c:
        assert c.execute("SELECT COUNT(*) FROM coactivation").fetchone()[0] > 0

    def interrupt(batches: int) -> None:
        if batches == 2:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.db"
    with pytest.raises(KeyboardInterrupt):
        build_features(model, tc, out=out, checkpoint_every=0, on_batch=interrupt, **kw)
    with pytest.raises(CltraceError, match="other settings"):
        build_features(model, tc, out=out, resume=True, **{**kw, "coact_tokens": 4})
    build_features(model, tc, out=out, resume=True, **kw)
    assert database_contents(out) == database_contents(whole)
    plain = tmp_path / "plain.db"
    build_features(model, tc, out=plain, **BUILD)
    with pytest.raises(CltraceError, match="--coactivation"):
        FeatureDB.open(plain).coactivation(0, 0)
    with pytest.raises(CltraceError, match="coactivation"):
        build_features(model, tc, out=plain, **{**BUILD, "coactivation": -1})


def test_cli_build_with_coactivation(tmp_path, capsys):
    from cltrace.cli import main
    from cltrace.models.registry import load_model
    from cltrace.models.tiny import save_tiny
    from cltrace.transcoders.io import save_transcoder

    folder = save_tiny("llama", tmp_path / "tiny")
    save_transcoder(random_transcoder(load_model(str(folder)), "clt", n_features=8, active_per_layer=24),
                    tmp_path / "clt")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    db = tmp_path / "f.db"
    assert main(["-q", "--device", "cpu", "features", "build", "-t", str(tmp_path / "clt"), "--model", str(folder),
                 "--corpus", str(corpus), "--tokens", "64", "--context-len", "16", "--batch-size", "2",
                 "--coactivation", "3", "--coact-tokens", "4", "--out", str(db)]) == 0
    with FeatureDB.open(db) as d:
        assert d.meta["coactivation"] == {"top_m": 3, "tokens": 2 * 4, "tokens_per_batch": 4}
    assert main(["features", "build", "-t", str(tmp_path / "clt"), "--model", str(folder), "--corpus", str(corpus),
                 "--coactivation", "-2", "--out", str(tmp_path / "g.db")]) == 2
    assert "--coactivation" in capsys.readouterr().err
