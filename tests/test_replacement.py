"""The local replacement model reproduces the model's logits exactly, for CLTs and PLTs on every family."""

import pytest
import torch

from cltrace.models.tiny import FAMILY_NAMES
from cltrace.replacement import build_replacement, random_transcoder

PROMPT = "Fact: Michael Jordan plays the sport of"


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def model(request, tiny_on):
    return tiny_on(request.param)


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_replacement_reproduces_logits(model, kind):
    ids = model.tokenize(PROMPT)
    tc = random_transcoder(model, kind, n_features=128, active_per_layer=20, ids=ids, skip=kind == "plt")
    rep = build_replacement(model, tc, ids)
    ref = model.logits(ids)[0]  # the plain HF forward
    assert torch.allclose(rep.forward(), ref, atol=1e-5, rtol=0)
    # realistic sparsity: the calibration puts each layer's threshold between its 20th and 21st largest
    # pre-activation on this prompt, so exactly 20 active per layer, none at BOS
    n = torch.bincount(rep.features.layer, minlength=model.n_layers)
    assert (n == 20).all(), n
    assert (rep.features.pos > 0).all()
    # the error is the true MLP output minus the transcoder's reconstruction (features off at BOS), computed here
    # directly from the model's own pass; zero at BOS and far from trivially zero elsewhere (measured max >= 2.1)
    with torch.no_grad():
        trace = model.forward(ids)
        x = torch.stack([tc.select_input(r, m)[0] for r, m in zip(trace.resid_mid, trace.mlp_in)], 1)  # [T, L, D]
        acts = tc.encode(x)
        acts[0] = 0
        direct = torch.stack([m[0] for m in trace.mlp_out], 1) - tc.decode(acts, x)  # [T, L, D]
    assert torch.allclose(rep.error[:, 1:], direct[1:].transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert rep.error[:, 0].abs().max() == 0 and rep.error[:, 1:].abs().max() > 1.0


def test_replacement_reads_resid_mid(model):
    """circuit-tracer's CLTs read the residual stream before the MLP norm."""
    ids = model.tokenize(PROMPT)
    tc = random_transcoder(model, "clt", 64, 10, ids=ids, reads="resid_mid")
    rep = build_replacement(model, tc, ids)
    assert rep.tc.cfg.reads == "resid_mid"
    assert (torch.bincount(rep.features.layer, minlength=model.n_layers) == 10).all()  # calibrated on resid_mid
    assert torch.allclose(rep.forward(), model.logits(ids)[0], atol=1e-5, rtol=0)


def test_random_transcoder_is_deterministic(model):
    ids = model.tokenize(PROMPT)
    a = random_transcoder(model, "plt", 32, 5, seed=3, ids=ids)
    b = random_transcoder(model, "plt", 32, 5, seed=3, ids=ids)
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.log_threshold, b.log_threshold)
