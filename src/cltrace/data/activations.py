"""MLP activations from a model, streamed: what transcoders train on.

For each token a transcoder needs x [L, D] (every layer's MLP input, `Trace.mlp_in`) and y [L, D] (every
layer's MLP output, `Trace.mlp_out`). `harvest` runs one batch of contexts with `stop_at_layer=n_layers`
(the unembedding, the largest matrix of small models, is skipped) and keeps the positions worth training
on; `StreamingActivations` turns a corpus into an endless, shuffled, resumable stream of such rows.

Excluded by default (keep_special=True keeps them):
* BOS (position 0 of every context) and any other special token (EOS/BOS separators between documents,
  padding): their activations are outliers by design, thousands of times the norm of ordinary tokens in
  some models, and would dominate a squared-error loss while telling nothing about the text;
* optionally (outlier_factor), attention-sink positions whose residual-stream norm exceeds
  outlier_factor times the batch median at some layer.

precision="bf16" runs the model's matmuls under bf16 autocast (the residual stream and the norms stay fp32).
On a CPU with AVX512-BF16 that is 3.3x faster (Gemma-3-270M, 2 cores: 3,070 against 922 tok/s), and the rows
differ from fp32's by 0.4-2.5% (relative norm of the difference, growing with depth), far below any
transcoder's error (docs/training.md measures both), so a time budget collects 3x the tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from cltrace.data.shuffle import Block, BlockSource
from cltrace.data.tokens import ContextStream, CorpusLike, Position, special_tokens
from cltrace.errors import CltraceError


@runtime_checkable
class ActivationSource(Protocol):
    """What the trainer reads: endless random batches of (x, y) rows, and a resumable position."""

    n_layers: int
    d_model: int

    def batches(self, batch_size: int, *, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """x [N, L, D], y [N, L, D] float32."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------------- one batch of contexts
def keep_mask(ids: Tensor, special_ids: set[int] | Tensor, *, keep_special: bool = False,
              resid_norms: Tensor | None = None, outlier_factor: float | None = None) -> Tensor:
    """[B, T] bool: the positions to train on.

    resid_norms [L, B, T]: residual-stream norms, used when outlier_factor is set.
    """
    keep = torch.ones_like(ids, dtype=torch.bool)
    if keep_special:
        return keep
    keep[:, 0] = False  # always BOS in packed contexts
    special = torch.as_tensor(sorted(special_ids), dtype=ids.dtype, device=ids.device)
    keep &= ~torch.isin(ids, special)
    if outlier_factor is not None and resid_norms is not None and keep.any():
        median = resid_norms[:, keep].median(dim=1).values  # [L] over kept positions
        outlier = (resid_norms > outlier_factor * median[:, None, None]).any(dim=0)  # [B, T]
        keep &= ~outlier
    return keep


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CltraceError(f"unknown collection precision {precision!r}: use fp32 or bf16")
    return precision


@torch.no_grad()
def harvest(model, ids: Tensor, special_ids: set[int], *, keep_special: bool = False,
            outlier_factor: float | None = None, precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Run contexts ids [B, T] through the model; x, y [N, L, D] float32 for the kept positions, on the
    model's device (a GPU's rows stay on it: copying them to the host and back cost more than the step).
    precision: "fp32", or "bf16" for the model's matmuls under bf16 autocast (see the module docstring)."""
    ids = ids.to(model.device)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16"):
        trace = model.forward(ids, stop_at_layer=model.n_layers)
    norms = None
    if outlier_factor is not None:
        norms = torch.stack([r.float().norm(dim=-1) for r in trace.resid_mid])  # [L, B, T]
    keep = keep_mask(ids, special_ids, keep_special=keep_special, resid_norms=norms,
                     outlier_factor=outlier_factor)
    x = torch.stack([m[keep] for m in trace.mlp_in], dim=1)  # [N, L, D]
    y = torch.stack([m[keep] for m in trace.mlp_out], dim=1)
    return x.float(), y.float()


# ---------------------------------------------------------------------- the streaming source
def default_buffer_tokens(n_layers: int, d_model: int, buffer_mb: float = 2048.0,
                          max_tokens: int = 1 << 16) -> int:
    """Rows of x and y (float32) that fit in buffer_mb, at most max_tokens (tiny models need no more)."""
    row_bytes = 2 * n_layers * d_model * 4
    return max(1, min(max_tokens, int(buffer_mb * 2**20 // row_bytes)))


class StreamingActivations(BlockSource):
    """(x, y) rows computed from a corpus on the fly, in random batches, with bounded memory.

    The shuffling buffer holds `buffer_tokens` rows (plus one model batch of overflow): it is filled from
    the model, served in a random order, refilled (see `cltrace.data.shuffle` for why blocks). A batch
    mixes tokens from about buffer_tokens / context_len contexts. Memory: 8 * L * D bytes a row
    (Gemma-3-270M: 92 KB, so the default 2 GB holds ~23k tokens).

    Resuming: `state_dict()` after K batches, then on a new object `load_state_dict(state)` and
    `batches(same batch_size, seed=same seed)` yields exactly batches K+1, K+2, ... of the
    uninterrupted run, recomputing at most one buffer.

    Data parallel: `rank=r, world=W` makes this the share of data rank r: it runs the model only on
    contexts r, r+W, r+2W, ... of the packed stream (the shares of the W ranks are disjoint and together
    are exactly the contexts of world=1), and `batches(B)` yields B / W rows a batch. Every rank still
    reads and tokenizes the whole stream (cheap next to the model) so that the context numbering agrees.
    The state is this share's own; resuming needs the same rank and world.

    precision: the model's matmuls in "fp32" or under "bf16" autocast (see the module docstring).
    """

    def __init__(
        self, model, corpus: CorpusLike = None, *, context_len: int = 128, buffer_tokens: int | None = None,
        model_batch: int = 8, keep_special: bool = False, outlier_factor: float | None = None,
        split: str = "train", heldout_frac: float = 0.02, loop: bool = True, text_field: str = "text",
        buffer_mb: float = 2048.0, rank: int = 0, world: int = 1, precision: str = "fp32",
    ):
        if context_len > model.n_ctx:
            raise CltraceError(f"context_len {context_len} exceeds the model's {model.n_ctx} positions")
        if model_batch < 1:
            raise CltraceError(f"model_batch must be positive, not {model_batch}")
        self.model = model
        self.corpus = corpus
        self.n_layers, self.d_model = model.n_layers, model.d_model
        self.context_len, self.model_batch = context_len, model_batch
        self.keep_special, self.outlier_factor = keep_special, outlier_factor
        self.precision = check_precision(precision)
        self.split, self.heldout_frac, self.loop, self.text_field = split, heldout_frac, loop, text_field
        self.buffer_tokens = buffer_tokens or default_buffer_tokens(self.n_layers, self.d_model, buffer_mb)
        self.capacity = self.buffer_tokens + model_batch * context_len  # rows the buffer can ever hold
        _, _, self.special_ids = special_tokens(model.tokenizer)
        self.buffer: tuple[Tensor, Tensor] | None = None  # the last allocated [capacity, L, D] x and y
        self.model_tokens = 0  # tokens run through the model by this object (including excluded ones)
        self._set_share(rank, world)

    # ------------------------------------------------------------------ identity of the stream
    def config(self) -> dict:
        """What must match for a saved state to be resumed."""
        corpus = self.corpus if self.corpus is None or isinstance(self.corpus, str) else (
            os.fspath(self.corpus) if isinstance(self.corpus, os.PathLike) else f"<{len(self.corpus)} documents>")
        return {
            "kind": "streaming", "model": self.model.name, "corpus": corpus, "context_len": self.context_len,
            "buffer_tokens": self.buffer_tokens, "model_batch": self.model_batch,
            "keep_special": self.keep_special, "outlier_factor": self.outlier_factor, "split": self.split,
            "heldout_frac": self.heldout_frac, **self._share_config(),
            # absent for fp32, so states saved before the setting existed still resume
            **({"precision": self.precision} if self.precision != "fp32" else {}),
        }

    # ------------------------------------------------------------------ blocks
    def _allocate(self) -> tuple[Tensor, Tensor]:
        """The buffer of one batch sequence: [capacity, L, D] x and y, allocated once and refilled.

        Each `batches()` iterator has its own (a side pass must not overwrite the training stream's rows);
        the last one stays visible as `self.buffer` for inspection.
        """
        shape = (self.capacity, self.n_layers, self.d_model)
        device = self.model.device  # the buffer lives where the model runs (GPU memory on a GPU)
        self.buffer = (torch.empty(shape, device=device), torch.empty(shape, device=device))
        return self.buffer

    def contexts(self, start: Position | None = None) -> ContextStream:
        """The packed token contexts this source runs the model on, from `start`."""
        return ContextStream(
            self.corpus, self.model.tokenizer, self.context_len, split=self.split,
            heldout_frac=self.heldout_frac, loop=self.loop, start=start or Position(), text_field=self.text_field,
        )

    def _blocks(self, seed: int, key: Any, index: int) -> Iterator[Block]:
        stream = self.contexts(Position(*key) if key is not None else Position())
        bx, by = self._allocate()
        while True:
            start = stream.position
            n = 0
            while n < self.buffer_tokens:
                group = stream.take(self.model_batch * self.world)  # block keys stay at multiples of W contexts
                if not group:
                    break
                ctxs = group[self.rank::self.world]  # this share's contexts: r, r+W, ...
                if not ctxs:
                    continue  # the short last group of a non-looping corpus
                x, y = harvest(self.model, torch.tensor(ctxs), self.special_ids,
                               keep_special=self.keep_special, outlier_factor=self.outlier_factor,
                               precision=self.precision)
                self.model_tokens += len(ctxs) * self.context_len
                bx[n:n + len(x)] = x
                by[n:n + len(y)] = y
                n += len(x)
            if n == 0:
                return
            yield Block(index, start.as_list(), stream.position.as_list(), bx[:n], by[:n])
            index += 1
