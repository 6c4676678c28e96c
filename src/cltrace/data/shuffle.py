"""Serving random batches from a stream of blocks, resumable exactly.

Both activation sources (from the model, from a disk cache) produce *blocks*: a bounded number of token
rows held in one preallocated buffer. A block's rows are served in a random order (a permutation seeded
by (seed, block index)), batch after batch; a batch that straddles two blocks takes the rest of one and
the start of the next. So memory is one block whatever the corpus size, and every batch mixes tokens
from about a block's worth of contexts.

Why blocks and not a buffer that is refilled when half empty: with a half-refill buffer the rows in memory
depend on the whole history, so resuming after K steps needs either the buffer in the checkpoint
(gigabytes) or replaying the K steps. Here the state is four integers and a block key (where the block
starts in the corpus); resuming regenerates one block and skips the rows already served, so a resumed
run yields exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cltrace.errors import CltraceError


@dataclass
class Block:
    index: int  # global block number (0, 1, 2, ...)
    key: Any  # JSON-able: enough to regenerate this block and the ones after it
    next_key: Any  # the key of the following block
    x: Tensor  # [n, L, D] (a view into the producer's buffer, valid until the next block is asked for)
    y: Tensor  # [n, L, D]


@dataclass
class ServeState:
    """Where a batch sequence stands: `rows` served, and the block that holds the next unserved row."""

    seed: int
    batch_size: int
    batches: int = 0
    rows: int = 0
    block_index: int = 0
    block_key: Any = None
    block_row_start: int = 0  # global row number of that block's first row

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> ServeState:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise CltraceError(f"not an activation-source state (missing {e}): was it saved by cltrace?") from e


def block_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)


def serve(
    make_blocks: Callable[[Any, int], Iterator[Block]], state: ServeState,
    on_state: Callable[[ServeState], None] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches (x [B, L, D], y [B, L, D]) from blocks, starting where `state` says.

    make_blocks(key, index) must yield the block with that key and index, then the following ones.
    on_state is called with the state after each batch (what `state_dict` reports).
    """
    bs = state.batch_size
    skip = state.rows - state.block_row_start  # rows of the first block already served
    row = state.block_row_start  # global row number of the current block's first row
    carry: list[tuple[Tensor, Tensor]] = []  # (x, y) pieces of a batch started in earlier blocks
    carry_n = 0
    for block in make_blocks(state.block_key, state.block_index):
        n = block.x.shape[0]
        perm = torch.randperm(n, generator=block_generator(state.seed, block.index))
        i, skip = skip, 0
        while True:
            take = min(bs - carry_n, n - i)
            if take > 0:
                idx = perm[i:i + take]
                carry.append((block.x[idx], block.y[idx]))  # indexing copies: safe once the buffer refills
                carry_n += take
                i += take
            if carry_n < bs:
                break  # this block is used up; the batch continues in the next one
            x = carry[0][0] if len(carry) == 1 else torch.cat([c[0] for c in carry])
            y = carry[0][1] if len(carry) == 1 else torch.cat([c[1] for c in carry])
            carry, carry_n = [], 0
            state.batches += 1
            state.rows += bs
            if i < n:  # the next row is in this block
                state.block_index, state.block_key, state.block_row_start = block.index, block.key, row
            else:  # this block is done: the next row is the next block's first
                state.block_index, state.block_key, state.block_row_start = block.index + 1, block.next_key, row + n
            if on_state is not None:
                on_state(state)
            yield x, y
        row += n


class BlockSource:
    """The batches/state_dict/load_state_dict part of an activation source built on `serve`.

    Subclasses set n_layers, d_model and define `config()` (what must match to resume) and
    `_blocks(seed, key, index)` (the blocks from `key` on).
    """

    _state: ServeState | None = None  # after the last batch of the tracked sequence
    _resume: ServeState | None = None  # where the next batches() call starts
    rank: int = 0  # data-parallel share: this source serves share `rank` of `world`
    world: int = 1

    def _set_share(self, rank: int, world: int) -> None:
        """Serve share `rank` of `world` disjoint shares; `batches(B)` then yields B / world rows a batch."""
        if world < 1 or not 0 <= rank < world:
            raise CltraceError(f"a data share needs 0 <= rank < world, not rank={rank}, world={world}")
        self.rank, self.world = int(rank), int(world)

    def _share_config(self) -> dict:
        """Part of config(): a share resumes only as the same share (absent for the whole stream)."""
        return {"share": [self.rank, self.world]} if self.world > 1 else {}

    def local_batch_size(self, batch_size: int) -> int:
        """Rows of one batch of this share: the global batch_size divided by world."""
        if batch_size % self.world:
            raise CltraceError(f"batch size {batch_size} is not a multiple of the {self.world} data-parallel ranks")
        return batch_size // self.world

    def config(self) -> dict:
        raise NotImplementedError

    def _blocks(self, seed: int, key: Any, index: int) -> Iterator[Block]:
        raise NotImplementedError

    def batches(self, batch_size: int, *, seed: int = 0, track: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless random batches x, y [batch_size, L, D] float32 ([batch_size / world, L, D] for a share:
        batch_size is the global batch, of which this share serves its part).

        Starts where `load_state_dict` said, else at the start. track=False starts at the start and leaves
        `state_dict` alone (for side passes such as estimating normalization scales).
        """
        if batch_size < 1:
            raise CltraceError(f"batch_size must be positive, not {batch_size}")
        batch_size = self.local_batch_size(batch_size)
        state = ServeState(seed, batch_size)
        if track and self._resume is not None:
            state, self._resume = self._resume, None
            if (state.batch_size, state.seed) != (batch_size, seed):
                raise CltraceError(
                    f"the saved state was for batch_size={state.batch_size}, seed={state.seed}; resume with "
                    f"those (asked batch_size={batch_size}, seed={seed})"
                )
        on_state = None
        if track:
            self._state = ServeState(**state.as_dict())
            on_state = lambda s: setattr(self, "_state", ServeState(**s.as_dict()))  # noqa: E731
        return serve(lambda key, index: self._blocks(seed, key, index), state, on_state)

    @property
    def tokens_seen(self) -> int:
        """Rows (tokens) served by the tracked batch sequence since its very start (resumes included)."""
        return self._state.rows if self._state is not None else 0

    def state_dict(self) -> dict:
        """JSON-able: the source's config and where its batch sequence stands."""
        state = self._state or self._resume
        return {"config": self.config(), "serve": state.as_dict() if state else None}

    def load_state_dict(self, state: dict) -> None:
        """Make the next `batches()` call continue the saved sequence (same config, batch size and seed)."""
        saved = state.get("config") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise CltraceError("not an activation-source state (no 'config'): was it saved by state_dict()?")
        now = self.config()
        diff = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in {**saved, **now}
                if saved.get(k) != now.get(k)]
        if diff:
            raise CltraceError("cannot resume: the activation source differs from the saved one ("
                               + "; ".join(diff) + "); use the same settings")
        if state.get("serve"):
            self._resume = ServeState.from_dict(state["serve"])
            self._state = ServeState(**self._resume.as_dict())
