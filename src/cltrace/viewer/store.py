"""The graphs in the served folder, found by name only, and each graph's saved viewer state.

Security lives here as much as in the middleware: a request names a graph, never a path. Names are matched
against the listing of DIR (top level, regular `.safetensors` files whose header says they are cltrace graphs,
symlinks resolved and refused when they leave DIR), so `..`, absolute paths, encoded slashes and links out of
DIR all come back as "no such graph".

Each graph's state (pins, supernodes, layout, thresholds, labels when there is no feature database) is a
JSON file next to it, `NAME.view.json`, written atomically.

Every variant `Graph.save` writes loads here (packed float32/float16/bfloat16 edges, version 1 files); a pruned-only
file (`cltrace trace --keep-pruned`) shows, at the thresholds that made it, exactly the full graph's pruned graph.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cltrace.attribution.export import node_ids
from cltrace.attribution.graph import Graph
from cltrace.errors import CltraceError
from cltrace.viewer.reprune import Pruner, SparsePrune

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SUFFIX = ".safetensors"
STATE_SUFFIX = ".view.json"


def is_graph_file(path: Path) -> bool:
    """A .safetensors file whose header is a cltrace graph's (transcoders in the same folder are not)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 50_000_000:
                return False
            return b'"cltrace_graph"' in f.read(n)
    except OSError:
        return False


@dataclass
class Loaded:
    """A graph in memory with what the viewer derives from it once."""

    graph: Graph
    mtime: float
    ids: list[str]
    index: dict[str, int]
    pruner: Pruner
    lock: threading.Lock = field(default_factory=threading.Lock)


class KeptPruner(Pruner):
    """A pruned-only graph's pruner: at the thresholds that made the file, the pruning recorded in it (computed on
    the full graph, which re-pruning the kept edges would not reproduce); at other thresholds, the kept edges'."""

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> SparsePrune:
        k = self.graph.kept_pruning
        if k is None or (k.node_threshold, k.edge_threshold) != (node_threshold, edge_threshold):
            return super().prune(node_threshold, edge_threshold)
        r, s = self.graph.edges.nonzero(as_tuple=True)
        return SparsePrune(k.node_mask.clone(), r, s, k.cumulative_scores.clone())


def pruner_for(graph: Graph) -> Pruner:
    return KeptPruner(graph) if graph.kept_pruning is not None else Pruner(graph)


class GraphStore:
    """The served folder: lists graphs, loads them (cached), reads and writes their viewer state."""

    def __init__(self, root: str | os.PathLike, cache_size: int = 4):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise CltraceError(f"{root} is not a folder: give the folder that holds your .safetensors graphs")
        self.cache: dict[str, Loaded] = {}
        self.cache_size = cache_size
        self.lock = threading.Lock()
        self.reserved: set[str] = set()  # names handed out for graphs being traced

    # ------------------------------------------------------------------ names -> files
    def path_of(self, name: str) -> Path:
        """The graph file called `name` in the folder, or CltraceError (never a path outside the folder)."""
        if not isinstance(name, str) or not NAME_RE.match(name) or name.endswith(STATE_SUFFIX):
            raise CltraceError(f"no graph named {name!r}")
        path = self.root / (name + SUFFIX)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise CltraceError(f"no graph named {name!r}") from None
        if real.parent != self.root or not real.is_file() or not is_graph_file(real):
            raise CltraceError(f"no graph named {name!r}")
        return real

    def names(self) -> list[str]:
        out = []
        for p in sorted(self.root.glob("*" + SUFFIX)):
            name = p.name[: -len(SUFFIX)]
            try:
                self.path_of(name)
            except CltraceError:
                continue
            out.append(name)
        return out

    def free_name(self, wanted: str) -> str:
        """A name like `wanted` (made safe) that no file in the folder has yet."""
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", wanted).strip("-_")[:60] or "graph"
        name, i = base, 2
        with self.lock:  # two traces asked for at once must not get the same name
            while (self.root / (name + SUFFIX)).exists() or name in self.reserved:
                name, i = f"{base}-{i}", i + 1
            self.reserved.add(name)
        return name

    # ------------------------------------------------------------------ graphs
    def load(self, name: str) -> Loaded:
        path = self.path_of(name)
        mtime = path.stat().st_mtime
        with self.lock:
            hit = self.cache.get(name)
            if hit is not None and hit.mtime == mtime:
                self.cache[name] = self.cache.pop(name)  # most recently used last
                return hit
        graph = Graph.load(path)
        ids = node_ids(graph)
        loaded = Loaded(graph, mtime, ids, {k: i for i, k in enumerate(ids)}, pruner_for(graph))
        with self.lock:
            self.cache[name] = loaded
            while len(self.cache) > self.cache_size:
                self.cache.pop(next(iter(self.cache)))
        return loaded

    def summary(self, name: str) -> dict:
        """What the graph list shows, read from the file's header only (no tensors)."""
        path = self.path_of(name)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["cltrace_graph"])
        meta = header.get("meta", {})
        return {"name": name, "prompt": header.get("prompt", ""), "n_tokens": len(header.get("tokens", [])),
                "model": meta.get("model", ""), "scores": meta.get("scores"), "mtime": path.stat().st_mtime,
                "n_features": meta.get("n_active_features")}

    def save_graph(self, graph: Graph, name: str) -> Path:
        if not NAME_RE.match(name):
            raise CltraceError(f"bad graph name {name!r}")
        return graph.save(self.root / (name + SUFFIX))

    # ------------------------------------------------------------------ viewer state
    def state_path(self, name: str) -> Path:
        self.path_of(name)
        return self.root / (name + STATE_SUFFIX)

    def read_state(self, name: str) -> dict:
        path = self.state_path(name)
        if not path.is_file() or path.is_symlink():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, name: str, state: dict) -> None:
        path = self.state_path(name)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(state, ensure_ascii=False))
        os.replace(tmp, path)
