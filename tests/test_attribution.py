"""Attribution edges are exact in the local replacement model (tiny random models of every family)."""

import pytest
import torch

from cltrace.attribution import Graph, attribute
from cltrace.errors import CltraceError
from cltrace.models.tiny import FAMILY_NAMES, tiny_model
from cltrace.replacement import build_replacement, random_transcoder

PROMPT = "Fact: Michael Jordan plays the sport of"


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tiny_on):
    model = tiny_on(request.param)
    ids = model.tokenize(PROMPT)
    out = {}
    for kind in ("clt", "plt"):
        tc = random_transcoder(model, kind, 96, 12, ids=ids, skip=kind == "plt")
        out[kind] = (tc, attribute(model, tc, ids, batch_size=16))
    return model, ids, out


def frozen_run(model, rep, *, delta=None, emb_delta=None, zero_nodes=False):
    """The frozen affine model through the adapter's own forward (independent of cltrace.replacement.forward).

    Block l adds leaf[l] + skip(mlp_in) + delta[l], where leaf = true MLP output − skip at the reference.
    zero_nodes: embeddings 0 and leaves = b_dec (BOS as is): only the constant remains.
    """
    tc = rep.tc
    leaf = rep.mlp_out - (rep.skip if rep.skip is not None else 0)
    if zero_nodes:
        leaf = tc.b_dec[:, None, :].expand_as(leaf).clone()
        leaf[:, 0] = rep.mlp_out[:, 0] - (rep.skip[:, 0] if rep.skip is not None else 0)

    def mlp_hook(layer, m_in, m_out):
        out = leaf[layer][None].clone()
        if tc.W_skip is not None:
            out = out + m_in @ tc.W_skip[layer]
        if delta is not None:
            out = out + delta[layer][None]
        return out

    def embed_hook(x):
        x = torch.zeros_like(x) if zero_nodes else x
        return x + emb_delta[None] if emb_delta is not None else x

    return model.forward(rep.ids, frozen=rep.frozen, mlp_hook=mlp_hook, embed_hook=embed_hook)


def target_value(g: Graph, tc, r: int, trace) -> float:
    """Row r's target read from a trace: pre-activation without b_enc, or the demeaned logit."""
    node = int(g.rows[r])
    if node < g.n_features:
        layer, pos, f = g.features[node].tolist()
        return float(trace.mlp_in[layer][0, pos].detach() @ tc.W_enc[layer][:, f])
    return None


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_rows_sum_to_target_values(setup, kind):
    model, ids, out = setup
    tc, g = out[kind]
    rep = build_replacement(model, tc, ids)
    const = frozen_run(model, rep, zero_nodes=True)
    feat_rows = g.rows < g.n_features
    # feature rows: Σ edges + constant = pre-activation − b_enc, all from independent computations
    ref = model.forward(ids)
    pre = torch.tensor([target_value(g, tc, r, ref) for r in range(len(g.rows)) if feat_rows[r]])
    c_indep = torch.tensor([target_value(g, tc, r, const) for r in range(len(g.rows)) if feat_rows[r]])
    sums = g.edges[feat_rows].sum(1)
    assert torch.allclose(sums + c_indep, pre, atol=1e-4, rtol=1e-5)
    assert torch.allclose(g.row_constant[feat_rows], c_indep, atol=1e-5)
    # logit rows: Σ edges + constant = logit − mean logit (before any soft-cap)
    fn = model.forward(ids).final_normed[0, -1]
    logits = (fn @ model.W_U.T).cpu()  # the graph's tensors are on the CPU whatever the model's device
    want = logits[g.logit_tokens] - logits.mean()
    c_logit = (const.final_normed[0, -1] @ model.W_U.T).cpu()
    c_logit = c_logit[g.logit_tokens] - c_logit.mean()
    assert torch.allclose(g.edges[~feat_rows].sum(1) + c_logit, want, atol=1e-4, rtol=1e-5)
    if model.config.__dict__.get("final_logit_softcapping") is None:
        hf = model.logits(ids)[0, -1].cpu()
        assert torch.allclose(hf[g.logit_tokens] - hf.mean(), want, atol=1e-4)
    assert g.meta["max_logit_error"] < 1e-4


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_single_edges_equal_perturbation_effects(setup, kind):
    """A[t, s] = change of t when source s is removed from the frozen model (it is linear: exact)."""
    model, ids, out = setup
    tc, g = out[kind]
    rep = build_replacement(model, tc, ids)
    base = frozen_run(model, rep)
    L, T, D = rep.mlp_out.shape
    gen = torch.Generator().manual_seed(0)
    feat_rows = (g.rows < g.n_features).nonzero().flatten()
    sources = [int(i) for i in torch.randint(0, g.n_features, (3,), generator=gen)]
    sources += [g.error_index(int(torch.randint(0, L, (1,), generator=gen)), T - 2), g.token_index(T - 3)]
    dev = rep.mlp_out.device
    for s in sources:
        delta, emb_delta = torch.zeros(L, T, D, device=dev), None
        if s < g.n_features:
            layer, pos, f = g.features[s].tolist()
            dec = tc.decoder_vectors(layer, torch.tensor([f], device=dev))[0]  # [n_out, D]
            for j, lt in enumerate(tc.target_layers(layer)):
                delta[lt, pos] = -g.activations[s].item() * dec[j]
        elif s < g.token_index(0):
            layer, pos = divmod(s - g.n_features, T)
            delta[layer, pos] = -rep.error[layer, pos]
        else:
            emb_delta = torch.zeros(T, D, device=dev)
            emb_delta[s - g.token_index(0)] = -rep.embed[s - g.token_index(0)]
        pert = frozen_run(model, rep, delta=delta, emb_delta=emb_delta)
        for r in feat_rows[:25].tolist():
            change = target_value(g, tc, r, base) - target_value(g, tc, r, pert)
            assert abs(change - float(g.edges[r, s])) < 1e-4 + 1e-4 * abs(change), (s, r)


def test_graph_equals_the_cpu_graph(setup):
    """The same graph computed on the CPU (under --device cpu, the same computation twice)."""
    import copy

    model, ids, out = setup
    tc, g = out["clt"]
    cpu_model = tiny_model(model.name.removeprefix("tiny-"))  # the same weights (tiny_on builds on the CPU)
    gc = attribute(cpu_model, copy.deepcopy(tc).cpu(), ids.cpu(), batch_size=16)
    assert torch.equal(g.features, gc.features) and torch.equal(g.logit_tokens, gc.logit_tokens)
    scale = float(gc.edges.abs().max())
    assert torch.allclose(g.edges, gc.edges, rtol=1e-3, atol=1e-5 * scale)


def test_batch_size_does_not_change_edges(setup):
    model, ids, out = setup
    tc, g = out["clt"]
    g1 = attribute(model, tc, ids, batch_size=7)
    assert torch.allclose(g1.edges, g.edges, atol=1e-5)


def test_max_feature_nodes_keeps_rows_exact(setup):
    model, ids, out = setup
    tc, full = out["clt"]
    g = attribute(model, tc, ids, max_feature_nodes=10, batch_size=4)
    assert g.n_features == 10 and g.meta["n_active_features"] == full.n_features
    # dropped features are folded into errors, so every row still sums to its value
    assert torch.allclose(g.edges.sum(1) + g.row_constant, g.row_value, atol=1e-4, rtol=1e-5)
    # the kept features are the most influential ones of the full graph: measured ranks 0-10 of 48 for the 10
    # kept (the cap ranks by influence estimated while rows arrive); a random choice would average rank ~23
    from cltrace.attribution.prune import influence, normalize_rows

    inf = influence(normalize_rows(full.edges), full.rows, full.logit_weights())[: full.n_features]
    kept = {tuple(r) for r in g.features.tolist()}
    ranks = [i for i, r in enumerate(inf.argsort(descending=True).tolist())
             if tuple(full.features[r].tolist()) in kept]
    assert len(ranks) == 10 and max(ranks) < 15, ranks


def test_explicit_and_contrast_targets(tiny_on):
    model = tiny_on("llama")
    ids = model.tokenize(PROMPT)
    tc = random_transcoder(model, "plt", 64, 8, ids=ids)
    g = attribute(model, tc, ids, targets=["a", ("b", "c")])
    assert g.logit_labels == ["a", "b - c"] and g.logit_tokens.tolist()[1] == -1
    fn = model.forward(ids).final_normed[0, -1]
    lg = fn @ model.W_U.T
    a, b, c = (model.tokenizer.convert_tokens_to_ids(t) for t in "abc")
    assert abs(float(g.row_value[-1]) - float(lg[b] - lg[c])) < 1e-4
    assert abs(float(g.row_value[-2]) - float(lg[a] - lg.mean())) < 1e-4
    with pytest.raises(CltraceError, match="single token"):
        attribute(model, tc, ids, targets=["ab"])


def test_top_logit_selection(tiny_on):
    model = tiny_on("qwen2")
    ids = model.tokenize(PROMPT)
    tc = random_transcoder(model, "plt", 32, 4, ids=ids)
    g = attribute(model, tc, ids, max_n_logits=3)
    p = torch.softmax(model.logits(ids)[0, -1], -1).cpu()
    assert g.logit_tokens.tolist() == p.topk(3).indices.tolist()[: g.n_logits]
    assert torch.allclose(g.logit_probs, p[g.logit_tokens], atol=1e-6)


def test_graph_save_load_roundtrip(tmp_path, setup):
    model, ids, out = setup
    g = out["clt"][1]
    path = g.save(tmp_path / "g.safetensors")
    h = Graph.load(path)
    assert torch.equal(h.edges, g.edges) and torch.equal(h.features, g.features)
    assert h.tokens == g.tokens and h.logit_labels == g.logit_labels and h.meta == g.meta
    # a sparse row block goes to disk as CSR
    import dataclasses

    g = dataclasses.replace(g, edges=g.edges.clone())
    g.edges[:, ::2] = 0
    h = Graph.load(g.save(tmp_path / "s.safetensors"))
    assert torch.equal(h.edges, g.edges)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_graph_load_corrupt_file(tmp_path, setup, damage):
    g = setup[2]["plt"][1]
    path = g.save(tmp_path / "g.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a graph at all" * 10)
    else:
        path = tmp_path / "nope.safetensors"
    with pytest.raises(CltraceError):
        Graph.load(path)


def test_long_prompt_path_gives_same_edges(setup, monkeypatch):
    """Many (layer, position) groups switch feature columns to the chunked-gather path: same edges."""
    from cltrace.attribution import engine

    model, ids, out = setup
    tc, g = out["clt"]
    orig = engine.RowComputer._build_groups
    monkeypatch.setattr(engine.RowComputer, "_build_groups", lambda self: orig(self, max_groups=0))
    assert torch.allclose(attribute(model, tc, ids, batch_size=16).edges, g.edges, atol=1e-5)


def test_truncated_pass_equals_the_full_one(tiny_on):
    """A batch's pass on the prefix ids[:n] up to the read points of one layer sees exactly the full pass."""
    from cltrace.attribution.engine import build_leaves

    model = tiny_on("gemma3")
    ids = model.tokenize(PROMPT)
    tc = random_transcoder(model, "clt", 64, 8, ids=ids)
    rep = build_replacement(model, tc, ids)
    full = build_leaves(rep)
    for n_pos, stop in ((3, 1), (ids.numel() - 1, 0), (ids.numel(), 2)):
        part = build_leaves(rep, n_pos, stop)
        assert len(part.reads) == stop + 1 and len(part.outs) == stop and part.final is None
        for layer in range(stop + 1):
            assert torch.allclose(part.reads[layer][0], full.reads[layer][0, :n_pos], atol=1e-6)


def test_plan_batches_covers_every_row_once():  # batch planning is host-side bookkeeping: CPU only
    from cltrace.attribution.engine import plan_batches

    gen = torch.Generator().manual_seed(0)
    keys = list(zip(torch.randint(1, 40, (500,), generator=gen).tolist(),
                    torch.randint(0, 12, (500,), generator=gen).tolist()))
    batches = plan_batches(keys, [8, 16, 32], 12)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert max(len(b) for b in batches) <= 32

    def cost(bs):  # much cheaper than batches in the given order
        return sum((len(b) + 3) * (max(keys[i][0] for i in b) + 1) * (max(keys[i][1] for i in b) + 1) for b in bs)
    # measured 0.45 of the cost of batches in the given order (seeded keys: deterministic)
    assert cost(batches) < 0.55 * cost([list(range(i, min(i + 32, 500))) for i in range(0, 500, 32)])
