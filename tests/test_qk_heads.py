"""Head loadings split graph edges exactly: on tiny random models of every family the loadings plus the direct
part equal the attribution engine's edges, and the last layer's loadings equal a brute-force ablation of one
frozen attention weight."""

import pytest
import torch

from cltrace.attribution import attribute
from cltrace.attribution.heads import cross_position_edges, head_loadings
from cltrace.models.adapter import Frozen
from cltrace.models.tiny import FAMILY_NAMES
from cltrace.replacement import build_replacement, random_transcoder

PROMPT = "Fact: Michael Jordan plays"


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tiny_on):
    model = tiny_on(request.param)
    ids = model.tokenize(PROMPT)
    out = {}
    for kind in ("clt", "plt"):
        tc = random_transcoder(model, kind, 96, 12, ids=ids, skip=kind == "plt")
        out[kind] = (build_replacement(model, tc, ids), attribute(model, tc, ids, batch_size=32))
    return model, ids, out


def some_edges(g, n_cross=12, n_other=24):
    """The strongest cross-position edges, plus a spread of others (same position, errors, tokens, logit rows)."""
    cross = cross_position_edges(g, n_cross)
    nz = g.edges.nonzero().tolist()
    step = max(1, len(nz) // n_other)
    return cross, [tuple(e) for e in nz[::step]]


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_loadings_plus_direct_equal_edges(setup, kind):
    model, ids, out = setup
    rep, g = out[kind]
    cross, other = some_edges(g)
    assert len(cross) >= 5
    res = head_loadings(rep, g, cross + other)
    pos = lambda c: int(g.features[c, 1]) if c < g.n_features else None  # noqa: E731
    for e in res:
        scale = float(g.edges[e.row].abs().max())
        assert abs(e.edge - e.graph_edge) <= 1e-5 * scale + 1e-7, (e.row, e.col)
    for e in res[: len(cross)]:
        assert e.direct == 0.0  # a path between two positions must cross at a head
        assert e.loadings.abs().sum() > 0
    # same-position feature edges have no crossing path: all direct
    for e in res[len(cross):]:
        node = int(g.rows[e.row])
        if node < g.n_features and e.col < g.n_features and pos(e.col) == int(g.features[node, 1]):
            assert float(e.loadings.abs().max()) <= 1e-6 * max(abs(e.graph_edge), 1e-3)


def frozen_value(model, rep, read, frozen, *, remove=None):
    """The target's value in the frozen model (adapter forward, patterns/scales from `frozen`), optionally with
    the source feature `remove` (index into rep.features) removed."""
    tc = rep.tc
    leaf = rep.mlp_out - (rep.skip if rep.skip is not None else 0)
    delta = torch.zeros_like(leaf)
    if remove is not None:
        f = rep.features
        s, p = int(f.layer[remove]), int(f.pos[remove])
        w = tc.feature_writes(s, f.index[remove:remove + 1], f.act[remove:remove + 1])[0].detach()
        delta[s:s + w.shape[0], p] -= w

    def mlp_hook(layer, m_in, m_out):
        out = (leaf[layer] + delta[layer])[None]
        return out + m_in @ tc.W_skip[layer] if tc.W_skip is not None else out

    with torch.no_grad():
        trace = model.forward(rep.ids, frozen=frozen, mlp_hook=mlp_hook)
    layer, pos, vec = read
    x = trace.final_normed if layer == model.n_layers else tc.select_input(trace.resid_mid, trace.mlp_in)[layer]
    return float(x[0, pos].float() @ vec.float())


def test_last_layer_loadings_equal_pattern_ablation(setup):
    """For the attention layer right before the target's read point every later step keeps the position, so a
    loading there is exactly the edge minus the edge with that one frozen attention weight set to 0."""
    model, ids, out = setup
    rep, g = out["clt"]
    f_pos = g.features[:, 1]
    feat_rows = (g.rows < g.n_features).nonzero()[:, 0]
    A = g.edges[feat_rows, : g.n_features].abs()
    A[f_pos[g.rows[feat_rows]][:, None] == f_pos[None, :]] = 0  # feature -> feature edges across positions
    i = int(A.argmax())
    r, c = int(feat_rows[i // A.shape[1]]), i % A.shape[1]
    (e,) = head_loadings(rep, g, [(r, c)])
    t_layer, t_pos, t_feat = g.features[int(g.rows[r])].tolist()
    read = (t_layer, t_pos, rep.tc.W_enc[t_layer][:, t_feat].detach())
    f = rep.features
    s_layer, s_pos, s_feat = g.features[c].tolist()
    k = int(((f.layer == s_layer) & (f.pos == s_pos) & (f.index == s_feat)).nonzero()[0, 0])
    edge = frozen_value(model, rep, read, rep.frozen) - frozen_value(model, rep, read, rep.frozen, remove=k)
    assert abs(edge - e.graph_edge) <= 1e-5 * abs(edge) + 1e-6
    checked = 0
    for h in range(model.n_heads):
        for j in {s_pos, int(e.loadings[t_layer, h].abs().argmax())}:
            if j == t_pos:
                continue
            patterns = [p.clone() for p in rep.frozen.patterns]
            patterns[t_layer][0, h, t_pos, j] = 0
            cut = Frozen(patterns, rep.frozen.scales)
            edge_cut = frozen_value(model, rep, read, cut) - frozen_value(model, rep, read, cut, remove=k)
            want = edge - edge_cut
            assert abs(float(e.loadings[t_layer, h, j]) - want) <= 1e-5 * abs(edge) + 1e-6, (h, j)
            checked += abs(want) > 1e-4 * abs(edge)
    assert checked >= 1  # some head at that layer carries part of the edge
