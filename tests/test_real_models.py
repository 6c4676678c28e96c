"""The built-in real models (slow: they load from the cache that `make test` prepares)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

MJ = "Fact: Michael Jordan plays the sport of"


def test_gemma_tokenizer_and_prediction(gemma):
    ids = gemma.tokenize(MJ)
    assert ids.tolist() == [2, 27711, 236787, 8972, 18305, 10772, 506, 7932, 529]
    assert gemma.n_layers == 18 and gemma.d_model == 640
    with torch.no_grad():
        trace = gemma.forward(ids)
    ref = gemma.logits(ids)
    torch.testing.assert_close(trace.logits, ref, rtol=1e-4, atol=1e-3)
    probs = torch.softmax(ref[0, -1], -1)
    assert gemma.tokenizer.decode([int(probs.argmax())]) == " basketball"
    assert abs(float(probs.max()) - 0.611) < 0.01  # the true model; circuit-tracer's TL backend says 0.505


def test_gemma_tokenizer_is_bpe_not_unigram(gemma):
    # transformers 4.57 built a Unigram tokenizer from this GGUF that split "Michael" into pieces
    assert gemma.decode(gemma.tokenize(" Michael Jordan")[1:]) == [" Michael", " Jordan"]


def test_smollm2_prediction(smollm):
    assert smollm.family.name == "llama"
    ids = smollm.tokenize("The capital of France is")
    with torch.no_grad():
        trace = smollm.forward(ids)
    ref = smollm.logits(ids)
    torch.testing.assert_close(trace.logits, ref, rtol=1e-4, atol=1e-3)
    assert smollm.tokenizer.decode([int(ref[0, -1].argmax())]) == " Paris"
