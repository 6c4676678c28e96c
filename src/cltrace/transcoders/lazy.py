"""Transcoder weights read from disk on demand: encoders one layer at a time, decoders one feature row at a time.

A transcoder loaded with `load_transcoder(folder, lazy=True)` keeps its small parameters (biases, thresholds,
the skip term) in memory and its encoder W_enc and decoders W_dec on disk. `Transcoder` asks its `store` for

    encoder(layer)              [D, F]          one layer's encoder (what `pre_acts` multiplies by)
    decoder_rows(layer, idx)    [n, n_out, D]   the decoder rows of listed features (what fires on a prompt)

so attribution, interventions and the feature database read only the encoder layers they apply and the
decoder rows of the features that fire: peak memory grows with one layer's encoder plus the active rows, not
with the dictionary. Values are bit for bit those of eager loading: the same bytes, with the same elementwise
conversions (dtype, circuit-tracer's transposed encoder, a checkpoint's folded normalization).

Reads use `os.preadv` into fresh tensors, not `mmap`: a mapped file that is truncated under the map kills the
process with SIGBUS, and mapped pages count as this process's resident memory until the kernel reclaims them.
Every file's size and modification time are recorded when it is opened (after its safetensors header is
checked against the config) and checked again before each read, so a file replaced, truncated or rewritten
under a loaded transcoder raises a one-line `CltraceError` instead of returning other weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cltrace.errors import CltraceError
from cltrace.transcoders.transcoder import Transcoder, TranscoderConfig

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class TensorFile:
    """One safetensors file opened for reads by offset: its header parsed and checked, its size pinned."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CltraceError(f"cannot open transcoder file {self.path} ({e.strerror})") from e
        st = os.fstat(self.fd)
        self.stamp = (st.st_size, st.st_mtime_ns)
        head = os.pread(self.fd, 8, 0)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(st.st_size - 8, 100 * 2**20):
            raise self._corrupt("its safetensors header length is wrong")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._corrupt(f"its safetensors header is not JSON ({e.msg if hasattr(e, 'msg') else e})") from e
        self.data_start = 8 + n
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}  # name -> (dtype, shape, offset)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise self._corrupt(f"tensor {name} has dtype {info.get('dtype')}, not one of {sorted(DTYPES)}")
            shape, (lo, hi) = tuple(info["shape"]), info["data_offsets"]
            if hi - lo != math.prod(shape) * dtype.itemsize or self.data_start + hi > st.st_size:
                raise self._corrupt(f"tensor {name} does not fit the file (truncated?)")
            self.tensors[name] = (dtype, shape, self.data_start + lo)

    def _corrupt(self, why: str) -> CltraceError:
        return CltraceError(f"transcoder file {self.path} is corrupt: {why}; copy or export it again")

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise self._corrupt(f"it holds no tensor {name}")
        return self.tensors[name][1]

    def check(self) -> None:
        """Raise if the file changed since it was opened (a map of other bytes would give other weights)."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise CltraceError(f"transcoder file {self.path} disappeared while loaded ({e.strerror}); "
                               "load the transcoder again") from e
        if (st.st_size, st.st_mtime_ns) != self.stamp or os.fstat(self.fd).st_size != self.stamp[0]:
            raise CltraceError(f"transcoder file {self.path} was modified or truncated after it was loaded "
                               f"(size {self.stamp[0]} -> {st.st_size}); load the transcoder again")

    def read(self, name: str, start: int = 0, count: int | None = None) -> Tensor:
        """Rows [start, start + count) of tensor `name` along its first dimension, as a fresh tensor."""
        dtype, shape, offset = self.tensors[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        count = shape[0] - start if count is None else count
        out = torch.empty((count, *shape[1:]), dtype=dtype)
        self.check()
        buf = out.view(torch.uint8).numpy().reshape(-1) if out.numel() else bytearray()
        got, want, pos = 0, count * row, offset + start * row
        while got < want:  # preadv may return short reads for large sizes
            n = os.preadv(self.fd, [memoryview(buf)[got:]], pos + got)
            if n <= 0:
                raise CltraceError(f"transcoder file {self.path} ended early (truncated under the loaded "
                                   "transcoder?); load it again")
            got += n
        return out

    def read_rows(self, name: str, rows: Tensor) -> Tensor:
        """Tensor `name` at the listed first-dimension indices rows [n] (any order), runs read in one go."""
        uniq, inverse = rows.cpu().long().unique(return_inverse=True)  # sorted
        if uniq.numel() == 0:
            dtype, shape, _ = self.tensors[name]
            return torch.empty((0, *shape[1:]), dtype=dtype)
        cuts = [0, *(((uniq[1:] - uniq[:-1]) > 1).nonzero()[:, 0] + 1).tolist(), uniq.numel()]
        parts = [self.read(name, int(uniq[c0]), c1 - c0) for c0, c1 in zip(cuts[:-1], cuts[1:])]
        block = torch.cat(parts) if len(parts) > 1 else parts[0]  # W[uniq]: runs of consecutive rows
        return block[inverse]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


@dataclass
class Part:
    """Features [lo, hi) of every layer (a shard; the whole dictionary otherwise) and where they are stored:
    enc(layer) -> (file, tensor name, first-dim index or None) of that layer's encoder block, stored [D, F_part]
    (or [F_part, D] when the store's encoder is transposed); dec(layer) -> (file, tensor name) of its decoder
    rows [F_part, ...]."""

    lo: int
    hi: int
    enc: Callable[[int], tuple[TensorFile, str, int | None]]
    dec: Callable[[int], tuple[TensorFile, str]]


class LazyStore:
    """Where a transcoder's W_enc and W_dec live on disk, and how stored bytes become our layout.

    `fold_enc(layer, W [D, F])` / `fold_dec(layer, rows)` turn stored float32 values into ours: a checkpoint's
    normalization, a per-layer transcoder's [n, D] decoder rows into [n, 1, D] (identity otherwise).
    """

    def __init__(self, parts: list[Part], files: list[TensorFile], n_features: int, *,
                 encoder_transposed: bool = False, fold_enc: Callable[[int, Tensor], Tensor] | None = None,
                 fold_dec: Callable[[int, Tensor], Tensor] | None = None, dtype=torch.float32, device="cpu"):
        self.parts, self.files, self.n_features = parts, files, n_features
        self.encoder_transposed = encoder_transposed
        self.fold_enc = fold_enc or (lambda layer, w: w)
        self.fold_dec = fold_dec or (lambda layer, w: w)
        self.dtype, self.device = dtype, torch.device(device)
        self.encoder_bytes = self.decoder_bytes = 0  # how much of the files was read (tests and benchmarks)

    def _part_block(self, part: Part, layer: int) -> Tensor:
        file, name, row = part.enc(layer)
        w = file.read(name, row, 1)[0] if row is not None else file.read(name)
        self.encoder_bytes += w.numel() * w.element_size()
        return w.T if self.encoder_transposed else w  # [D, F_part]

    def encoder(self, layer: int) -> Tensor:
        """[D, F] contiguous, as eager loading holds W_enc[layer]."""
        blocks = [self._part_block(p, layer) for p in self.parts]
        w = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
        w = self.fold_enc(layer, w.contiguous().float())
        return w.to(device=self.device, dtype=self.dtype).contiguous()

    def decoder_rows(self, layer: int, features: Tensor) -> Tensor:
        """features [n] -> W_dec[layer][features]: [n, n_out, D]."""
        features = features.cpu().long()
        if features.numel() and (features.min() < 0 or features.max() >= self.n_features):
            raise CltraceError(f"feature index out of range 0..{self.n_features - 1} for layer {layer}")
        out = None
        for p in self.parts:
            sel = ((features >= p.lo) & (features < p.hi)).nonzero()[:, 0]
            if sel.numel() == 0 and out is not None:
                continue
            file, name = p.dec(layer)
            rows = file.read_rows(name, features[sel] - p.lo)
            self.decoder_bytes += features[sel].unique().numel() * rows[0].numel() * rows.element_size() if len(
                rows) else 0
            rows = self.fold_dec(layer, rows.float())
            if out is None:
                out = torch.empty((features.numel(), *rows.shape[1:]), dtype=rows.dtype)
            out[sel] = rows
        return out.to(device=self.device, dtype=self.dtype)

    def decoder(self, layer: int) -> Tensor:
        """The whole W_dec[layer] [F, n_out, D] (for passes over every feature of a layer)."""
        return self.decoder_rows(layer, torch.arange(self.n_features))

    def check(self) -> None:
        for f in self.files:
            f.check()


SMALL_PARAMS = ("b_enc", "log_threshold", "b_dec", "W_skip")


def lazy_transcoder(cfg: TranscoderConfig, small: dict[str, Tensor], store: LazyStore) -> Transcoder:
    """A `Transcoder` whose W_enc / W_dec are meta tensors read through `store`; `small` holds the rest
    (b_enc [L, F], log_threshold [L, F], b_dec [L, D], W_skip [L, D, D] if any), converted as eager loading
    converts them (copied into float tensors of the store's dtype on its device)."""
    tc = Transcoder(cfg, device="meta", init=False)
    for name in SMALL_PARAMS:
        p = getattr(tc, name)
        if p is None:
            continue
        if name not in small or tuple(small[name].shape) != tuple(p.shape):
            got = tuple(small[name].shape) if name in small else "missing"
            raise CltraceError(f"transcoder tensor {name} is {got}, the config says {tuple(p.shape)}")
        real = torch.empty(p.shape, dtype=store.dtype, device=store.device)
        real.copy_(small[name])
        setattr(tc, name, torch.nn.Parameter(real))
    tc.store = store
    store.check()
    return tc.eval()


def check_shapes(file: TensorFile, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise a one-line error when a stored tensor is missing or shaped unlike the config."""
    for name, shape in expected.items():
        if file.shape(name) != tuple(shape):
            raise CltraceError(f"{file.path}: tensor {name} has shape {file.shape(name)}, the config says "
                               f"{tuple(shape)}")


def read_small(file: TensorFile, names: dict[str, str]) -> dict[str, Tensor]:
    """{our name: stored name} -> the stored tensors that exist, read whole."""
    return {ours: file.read(stored) for ours, stored in names.items() if stored in file.tensors}
