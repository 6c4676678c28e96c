"""Documents -> fixed-length token contexts, with a held-out split and a resumable position.

Packing: the token stream is doc0, SEP, doc1, SEP, ... with SEP = [EOS, BOS] (just [EOS] when the tokenizer
has one token for both, as GPT-2 does). Each context of `context_len` tokens starts with BOS: either the
stream's next token already is BOS (a document starts there) or a BOS is put in front of the next
context_len - 1 stream tokens. So no stream token is lost or repeated, and every context looks to the
model like the start of a text, as in its training (and as `ModelAdapter.tokenize` feeds prompts).
A last partial context at the end of a (non-looping) corpus is dropped.

Held-out split: a document is held out when the hash of its text falls in the first `heldout_frac` of
the hash range, so the split is stable whatever the corpus order, and train and eval are disjoint.

Position: `Position(epoch, doc, offset)` names the next stream token (document `doc` of the split,
`offset` tokens into doc + SEP). Restarting a `ContextStream` at a saved position skips the earlier
documents without tokenizing them, which is what makes resuming training cheap.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cltrace.data.corpus import open_corpus
from cltrace.errors import CltraceError

CorpusLike = str | os.PathLike | None | Sequence[str]  # a corpus spec (see open_corpus) or the documents


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    doc: int = 0
    offset: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.doc, self.offset]


def is_heldout(text: str, frac: float) -> bool:
    """Whether a document belongs to the held-out split (a deterministic function of its text)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big")
    return h < frac * 2**64


def split_docs(docs: Iterator[str], split: str, heldout_frac: float) -> Iterator[str]:
    """Keep the documents of `split`: "train" (not held out), "eval" (held out) or "all"."""
    if split == "all":
        return docs
    if split not in ("train", "eval"):
        raise CltraceError(f"unknown split {split!r}: use 'train', 'eval' or 'all'")
    want = split == "eval"
    return (d for d in docs if is_heldout(d, heldout_frac) == want)


def open_docs(corpus: CorpusLike, *, text_field: str = "text") -> Iterator[str]:
    """Documents of a corpus spec, or of an in-memory list of strings."""
    if isinstance(corpus, (list, tuple)):
        return iter(corpus)
    return open_corpus(corpus, text_field=text_field)


def special_tokens(tokenizer) -> tuple[int, list[int], set[int]]:
    """(bos, separator, all special ids) for packing; GPT-2 style tokenizers use EOS as BOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise CltraceError("the tokenizer has neither a BOS nor an EOS token: cannot separate documents")
    bos = bos if bos is not None else eos
    sep = [bos] if eos is None else ([eos] if eos == bos else [eos, bos])
    specials = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None} | {bos, *sep}
    return int(bos), [int(t) for t in sep], specials


def tokenize_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (fast tokenizers do the batch in parallel)."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


class ContextStream:
    """Iterator of contexts (lists of `context_len` token ids, BOS first) over a corpus split.

    loop=True starts the corpus again when it ends (epoch + 1), so the stream never ends; `position`
    is where the next context starts, and `ContextStream(..., start=position)` resumes there.
    """

    def __init__(
        self, corpus: CorpusLike, tokenizer, context_len: int, *, split: str = "train",
        heldout_frac: float = 0.02, loop: bool = True, start: Position = Position(),
        text_field: str = "text", tokenize_chunk: int = 32,
    ):
        if context_len < 2:
            raise CltraceError(f"context_len must be at least 2 (BOS and one token), not {context_len}")
        self.corpus, self.tokenizer, self.context_len = corpus, tokenizer, context_len
        self.split, self.heldout_frac, self.loop = split, heldout_frac, loop
        self.text_field, self.tokenize_chunk = text_field, tokenize_chunk
        self.bos, self.sep, self.special_ids = special_tokens(tokenizer)
        self.tokens_read = 0  # stream tokens consumed by this object (excludes the BOS put in front)
        self._epoch = start.epoch
        self._doc = start.doc - 1  # index of the unit in self._unit
        self._unit: list[int] = []
        self._off = 0
        self._units = self._open_epoch(start.doc)
        self._pending_offset = start.offset
        self._start = start
        self._started = False

    # ------------------------------------------------------------------ reading documents
    def _open_epoch(self, skip: int) -> Iterator[list[int]]:
        docs = split_docs(open_docs(self.corpus, text_field=self.text_field), self.split, self.heldout_frac)
        docs = itertools.islice(docs, skip, None)
        return self._tokenized(docs)

    def _tokenized(self, docs: Iterator[str]) -> Iterator[list[int]]:
        while chunk := list(itertools.islice(docs, self.tokenize_chunk)):
            for ids in tokenize_batch(self.tokenizer, chunk):
                yield list(ids) + self.sep

    def _next_unit(self) -> bool:
        """Load the next document (+ SEP) into self._unit; False when the corpus ended and loop is off."""
        unit = next(self._units, None)
        if unit is None:
            if not self.loop:
                return False
            self._epoch += 1
            self._doc = -1
            self._units = self._open_epoch(0)
            unit = next(self._units, None)
            if unit is None:
                raise CltraceError(
                    f"the corpus has no documents in the {self.split!r} split: use split='all', a larger "
                    "corpus, or another heldout_frac"
                )
        self._doc += 1
        self._unit = unit
        self._off = min(self._pending_offset, len(unit))
        self._pending_offset = 0
        self._started = True
        return True

    def _ensure(self) -> bool:
        while self._off >= len(self._unit):
            if not self._next_unit():
                return False
        return True

    # ------------------------------------------------------------------ contexts
    @property
    def position(self) -> Position:
        """Where the next context starts (the next unread stream token)."""
        if not self._started:  # nothing read yet: the start position as given
            return self._start
        if self._off >= len(self._unit):
            return Position(self._epoch, self._doc + 1, 0)
        return Position(self._epoch, self._doc, self._off)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if not self._ensure():
            raise StopIteration
        ctx: list[int] = [] if self._unit[self._off] == self.bos else [self.bos]
        n0 = len(ctx)
        while len(ctx) < self.context_len:
            if not self._ensure():
                raise StopIteration  # a last partial context is dropped
            take = min(self.context_len - len(ctx), len(self._unit) - self._off)
            ctx.extend(self._unit[self._off:self._off + take])
            self._off += take
        self.tokens_read += len(ctx) - n0
        return ctx

    def take(self, n: int) -> list[list[int]]:
        """Up to n next contexts (fewer only at the end of a non-looping corpus)."""
        return list(itertools.islice(self, n))
