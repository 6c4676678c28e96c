"""The attribution graph of one prompt, and its file format (one safetensors file, no pickle).

Nodes, in circuit-tracer's order:  [features | errors (layer-major: l·T + p) | tokens (p) | logits].
Only feature and logit nodes receive edges, so instead of circuit-tracer's dense N×N matrix the graph keeps
the row block  edges[r, s] = A[rows[r], s]  (rows = the feature and logit nodes). For the 73-token prompt that
gave circuit-tracer a 1.7 GB JSON, this is what keeps files and pruning memory proportional to what exists.
The file packs that block's nonzeros (`graph_codec`: exact float32 by default, ~0.2× circuit-tracer's file).

For every row,  Σ_s edges[r, s] + row_constant[r] = row_value[r]:  the target's pre-activation without b_enc
(features) or its logit minus the mean logit (logits); the constant gathers everything that is not a node
(biases, the BOS position).
"""

from __future__ import annotations

import json
import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from cltrace.attribution.graph_codec import COMPRESSORS, decode_edges, encode_edges, pack, unpack
from cltrace.errors import CltraceError

FORMAT = "cltrace-graph"
VERSION = 2  # 2: arrays packed by graph_codec, optional kept pruning; 1: dense or CSR float32 (still read)


@dataclass
class KeptPruning:
    """A graph saved with only the edges one pruning kept: that pruning, as computed on the full graph."""

    node_threshold: float
    edge_threshold: float
    node_mask: Tensor  # [N] bool: the full graph's pruned node mask
    cumulative_scores: Tensor  # [N] the full graph's cumulative influence (the JSON "influence")
    n_edges_full: int  # nonzero edges of the full graph


@dataclass
class Graph:
    prompt: str
    input_ids: Tensor  # [T] long, BOS first
    tokens: list[str]  # each token decoded
    n_layers: int
    features: Tensor  # [n_f, 3] long: (layer, pos, feature index)
    activations: Tensor  # [n_f]
    logit_tokens: Tensor  # [n_l] long vocab ids (−1: a contrast direction)
    logit_labels: list[str]
    logit_probs: Tensor  # [n_l]
    rows: Tensor  # [n_rows] long: node index of each stored row
    edges: Tensor  # [n_rows, n_nodes] float32
    row_constant: Tensor  # [n_rows] the part of each row's value that no node explains
    row_value: Tensor  # [n_rows] pre-activation without b_enc, or logit − mean logit
    meta: dict = field(default_factory=dict)  # model, transcoders, timings, n_active_features, ...
    kept_pruning: KeptPruning | None = None  # set when edges hold only what that pruning kept

    # ------------------------------------------------------------------ node layout
    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + i

    def kinds(self) -> Tensor:
        """[N] 0 feature, 1 error, 2 token, 3 logit."""
        T, L = self.n_pos, self.n_layers
        return torch.cat([torch.zeros(self.n_features), torch.ones(L * T), torch.full((T,), 2.0),
                          torch.full((self.n_logits,), 3.0)]).long()

    def logit_weights(self) -> Tensor:
        """[N] zeros except the logit nodes' probabilities (what pruning and the scores weight by)."""
        w = torch.zeros(self.n_nodes)
        w[self.n_nodes - self.n_logits:] = self.logit_probs.float().cpu()
        return w

    def adjacency(self) -> Tensor:
        """Dense [N, N] matrix, rows = target, cols = source (circuit-tracer's layout; small graphs only)."""
        A = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.edges.dtype)
        A[self.rows] = self.edges
        return A

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, edge_dtype: str = "float32", compress: str = "bz2") -> Path:
        """One .safetensors file: each array packed by `graph_codec` (edges as their nonzeros) + a JSON header.

        Lossless by default. edge_dtype "float16" or "bfloat16" stores the edge values in 2 bytes within the
        bound `graph_codec` states; compress is "bz2" (default), "zlib" (faster, ~1% larger), "lzma" or "none".
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if compress not in COMPRESSORS:
            raise CltraceError(f"compress must be one of {', '.join(COMPRESSORS)}, not {compress!r}")
        try:
            arrays, edges_header = encode_edges(self.edges, edge_dtype)
        except ValueError as e:
            raise CltraceError(f"cannot save the graph: {e}") from None
        fields = {"input_ids": self.input_ids, "features": self.features, "activations": self.activations,
                  "logit_tokens": self.logit_tokens, "logit_probs": self.logit_probs, "rows": self.rows,
                  "row_constant": self.row_constant, "row_value": self.row_value}
        header = {"format": FORMAT, "version": VERSION, "prompt": self.prompt, "tokens": self.tokens,
                  "n_layers": self.n_layers, "logit_labels": self.logit_labels, "edges": edges_header,
                  "meta": self.meta}
        if self.kept_pruning is not None:
            k = self.kept_pruning
            fields.update(kept_node_mask=k.node_mask, kept_cumulative=k.cumulative_scores)
            header["kept_pruning"] = {"node_threshold": k.node_threshold, "edge_threshold": k.edge_threshold,
                                      "n_edges_full": k.n_edges_full}
        torch_dtypes = {}
        for name, t in fields.items():
            t = t.detach().cpu().contiguous()
            torch_dtypes[name] = str(t.dtype).removeprefix("torch.")
            arrays[name] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        tensors, infos = {}, {}
        for name, a in arrays.items():
            tensors[name], infos[name] = pack(a, compress)
            if name in torch_dtypes:
                infos[name]["torch"] = torch_dtypes[name]
        header["arrays"] = infos
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"cltrace_graph": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Any graph file cltrace wrote: this version's packed arrays, or version 1's dense/CSR float32."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise CltraceError(f"no graph file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["cltrace_graph"])
                t = {k: f.get_tensor(k) for k in f.keys()}
            if header.get("format") != FORMAT:
                raise KeyError("format")
            if int(header.get("version", 1)) > VERSION:
                raise CltraceError(f"{path} was written by a newer cltrace (graph format version "
                                   f"{header['version']}, this one reads up to {VERSION}): upgrade cltrace")
            if "arrays" in header:  # version 2: packed arrays
                a = {name: unpack(t[name], info) for name, info in header["arrays"].items()}
                edges = decode_edges(a, header["edges"])
                t = {name: _tensor(a[name], info.get("torch")) for name, info in header["arrays"].items()
                     if not name.startswith("edges_")}
            else:
                edges = _load_v1_edges(t, header)
            kept = None
            if "kept_pruning" in header:
                k = header["kept_pruning"]
                kept = KeptPruning(float(k["node_threshold"]), float(k["edge_threshold"]),
                                   t["kept_node_mask"].bool(), t["kept_cumulative"], int(k["n_edges_full"]))
            g = cls(prompt=header["prompt"], input_ids=t["input_ids"], tokens=header["tokens"],
                    n_layers=header["n_layers"], features=t["features"], activations=t["activations"],
                    logit_tokens=t["logit_tokens"], logit_labels=header["logit_labels"],
                    logit_probs=t["logit_probs"], rows=t["rows"], edges=edges, row_constant=t["row_constant"],
                    row_value=t["row_value"], meta=header.get("meta", {}), kept_pruning=kept)
            if tuple(g.edges.shape) != (g.rows.numel(), g.n_nodes):
                raise ValueError(f"edge block {tuple(g.edges.shape)} does not match {g.rows.numel()}×{g.n_nodes} nodes")
            if kept is not None and {kept.node_mask.numel(), kept.cumulative_scores.numel()} != {g.n_nodes}:
                raise ValueError("the kept pruning does not match the nodes")
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError,
                json.JSONDecodeError, zlib.error, lzma.LZMAError, EOFError) as e:
            raise CltraceError(f"{path} is not a readable cltrace graph ({type(e).__name__}: {e}); "
                               "rebuild it with `cltrace trace`") from e
        return g


def _tensor(a, torch_dtype: str | None) -> Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if torch_dtype == "bfloat16" else t


def _load_v1_edges(t: dict[str, Tensor], header: dict) -> Tensor:
    """Version 1 files: the row block dense, or CSR with int32 columns and float32 values."""
    shape = tuple(header["edges_shape"])
    if header["edges_layout"] == "csr":
        indptr = t["edges_indptr"]
        r = torch.repeat_interleave(torch.arange(shape[0]), indptr[1:] - indptr[:-1])
        edges = torch.zeros(shape)
        edges[r, t["edges_indices"].long()] = t["edges_values"]
        return edges
    return t["edges"]
