"""An on-disk activation cache: run the model once, train several transcoders from the same rows.

Layout of a cache folder:

    manifest.json         model, L, D, n_tokens, dtype, corpus, context_len, shards (rows, SHA-256)
    x-00000.npy ...       [rows, L, D] MLP inputs
    y-00000.npy ...       [rows, L, D] MLP outputs

Storage is bfloat16, kept as its uint16 bit pattern (numpy has no bfloat16): half the bytes of float32,
and unlike float16 it cannot overflow (same exponent range as float32, so models with very large
activations are safe); its 8-bit mantissa rounds each value by at most 0.4%, which adds ~1e-5 to a
normalized MSE, far below any transcoder's error. float16 (dtype="float16": 8x finer rounding, range
+-65504) is available and checked for overflow when written.

Rows are written in the shuffled order the streaming source serves (blocks of buffer_tokens), and read
back in blocks of whole shards taken in a random order per epoch, each block permuted again: shuffling
across shards with memory bounded by one block. `.npy` files are memory-mapped, never pickled.
The manifest is written last, so a folder without one is an interrupted write.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cltrace.data.activations import StreamingActivations, default_buffer_tokens
from cltrace.data.shuffle import Block, BlockSource
from cltrace.data.sources import sha256_file
from cltrace.data.tokens import CorpusLike
from cltrace.errors import CltraceError

FORMAT = "cltrace-activation-cache"
VERSION = 1
DTYPES = {"bfloat16": np.uint16, "float16": np.float16}
FP16_MAX = 65504.0


def _to_storage(t: Tensor, dtype: str) -> np.ndarray:
    """float32 [n, L, D] -> numpy array in the storage dtype."""
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    if t.abs().max() > FP16_MAX:
        raise CltraceError(
            f"activations reach {t.abs().max():.3g}, beyond float16's range (65504): write the cache "
            "with dtype='bfloat16'"
        )
    return t.to(torch.float16).cpu().numpy()


def _from_storage(a: np.ndarray, dtype: str) -> Tensor:
    """numpy rows in the storage dtype -> float32 tensor (copies: memory maps are read-only)."""
    a = np.array(a)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a).float()


# ---------------------------------------------------------------------- writing
def token_bytes(n_layers: int, d_model: int) -> int:
    """Bytes one token takes in a cache: its x and y rows, [n_layers, d_model] each, at 16 bits a value."""
    return 2 * n_layers * d_model * 2


def write_activation_cache(
    model, corpus: CorpusLike, folder: str | os.PathLike, n_tokens: int, *, context_len: int = 128,
    model_batch: int = 8, keep_special: bool = False, outlier_factor: float | None = None,
    split: str = "train", heldout_frac: float = 0.02, dtype: str = "bfloat16", shard_mb: float = 256.0,
    shard_tokens: int | None = None, buffer_tokens: int | None = None, seed: int = 0,
    overwrite: bool = False, progress: bool = True, precision: str = "fp32",
) -> dict:
    """Run `model` over `corpus` and store n_tokens (x, y) rows in `folder`; returns the manifest.

    precision: the model's matmuls in "fp32" or under "bf16" autocast (`cltrace.data.activations`); the
    manifest records it.

    Shards hold shard_tokens rows (default: ~shard_mb MB per x or y file). Shows a tqdm bar with
    tokens/s and ETA when progress is set.
    """
    if dtype not in DTYPES:
        raise CltraceError(f"unknown cache dtype {dtype!r}: use 'bfloat16' or 'float16'")
    if n_tokens < 1:
        raise CltraceError(f"n_tokens must be positive, not {n_tokens}")
    folder = Path(folder)
    if (folder / "manifest.json").exists() and not overwrite:
        raise CltraceError(f"{folder} already holds an activation cache: choose another folder or overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("[xy]-*.npy"), *folder.glob("[xy]-*.tmp"), folder / "manifest.json"]:
        old.unlink(missing_ok=True)
    L, D = model.n_layers, model.d_model
    shard_tokens = shard_tokens or max(1, int(shard_mb * 2**20 // (token_bytes(L, D) // 2)))  # x or y
    chunk = min(4096, shard_tokens, n_tokens)  # rows asked of the stream at a time (no more than needed)
    # a block holds whole chunks: a last chunk straddling into a new block runs the model over that whole block
    # (10,240 tokens in 4,096-row chunks ran it over 20,480)
    buffer_tokens = buffer_tokens or min(-(-n_tokens // chunk) * chunk,
                                         max(chunk, default_buffer_tokens(L, D) // chunk * chunk))
    source = StreamingActivations(
        model, corpus, context_len=context_len, model_batch=model_batch,
        buffer_tokens=buffer_tokens,
        keep_special=keep_special, outlier_factor=outlier_factor, split=split, heldout_frac=heldout_frac,
        loop=True, precision=precision,
    )
    batches = source.batches(chunk, seed=seed, track=False)
    bar = _progress(n_tokens, progress)
    shards = []
    written = 0
    t0 = time.time()
    pending: tuple[Tensor, Tensor] | None = None  # rows read but not yet written
    while written < n_tokens:
        i = len(shards)
        rows = min(shard_tokens, n_tokens - written)
        paths = {k: folder / f"{k}-{i:05d}.npy" for k in ("x", "y")}
        maps = {k: np.lib.format.open_memmap(p.with_suffix(".tmp"), mode="w+", dtype=DTYPES[dtype],
                                             shape=(rows, L, D)) for k, p in paths.items()}
        n = 0
        while n < rows:
            if pending is None:
                pending = next(batches)
            x, y = pending
            take = min(rows - n, len(x))
            maps["x"][n:n + take] = _to_storage(x[:take], dtype)
            maps["y"][n:n + take] = _to_storage(y[:take], dtype)
            pending = (x[take:], y[take:]) if take < len(x) else None
            n += take
            bar.update(take)
        entry: dict[str, Any] = {"rows": rows}
        for k, m in maps.items():
            m.flush()
            del m
            os.replace(paths[k].with_suffix(".tmp"), paths[k])
            entry[k] = paths[k].name
            entry[f"{k}_sha256"] = sha256_file(paths[k])
        maps.clear()
        shards.append(entry)
        written += rows
    bar.close()
    manifest = {
        "format": FORMAT, "version": VERSION, "model": model.name, "n_layers": L, "d_model": D,
        "n_tokens": n_tokens, "dtype": dtype, "storage": "uint16 bit patterns of bfloat16" if dtype == "bfloat16"
        else "float16", "corpus": source.config()["corpus"], "split": split, "heldout_frac": heldout_frac,
        "context_len": context_len, "keep_special": keep_special, "outlier_factor": outlier_factor,
        "precision": precision, "seed": seed, "model_tokens": source.model_tokens,
        "seconds": round(time.time() - t0, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shards": shards,
    }
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / "manifest.json")
    return manifest


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="caching activations", disable=not enabled,
                smoothing=0.1)


# ---------------------------------------------------------------------- reading
def read_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.exists():
        hint = " (its write was interrupted: write it again)" if any(folder.glob("[xy]-*.npy")) else ""
        raise CltraceError(f"no activation cache at {folder}: manifest.json is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CltraceError(f"{path} is damaged ({e}): write the cache again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CltraceError(f"{path} is not a cltrace activation-cache manifest")
    if manifest.get("version") != VERSION:
        raise CltraceError(f"{path} has cache format version {manifest.get('version')}, this cltrace reads "
                           f"{VERSION}: write the cache again")
    if manifest.get("dtype") not in DTYPES:
        raise CltraceError(f"{path} names an unknown dtype {manifest.get('dtype')!r}")
    return manifest


class CachedActivations(BlockSource):
    """(x, y) rows read from a cache folder, in random batches, with bounded memory, resumable.

    model (a ModelAdapter or its name), when given, must be the model the cache was written for.
    buffer_tokens bounds memory (default: as the streaming source); each block is one or more whole
    shards. verify=True also checks every shard's SHA-256 (reads the whole cache once).

    Data parallel: `rank=r, world=W` makes this the share of data rank r: row slice r of W of every shard
    (rows [r·n//W, (r+1)·n//W) of a shard of n rows), so the W shares are disjoint, differ by at most one
    row per shard, and together are the whole cache, however many shards it has; blocks are then groups of
    such slices. `batches(B)` yields B / W rows a batch; an epoch is one pass over this share.
    """

    def __init__(self, folder: str | os.PathLike, *, model=None, buffer_tokens: int | None = None,
                 verify: bool = False, buffer_mb: float = 2048.0, rank: int = 0, world: int = 1):
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        self.n_layers, self.d_model = int(m["n_layers"]), int(m["d_model"])
        self.n_tokens, self.dtype = int(m["n_tokens"]), m["dtype"]
        if model is not None:
            name = model if isinstance(model, str) else model.name
            dims = None if isinstance(model, str) else (model.n_layers, model.d_model)
            if name != m["model"] or (dims is not None and dims != (self.n_layers, self.d_model)):
                raise CltraceError(
                    f"the activation cache at {self.folder} was written for model {m['model']!r} "
                    f"({self.n_layers} layers, d_model {self.d_model}), not {name!r}"
                    + (f" ({dims[0]} layers, d_model {dims[1]})" if dims else "") + ": write a cache for this model"
                )
        self.shards = m["shards"]
        self._set_share(rank, world)
        if sum(s["rows"] for s in self.shards) != self.n_tokens:
            raise CltraceError(f"{self.folder}/manifest.json: shard rows do not add up to n_tokens")
        for shard in self.shards:
            self._check_shard(shard, verify)
        self.share_tokens = sum(hi - lo for lo, hi in map(self._slice, range(len(self.shards))))
        largest = max(hi - lo for lo, hi in map(self._slice, range(len(self.shards))))
        if self.share_tokens == 0:
            raise CltraceError(f"the activation cache at {self.folder} has {self.n_tokens} rows: too few for "
                               f"{self.world} data-parallel shares")
        self.buffer_tokens = max(largest, buffer_tokens or default_buffer_tokens(
            self.n_layers, self.d_model, buffer_mb))
        self.buffer: tuple[Tensor, Tensor] | None = None

    def _check_shard(self, shard: dict, verify: bool) -> None:
        """Header, shape, dtype and size of both files of a shard (and checksums if verify).

        Shards are memory-mapped only while being read, so a cache of thousands of shards does not
        hold thousands of open files.
        """
        want = (shard["rows"], self.n_layers, self.d_model)
        dtype = np.dtype(DTYPES[self.dtype])
        for k in ("x", "y"):
            path = self.folder / shard[k]
            if not path.exists():
                raise CltraceError(f"activation cache shard {path} is missing: write the cache again")
            try:
                with open(path, "rb") as f:
                    fmt = np.lib.format
                    read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else (
                        fmt.read_array_header_2_0)
                    shape, fortran, got_dtype = read_header(f)
                    offset = f.tell()
            except (ValueError, OSError, EOFError, SyntaxError) as e:
                raise CltraceError(f"activation cache shard {path} is corrupt ({e}): write the cache again") from e
            if shape != want or got_dtype != dtype or fortran:
                raise CltraceError(f"activation cache shard {path} holds {got_dtype} {shape}, the manifest "
                                   f"says {dtype} {want}: write the cache again")
            if path.stat().st_size != offset + int(np.prod(want)) * dtype.itemsize:
                raise CltraceError(f"activation cache shard {path} is corrupt (truncated or padded: "
                                   f"{path.stat().st_size} bytes): write the cache again")
            if verify and sha256_file(path) != shard[f"{k}_sha256"]:
                raise CltraceError(f"activation cache shard {path} is corrupt (SHA-256 mismatch): "
                                   "write the cache again")

    def _slice(self, i: int) -> tuple[int, int]:
        """Rows [lo, hi) of shard i that belong to this share (the whole shard for world=1)."""
        n = self.shards[i]["rows"]
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def config(self) -> dict:
        m = self.manifest
        return {"kind": "cached", "model": m["model"], "n_tokens": self.n_tokens, "created": m.get("created"),
                "buffer_tokens": self.buffer_tokens, **self._share_config()}

    # ------------------------------------------------------------------ blocks
    def _epoch_groups(self, seed: int, epoch: int) -> list[list[int]]:
        """Shards of one epoch in a random order, grouped into blocks of at most buffer_tokens rows."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(
            (seed * 7_919 + epoch) % 2**63)).tolist()
        groups, current, rows = [], [], 0
        for i in order:
            lo, hi = self._slice(i)
            r = hi - lo
            if current and rows + r > self.buffer_tokens:
                groups.append(current)
                current, rows = [], 0
            current.append(i)
            rows += r
        groups.append(current)
        return groups

    def _blocks(self, seed: int, key: Any, index: int) -> Iterator[Block]:
        epoch, j = key if key is not None else (0, 0)
        shape = (self.buffer_tokens, self.n_layers, self.d_model)
        bx, by = self.buffer = (torch.empty(shape), torch.empty(shape))
        while True:
            groups = self._epoch_groups(seed, epoch)
            while j < len(groups):
                n = 0
                for i in groups[j]:
                    n = self._load_shard(i, bx, by, n)
                nxt = [epoch, j + 1] if j + 1 < len(groups) else [epoch + 1, 0]
                yield Block(index, [epoch, j], nxt, bx[:n], by[:n])
                index += 1
                j += 1
            epoch, j = epoch + 1, 0

    def _load_shard(self, i: int, bx: Tensor, by: Tensor, n: int, chunk: int = 8192) -> int:
        """Copy this share's rows of shard i into the buffers at row n (float32); returns the next free row."""
        shard = self.shards[i]
        lo, hi = self._slice(i)
        try:
            mx, my = (np.load(self.folder / shard[k], mmap_mode="r", allow_pickle=False) for k in ("x", "y"))
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                bx[n + a - lo:n + b - lo] = _from_storage(mx[a:b], self.dtype)
                by[n + a - lo:n + b - lo] = _from_storage(my[a:b], self.dtype)
        except (OSError, ValueError) as e:
            raise CltraceError(f"cannot read activation cache shard {shard['x']} ({e}): write the cache again") from e
        return n + hi - lo

    @property
    def epochs_seen(self) -> float:
        """Passes over this share (the whole cache for world=1)."""
        return self.tokens_seen / max(self.share_tokens, 1)
