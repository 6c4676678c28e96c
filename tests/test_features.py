"""The feature database against brute force: a tiny Llama, random CLT / PLT, a dozen contexts of 24 tokens.

The brute force encodes every context densely (the same forward batches as the build, so that activations are
bit-identical and ties are exact ties) and computes each statistic with plain Python / NumPy.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3

import numpy as np
import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.features import FeatureDB, FeatureStats, build_features
from cltrace.features.build import partial_dir
from cltrace.features.db import database_contents
from cltrace.models.tiny import tiny_model
from cltrace.replacement.calibrate import random_transcoder

T, BATCH, TOP_K, WINDOW, RANGES, PER_RANGE = 24, 4, 5, (4, 2), 4, 3
TEXT = ("Fact: Michael Jordan plays the sport of basketball. The opposite of hot is cold, and the capital of "
        "France is Paris. Numbers: 36+59=95, 12*3=36. def f(x): return x + 1. The National Digital Analytics "
        "Group (NDAG) met on Monday.")


def documents() -> list[str]:
    """Documents of T − 3 bytes (one token each): each context is [BOS, doc, EOS, BOS]; two repeat exactly."""
    n = T - 3
    pieces = [TEXT[i:i + n] for i in range(0, 10 * n, n)]
    return pieces[:6] + [pieces[0], pieces[2]] + pieces[6:10]  # 12 documents -> 12 contexts


BUILD = dict(corpus=documents(), n_tokens=12 * T, context_len=T, batch_size=BATCH, top_k=TOP_K, window=WINDOW,
             n_ranges=RANGES, per_range=PER_RANGE, progress=False, log=lambda msg: None)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def clt(model):
    return random_transcoder(model, "clt", n_features=32, active_per_layer=60, seed=0)


@pytest.fixture(scope="module")
def plt_(model):
    return random_transcoder(model, "plt", n_features=32, active_per_layer=60, seed=1)


@pytest.fixture(scope="module")
def built(model, clt, tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "clt.db"
    build_features(model, clt, out=path, checkpoint_every=1, **BUILD)
    return path


@pytest.fixture(scope="module")
def built_bf16(model, clt, tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "clt_bf16.db"
    build_features(model, clt, out=path, precision="bfloat16", **BUILD)
    return path


def contexts_of(path) -> np.ndarray:
    with sqlite3.connect(path) as c:
        rows = c.execute("SELECT tokens FROM contexts ORDER BY id").fetchall()
    return np.stack([np.frombuffer(r[0], dtype="<i4") for r in rows])


@torch.no_grad()
def brute_acts(model, tc, ctxs: np.ndarray, matmul_dtype: torch.dtype | None = None) -> np.ndarray:
    """[L, n, T, F] float32 activations, 0 at BOS and other special tokens (which are not counted); the encoder's
    matmul in `matmul_dtype` (default: the weights')."""
    special = {256, 257, 258}  # the byte tokenizer's <bos>, <eos>, <pad>
    out = []
    for i in range(0, len(ctxs), BATCH):
        ids = torch.tensor(ctxs[i:i + BATCH], dtype=torch.long)
        trace = model.forward(ids)
        reads = tc.select_input(trace.resid_mid, trace.mlp_in)
        keep = torch.tensor([[p > 0 and int(t) not in special for p, t in enumerate(row)] for row in ids.tolist()])
        layers = []
        for layer in range(tc.n_layers):
            x = reads[layer].reshape(-1, model.d_model)
            if matmul_dtype is None:
                pre = x @ tc.W_enc[layer] + tc.b_enc[layer]
            else:  # plain PyTorch, as `Transcoder.pre_acts(..., matmul_dtype=)` promises
                pre = (x.to(matmul_dtype) @ tc.W_enc[layer].to(matmul_dtype)).float() + tc.b_enc[layer]
            a = tc.activate(pre, layer, training=False).view(*ids.shape, -1)
            layers.append((a * keep[..., None]).numpy())
        out.append(np.stack(layers))
    return np.concatenate(out, axis=1)


def occurrences(acts: np.ndarray, layer: int, f: int) -> list[tuple[float, int, int]]:
    """(value, context, pos) of every nonzero activation of one feature."""
    n, t = np.nonzero(acts[layer, :, :, f] > 0)
    return [(float(acts[layer, c, p, f]), int(c), int(p)) for c, p in zip(n, t)]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_statistics_match_brute_force(model, clt, built, built_bf16, precision):
    built = built if precision == "float32" else built_bf16
    ctxs = contexts_of(built)
    assert ctxs.shape == (12, T) and (ctxs[6] == ctxs[0]).all()  # a repeated context: exact ties
    acts = brute_acts(model, clt, ctxs, None if precision == "float32" else torch.bfloat16)
    if precision == "bfloat16":  # a different arithmetic, but the same features to about 3 digits
        exact = brute_acts(model, clt, ctxs)
        both = (acts > 0) & (exact > 0)
        assert both.sum() > 0.95 * (exact > 0).sum()
        assert np.allclose(acts[both], exact[both], rtol=3e-2, atol=3e-2)
        assert FeatureDB.open(built).meta["precision"] == "bfloat16"
    L, _, _, F = acts.shape
    n_tokens = sum(p > 0 and t not in (256, 257, 258) for row in ctxs for p, t in enumerate(row))
    edges = np.logspace(-3, 3, 49)
    db = FeatureDB.open(built)
    assert db.meta["tokens"] == n_tokens
    cards = db.features([(layer, f) for layer in range(L) for f in range(F)])
    decoded = model.decode(range(264))
    for card in cards:
        layer, f = card.layer, card.feature
        occ = occurrences(acts, layer, f)
        vals = np.array([v for v, _, _ in occ], dtype=np.float64)
        assert card.count == len(occ) and card.frequency == pytest.approx(len(occ) / n_tokens)
        assert card.max_act == pytest.approx(vals.max() if len(occ) else 0.0, abs=0)
        if occ:
            assert card.mean_act == pytest.approx(vals.mean(), rel=1e-6)
        hist = np.bincount(np.searchsorted(edges, vals, side="right"), minlength=50)
        assert card.histogram == hist.tolist()
        # top-k: the k largest, ties to the earlier (context, pos)
        want = sorted(occ, key=lambda o: (-o[0], o[1], o[2]))[:TOP_K]
        assert [(e.value, e.context_id, e.pos) for e in card.top] == want
        # quantile examples lie in their ranges and are real occurrences
        for q in card.quantiles:
            for e in q.examples:
                assert q.lo * (1 - 1e-6) <= e.value <= q.hi * (1 + 1e-6)
                assert (e.value, e.context_id, e.pos) in set(occ)
        # every window equals re-encoding its context (float16), with the context's tokens
        for e in card.top + [e for q in card.quantiles for e in q.examples]:
            lo = e.pos - e.center
            window = acts[layer, e.context_id, lo:lo + len(e.acts), f]
            assert lo == max(0, e.pos - WINDOW[0]) and lo + len(e.acts) == min(T, e.pos + WINDOW[1] + 1)
            assert e.acts == window.astype(np.float16).astype(np.float64).tolist()
            assert e.token_ids == ctxs[e.context_id, lo:lo + len(e.acts)].tolist()
            assert e.tokens == [decoded[t] for t in e.token_ids]
            assert e.acts[e.center] == float(np.float16(e.value))
    assert sum(c.count > 0 for c in cards) > 0.5 * len(cards)
    assert any(len(c.top) == TOP_K for c in cards)


def test_ties_go_to_the_earlier_token():
    stats = FeatureStats(1, 3, 6, top_k=3, window=(1, 1), per_bin=2)
    a = torch.zeros(2, 6, 3)
    a[:, 1:, 0] = 1.0  # feature 0: ten equal values
    a[1, 2, 1], a[0, 4, 1], a[1, 5, 1] = 2.0, 2.0, 3.0  # feature 1: a tie for second place across contexts
    stats.update_layer(0, a[:1], 0)
    stats.update_layer(0, a[1:], 1)
    stats.update_layer(0, a, 2)  # the same two contexts again, later
    gidx = stats.top_gidx[0].T.tolist()  # [F, k] context·6 + pos
    assert gidx[0] == [1, 2, 3] and gidx[2] == [-1, -1, -1]
    assert gidx[1] == [1 * 6 + 5, 3 * 6 + 5, 0 * 6 + 4]  # the two 3.0s (contexts 1 and 3), then the first 2.0
    assert stats.top_win[0, 0, 0].tolist() == [0.0, 1.0, 1.0]  # position 0 (BOS) counts as 0


_RUN_SEED = int(os.environ.get("CLTRACE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("seed", [0, 1, _RUN_SEED], ids=["seed0", "seed1", "random_seed"])
def test_many_batches_of_random_activations_match_brute_force(seed):
    """Sparse random activations with many exact ties (values on a coarse grid), 12 batches: counts, sums,
    maxima, histograms, the top-k (ties to the earlier token) and their windows equal a direct computation;
    the reservoir keeps the per-bin smallest keys (with room for everything: every occurrence)."""
    g = torch.Generator().manual_seed(seed)
    L, F, B, Tn, k = 2, 7, 3, 10, 4
    stats = FeatureStats(L, F, Tn, top_k=k, window=(2, 1), per_bin=B * 12 * Tn, seed=seed)  # room for all
    batches = []
    for i in range(12):
        a = torch.randint(1, 6, (L, B, Tn, F), generator=g).float() / 2  # values 0.5 .. 2.5: many ties
        a *= torch.rand(L, B, Tn, F, generator=g) < 0.3  # about 30% fire
        a[:, :, 0] = 0.0  # position 0 is not counted
        batches.append(a)
        for layer in range(L):
            stats.update_layer(layer, a[layer], i * B)
    acts = torch.cat(batches, 1)  # [L, n_contexts, T, F]
    edges = np.logspace(-3, 3, 49)
    why = f"[seed={seed}; replay with CLTRACE_TEST_SEED={seed}]"
    for layer in range(L):
        for f in range(F):
            col = acts[layer, :, :, f]
            occ = [(float(col[c, p]), c, p) for c, p in zip(*np.nonzero(col.numpy() > 0))]
            vals = np.array([o[0] for o in occ])
            assert int(stats.count[layer, f]) == len(occ), why
            assert float(stats.act_sum[layer, f]) == pytest.approx(vals.sum(), rel=1e-12), why
            assert float(stats.act_max[layer, f]) == (vals.max() if len(occ) else 0.0), why
            assert stats.hist[layer, f].tolist() == np.bincount(np.searchsorted(edges, vals, side="right"),
                                                                minlength=50).tolist(), why
            want = sorted(occ, key=lambda o: (-o[0], o[1], o[2]))[:k]
            got = [(v, gi // Tn, gi % Tn) for v, gi in
                   zip(stats.top_val[layer, :, f].tolist(), stats.top_gidx[layer, :, f].tolist()) if gi >= 0]
            assert got == want, why
            for i, (_, c, p) in enumerate(want):
                ref = [float(col[c, t]) if 0 <= t < Tn else math.nan for t in range(p - 2, p + 2)]
                assert np.allclose(stats.top_win[layer, i, f].float().numpy(), ref, equal_nan=True), why
            kept = {(gi // Tn, gi % Tn) for gi in stats.q_gidx[layer, f].reshape(-1).tolist() if gi >= 0}
            assert kept == {(c, p) for _, c, p in occ}, why


def test_quantile_reservoir_keeps_everything_when_it_can(model, clt, built):
    """With room for every occurrence, each range's examples are exactly its occurrences; with little room,
    a range gets at least min(per_range, occurrences in fine bins wholly inside it) examples."""
    ctxs = contexts_of(built)
    acts = brute_acts(model, clt, ctxs)
    L, F = clt.n_layers, clt.n_features
    edges = np.logspace(-3, 3, 49)
    for per_range in (300, 2):
        stats = FeatureStats(L, F, T, special_ids={256, 257, 258}, per_bin=per_range, top_k=2, window=(1, 1))
        for i in range(0, len(ctxs), BATCH):
            stats.add_batch(model, clt, torch.tensor(ctxs[i:i + BATCH], dtype=torch.long))
        val, gidx, _ = stats.quantile_examples(RANGES, per_range)
        for layer in range(L):
            for f in range(F):
                occ = occurrences(acts, layer, f)
                top = max((v for v, _, _ in occ), default=0.0)
                for r in range(RANGES):
                    lo, hi = top * r / RANGES, top * (r + 1) / RANGES
                    inside = {(c, p) for v, c, p in occ if lo <= v < hi or (r == RANGES - 1 and v == hi)}
                    got = {(int(g) // T, int(g) % T) for g in gidx[layer, f, r] if g >= 0}
                    if per_range == 300:
                        assert got == inside
                        continue
                    assert got <= inside
                    bins = np.searchsorted(edges, [v for v, _, _ in occ], side="right")
                    whole = [b for b, o in zip(bins, occ) if 0 < b < 49 and lo <= edges[b - 1] and edges[b] < hi
                             and (o[1], o[2]) in inside]
                    assert len(got) >= min(per_range, len(whole))


def direct_effects(model, tc, final_scale: float, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Output logits [F, V] of the last decoder write through RMSNorm at 1/rms = final_scale, and input
    pre-activations [F, V] of each token's embedding through layer `layer`'s pre-MLP RMSNorm."""
    hf = model.hf.model
    w = tc.W_dec[layer][:, tc.n_out(layer) - 1].detach().double()  # [F, D] the write into the last layer
    out = (hf.norm.weight.double() * w * final_scale) @ model.hf.lm_head.weight.double().T
    E = hf.embed_tokens.weight.double()  # [V, D]
    norm = hf.layers[layer].post_attention_layernorm
    x = norm.weight.double() * E / torch.sqrt(E.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    pre = x @ tc.W_enc[layer].detach().double() + tc.b_enc[layer].detach().double()
    return out.numpy(), pre.T.numpy()


@torch.no_grad()
def test_output_and_input_effects_match_a_direct_computation(model, clt, plt_, built, tmp_path):
    ctxs = contexts_of(built)
    trace = model.forward(torch.tensor(ctxs, dtype=torch.long))
    x = trace.resid_final.double()
    keep = torch.tensor([[p > 0 and t not in (256, 257, 258) for p, t in enumerate(r)] for r in ctxs.tolist()])
    eps = model.hf.model.norm.variance_epsilon
    scale = float(torch.rsqrt(x.pow(2).mean(-1) + eps)[keep].mean())  # the mean 1/rms of the final norm
    plt_path = tmp_path / "plt.db"
    build_features(model, plt_, out=plt_path, **BUILD)
    listable = [i for i in range(259) if i not in (256, 257, 258)]  # byte tokens; 259..263 are unused rows
    for tc, path in ((clt, built), (plt_, plt_path)):
        db = FeatureDB.open(path)
        assert db.meta["final_scale"] == pytest.approx(scale, rel=1e-5)
        for layer in range(tc.n_layers):
            out, pre = direct_effects(model, tc, scale, layer)
            for f in (0, 7, 31):
                card = db.feature(layer, f)
                order = sorted(listable, key=lambda v: -out[f, v])
                assert [t.id for t in card.output_top] == order[:10]
                assert [t.id for t in card.output_bottom] == order[::-1][:10]
                assert [t.value for t in card.output_top] == pytest.approx(out[f, order[:10]], abs=1e-5)
                assert [t.value for t in card.output_bottom] == pytest.approx(out[f, order[::-1][:10]], abs=1e-5)
                order = sorted(listable, key=lambda v: -pre[f, v])
                assert [t.id for t in card.input_top] == order[:10]
                assert [t.value for t in card.input_top] == pytest.approx(pre[f, order[:10]], abs=1e-5)
                assert card.auto_label.endswith(json.dumps(card.output_top[0].token, ensure_ascii=False))


def test_interrupted_and_resumed_build_equals_uninterrupted(model, clt, built, tmp_path):
    """Ctrl-C (a real SIGINT) after batch 1, resume, an exception-style interrupt one batch later, resume."""
    out = tmp_path / "resumed.db"

    def ctrl_c(batches: int) -> None:
        if batches == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the build's handler: finish the batch, save, stop

    def interrupt(batches: int) -> None:
        if batches == 1:
            raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup or in a background job
    with pytest.raises(KeyboardInterrupt):
        build_features(model, clt, out=out, checkpoint_every=0, on_batch=ctrl_c, **BUILD)
    assert not out.exists() and json.loads((partial_dir(out) / "progress.json").read_text())["n_contexts"] == BATCH
    with pytest.raises(KeyboardInterrupt):
        build_features(model, clt, out=out, resume=True, checkpoint_every=0, on_batch=interrupt, **BUILD)
    assert json.loads((partial_dir(out) / "progress.json").read_text())["n_contexts"] == 2 * BATCH
    assert signal.getsignal(signal.SIGINT) is before  # the build's handler is gone, the caller's is back
    build_features(model, clt, out=out, resume=True, **BUILD)
    assert not partial_dir(out).exists()
    assert database_contents(out) == database_contents(built)
    with pytest.raises(CltraceError, match="no unfinished build"):
        build_features(model, clt, out=out, resume=True, **BUILD)
    other = tmp_path / "other.db"
    with pytest.raises(KeyboardInterrupt):
        build_features(model, clt, out=other, checkpoint_every=0, on_batch=interrupt, **BUILD)
    with pytest.raises(CltraceError, match="other settings"):
        build_features(model, clt, out=other, resume=True, **{**BUILD, "top_k": 3})
def test_labels_survive_a_rebuild_and_search_finds_them(model, clt, tmp_path):
    out = tmp_path / "labelled.db"
    build_features(model, clt, out=out, **BUILD)
    with FeatureDB.open(out) as db:
        layer, f = db.conn.execute("SELECT layer, feature FROM features WHERE layer = 2 ORDER BY count DESC").fetchone()
        db.set_label(layer, f, "basketball player", note="fires on Jordan", author="me")
        assert db.label(layer, f) == "basketball player"
    build_features(model, clt, out=out, **{**BUILD, "n_tokens": 8 * T})  # new statistics, same transcoders
    with FeatureDB.open(out) as db:
        assert db.meta["n_contexts"] == 8
        card = db.feature(layer, f)
        assert (card.label, card.label_source, card.note, card.author) == ("basketball player", "human",
                                                                           "fires on Jordan", "me")
        hits = db.search("BASKETBALL")
        assert (hits[0].layer, hits[0].feature, hits[0].why) == (layer, f, "label")
        token = card.top[0].tokens[card.top[0].center]
        assert any((h.layer, h.feature) == (layer, f) for h in db.search(token, limit=10_000))
        db.set_label(layer, f, "")
        assert db.label(layer, f) == card.auto_label != ""
        assert db.feature(layer, f).label_source == "auto"


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_input_gives_one_clear_line(model, clt, plt_, built, tmp_path):
    db = FeatureDB.open(built)
    db.check_fits(clt, model)
    other = random_transcoder(model, "clt", n_features=32, active_per_layer=60, seed=5)
    for tc in (other, plt_):
        with pytest.raises(CltraceError) as e:
            db.check_fits(tc, model)
        assert "other transcoders" in one_line_error(e)
    with pytest.raises(CltraceError) as e:
        db.feature(1, 32)
    assert "not in" in one_line_error(e)
    with pytest.raises(CltraceError) as e:
        FeatureDB.open(tmp_path / "absent.db")
    assert "no feature database" in one_line_error(e)
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CltraceError) as e:
        FeatureDB.open(bad)
    assert "corrupt" in one_line_error(e)
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(built.read_bytes()[:4096])
    with pytest.raises(CltraceError) as e:
        FeatureDB.open(truncated).feature(0, 0)
    one_line_error(e)
    # a writer holding the lock
    holder = sqlite3.connect(built, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(CltraceError) as e:
            FeatureDB.open(built, timeout=0.05).set_label(0, 0, "x")
        assert "locked" in one_line_error(e)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # labels written for other transcoders are not overwritten by a build
    labelled = tmp_path / "other.db"
    build_features(model, plt_, out=labelled, **BUILD)
    FeatureDB.open(labelled).set_label(0, 1, "plt feature")
    with pytest.raises(CltraceError) as e:
        build_features(model, clt, out=labelled, **BUILD)
    assert "labels written for other transcoders" in one_line_error(e)


def test_cli_build_and_show(tmp_path, capsys):
    from cltrace.cli import main
    from cltrace.models.registry import load_model
    from cltrace.models.tiny import save_tiny
    from cltrace.transcoders.io import save_transcoder

    folder = save_tiny("llama", tmp_path / "tiny")
    model = load_model(str(folder))
    save_transcoder(random_transcoder(model, "clt", n_features=16, active_per_layer=40), tmp_path / "clt")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 3)
    db = tmp_path / "f.db"
    args = ["-q", "--device", "cpu", "features", "build", "-t", str(tmp_path / "clt"), "--model", str(folder),
            "--corpus", str(corpus), "--tokens", "96", "--context-len", "24", "--batch-size", "2", "--out", str(db)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["features", "show", "1:3", "--db", str(db), "--json", "--png", str(tmp_path / "c.png")]) == 0
    card = json.loads(capsys.readouterr().out)
    assert (card["layer"], card["feature"]) == (1, 3) and len(card["output_top"]) == 10
    assert {"label", "frequency", "max_act", "histogram", "top", "quantiles", "input_top"} <= set(card)
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["features", "show", "1:3", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "frequency" in text and "promoted:" in text and ("[[" in text or "never active" in text)
    assert main(["features", "show", "4:0", "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cltrace: error:") and "\n" not in err and math.isfinite(card["max_act"])
