"""The local replacement model on the default model (Gemma-3-270M)."""

import pytest

from cltrace.replacement import build_replacement, random_transcoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from cltrace.models.registry import is_ready, load_model

    if not is_ready("gemma-3-270m"):
        pytest.skip("gemma-3-270m not prepared (`cltrace models --prepare`)")
    return load_model("gemma-3-270m")


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_replacement_reproduces_gemma_logits(gemma, kind):
    ids = gemma.tokenize("Fact: Michael Jordan plays the sport of")
    tc = random_transcoder(gemma, kind, n_features=512, active_per_layer=40, ids=ids)
    rep = build_replacement(gemma, tc, ids)
    ref = gemma.logits(ids)[0]
    assert (rep.forward() - ref).abs().max() < 1e-3 * ref.abs().max()
    assert (rep.forward()[-1] - ref[-1]).abs().max() < 2e-4
