"""An activation source over tensors already in memory (tests, notebooks, small experiments).

Same interface as `cltrace.data` sources: `batches(batch_size, seed=)` yields endless shuffled (x, y) batches
(a fresh permutation per epoch, seeded by (seed, epoch)), and `state_dict`/`load_state_dict` resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from cltrace.errors import CltraceError


class InMemoryActivations:
    def __init__(self, x: Tensor, y: Tensor):
        if x.shape != y.shape or x.dim() != 3:
            raise CltraceError(f"x and y must both be [N, L, D], got {tuple(x.shape)} and {tuple(y.shape)}")
        self.x, self.y = x, y
        self.n_layers, self.d_model = x.shape[1], x.shape[2]
        self._state = {"seed": None, "batch_size": None, "rows": 0}
        self._resume: dict | None = None

    def batches(self, batch_size: int, *, seed: int = 0, track: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        start = 0
        if track and self._resume is not None:
            if (self._resume["seed"], self._resume["batch_size"]) != (seed, batch_size):
                raise CltraceError("resume with the batch_size and seed of the saved state")
            start, self._resume = self._resume["rows"], None
        if track:
            self._state = {"seed": seed, "batch_size": batch_size, "rows": start}
        return self._serve(batch_size, seed, start, track)

    def _serve(self, batch_size: int, seed: int, rows: int, track: bool):
        n = self.x.shape[0]
        if batch_size > n:
            raise CltraceError(f"batch_size {batch_size} exceeds the {n} rows held in memory")
        per_epoch = n // batch_size  # whole batches per epoch (the tail rows of a permutation are skipped)
        b = rows // batch_size
        while True:
            epoch, i = divmod(b, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            idx = perm[i * batch_size:(i + 1) * batch_size]
            b += 1
            if track:
                self._state = {"seed": seed, "batch_size": batch_size, "rows": b * batch_size}
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
        self._state = dict(state)
