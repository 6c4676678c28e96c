"""How a graph file stores its arrays: byte planes, compressed where they compress, edges as their nonzeros.

A graph's edge row block [R, N] is mostly zeros (a target only hears sources at earlier layers and positions), and
its nonzero values are float32 whose mantissa bytes are noise. So the file keeps the edges as

    counts   [R]    int32    nonzeros per row
    indices  [nnz]  uint16   column gaps within each row (the first one is the column itself); int32 if N > 65535
    values   [nnz]  float32 (exact) | float16 (rows scaled by a power of two) | bfloat16
    row_exp  [R]    int16    float16 only: each row's scale 2^row_exp

and every array of the file (these and the graph's other tensors) as its byte planes (all first bytes, then all
second bytes, ...), each plane compressed on its own (bz2 by default; zlib, lzma or none) or stored as it is when it
does not compress. A float32 value's sign/exponent byte has ~4.5 bits of entropy, its three others ~8: about 3.45
bytes an edge is what any lossless coder of these values can reach, and bz2 gets within 1% of it. A CRC-32 of each
array's bytes makes a damaged file fail instead of reading wrong numbers.

Error bounds, per edge e of a row whose largest |edge| is m (tested in tests/test_graph_files.py):
    float32   exact (bit for bit: -0.0, NaN and ±inf included).
    float16   |ê − e| ≤ max(2⁻¹¹·|e|, 2⁻²⁴·m). The row is multiplied by 2⁻ᵏ with 2ᵏ > m ≥ 2ᵏ⁻¹ (exact),
              rounded to float16 (relative 2⁻¹¹ in float16's normal range, absolute 2⁻²⁵·2ᵏ ≤ 2⁻²⁴·m below
              2⁻¹⁴·2ᵏ) and multiplied back (exact). Holds for rows with m ≥ 1e-30; zeros stay 0, signs stay; an
              edge below 2⁻²⁵·2ᵏ reads as 0.
    bfloat16  |ê − e| ≤ 2⁻⁸·|e| (float32's exponent range, so no scaling; for |e| ≥ 2⁻¹²⁶, float32's normal range).
"""

from __future__ import annotations

import bz2
import lzma
import zlib

import numpy as np
import torch
from torch import Tensor

EDGE_DTYPES = ("float32", "float16", "bfloat16")
COMPRESSORS = ("bz2", "zlib", "lzma", "none")
BOUNDS = {"float32": "exact",
          "float16": "|e' - e| <= max(2^-11 |e|, 2^-24 max|row|)",
          "bfloat16": "|e' - e| <= 2^-8 |e|"}
DECOMPRESS = {"bz2": bz2.decompress, "zlib": zlib.decompress, "lzma": lzma.decompress}


def _compress(raw: bytes, how: str) -> bytes:
    if how == "bz2":
        return bz2.compress(raw, 9)
    if how == "zlib":
        return zlib.compress(raw, 6)
    if how == "lzma":
        return lzma.compress(raw, preset=6)
    return raw


def _noise(plane: bytes) -> bool:
    """A plane whose first 256 KB zlib cannot shrink by 2% (mantissa bytes): stored as it is, not compressed."""
    sample = plane[: 1 << 18]
    return len(zlib.compress(sample, 1)) > 0.98 * len(sample)


def pack(a: np.ndarray, how: str) -> tuple[Tensor, dict]:
    """An array -> (uint8 tensor of its byte planes, each compressed or raw; what unpack needs)."""
    a = np.ascontiguousarray(a)
    raw = a.tobytes()
    planes = a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T  # [itemsize, n]
    parts, sizes = [], []
    for plane in planes:
        p = plane.tobytes()
        c = p if how == "none" or _noise(p) else _compress(p, how)
        compressed = len(c) < len(p)
        parts.append(c if compressed else p)
        sizes.append(len(c) if compressed else -len(p))  # negative: stored raw
    blob = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
    info = {"dtype": a.dtype.str, "shape": list(a.shape), "compress": how, "planes": sizes, "crc32": zlib.crc32(raw)}
    return torch.from_numpy(blob), info


def unpack(blob: Tensor, info: dict) -> np.ndarray:
    """The inverse of pack; ValueError when the bytes are not what was packed."""
    dtype, shape, how = np.dtype(info["dtype"]), tuple(info["shape"]), info["compress"]
    n = int(np.prod(shape))
    data = blob.numpy().tobytes()
    out = np.empty((dtype.itemsize, n), dtype=np.uint8)
    at = 0
    for i, size in enumerate(info["planes"]):
        part = data[at: at + abs(size)]
        at += abs(size)
        p = DECOMPRESS[how](part) if size > 0 else part
        if len(p) != n:
            raise ValueError("an array's bytes are cut short (the file is damaged)")
        out[i] = np.frombuffer(p, dtype=np.uint8)
    raw = out.T.tobytes()
    if at != len(data) or zlib.crc32(raw) != info["crc32"]:
        raise ValueError("an array fails its checksum (the file is damaged)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def encode_edges(edges: Tensor, edge_dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict]:
    """[R, N] row block -> (arrays "edges_counts", "edges_indices", "edges_values"[, "edges_row_exp"], header)."""
    if edge_dtype not in EDGE_DTYPES:
        raise ValueError(f"edge_dtype must be one of {', '.join(EDGE_DTYPES)}, not {edge_dtype!r}")
    E = edges.detach().float().cpu()
    R, N = E.shape
    r, c = (E.view(torch.int32) != 0).nonzero(as_tuple=True)  # row-major; by bits, so -0.0 and NaN are kept
    v = E[r, c]  # [nnz]
    counts = torch.bincount(r, minlength=R)  # [R]
    starts = counts.cumsum(0) - counts  # [R] first nonzero of each row
    gaps = c.clone()
    gaps[1:] -= c[:-1]
    first = starts[counts > 0]
    gaps[first] = c[first]
    out = {"edges_counts": counts.int().numpy(),
           "edges_indices": gaps.numpy().astype(np.uint16 if N <= 65535 else np.int32)}
    if edge_dtype != "float32" and not torch.isfinite(v).all():
        raise ValueError("the graph has non-finite edges; save it with edge_dtype='float32'")
    if edge_dtype == "float32":
        out["edges_values"] = v.numpy()
    elif edge_dtype == "bfloat16":
        out["edges_values"] = v.bfloat16().view(torch.int16).numpy()
    else:
        m = torch.zeros(R).scatter_reduce_(0, r, v.abs(), "amax")  # [R] largest |edge| of each row
        exp = torch.frexp(m).exponent.to(torch.int16)  # 2^exp > m >= 2^(exp-1); 0 for an empty row
        scale = torch.pow(2.0, -exp.double())[r]  # float64: 2^-exp is exact even where 2^exp overflows float32
        out["edges_values"] = (v.double() * scale).float().half().view(torch.int16).numpy()
        out["edges_row_exp"] = exp.numpy()
    header = {"layout": "csr-gaps", "shape": [R, N], "nnz": int(v.numel()), "values": edge_dtype,
              "bound": BOUNDS[edge_dtype]}
    return out, header


def decode_edges(a: dict[str, np.ndarray], header: dict) -> Tensor:
    """The inverse of encode_edges: -> [R, N] float32. ValueError/KeyError on anything inconsistent."""
    R, N = (int(x) for x in header["shape"])
    counts = torch.from_numpy(a["edges_counts"].astype(np.int64))  # [R]
    gaps = torch.from_numpy(a["edges_indices"].astype(np.int64))  # [nnz]
    nnz = gaps.numel()
    if counts.numel() != R or (counts < 0).any() or int(counts.sum()) != nnz or a["edges_values"].size != nnz:
        raise ValueError("the edge arrays do not fit together")
    r = torch.repeat_interleave(torch.arange(R), counts)  # [nnz] row of each nonzero
    run = gaps.cumsum(0)
    starts = counts.cumsum(0) - counts
    base = torch.zeros(R, dtype=torch.long)
    ne = counts > 0
    base[ne] = run[starts[ne]] - gaps[starts[ne]]  # the running sum before each row's first entry
    c = run - base[r]  # [nnz] column of each nonzero
    if nnz and (int(c.min()) < 0 or int(c.max()) >= N):
        raise ValueError("an edge column is out of range")
    kind = header["values"]
    if kind == "float32":
        v = torch.from_numpy(a["edges_values"])
    elif kind == "bfloat16":
        v = torch.from_numpy(a["edges_values"]).view(torch.bfloat16).float()
    elif kind == "float16":
        exp = torch.from_numpy(a["edges_row_exp"].astype(np.int64))
        v = (torch.from_numpy(a["edges_values"]).view(torch.float16).double() * torch.pow(2.0, exp.double())[r]).float()
    else:
        raise ValueError(f"unknown edge value type {kind!r}")
    edges = torch.zeros(R * N)
    edges[r * N + c] = v
    return edges.view(R, N)
