"""Automatic feature labels, offline: a short heuristic from the tokens it fires on and the tokens it promotes.

    "Jordan" → " basketball"        fires most on "Jordan", promotes " basketball"
    "Jordan"/"Michael" → " sport"    two tokens share the top examples
    → " basketball"                 never fired on the corpus (only its output effect is known)

Automatic labels are a starting point for a person, who writes the real label (`FeatureDB.set_label`);
the person's label always wins. They are marked automatic wherever they are shown.
"""

from __future__ import annotations

import json
from collections import Counter


def quote(token: str, max_chars: int = 16) -> str:
    """A token as a short JSON-quoted string (newlines and other control characters escaped)."""
    if len(token) > max_chars:
        token = token[: max_chars - 1] + "…"
    return json.dumps(token, ensure_ascii=False)


def activating_tokens(tokens: list[str], n: int = 2) -> list[str]:
    """The most frequent of the tokens at the top examples (ties: the one at the higher-ranked example)."""
    counts = Counter(tokens)
    first = {t: i for i, t in reversed(list(enumerate(tokens)))}
    return sorted(counts, key=lambda t: (-counts[t], first[t]))[:n]


def auto_label(top_tokens: list[str], promoted: list[str]) -> str:
    """top_tokens: the token at each top example, best first; promoted: the most promoted tokens, best first."""
    act = activating_tokens(top_tokens)
    if len(act) == 2 and Counter(top_tokens)[act[1]] * 4 < len(top_tokens):  # a second token only if common
        act = act[:1]
    left = "/".join(quote(t) for t in act)
    right = quote(promoted[0]) if promoted else ""
    return f"{left} → {right}".strip() if right else left
