"""`cltrace validate` on the default model, Gemma-3-270M, with a random CLT calibrated on the prompts (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from test_validation import pre_of, steered_forward

from cltrace.interventions import clean_run
from cltrace.replacement import random_transcoder
from cltrace.validation import Settings, validate
from cltrace.validation.perturb import run_live

pytestmark = pytest.mark.slow

PROMPTS = ["Fact: Michael Jordan plays the sport of", "The opposite of hot is"]


@torch.no_grad()
def test_gemma_validation_matches_brute_force(gemma, tmp_path):
    tc = random_transcoder(gemma, "clt", n_features=128, active_per_layer=10, prompt=PROMPTS[0])
    res = validate(gemma, tc, PROMPTS, out=tmp_path, settings=Settings(max_features=150, sources=3, targets=5),
                   progress=False)
    f = res["summaries"]["clt"]["faithfulness"]
    assert f["n_pairs"] >= 20 and f["held_max_rel_error"] < 1e-3  # edges are the direct effects
    for path in sorted((tmp_path / "clt" / "prompts").glob("*.json")):
        r = json.loads(path.read_text())
        ids = torch.tensor(r["ids"], device=gemma.device)
        clean = gemma.forward(ids)
        # with nothing changed, the live replacement model is the model
        torch.testing.assert_close(run_live(gemma, tc, clean_run(gemma, tc, ids), []).last_logits,
                                   clean.logits[0, -1], rtol=1e-4, atol=1e-3)
        p = r["perturbations"][0]
        held, _ = steered_forward(gemma, tc, ids, tuple(p["source"]), frozen=clean.frozen, clean_out=clean.mlp_out)
        real, _ = steered_forward(gemma, tc, ids, tuple(p["source"]))
        scale = max(abs(v) for v in p["pred_direct"]) + 1e-6
        for i, t in enumerate(map(tuple, p["targets"])):
            base = pre_of(tc, clean, t)
            assert p["held"][i] == pytest.approx(pre_of(tc, held, t) - base, abs=1e-3 * scale)
            assert p["pred_direct"][i] == pytest.approx(pre_of(tc, held, t) - base, abs=1e-3 * scale)
            assert p["real"][i] == pytest.approx(pre_of(tc, real, t) - base, abs=1e-3 * scale)
    assert (tmp_path / "report.md").exists()
