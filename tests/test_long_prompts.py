"""Long prompts in small memory: the pieces attribution changed to stay small are exact.

The influence estimate that picks feature rows runs its power series on the rows' own columns (one pass over all
columns at the end), the edge matrix is assembled chunk by chunk of rows, and feature columns of long prompts
are gathered a chunk of features at a time. Each is checked against a plain computation written here.
"""

import pytest
import torch

from cltrace.attribution import attribute, engine
from cltrace.models.tiny import tiny_model
from cltrace.replacement import build_replacement, random_transcoder


def brute_influence(rows, row_col, weights, n_cols, n_iter=64):
    """Σ_{k≥1} wᵀ Âᵏ on the square matrix of all nodes (logits included), Â = row-normalized |A|."""
    R = rows.shape[0]
    n = n_cols + 1  # one column for "no column" (logit rows)
    A = torch.zeros(n, n, dtype=torch.float64)
    norm = rows.abs().double() / rows.abs().double().sum(1, keepdim=True).clamp_min(1e-10)
    # node of row i is column row_col[i]; logit rows get their own nodes past n_cols
    A = torch.zeros(n_cols + R, n_cols + R, dtype=torch.float64)
    nodes = torch.where(row_col < n_cols, row_col, n_cols + torch.arange(R))
    A[nodes, :n_cols] = norm
    w = torch.zeros(n_cols + R, dtype=torch.float64)
    w[nodes] = weights.double()
    acc, cur = torch.zeros_like(w), w
    for _ in range(n_iter):
        cur = cur @ A
        acc += cur
    return acc[:n_cols]


def test_influence_equals_the_power_series():
    g = torch.Generator().manual_seed(0)
    n_cols, n_logits, n_feat_rows = 40, 3, 12
    cols = torch.randperm(30, generator=g)[:n_feat_rows]  # the rows' own feature columns (of 30 features)
    row_col = torch.cat([torch.full((n_logits,), n_cols), cols])
    rows = torch.randn(n_logits + n_feat_rows, n_cols, generator=g)
    # a DAG: a feature's row has edges only from features of lower index (so the series ends)
    for i, c in enumerate(cols.tolist()):
        rows[n_logits + i, c:30] = 0
    rows[torch.rand(rows.shape, generator=g) < 0.3] = 0
    weights = torch.cat([torch.rand(n_logits, generator=g), torch.zeros(n_feat_rows)])
    got = engine._influence_on_columns(rows, row_col, weights, n_cols)
    want = brute_influence(rows, row_col, weights, n_cols)
    assert want[cols].abs().sum() > 0  # paths through feature rows contribute
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def long_prompt():
    model = tiny_model("llama")
    words = "Fact : Michael Jordan plays the sport of basketball and his team won many games in Chicago".split()
    ids = model.tokenize(" ".join(words * 3))[:64]
    tc = random_transcoder(model, "clt", 64, 40, ids=ids)
    return model, ids, tc


def test_chunked_assembly_equals_one_chunk(long_prompt, monkeypatch):
    model, ids, tc = long_prompt
    g1 = attribute(model, tc, ids, batch_size=16, max_feature_nodes=50)
    orig = engine._assemble
    monkeypatch.setattr(engine, "_assemble", lambda *a, **k: orig(*a, **{**k, "chunk": 7}))
    g7 = attribute(model, tc, ids, batch_size=16, max_feature_nodes=50)
    assert g1.n_features == 50 and g1.meta["n_active_features"] > 100  # a cap that binds, folded columns
    for name in ("edges", "features", "rows", "row_constant", "row_value"):
        assert torch.equal(getattr(g1, name), getattr(g7, name)), name


def test_long_prompt_rows_are_exact(long_prompt, monkeypatch):
    """Gathered feature columns (chunks of 5 features) and folded dropped columns: every feature row's edges
    plus its constant give its pre-activation, and every edge from a kept feature equals a·(G·W_dec) computed
    here from a plain backward of that row."""
    model, ids, tc = long_prompt
    groups = engine.RowComputer._build_groups
    monkeypatch.setattr(engine.RowComputer, "_build_groups", lambda self: groups(self, max_groups=0))
    orig = engine.RowComputer._feature_cols_gathered
    monkeypatch.setattr(engine.RowComputer, "_feature_cols_gathered",
                        lambda self, Gs, rows, top, P: orig(self, Gs, rows, top, P, chunk_elems=5 * 16 * 64))
    g = attribute(model, tc, ids, batch_size=16, max_feature_nodes=40)
    feat_rows = (g.rows < g.n_features).nonzero()[:, 0]
    assert torch.allclose(g.edges[feat_rows].sum(1) + g.row_constant[feat_rows], g.row_value[feat_rows],
                          atol=1e-4, rtol=1e-4)
    # one row by hand: d(target pre-activation)/d(MLP output leaves), dotted with each kept feature's writes
    rep = build_replacement(model, tc, ids)
    r = int(feat_rows[-1])
    layer, pos, f = g.features[int(g.rows[r])].tolist()
    lv = engine.build_leaves(rep)
    target = lv.reads[layer][0, pos] @ tc.W_enc[layer][:, f]
    grads = torch.autograd.grad(target, lv.outs[:layer], allow_unused=True)
    for col in range(g.n_features):
        s, p, fs = g.features[col].tolist()
        want = 0.0
        for j, t in enumerate(tc.target_layers(s)):
            if t < layer and grads[t] is not None:
                want += float(grads[t][0, p] @ tc.W_dec[s][fs, j].detach()) * float(g.activations[col])
        assert abs(float(g.edges[r, col]) - want) <= 1e-4 + 1e-4 * abs(want), (r, col)
