"""Attribution on the default model (Gemma-3-270M): exact, and right where circuit-tracer 0.5.0 is wrong.

circuit-tracer's TransformerLens backend gives every Gemma-3 layer the last block's RoPE (p(" basketball")
0.505 instead of 0.611), and its nnsight backend leaves √d_model out of token edges. Both are checked here
against the plain HF forward and a direct computation.
"""

import pytest
import torch

from cltrace.attribution import attribute
from cltrace.replacement import build_replacement, random_transcoder

pytestmark = pytest.mark.slow
PROMPT = "Fact: Michael Jordan plays the sport of"


@pytest.fixture(scope="module")
def setup():
    from cltrace.models.registry import is_ready, load_model

    if not is_ready("gemma-3-270m"):
        pytest.skip("gemma-3-270m not prepared (`cltrace models --prepare`)")
    model = load_model("gemma-3-270m")
    ids = model.tokenize(PROMPT)
    tc = random_transcoder(model, "clt", 256, 10, ids=ids, reads="resid_mid")
    return model, ids, tc, attribute(model, tc, ids, batch_size=64)


def test_logit_targets_follow_the_hf_forward(setup):
    model, ids, tc, g = setup
    assert ids.tolist() == [2, 27711, 236787, 8972, 18305, 10772, 506, 7932, 529]
    p = torch.softmax(model.logits(ids)[0, -1].float(), -1)  # the plain HF forward
    assert g.logit_labels[0] == " basketball"
    assert abs(float(g.logit_probs[0]) - 0.611) < 0.005  # circuit-tracer TL: 0.505
    assert torch.allclose(g.logit_probs, p[g.logit_tokens], atol=1e-5)
    assert g.meta["max_logit_error"] < 1e-3


def test_rows_sum_to_values(setup):
    g = setup[3]
    err = (g.edges.sum(1) + g.row_constant - g.row_value).abs()
    assert (err <= 1e-3 + 1e-4 * g.row_value.abs()).all()


def test_token_edges_include_the_embedding_scale(setup):
    """A token edge equals the target's change when that token's embedding (√d_model·W_E[tok]) is removed."""
    model, ids, tc, g = setup
    rep = build_replacement(model, tc, ids)
    raw = model.hf.get_input_embeddings().weight[ids]
    assert torch.allclose(rep.embed, raw * model.d_model**0.5, rtol=1e-2)  # the nodes' output vectors
    leaf = rep.mlp_out
    T = ids.numel()

    def run(pos=None):
        def embed_hook(x):
            if pos is None:
                return x
            x = x.clone()
            x[0, pos] = 0
            return x

        return model.forward(ids, frozen=rep.frozen, mlp_hook=lambda layer, i, o: leaf[layer][None],
                             embed_hook=embed_hook)

    base = run()
    vec = torch.stack([model.W_U[int(t)] for t in g.logit_tokens]) - model.W_U.float().mean(0)
    for pos in (T - 1, T - 3):
        pert = run(pos)
        change = vec @ (base.final_normed[0, -1] - pert.final_normed[0, -1])  # logit rows
        got = g.edges[-g.n_logits:, g.token_index(pos)]
        assert torch.allclose(got, change, rtol=1e-3, atol=1e-3 * float(change.abs().max()))
        assert change.abs().max() > 0.1  # 25× too small would fail
