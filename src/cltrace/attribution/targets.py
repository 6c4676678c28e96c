"""What attribution explains: logit nodes, each a direction read at `final_normed`, last position.

A token's direction is its demeaned unembedding row W_U[t] − mean_v W_U[v] (circuit-tracer's choice), so
the node's value is logit_t − mean logit (before any soft-cap and without b_U). A contrast target "A - B"
reads W_U[a] − W_U[b], the logit difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.models.adapter import ModelAdapter


@dataclass
class Target:
    label: str  # the token as text, or "A - B"
    token: int  # vocab id; −1 for a contrast direction
    prob: float  # the model's probability (of A, for a contrast): the node's weight in pruning
    vector: Tensor  # [D] direction read at final_normed of the last position


def token_id(model: ModelAdapter, token: str | int) -> int:
    """A single-token string (or an id) -> its id; clear error when the string is several tokens."""
    if isinstance(token, int) or (isinstance(token, str) and token.lstrip("-").isdigit() and token not in
                                  model.tokenizer.get_vocab()):
        tid = int(token)
        if not 0 <= tid < model.vocab_size:
            raise CltraceError(f"token id {tid} is outside the vocabulary (size {model.vocab_size})")
        return tid
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CltraceError(f"target {token!r} is {len(ids)} tokens for this tokenizer: give a single token")
    return int(ids[0])


def select_targets(
    model: ModelAdapter, last_logits: Tensor, targets: list | None = None, *, max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
) -> list[Target]:
    """last_logits [V] -> targets: the top tokens until cumulative p ≥ desired (≤ max_n_logits), or explicit ones.

    targets: a list of tokens (str or id) and/or (A, B) pairs for logit-difference targets.
    """
    probs = torch.softmax(last_logits.float(), -1)
    W_U = model.W_U
    mean = W_U.float().mean(0)  # [D]

    def demeaned(t: int) -> Tensor:
        return W_U[t].float() - mean

    if not targets:
        top_p, top_i = probs.topk(max_n_logits)
        cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob, device=top_p.device))) + 1
        cutoff = min(cutoff, max_n_logits)
        return [Target(model.tokenizer.decode([int(t)]), int(t), float(p), demeaned(int(t)))
                for p, t in zip(top_p[:cutoff].tolist(), top_i[:cutoff].tolist())]
    out = []
    for t in targets:
        if isinstance(t, (tuple, list)):
            a, b = token_id(model, t[0]), token_id(model, t[1])
            label = f"{model.tokenizer.decode([a])} - {model.tokenizer.decode([b])}"
            out.append(Target(label, -1, float(probs[a]), W_U[a].float() - W_U[b].float()))
        else:
            tid = token_id(model, t)
            out.append(Target(model.tokenizer.decode([tid]), tid, float(probs[tid]), demeaned(tid)))
    return out
