"""Sampling with interventions held: one full forward pass per new token (no KV cache at these sizes).

Recomputing the whole sequence each step keeps the semantics simple: an intervention at every position
(pos None) also acts on each generated token, one at a fixed prompt position stays there, and in
constrained mode each step runs inside the local replacement model of the sequence so far.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor], Tensor]  # ids [T] -> next-token logits [V]


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(step: StepFn, ids: Tensor, n_tokens: int, *, temperature: float = 0.0, seed: int = 0,
             stop: int | None = None, max_len: int | None = None) -> list[int]:
    """ids [T] -> up to n_tokens new ids; stops after `stop` (end of text) or at max_len tokens in all."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    for _ in range(n_tokens):
        if max_len is not None and ids.numel() >= max_len:
            break
        tok = sample(step(ids).cpu(), temperature, gen)
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([tok], dtype=ids.dtype, device=ids.device)])
        if tok == stop:
            break
    return out
