"""The attribution graph of one prompt, and its file format (one safetensors file, no pickle).

Nodes, in circuit-tracer's order:  [features | errors (layer-major: l·T + p) | tokens (p) | logits].
Only feature and logit nodes receive edges, so instead of circuit-tracer's dense N×N matrix the graph keeps
the row block  edges[r, s] = A[rows[r], s]  (rows = the feature and logit nodes). For the 73-token prompt that
gave circuit-tracer a 1.7 GB JSON, this is what keeps files and pruning memory proportional to what exists.

For every row,  Σ_s edges[r, s] + row_constant[r] = row_value[r]:  the target's pre-activation without b_enc
(features) or its logit minus the mean logit (logits); the constant gathers everything that is not a node
(biases, the BOS position).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from cltrace.errors import CltraceError

FORMAT = "cltrace-graph"
VERSION = 1


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
    def save(self, path: str | Path) -> Path:
        """One .safetensors file: tensors + a JSON header. The row block goes sparse (CSR) when that is smaller."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        E = self.edges.detach().float().cpu()
        tensors = {"input_ids": self.input_ids, "features": self.features, "activations": self.activations,
                   "logit_tokens": self.logit_tokens, "logit_probs": self.logit_probs, "rows": self.rows,
                   "row_constant": self.row_constant, "row_value": self.row_value}
        nnz = int((E != 0).sum())
        if nnz * 2 < E.numel():  # CSR: 4-byte index + 4-byte value per nonzero vs 4 bytes per entry
            r, c = E.nonzero(as_tuple=True)  # row-major order
            indptr = torch.zeros(E.shape[0] + 1, dtype=torch.long)
            indptr[1:] = torch.bincount(r, minlength=E.shape[0]).cumsum(0)
            tensors.update(edges_indptr=indptr, edges_indices=c.int(), edges_values=E[r, c])
            layout = "csr"
        else:
            tensors["edges"] = E
            layout = "dense"
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        header = {"format": FORMAT, "version": VERSION, "prompt": self.prompt, "tokens": self.tokens,
                  "n_layers": self.n_layers, "logit_labels": self.logit_labels, "edges_layout": layout,
                  "edges_shape": list(E.shape), "meta": self.meta}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"cltrace_graph": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
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
            shape = tuple(header["edges_shape"])
            if header["edges_layout"] == "csr":
                indptr = t["edges_indptr"]
                r = torch.repeat_interleave(torch.arange(shape[0]), indptr[1:] - indptr[:-1])
                edges = torch.zeros(shape)
                edges[r, t["edges_indices"].long()] = t["edges_values"]
            else:
                edges = t["edges"]
            g = cls(prompt=header["prompt"], input_ids=t["input_ids"], tokens=header["tokens"],
                    n_layers=header["n_layers"], features=t["features"], activations=t["activations"],
                    logit_tokens=t["logit_tokens"], logit_labels=header["logit_labels"],
                    logit_probs=t["logit_probs"], rows=t["rows"], edges=edges, row_constant=t["row_constant"],
                    row_value=t["row_value"], meta=header.get("meta", {}))
            if tuple(g.edges.shape) != (g.rows.numel(), g.n_nodes):
                raise ValueError(f"edge block {tuple(g.edges.shape)} does not match {g.rows.numel()}×{g.n_nodes} nodes")
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, TypeError,
                json.JSONDecodeError) as e:
            raise CltraceError(f"{path} is not a readable cltrace graph ({type(e).__name__}: {e}); "
                               "rebuild it with `cltrace trace`") from e
        return g
