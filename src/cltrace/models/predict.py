"""Next-token predictions: the simplest question to ask a model, and a check that it loaded right."""

from __future__ import annotations

import torch

from cltrace.errors import CltraceError


@torch.no_grad()
def predict(model, prompt: str, top: int = 10) -> list[dict]:
    """Top next tokens after `prompt`: [{"token", "id", "prob"}], most likely first."""
    if top < 1:
        raise CltraceError("top must be at least 1")
    ids = model.tokenize(prompt)
    probs = torch.softmax(model.logits(ids)[0, -1].float(), dim=-1)
    values, indices = probs.topk(min(top, probs.numel()))
    return [
        {"token": model.tokenizer.decode([int(i)]), "id": int(i), "prob": float(v)}
        for v, i in zip(values, indices)
    ]
