"""QK attributions are exact: on tiny random models of every family, Σ terms = the head's pre-softmax score that
HF's own attention computes, and removing a component in the frozen model moves the score by its terms."""

import sys

import pytest
import torch

from cltrace.attribution.qk import HeadQuery, components, qk_attributions, reference_stream, residual_contributions
from cltrace.models.tiny import FAMILY_NAMES
from cltrace.replacement import build_replacement, random_transcoder

PROMPT = "Fact: Michael Jordan plays"


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tiny_on):
    model = tiny_on(request.param)
    ids = model.tokenize(PROMPT)
    reps = {kind: build_replacement(model, random_transcoder(model, kind, 96, 12, ids=ids, skip=kind == "plt"), ids)
            for kind in ("clt", "plt")}
    return model, ids, reps


def hf_scores(model, ids, monkeypatch) -> list:
    """Each layer's pre-softmax (and pre-soft-cap) scores [H, T, T] from HF's own forward, captured inside its
    eager attention function (query and key after q/k norms and RoPE, keys repeated for GQA)."""
    attn0 = model.family.attn_module(model.blocks[0])
    module = sys.modules[type(attn0).__module__]
    original = module.eager_attention_forward
    scores = []

    def capture(mod, query, key, value, attention_mask, *args, **kwargs):
        scaling = kwargs.get("scaling", args[0] if args else None)
        if scaling is None:
            scaling = mod.scaling
        n_rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(n_rep, 1)
        scores.append((query @ k.transpose(-1, -2) * scaling)[0].detach())
        return original(mod, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", capture)
    with torch.no_grad():
        model.hf(input_ids=ids[None])
    monkeypatch.undo()
    return scores


def queries(model, T):
    L, H = model.n_layers, model.n_heads
    # every layer (Gemma: local and global), the last head (GQA: its key/value head is not head 0), query at
    # the last position against BOS, a middle key and itself; one early query
    out = []
    for layer in range(L):
        for head in (0, H - 1):
            out += [HeadQuery(layer, head, T - 1, k) for k in (0, T // 2, T - 1)]
        out.append(HeadQuery(layer, 1, 3, 1))
    return out


def tolerance(res) -> float:
    """1e-5 of the score's natural size: |score| or |q|·|k| (the dot product's rounding scale)."""
    return 1e-5 * max(abs(res.score), float(res.q.sum(0).norm() * res.k.sum(0).norm()))


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_terms_sum_to_hf_scores(setup, kind, monkeypatch):
    model, ids, reps = setup
    rep = reps[kind]
    T = rep.n_pos
    ref = hf_scores(model, ids, monkeypatch)
    results = qk_attributions(rep, queries(model, T))
    for res in results:
        want = float(ref[res.layer][res.head, res.query_pos, res.key_pos])
        assert abs(res.terms.sum().item() - want) <= tolerance(res) * 3, res
        assert abs(res.score_terms - want) <= tolerance(res), res
        assert abs(res.score - want) <= tolerance(res), res
        assert abs(float(res.kind_table().sum()) - want) <= tolerance(res), res
    # the features carry part of every late score: a decomposition that dropped them would fail above
    assert any(res.q[: len(rep.features)].abs().sum() > 0 for res in results)


def test_components_sum_to_stream(setup):
    model, ids, reps = setup
    rep = reps["clt"]
    comp = components(rep)
    for layer in (0, model.n_layers - 1):
        C = residual_contributions(rep, layer, rep.n_pos - 1, comp=comp)  # [n, D]
        want = model.forward(ids).resid_pre[layer][0, -1]
        assert torch.allclose(C.sum(0), want.float(), atol=1e-5 * float(want.abs().max()), rtol=0)
        if layer:
            assert C[: comp.n_features].abs().sum() > 0  # features reach the stream of later layers
    assert torch.equal(reference_stream(rep, 1), model.forward(ids).resid_pre[1][0])


def test_tiny_configs_cover_attention_variants(setup):
    """What the identity tests rely on: GQA, q/k norms, two RoPE bases, soft-capping, learned positions."""
    model, ids, reps = setup
    attn = model.family.attn_module(model.blocks[0])
    name = model.family.name
    if name != "gpt2":
        assert model.config.num_key_value_heads < model.n_heads  # GQA
    assert hasattr(attn, "q_norm") == (name in ("qwen3", "gemma3"))
    if name == "gemma2":
        assert model.config.attn_logit_softcapping
    if name == "gemma3":
        x = torch.zeros(1, 6, model.d_model)
        ropes = model.family.rope(model, x, 6)
        cos_local, cos_global = ropes["sliding_attention"][0], ropes["full_attention"][0]
        assert not torch.allclose(cos_local, cos_global)  # local and global layers rotate differently
        assert set(model.layer_types) == {"sliding_attention", "full_attention"}
    if name == "gpt2":
        assert hasattr(model.body, "wpe")
        assert "pos_embed" in components(reps["clt"]).constants


# ---------------------------------------------------------------------- removal in the frozen model
def frozen_stream(model, rep, layer, *, feature=None, error=None, token=None):
    """resid_pre[layer] [T, D] of the frozen model (the adapter's own forward with frozen patterns/scales) with
    one node removed: its output vector subtracted where it is written."""
    tc = rep.tc
    leaf = rep.mlp_out - (rep.skip if rep.skip is not None else 0)
    delta = torch.zeros_like(leaf)
    emb_delta = torch.zeros_like(rep.embed)
    if feature is not None:
        f = rep.features
        s, p = int(f.layer[feature]), int(f.pos[feature])
        w = tc.feature_writes(s, f.index[feature:feature + 1], f.act[feature:feature + 1])[0].detach()
        delta[s:s + w.shape[0], p] -= w
    if error is not None:
        delta[error[0], error[1]] -= rep.error[error[0], error[1]]
    if token is not None:  # the token's own embedding (GPT-2's learned position is a constant component)
        emb_delta[token] -= model.hf.get_input_embeddings()(rep.ids[token:token + 1])[0].detach()

    def mlp_hook(layer_, m_in, m_out):
        out = (leaf[layer_] + delta[layer_])[None]
        if tc.W_skip is not None:
            out = out + m_in @ tc.W_skip[layer_]
        return out

    with torch.no_grad():
        trace = model.forward(rep.ids, frozen=rep.frozen, mlp_hook=mlp_hook, embed_hook=lambda x: x + emb_delta[None])
    return trace.resid_pre[layer][0]


def independent_projection(model, rep, layer, monkeypatch):
    """q(x, pos) [H, Dh] and k(x, pos) [K, Dh] of a stream x [D], with HF's modules and norms frozen at the
    reference pass: each norm replaced by its reference output/input ratio (RMS norms: x·s·w is elementwise
    linear in x) or, for GPT-2's LayerNorm, its reference 1/std; RoPE from transformers' own function with the
    (cos, sin) HF passed the layer."""
    block = model.blocks[layer]
    attn = model.family.attn_module(block)
    norm = model.family.norms(block)["attn_in"]
    seen = {}
    hooks = [norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", (i[0][0], o[0])))]
    if hasattr(attn, "q_norm"):
        hooks.append(attn.q_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("q", (i[0][0], o[0]))))
        hooks.append(attn.k_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("k", (i[0][0], o[0]))))
    hooks.append(attn.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("pe", kw.get("position_embeddings")),
                                                with_kwargs=True))
    with torch.no_grad():
        model.hf(input_ids=rep.ids[None])
    for h in hooks:
        h.remove()
    module = sys.modules[type(attn).__module__]
    gpt2 = model.family.name == "gpt2"

    def normed(x, pos):
        xin, xout = seen["norm"]
        if gpt2:
            ref = xin[pos]
            s = torch.rsqrt(ref.var(unbiased=False) + norm.eps)
            return (x - x.mean()) * s * norm.weight + norm.bias
        return x * (xout[pos] / xin[pos])

    def project(x, pos, side):
        h = normed(x, pos)[None, None]
        if gpt2:
            q, k, _ = attn.c_attn(h).split(attn.split_size, dim=2)
            y = (q if side == "q" else k).view(1, 1, -1, attn.head_dim)
        else:
            y = (attn.q_proj if side == "q" else attn.k_proj)(h).view(1, 1, -1, attn.head_dim)
            if side in seen:  # [T, n, Dh] (Qwen 3) or [n, T, Dh] (Gemma 3 norms after the transpose)
                yin, yout = (t if t.shape[0] == rep.n_pos else t.transpose(0, 1) for t in seen[side])
                y = y * (yout[pos] / yin[pos])[None, None]
        y = y.transpose(1, 2)  # [1, n, 1, Dh]
        if seen.get("pe") is not None:
            cos, sin = seen["pe"]
            y, _ = module.apply_rotary_pos_emb(y, y, cos[:, pos:pos + 1], sin[:, pos:pos + 1])
        return y[0, :, 0]

    return project


def test_removing_a_component_moves_the_score_by_its_terms(setup, monkeypatch):
    model, ids, reps = setup
    rep = reps["clt"]
    T, layer, head = rep.n_pos, model.n_layers - 1, model.n_heads - 1
    qp, kp = T - 1, T // 2
    (res,) = qk_attributions(rep, [HeadQuery(layer, head, qp, kp)])
    comp = res.comp
    project = independent_projection(model, rep, layer, monkeypatch)
    scale = model.family.attn_module(model.blocks[layer]).scaling
    x_ref = reference_stream(rep, layer)

    def score(xq, xk):
        return float(project(xq[qp], qp, "q")[head] @ project(xk[kp], kp, "k")[res.kv_head] * scale)

    base = score(x_ref, x_ref)
    assert abs(base - res.score_terms) <= tolerance(res)
    terms = res.terms
    nf = comp.n_features
    qm = res.query_marginals()
    # the feature with the largest query-side marginal, one that acts at the key, an error and a token
    f_q = int(qm[:nf].abs().argmax())
    f_k = int(res.key_marginals()[:nf].abs().argmax())
    cases = [("feature", f_q, {"feature": f_q}), ("feature", f_k, {"feature": f_k}),
             ("error", comp.error_col(1, kp), {"error": (1, kp)}), ("token", comp.token_col(kp), {"token": kp})]
    checked = 0
    for _, col, removal in cases:
        x_new = frozen_stream(model, rep, layer, **removal)
        size = 1e-5 * max(abs(base), float(terms.abs().sum()))
        # query side only, key side only, both
        assert abs(score(x_new, x_ref) - (base - float(terms[col].sum()))) <= size
        assert abs(score(x_ref, x_new) - (base - float(terms[:, col].sum()))) <= size
        both = base - float(terms[col].sum()) - float(terms[:, col].sum()) + float(terms[col, col])
        assert abs(score(x_new, x_new) - both) <= size
        checked += float(terms[col].abs().sum() + terms[:, col].abs().sum()) > 1e-3 * abs(base)
    assert checked >= 2  # the removals moved the score: the check above could fail
