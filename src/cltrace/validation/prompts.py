"""Where `cltrace validate` gets its prompts: the built-in set, a user's file, or contexts from a corpus.

A prompt becomes token ids once, here, and every later step works on those ids (a corpus context is ids to
begin with; decoding it to text and encoding it again need not give the same tokens back).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cltrace.data import ContextStream
from cltrace.errors import CltraceError
from cltrace.models.adapter import ModelAdapter
from cltrace.validation.default_prompts import PROMPTS


@dataclass(frozen=True)
class Prompt:
    """One prompt of the set: its text (for reports) and the token ids every measurement runs on."""

    text: str
    ids: tuple[int, ...]  # BOS first

    @property
    def key(self) -> str:
        """A short digest of the ids: names the prompt's result file, so a rerun finds it again."""
        return hashlib.sha1(json.dumps(list(self.ids)).encode()).hexdigest()[:12]

    def tensor(self, device: torch.device | str) -> Tensor:
        return torch.tensor(self.ids, dtype=torch.long, device=device)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a file: .jsonl/.json (objects with "prompt", or strings), else one prompt a line.

    In a text file, `\\n` inside a line stands for a line break (code prompts), and blank lines and lines
    starting with `#` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise CltraceError(f"no prompt file at {path}: give a text file with one prompt a line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CltraceError(f"cannot read prompt file {path} ({type(e).__name__}): give a UTF-8 text file") from e
    if path.suffix in (".jsonl", ".json"):
        try:
            items = json.loads(text) if path.suffix == ".json" else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise CltraceError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
        prompts = [it.get("prompt") if isinstance(it, dict) else it for it in items]
        if not all(isinstance(p, str) for p in prompts):
            raise CltraceError(f"{path}: every entry must be a string or an object with a \"prompt\" string")
    else:
        prompts = [line.replace("\\n", "\n") for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CltraceError(f"{path} holds no prompt: write one prompt a line")
    return prompts


def corpus_prompts(model: ModelAdapter, corpus: str | None, n: int, context_len: int) -> list[Prompt]:
    """n contexts of context_len tokens (BOS first) from the corpus' held-out split (never trained on)."""
    if context_len < 3:
        raise CltraceError(f"context length {context_len} is too short: use at least 3 tokens")
    stream = ContextStream(corpus or None, model.tokenizer, context_len, split="eval", loop=False)
    ctxs = stream.take(n)
    if len(ctxs) < n:
        raise CltraceError(f"the held-out split of corpus {corpus or 'small'} has only {len(ctxs)} contexts of "
                           f"{context_len} tokens: ask for fewer (--n) or shorter ones (--context-len)")
    return [Prompt(model.tokenizer.decode(c[1:]), tuple(int(i) for i in c)) for c in ctxs]


def load_prompts(model: ModelAdapter, prompts: str | Path | list[str] | None = None, *, n: int | None = None,
                 corpus: str | None = None, context_len: int = 16) -> list[Prompt]:
    """The prompt set: `prompts` (a list, or a file), else `n` corpus contexts when `corpus` is given, else the
    built-in set; the first n when n is given."""
    if n is not None and n < 1:
        raise CltraceError(f"--n must be at least 1, not {n}")
    if prompts is not None and corpus is not None:
        raise CltraceError("give either a prompt file or a corpus, not both")
    if corpus is not None:
        return corpus_prompts(model, corpus, n or 50, context_len)
    texts = read_prompt_file(prompts) if isinstance(prompts, (str, Path)) else \
        list(PROMPTS) if prompts is None else list(prompts)
    if not texts:
        raise CltraceError("the prompt list is empty: give at least one prompt")
    texts = texts[:n] if n else texts
    out = []
    for t in texts:
        ids = model.tokenize(t)
        if ids.numel() < 2:
            raise CltraceError(f"prompt {t!r} has no token after BOS: give some text")
        out.append(Prompt(t, tuple(ids.tolist())))
    return out
