"""Graph files (attribution/graph_codec.py): exact round trips, the 16-bit bounds against a NumPy re-implementation,
pruned-only files against the full graph's pruning, version 1 files, and damaged files."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from cltrace.attribution import Graph, keep_pruned, prune
from cltrace.attribution.export import graph_json
from cltrace.attribution.graph_codec import COMPRESSORS
from cltrace.cli import main
from cltrace.errors import CltraceError
from cltrace.models.tiny import save_tiny
from cltrace.viewer.store import GraphStore
from cltrace.viewer.synthetic import synthetic_graph


def wild_graph(seed: int, finite: bool = True) -> Graph:
    """A random graph whose edges are of every kind: zeros, negatives, rows scaled from 1e-30 to 1e30 with entries
    down to 1e-12 of the row's scale, an empty row, a row with one entry; with finite=False also ±inf, NaN, -0.0
    and float32 subnormals."""
    base = synthetic_graph(400, 4000, n_layers=4, n_pos=6, n_logits=3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    R, N = base.edges.shape
    row_scale = 10 ** (torch.rand(R, 1, generator=g, dtype=torch.float64) * 60 - 30)  # [R, 1]
    within = 10 ** (-torch.rand(R, N, generator=g, dtype=torch.float64) * 12)  # [R, N]
    sign = torch.where(torch.rand(R, N, generator=g) < 0.5, -1.0, 1.0).double()
    keep = torch.rand(R, N, generator=g) < 0.3
    E = torch.where(keep, row_scale * within * sign, 0.0).float()
    E[0] = 0
    E[1] = 0
    E[1, 5] = -3.5
    E[2, :4] = torch.tensor([65504.0, 1e30, -1e-30, 2.0 ** -24])
    if not finite:
        E[3, :6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-45, -1e-40])
    return dataclasses.replace(base, edges=E, meta={"model": "m", "nested": {"a": [1, 2.5, None]}})


def same_fields(h: Graph, g: Graph) -> None:
    """Every field equal (tensors bit for bit, with their dtypes)."""
    for f in dataclasses.fields(Graph):
        a, b = getattr(h, f.name), getattr(g, f.name)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, f.name
            assert torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8)), f.name
        else:
            assert a == b, f.name


@pytest.mark.parametrize("compress", COMPRESSORS)
@pytest.mark.parametrize("seed", [0, 1])
def test_lossless_round_trip_is_bit_exact(tmp_path, compress, seed):
    g = wild_graph(seed, finite=False)
    g = dataclasses.replace(g, activations=g.activations.bfloat16())  # a field's dtype is kept too
    same_fields(Graph.load(g.save(tmp_path / "g.safetensors", compress=compress)), g)


def test_empty_and_dense_row_blocks(tmp_path):
    g = wild_graph(2)
    for E in (torch.zeros_like(g.edges), torch.randn(g.edges.shape)):
        h = dataclasses.replace(g, edges=E)
        same_fields(Graph.load(h.save(tmp_path / "g.safetensors")), h)


def fp16_reference(E: np.ndarray) -> np.ndarray:
    """The float16 scheme in NumPy: each row times 2^-k with 2^k > its max |edge| >= 2^(k-1), to float16, back."""
    m = np.abs(E).max(1, keepdims=True)  # [R, 1]
    k = np.frexp(m)[1].astype(np.float64)
    return (np.float16(E * 2.0 ** -k).astype(np.float64) * 2.0 ** k).astype(np.float32)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_float16_within_the_stated_bound(tmp_path, seed):
    g = wild_graph(seed)
    h = Graph.load(g.save(tmp_path / "g.safetensors", edge_dtype="float16"))
    e, got = g.edges.double(), h.edges.double()
    m = e.abs().amax(1, keepdim=True)  # [R, 1]
    err = (got - e).abs()
    assert (err <= torch.maximum(2.0 ** -11 * e.abs(), 2.0 ** -24 * m)).all()
    assert torch.equal(h.edges, torch.from_numpy(fp16_reference(g.edges.numpy())))
    assert (got[e == 0] == 0).all() and (torch.sign(got) * torch.sign(e) >= 0).all()
    assert (err / e.abs().clamp_min(1e-300)).max() > 2.0 ** -13  # it does round: the bound is not vacuous
    same_fields(h, dataclasses.replace(g, edges=h.edges))  # every other field exact


@pytest.mark.parametrize("seed", [6, 7])
def test_bfloat16_within_the_stated_bound(tmp_path, seed):
    g = wild_graph(seed)
    h = Graph.load(g.save(tmp_path / "g.safetensors", edge_dtype="bfloat16", compress="zlib"))
    e, got = g.edges.double(), h.edges.double()
    normal = e.abs() >= 2.0 ** -126
    err = (got - e).abs()
    assert (err[normal] <= 2.0 ** -8 * e.abs()[normal]).all()
    assert (err[~normal] <= 2.0 ** -134).all()
    assert (err / e.abs().clamp_min(1e-300)).max() > 2.0 ** -10


@pytest.mark.parametrize("seed,nt,et", [(0, 0.8, 0.98), (1, 0.6, 0.9), (2, 0.9, 0.99)])
@pytest.mark.parametrize("edge_dtype", ["float32", "float16"])
def test_pruned_only_file_is_the_pruned_subgraph(tmp_path, seed, nt, et, edge_dtype):
    g = synthetic_graph(700, 9000, n_layers=6, n_pos=8, seed=seed)
    g.meta.update(vocab_size=1000)
    pr = prune(g, nt, et)
    path = keep_pruned(g, nt, et).save(tmp_path / "k.safetensors", edge_dtype=edge_dtype)
    h = Graph.load(path)
    expected = g.edges.clone()
    expected[~pr.edge_mask] = 0
    if edge_dtype == "float32":
        assert torch.equal(h.edges, expected)
    else:
        assert torch.equal(h.edges != 0, expected != 0)
    header = json.loads(path.read_bytes()[8: 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    kept = json.loads(header["__metadata__"]["cltrace_graph"])["kept_pruning"]
    assert kept == {"node_threshold": nt, "edge_threshold": et, "n_edges_full": int((g.edges != 0).sum())}
    hp = prune(h, nt, et)  # at the thresholds that made it: the full graph's pruning
    assert torch.equal(hp.node_mask, pr.node_mask) and torch.equal(hp.edge_mask, pr.edge_mask)
    assert torch.equal(hp.cumulative_scores, pr.cumulative_scores)
    if edge_dtype == "float32":
        assert graph_json(h, "s", node_threshold=nt, edge_threshold=et) == \
            graph_json(g, "s", node_threshold=nt, edge_threshold=et)
    loose = prune(h, 0.5, 0.8)  # other thresholds prune what was kept
    assert not (loose.edge_mask & ~pr.edge_mask).any()
    # the viewer serves the same pruning
    (tmp_path / "served").mkdir()
    path.rename(tmp_path / "served" / "k.safetensors")
    sp = GraphStore(tmp_path / "served").load("k").pruner.prune(nt, et)
    mask = torch.zeros_like(pr.edge_mask)
    mask[sp.edge_rows, sp.edge_cols] = True
    assert torch.equal(sp.node_mask, pr.node_mask) and torch.equal(mask, pr.edge_mask)


def write_v1(g: Graph, path, layout: str) -> None:
    """A version 1 file, written as the format was: raw tensors, edges dense or CSR (int64 indptr, int32 columns)."""
    from safetensors.torch import save_file

    t = {"input_ids": g.input_ids, "features": g.features, "activations": g.activations,
         "logit_tokens": g.logit_tokens, "logit_probs": g.logit_probs, "rows": g.rows,
         "row_constant": g.row_constant, "row_value": g.row_value}
    if layout == "csr":
        r, c = g.edges.nonzero(as_tuple=True)
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(r, minlength=g.edges.shape[0]).cumsum(0)])
        t.update(edges_indptr=indptr, edges_indices=c.int(), edges_values=g.edges[r, c])
    else:
        t["edges"] = g.edges
    header = {"format": "cltrace-graph", "version": 1, "prompt": g.prompt, "tokens": g.tokens,
              "n_layers": g.n_layers, "logit_labels": g.logit_labels, "edges_layout": layout,
              "edges_shape": list(g.edges.shape), "meta": g.meta}
    save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata={"cltrace_graph": json.dumps(header)})


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_version_1_files_still_load(tmp_path, layout):
    g = wild_graph(8)
    write_v1(g, tmp_path / "old.safetensors", layout)
    same_fields(Graph.load(tmp_path / "old.safetensors"), g)


@pytest.mark.parametrize("edge_dtype,compress", [("float32", "bz2"), ("float16", "zlib"), ("bfloat16", "lzma"),
                                                 ("float32", "none")])
def test_damaged_file_gives_one_line_error(tmp_path, edge_dtype, compress):
    g = wild_graph(9)
    path = g.save(tmp_path / "g.safetensors", edge_dtype=edge_dtype, compress=compress)
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors' bytes begin after the JSON header
    rng = np.random.default_rng(0)
    damaged = [data[:n] for n in (0, 7, start // 2, start + 10, (start + len(data)) // 2, len(data) - 1)]
    for at in rng.integers(start, len(data), 12):  # one byte changed anywhere in the arrays
        damaged.append(data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:])
    for i, bad in enumerate(damaged):
        path.write_bytes(bad)
        with pytest.raises(CltraceError) as e:
            Graph.load(path)
        assert len(str(e.value).splitlines()) == 1 and "cltrace trace" in str(e.value), i


def test_newer_version_and_bad_options(tmp_path):
    g = wild_graph(10)
    with pytest.raises(CltraceError, match="edge_dtype"):
        g.save(tmp_path / "g.safetensors", edge_dtype="int8")
    with pytest.raises(CltraceError, match="compress"):
        g.save(tmp_path / "g.safetensors", compress="zip")
    with pytest.raises(CltraceError, match="non-finite"):
        wild_graph(10, finite=False).save(tmp_path / "g.safetensors", edge_dtype="float16")
    path = g.save(tmp_path / "g.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = data[8: 8 + n].replace(b'\\"version\\": 2', b'\\"version\\": 9')
    assert len(head) == n
    path.write_bytes(data[:8] + head + data[8 + n:])
    with pytest.raises(CltraceError, match="newer cltrace"):
        Graph.load(path)


def test_trace_cli_writes_compact_and_pruned_files(tmp_path, capsys):
    folder = str(save_tiny("llama", tmp_path / "tiny"))
    common = ["trace", "Fact: Michael", "-m", folder, "--random-transcoders", "48", "--random-active", "10", "--json"]
    assert main([*common, "--out", str(tmp_path / "full.safetensors")]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([*common, "--out", str(tmp_path / "k.safetensors"), "--keep-pruned", "--edge-dtype", "float16",
                 "--node-threshold", "0.7"]) == 0
    kept = json.loads(capsys.readouterr().out)
    g, h = Graph.load(tmp_path / "full.safetensors"), Graph.load(tmp_path / "k.safetensors")
    assert kept["n_edges"] == full["n_edges"] and int((h.edges != 0).sum()) == kept["n_edges_pruned"]
    assert h.kept_pruning.node_threshold == 0.7 and h.meta["node_threshold"] == 0.7
    assert kept["file_bytes"] < full["file_bytes"]
    pr = prune(g, 0.7, 0.98)
    assert torch.equal(prune(h, 0.7, 0.98).node_mask, pr.node_mask)
    assert torch.equal(h.edges != 0, pr.edge_mask)
