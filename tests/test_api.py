"""The public API: the whole loop from `import cltrace`, importing it changes nothing, and the package layers.

The layer order is the pipeline's: a package may import only packages before it in LAYERS (errors and runtime
first, the CLI last), there are no import cycles, and only the CLI imports cltrace modules inside functions
(elsewhere a function-local import is for an optional third-party dependency).
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

import cltrace

SRC = Path(cltrace.__file__).parent
LAYERS = ["errors", "runtime", "models", "data", "transcoders", "training", "replacement", "attribution",
          "interventions", "features", "validation", "viewer", "cli"]


def test_whole_loop_from_one_import(tmp_path):
    from cltrace.models.tiny import save_tiny  # test fixture: a tiny random model written as a HF folder

    folder = save_tiny("llama", tmp_path / "tiny")
    model = cltrace.load_model(str(folder))
    cfg = cltrace.TrainConfig(kind="clt", features_per_layer=32, activation="batchtopk", k=4, tokens=2048,
                              batch_size=512, out=str(tmp_path / "clt"), progress=False, norm_tokens=512)
    trained = cltrace.train(cfg, model=model)
    tc = cltrace.load_transcoder(tmp_path / "clt")
    for (name, p), (_, q) in zip(trained.named_parameters(), tc.named_parameters()):
        assert torch.equal(p.cpu(), q.cpu()), name
    metrics = cltrace.evaluate(model, tc, n_tokens=256, context_len=32)
    assert {"nmse", "l0", "dead_fraction", "ce_increase", "top1_agreement"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("nmse", "l0", "ce_increase"))  # (quality: test_training.py)

    prompt = "Fact: Michael Jordan"
    graph = cltrace.attribute(model, tc, prompt)
    pruned = cltrace.prune(graph, node_threshold=0.8, edge_threshold=0.98)
    replacement, completeness = cltrace.scores(graph, pruned)
    assert int(pruned.node_mask.sum()) < graph.n_nodes
    graph.save(tmp_path / "g.safetensors")
    loaded = cltrace.Graph.load(tmp_path / "g.safetensors")
    assert torch.equal(loaded.edges, graph.edges) and torch.equal(loaded.features, graph.features)
    assert cltrace.scores(loaded, cltrace.prune(loaded)) == (replacement, completeness)

    layer, pos, feature = graph.features[int(graph.activations.argmax())].tolist()  # (layer, pos, feature)
    result = cltrace.intervene(model, tc, prompt, [cltrace.Intervention(layer=layer, pos=pos, feature=feature,
                                                                        value=0.0)])
    assert isinstance(result, cltrace.InterventionResult)
    assert json.loads(result.to_json()) == result.to_dict()
    (iv,) = result.interventions
    assert (iv["layer"], iv["pos"], iv["feature"]) == (layer, pos, feature)
    assert iv["positions"][0]["act_before"] == float(graph.activations.max()) and iv["positions"][0]["act_after"] == 0
    with torch.no_grad():
        p_model = torch.softmax(model.forward(model.tokenize(prompt)).logits[0, -1].float(), -1).max()
    assert abs(result.logits_before[0]["prob"] - float(p_model)) < 1e-5  # the clean run is the model


def test_importing_changes_no_process_state():
    """After cltrace's dependencies are imported (they install their own warning filters), importing cltrace
    adds no environment variable, no warning filter, and calls no malloc tuning."""
    code = """
import ctypes, os, warnings
import numpy, torch, transformers, safetensors, matplotlib, yaml, tqdm
env, filters = dict(os.environ), list(warnings.filters)
calls = []
real = ctypes.CDLL
ctypes.CDLL = lambda *a, **k: calls.append(a) or real(*a, **k)
import cltrace
assert dict(os.environ) == env, sorted(set(os.environ) ^ set(env))
assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]
assert not calls, calls
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def _imports() -> list[tuple[str, str, bool]]:
    """(importing module, imported cltrace module, at module level?) for every import in the package."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        mod = ".".join(("cltrace",) + path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            out += [(mod, n, id(node) in top) for n in names if n == "cltrace" or n.startswith("cltrace.")]
    return out


def _layer(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_lower_layers_never_import_upper_ones():
    upward = [(a, b) for a, b, _ in _imports() if _layer(a) and _layer(b)
              and LAYERS.index(_layer(b)) > LAYERS.index(_layer(a))]
    assert not upward, upward


def test_no_import_cycles_and_no_local_imports_of_our_modules():
    edges: dict[str, set[str]] = {}
    for a, b, _ in _imports():
        edges.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(edges):
        if u not in state:
            visit(u, [])
    assert not cycles, cycles
    local = [(a, b) for a, b, top in _imports() if not top and _layer(a) != "cli"]
    assert not local, local


def test_public_names_exist():
    missing = [name for name in cltrace.__all__ if not hasattr(cltrace, name)]
    assert not missing
